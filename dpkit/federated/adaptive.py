"""Adaptive clipping by private geometric quantile estimation.

Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive Clipping",
NeurIPS 2021 (arXiv:1905.03871), Alg. 1 and Thm. 1:

* every sampled client reports b_i = 1[‖Δ_i‖ ≤ C_t]; the server releases the noisy CENTRED count
  Σ_i (b_i − ½) + N(0, σ_b²) — under add/remove of one user it moves by at most ½;
* the unclipped fraction is estimated with the PUBLIC expected cohort size m = q·M:
  b̄_t = ½ + (noisy centred count) / m (dpkit never divides by the realised, private cohort size);
* geometric update C_{t+1} = C_t · exp(−η_C (b̄_t − γ)), γ the target unclipped quantile;
* joint privacy (Thm. 1): releasing the update sum with noise z_Δ·C_t and the count with noise σ_b
  is ONE Gaussian mechanism with noise multiplier z = (z_Δ⁻² + (2σ_b)⁻²)^(−1/2) (rescale the count
  coordinate so both noises are equal; the sensitivity vector (C_t, ½) has norm C_t·√(1 + …)).
  To spend the same budget as fixed clipping with noise z, the update noise is raised to
  z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2), which needs σ_b > z/2. The accountant receives the event of z.
"""

from __future__ import annotations

import math

from dpkit import _validate


def update_noise_multiplier(noise_multiplier, count_stddev) -> float:
    """z_Δ, the update noise that makes the joint release have noise multiplier z (Thm. 1).

    Args:
        noise_multiplier: the joint (accounted) z ≥ 0; 0 gives 0 (no privacy claimed).
        count_stddev: σ_b > z/2, the std of the noise on the centred clipped count.

    Returns:
        z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) ≥ z.

    Raises:
        ValueError: σ_b ≤ z/2 (the count alone would already spend the whole budget).
    """
    z = _validate.non_negative("noise_multiplier", noise_multiplier)
    sb = _validate.positive("count_stddev", count_stddev)
    if z == 0:
        return 0.0
    if not sb > z / 2:
        raise ValueError(f"count_stddev must be > noise_multiplier / 2 = {z / 2}; got {sb!r} "
                         "(raise it, e.g. to the paper's expected cohort size / 20)")
    return (z ** -2 - (2 * sb) ** -2) ** -0.5


def joint_noise_multiplier(update_noise, count_stddev) -> float:
    """z = (z_Δ⁻² + (2σ_b)⁻²)^(−1/2): the noise multiplier of the joint release (Thm. 1)."""
    zd = _validate.non_negative("update_noise", update_noise)
    sb = _validate.positive("count_stddev", count_stddev)
    return 0.0 if zd == 0 else (zd ** -2 + (2 * sb) ** -2) ** -0.5


class AdaptiveClipping:
    """Settings and state of the private quantile estimate of the clip norm.

    Args:
        target_quantile: γ in (0, 1), the fraction of updates to leave unclipped (0.5: median).
        learning_rate: η_C > 0 of the geometric update (paper: 0.2).
        count_stddev: σ_b > 0, or None for the paper's default m/20 (m = expected cohort size).

    Raises:
        ValueError, TypeError: an argument out of range.
    """

    def __init__(self, target_quantile=0.5, learning_rate=0.2, count_stddev=None):
        self.target_quantile = _validate.probability("target_quantile", target_quantile, allow_one=False)
        self.learning_rate = _validate.positive("learning_rate", learning_rate)
        self.count_stddev = None if count_stddev is None else _validate.positive("count_stddev", count_stddev)

    def resolve_count_stddev(self, expected_cohort: float) -> float:
        """σ_b: the given value or the paper's default expected_cohort / 20."""
        return self.count_stddev if self.count_stddev is not None else expected_cohort / 20.0

    def next_clip(self, clip_norm: float, noisy_centred_count: float, expected_cohort: float):
        """(C_{t+1}, b̄_t) from the released noisy centred count (post-processing only)."""
        fraction = 0.5 + noisy_centred_count / expected_cohort
        return clip_norm * math.exp(-self.learning_rate * (fraction - self.target_quantile)), fraction

    def __repr__(self):
        return (f"AdaptiveClipping(target_quantile={self.target_quantile}, learning_rate={self.learning_rate}, "
                f"count_stddev={self.count_stddev})")
