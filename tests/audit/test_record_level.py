"""Closed-form record-level bounds (Cherubin et al.) vs numerical integration and dp_accounting."""

import numpy as np
import pytest
from scipy import integrate
from scipy.stats import norm

from dpkit.audit import (approximation_error, bayes_security_attribute, bayes_security_mia,
                         pld_advantage, record_level_risk, tpr_at_fpr_bound)


def shift_tv(shift):
    """TV(N(0, 1), N(shift, 1)) by quadrature: the advantage of one Gaussian shift."""
    f = lambda x: abs(norm.pdf(x) - norm.pdf(x, shift))
    return 0.5 * integrate.quad(f, -12, 12 + shift, points=[shift / 2], limit=200)[0]


def mixture_tv(p, sigma):
    """TV between one DP-SGD step's mixture and its Gaussian approximation, by quadrature."""
    f = lambda x: abs((1 - p) * norm.pdf(x, 0, sigma) + p * norm.pdf(x, 1, sigma)
                      - norm.pdf(x, p, sigma))
    return 0.5 * integrate.quad(f, -12 * sigma, 1 + 12 * sigma, points=[0, p, 1], limit=200)[0]


@pytest.mark.parametrize("sigma, p, steps", [(1.0, 0.01, 1000), (0.7, 0.1, 50), (3.0, 1.0, 4)])
def test_approximate_mia_is_the_advantage_of_the_gaussian_shift(sigma, p, steps):
    # add/remove: T steps of N(p·C, σ²C²) vs N(0, σ²C²) = one shift of p√T/σ noise stds
    got = bayes_security_mia(sigma, p, steps, relation="add_remove")
    assert 1 - got == pytest.approx(shift_tv(p * np.sqrt(steps) / sigma), abs=1e-7)
    got = bayes_security_mia(sigma, p, steps, relation="substitution")
    assert 1 - got == pytest.approx(shift_tv(2 * p * np.sqrt(steps) / sigma), abs=1e-7)


@pytest.mark.parametrize("p, sigma", [(0.01, 0.5), (0.1, 1.0), (0.5, 3.0)])
def test_error_term_bounds_the_one_step_approximation(p, sigma):
    # Proposition 4 at T = 1 must dominate the true total-variation error
    assert approximation_error(sigma, p, 1) >= mixture_tv(p, sigma)
    assert approximation_error(sigma, 1.0, 10) == 0.0


@pytest.mark.parametrize("p, sigma", [(0.1, 1.0), (0.5, 0.5)])
def test_error_term_over_many_steps(p, sigma):
    # T-fold product of one world vs its Gaussian approximation: a LOWER bound on the true TV
    # (binning is post-processing; dp_accounting's optimistic PLD under-estimates δ(0)) must stay
    # below the √T error term. An error term without the √T growth would fail at T = 64.
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    edges = np.linspace(-12 * sigma, 1 + 12 * sigma, 2001)
    mix = (1 - p) * np.diff(norm.cdf(edges, 0, sigma)) + p * np.diff(norm.cdf(edges, 1, sigma))
    gauss = np.diff(norm.cdf(edges, p, sigma))
    keep = np.flatnonzero((mix > 0) & (gauss > 0))
    pld = pld_lib.from_two_probability_mass_functions(
        {i: np.log(mix[i]) for i in keep}, {i: np.log(gauss[i]) for i in keep},
        pessimistic_estimate=False, value_discretization_interval=1e-3)
    for steps in (4, 64):
        tv_lower = float(pld.self_compose(steps).get_delta_for_epsilon(0.0))
        assert tv_lower <= approximation_error(sigma, p, steps)
    assert tv_lower > approximation_error(sigma, p, 1)  # grows: the T-dependence matters


def test_attribute_inference_reduces_to_mia_and_matches_the_shift():
    sigma, p, steps, clip = 1.3, 0.05, 40, 2.0
    ones = np.full(steps, clip)
    assert bayes_security_attribute(ones, sigma, p, clip) == pytest.approx(
        bayes_security_mia(sigma, p, steps, relation="add_remove"))
    assert bayes_security_attribute(2 * ones, sigma, p, clip) == pytest.approx(
        bayes_security_mia(sigma, p, steps, relation="substitution"))
    r = np.random.default_rng(0).uniform(0, 2 * clip, steps)
    got = bayes_security_attribute(r, sigma, p, clip)
    assert 1 - got == pytest.approx(shift_tv(p * np.sqrt(np.sum(r**2)) / (sigma * clip)), abs=1e-7)
    strict = bayes_security_attribute(r, sigma, p, clip, strict=True)
    assert strict == pytest.approx(max(got - 2 * approximation_error(sigma, p, steps), 0.0))


# Direction of the comparison: the strict advantage claims advantage_true <= advantage_strict.
# dp_accounting's OPTIMISTIC PLD estimate gives δ(0) <= TV_true, so advantage_strict >= it is a
# necessary condition for a valid bound (comparing with the PESSIMISTIC δ(0), itself an upper
# bound, would prove nothing either way).
GRID = [(s, p, t) for s in (0.8, 4.0) for p in (0.001, 0.05, 1.0) for t in (1, 30)]


@pytest.mark.parametrize("relation", ["add_remove", "substitution"])
def test_strict_advantage_is_never_below_the_pld_advantage(relation):
    for sigma, p, steps in GRID:
        tv_lower = pld_advantage(sigma, p, steps, relation=relation, pessimistic=False)
        strict = 1 - bayes_security_mia(sigma, p, steps, relation=relation, strict=True)
        assert strict >= tv_lower - 1e-9, (sigma, p, steps)
        if p == 1.0:  # no subsampling: the approximation is exact, so strict is tight
            assert strict == pytest.approx(tv_lower, abs=5e-3)


def test_approximate_value_is_not_a_bound():
    # σ = 1, q = 0.01, T = 1000 (add/remove): the approximate advantage 0.126 is BELOW a lower
    # bound on the true advantage (~0.15); only the strict variant is a guarantee.
    approx = 1 - bayes_security_mia(1.0, 0.01, 1000)
    tv_lower = pld_advantage(1.0, 0.01, 1000, pessimistic=False, discretization=1e-4)
    assert approx < tv_lower


def test_record_level_risk_fields_are_consistent():
    risk = record_level_risk(2.0, 0.02, 200, relation="substitution")
    assert risk.advantage == pytest.approx(1 - risk.bayes_security)
    assert risk.advantage_strict == pytest.approx(1 - risk.bayes_security_strict)
    assert risk.bayes_security_strict <= risk.bayes_security
    assert risk.to_dict()["relation"] == "substitution"


@pytest.mark.parametrize("sigma", [0.8, 2.0])
def test_tpr_bound_without_subsampling_matches_the_gaussian_tradeoff(sigma):
    # p = 1, T = 1 is the Gaussian mechanism: exact curve TPR = Φ(Φ⁻¹(FPR) + 1/σ) (f-DP, GDP)
    fpr = np.array([1e-4, 1e-3, 0.01, 0.1, 0.5])
    exact = norm.cdf(norm.ppf(fpr) + 1 / sigma)
    bound = tpr_at_fpr_bound(fpr, sigma, 1.0, 1)
    assert np.all(bound >= exact - 1e-9)
    assert np.all(bound <= exact + 0.02)  # ε-grid resolution + pessimistic discretisation


def test_tpr_bound_shape_and_monotonicity():
    fpr = np.linspace(0, 1, 11)
    bound = tpr_at_fpr_bound(fpr, 1.0, 0.01, 500, relation="substitution")
    assert bound.shape == fpr.shape
    assert np.all(bound >= fpr) and np.all(bound <= 1) and np.all(np.diff(bound) >= -1e-12)
    assert isinstance(tpr_at_fpr_bound(0.01, 1.0, 0.01, 500), float)
    # more noise, less attack success
    assert tpr_at_fpr_bound(0.01, 3.0, 0.01, 500) < tpr_at_fpr_bound(0.01, 1.0, 0.01, 500)


@pytest.mark.parametrize("call, exc, name", [
    (lambda: bayes_security_mia(0.0, 0.1, 10), ValueError, "noise_multiplier"),
    (lambda: bayes_security_mia(1.0, 0.0, 10), ValueError, "sampling_rate"),
    (lambda: bayes_security_mia(1.0, 1.5, 10), ValueError, "sampling_rate"),
    (lambda: bayes_security_mia(1.0, 0.1, 0), ValueError, "steps"),
    (lambda: bayes_security_mia(1.0, 0.1, 2.5), TypeError, "steps"),
    (lambda: bayes_security_mia(1.0, 0.1, 10, relation="replace"), ValueError, "relation"),
    (lambda: bayes_security_attribute([], 1.0, 0.1, 1.0), ValueError, "gradient_distances"),
    (lambda: bayes_security_attribute([3.0], 1.0, 0.1, 1.0), ValueError, "gradient_distances"),
    (lambda: bayes_security_attribute([-0.1], 1.0, 0.1, 1.0), ValueError, "gradient_distances"),
    (lambda: bayes_security_attribute([0.5], 1.0, 0.1, 0.0), ValueError, "max_grad_norm"),
    (lambda: approximation_error(1.0, "a", 3), TypeError, "sampling_rate"),
    (lambda: tpr_at_fpr_bound(1.5, 1.0, 0.1, 10), ValueError, "fpr"),
    (lambda: tpr_at_fpr_bound([[0.1]], 1.0, 0.1, 10), ValueError, "fpr"),
    (lambda: pld_advantage(1.0, 0.1, 10, discretization=0.0), ValueError, "discretization"),
    (lambda: pld_advantage(1.0, 0.1, 10, relation="x"), ValueError, "relation"),
])
def test_invalid_inputs(call, exc, name):
    with pytest.raises(exc, match=name):
        call()
