"""One-run (Steinke et al.) and many-runs (Clopper-Pearson) audits on mechanisms with known ε."""

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import binom

from dpkit.audit import (clopper_pearson_interval, many_runs_epsilon_lower_bound,
                         one_run_epsilon_lower_bound, one_run_guesses)
from tests.audit.test_gaussians import balle_wang_delta


def test_bound_with_delta_zero_is_the_binomial_tail_quantile():
    # δ = 0: ε̂ solves P[Bin(r, e^ε/(1+e^ε)) ≥ v] = 1 − confidence; check both sides of it
    m, r, v = 1000, 200, 150
    eps = one_run_epsilon_lower_bound(m, r, v, confidence=0.95)
    tail = lambda e: binom.sf(v - 1, r, math.exp(e) / (1 + math.exp(e)))
    assert tail(eps) <= 0.05 + 1e-9
    assert tail(eps + 1e-3) > 0.05


def test_bound_with_delta_matches_the_theorem_tail():
    # Thm. 5.2 tail written independently: Σ_{j≤i} pmf(v − j) = P[v − i ≤ X < v], max over i
    m, r, v, delta = 1000, 300, 240, 1e-4

    def tail(e):
        q = 1 / (1 + math.exp(-e))
        partial = np.cumsum([binom.pmf(v - i, r, q) for i in range(1, v + 1)])
        return binom.sf(v - 1, r, q) + 2 * m * delta * max(partial / np.arange(1, v + 1))

    eps = one_run_epsilon_lower_bound(m, r, v, delta=delta)
    assert eps > 0
    assert tail(eps) <= 0.05 + 1e-9
    assert tail(eps + 1e-3) > 0.05


def test_bound_increases_with_correct_guesses_and_decreases_with_delta():
    bounds = [one_run_epsilon_lower_bound(1000, 200, v) for v in range(100, 201, 10)]
    assert bounds[0] == 0.0
    assert all(b2 > b1 for b1, b2 in zip(bounds[1:], bounds[2:]))
    assert np.all(np.diff(bounds) >= 0)
    with_delta = one_run_epsilon_lower_bound(1000, 200, 180, delta=1e-4)
    assert with_delta < one_run_epsilon_lower_bound(1000, 200, 180, delta=0.0)
    # more confidence, smaller bound
    assert (one_run_epsilon_lower_bound(1000, 200, 180, confidence=0.99)
            < one_run_epsilon_lower_bound(1000, 200, 180, confidence=0.9))


def test_randomised_response_audit_never_exceeds_true_epsilon_too_often():
    # each canary's output is its inclusion bit flipped w.p. 1/(1+e^ε): exactly ε-DP per canary.
    # At 95% confidence the bound may exceed ε in ≤ 5% of runs; allow a binomial margin.
    eps, m, runs = 2.0, 500, 200
    rng = np.random.default_rng(0)
    q = math.exp(eps) / (1 + math.exp(eps))
    exceed = 0
    bounds = []
    for _ in range(runs):
        included = rng.random(m) < 0.5
        keep = rng.random(m) < q
        scores = np.where(keep, included, ~included).astype(float) + 1e-3 * rng.random(m)
        r, v = one_run_guesses(scores, included, num_positive=m // 2, num_negative=m // 2)
        b = one_run_epsilon_lower_bound(m, r, v)
        bounds.append(b)
        exceed += b > eps
    assert exceed <= binom.ppf(0.999, runs, 0.05)
    assert np.median(bounds) > 0.5 * eps  # the audit has power: it is not trivially 0


def test_gaussian_mechanism_audit_with_delta_stays_below_true_epsilon():
    # score_i = 1[included] + N(0, σ²): Gaussian mechanism, sensitivity 1, true ε(δ) by Balle-Wang
    sigma, delta, m = 0.5, 1e-5, 1000
    true_eps = brentq(lambda e: balle_wang_delta(e, 1.0, sigma) - delta, 0, 50)
    rng = np.random.default_rng(1)
    bounds = []
    for _ in range(20):
        included = rng.random(m) < 0.5
        scores = included + sigma * rng.standard_normal(m)
        r, v = one_run_guesses(scores, included, num_positive=50, num_negative=50)
        bounds.append(one_run_epsilon_lower_bound(m, r, v, delta=delta))
    assert max(bounds) <= true_eps
    assert np.mean(bounds) > 0.5


def test_guesses_count_by_hand():
    scores = np.array([0.9, 0.1, 0.8, 0.3, 0.5])
    included = np.array([True, False, False, False, True])
    # top-2 guessed in: 0.9 (right), 0.8 (wrong); bottom-1 guessed out: 0.1 (right)
    assert one_run_guesses(scores, included, num_positive=2, num_negative=1) == (3, 2)
    assert one_run_guesses(scores, included, num_positive=0, num_negative=0) == (0, 0)


@pytest.mark.parametrize("n", [10, 57])
@pytest.mark.parametrize("confidence", [0.9, 0.95])
def test_clopper_pearson_exact_coverage(n, confidence):
    # exact coverage: Σ_k Binom(n, p)(k)·1[p ∈ CI(k)] ≥ confidence for every p on a fine grid
    intervals = [clopper_pearson_interval(k, n, confidence=confidence) for k in range(n + 1)]
    lo = np.array([i[0] for i in intervals])
    hi = np.array([i[1] for i in intervals])
    ks = np.arange(n + 1)
    for p in np.linspace(0.001, 0.999, 400):
        covered = (lo <= p) & (p <= hi)
        assert binom.pmf(ks, n, p)[covered].sum() >= confidence - 1e-9


def test_clopper_pearson_edges():
    assert clopper_pearson_interval(0, 20)[0] == 0.0
    assert clopper_pearson_interval(20, 20)[1] == 1.0
    # k = 0: upper = 1 − (α/2)^(1/n) in closed form
    assert clopper_pearson_interval(0, 20, confidence=0.9)[1] == pytest.approx(1 - 0.05 ** (1 / 20))


def test_many_runs_audit_randomised_response():
    # attack on ε-RR over 1000 + 1000 runs: lower bound ≤ ε in ≥ 95% of repetitions, and > 0
    eps, runs, reps = 1.0, 1000, 100
    rng = np.random.default_rng(3)
    flip = 1 / (1 + math.exp(eps))
    bounds = [many_runs_epsilon_lower_bound(rng.binomial(runs, flip), runs,
                                            rng.binomial(runs, flip), runs) for _ in range(reps)]
    assert sum(b > eps for b in bounds) <= binom.ppf(0.999, reps, 0.05)
    assert np.median(bounds) > 0.6
    # a δ-slack only lowers the bound
    assert many_runs_epsilon_lower_bound(100, 1000, 100, 1000, delta=0.01) < \
        many_runs_epsilon_lower_bound(100, 1000, 100, 1000)


@pytest.mark.parametrize("call, exc, name", [
    (lambda: one_run_epsilon_lower_bound(0, 0, 0), ValueError, "num_canaries"),
    (lambda: one_run_epsilon_lower_bound(10, 11, 0), ValueError, "num_guesses"),
    (lambda: one_run_epsilon_lower_bound(10, 5, 6), ValueError, "num_correct"),
    (lambda: one_run_epsilon_lower_bound(10, 5, 2.5), TypeError, "num_correct"),
    (lambda: one_run_epsilon_lower_bound(10, 5, 3, delta=1.0), ValueError, "delta"),
    (lambda: one_run_epsilon_lower_bound(10, 5, 3, confidence=0.0), ValueError, "confidence"),
    (lambda: one_run_guesses([1.0, 2.0], [True], num_positive=1, num_negative=0), ValueError,
     "scores"),
    (lambda: one_run_guesses([1.0, 2.0], [1, 0], num_positive=1, num_negative=0), TypeError,
     "included"),
    (lambda: one_run_guesses([1.0, 2.0], [True, False], num_positive=2, num_negative=1),
     ValueError, "num_positive"),
    (lambda: clopper_pearson_interval(5, 4), ValueError, "successes"),
    (lambda: clopper_pearson_interval(1, 0), ValueError, "trials"),
    (lambda: many_runs_epsilon_lower_bound(1, 10, 1, 10, confidence=1.5), ValueError,
     "confidence"),
])
def test_invalid_inputs(call, exc, name):
    with pytest.raises(exc, match=name):
        call()
