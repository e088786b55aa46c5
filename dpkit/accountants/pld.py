"""The ``"pld"`` accountant: dp_accounting's privacy-loss-distribution accountant (the default).

Follows Koskela, Jälkö, Honkela, "Computing tight differential privacy guarantees using FFT"
(AISTATS 2020) and Doroshenko, Ghazi, Kamath, Kumar, Manurangsi, "Connect the Dots: Tighter
Discrete Approximations of Privacy Loss Distributions" (PETS 2022), as implemented by
``dp_accounting.pld.PLDAccountant``. The discretisation is PESSIMISTIC (dp_accounting's default),
so the reported ε is an upper bound on the true ε of the composed mechanism.

``value_discretization_interval`` (default 1e-3) trades accuracy for speed: on q = 0.01, σ = 1,
10,000 steps it over-states ε by ~0.003 (0.05%) vs 1e-4 while being ~9× faster (measured in
docs/accounting.md), which keeps ε for 10,000 DP-SGD steps well under 0.5 s.
"""

from __future__ import annotations

from dp_accounting.pld import PLDAccountant as _DPAPLDAccountant

from dpkit import _validate as V
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
