"""The ``"pld"`` accountant: dp_accounting's privacy-loss-distribution accountant (the default).

Follows Koskela, Jälkö, Honkela, "Computing tight differential privacy guarantees using FFT"
(AISTATS 2020) and Doroshenko, Ghazi, Kamath, Kumar, Manurangsi, "Connect the Dots: Tighter
Discrete Approximations of Privacy Loss Distributions" (PETS 2022), as implemented by
``dp_accounting.pld.PLDAccountant``. The discretisation is PESSIMISTIC (dp_accounting's default),
so the reported ε is an upper bound on the true ε of the composed mechanism.

Plain Gaussian releases are folded into ONE equivalent Gaussian before composing (exact), and a
ledger of Gaussian releases only is answered in closed form (Balle & Wang, ICML 2018, Thm. 8).

``value_discretization_interval`` (default 1e-3) trades accuracy for speed: on q = 0.01, σ = 1,
10,000 steps it over-states ε by ~0.003 (0.05%) vs 1e-4 while being ~9× faster (measured in
docs/accounting.md), which keeps ε for 10,000 DP-SGD steps well under 0.5 s.
"""

from __future__ import annotations

from dp_accounting.dp_event import GaussianDpEvent, NoOpDpEvent
from dp_accounting.pld import PLDAccountant as _DPAPLDAccountant

from dpkit import _validate as V
from dpkit.accountants import events as _events
from dpkit.accountants._gaussian import gaussian_delta, gaussian_epsilon
from dpkit.accountants._backed import DpAccountingBacked

__all__ = ["PLDAccountant"]

DEFAULT_VALUE_DISCRETIZATION_INTERVAL = 1e-3


class PLDAccountant(DpAccountingBacked):
    """Privacy-loss-distribution accountant (tight; pessimistic discretisation).

    Args:
        neighboring_relation: ``"add_remove"`` (default) or ``"replace_one"``.
        value_discretization_interval: grid step of the privacy-loss values, > 0; smaller is
            tighter and slower. ε is an upper bound for every value.

    Raises:
        ValueError, TypeError: invalid relation or interval.
    """

    name = "pld"
    is_approximate = False
    _backend_label = "PLDAccountant"

    def __init__(self, neighboring_relation="add_remove", *,
                 value_discretization_interval=DEFAULT_VALUE_DISCRETIZATION_INTERVAL):
        super().__init__(neighboring_relation)
        self._vdi = V.positive("value_discretization_interval", value_discretization_interval)

    def _config(self) -> dict:
        return {"value_discretization_interval": self._vdi}

    def _new_backend(self) -> _DPAPLDAccountant:
        return _DPAPLDAccountant(self._relation, value_discretization_interval=self._vdi)

    def _gaussian_only(self):
        """μ of the ledger when it holds nothing but Gaussian releases (else None)."""
        leaves = (pair for event, count in self._ledger for pair in _events.leaves_with_counts(event, count))
        sigma, rest = _events.merge_gaussians(leaves)
        if sigma is None or any(not isinstance(leaf, NoOpDpEvent) for leaf, _ in rest):
            return None
        return 1.0 / sigma

    def _backend(self) -> _DPAPLDAccountant:
        # Plain Gaussian releases are folded into one exact Gaussian (see merge_gaussians) before
        # composing; everything else is self-composed by count. The order of composition does not
        # change the privacy loss distribution of an (adaptive) composition.
        if self._backend_cache is None:
            leaves = (pair for event, count in self._ledger
                      for pair in _events.leaves_with_counts(event, count))
            sigma, rest = _events.merge_gaussians(leaves)
            backend = self._new_backend()
            if sigma is not None:
                backend.compose(GaussianDpEvent(sigma))
            for leaf, count in rest:
                backend.compose(leaf, count)
            self._backend_cache = backend
        return self._backend_cache

    # A ledger of Gaussian releases only has a closed-form privacy profile: use it (exact, and a
    # PLD of a Gaussian with a tiny effective σ would need an enormous grid).
    def _epsilon_from_ledger(self, delta: float) -> float:
        mu = self._gaussian_only()
        return gaussian_epsilon(mu, delta) if mu is not None else self._backend().get_epsilon(delta)

    def _delta_from_ledger(self, epsilon: float) -> float:
        mu = self._gaussian_only()
        return gaussian_delta(mu, epsilon) if mu is not None else self._backend().get_delta(epsilon)
