"""The ``"rdp"`` accountant: dp_accounting's Rényi-DP accountant.

Rényi DP (Mironov, CSF 2017) of the Poisson-subsampled Gaussian (Mironov, Talwar, Zhang 2019),
of sampling without replacement under replace-one (Wang, Balle, Kasiviswanathan, AISTATS 2019,
Thm. 27), converted to (ε, δ) with the improved conversion of Canonne, Kamath, Steinke (NeurIPS
2020, Prop. 12) as implemented by ``dp_accounting.rdp.RdpAccountant``. Every order gives a valid
bound; the minimum over the grid is reported, so ε is an upper bound (typically 7–80% looser
than PLD).
"""

from __future__ import annotations

import math

import numpy as np
from dp_accounting.rdp import RdpAccountant as _DPARdpAccountant

from dpkit.accountants._backed import DpAccountingBacked

__all__ = ["RDPAccountant", "DEFAULT_ORDERS"]

# dp_accounting's default grid (1.1..10.9 by 0.1, 11..63, 128..1024) refined between 64 and 1024
# and extended beyond (small σ, tiny δ), where the default is sparse. Orders in (1, 1.1) are left
# out: dp_accounting's fractional-order series often fails to converge there (it then drops the
# order with a log warning) and they win only in nearly non-private settings (ε in the tens).
DEFAULT_ORDERS = tuple(sorted(set(
    [1.0 + x / 10.0 for x in range(1, 100)]
    + list(range(11, 64))
    + [64, 72, 80, 96, 112, 128, 160, 192, 256, 384, 512, 768, 1024, 2048, 4096]
)))


class RDPAccountant(DpAccountingBacked):
    """Rényi-DP accountant (valid upper bound; looser than PLD).

    Args:
        neighboring_relation: ``"add_remove"`` (default) or ``"replace_one"`` (needed for
            :func:`~dpkit.accountants.events.fixed_size_event`).
        orders: RDP orders > 1 to optimise over; default :data:`DEFAULT_ORDERS`.

    Raises:
        ValueError, TypeError: invalid relation or orders.
    """

    name = "rdp"
    is_approximate = False
    _backend_label = "RdpAccountant"

    def __init__(self, neighboring_relation="add_remove", *, orders=None):
        super().__init__(neighboring_relation)
        if orders is None:
            orders = DEFAULT_ORDERS
        try:
            values = [float(o) for o in orders]
        except (TypeError, ValueError):
            raise TypeError(f"orders must be a sequence of numbers > 1; got {orders!r}") from None
        if not values or any(not (o > 1 and math.isfinite(o)) for o in values):
            raise ValueError(f"orders must be a non-empty sequence of finite numbers > 1; got {orders!r}")
        self._orders = tuple(values)

    def _config(self) -> dict:
        return {"orders": list(self._orders)}

    def _new_backend(self) -> _DPARdpAccountant:
        return _DPARdpAccountant(orders=np.array(self._orders), neighboring_relation=self._relation)
