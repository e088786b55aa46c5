"""Independent references for accountant tests: numerical integration with scipy, no dpkit code."""

import math

from scipy import integrate, optimize, stats


def _hockey_stick(p_pdf, q_pdf, epsilon, lo, hi, points):
    """∫ max(0, p(x) − e^ε q(x)) dx by adaptive quadrature on [lo, hi] (mass outside is < 1e-30)."""
    f = lambda x: max(0.0, p_pdf(x) - math.exp(epsilon) * q_pdf(x))  # noqa: E731
    value, _ = integrate.quad(f, lo, hi, points=points, limit=500, epsabs=1e-14, epsrel=1e-10)
    return value


def subsampled_gaussian_delta(sigma, q, epsilon):
    """Exact δ(ε) of ONE Poisson-subsampled Gaussian step under add/remove (max of both directions)."""
    mix = lambda x: (1 - q) * stats.norm.pdf(x, 0, sigma) + q * stats.norm.pdf(x, 1, sigma)  # noqa: E731
    base = lambda x: stats.norm.pdf(x, 0, sigma)  # noqa: E731
    lo, hi = -40 * sigma, 1 + 40 * sigma
    pts = [0.0, 0.5, 1.0] + ([sigma**2 * math.log((math.exp(epsilon) - 1 + q) / q) + 0.5] if q < 1 else [])
    pts = [p for p in pts if lo < p < hi]
    return max(_hockey_stick(mix, base, epsilon, lo, hi, pts),
               _hockey_stick(base, mix, epsilon, lo, hi, pts))


def gaussian_delta(mu, epsilon):
    """δ(ε) between N(μ, 1) and N(0, 1) by numerical integration."""
    lo, hi = -40.0, mu + 40.0
    kink = epsilon / mu + mu / 2
    return _hockey_stick(lambda x: stats.norm.pdf(x, mu, 1), lambda x: stats.norm.pdf(x, 0, 1),
                         epsilon, lo, hi, [kink] if lo < kink < hi else None)


def epsilon_from_delta_curve(delta_of_eps, delta, hi=50.0):
    """Smallest ε with δ(ε) ≤ delta, by root finding on a decreasing curve."""
    if delta_of_eps(0.0) <= delta:
        return 0.0
    return optimize.brentq(lambda e: delta_of_eps(e) - delta, 0.0, hi, xtol=1e-10)


def laplace_delta(scale, epsilon):
    """Exact δ(ε) of the Laplace mechanism with sensitivity 1 and scale b (numerical integration)."""
    p = lambda x: stats.laplace.pdf(x, 0, scale)  # noqa: E731
    q = lambda x: stats.laplace.pdf(x, 1, scale)  # noqa: E731
    return _hockey_stick(p, q, epsilon, -60 * scale, 1 + 60 * scale, [0.0, 1.0])


__all__ = ["subsampled_gaussian_delta", "gaussian_delta", "epsilon_from_delta_curve", "laplace_delta"]
