"""Closed-form Bayes-security bounds for DP-SGD against record-level inference.

Cherubin, Köpf, Paverd, Tople, Wutschitz, Zanella-Béguelin, USENIX Security 2024, "Closed-Form
Bounds for DP-SGD against Record-level Inference". Bayes security β* = 1 − max advantage
(advantage = total-variation distance between the two worlds the attacker must tell apart).
Replacing each step's Poisson mixture (1 − p)·N(0, σ²C²) + p·N(g, σ²C²) by the Gaussian
N(p·g, σ²C²) turns T steps into one Gaussian shift of norm p·‖R‖₂, R_t the per-step distance
between the two worlds' clipped gradients, so (Thm. 5 / Cor. 7 and the attribute-inference
corollary):

    β* ≈ 1 − erf(p·‖R‖₂ / (2√2·σ·C)).

Membership inference: R_t = 2C (substitution: g vs −g) gives 1 − erf(p√T/(√2σ)); R_t = C (add/
remove: g vs nothing) gives 1 − erf(p√T/(2√2σ)).

This "approximate" value is NOT a bound: for small σ or large p·T the true advantage can exceed
it (tests/audit show it on a grid against dp_accounting). The paper's Proposition 4 bounds the
total-variation error of the Gaussian approximation of ONE world over T steps by
√(T·p(1 − p))/(2σ) (gradient norm ≤ C). By the triangle inequality for total variation the
advantage is at most the approximate advantage plus that error for each world that is a Poisson
mixture: once for add/remove (the "absent" world is exactly N(0, σ²C²)), twice for substitution
and attribute inference. The "strict" value uses exactly this and is a valid lower bound on β*
(upper bound on the advantage); it is loose, often vacuous, when p·T is large relative to σ².
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from dpkit import _validate

RELATIONS = ("add_remove", "substitution")


def _dpsgd_args(noise_multiplier, sampling_rate, steps):
    return (_validate.positive("noise_multiplier", noise_multiplier),
            _validate.probability("sampling_rate", sampling_rate),
            _validate.positive_int("steps", steps))


def approximation_error(noise_multiplier, sampling_rate, steps) -> float:
    """Total-variation error of the Gaussian approximation of one DP-SGD world over T steps.

    Cherubin et al. (USENIX Security 2024), Proposition 4, for gradients of norm ≤ C:
    √(T·p(1 − p)) / (2σ). Zero without subsampling (p = 1), where the approximation is exact.

    Args:
        noise_multiplier: σ > 0 (noise std / clip norm).
        sampling_rate: Poisson rate p in (0, 1].
        steps: T ≥ 1.

    Returns:
        The error term (may exceed 1: then every strict bound is vacuous).

    Raises:
        ValueError/TypeError: invalid arguments (message names the argument).
    """
    sigma, p, steps = _dpsgd_args(noise_multiplier, sampling_rate, steps)
    return math.sqrt(steps * p * (1.0 - p)) / (2.0 * sigma)


def _beta_from_shift(shift_over_noise: float) -> float:
    # TV(N(0, 1), N(s, 1)) = erf(s / (2√2)) for a shift of s noise standard deviations
    return 1.0 - math.erf(shift_over_noise / (2.0 * math.sqrt(2.0)))


def bayes_security_mia(noise_multiplier, sampling_rate, steps, *, relation="add_remove",
                       strict=False) -> float:
    """Bayes security β* of DP-SGD against membership inference (Cherubin et al., Cor. 7).

    Args:
        noise_multiplier: σ > 0.
        sampling_rate: Poisson rate p in (0, 1].
        steps: T ≥ 1.
        relation: ``"add_remove"`` (member vs absent; R_t = C) or ``"substitution"`` (two
            candidate records; R_t = 2C).
        strict: subtract the Proposition-4 approximation error (once for add/remove, twice for
            substitution) so the result is a valid lower bound on β*; clipped at 0.

    Returns:
        β* in [0, 1]; the maximal membership advantage is 1 − β*.

    Raises:
        ValueError/TypeError: invalid arguments.
    """
    sigma, p, steps = _dpsgd_args(noise_multiplier, sampling_rate, steps)
    _validate.one_of("relation", relation, RELATIONS)
    sensitivity = 1.0 if relation == "add_remove" else 2.0  # in units of C
    beta = _beta_from_shift(p * sensitivity * math.sqrt(steps) / sigma)
    if strict:
        worlds = 1 if relation == "add_remove" else 2
        beta -= worlds * approximation_error(sigma, p, steps)
    return min(max(beta, 0.0), 1.0)


def bayes_security_attribute(gradient_distances, noise_multiplier, sampling_rate, max_grad_norm,
                             *, strict=False) -> float:
    """Data-dependent Bayes security against attribute inference (Cherubin et al., Sec. 6).

    ``gradient_distances[t]`` is R_t: the largest distance, at step t, between the CLIPPED
    gradients of the target record completed with any two values of the sensitive attribute
    (so 0 ≤ R_t ≤ 2C). β* ≈ 1 − erf(p‖R‖₂ / (2√2·σ·C)).

    Args:
        gradient_distances: 1-D array of R_t, one per step (its length is T).
        noise_multiplier: σ > 0.
        sampling_rate: Poisson rate p in (0, 1].
        max_grad_norm: clip norm C > 0.
        strict: subtract twice the Proposition-4 error (both worlds are Poisson mixtures).

    Returns:
        β* in [0, 1].

    Raises:
        ValueError: R_t negative, non-finite or above 2C (clipped gradients cannot be farther
            apart); empty R; invalid σ, p, C.
    """
    sigma = _validate.positive("noise_multiplier", noise_multiplier)
    p = _validate.probability("sampling_rate", sampling_rate)
    clip = _validate.positive("max_grad_norm", max_grad_norm)
    dist = np.asarray(gradient_distances, dtype=float)
    if dist.ndim != 1 or dist.size == 0:
        raise ValueError(f"gradient_distances must be a non-empty 1-D array; got shape {dist.shape}")
    if not np.all(np.isfinite(dist)) or np.any(dist < 0) or np.any(dist > 2 * clip * (1 + 1e-9)):
        raise ValueError("gradient_distances must be finite and lie in [0, 2*max_grad_norm]; "
                         f"got min {dist.min()!r}, max {dist.max()!r}")
    beta = _beta_from_shift(p * float(np.linalg.norm(dist)) / (sigma * clip))
    if strict:
        beta -= 2 * approximation_error(sigma, p, dist.size)
    return min(max(beta, 0.0), 1.0)


@dataclass(frozen=True)
class RecordLevelRisk:
    """Membership-inference bounds for one relation (see :func:`record_level_risk`).

    Attributes:
        relation: ``"add_remove"`` or ``"substitution"``.
        bayes_security: approximate β* (not a bound).
        bayes_security_strict: strict lower bound on β*.
        advantage: 1 − bayes_security (approximate).
        advantage_strict: strict upper bound on the membership advantage.
        approximation_error: the Proposition-4 error per Poisson-mixture world.
    """

    relation: str
    bayes_security: float
    bayes_security_strict: float
    advantage: float
    advantage_strict: float
    approximation_error: float

    def to_dict(self) -> dict:
        """Plain-``dict`` view (JSON-serialisable)."""
        return asdict(self)


def record_level_risk(noise_multiplier, sampling_rate, steps, *, relation="add_remove"):
    """Approximate and strict membership-inference bounds of DP-SGD for one relation.

    Args:
        noise_multiplier: σ > 0.
        sampling_rate: Poisson rate p in (0, 1].
        steps: T ≥ 1.
        relation: ``"add_remove"`` or ``"substitution"``.

    Returns:
        :class:`RecordLevelRisk`.

    Raises:
        ValueError/TypeError: invalid arguments.
    """
    approx = bayes_security_mia(noise_multiplier, sampling_rate, steps, relation=relation)
    strict = bayes_security_mia(noise_multiplier, sampling_rate, steps, relation=relation,
                                strict=True)
    return RecordLevelRisk(
        relation=relation, bayes_security=approx, bayes_security_strict=strict,
        advantage=1.0 - approx, advantage_strict=1.0 - strict,
        approximation_error=approximation_error(noise_multiplier, sampling_rate, steps))
