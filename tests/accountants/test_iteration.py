"""Amplification-by-iteration accountant vs closed forms, a brute-force shift optimisation, and composition."""

import math

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp_mod
from scipy.optimize import minimize

from dpkit.accountants.iteration import IterationAccountant
from dpkit.errors import CalibrationError

ORDERS = [1.5, 2.0, 4.0, 8.0, 16.0, 32.0]


@pytest.mark.parametrize("k", [1, 2, 5, 40])
def test_nonexpansive_closed_form(k):
    # Feldman et al. 2018 Thm 1: alpha * Delta^2 / (2 s^2 k), written out independently here
    acc = IterationAccountant(2.0, 0.7, k, orders=ORDERS)
    expected = np.array(ORDERS) * 0.7 ** 2 / (2 * 2.0 ** 2 * k)
    np.testing.assert_allclose(acc.rdp(), expected, rtol=1e-12)


def test_single_step_equals_gaussian_mechanism_of_dp_accounting():
    acc = IterationAccountant(3.0, 1.5, 1, orders=ORDERS)
    ref = rdp_mod.RdpAccountant(ORDERS)
    ref.compose(dp_event.GaussianDpEvent(3.0 / 1.5))
    assert acc.epsilon(1e-5) == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)


@pytest.mark.parametrize("c,k", [(0.9, 3), (0.5, 4), (0.99, 6)])
def test_contractive_matches_numerical_shift_optimisation(c, k):
    # minimise sum a_j^2 s.t. residuals r_j = c r_{j-1} - a_j >= 0 and r_{k-1} = 0 (r_{-1} = Delta/c)
    delta_shift = 1.3

    def residuals(a):
        r, out = delta_shift, []
        for j, aj in enumerate(a):
            r = (r if j == 0 else c * r) - aj
            out.append(r)
        return np.array(out)

    cons = [{"type": "eq", "fun": lambda a: residuals(a)[-1]},
            {"type": "ineq", "fun": lambda a: residuals(a)},
            {"type": "ineq", "fun": lambda a: a}]
    acc = IterationAccountant(1.0, delta_shift, k, contraction=c, orders=[2.0])
    formula = acc.rdp()[0] / 2.0  # = min sum a^2 / 2 claimed by the accountant (alpha = 2, s = 1)
    # (1) the numerical optimiser, started anywhere, never beats the closed form
    solved = 0
    for start in (np.full(k, delta_shift / k), np.r_[delta_shift, np.zeros(k - 1)]):
        res = minimize(lambda a: np.sum(a ** 2), start, constraints=cons, method="SLSQP",
                       options={"ftol": 1e-15, "maxiter": 1000})
        if res.success:
            solved += 1
            assert formula <= res.fun / 2.0 + 1e-9
    assert solved >= 1
    # (2) the closed form is attained by a feasible budget a_j proportional to c^(k-1-j)
    w = c ** np.arange(k - 1, -1, -1, dtype=float)
    a = w * c ** (k - 1) * delta_shift / np.sum(w ** 2)
    assert np.all(residuals(a) >= -1e-12) and abs(residuals(a)[-1]) < 1e-12
    assert np.sum(a ** 2) / 2.0 == pytest.approx(formula, rel=1e-12)


@pytest.mark.parametrize("c", [1.0, 0.95, 0.5])
@pytest.mark.parametrize("k", [1, 3, 50])
def test_never_larger_than_composition(c, k):
    # releasing all k iterates: only the step that uses the record differs -> one Gaussian mechanism;
    # composition of the k noisy steps of a record used every step is k times that
    acc = IterationAccountant(1.0, 1.0, k, contraction=c, orders=ORDERS)
    ref = rdp_mod.RdpAccountant(ORDERS)
    ref.compose(dp_event.GaussianDpEvent(1.0))
    assert acc.epsilon(1e-6) <= ref.get_epsilon(1e-6) + 1e-12
    assert np.all(acc.rdp() <= np.array(ORDERS) / 2.0 + 1e-15)


def test_monotone_in_noise_steps_and_contraction():
    eps = lambda s, k, c=1.0: IterationAccountant(s, 1.0, k, contraction=c).epsilon(1e-5)
    assert eps(1.0, 10) > eps(2.0, 10) > eps(4.0, 10)
    assert eps(1.0, 1) > eps(1.0, 10) > eps(1.0, 100)
    assert eps(1.0, 10, 1.0) > eps(1.0, 10, 0.9) > eps(1.0, 10, 0.5)


def test_large_k_strong_contraction_is_finite():
    acc = IterationAccountant(1.0, 1.0, 5000, contraction=0.1)
    assert np.all(np.isfinite(acc.rdp())) and acc.shift_factor() >= 0.0


@pytest.mark.parametrize("target", [0.3, 1.0, 5.0])
def test_calibration_never_overshoots(target):
    s = IterationAccountant.calibrate_noise_std(target, 1e-5, 1.0, 20, contraction=0.9)
    assert IterationAccountant(s, 1.0, 20, contraction=0.9).epsilon(1e-5) <= target
    assert IterationAccountant(s * (1 - 1e-3), 1.0, 20, contraction=0.9).epsilon(1e-5) > target


def test_calibration_impossible_raises():
    with pytest.raises(CalibrationError):
        IterationAccountant.calibrate_noise_std(1e-12, 1e-300, 1.0, 1)


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(noise_std=0.0), ValueError, "noise_std"),
    (dict(noise_std=-1.0), ValueError, "noise_std"),
    (dict(noise_std="1"), TypeError, "noise_std"),
    (dict(sensitivity=0.0), ValueError, "sensitivity"),
    (dict(sensitivity=math.inf), ValueError, "sensitivity"),
    (dict(steps=0), ValueError, "steps"),
    (dict(steps=1.5), TypeError, "steps"),
    (dict(contraction=1.5), ValueError, "contraction"),
    (dict(contraction=0.0), ValueError, "contraction"),
    (dict(orders=[1.0, 2.0]), ValueError, "orders"),
    (dict(orders=[]), ValueError, "orders"),
    (dict(orders="abc"), TypeError, "orders"),
])
def test_invalid_inputs(kwargs, exc, word):
    args = dict(noise_std=1.0, sensitivity=1.0, steps=3)
    args.update(kwargs)
    with pytest.raises(exc, match=word):
        IterationAccountant(args.pop("noise_std"), args.pop("sensitivity"), args.pop("steps"), **args)


@pytest.mark.parametrize("delta", [0.0, 1.0, -0.1, float("nan")])
def test_invalid_delta(delta):
    with pytest.raises(ValueError, match="delta"):
        IterationAccountant(1.0, 1.0, 2).epsilon(delta)


def test_iteration_accountant_and_admm_import_without_torch():
    # a meta-path blocker (sys.modules['torch'] = None trips scipy's array-API helpers instead)
    import subprocess
    import sys
    code = ("import sys, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'torch': raise ImportError('torch blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            "from dpkit.accountants import IterationAccountant\n"
            "import dpkit.admm\n"
            "assert IterationAccountant(1.0, 1.0, 3).epsilon(1e-5) > 0\n"
            "assert 'torch' not in sys.modules\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
