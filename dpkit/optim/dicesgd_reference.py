"""DiceSGD under the REFERENCE CODE's noise calibration — unverified, for audits and comparisons.

Zhang, Bu, Wu, Hong, ICLR 2024 (arXiv 2311.14632); authors' public code, repository
564612540/DiceSGD, ``DiceSGD/optimizers_utils.py``, ``PrivacyEngine_Dice.
_create_noisy_clipped_dice_gradient`` (commit 104b3b4, May 2023). What it does, restated:

* the summed error ``e`` (sum units) is clipped at ``r·C1`` with ``r = error_max_grad_norm``
  (the "C2/C1 ratio" of its scripts), and the noise added to the summed gradient has std
  ``σ · C1 · sqrt(1 + 2r)`` (commit 0e8fa64 used ``σ · C1 · 2``);
* ``σ`` is the ordinary DP-SGD noise multiplier for (q, T, ε, δ) (fastDP's ``target_epsilon``,
  RDP accounting by default; dpkit's accountant here, ``"rdp"`` by default).

In dpkit's mean units the error threshold is ``C2 = r·C1/B̄``, i.e. ``r = B̄·C2/C1``
(:func:`reference_error_ratio`). The ε targeted this way is **claimed by the reference code**: no
proof of it is known to dpkit, and dpkit's audit (docs/dicesgd_dpsgdf.md) contradicts it for
dpkit's DiceSGD, whose update is the paper's. dpkit's own ledger (``dicesgd_event``) still
accounts whatever noise actually runs.

Error-update deviation (:func:`reference_error_update`): with ``c = r C1/‖e‖`` the reference sets
``e ← e·min(c, 1 − min(c, 1)) + residual``: the paper's ``e − clip(e, rC1)`` when ``‖e‖ ≤ 2rC1``
but ``clip(e, rC1)`` when ``‖e‖ > 2rC1`` — a huge residual is cut to norm ``rC1`` after one
feedback instead of being delivered over many later steps.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from dpkit import _validate as V
from dpkit.errors import CLAIM_LABEL, UnverifiedPrivacyClaimWarning
from dpkit.accountants.calibration import calibrate_noise_multiplier

__all__ = ["CLAIM_LABEL", "DiceSGDReferenceCalibration", "ReferenceCalibrationWarning",
           "reference_dicesgd_calibration", "reference_error_ratio", "reference_error_update",
           "simulate_canary_sums"]

# one warning class and label for every reference calibration (dpkit.errors)
ReferenceCalibrationWarning = UnverifiedPrivacyClaimWarning

def reference_error_ratio(clip1, clip2, expected_batch_size) -> float:
    """The reference code's ``error_max_grad_norm`` r for dpkit's mean-unit threshold C2: ``B̄·C2/C1``.

    The reference clips the SUMMED error at r·C1; dpkit clips the mean error at C2 and adds
    B̄·clip(e, C2) to the sum, so both clip the summed error at the same norm when r = B̄·C2/C1.

    Args:
        clip1: per-example clip norm C1 > 0.
        clip2: error threshold C2 ≥ 0 (dpkit's mean units).
        expected_batch_size: B̄ > 0.

    Returns:
        r ≥ 0.

    Raises:
        ValueError, TypeError: an argument out of range, named.
    """
    c1 = V.positive("clip1", clip1)
    c2 = V.non_negative("clip2", clip2)
    b = V.positive("expected_batch_size", expected_batch_size)
    return b * c2 / c1


@dataclass(frozen=True)
class DiceSGDReferenceCalibration:
    """Outcome of :func:`reference_dicesgd_calibration`.

    Attributes:
        noise_multiplier: std of the noise on the summed gradient divided by C1, i.e.
            ``dpsgd_noise_multiplier · sqrt(1 + 2r)`` — what dpkit's optimizer must add.
        dpsgd_noise_multiplier: σ of plain DP-SGD for the claimed (ε, δ) at (q, T).
        error_ratio: r = B̄·C2/C1.
        claimed_epsilon, claimed_delta: the target, CLAIMED BY THE REFERENCE CODE (unverified).
        accountant: the accountant that calibrated σ.
    """

    noise_multiplier: float
    dpsgd_noise_multiplier: float
    error_ratio: float
    claimed_epsilon: float
    claimed_delta: float
    accountant: str

    def describe(self) -> str:
        """One line naming the claimed ε as the reference code's (never dpkit's) claim."""
        return (f"epsilon {self.claimed_epsilon:g} at delta {self.claimed_delta:g} {CLAIM_LABEL} "
                f"(unverified; sigma_DP-SGD = {self.dpsgd_noise_multiplier:.4g}, r = "
                f"{self.error_ratio:.4g}, noise multiplier on the sum = {self.noise_multiplier:.4g})")


def reference_dicesgd_calibration(target_epsilon, target_delta, sampling_prob, steps, *, clip1, clip2,
                                  expected_batch_size, accountant="rdp") -> DiceSGDReferenceCalibration:
    """The DiceSGD reference code's noise for a target (ε, δ) — an UNVERIFIED calibration.

    σ = DP-SGD's noise multiplier for (q, T, ε, δ); the noise std on the summed gradient is
    σ·C1·sqrt(1 + 2r) with r = B̄·C2/C1 (564612540/DiceSGD, ``optimizers_utils.py``; module
    docstring). dpkit never uses this by default; its own account of the same noise is
    :func:`dpkit.optim.error_feedback.dicesgd_event`, usually a much larger ε.

    Args:
        target_epsilon: ε > 0 (the claim). target_delta: δ in (0, 1).
        sampling_prob: Poisson rate q in (0, 1]. steps: T ≥ 1.
        clip1: C1 > 0. clip2: C2 ≥ 0 in dpkit's mean units. expected_batch_size: B̄ > 0.
        accountant: dpkit accountant for the DP-SGD σ (``"rdp"``, like fastDP's default).

    Returns:
        :class:`DiceSGDReferenceCalibration`.

    Warns:
        ReferenceCalibrationWarning: always (the bound is unverified).

    Raises:
        ValueError, TypeError: an argument out of range, named. CalibrationError: unreachable.
    """
    r = reference_error_ratio(clip1, clip2, expected_batch_size)
    sigma = calibrate_noise_multiplier(target_epsilon, target_delta, sampling_prob, steps,
                                       accountant=accountant)
    cal = DiceSGDReferenceCalibration(
        noise_multiplier=sigma * math.sqrt(1.0 + 2.0 * r), dpsgd_noise_multiplier=sigma,
        error_ratio=r, claimed_epsilon=float(target_epsilon), claimed_delta=float(target_delta),
        accountant=accountant if isinstance(accountant, str) else type(accountant).__name__)
    warnings.warn(f"DiceSGD reference calibration: {cal.describe()}; no proof of this bound is "
                  "known and dpkit's audit contradicts it (docs/dicesgd_dpsgdf.md)",
                  ReferenceCalibrationWarning, stacklevel=2)
    return cal


def reference_error_update(error, residual, *, threshold):
    """One error-state update of the DiceSGD reference code (sum units), vectorised over runs.

    With ``c = threshold/‖e‖``: feedback ``e·min(c, 1)`` and new state
    ``e·min(c, 1 − min(c, 1)) + residual`` (the reference's formula; the paper's update would
    be ``e − feedback + residual``). The reference adds 1e-6 to ‖e‖; omitted here.

    Args:
        error: array (..., d), the current states e (one row per run).
        residual: array broadcastable to ``error``, this step's Σ(g_i − clip(g_i, C1)).
        threshold: r·C1 ≥ 0, the clip norm of the summed error.

    Returns:
        (feedback, new_error), arrays of the shape of ``error``.

    Raises:
        ValueError: ``threshold`` negative or not finite, ``error`` not at least 1-D.
    """
    thr = V.non_negative("threshold", threshold)
    e = np.asarray(error, dtype=float)
    if e.ndim < 1:
        raise ValueError(f"error must be an array with a trailing vector axis; got shape {e.shape}")
    norm = np.linalg.norm(e, axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        c = np.where(norm > 0, thr / np.where(norm > 0, norm, 1.0), np.inf)
    fed = np.minimum(c, 1.0)
    kept = np.minimum(c, 1.0 - fed)
    return e * fed, e * kept + np.asarray(residual, dtype=float)


def simulate_canary_sums(runs, *, steps, sampling_prob, clip1, clip2, expected_batch_size,
                         noise_multiplier, canary_norm, include, update="paper", rng):
    """Sum over T steps of DiceSGD's released noisy sums along a huge-gradient canary's direction.

    The worst case of docs/dicesgd_dpsgdf.md, exact in one dimension: every other example has a
    zero gradient (so it contributes neither clipped gradient nor residual), the canary (present
    iff ``include``) is Poisson-sampled at rate q and has gradient norm G = ``canary_norm`` ≫ C1.
    Per step, in sum units: release ``y_t = clip(g_t, C1) + f_t + N(0, (σC1)²)`` with feedback
    ``f_t = clip(e_t, B̄·C2)`` and ``e_{t+1} = e_t − f_t + (g_t − clip(g_t, C1))`` (``update=
    "paper"``: dpkit's :class:`~dpkit.optim.ErrorFeedback`) or :func:`reference_error_update`
    (``update="reference"``). With plain SGD the final model moves by ``−η/B̄ · Σ_t y_t``, so the
    returned sum is the final-model statistic (the weakest adversary).

    Args:
        runs: number of independent runs ≥ 1.
        steps, sampling_prob, clip1, clip2, expected_batch_size, noise_multiplier: T, q, C1, C2
            (mean units), B̄, σ (noise std on the sum over C1) of the run.
        canary_norm: G > 0. include: whether the canary is in the dataset.
        update: ``"paper"`` or ``"reference"``.
        rng: a ``numpy.random.Generator``.

    Returns:
        array (runs,) of Σ_t y_t.

    Raises:
        ValueError, TypeError: an argument out of range, named.
    """
    runs = V.positive_int("runs", runs)
    steps = V.positive_int("steps", steps)
    q = V.probability("sampling_prob", sampling_prob)
    c1 = V.positive("clip1", clip1)
    thr = reference_error_ratio(c1, clip2, expected_batch_size) * c1
    sigma = V.non_negative("noise_multiplier", noise_multiplier)
    big = V.positive("canary_norm", canary_norm)
    V.one_of("update", update, ("paper", "reference"))
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator; got {type(rng).__name__}")
    e = np.zeros((runs, 1))
    total = np.zeros(runs)
    for _ in range(steps):
        g = big * (rng.random(runs) < q) if include else np.zeros(runs)
        clipped = np.minimum(g, c1)
        residual = (g - clipped)[:, None]
        if update == "paper":
            fed = np.sign(e) * np.minimum(np.abs(e), thr)
            e = e - fed + residual
        else:
            fed, e = reference_error_update(e, residual, threshold=thr)
        total += clipped + fed[:, 0] + sigma * c1 * rng.standard_normal(runs)
    return total
