"""The accountant interface shared by every dpkit accountant.

An accountant keeps a LEDGER of ``(event, count)`` pairs. ``compose`` is O(1): it validates the
event once (support is cached per distinct event) and appends it, merging a run of identical
events into one entry with a larger count, so a training loop that composes one DP-SGD step per
iteration keeps a ledger of length 1. ``epsilon``/``delta`` compute from the whole ledger lazily
(self-composition with the count, which numerical accountants do in O(log count) compositions)
and cache the result until the ledger changes.

Subclasses implement ``_backend_supports`` (the backend's own support, with a reason) and
``_epsilon_from_ledger`` / ``_delta_from_ledger``; they must return valid UPPER bounds.
"""

from __future__ import annotations

import abc

from dp_accounting import dp_event as _dpe

from dpkit import _validate as V
from dpkit.accountants import events as _events
from dpkit.accountants._serialize import event_from_dict, event_to_dict
from dpkit.errors import UnsupportedEventError

__all__ = ["Accountant"]

_STATE_VERSION = 1


class Accountant(abc.ABC):
    """Abstract privacy accountant over ``dp_accounting`` DpEvents.

    Args:
        neighboring_relation: ``"add_remove"`` (default) or ``"replace_one"`` (or the
            ``NeighboringRelation`` enum members).

    Raises:
        ValueError, TypeError: an unknown neighbouring relation.
    """

    name: str = ""
    is_approximate: bool = False

    def __init__(self, neighboring_relation="add_remove"):
        self._relation = _events.as_relation(neighboring_relation)
        self._ledger: list[list] = []          # [event, count] pairs; runs merged
        self._support_cache: dict = {}         # event -> None (supported) or reason
        self._cache: dict = {}                 # ("eps", delta) / ("delta", eps) -> value
        self._backend_cache = None             # subclass-owned, reset with the ledger

    # ------------------------------------------------------------------ config / identity
    @property
    def neighboring_relation(self):
        """The ``NeighboringRelation`` this accountant accounts under."""
        return self._relation

    def _config(self) -> dict:
        """Constructor keyword arguments other than the relation (JSON builtins)."""
        return {}

    def _fresh(self) -> "Accountant":
        """A new accountant of the same kind and configuration, with an empty ledger."""
        return type(self)(neighboring_relation=self._relation, **self._config())

    # ------------------------------------------------------------------ support
    @abc.abstractmethod
    def _backend_supports(self, event: _dpe.DpEvent) -> str | None:
        """``None`` if the backend can account ``event`` under the relation, else the reason."""

    def _unsupported_reason(self, event: _dpe.DpEvent) -> str | None:
        try:
            return self._support_cache[event]
        except KeyError:
            pass
        except TypeError:  # unhashable (e.g. a ComposedDpEvent holds a list)
            return _events.relation_policy(event, self._relation) or self._backend_supports(event)
        reason = _events.relation_policy(event, self._relation) or self._backend_supports(event)
        self._support_cache[event] = reason
        return reason

    def supports(self, event) -> bool:
        """Whether this accountant can account ``event`` under its neighbouring relation.

        Args:
            event: a ``dp_accounting`` DpEvent.

        Returns:
            True if ``compose(event)`` would succeed.

        Raises:
            TypeError: ``event`` is not a DpEvent.
        """
        _events.check_event("event", event)
        return self._unsupported_reason(event) is None

    # ------------------------------------------------------------------ ledger
    def compose(self, event, count=1) -> "Accountant":
        """Record that ``event`` happened ``count`` more times (O(1)).

        Args:
            event: a ``dp_accounting`` DpEvent (see :mod:`dpkit.accountants.events`).
            count: positive integer number of repetitions.

        Returns:
            ``self`` (so calls can be chained).

        Raises:
            TypeError: ``event`` is not a DpEvent or ``count`` not an integer.
            ValueError: ``count`` < 1.
            UnsupportedEventError: this accountant cannot account the event; the message names
                the event and the registered accountants that can.
        """
        _events.check_event("event", event)
        count = V.positive_int("count", count)
        reason = self._unsupported_reason(event)
        if reason is not None:
            raise UnsupportedEventError(self._unsupported_message(event, reason))
        if self._ledger and self._ledger[-1][0] == event:
            self._ledger[-1][1] += count
        else:
            self._ledger.append([event, count])
        self._invalidate()
        return self

    def _unsupported_message(self, event, reason: str) -> str:
        from dpkit.accountants.registry import accountants_supporting  # registry imports us

        others = [n for n in accountants_supporting(event, self._relation) if n != self.name]
        if others:
            hint = f"accountants that support it: {', '.join(others)}"
        else:
            other_relation = next(r for r in ("add_remove", "replace_one")
                                  if _events.as_relation(r) is not self._relation)
            elsewhere = accountants_supporting(event, other_relation)
            hint = (f"accountants that support it under neighboring_relation={other_relation!r}: "
                    f"{', '.join(elsewhere)}" if elsewhere
                    else "no registered accountant supports it")
        return (f"accountant {self.name!r} cannot account {event!r} under "
                f"neighboring_relation={_events.relation_name(self._relation)!r}: {reason}; {hint}")

    def _invalidate(self) -> None:
        self._cache.clear()
        self._backend_cache = None

    @property
    def ledger(self) -> list:
        """The composed events as a list of ``(event, count)`` tuples (runs merged)."""
        return [(event, count) for event, count in self._ledger]

    # ------------------------------------------------------------------ queries
    def epsilon(self, delta) -> float:
        """The smallest ε (an upper bound on the true one) such that the ledger is (ε, δ)-DP.

        Args:
            delta: δ in (0, 1).

        Returns:
            ε ≥ 0 (``math.inf`` if a non-private event was composed); 0 for an empty ledger.

        Raises:
            ValueError, TypeError: ``delta`` not in (0, 1).
        """
        delta = V.delta("delta", delta)
        key = ("eps", delta)
        if key not in self._cache:
            self._cache[key] = 0.0 if not self._ledger else max(0.0, float(self._epsilon_from_ledger(delta)))
        return self._cache[key]

    def delta(self, epsilon) -> float:
        """The smallest δ (an upper bound) such that the ledger is (ε, δ)-DP.

        Args:
            epsilon: ε ≥ 0 (finite).

        Returns:
            δ in [0, 1] (1 if a non-private event was composed); 0 for an empty ledger.

        Raises:
            ValueError, TypeError: ``epsilon`` negative, infinite or not a number.
        """
        epsilon = V.non_negative("epsilon", epsilon)
        key = ("delta", epsilon)
        if key not in self._cache:
            value = 0.0 if not self._ledger else float(self._delta_from_ledger(epsilon))
            self._cache[key] = min(1.0, max(0.0, value))
        return self._cache[key]

    @abc.abstractmethod
    def _epsilon_from_ledger(self, delta: float) -> float:
        """ε upper bound for the (non-empty) ledger at ``delta``."""

    @abc.abstractmethod
    def _delta_from_ledger(self, epsilon: float) -> float:
        """δ upper bound for the (non-empty) ledger at ``epsilon``."""

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The accountant's state as JSON-serialisable builtins (name, relation, config, ledger).

        Returns:
            ``{"name", "version", "neighboring_relation", "config", "ledger"}``; the ledger is a
            list of ``[event_dict, count]``.
        """
        return {
            "name": self.name,
            "version": _STATE_VERSION,
            "neighboring_relation": _events.relation_name(self._relation),
            "config": dict(self._config()),
            "ledger": [[event_to_dict(event), count] for event, count in self._ledger],
        }

    def load_state_dict(self, state) -> "Accountant":
        """Replace the ledger by the one in ``state`` (replayed through :meth:`compose`).

        Args:
            state: a dict produced by :meth:`state_dict` of an accountant with the same name and
                neighbouring relation.

        Returns:
            ``self``.

        Raises:
            ValueError: ``state`` is malformed or belongs to another accountant / relation.
            TypeError: ``state`` is not a dict.
            UnsupportedEventError: a ledger event cannot be accounted here.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(); got {type(state).__name__}")
        for key in ("name", "neighboring_relation", "ledger"):
            if key not in state:
                raise ValueError(f"state must contain {key!r}; got keys {sorted(state)!r}")
        if state["name"] != self.name:
            raise ValueError(f"state['name'] must be {self.name!r}; got {state['name']!r}")
        relation = _events.as_relation(state["neighboring_relation"])
        if relation is not self._relation:
            raise ValueError(f"state['neighboring_relation'] must be "
                             f"{_events.relation_name(self._relation)!r}; got {state['neighboring_relation']!r}")
        if not isinstance(state["ledger"], list):
            raise ValueError(f"state['ledger'] must be a list; got {state['ledger']!r}")
        replay = self._fresh()
        for entry in state["ledger"]:
            if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
                raise ValueError(f"state['ledger'] entries must be [event, count]; got {entry!r}")
            replay.compose(event_from_dict(entry[0]), entry[1])
        self._ledger = replay._ledger
        self._invalidate()
        return self

    def copy(self) -> "Accountant":
        """An independent accountant with the same configuration and ledger."""
        other = self._fresh()
        other._ledger = [[event, count] for event, count in self._ledger]
        other._support_cache = dict(self._support_cache)
        other._cache = dict(self._cache)  # same ledger, same answers
        return other

    def __repr__(self) -> str:
        steps = sum(count for _, count in self._ledger)
        return (f"{type(self).__name__}(neighboring_relation="
                f"{_events.relation_name(self._relation)!r}, entries={len(self._ledger)}, "
                f"compositions={steps})")

