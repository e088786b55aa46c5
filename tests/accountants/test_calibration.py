"""Calibration: never overshoots, minimal within rtol, always terminates, refuses impossible targets.

References: the accountant's ε at the returned σ and at σ·(1 − rtol), evaluated independently
through dp_accounting's own PLDAccountant (not through dpkit's calibration code)."""

import math
import warnings

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant as DpaPLD

from dpkit.accountants import calibrate_noise_multiplier, dpsgd_event, make_accountant, steps_for_budget
from dpkit.accountants.calibration import epochs_to_steps
from dpkit.errors import CalibrationError


def _dpa_pld_eps(sigma, q, steps, delta, vdi=1e-3):
    acc = DpaPLD(value_discretization_interval=vdi)
    step = (dp_accounting.GaussianDpEvent(sigma) if q == 1 else
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)))
    acc.compose(dp_accounting.SelfComposedDpEvent(step, steps))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("target,delta,q,steps", [
    (1.0, 1e-5, 0.01, 1000),
    (8.0, 1e-5, 256 / 60000, 14063),
    (0.5, 1e-6, 1.0, 5),
    (3.0, 1e-5, 0.2, 30),
])
def test_pld_calibration_never_overshoots_and_is_minimal(target, delta, q, steps):
    sigma = calibrate_noise_multiplier(target, delta, q, steps)
    ours = lambda s: make_accountant("pld").compose(dpsgd_event(s, q, steps)).epsilon(delta)  # noqa: E731
    assert ours(sigma) <= target < ours(sigma * (1 - 1e-3))
    # against dp_accounting at 1e-4 (dpkit's ε is within 0.1% above it): feasible and minimal
    assert _dpa_pld_eps(sigma, q, steps, delta, 1e-4) <= target * 1.001
    assert _dpa_pld_eps(sigma * (1 - 3e-3), q, steps, delta, 1e-4) > target


@pytest.mark.parametrize("name", ["rdp", "prv", "gdp"])
def test_other_accountants_calibration(name):
    target, delta, q, steps = 2.0, 1e-5, 0.05, 200
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sigma = calibrate_noise_multiplier(target, delta, q, steps, accountant=name)
        eps = lambda s: make_accountant(name).compose(  # noqa: E731
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), steps)).epsilon(delta)
        assert eps(sigma) <= target < eps(sigma * (1 - 1e-3))


def test_rdp_needs_more_noise_than_pld():
    args = (2.0, 1e-5, 0.01, 2000)
    assert calibrate_noise_multiplier(*args, accountant="rdp") > calibrate_noise_multiplier(*args)


def test_accountant_instance_configuration_is_reused():
    acc = make_accountant("pld", value_discretization_interval=1e-2)
    acc.compose(dp_accounting.GaussianDpEvent(0.1))  # the ledger must be ignored
    sigma = calibrate_noise_multiplier(1.0, 1e-5, 0.01, 500, accountant=acc)
    coarse = make_accountant("pld", value_discretization_interval=1e-2)
    coarse.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(sigma)), 500))
    assert coarse.epsilon(1e-5) <= 1.0
    assert len(acc.ledger) == 1


def test_epochs_form_equals_explicit_schedule():
    n, b, e = 60000, 256, 3
    q, steps = epochs_to_steps(e, n, b)
    assert q == b / n and steps == e * math.ceil(n / b) == 705  # 235 batches per epoch
    assert calibrate_noise_multiplier(2.0, 1e-5, epochs=e, dataset_size=n, batch_size=b) == \
        calibrate_noise_multiplier(2.0, 1e-5, q, steps)


@pytest.mark.parametrize("epochs,n,b,expected", [
    (1, 100, 10, 10), (3, 1000, 100, 30),      # exact multiples stay exact
    (1, 100, 30, 4), (0.5, 100, 10, 5),        # rounded UP
    (0.01, 100, 100, 1),                       # never 0 steps
    (15, 1000, 128, 120),                      # 8 loader batches per epoch, not ceil(15000/128)=118
])
def test_epochs_to_steps_rounds_up(epochs, n, b, expected):
    assert epochs_to_steps(epochs, n, b)[1] == expected


def test_impossible_target_raises():
    with pytest.raises(CalibrationError, match="not reachable"):
        calibrate_noise_multiplier(0.01, 1e-10, 1.0, 10**6, max_noise_multiplier=50)
    with pytest.raises(ValueError):  # CalibrationError is a ValueError
        calibrate_noise_multiplier(0.1, 1e-5, 0.5, 1000, max_noise_multiplier=2.0)


def test_huge_target_terminates_at_floor():
    sigma = calibrate_noise_multiplier(1e4, 0.5, 1e-4, 1)
    assert sigma == 0.125  # halving stops above σ = 0.1
    assert make_accountant("pld").compose(
        dp_accounting.PoissonSampledDpEvent(1e-4, dp_accounting.GaussianDpEvent(sigma))).epsilon(0.5) <= 1e4


def test_steps_for_budget_is_largest():
    target, delta, sigma, q = 1.0, 1e-5, 1.0, 0.02
    t = steps_for_budget(target, delta, sigma, q)
    assert _dpa_pld_eps(sigma, q, t, delta) <= target < _dpa_pld_eps(sigma, q, t + 1, delta)
    assert steps_for_budget(0.01, 1e-5, 0.5, 1.0) == 0
    assert steps_for_budget(100.0, 1e-5, 50.0, 1e-3, max_steps=64) == 64


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(target_epsilon=0, target_delta=1e-5, sampling_prob=0.1, steps=10), ValueError, "target_epsilon"),
    (dict(target_epsilon=-1, target_delta=1e-5, sampling_prob=0.1, steps=10), ValueError, "target_epsilon"),
    (dict(target_epsilon=1, target_delta=0, sampling_prob=0.1, steps=10), ValueError, "target_delta"),
    (dict(target_epsilon=1, target_delta=1, sampling_prob=0.1, steps=10), ValueError, "target_delta"),
    (dict(target_epsilon=1, target_delta=1e-5, sampling_prob=0, steps=10), ValueError, "sampling_prob"),
    (dict(target_epsilon=1, target_delta=1e-5, sampling_prob=1.2, steps=10), ValueError, "sampling_prob"),
    (dict(target_epsilon=1, target_delta=1e-5, sampling_prob=0.1, steps=0), ValueError, "steps"),
    (dict(target_epsilon=1, target_delta=1e-5, sampling_prob=0.1), ValueError, "steps"),
    (dict(target_epsilon=1, target_delta=1e-5), ValueError, "epochs"),
    (dict(target_epsilon=1, target_delta=1e-5, sampling_prob=0.1, steps=10, epochs=1), ValueError, "not both"),
    (dict(target_epsilon=1, target_delta=1e-5, epochs=1, dataset_size=10), ValueError, "batch_size"),
    (dict(target_epsilon=1, target_delta=1e-5, epochs=1, dataset_size=10, batch_size=20), ValueError,
     "batch_size"),
    (dict(target_epsilon=1, target_delta=1e-5, epochs=0, dataset_size=10, batch_size=2), ValueError, "epochs"),
    (dict(target_epsilon=1, target_delta=1e-5, sampling_prob=0.1, steps=10, accountant="foo"), ValueError,
     "name"),
    (dict(target_epsilon=1, target_delta=1e-5, sampling_prob=0.1, steps=10, accountant=3), TypeError,
     "accountant"),
    (dict(target_epsilon=1, target_delta=1e-5, sampling_prob=0.1, steps=10, rtol=0), ValueError, "rtol"),
    (dict(target_epsilon=1, target_delta=1e-5, sampling_prob=0.1, steps=10, max_noise_multiplier=-1),
     ValueError, "max_noise_multiplier"),
    (dict(target_epsilon="1", target_delta=1e-5, sampling_prob=0.1, steps=10), TypeError, "target_epsilon"),
])
def test_invalid_calibration_inputs(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        calibrate_noise_multiplier(**kwargs)


@pytest.mark.parametrize("args, kwargs, exc, match", [
    ((0, 1e-5, 1.0, 0.1), {}, ValueError, "target_epsilon"),
    ((1, 1e-5, -1.0, 0.1), {}, ValueError, "noise_multiplier"),
    ((1, 1e-5, 1.0, 0.0), {}, ValueError, "sampling_prob"),
    ((1, 1e-5, 1.0, 0.1), {"max_steps": 0}, ValueError, "max_steps"),
])
def test_invalid_steps_for_budget_inputs(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        steps_for_budget(*args, **kwargs)


def test_epochs_match_the_loader_that_make_private_builds():
    """The calculator's epochs→steps is the number of batches make_private's loader yields."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import dpkit

    n, b, epochs = 1000, 128, 15
    data = TensorDataset(torch.randn(n, 3), torch.randint(0, 2, (n,)))
    model = torch.nn.Linear(3, 2)
    _, opt, loader = dpkit.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                        DataLoader(data, batch_size=b), target_epsilon=3.0,
                                        target_delta=1e-5, epochs=epochs, max_grad_norm=1.0)
    assert opt.max_steps == epochs * len(loader) == epochs_to_steps(epochs, n, b)[1] == 120
