"""One-shot empirical privacy estimation from canary statistics.

Andrew, Kairouz, Oh, Oprea, McMahan, Suriyakumar, ICLR 2024, "One-shot Empirical Privacy
Estimation for Federated Learning", Sec. 3 (method) and Thm. 3.1/3.2 (consistency for the Gaussian
mechanism as d → ∞). The observed canaries' statistics are fitted by N(μ̂, σ̂²); the null is
N(0, 1/d) (final-model cosines of canaries that were never inserted) or a Gaussian fitted to the
statistics of unseen canaries (needed for the all-iterates threat model, whose max-over-rounds
null is not centred). ε̂ is the exact (ε, δ) distance between the two Gaussians
(:func:`dpkit.audit.gaussian_pair_epsilon`, unequal variances handled exactly).

Confidence bounds (dpkit's addition; the paper reports point estimates). ε̂ is very sensitive to
σ̂/σ0 at small δ (a 5% spread mismatch alone is worth ε ≈ 0.7 at δ = 1e-5), and sampling noise in
σ̂ biases ε̂ UPWARD, so a percentile bootstrap of ε̂ inherits that bias and its lower end exceeds
the truth too often. Instead, under the model's own Gaussian assumption, each fitted parameter
gets an exact interval (Student-t for a mean, chi-square for a standard deviation), at level
1 − α/K for the K estimated parameters (Bonferroni; K = 2 with a known N(0, 1/d) null, K = 4 with
a fitted null), so the whole box holds the true parameters with probability ≥ 1 − α. ε depends only
on a = |μ1 − μ0|/σ0 (non-decreasing in a) and r = σ1/σ0 (not monotone: its minimum sits slightly
below r = 1), so ``epsilon_lower`` = min over r in the box's r-range (a fine grid plus r = 1) at the
box's smallest a, and ``epsilon_upper`` = max over the same grid at its largest a. The lower end is
a valid lower bound on the mechanism's ε at level ``confidence`` whenever the statistics are
Gaussian (the paper's model, exact for the Gaussian mechanism as d → ∞).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.special import chdtri, stdtrit

from dpkit import _validate
from dpkit.audit.gaussians import gaussian_pair_epsilon

_MIN_CANARIES = 2
_RATIO_GRID = 257  # points of the σ1/σ0 grid searched for the box's extreme ε


@dataclass(frozen=True)
class OneShotEstimate:
    """Result of :func:`one_shot_epsilon`.

    Attributes:
        epsilon: point estimate ε̂.
        epsilon_lower, epsilon_upper: extremes of ε over the confidence box (see module doc);
            ``epsilon_lower`` is a lower bound on ε at level ``confidence``.
        confidence: level of the confidence box.
        delta: the δ at which ε̂ is reported.
        mean, std: fitted N(μ̂, σ̂²) of the observed canaries.
        null_mean, null_std: the null Gaussian.
        num_canaries, num_null: sample sizes (num_null = 0 when the null came from ``dim``).
    """

    epsilon: float
    epsilon_lower: float
    epsilon_upper: float
    confidence: float
    delta: float
    mean: float
    std: float
    null_mean: float
    null_std: float
    num_canaries: int
    num_null: int

    def to_dict(self) -> dict:
        """Plain-``dict`` view (JSON-serialisable)."""
        return asdict(self)


def _scores(name: str, values, minimum: int) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1 or arr.size < minimum:
        raise ValueError(f"{name} must be a 1-D array of at least {minimum} values; "
                         f"got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    return arr


def _fit(samples: np.ndarray):
    # ddof=1: unbiased variance
    return float(samples.mean()), float(samples.std(ddof=1))


def _box(samples: np.ndarray, alpha: float):
    """Exact (1 − alpha) intervals for the mean (Student t) and std (chi-square) of a Gaussian."""
    n = samples.size
    mean, std = _fit(samples)
    half = stdtrit(n - 1, 1 - alpha / 2) * std / np.sqrt(n)
    chi_small, chi_large = chdtri(n - 1, 1 - alpha / 2), chdtri(n - 1, alpha / 2)
    return (mean - half, mean + half), (std * np.sqrt((n - 1) / chi_large),
                                        std * np.sqrt((n - 1) / chi_small))


def one_shot_epsilon(canary_scores, *, delta, null_scores=None, dim=None,
                     confidence=0.95) -> OneShotEstimate:
    """Estimate ε from one run's canary statistics (Andrew et al., ICLR 2024, Sec. 3).

    Args:
        canary_scores: 1-D array, the statistic (cosine or max-over-rounds cosine) of each
            inserted canary; at least 2.
        delta: δ in (0, 1) at which to report ε.
        null_scores: statistics of canaries that were never inserted; used to fit the null
            Gaussian (mean and std) when ``dim`` is not given.
        dim: model dimension d; when given the null is N(0, 1/d) exactly (final-model cosines).
        confidence: level in (0, 1) of the confidence box behind ``epsilon_lower``.

    Returns:
        :class:`OneShotEstimate`.

    Raises:
        ValueError: too few or non-finite scores, neither ``dim`` nor ``null_scores``, a zero
            spread in the scores, bad δ / confidence.
        TypeError: non-integer ``dim``.
    """
    delta = _validate.delta("delta", delta)
    confidence = _validate.probability("confidence", confidence, allow_one=False)
    obs = _scores("canary_scores", canary_scores, _MIN_CANARIES)
    if dim is not None:
        dim = _validate.positive_int("dim", dim)
        null = None
        null_mean, null_std = 0.0, 1.0 / np.sqrt(dim)
    elif null_scores is not None:
        null = _scores("null_scores", null_scores, _MIN_CANARIES)
        null_mean, null_std = _fit(null)
    else:
        raise ValueError("one of dim or null_scores must be given; got neither")
    mean, std = _fit(obs)
    if std == 0 or null_std == 0:
        raise ValueError("canary_scores and null_scores must not be constant (zero spread)")
    epsilon = gaussian_pair_epsilon(delta, null_mean, null_std, mean, std)

    # confidence box, Bonferroni over the estimated parameters
    alpha = (1.0 - confidence) / (2 if null is None else 4)
    (m1_lo, m1_hi), (s1_lo, s1_hi) = _box(obs, alpha)
    if null is None:
        (m0_lo, m0_hi), (s0_lo, s0_hi) = (null_mean, null_mean), (null_std, null_std)
    else:
        (m0_lo, m0_hi), (s0_lo, s0_hi) = _box(null, alpha)
    shift_lo, shift_hi = m1_lo - m0_hi, m1_hi - m0_lo
    a_lo = 0.0 if shift_lo <= 0 <= shift_hi else min(abs(shift_lo), abs(shift_hi)) / s0_hi
    a_hi = max(abs(shift_lo), abs(shift_hi)) / s0_lo
    r_lo, r_hi = s1_lo / s0_hi, s1_hi / s0_lo
    ratios = np.geomspace(r_lo, r_hi, _RATIO_GRID)
    if r_lo < 1.0 < r_hi:
        ratios = np.append(ratios, 1.0)
    lower = float(np.min(gaussian_pair_epsilon(delta, 0.0, 1.0, a_lo, ratios)))
    upper = float(np.max(gaussian_pair_epsilon(delta, 0.0, 1.0, a_hi, ratios)))
    return OneShotEstimate(
        epsilon=float(epsilon), epsilon_lower=min(lower, float(epsilon)),
        epsilon_upper=max(upper, float(epsilon)), confidence=confidence, delta=delta,
        mean=mean, std=std, null_mean=float(null_mean), null_std=float(null_std),
        num_canaries=int(obs.size), num_null=0 if null is None else int(null.size))
