"""Exact privacy profile of the Gaussian mechanism / μ-GDP (closed form, no discretisation).

δ(ε) between N(μ, 1) and N(0, 1): Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2) (Balle & Wang, ICML 2018,
Thm. 8; Dong, Roth, Su, JRSS-B 2022, Cor. 2.13). A Gaussian release with noise multiplier σ has
μ = 1/σ, and n releases compose exactly to μ = sqrt(Σ n_i/σ_i²).
"""

from __future__ import annotations

import math

from scipy import optimize, special

__all__ = ["gaussian_delta", "gaussian_epsilon"]


def gaussian_delta(mu: float, epsilon: float) -> float:
    """δ(ε) of μ-GDP, computed with log Φ so that large ε does not overflow."""
    if mu == 0:
        return 0.0
    if math.isinf(mu):
        return 1.0
    a = special.ndtr(-epsilon / mu + mu / 2)
    b = math.exp(epsilon + special.log_ndtr(-epsilon / mu - mu / 2))
    return float(min(1.0, max(0.0, a - b)))


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Smallest ε ≥ 0 with δ(ε) ≤ ``delta`` for μ-GDP; never below the true root."""
    if mu == 0:
        return 0.0
    if math.isinf(mu):
        return math.inf
    if gaussian_delta(mu, 0.0) <= delta:
        return 0.0
    hi = max(1.0, mu)
    while gaussian_delta(mu, hi) > delta:
        hi *= 2.0
    eps = float(optimize.brentq(lambda e: gaussian_delta(mu, e) - delta, 0.0, hi, xtol=1e-12, rtol=1e-12))
    while gaussian_delta(mu, eps) > delta:  # brentq may stop just below the root: step up to a valid ε
        eps += 1e-12 * (1.0 + eps)
    return eps
