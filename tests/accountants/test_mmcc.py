"""MMCC and matrix-mechanism accounting vs dp_accounting, numerical integration and Monte Carlo."""

import itertools
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from scipy import integrate, stats

from dpkit.accountants import dpsgd_event
from dpkit.accountants.mmcc import (
    MatrixMechanismAccountant, _mixture_pld, banded_amplified_epsilon, conditional_probabilities,
    gaussian_delta, gaussian_epsilon, mmcc_analysis, mmcc_epsilon, unamplified_epsilon)
from dpkit.errors import UnsupportedEventError

FAST = {"value_discretization_interval": 1e-2}


def _banded(n, b, coef=(1.0, 0.5, 0.3, 0.2)):
    C = np.zeros((n, n))
    for k in range(b):
        C += np.diag(np.full(n - k, coef[k]), -k)
    return C / np.linalg.norm(C, axis=0).max()


def _dpsgd_eps(sigma, q, steps, delta, vdi):
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=vdi)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def test_identity_reduces_exactly_to_dpsgd():
    eps = mmcc_epsilon(np.eye(30), noise_multiplier=1.1, sampling_prob=0.03, delta=1e-5,
                       value_discretization_interval=1e-3)
    assert eps == pytest.approx(_dpsgd_eps(1.1, 0.03, 30, 1e-5, 1e-3), rel=1e-9)
    res = mmcc_analysis(np.eye(30), noise_multiplier=1.1, sampling_prob=0.03, delta=1e-5)
    assert res.tail_delta == 0.0 and res.pld_delta == 1e-5 and res.max_probability_ratio == 1.0


def test_full_participation_is_gaussian_with_row_sum_sensitivity():
    C = _banded(20, 3)
    mu = np.linalg.norm(C.sum(axis=1)) / 2.0
    eps = mmcc_epsilon(C, noise_multiplier=2.0, sampling_prob=1.0, delta=1e-6)
    ref = pld_lib.from_gaussian_mechanism(1.0 / mu, value_discretization_interval=1e-4)
    assert eps == pytest.approx(ref.get_epsilon_for_delta(1e-6), rel=1e-3)
    assert gaussian_delta(mu, eps) <= 1e-6 * (1 + 1e-9)


def test_mmcc_is_monotone_in_sigma_and_amplifies():
    C = _banded(24, 3)
    eps = [mmcc_epsilon(C, noise_multiplier=s, sampling_prob=0.05, delta=1e-5, **FAST)
           for s in (2.0, 3.0, 5.0)]
    assert eps[0] > eps[1] > eps[2]
    full = mmcc_epsilon(C, noise_multiplier=5.0, sampling_prob=1.0, delta=1e-5)
    assert eps[2] < full


def test_fast_mixture_pld_is_identical_to_library():
    atoms, mass = [0.0, 0.4, 1.1], [0.7, 0.2, 0.1]
    fast = _mixture_pld(1.3, atoms, mass, 1e-2)
    slow = pld_lib.from_mixture_gaussian_mechanism(1.3, atoms, mass,
                                                   value_discretization_interval=1e-2)
    for eps in (0.0, 0.1, 0.5, 1.0, 2.0):
        assert fast.get_delta_for_epsilon(eps) == slow.get_delta_for_epsilon(eps)


def _exact_two_step_delta(C, sigma, p, eps):
    """Hockey-stick δ(ε) of N(0, σ²I) vs E_s N(Cs, σ²I), both directions, by grid integration."""
    h = 0.01
    g = np.arange(-9 * sigma, 9 * sigma + C.sum() + h, h)
    base = np.outer(stats.norm.pdf(g, scale=sigma), stats.norm.pdf(g, scale=sigma))
    mix = np.zeros_like(base)
    for s in itertools.product([0, 1], repeat=2):
        mu = C @ np.array(s, float)
        w = np.prod([p if si else 1 - p for si in s])
        mix += w * np.outer(stats.norm.pdf(g - mu[0], scale=sigma),
                            stats.norm.pdf(g - mu[1], scale=sigma))
    e = math.exp(eps)
    return max(np.maximum(mix - e * base, 0).sum() * h * h,
               np.maximum(base - e * mix, 0).sum() * h * h)


def test_mmcc_upper_bounds_the_exact_two_step_mechanism():
    C = np.array([[1.0, 0.0], [0.6, 0.8]])
    sigma, p, delta = 1.0, 0.3, 1e-2
    eps = mmcc_epsilon(C, noise_multiplier=sigma, sampling_prob=p, delta=delta,
                       value_discretization_interval=1e-3)
    assert _exact_two_step_delta(C, sigma, p, eps) <= delta
    # and it is not vacuous: below the unamplified (p = 1) ε
    assert eps < mmcc_epsilon(C, noise_multiplier=sigma, sampling_prob=1.0, delta=delta)


def test_conditional_probability_bounds_hold_by_monte_carlo():
    # Brute-force posterior P(s_j = 1 | h, s_-j) over all s_-j, h drawn from the D' mechanism.
    rng = np.random.default_rng(0)
    C = np.array([[1.0, 0, 0], [0.7, 0.7, 0], [0.4, 0.6, 0.7]])
    sigma, p, tail = 0.8, 0.2, 0.6
    P, used = conditional_probabilities(C, noise_multiplier=sigma, sampling_prob=p,
                                        tail_delta=tail)
    pairs = [(i, j) for i in range(3) for j in range(3) if C[i, j] > 0 and C[:i, j].any()]
    per_pair = used / len(pairs)
    trials = 2500
    for i, j in pairs:
        top = C[:i]
        exceed = 0
        for _ in range(trials):
            s = rng.random(3) < p
            h = top @ s + sigma * rng.normal(size=i)
            worst = 0.0
            for rest in itertools.product([0, 1], repeat=2):
                s0 = np.insert(np.array(rest, float), j, 0.0)
                s1 = s0.copy()
                s1[j] = 1.0
                l0 = -np.sum((h - top @ s0) ** 2) / (2 * sigma ** 2)
                l1 = -np.sum((h - top @ s1) ** 2) / (2 * sigma ** 2)
                worst = max(worst, p * math.exp(l1) / (p * math.exp(l1) + (1 - p) * math.exp(l0)))
            exceed += worst > P[i, j]
        assert stats.binomtest(exceed, trials, per_pair, alternative="greater").pvalue > 1e-4


def test_larger_sensitivity_law_dominates_mixture():
    # The lemma MMCC relies on: a stochastically larger sensitivity has larger δ(ε), both ways.
    def delta(atoms, mass, eps, remove):
        def f(x):
            base = stats.norm.pdf(x)
            mix = sum(w * stats.norm.pdf(x - a) for a, w in zip(atoms, mass))
            return max(mix - math.exp(eps) * base, 0) if remove else max(base - math.exp(eps) * mix, 0)
        return integrate.quad(f, -12, 15, limit=200)[0]
    small = ([0.0, 0.5, 1.0], [0.6, 0.3, 0.1])
    large = ([0.0, 0.7, 1.0], [0.5, 0.3, 0.2])  # pointwise larger after a monotone coupling
    for eps in (0.0, 0.3, 1.0):
        for remove in (True, False):
            assert delta(*small, eps, remove) <= delta(*large, eps, remove) + 1e-12


def test_banded_amplification_is_dpsgd_with_fewer_steps():
    C = _banded(40, 4)
    eps = banded_amplified_epsilon(C, noise_multiplier=1.5, group_sampling_prob=0.2, delta=1e-5,
                                   value_discretization_interval=1e-3)
    assert eps == pytest.approx(_dpsgd_eps(1.5, 0.2, 10, 1e-5, 1e-3), rel=1e-9)
    with pytest.raises(ValueError, match="bands"):
        banded_amplified_epsilon(C, noise_multiplier=1.5, group_sampling_prob=0.2, delta=1e-5,
                                 bands=2)


def test_unamplified_matches_gaussian_pld():
    eps = unamplified_epsilon(sensitivity=2.0, noise_multiplier=3.0, delta=1e-5)
    ref = pld_lib.from_gaussian_mechanism(1.5, value_discretization_interval=1e-4)
    assert eps == pytest.approx(ref.get_epsilon_for_delta(1e-5), rel=1e-3)
    assert gaussian_epsilon(0.0, 1e-5) == 0.0


def test_accountant_identity_equals_dpsgd_and_round_trips():
    acc = MatrixMechanismAccountant(np.eye(50), noise_multiplier=1.2, sampling_prob=0.02,
                                    mmcc_options={"value_discretization_interval": 1e-3})
    for _ in range(20):
        acc.compose(dpsgd_event(1.2, 0.02, 1))
    acc.compose(dpsgd_event(1.2, 0.02, 5))
    assert acc.steps == 25
    assert acc.epsilon(1e-5) == pytest.approx(_dpsgd_eps(1.2, 0.02, 25, 1e-5, 1e-3), rel=1e-9)
    other = MatrixMechanismAccountant(np.eye(50), noise_multiplier=1.2, sampling_prob=0.02,
                                      mmcc_options={"value_discretization_interval": 1e-3})
    other.load_state_dict(acc.state_dict())
    assert other.steps == 25 and other.epsilon(1e-5) == acc.epsilon(1e-5)
    assert acc.delta(acc.epsilon(1e-5)) <= 1.2e-5
    with pytest.raises(UnsupportedEventError):
        acc.compose(dpsgd_event(1.0, 0.02, 1))
    for _ in range(26):
        acc.compose(dpsgd_event(1.2, 0.02, 1))
    with pytest.raises(ValueError, match="steps"):
        acc.epsilon(1e-5)


def test_accountant_methods_order():
    C = _banded(32, 4)
    kw = dict(noise_multiplier=3.0, sampling_prob=0.05)
    eps = {}
    for method in ("banded", "unamplified"):
        acc = MatrixMechanismAccountant(C, method=method, **kw)
        acc.compose(dpsgd_event(3.0, 0.05, 32))
        eps[method] = acc.epsilon(1e-5)
    assert eps["banded"] < eps["unamplified"]
    assert eps["unamplified"] == pytest.approx(gaussian_epsilon(1 / 3.0, 1e-5))
    # unamplified accepts non-square encoders (tree): only the step count matters
    tree = np.tril(np.ones((7, 4)))
    acc = MatrixMechanismAccountant(tree, method="unamplified", noise_multiplier=3.0,
                                    sampling_prob=1.0)
    acc.compose(dpsgd_event(3.0, 1.0, 4))
    assert acc.epsilon(1e-5) == pytest.approx(eps["unamplified"])


@pytest.mark.parametrize("call, exc", [
    (lambda: mmcc_epsilon(-np.eye(2), noise_multiplier=1, sampling_prob=0.1, delta=1e-5), ValueError),
    (lambda: mmcc_epsilon(np.ones((2, 2)), noise_multiplier=1, sampling_prob=0.1, delta=1e-5), ValueError),
    (lambda: mmcc_epsilon(np.ones((2, 3)), noise_multiplier=1, sampling_prob=0.1, delta=1e-5), ValueError),
    (lambda: mmcc_epsilon("x", noise_multiplier=1, sampling_prob=0.1, delta=1e-5), TypeError),
    (lambda: mmcc_epsilon(np.eye(2), noise_multiplier=0, sampling_prob=0.1, delta=1e-5), ValueError),
    (lambda: mmcc_epsilon(np.eye(2), noise_multiplier=1, sampling_prob=1.5, delta=1e-5), ValueError),
    (lambda: mmcc_epsilon(np.eye(2), noise_multiplier=1, sampling_prob=0.1, delta=1.0), ValueError),
    (lambda: mmcc_epsilon(np.eye(2), noise_multiplier=1, sampling_prob=0.1, delta=1e-5,
                          max_atoms=1), ValueError),
    (lambda: mmcc_epsilon(np.eye(2), noise_multiplier=1, sampling_prob=0.1, delta=1e-5,
                          tail_delta_fraction=1.0), ValueError),
    (lambda: mmcc_epsilon(np.eye(2), noise_multiplier=1, sampling_prob=0.1, delta=1e-5,
                          bogus=1), TypeError),
    (lambda: unamplified_epsilon(sensitivity=-1, noise_multiplier=1, delta=1e-5), ValueError),
    (lambda: MatrixMechanismAccountant(np.eye(2), noise_multiplier=1, sampling_prob=0.1,
                                       method="rdp"), ValueError),
    (lambda: MatrixMechanismAccountant(np.eye(2), noise_multiplier=1, sampling_prob=0.1,
                                       neighboring_relation="replace_one"), ValueError),
    (lambda: MatrixMechanismAccountant(np.ones(3), noise_multiplier=1, sampling_prob=0.1), ValueError),
    (lambda: MatrixMechanismAccountant(np.ones((2, 3)), noise_multiplier=1, sampling_prob=0.1,
                                       method="banded"), ValueError),
    (lambda: MatrixMechanismAccountant(np.eye(2), noise_multiplier=1, sampling_prob=0.1,
                                       mmcc_options=[1]), TypeError),
])
def test_invalid_inputs(call, exc):
    with pytest.raises(exc):
        call()


def test_mmcc_and_numpy_strategies_import_without_torch():
    # a meta-path blocker (sys.modules['torch'] = None trips scipy's array-API helpers instead)
    import subprocess
    import sys
    code = ("import sys, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'torch': raise ImportError('torch blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import numpy as np\n"
            "from dpkit.accountants import mmcc_epsilon\n"
            "from dpkit.accountants.mmcc import MatrixMechanismAccountant\n"
            "from dpkit.mechanisms.matrix import banded\n"
            "C = banded(6, 2).encoder()\n"
            "assert mmcc_epsilon(C, noise_multiplier=2.0, sampling_prob=0.1, delta=1e-5,"
            " value_discretization_interval=1e-2) > 0\n"
            "MatrixMechanismAccountant(C, noise_multiplier=2.0, sampling_prob=0.1)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_tail_bound_holds_and_is_tight_by_monte_carlo():
    from dpkit.accountants.mmcc import _tail_epsilons
    rng = np.random.default_rng(1)
    a, c2, sigma, p, delta = np.array([0.3, 0.5, 0.9]), 0.81, 0.7, 0.3, 0.05
    eps = _tail_epsilons(c2, a, sigma, p, math.log(1 / delta))
    t = eps * sigma ** 2 + c2 / 2  # invert ε = (t − ‖c‖²/2)/σ²
    x = (rng.random((200_000, 3)) < p) @ a + sigma * math.sqrt(c2) * rng.normal(size=200_000)
    hits = int(np.sum(x >= t))
    # a valid upper tail bound (one-sided binomial test: the bound is nearly exact here) ...
    assert stats.binomtest(hits, x.size, delta, alternative="greater").pvalue > 1e-4
    assert hits >= 0.6 * delta * x.size  # ... and close to exact (Chernoff alone is far looser)
