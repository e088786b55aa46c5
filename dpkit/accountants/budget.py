"""A privacy budget guard: refuse a spend BEFORE it would take ε past the budget."""

from __future__ import annotations

from dpkit import _validate as V
from dpkit.accountants.base import Accountant
from dpkit.accountants.events import check_event
from dpkit.accountants.registry import make_accountant
from dpkit.errors import PrivacyBudgetExceeded

__all__ = ["PrivacyBudget"]


class PrivacyBudget:
    """An (ε, δ) budget enforced through an accountant.

    Each :meth:`spend` first computes, on a copy of the ledger, the ε the spend would lead to
    at the budget's δ; only if it stays within ``epsilon`` is the event composed for real. The
    accountant's ε is an upper bound (for non-approximate accountants), so the guarantee
    "the released events are (epsilon, delta)-DP" holds whenever no exception was raised.

    Args:
        epsilon: the ε budget, > 0.
        delta: the δ at which ε is measured, in (0, 1).
        accountant: registered accountant name (default ``"pld"``) or an Accountant instance;
            an instance is used as is (events already in its ledger count as spent).

    Raises:
        ValueError, TypeError: invalid budget or accountant.
    """

    def __init__(self, epsilon, delta, accountant="pld"):
        self.epsilon = V.positive("epsilon", epsilon)
        self.delta = V.delta("delta", delta)
        if isinstance(accountant, str):
            accountant = make_accountant(accountant)
        elif not isinstance(accountant, Accountant):
            raise TypeError(f"accountant must be a registered name or an Accountant; got "
                            f"{accountant!r} ({type(accountant).__name__})")
        self.accountant = accountant

    def _trial(self, event, count) -> Accountant:
        check_event("event", event)
        count = V.positive_int("count", count)
        return self.accountant.copy().compose(event, count)

    def can_afford(self, event, count=1) -> bool:
        """Whether composing ``event`` ``count`` times keeps ε ≤ the budget at δ.

        Args:
            event: a ``dp_accounting`` DpEvent.
            count: positive integer repetitions.

        Returns:
            True if :meth:`spend` with the same arguments would succeed.

        Raises:
            TypeError, ValueError: invalid event or count.
            UnsupportedEventError: the accountant cannot account the event.
        """
        return self._trial(event, count).epsilon(self.delta) <= self.epsilon

    def spend(self, event, count=1) -> float:
        """Compose ``event`` ``count`` times, or raise without composing if that would overshoot.

        Args:
            event: a ``dp_accounting`` DpEvent.
            count: positive integer repetitions.

        Returns:
            ε spent after the spend (at the budget's δ).

        Raises:
            PrivacyBudgetExceeded: the spend would take ε past the budget; nothing is composed.
            TypeError, ValueError: invalid event or count.
            UnsupportedEventError: the accountant cannot account the event.
        """
        trial = self._trial(event, count)
        after = trial.epsilon(self.delta)
        if after > self.epsilon:
            raise PrivacyBudgetExceeded(
                f"spending {event!r} x{count} would raise ε to {after:.6g} > budget {self.epsilon:.6g} "
                f"(δ={self.delta:g}); nothing was spent (ε spent so far: {self.spent():.6g})")
        self.accountant.compose(event, count)
        # the trial ran on an identical ledger: reuse its answer instead of recomputing
        self.accountant._cache.update(trial._cache)
        return after

    def spent(self) -> float:
        """ε spent so far at the budget's δ (0 before any spend)."""
        return self.accountant.epsilon(self.delta)

    def remaining(self) -> float:
        """ε left at the budget's δ: ``epsilon - spent()`` (never negative)."""
        return max(0.0, self.epsilon - self.spent())

    def __repr__(self) -> str:
        return (f"PrivacyBudget(epsilon={self.epsilon:g}, delta={self.delta:g}, "
                f"accountant={self.accountant.name!r}, spent={self.spent():.6g})")
