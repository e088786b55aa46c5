"""One-shot empirical privacy estimation from canary statistics.

Andrew, Kairouz, Oh, Oprea, McMahan, Suriyakumar, ICLR 2024, "One-shot Empirical Privacy
Estimation for Federated Learning", Sec. 3 (method) and Thm. 3.1/3.2 (consistency for the Gaussian
mechanism as d → ∞). The observed canaries' statistics are fitted by N(μ̂, σ̂²); the null is
N(0, 1/d) (final-model cosines of canaries that were never inserted) or a Gaussian fitted to the
statistics of unseen canaries (needed for the all-iterates threat model, whose max-over-rounds
null is not centred). ε̂ is the exact (ε, δ) distance between the two Gaussians
(:func:`dpkit.audit.gaussian_pair_epsilon`, unequal variances handled exactly).

Confidence interval (dpkit's choice; the paper reports point estimates): a percentile bootstrap
that resamples the observed canaries (and the unseen ones when they define the null) and recomputes
ε̂. ``epsilon_lower`` is the (1 − confidence) quantile. It is a statistical statement about the
estimator, valid asymptotically in the number of canaries, not a worst-case guarantee: the audit
calls a claim violated only when this lower end exceeds the claimed ε.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from dpkit import _validate
from dpkit.audit.gaussians import gaussian_pair_epsilon

_MIN_CANARIES = 2


@dataclass(frozen=True)
class OneShotEstimate:
    """Result of :func:`one_shot_epsilon`.

    Attributes:
        epsilon: point estimate ε̂.
        epsilon_lower, epsilon_upper: bootstrap percentile interval at ``confidence``.
        confidence: level of each one-sided bound (lower and upper separately).
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


def _fit(samples: np.ndarray, axis=-1):
    # ddof=1: unbiased variance; a zero spread would make the privacy loss degenerate
    return samples.mean(axis=axis), samples.std(axis=axis, ddof=1)


def one_shot_epsilon(canary_scores, *, delta, null_scores=None, dim=None, confidence=0.95,
                     num_bootstrap=1000, seed=0) -> OneShotEstimate:
    """Estimate ε from one run's canary statistics (Andrew et al., ICLR 2024, Sec. 3).

    Args:
        canary_scores: 1-D array, the statistic (cosine or max-over-rounds cosine) of each
            inserted canary; at least 2.
        delta: δ in (0, 1) at which to report ε.
        null_scores: statistics of canaries that were never inserted; used to fit the null
            Gaussian (mean and std) when ``dim`` is not given.
        dim: model dimension d; when given the null is N(0, 1/d) exactly (final-model cosines).
        confidence: level in (0, 1) of the one-sided bootstrap bounds.
        num_bootstrap: bootstrap resamples (≥ 100); 0 disables the interval (bounds = ε̂).
        seed: seed of the bootstrap resampling.

    Returns:
        :class:`OneShotEstimate`.

    Raises:
        ValueError: too few or non-finite scores, neither ``dim`` nor ``null_scores``, a zero
            spread in the scores, bad δ / confidence / num_bootstrap.
        TypeError: non-integer ``dim``, ``num_bootstrap`` or ``seed``.
    """
    delta = _validate.delta("delta", delta)
    confidence = _validate.probability("confidence", confidence, allow_one=False)
    num_bootstrap = _validate.positive_int("num_bootstrap", num_bootstrap, allow_zero=True)
    if 0 < num_bootstrap < 100:
        raise ValueError(f"num_bootstrap must be 0 or >= 100; got {num_bootstrap!r}")
    seed = _validate.positive_int("seed", seed, allow_zero=True)
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

    lower = upper = epsilon
    if num_bootstrap:
        rng = np.random.default_rng(seed)
        boot_mean, boot_std = _fit(obs[rng.integers(0, obs.size, (num_bootstrap, obs.size))])
        if null is None:
            boot_null_mean = np.full(num_bootstrap, null_mean)
            boot_null_std = np.full(num_bootstrap, null_std)
        else:
            boot_null_mean, boot_null_std = _fit(
                null[rng.integers(0, null.size, (num_bootstrap, null.size))])
        ok = (boot_std > 0) & (boot_null_std > 0)  # degenerate resamples carry no information
        eps_boot = gaussian_pair_epsilon(delta, boot_null_mean[ok], boot_null_std[ok],
                                         boot_mean[ok], boot_std[ok])
        lower = float(np.quantile(eps_boot, 1.0 - confidence))
        upper = float(np.quantile(eps_boot, confidence))
    return OneShotEstimate(
        epsilon=float(epsilon), epsilon_lower=lower, epsilon_upper=upper, confidence=confidence,
        delta=delta, mean=float(mean), std=float(std), null_mean=float(null_mean),
        null_std=float(null_std), num_canaries=int(obs.size),
        num_null=0 if null is None else int(null.size))
