"""Private-ADMM accounting vs dp_accounting and a numerical Renyi divergence of the mixture pair."""

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp_mod
from scipy import integrate, stats

from dpkit.admm import admm_epsilon, calibrate_admm_noise, sampled_gaussian_replace_rdp
from dpkit.errors import CalibrationError

ORDERS = [1.5, 2.0, 3.0, 5.0, 8.0, 16.0, 32.0]


@pytest.mark.parametrize("sigma,steps", [(0.8, 1), (2.0, 50), (10.0, 1000)])
def test_full_participation_equals_dp_accounting_gaussian(sigma, steps):
    ref = rdp_mod.RdpAccountant(ORDERS)
    ref.compose(dp_event.GaussianDpEvent(sigma), steps)
    assert admm_epsilon(sigma, steps, 1e-5, orders=ORDERS) == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)


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
    e = lambda s, t, q=0.1: admm_epsilon(s, t, 1e-5, sampling_rate=q)
    assert e(1.0, 100) > e(2.0, 100) > e(4.0, 100)
    assert e(2.0, 10) < e(2.0, 100) < e(2.0, 1000)
    assert e(2.0, 100, 0.01) < e(2.0, 100, 0.1) < e(2.0, 100, 1.0)


@pytest.mark.parametrize("target,steps,q", [(0.5, 100, 1.0), (2.0, 1000, 0.05), (8.0, 10, 0.5)])
def test_calibration_never_overshoots(target, steps, q):
    s = calibrate_admm_noise(target, 1e-5, steps, sampling_rate=q)
    assert admm_epsilon(s, steps, 1e-5, sampling_rate=q) <= target
    assert admm_epsilon(s * 0.999, steps, 1e-5, sampling_rate=q) > target


def test_calibration_impossible():
    with pytest.raises(CalibrationError):
        calibrate_admm_noise(1e-9, 1e-300, 10**6)


@pytest.mark.parametrize("call,exc,word", [
    (lambda: sampled_gaussian_replace_rdp(0.0, 0.5), ValueError, "noise_multiplier"),
    (lambda: sampled_gaussian_replace_rdp(1.0, 0.0), ValueError, "sampling_rate"),
    (lambda: sampled_gaussian_replace_rdp(1.0, 1.5), ValueError, "sampling_rate"),
    (lambda: sampled_gaussian_replace_rdp(1.0, 0.5, [0.5]), ValueError, "orders"),
    (lambda: admm_epsilon(1.0, 0, 1e-5), ValueError, "steps"),
    (lambda: admm_epsilon(1.0, 10, 0.0), ValueError, "delta"),
    (lambda: admm_epsilon("1", 10, 1e-5), TypeError, "noise_multiplier"),
    (lambda: calibrate_admm_noise(0.0, 1e-5, 10), ValueError, "target_epsilon"),
    (lambda: calibrate_admm_noise(1.0, 1e-5, 10, rtol=0), ValueError, "rtol"),
])
def test_invalid_inputs(call, exc, word):
    with pytest.raises(exc, match=word):
        call()
