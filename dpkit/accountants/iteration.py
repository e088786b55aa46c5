"""Privacy amplification by iteration: an RDP accountant for noisy contractive iterations (TORCH-FREE).

Setting (Feldman, Mironov, Talwar, Thakurta, FOCS 2018, "Privacy Amplification by Iteration",
Definition 19 "contractive noisy iteration" and Theorem 22): ``X_t = psi_t(X_{t-1}) + Z_t`` with
``Z_t ~ N(0, s^2 I)`` and every ``psi_t`` ``c``-Lipschitz (``c <= 1``). Two neighbouring runs use the
same maps except at ONE step ``t0``, where ``sup_x ||psi_t0(x) - psi'_t0(x)|| <= Delta``; only the
iterate ``k`` noisy steps later (the step of the change counted, so ``k >= 1``) is released.

Bound. Theorem 22 bounds the Renyi divergence of the released iterates by
``sum_t alpha * a_t^2 / (2 s^2)`` for any non-negative "shift budget" ``a_t`` whose running
residual stays non-negative and ends at 0. A c-Lipschitz map multiplies the residual shift by c
(the contraction step of the shift-reduction lemma, Feldman et al. Lemma 21 with Lipschitz maps;
Balle, Barthe, Gaboardi, Geumlek, NeurIPS 2019, "Privacy amplification by mixing and
diffusion", Sec. 5), so the residual after the j-th noise is ``c^j Delta - sum_{i<=j} a_i c^(j-i)``.
Minimising ``sum a_j^2`` under a zero final residual (Cauchy-Schwarz; the optimum keeps every
residual non-negative) gives the closed form::

    eps_RDP(alpha) = alpha * Delta^2 * c^(2(k-1)) / (2 s^2 * sum_{m=0}^{k-1} c^(2m))

which is ``alpha Delta^2 / (2 s^2 k)`` for non-expansive maps (c = 1, Feldman et al. Theorem 1)
and ``alpha Delta^2 / (2 s^2)`` (one Gaussian mechanism) for k = 1. Releasing every iterate instead
costs exactly that single-step Gaussian (the other steps do not depend on the record), so the
bound here is never larger than plain composition of the same noisy steps.

Why this is not an event-based :class:`dpkit.accountants.Accountant`: the guarantee depends on a
property of the ITERATION (Lipschitz constant of the maps, and that intermediate iterates stay
hidden) that no ``dp_accounting`` DpEvent can express; composing it as if it were an event would
wrongly suggest it composes with released mechanisms step by step. Its RDP curve can still be added
to other RDP curves (sequential composition) by the caller.
"""

from __future__ import annotations

import math

import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant as _rdp

from dpkit import _validate as v
from dpkit.accountants._search import smallest_feasible
from dpkit.errors import CalibrationError

DEFAULT_ORDERS = tuple(float(a) for a in
                       [1.25, 1.5, 1.75, 2, 2.5, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64,
                        128, 256, 512, 1024])


def _orders(orders) -> np.ndarray:
    if orders is None:
        return np.asarray(DEFAULT_ORDERS)
    try:
        arr = np.asarray(orders, dtype=float).ravel()
    except (TypeError, ValueError):
        raise TypeError(f"orders must be a sequence of numbers > 1; got {orders!r}") from None
    if arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr <= 1):
        raise ValueError(f"orders must be a non-empty sequence of finite numbers > 1; got {orders!r}")
    return arr


class IterationAccountant:
    """RDP / (eps, delta) of the last iterate of a noisy contractive iteration (amplification by iteration).

    Args:
        noise_std: standard deviation ``s`` of the Gaussian noise added at every step (> 0).
        sensitivity: ``Delta``, the largest distance between the two maps at the step that uses
            the record (> 0), i.e. ``sup_x ||psi(x) - psi'(x)||``.
        steps: ``k >= 1``, the number of noisy steps from the step that uses the record up to and
            including the released iterate.
        contraction: Lipschitz constant ``c`` in (0, 1] of EVERY map after the change (1 for
            non-expansive maps such as proximal / projected gradient steps on convex smooth losses
            with step <= 2/beta; < 1 for strongly convex ones).
        orders: Renyi orders (> 1) at which the curve is evaluated; a default grid when None.

    Raises:
        ValueError / TypeError: any argument out of range or of the wrong kind.

    Follows Feldman et al. 2018, Theorems 1 and 22 (see the module docstring for the derivation).
    """

    def __init__(self, noise_std, sensitivity, steps, *, contraction=1.0, orders=None):
        self.noise_std = v.positive("noise_std", noise_std)
        self.sensitivity = v.positive("sensitivity", sensitivity)
        self.steps = v.positive_int("steps", steps)
        c = v.positive("contraction", contraction)
        if c > 1:
            raise ValueError(f"contraction must lie in (0, 1]; got {contraction!r}")
        self.contraction = c
        self.orders = _orders(orders)

    def shift_factor(self) -> float:
        """Return ``c^(2(k-1)) / sum_{m<k} c^(2m)`` (1/k when c = 1): the RDP reduction over one step."""
        c2, k = self.contraction ** 2, self.steps
        if c2 == 1.0:
            return 1.0 / k
        # c^(2(k-1)) (1 - c^2) / (1 - c^(2k)) with e = c^(2(k-1)) computed without overflow
        e = math.exp((k - 1) * math.log(c2))
        return (1.0 - c2) * e / (1.0 - c2 * e)

    def rdp(self) -> np.ndarray:
        """Return the RDP epsilons at ``self.orders`` (one per order).

        Returns:
            ``alpha * Delta^2 / (2 s^2) * shift_factor()`` for every order alpha.
        """
        base = (self.sensitivity / self.noise_std) ** 2 / 2.0
        return self.orders * base * self.shift_factor()

    def epsilon(self, delta) -> float:
        """Return the (eps, delta)-DP epsilon of the released iterate.

        Args:
            delta: target delta in (0, 1).

        Returns:
            epsilon from the RDP curve via ``dp_accounting``'s RDP conversion (Canonne, Kamath,
            Steinke 2020 / Balle et al. 2020 improved conversion).

        Raises:
            ValueError: delta outside (0, 1).
        """
        delta = v.delta("delta", delta)
        eps, _ = _rdp.compute_epsilon(self.orders, self.rdp(), delta)
        return float(eps)

    @classmethod
    def calibrate_noise_std(cls, target_epsilon, delta, sensitivity, steps, *, contraction=1.0,
                            orders=None, rtol=1e-4):
        """Return the smallest noise std (up to ``rtol``) whose epsilon does not exceed the target.

        Bisection on ``log s``; the returned value is always the upper end of the bracket, so its
        epsilon is <= ``target_epsilon`` (never overshoots).

        Args:
            target_epsilon: the epsilon to reach (> 0).
            delta: delta in (0, 1).
            sensitivity, steps, contraction, orders: as in the constructor.
            rtol: relative width of the final bracket (> 0).

        Returns:
            the noise standard deviation ``s``.

        Raises:
            ValueError / TypeError: invalid arguments.
            CalibrationError: no noise in [1e-6, 1e12] * sensitivity reaches the target.
        """
        target = v.positive("target_epsilon", target_epsilon)
        delta = v.delta("delta", delta)
        rtol = v.positive("rtol", rtol)

        def eps(s):
            return cls(s, sensitivity, steps, contraction=contraction, orders=orders).epsilon(delta)

        lower, upper = 1e-6 * float(sensitivity), 1e12 * float(sensitivity)
        return smallest_feasible(
            lambda s: eps(s) <= target, start=float(sensitivity), lower=lower, upper=upper, rtol=rtol,
            unreachable=lambda: CalibrationError(f"no noise std up to {upper:g} reaches epsilon "
                                                 f"{target:g} at delta {delta:g}"))
