"""Accountants vs independent references: dp_accounting / prv_accountant called directly, and
numerical integration of the exact privacy profile (tests/accountants/reference.py)."""

import json
import math
import warnings

import dp_accounting
import numpy as np
import pytest
from dp_accounting import dp_event as E
from dp_accounting.pld import PLDAccountant as DpaPLD
from dp_accounting.pld import privacy_loss_distribution
from dp_accounting.rdp import RdpAccountant as DpaRDP
from prv_accountant import (GaussianMechanism, LaplaceMechanism, PoissonSubsampledGaussianMechanism,
                            PRVAccountant as PrvPRV)

from dpkit.accountants import (compose_events, dpsgd_event, fixed_size_event, gaussian_event,
                               laplace_event, make_accountant)
from dpkit.accountants.rdp import DEFAULT_ORDERS
from dpkit.errors import UnsupportedEventError

from .reference import (epsilon_from_delta_curve, gaussian_delta, laplace_delta,
                        subsampled_gaussian_delta)

EXACT = ["pld", "rdp", "prv"]
ALL = EXACT + ["gdp"]
SETTINGS = [  # (σ, q, T, δ)
    (1.0, 0.01, 1000, 1e-5),
    (0.8, 0.05, 300, 1e-6),
    (2.0, 0.2, 50, 1e-5),
    (1.3, 1.0, 20, 1e-3),
]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # gdp's approximation warning is tested separately
        yield


def _dpa(sigma, q, steps, delta, vdi=1e-4):
    """dp_accounting's pessimistic PLD (an upper bound) called directly."""
    ref = DpaPLD(value_discretization_interval=vdi)
    ref.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    return ref.get_epsilon(delta)


def _dpa_optimistic(sigma, q, steps, delta, vdi=1e-4, relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE):
    """dp_accounting's OPTIMISTIC PLD: a LOWER bound on the exact ε (Doroshenko et al. 2022)."""
    pld = privacy_loss_distribution.from_gaussian_mechanism(
        sigma, sampling_prob=q, pessimistic_estimate=False, value_discretization_interval=vdi,
        neighboring_relation=relation)
    return pld.self_compose(steps).get_epsilon_for_delta(delta)


def _eps(name, event, delta, **kw):
    return make_accountant(name, **kw).compose(event).epsilon(delta)


# ---------------------------------------------------------------- vs the libraries called directly
@pytest.mark.parametrize("sigma,q,steps,delta", SETTINGS)
def test_pld_equals_dp_accounting(sigma, q, steps, delta):
    ref = DpaPLD(value_discretization_interval=1e-3)
    ref.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    ours = make_accountant("pld")
    for _ in range(steps):  # one step at a time, as DPOptimizer does
        ours.compose(dpsgd_event(sigma, q, 1))
    if q == 1:  # Gaussian-only ledgers are answered in closed form: exact, below dp_accounting's PLD
        exact = dp_accounting.get_epsilon_gaussian(sigma / math.sqrt(steps), delta)
        assert exact - 1e-9 <= ours.epsilon(delta) <= min(ref.get_epsilon(delta), exact + 1e-9)
        return
    # within 0.1% above dp_accounting at 1e-4, never below its optimistic (lower-bound) grid
    assert _dpa_optimistic(sigma, q, steps, delta) <= ours.epsilon(delta) <= 1.001 * _dpa(sigma, q, steps, delta)
    assert ours.epsilon(delta) <= ref.get_epsilon(delta) * 1.0005  # and not looser than the old 1e-3 grid


@pytest.mark.parametrize("sigma,q,steps,delta", SETTINGS)
def test_rdp_equals_dp_accounting(sigma, q, steps, delta):
    ev = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    ref = DpaRDP(orders=list(DEFAULT_ORDERS))
    ref.compose(ev)
    ours = _eps("rdp", dpsgd_event(sigma, q, steps), delta)
    assert ours == pytest.approx(ref.get_epsilon(delta), rel=1e-12)
    default_grid = DpaRDP()
    default_grid.compose(ev)
    assert ours <= default_grid.get_epsilon(delta) + 1e-12  # a superset of dp_accounting's orders


@pytest.mark.parametrize("sigma,q,steps,delta", SETTINGS[:3])
def test_prv_equals_prv_accountant_upper_bound(sigma, q, steps, delta):
    ref = PrvPRV(prvs=[PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=sigma)],
                 max_self_compositions=[steps], eps_error=0.05, delta_error=delta / 1000)
    _, _, upper = ref.compute_epsilon(delta=delta, num_self_compositions=[steps])
    assert _eps("prv", dpsgd_event(sigma, q, steps), delta) == pytest.approx(upper, rel=1e-9)


def test_heterogeneous_composition_matches_both_libraries():
    events = [dpsgd_event(1.0, 0.02, 200), dpsgd_event(2.0, 0.1, 100), gaussian_event(8.0), laplace_event(20.0)]
    delta = 1e-5
    pld, prv = make_accountant("pld"), make_accountant("prv")
    for ev in events:
        pld.compose(ev)
        prv.compose(ev)
    ref = DpaPLD(value_discretization_interval=1e-4)
    ref.compose(E.ComposedDpEvent(events))
    assert ref.get_epsilon(delta) * 0.99 <= pld.epsilon(delta) <= ref.get_epsilon(delta) * 1.001
    prvs = [PoissonSubsampledGaussianMechanism(0.02, 1.0), PoissonSubsampledGaussianMechanism(0.1, 2.0),
            GaussianMechanism(8.0), LaplaceMechanism(1 / 20.0)]
    counts = [200, 100, 1, 1]
    ref_prv = PrvPRV(prvs=prvs, max_self_compositions=counts, eps_error=0.05, delta_error=delta / 1000)
    assert prv.epsilon(delta) == pytest.approx(ref_prv.compute_epsilon(delta, counts)[2], rel=1e-9)
    assert prv.epsilon(delta) >= pld.epsilon(delta) - 0.01  # both upper bounds of the same ε


# ---------------------------------------------------------------- vs numerical integration
@pytest.mark.parametrize("sigma,q", [(1.0, 0.1), (0.6, 0.5)])
def test_single_step_against_exact_privacy_profile(sigma, q):
    """One Poisson-subsampled Gaussian step: δ(ε) integrated numerically in BOTH directions."""
    for epsilon in (0.3, 1.5):
        exact = subsampled_gaussian_delta(sigma, q, epsilon)
        for name in EXACT:
            got = make_accountant(name).compose(dpsgd_event(sigma, q)).delta(epsilon)
            assert got >= exact * (1 - 1e-9) - 1e-15, (name, epsilon)
        pld = make_accountant("pld").compose(dpsgd_event(sigma, q)).delta(epsilon)
        assert pld <= exact * 1.05 + 1e-12
    delta = 1e-4
    exact_eps = epsilon_from_delta_curve(lambda e: subsampled_gaussian_delta(sigma, q, e), delta)
    for name in EXACT:
        got = _eps(name, dpsgd_event(sigma, q), delta)
        assert got >= exact_eps - 1e-6, name
    assert _eps("pld", dpsgd_event(sigma, q), delta) <= exact_eps + 0.01


def test_laplace_against_exact_profile():
    scale = 2.0
    for name in ("pld", "prv"):
        acc = make_accountant(name).compose(laplace_event(scale))
        for epsilon in (0.1, 0.3):
            exact = laplace_delta(scale, epsilon)
            assert acc.delta(epsilon) >= exact - 1e-12
            assert acc.delta(epsilon) <= laplace_delta(scale, epsilon - 0.05) + 2e-3  # prv: eps_error slack
    # pure DP: ε(δ→0) = 1/scale
    assert _eps("pld", laplace_event(scale), 1e-12) == pytest.approx(0.5, abs=2e-3)


@pytest.mark.parametrize("sigma,steps", [(1.0, 1), (3.0, 10), (10.0, 400)])
def test_gaussian_composition_against_analytic_gaussian(sigma, steps):
    """T Gaussian releases = one Gaussian with σ/√T (exact); Balle & Wang (ICML 2018) analytic ε."""
    delta = 1e-5
    exact = dp_accounting.get_epsilon_gaussian(sigma / math.sqrt(steps), delta)
    for name in ALL:
        got = _eps(name, dpsgd_event(sigma, 1.0, steps), delta)
        assert got >= exact - 1e-6, name
        tol = {"rdp": 0.6 * exact + 0.1}.get(name, 0.01 * exact + 0.06)
        assert got <= exact + tol, name
    # the GDP accountant is exact (not an approximation) for q = 1
    assert _eps("gdp", dpsgd_event(sigma, 1.0, steps), delta) == pytest.approx(exact, rel=1e-6)


def test_gdp_clt_formula_against_integrated_profile():
    sigma, q, steps, delta = 1.0, 0.01, 2000, 1e-5
    mu = q * math.sqrt(steps * (math.exp(1 / sigma**2) - 1))  # Bu et al. (2020), Poisson CLT
    acc = make_accountant("gdp").compose(dpsgd_event(sigma, q, steps))
    assert acc.mu() == pytest.approx(mu, rel=1e-12)
    for epsilon in (0.5, 1.0, 2.0):
        assert acc.delta(epsilon) == pytest.approx(gaussian_delta(mu, epsilon), rel=1e-6, abs=1e-14)
    assert acc.epsilon(delta) == pytest.approx(epsilon_from_delta_curve(lambda e: gaussian_delta(mu, e), delta),
                                               abs=1e-6)


def test_gdp_warns_and_can_understate():
    acc = make_accountant("gdp").compose(dpsgd_event(0.7, 0.05, 200))
    assert acc.is_approximate
    with pytest.warns(UserWarning, match="UNDER-state"):
        gdp = acc.epsilon(1e-5)
    # small σ: the CLT value is below the PLD upper bound (this is why it is flagged)
    assert gdp < _eps("pld", dpsgd_event(0.7, 0.05, 200), 1e-5)


# ---------------------------------------------------------------- orderings and monotonicity
@pytest.mark.parametrize("sigma,q,steps,delta", SETTINGS)
def test_rdp_not_below_pld(sigma, q, steps, delta):
    assert _eps("rdp", dpsgd_event(sigma, q, steps), delta) >= _eps("pld", dpsgd_event(sigma, q, steps), delta)


@pytest.mark.parametrize("name", ALL)
def test_monotone_in_sigma_q_steps(name):
    delta = 1e-5
    by_sigma = [_eps(name, dpsgd_event(s, 0.05, 100), delta) for s in (0.7, 1.0, 2.0)]
    by_q = [_eps(name, dpsgd_event(1.0, q, 100), delta) for q in (0.01, 0.05, 0.3)]
    by_steps = [_eps(name, dpsgd_event(1.0, 0.05, t), delta) for t in (10, 100, 400)]
    assert all(a > b for a, b in zip(by_sigma, by_sigma[1:])), by_sigma
    assert all(a < b for a, b in zip(by_q, by_q[1:])), by_q
    assert all(a < b for a, b in zip(by_steps, by_steps[1:])), by_steps


@pytest.mark.parametrize("name", ALL)
def test_epsilon_and_delta_are_consistent(name):
    acc = make_accountant(name).compose(dpsgd_event(1.0, 0.05, 200))
    eps = acc.epsilon(1e-5)
    assert acc.delta(eps + 0.05) <= 1e-5 * 1.0001
    assert acc.delta(max(0.0, eps - 0.3)) > 1e-5


# ---------------------------------------------------------------- degenerate cases
@pytest.mark.parametrize("name", ALL)
def test_non_private_and_empty(name):
    acc = make_accountant(name)
    assert acc.epsilon(1e-5) == 0.0 and acc.delta(1.0) == 0.0
    acc.compose(dpsgd_event(1.0, 0.1, 10)).compose(dpsgd_event(0.0, 0.1))
    assert acc.epsilon(1e-5) == math.inf
    assert acc.delta(5.0) == 1.0


def test_fixed_size_only_under_replace_one_and_uses_2c_sensitivity():
    ev = fixed_size_event(2.0, batch_size=50, dataset_size=50)  # B = N: every record in every batch
    for name in ALL:
        with pytest.raises(UnsupportedEventError, match="replace_one"):
            make_accountant(name).compose(ev)
    rdp = make_accountant("rdp", neighboring_relation="replace_one").compose(ev)
    # replace-one with q = 1 is a Gaussian with sensitivity 2C, i.e. noise multiplier σ/2
    exact = dp_accounting.get_epsilon_gaussian(1.0, 1e-5)
    assert rdp.epsilon(1e-5) >= exact
    assert rdp.epsilon(1e-5) > dp_accounting.get_epsilon_gaussian(2.0, 1e-5) * 1.5
    with pytest.raises(UnsupportedEventError, match="add/remove sensitivity"):
        make_accountant("rdp", neighboring_relation="replace_one").compose(dpsgd_event(1.0, 0.1))


# ---------------------------------------------------------------- ledger, caching, state
def test_compose_merges_runs_and_caches(monkeypatch):
    acc = make_accountant("pld")
    step = dpsgd_event(1.0, 0.01)
    for _ in range(5000):
        acc.compose(step)
    acc.compose(gaussian_event(5.0), count=2)
    assert acc.ledger == [(step, 5000), (gaussian_event(5.0), 2)]
    first = acc.epsilon(1e-5)
    calls = []
    monkeypatch.setattr(type(acc), "_epsilon_from_ledger", lambda self, d: calls.append(d) or 123.0)
    assert acc.epsilon(1e-5) == first and not calls  # cached: the ledger did not change
    acc.compose(step)
    assert acc.epsilon(1e-5) == 123.0 and calls == [1e-5]  # recomputed after a change


@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip(name):
    acc = make_accountant(name)
    acc.compose(dpsgd_event(1.1, 0.02, 30)).compose(dpsgd_event(1.1, 0.02), 5).compose(gaussian_event(4.0))
    state = json.loads(json.dumps(acc.state_dict()))
    assert state["name"] == name and state["neighboring_relation"] == "add_remove"
    restored = make_accountant(name).load_state_dict(state)
    assert restored.ledger == acc.ledger
    assert restored.epsilon(1e-5) == pytest.approx(acc.epsilon(1e-5), rel=1e-12)
    clone = acc.copy()
    clone.compose(dpsgd_event(1.1, 0.02, 100))
    assert len(acc.ledger) == 3 and clone.epsilon(1e-5) > acc.epsilon(1e-5)


@pytest.mark.parametrize("state, exc, match", [
    ("nope", TypeError, "state"),
    ({"name": "pld"}, ValueError, "neighboring_relation"),
    ({"name": "rdp", "neighboring_relation": "add_remove", "ledger": []}, ValueError, "name"),
    ({"name": "pld", "neighboring_relation": "replace_one", "ledger": []}, ValueError, "neighboring_relation"),
    ({"name": "pld", "neighboring_relation": "add_remove", "ledger": [[{"type": "os"}, 1]]}, ValueError, "type"),
    ({"name": "pld", "neighboring_relation": "add_remove", "ledger": [[{"type": "GaussianDpEvent",
                                                                         "noise_multiplier": 1.0}, 0]]},
     ValueError, "count"),
    ({"name": "pld", "neighboring_relation": "add_remove", "ledger": [1]}, ValueError, "ledger"),
])
def test_load_state_dict_rejects_bad_state(state, exc, match):
    acc = make_accountant("pld").compose(gaussian_event(3.0))
    with pytest.raises(exc, match=match):
        acc.load_state_dict(state)
    assert acc.ledger == [(gaussian_event(3.0), 1)]  # unchanged on failure


# ---------------------------------------------------------------- support and input validation
def test_unsupported_event_names_event_and_alternatives():
    ev = E.PoissonSampledDpEvent(0.1, E.LaplaceDpEvent(1.0))
    with pytest.raises(UnsupportedEventError) as info:
        make_accountant("prv").compose(ev)
    msg = str(info.value)
    assert "PoissonSampledDpEvent" in msg and "'prv'" in msg and "pld" in msg
    assert not make_accountant("gdp").supports(laplace_event(1.0))
    assert make_accountant("pld").supports(ev)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: make_accountant("pld").compose("event"), TypeError, "event"),
    (lambda: make_accountant("pld").compose(gaussian_event(1.0), 0), ValueError, "count"),
    (lambda: make_accountant("pld").compose(gaussian_event(1.0), 1.5), TypeError, "count"),
    (lambda: make_accountant("pld").epsilon(0.0), ValueError, "delta"),
    (lambda: make_accountant("pld").epsilon(1.0), ValueError, "delta"),
    (lambda: make_accountant("pld").epsilon("x"), TypeError, "delta"),
    (lambda: make_accountant("pld").delta(-1.0), ValueError, "epsilon"),
    (lambda: make_accountant("pld").delta(math.inf), ValueError, "epsilon"),
    (lambda: make_accountant("pld", value_discretization_interval=0), ValueError, "value_discretization_interval"),
    (lambda: make_accountant("rdp", orders=[0.5, 2]), ValueError, "orders"),
    (lambda: make_accountant("rdp", orders="abc"), TypeError, "orders"),
    (lambda: make_accountant("prv", eps_error=-1), ValueError, "eps_error"),
    (lambda: make_accountant("pld", neighboring_relation="neighbours"), ValueError, "neighboring_relation"),
    (lambda: make_accountant("pld").supports(None), TypeError, "event"),
])
def test_invalid_accountant_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_composed_event_with_list_is_supported_without_hashing():
    ev = compose_events(gaussian_event(3.0), dpsgd_event(1.0, 0.1, 10))
    acc = make_accountant("pld").compose(ev).compose(ev)
    assert acc.ledger == [(ev, 2)]
    assert np.isfinite(acc.epsilon(1e-5))
