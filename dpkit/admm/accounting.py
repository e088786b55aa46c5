"""Privacy accounting of private ADMM and of the DP proximal-SGD baseline (replace-one neighbours).

Neighbouring datasets REPLACE one user's data (one record per user). Two mechanisms occur.

Centralized ADMM (growing sensitivity). Step t releases ``mean_i u_i^t + N(0, s^2 I)`` where,
given the released past, the mean moves by at most ``t * Delta_1`` under replacement
(``Delta_1 = 4 lambda L / n``; see :mod:`dpkit.admm.solver`). With ``s = sigma * Delta_1`` step t
is a Gaussian mechanism of noise multiplier ``sigma / t``; adaptive composition (Mironov 2017,
Prop. 1 and Cor. 3) gives ``rdp(alpha) = alpha * sum_{t<=T} t^2 / (2 sigma^2)``
``= alpha T (T+1)(2T+1) / (12 sigma^2)``.

Sampled local noise (federated, decentralized, DP prox-SGD). At every step each user takes part
with probability ``q`` (federated client sampling; ``1/n`` for the decentralized token; Poisson
batches for SGD) and, when it does, releases a Gaussian perturbation (noise multiplier ``sigma``
w.r.t. the replace-one sensitivity) of a clipped quantity. Given the past, one step yields the pair
``q N(a, .) + (1-q) R`` vs ``q N(a', .) + (1-q) R`` with a COMMON part ``R`` (the user did not take
part). Joint convexity of ``(P, Q) -> E_Q[(dP/dQ)^alpha]`` for ``alpha > 1`` gives::

    rdp(alpha) = log(1 + q * (exp((alpha - 1) * alpha / (2 sigma^2)) - 1)) / (alpha - 1)

(the Gaussian mechanism's ``alpha / (2 sigma^2)`` at q = 1, Mironov 2017 Prop. 7; the mixture
step is the convexity argument of Balle, Barthe, Gaboardi 2018, "Privacy amplification by
subsampling", Sec. 5). It is linear in q, hence looser for small q than the add/remove Poisson
analysis, but it holds for replacement and whatever the adversary learns about WHO took part.

Conversion to (eps, delta): ``dp_accounting``'s RDP conversion.
"""

from __future__ import annotations

import math

import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant as _rdp

from dpkit import _validate as v
from dpkit.accountants._search import smallest_feasible
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


def growing_sensitivity_gaussian_rdp(noise_multiplier, steps, orders=None) -> np.ndarray:
    """Return the RDP of ``steps`` Gaussian releases whose sensitivity at step t is ``t`` units.

    Args:
        noise_multiplier: noise std over the FIRST step's sensitivity (> 0).
        steps: number of releases T (>= 1).
        orders: Renyi orders (> 1); default grid when None.

    Returns:
        ``alpha * T (T+1) (2T+1) / (12 sigma^2)`` per order (composition of Gaussians with
        multipliers ``sigma / t``, Mironov 2017 Prop. 7 and Prop. 1).

    Raises:
        ValueError / TypeError: arguments out of range.
    """
    sigma = v.positive("noise_multiplier", noise_multiplier)
    steps = v.positive_int("steps", steps)
    alphas = _orders(orders)
    return alphas * (steps * (steps + 1) * (2 * steps + 1) / 6.0) / (2.0 * sigma ** 2)


VARIANT_NAMES = ("centralized", "federated", "decentralized")


def _variant_rdp(noise_multiplier, steps, variant, sampling_rate, alphas):
    v.one_of("variant", variant, VARIANT_NAMES)
    steps = v.positive_int("steps", steps)
    if variant == "centralized":
        if sampling_rate not in (None, 1, 1.0):
            raise ValueError(f"sampling_rate must be None for variant='centralized'; got {sampling_rate!r}")
        return growing_sensitivity_gaussian_rdp(noise_multiplier, steps, alphas)
    if sampling_rate is None:
        raise ValueError(f"sampling_rate must be given for variant={variant!r} (1/n for "
                         "'decentralized'); got None")
    return steps * sampled_gaussian_replace_rdp(noise_multiplier, sampling_rate, alphas)


def admm_epsilon(noise_multiplier, steps, delta, *, variant="centralized", sampling_rate=None,
                 orders=None) -> float:
    """Return the (eps, delta)-DP epsilon of a private-ADMM run (or of DP prox-SGD).

    Args:
        noise_multiplier: ``sigma`` as in :func:`dpkit.admm.private_admm` (noise std over the
            replace-one sensitivity of one step's release).
        steps: number of noisy steps ``T`` (``ADMMResult.steps``).
        delta: delta in (0, 1).
        variant: ``"centralized"`` (growing-sensitivity Gaussian releases), ``"federated"`` or
            ``"decentralized"`` (sampled local Gaussian noise; DP prox-SGD is accounted as
            ``"federated"`` with its Poisson rate).
        sampling_rate: per-step participation probability of a user (required unless centralized;
            ``1/n`` for decentralized).
        orders: Renyi orders; default grid when None.

    Returns:
        epsilon via ``dp_accounting``'s RDP-to-DP conversion.

    Raises:
        ValueError / TypeError: invalid arguments.
    """
    delta = v.delta("delta", delta)
    alphas = _orders(orders)
    rdp = _variant_rdp(noise_multiplier, steps, variant, sampling_rate, alphas)
    eps, _ = _rdp.compute_epsilon(alphas, rdp, delta)
    return float(eps)


def calibrate_admm_noise(target_epsilon, delta, steps, *, variant="centralized", sampling_rate=None,
                         orders=None, rtol=1e-4) -> float:
    """Return the smallest noise multiplier (up to ``rtol``) whose epsilon is <= the target.

    Bisection on ``log sigma`` that returns the upper end of the bracket: never overshoots.

    Args:
        target_epsilon: epsilon to reach (> 0).
        delta: delta in (0, 1).
        steps, variant, sampling_rate, orders: as in :func:`admm_epsilon`.
        rtol: relative width of the final bracket (> 0).

    Returns:
        the noise multiplier.

    Raises:
        ValueError / TypeError: invalid arguments.
        CalibrationError: no multiplier in [1e-4, 1e10] reaches the target.
    """
    target = v.positive("target_epsilon", target_epsilon)
    delta = v.delta("delta", delta)
    rtol = v.positive("rtol", rtol)

    def eps(s):
        return admm_epsilon(s, steps, delta, variant=variant, sampling_rate=sampling_rate,
                            orders=orders)

    return smallest_feasible(
        lambda s: eps(s) <= target, start=1.0, lower=1e-4, upper=1e10, rtol=rtol,
        unreachable=lambda: CalibrationError(f"no noise multiplier up to {1e10:g} reaches epsilon {target:g}"))


__all__ = ["DEFAULT_ORDERS", "sampled_gaussian_replace_rdp", "growing_sensitivity_gaussian_rdp",
           "admm_epsilon", "calibrate_admm_noise"]
