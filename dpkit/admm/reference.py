"""Private ADMM under the REFERENCE CODE's noise calibration — unverified, for audits and comparisons.

Cyffers, Bellet, Basu, ICML 2023 (arXiv 2302.12559); authors' public code, repository
totilas/padadmm (``main.py``, ``conversion.py``, ``dpadmm.py``), which produces the paper's Fig. 1.
What it does, restated:

1. (ε, δ) → zCDP ρ by solving ``ρ + 2·sqrt(ρ·log(1/δ)) = ε`` (Bun & Steinke 2016, Prop. 1.3,
   used backwards; closed form ``sqrt(ρ) = sqrt(log(1/δ) + ε) − sqrt(log(1/δ))``);
2. ``scale_noise = 2·L²·T / (ρ·n²)`` — used as a noise STANDARD DEVIATION although it has the
   units of a variance (for values < 1 that is less noise than the formula's square root);
3. every user taking part adds ``λ·scale_noise·N(0, I)`` to its own state ``u_i`` after its
   update ``u_i += 2λ·clip_L(x_i − z)`` (100 users per round drawn with replacement; Fig. 1:
   Lasso, n = 1000, p = 64, T = 1000, λ = 0.464, γ = 1.585, L = 1.6, δ = 1e-6).

That is dpkit's ``private_admm(variant="federated" | "decentralized")`` noise placement (local
Gaussian noise on each participating user's update) with noise multiplier
``λ·scale_noise / (4λL) = scale_noise / (4L)`` w.r.t. dpkit's replace-one sensitivity ``4λL``.
(Sampling differs: dpkit samples clients by Poisson, rate q.) The ε is **claimed by the
reference code**: dpkit knows no proof of it, its own account of the same noise is
:func:`dpkit.admm.admm_epsilon`, and dpkit's audit contradicts the claim (docs/admm.md).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from dpkit import _validate as v
from dpkit.errors import CLAIM_LABEL, UnverifiedPrivacyClaimWarning

__all__ = ["CLAIM_LABEL", "ADMMReferenceCalibration", "ReferenceCalibrationWarning",
           "reference_admm_calibration", "reference_scale_noise", "reference_zcdp_rho"]

# one warning class and label for every reference calibration (dpkit.errors)
ReferenceCalibrationWarning = UnverifiedPrivacyClaimWarning

def reference_zcdp_rho(epsilon, delta) -> float:
    """The ρ with ``ρ + 2·sqrt(ρ·log(1/δ)) = ε`` (the reference's ``eps_delta_to_zcdp``, closed form).

    Args:
        epsilon: ε > 0. delta: δ in (0, 1).

    Returns:
        ρ > 0: ``(sqrt(log(1/δ) + ε) − sqrt(log(1/δ)))²``.

    Raises:
        ValueError, TypeError: an argument out of range, named.
    """
    eps = v.positive("epsilon", epsilon)
    log_inv = math.log(1.0 / v.delta("delta", delta))
    # (√(a+ε) − √a)² written as ε²/(√(a+ε) + √a)² to avoid cancellation for small ε
    return eps ** 2 / (math.sqrt(log_inv + eps) + math.sqrt(log_inv)) ** 2


def reference_scale_noise(epsilon, delta, *, clip, steps, num_users) -> float:
    """The reference code's ``scale_noise = 2·L²·T / (ρ·n²)`` (padadmm ``main.py``).

    Args:
        epsilon: ε > 0. delta: δ in (0, 1).
        clip: L > 0. steps: T ≥ 1 (rounds). num_users: n ≥ 1.

    Returns:
        scale_noise (the reference multiplies it by λ and uses it as a standard deviation).

    Raises:
        ValueError, TypeError: an argument out of range, named.
    """
    L = v.positive("clip", clip)
    T = v.positive_int("steps", steps)
    n = v.positive_int("num_users", num_users)
    return 2.0 * L ** 2 * T / (reference_zcdp_rho(epsilon, delta) * n ** 2)


@dataclass(frozen=True)
class ADMMReferenceCalibration:
    """Outcome of :func:`reference_admm_calibration`.

    Attributes:
        noise_multiplier: ``scale_noise/(4L)``, for ``private_admm(variant="federated" |
            "decentralized", noise_multiplier=...)``: per-user noise std ``λ·scale_noise``.
        noise_std: ``λ·scale_noise``, std of the noise a participating user adds to ``u_i``.
        scale_noise: ``2L²T/(ρn²)``. rho: the zCDP ρ of the claim.
        claimed_epsilon, claimed_delta: the target, CLAIMED BY THE REFERENCE CODE (unverified).
    """

    noise_multiplier: float
    noise_std: float
    scale_noise: float
    rho: float
    claimed_epsilon: float
    claimed_delta: float

    def describe(self) -> str:
        """One line naming the claimed ε as the reference code's (never dpkit's) claim."""
        return (f"epsilon {self.claimed_epsilon:g} at delta {self.claimed_delta:g} {CLAIM_LABEL} "
                f"(unverified; rho = {self.rho:.4g}, scale_noise = {self.scale_noise:.4g}, per-user "
                f"noise std = {self.noise_std:.4g}, noise multiplier = {self.noise_multiplier:.4g})")


def reference_admm_calibration(epsilon, delta, *, clip, steps, num_users,
                               relaxation) -> ADMMReferenceCalibration:
    """The private-ADMM reference code's local noise for a target (ε, δ) — UNVERIFIED.

    Cyffers et al. ICML 2023, authors' code (module docstring). Never dpkit's default: dpkit
    calibrates with :func:`dpkit.admm.calibrate_admm_noise`, whose bound it can prove.

    Args:
        epsilon: ε > 0 (the claim). delta: δ in (0, 1).
        clip: L > 0. steps: rounds T ≥ 1. num_users: n ≥ 1. relaxation: λ in (0, 1).

    Returns:
        :class:`ADMMReferenceCalibration`.

    Warns:
        ReferenceCalibrationWarning: always (the bound is unverified).

    Raises:
        ValueError, TypeError: an argument out of range, named.
    """
    lam = v.probability("relaxation", relaxation, allow_one=False)
    scale = reference_scale_noise(epsilon, delta, clip=clip, steps=steps, num_users=num_users)
    cal = ADMMReferenceCalibration(
        noise_multiplier=scale / (4.0 * float(clip)), noise_std=lam * scale, scale_noise=scale,
        rho=reference_zcdp_rho(epsilon, delta), claimed_epsilon=float(epsilon),
        claimed_delta=float(delta))
    warnings.warn(f"private ADMM reference calibration: {cal.describe()}; no proof of this bound "
                  "is known and dpkit's audit contradicts it (docs/admm.md)",
                  ReferenceCalibrationWarning, stacklevel=2)
    return cal
