"""One-shot estimation: canary directions, cosine statistics, consistency on a Gaussian mechanism."""

import numpy as np
import pytest
from scipy import stats

from dpkit.audit import (canary_cosines, canary_directions, gaussian_pair_epsilon,
                         max_cosines_over_rounds, one_shot_epsilon)
from tests.audit.test_gaussians import balle_wang_delta


def test_directions_are_counter_based_unit_vectors():
    full = canary_directions(7, 6, 50)
    assert full.shape == (6, 50)
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, rtol=1e-12)
    # any canary regenerates alone, in any order
    np.testing.assert_array_equal(canary_directions(7, np.array([4, 1]), 50), full[[4, 1]])
    assert not np.allclose(canary_directions(8, 6, 50), full)


def test_directions_are_isotropic():
    # a fixed coordinate of a uniform unit vector in R^d, scaled by sqrt(d), is ≈ N(0, 1)
    d = 400
    dirs = canary_directions(11, 3000, d)
    z = dirs[:, 5] * np.sqrt(d)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    # different canaries are (nearly) orthogonal: cosines ~ N(0, 1/d)
    cos = dirs[:1500] @ dirs[0] * np.sqrt(d)
    assert stats.kstest(cos[1:], "norm").pvalue > 1e-3


def test_cosines_match_definition_and_max_over_rounds_matches_loop():
    rng = np.random.default_rng(0)
    dirs = canary_directions(1, 5, 30)
    updates = rng.standard_normal((4, 30))
    for t in range(4):
        expected = [u @ updates[t] / np.linalg.norm(updates[t]) for u in dirs]
        np.testing.assert_allclose(canary_cosines(updates[t], dirs), expected, rtol=1e-12)
    loop = [max(d @ u / np.linalg.norm(u) for u in updates) for d in dirs]
    np.testing.assert_allclose(max_cosines_over_rounds(updates, dirs), loop, rtol=1e-12)
    # a zero round carries no information and is skipped
    with_zero = np.vstack([updates, np.zeros(30)])
    np.testing.assert_allclose(max_cosines_over_rounds(with_zero, dirs), loop, rtol=1e-12)


def _simulate(sigma, d, k, seed, rng_seed):
    """Gaussian mechanism: release Σ_{inserted} c_i + N(0, σ² I_d); unseen canaries as the null."""
    rng = np.random.default_rng(rng_seed)
    chunk = 250
    release = sigma * rng.standard_normal(d)
    for start in range(0, k, chunk):
        release += canary_directions(seed, np.arange(start, start + chunk), d).sum(axis=0)
    stat = lambda idx: canary_cosines(release, canary_directions(seed, idx, d))
    observed = np.concatenate([stat(np.arange(s, s + chunk)) for s in range(0, k, chunk)])
    null = np.concatenate([stat(np.arange(s, s + chunk)) for s in range(k, 2 * k, chunk)])
    return observed, null


def test_consistency_on_gaussian_mechanism():
    """Andrew et al. Thm. 3.1: ε̂ → ε of the Gaussian mechanism as d and k grow.

    Each canary has sensitivity 1 under noise σ, so the true ε(δ) is the analytic Gaussian
    mechanism's (computed by brentq on Balle-Wang, independently of dpkit). Finite d adds the other
    canaries' cross terms (effective noise sqrt(σ² + k/d), ε 3% lower here) and k = 1000 adds
    sampling error (σ̂ noise biases ε̂ upward: +6% on average over 5 seeds, at most +14%); the
    stated tolerance is 15% of ε, and the confidence box must contain it.
    """
    from scipy.optimize import brentq

    sigma, d, k, delta = 1.0, 20000, 1000, 1e-5
    true_eps = brentq(lambda e: balle_wang_delta(e, 1.0, sigma) - delta, 0.0, 50.0)
    observed, null = _simulate(sigma, d, k, seed=3, rng_seed=0)

    est = one_shot_epsilon(observed, delta=delta, dim=d)
    assert est.epsilon == pytest.approx(true_eps, rel=0.15)
    assert est.epsilon_lower <= true_eps <= est.epsilon_upper
    # the null from the unseen canaries agrees with N(0, 1/d)
    assert np.std(null) == pytest.approx(1 / np.sqrt(d), rel=0.1)
    est_null = one_shot_epsilon(observed, delta=delta, null_scores=null)
    assert est_null.epsilon == pytest.approx(true_eps, rel=0.15)
    assert est_null.num_null == k


def test_estimate_is_the_exact_gaussian_distance_of_the_fit():
    rng = np.random.default_rng(5)
    obs, null = rng.normal(0.3, 1.1, 300), rng.normal(0.0, 1.0, 300)
    est = one_shot_epsilon(obs, delta=1e-4, null_scores=null)
    expected = gaussian_pair_epsilon(1e-4, null.mean(), null.std(ddof=1), obs.mean(), obs.std(ddof=1))
    assert est.epsilon == pytest.approx(expected)
    assert est.epsilon_lower <= est.epsilon <= est.epsilon_upper


def test_epsilon_is_monotone_in_the_mean_shift():
    # the confidence box relies on ε(a, r) being non-decreasing in a = |μ1 − μ0|/σ0
    shifts = np.linspace(0, 6, 61)
    for ratio in (0.5, 0.9, 0.99, 1.0, 1.01, 1.2, 2.0):
        eps = gaussian_pair_epsilon(1e-5, 0.0, 1.0, shifts, ratio)
        assert np.all(np.diff(eps) >= -1e-9), ratio


@pytest.mark.parametrize("known_null", [True, False])
def test_lower_bound_coverage(known_null):
    # Gaussian statistics with known parameters: P[epsilon_lower > true ε] must be ≤ 1 − confidence
    # (allow a binomial margin at the 0.1% level); the bound must also have power.
    rng = np.random.default_rng(4)
    mu, sd, n, reps, delta = 1.0, 1.05, 300, 80, 1e-5
    true_eps = gaussian_pair_epsilon(delta, 0.0, 1.0, mu, sd)
    exceed, lowers = 0, []
    for _ in range(reps):
        obs = rng.normal(mu, sd, n)
        if known_null:
            # null N(0, 1/d) with d = 1: scale everything by 1/sqrt(d)
            est = one_shot_epsilon(obs, delta=delta, dim=1)
        else:
            est = one_shot_epsilon(obs, delta=delta, null_scores=rng.normal(0.0, 1.0, n))
        exceed += est.epsilon_lower > true_eps
        lowers.append(est.epsilon_lower)
    assert exceed <= stats.binom.ppf(0.999, reps, 0.05)
    # power: measured 0.71·ε (known null) and 0.47·ε (fitted null: four parameters in the box)
    assert np.mean(lowers) > (0.6 if known_null else 0.35) * true_eps


def test_no_signal_gives_small_estimate_and_lower_bound_near_zero():
    rng = np.random.default_rng(2)
    d = 10000
    obs = rng.normal(0.0, 1 / np.sqrt(d), 500)
    est = one_shot_epsilon(obs, delta=1e-5, dim=d)
    assert est.epsilon_lower < 0.5


@pytest.mark.parametrize("kwargs, exc, name", [
    (dict(canary_scores=[0.1], delta=1e-5, dim=10), ValueError, "canary_scores"),
    (dict(canary_scores=[[0.1, 0.2]], delta=1e-5, dim=10), ValueError, "canary_scores"),
    (dict(canary_scores=[0.1, np.nan], delta=1e-5, dim=10), ValueError, "canary_scores"),
    (dict(canary_scores=[0.1, 0.2], delta=1e-5), ValueError, "dim or null_scores"),
    (dict(canary_scores=[0.1, 0.2], delta=0.0, dim=10), ValueError, "delta"),
    (dict(canary_scores=[0.1, 0.2], delta=1e-5, dim=0), ValueError, "dim"),
    (dict(canary_scores=[0.1, 0.2], delta=1e-5, dim=2.5), TypeError, "dim"),
    (dict(canary_scores=[0.1, 0.2], delta=1e-5, null_scores=[1.0]), ValueError, "null_scores"),
    (dict(canary_scores=[0.1, 0.1], delta=1e-5, dim=10), ValueError, "constant"),
    (dict(canary_scores=[0.1, 0.2], delta=1e-5, dim=10, confidence=1.0), ValueError, "confidence"),
    (dict(canary_scores=[0.1, 0.2], delta=1e-5, dim=10, confidence=0.0), ValueError,
     "confidence"),
])
def test_one_shot_invalid_inputs(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        one_shot_epsilon(**kwargs)


@pytest.mark.parametrize("call, exc, name", [
    (lambda: canary_directions(-1, 3, 10), ValueError, "seed"),
    (lambda: canary_directions(1.5, 3, 10), TypeError, "seed"),
    (lambda: canary_directions(1, 0, 10), ValueError, "indices"),
    (lambda: canary_directions(1, np.array([-1]), 10), ValueError, "indices"),
    (lambda: canary_directions(1, np.array([0.5]), 10), ValueError, "indices"),
    (lambda: canary_directions(1, 3, 0), ValueError, "dim"),
    (lambda: canary_cosines(np.zeros(10), np.ones((2, 10))), ValueError, "vector"),
    (lambda: canary_cosines(np.ones(10), np.ones((2, 9))), ValueError, "directions"),
    (lambda: canary_cosines(np.ones(10), np.zeros((2, 10))), ValueError, "directions"),
    (lambda: max_cosines_over_rounds(np.zeros((3, 10)), np.ones((2, 10))), ValueError, "updates"),
    (lambda: max_cosines_over_rounds(np.ones(10), np.ones((2, 10))), ValueError, "updates"),
])
def test_canary_invalid_inputs(call, exc, name):
    with pytest.raises(exc, match=name):
        call()
