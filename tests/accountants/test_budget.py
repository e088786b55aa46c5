"""PrivacyBudget refuses BEFORE overshooting; spent/remaining match an independent accountant."""

import pytest
from dp_accounting.pld import PLDAccountant as DpaPLD

from dpkit.accountants import PrivacyBudget, dpsgd_event, gaussian_event, make_accountant
from dpkit.errors import PrivacyBudgetExceeded


def _dpa_eps(events, delta):
    """dp_accounting's PLD at 1e-4; dpkit's default accountant is within 0.1% above it."""
    acc = DpaPLD(value_discretization_interval=1e-4)
    for ev in events:
        acc.compose(ev)
    return acc.get_epsilon(delta)


def test_spend_until_refused_never_overshoots():
    budget = PrivacyBudget(1.0, 1e-5)
    chunk = dpsgd_event(1.0, 0.01, 50)
    spent = []
    with pytest.raises(PrivacyBudgetExceeded, match="nothing was spent"):
        while True:
            budget.spend(chunk)
            spent.append(chunk)
    assert spent, "the first chunks fit the budget"
    assert budget.spent() == pytest.approx(_dpa_eps(spent, 1e-5), rel=1e-3)
    assert budget.spent() <= 1.0 < make_accountant("pld").compose(dpsgd_event(1.0, 0.01, 50 * len(spent) + 50)
                                                                   ).epsilon(1e-5)  # refused exactly when needed
    assert _dpa_eps(spent + [chunk], 1e-5) > 0.99
    assert budget.accountant.ledger == [(chunk, len(spent))]           # the refused spend left no trace
    assert budget.remaining() == pytest.approx(1.0 - budget.spent())
    assert not budget.can_afford(chunk)
    assert budget.can_afford(dpsgd_event(1.0, 0.01, 1))


def test_fresh_budget_and_existing_accountant():
    budget = PrivacyBudget(2.0, 1e-5, accountant="rdp")
    assert budget.spent() == 0.0 and budget.remaining() == 2.0
    acc = make_accountant("pld").compose(gaussian_event(2.0))
    shared = PrivacyBudget(5.0, 1e-5, accountant=acc)
    assert shared.spent() == pytest.approx(acc.epsilon(1e-5))
    eps = shared.spend(gaussian_event(3.0))
    assert eps == pytest.approx(acc.epsilon(1e-5)) and len(acc.ledger) == 2


def test_non_private_spend_is_refused():
    budget = PrivacyBudget(100.0, 1e-5)
    with pytest.raises(PrivacyBudgetExceeded):
        budget.spend(dpsgd_event(0.0, 0.1))


@pytest.mark.parametrize("call, exc, match", [
    (lambda: PrivacyBudget(0, 1e-5), ValueError, "epsilon"),
    (lambda: PrivacyBudget(1.0, 0), ValueError, "delta"),
    (lambda: PrivacyBudget(1.0, 1e-5, accountant="nope"), ValueError, "name"),
    (lambda: PrivacyBudget(1.0, 1e-5, accountant=None), TypeError, "accountant"),
    (lambda: PrivacyBudget(1.0, 1e-5).spend("event"), TypeError, "event"),
    (lambda: PrivacyBudget(1.0, 1e-5).spend(gaussian_event(5.0), 0), ValueError, "count"),
    (lambda: PrivacyBudget(1.0, 1e-5).can_afford(gaussian_event(5.0), -2), ValueError, "count"),
])
def test_invalid_budget_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
