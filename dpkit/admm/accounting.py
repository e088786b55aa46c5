"""Privacy accounting of private ADMM and of the DP proximal-SGD baseline (replace-one neighbours).

Both algorithms, at every step, let each user (record) take part with probability ``q``
(1: centralized / full batch; ``q``: federated client sampling or Poisson batches; ``1/n``:
decentralized token visits) and, when it takes part, release a Gaussian perturbation of a clipped
quantity. Neighbouring datasets REPLACE one user's data. With noise std ``sigma * Delta`` where
``Delta`` bounds the change of the released quantity under replacement, one step yields, given the
past, the pair of mixtures ``q N(a, .) + (1-q) R`` vs ``q N(a', .) + (1-q) R`` with ``||a - a'|| <= Delta``
and a COMMON part ``R`` (the user did not take part). Joint convexity of
``(P, Q) -> E_Q[(dP/dQ)^alpha]`` for ``alpha > 1`` gives the per-step RDP bound::

    rdp(alpha) = log(1 + q * (exp((alpha - 1) * alpha / (2 sigma^2)) - 1)) / (alpha - 1)

(= the Gaussian mechanism's ``alpha / (2 sigma^2)`` at q = 1; Mironov 2017, Prop. 7 for the
Gaussian; the mixture step is the standard convexity argument, e.g. Balle, Barthe, Gaboardi 2018
"Privacy amplification by subsampling", Sec. 5). It is linear in q, hence loose for small q compared
with the add/remove Poisson analysis, but it holds for replacement and whatever the adversary sees
of WHO took part. Steps compose adaptively (Mironov 2017, Prop. 1), which is valid because the
accounting treats every per-user state as released after every step (see docs/admm.md).
"""

from __future__ import annotations

import math

import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant as _rdp

from dpkit import _validate as v
from dpkit.accountants.iteration import DEFAULT_ORDERS, _orders
from dpkit.errors import CalibrationError


def sampled_gaussian_replace_rdp(noise_multiplier, sampling_rate, orders=None) -> np.ndarray:
    """Return the per-step RDP of a Gaussian release taken with probability ``q`` (replace-one).

    Args:
        noise_multiplier: noise std divided by the replace-one sensitivity (> 0).
        sampling_rate: probability ``q`` in (0, 1] that the changed user takes part in the step.
        orders: Renyi orders (> 1); a default grid when None.

    Returns:
        array of RDP epsilons, one per order (formula in the module docstring).

    Raises:
        ValueError / TypeError: arguments out of range.
    """
    sigma = v.positive("noise_multiplier", noise_multiplier)
    q = v.probability("sampling_rate", sampling_rate)
    alphas = _orders(orders)
    gauss = alphas / (2.0 * sigma ** 2)
    if q == 1.0:
        return gauss
    # log1p(q * expm1(x)) / (alpha - 1), evaluated in log space when expm1 would overflow
    x = (alphas - 1.0) * gauss
    with np.errstate(over="ignore"):
        small = np.log1p(q * np.expm1(np.minimum(x, 700.0)))
    large = x + math.log(q) + np.log1p((1.0 - q) / q * np.exp(-x))
    out = np.where(x < 700.0, small, large)
    return out / (alphas - 1.0)


def admm_epsilon(noise_multiplier, steps, delta, *, sampling_rate=1.0, orders=None) -> float:
    """Return the (eps, delta)-DP epsilon of ``steps`` noisy private-ADMM (or DP-prox-SGD) steps.

    Args:
        noise_multiplier: per-update noise std divided by the replace-one sensitivity of the
            update (for ADMM ``4 * relaxation * clip``, for SGD ``2 * clip``).
        steps: number of steps (>= 1); a user's chance of taking part in each is ``sampling_rate``.
        delta: delta in (0, 1).
        sampling_rate: per-step participation probability of a given user, in (0, 1].
        orders: Renyi orders; default grid when None.

    Returns:
        epsilon via ``dp_accounting``'s RDP-to-DP conversion.

    Raises:
        ValueError / TypeError: invalid arguments.
    """
    steps = v.positive_int("steps", steps)
    delta = v.delta("delta", delta)
    alphas = _orders(orders)
    rdp = steps * sampled_gaussian_replace_rdp(noise_multiplier, sampling_rate, alphas)
    eps, _ = _rdp.compute_epsilon(alphas, rdp, delta)
    return float(eps)


def calibrate_admm_noise(target_epsilon, delta, steps, *, sampling_rate=1.0, orders=None,
                         rtol=1e-4) -> float:
    """Return the smallest noise multiplier (up to ``rtol``) whose epsilon is <= the target.

    Bisection on ``log sigma`` that returns the upper end of the bracket: never overshoots.

    Args:
        target_epsilon: epsilon to reach (> 0).
        delta: delta in (0, 1).
        steps, sampling_rate, orders: as in :func:`admm_epsilon`.
        rtol: relative width of the final bracket (> 0).

    Returns:
        the noise multiplier.

    Raises:
        ValueError / TypeError: invalid arguments.
        CalibrationError: no multiplier in [1e-4, 1e8] reaches the target.
    """
    target = v.positive("target_epsilon", target_epsilon)
    delta = v.delta("delta", delta)
    rtol = v.positive("rtol", rtol)

    def eps(s):
        return admm_epsilon(s, steps, delta, sampling_rate=sampling_rate, orders=orders)

    lo, hi = 1e-4, 1e8
    if eps(hi) > target:
        raise CalibrationError(f"no noise multiplier up to {hi:g} reaches epsilon {target:g}")
    if eps(lo) <= target:
        return lo
    while hi / lo > 1.0 + rtol:
        mid = math.sqrt(lo * hi)
        if eps(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


__all__ = ["DEFAULT_ORDERS", "sampled_gaussian_replace_rdp", "admm_epsilon", "calibrate_admm_noise"]
