"""Shared plumbing for accountants that delegate to a ``dp_accounting`` PrivacyAccountant."""

from __future__ import annotations

import abc

from dpkit.accountants.base import Accountant


class DpAccountingBacked(Accountant):
    """An :class:`Accountant` whose numbers come from a fresh dp_accounting accountant.

    The backend is rebuilt from the ledger (one ``compose(event, count)`` per merged entry, i.e.
    self-composition by count) the first time a number is asked after the ledger changed.
    """

    _backend_label = ""

    @abc.abstractmethod
    def _new_backend(self):
        """A new, empty dp_accounting accountant with this accountant's configuration."""

    def _backend_supports(self, event):
        if self._new_backend().supports(event):
            return None
        return f"dp_accounting's {self._backend_label} does not support this event under this relation"

    def _backend(self):
        if self._backend_cache is None:
            backend = self._new_backend()
            for event, count in self._ledger:
                backend.compose(event, count)
            self._backend_cache = backend
        return self._backend_cache

    def _epsilon_from_ledger(self, delta: float) -> float:
        return self._backend().get_epsilon(delta)

    def _delta_from_ledger(self, epsilon: float) -> float:
        return self._backend().get_delta(epsilon)
