"""Exact (ε, δ) distance between two univariate Gaussians with possibly UNEQUAL variances.

The one-shot estimator (Andrew et al., ICLR 2024, Sec. 3) compares the null distribution of
canary cosines, N(μ0, s0²), with the fitted distribution of observed canaries, N(μ1, s1²). With
s0 ≠ s1 the privacy loss log p(x)/q(x) is QUADRATIC in x, so the set {x : p(x) > e^ε q(x)} is an
interval or the complement of one; its end points are the roots of a quadratic. The hockey-stick
divergence

    H_ε(P ‖ Q) = sup_S P(S) − e^ε Q(S) = P(A) − e^ε Q(A),   A = {x : log p(x) − log q(x) > ε},

is then a difference of Gaussian CDFs at those roots. (ε, δ)-indistinguishability needs BOTH
directions, so :func:`gaussian_pair_delta` returns max(H_ε(P‖Q), H_ε(Q‖P)) and
:func:`gaussian_pair_epsilon` inverts it. Everything is vectorised over the parameters so that a
confidence region can be searched in one call.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr

from dpkit import _validate

_BISECTION_STEPS = 100  # halves the bracket to ~1e-30 of its width: float64 resolution


def _hockey_stick(eps, m1, s1, m2, s2):
    """H_ε(N(m1, s1²) ‖ N(m2, s2²)), vectorised; all arguments broadcast."""
    # log p − log q − ε = a·x² + b·x + c  (p = N(m1, s1²), q = N(m2, s2²))
    a = 0.5 / s2**2 - 0.5 / s1**2
    b = m1 / s1**2 - m2 / s2**2
    c = np.log(s2 / s1) - 0.5 * m1**2 / s1**2 + 0.5 * m2**2 / s2**2 - eps
    a, b, c, m1, s1, m2, s2, eps = np.broadcast_arrays(a, b, c, m1, s1, m2, s2, eps)

    p_mass = np.zeros(a.shape)
    q_mass = np.zeros(a.shape)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # quadratic case: roots by the cancellation-free formula
        disc = b * b - 4.0 * a * c
        sqrt_disc = np.sqrt(np.maximum(disc, 0.0))
        qq = -0.5 * (b + np.where(b >= 0, 1.0, -1.0) * sqrt_disc)
        r1, r2 = qq / a, c / qq
        lo, hi = np.minimum(r1, r2), np.maximum(r1, r2)
        quad = a != 0
        real = quad & (disc > 0)
        # a > 0: A = (−∞, lo) ∪ (hi, ∞) (all of R when there is no real root)
        outside = real & (a > 0)
        p_mass = np.where(outside, ndtr((lo - m1) / s1) + ndtr((m1 - hi) / s1), p_mass)
        q_mass = np.where(outside, ndtr((lo - m2) / s2) + ndtr((m2 - hi) / s2), q_mass)
        everywhere = quad & ~real & (a > 0)
        p_mass = np.where(everywhere, 1.0, p_mass)
        q_mass = np.where(everywhere, 1.0, q_mass)
        # a < 0: A = (lo, hi) (empty when there is no real root: masses stay 0)
        inside = real & (a < 0)
        p_mass = np.where(inside, ndtr((hi - m1) / s1) - ndtr((lo - m1) / s1), p_mass)
        q_mass = np.where(inside, ndtr((hi - m2) / s2) - ndtr((lo - m2) / s2), q_mass)
        # a == 0 (equal variances): A = {b·x + c > 0}, a half line
        x0 = -c / b
        right = ~quad & (b > 0)
        p_mass = np.where(right, ndtr((m1 - x0) / s1), p_mass)
        q_mass = np.where(right, ndtr((m2 - x0) / s2), q_mass)
        left = ~quad & (b < 0)
        p_mass = np.where(left, ndtr((x0 - m1) / s1), p_mass)
        q_mass = np.where(left, ndtr((x0 - m2) / s2), q_mass)
        flat = ~quad & (b == 0) & (c > 0)
        p_mass = np.where(flat, 1.0, p_mass)
        q_mass = np.where(flat, 1.0, q_mass)
        # e^ε·0 must stay 0 when ε is huge
        value = p_mass - np.where(q_mass > 0, np.exp(eps) * q_mass, 0.0)
    return np.maximum(value, 0.0)


def _check_pair(mean0, std0, mean1, std1):
    for name, value in (("mean0", mean0), ("mean1", mean1)):
        if not np.all(np.isfinite(np.asarray(value, dtype=float))):
            raise ValueError(f"{name} must be finite; got {value!r}")
    for name, value in (("std0", std0), ("std1", std1)):
        arr = np.asarray(value, dtype=float)
        if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
            raise ValueError(f"{name} must be finite and > 0; got {value!r}")
    return (np.asarray(mean0, dtype=float), np.asarray(std0, dtype=float),
            np.asarray(mean1, dtype=float), np.asarray(std1, dtype=float))


def gaussian_pair_delta(epsilon, mean0, std0, mean1, std1):
    """Smallest δ such that N(mean0, std0²) and N(mean1, std1²) are (ε, δ)-indistinguishable.

    Computes max(H_ε(P‖Q), H_ε(Q‖P)) exactly from the roots of the quadratic privacy loss
    (Andrew et al., ICLR 2024, "One-shot Empirical Privacy Estimation for Federated Learning",
    Sec. 3: ε between the null and the fitted canary Gaussian). With equal variances this is the
    analytic Gaussian mechanism curve of Balle & Wang (ICML 2018, Thm. 8).

    Args:
        epsilon: ε ≥ 0 (scalar or array; broadcasts with the other arguments).
        mean0, std0: mean and standard deviation (> 0) of the first Gaussian.
        mean1, std1: mean and standard deviation (> 0) of the second Gaussian.

    Returns:
        δ as a float (scalar inputs) or an ndarray.

    Raises:
        ValueError: ε negative or non-finite, a mean non-finite, a std not > 0.
    """
    eps = np.asarray(epsilon, dtype=float)
    if not np.all(np.isfinite(eps)) or np.any(eps < 0):
        raise ValueError(f"epsilon must be finite and >= 0; got {epsilon!r}")
    m0, s0, m1, s1 = _check_pair(mean0, std0, mean1, std1)
    out = np.maximum(_hockey_stick(eps, m0, s0, m1, s1), _hockey_stick(eps, m1, s1, m0, s0))
    return float(out) if out.ndim == 0 else out


def gaussian_pair_epsilon(delta, mean0, std0, mean1, std1):
    """Smallest ε ≥ 0 with max(H_ε(P‖Q), H_ε(Q‖P)) ≤ δ for P = N(mean0, std0²), Q = N(mean1, std1²).

    δ(ε) is non-increasing in ε, so ε is found by bisection (vectorised) after doubling an upper
    bracket; the returned ε is the upper end of the final bracket, so δ(ε) ≤ δ always holds.

    Args:
        delta: target δ in (0, 1).
        mean0, std0, mean1, std1: the two Gaussians (arrays broadcast).

    Returns:
        ε as a float (scalar inputs) or an ndarray.

    Raises:
        ValueError: δ outside (0, 1), a mean non-finite, a std not > 0.
    """
    delta = _validate.delta("delta", delta)
    m0, s0, m1, s1 = _check_pair(mean0, std0, mean1, std1)
    m0, s0, m1, s1 = np.broadcast_arrays(m0, s0, m1, s1)

    def excess(eps):  # boolean ndarray, also for 0-d inputs
        return np.maximum(_hockey_stick(eps, m0, s0, m1, s1),
                          _hockey_stick(eps, m1, s1, m0, s0)) > delta

    lo = np.zeros(m0.shape)
    hi = np.ones(m0.shape)
    need = excess(hi)
    while np.any(need):  # δ(ε) → 0 as ε → ∞, so this ends
        lo = np.where(need, hi, lo)
        hi = np.where(need, 2.0 * hi, hi)
        need = excess(hi)
    done = np.logical_not(excess(np.zeros(m0.shape)))  # already (0, δ)-close
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        bad = excess(mid)
        lo = np.where(bad, mid, lo)
        hi = np.where(bad, hi, mid)
        if np.all(hi - lo <= 1e-12 * np.maximum(hi, 1.0)):
            break
    out = np.where(done, 0.0, hi)
    return float(out) if out.ndim == 0 else out
