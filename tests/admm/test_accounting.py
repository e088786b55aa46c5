"""Private-ADMM accounting vs dp_accounting and a numerical Renyi divergence of the mixture pair."""

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp_mod
from scipy import integrate, stats

from dpkit.admm import (admm_epsilon, calibrate_admm_noise, growing_sensitivity_gaussian_rdp,
                        sampled_gaussian_replace_rdp)
from dpkit.errors import CalibrationError

ORDERS = [1.5, 2.0, 3.0, 5.0, 8.0, 16.0, 32.0]


@pytest.mark.parametrize("sigma,steps", [(0.8, 1), (2.0, 50), (10.0, 1000)])
def test_full_participation_equals_dp_accounting_gaussian(sigma, steps):
    ref = rdp_mod.RdpAccountant(ORDERS)
    ref.compose(dp_event.GaussianDpEvent(sigma), steps)
    got = admm_epsilon(sigma, steps, 1e-5, variant="federated", sampling_rate=1.0, orders=ORDERS)
    assert got == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)


@pytest.mark.parametrize("sigma,steps", [(5.0, 1), (30.0, 7), (400.0, 25)])
def test_centralized_equals_dp_accounting_composition_of_growing_sensitivity(sigma, steps):
    # step t releases with sensitivity t units and noise sigma units: a Gaussian of multiplier sigma/t
    ref = rdp_mod.RdpAccountant(ORDERS)
    for t in range(1, steps + 1):
        ref.compose(dp_event.GaussianDpEvent(sigma / t))
    got = admm_epsilon(sigma, steps, 1e-5, variant="centralized", orders=ORDERS)
    assert got == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)
    brute = sum(np.array(ORDERS) * t ** 2 / (2 * sigma ** 2) for t in range(1, steps + 1))
    np.testing.assert_allclose(growing_sensitivity_gaussian_rdp(sigma, steps, ORDERS), brute, rtol=1e-12)


def _renyi_mixture(alpha, q, sigma, a, a2, b):
    # exact D_alpha(q N(a) + (1-q) N(b) || q N(a2) + (1-q) N(b)) in 1-D (unit-sensitivity scale sigma)
    def logp(x, m):
        return np.logaddexp(np.log(q) + stats.norm.logpdf(x, m, sigma),
                            np.log1p(-q) + stats.norm.logpdf(x, b, sigma))

    lo, hi = min(a, a2, b) - 30 * sigma, max(a, a2, b) + 30 * sigma
    val, _ = integrate.quad(lambda x: np.exp(alpha * logp(x, a) + (1 - alpha) * logp(x, a2)),
                            lo, hi, limit=400, points=sorted({a, a2, b}))
    return np.log(val) / (alpha - 1)


@pytest.mark.parametrize("q", [0.01, 0.1, 0.5])
@pytest.mark.parametrize("b", [0.0, 0.5, 3.0])
def test_sampled_bound_dominates_exact_mixture_divergence(q, b):
    sigma, orders = 1.5, [1.5, 2.0, 4.0, 8.0]
    bound = sampled_gaussian_replace_rdp(sigma, q, orders)
    for alpha, eps in zip(orders, bound):
        # the two participating means differ by the sensitivity 1; b is the non-participating state
        exact = _renyi_mixture(alpha, q, sigma, 0.5, -0.5, b)
        assert exact <= eps * (1 + 1e-9) + 1e-12
    # and the bound is tight when the common part is far away (b -> infinity)
    far = _renyi_mixture(2.0, q, sigma, 0.5, -0.5, 60.0)
    assert far == pytest.approx(sampled_gaussian_replace_rdp(sigma, q, [2.0])[0], rel=1e-4)


def test_sampling_never_worse_than_full_participation():
    full = sampled_gaussian_replace_rdp(1.0, 1.0, ORDERS)
    for q in (1e-4, 0.05, 0.9):
        assert np.all(sampled_gaussian_replace_rdp(1.0, q, ORDERS) <= full)


def test_huge_orders_stay_finite_and_conservative():
    out = sampled_gaussian_replace_rdp(0.3, 0.01, [1024.0, 4096.0])
    assert np.all(np.isfinite(out))
    x = (np.array([1024.0, 4096.0]) - 1) * np.array([1024.0, 4096.0]) / (2 * 0.09)
    assert np.all(out >= (x + np.log(0.01)) / (np.array([1024.0, 4096.0]) - 1) * (1 - 1e-12))


def test_epsilon_monotone_in_noise_steps_and_rate():
    e = lambda s, t, q=0.1: admm_epsilon(s, t, 1e-5, variant="federated", sampling_rate=q)
    assert e(1.0, 100) > e(2.0, 100) > e(4.0, 100)
    assert e(2.0, 10) < e(2.0, 100) < e(2.0, 1000)
    assert e(2.0, 100, 0.01) < e(2.0, 100, 0.1) < e(2.0, 100, 1.0)
    c = lambda s, t: admm_epsilon(s, t, 1e-5, variant="centralized")
    assert c(50.0, 10) > c(100.0, 10) > c(200.0, 10)
    assert c(100.0, 5) < c(100.0, 10) < c(100.0, 20)


@pytest.mark.parametrize("target,steps,variant,q", [
    (0.5, 100, "federated", 1.0), (2.0, 1000, "decentralized", 0.05), (8.0, 10, "federated", 0.5),
    (0.3, 20, "centralized", None), (10.0, 3, "centralized", None)])
def test_calibration_never_overshoots(target, steps, variant, q):
    kw = dict(variant=variant, sampling_rate=q)
    s = calibrate_admm_noise(target, 1e-5, steps, **kw)
    assert admm_epsilon(s, steps, 1e-5, **kw) <= target
    assert admm_epsilon(s * 0.999, steps, 1e-5, **kw) > target


def test_calibration_impossible():
    with pytest.raises(CalibrationError):
        calibrate_admm_noise(1e-9, 1e-300, 10**6)


@pytest.mark.parametrize("call,exc,word", [
    (lambda: sampled_gaussian_replace_rdp(0.0, 0.5), ValueError, "noise_multiplier"),
    (lambda: sampled_gaussian_replace_rdp(1.0, 0.0), ValueError, "sampling_rate"),
    (lambda: sampled_gaussian_replace_rdp(1.0, 1.5), ValueError, "sampling_rate"),
    (lambda: sampled_gaussian_replace_rdp(1.0, 0.5, [0.5]), ValueError, "orders"),
    (lambda: admm_epsilon(1.0, 0, 1e-5), ValueError, "steps"),
    (lambda: admm_epsilon(1.0, 5, 1e-5, variant="gossip"), ValueError, "variant"),
    (lambda: admm_epsilon(1.0, 5, 1e-5, variant="federated"), ValueError, "sampling_rate"),
    (lambda: admm_epsilon(1.0, 5, 1e-5, sampling_rate=0.5), ValueError, "sampling_rate"),
    (lambda: growing_sensitivity_gaussian_rdp(0.0, 3), ValueError, "noise_multiplier"),
    (lambda: admm_epsilon(1.0, 10, 0.0), ValueError, "delta"),
    (lambda: admm_epsilon("1", 10, 1e-5), TypeError, "noise_multiplier"),
    (lambda: calibrate_admm_noise(0.0, 1e-5, 10), ValueError, "target_epsilon"),
    (lambda: calibrate_admm_noise(1.0, 1e-5, 10, rtol=0), ValueError, "rtol"),
])
def test_invalid_inputs(call, exc, word):
    with pytest.raises(exc, match=word):
        call()
