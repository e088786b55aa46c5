"""Two-Gaussian (ε, δ) distance vs independent references: Balle-Wang, dp_accounting, quadrature."""

import dp_accounting
import numpy as np
import pytest
from scipy import integrate
from scipy.stats import norm

from dpkit.audit import gaussian_pair_delta, gaussian_pair_epsilon


def balle_wang_delta(eps, sensitivity, sigma):
    """Analytic Gaussian mechanism δ(ε) (Balle & Wang, ICML 2018, Thm. 8)."""
    a = sensitivity / (2 * sigma)
    b = eps * sigma / sensitivity
    return norm.cdf(a - b) - np.exp(eps) * norm.cdf(-a - b)


def quadrature_delta(eps, m0, s0, m1, s1):
    """max of both hockey-stick divergences by adaptive quadrature on a fine partition."""
    edges = np.linspace(min(m0 - 14 * s0, m1 - 14 * s1), max(m0 + 14 * s0, m1 + 14 * s1), 81)

    def hs(ma, sa, mb, sb):
        f = lambda x: max(norm.pdf(x, ma, sa) - np.exp(eps) * norm.pdf(x, mb, sb), 0.0)
        return sum(integrate.quad(f, lo, hi, epsabs=1e-13)[0] for lo, hi in zip(edges, edges[1:]))

    return max(hs(m0, s0, m1, s1), hs(m1, s1, m0, s0))


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("eps", [0.0, 0.3, 1.5, 4.0])
def test_equal_variance_is_the_gaussian_mechanism(sigma, eps):
    got = gaussian_pair_delta(eps, 0.0, sigma, 1.0, sigma)
    assert got == pytest.approx(balle_wang_delta(eps, 1.0, sigma), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("sigma", [0.6, 1.0, 2.0])
def test_equal_variance_epsilon_matches_dp_accounting(sigma):
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_accounting.GaussianDpEvent(sigma))
    reference = acc.get_epsilon(1e-5)
    got = gaussian_pair_epsilon(1e-5, 0.0, sigma, 1.0, sigma)
    # the PLD is pessimistic by its discretisation; both agree to ~1e-3
    assert got == pytest.approx(reference, abs=2e-3)
    assert got <= reference + 1e-9


@pytest.mark.parametrize("args", [
    (0.0, 0.0, 1.0, 1.0, 0.5),    # narrower alternative: privacy-loss region is an interval
    (0.5, 0.0, 1.0, 0.2, 2.0),    # wider alternative: complement of an interval
    (2.0, 0.0, 1.0, 3.0, 1.5),
    (1.0, 0.0, 0.01, 0.02, 0.011),  # cosine-like scales
    (0.0, 0.0, 1.0, 0.0, 2.0),    # same mean, different spread
])
def test_unequal_variances_match_quadrature(args):
    assert gaussian_pair_delta(*args) == pytest.approx(quadrature_delta(*args), rel=1e-6, abs=1e-10)


@pytest.mark.parametrize("args", [(1e-5, 0.0, 1.0, 1.0, 1.3), (1e-3, 0.0, 0.01, 0.015, 0.008),
                                  (1e-6, 0.0, 1.0, 2.0, 1.0)])
def test_epsilon_inverts_delta(args):
    target, *pair = args
    eps = gaussian_pair_epsilon(target, *pair)
    assert eps > 0
    assert quadrature_delta(eps, *pair) <= target * (1 + 1e-5)
    assert quadrature_delta(eps * (1 - 1e-3), *pair) > target


def test_identical_gaussians_give_zero_and_vectorises():
    assert gaussian_pair_epsilon(1e-5, 0.0, 1.0, 0.0, 1.0) == 0.0
    means = np.array([0.5, 1.0, 2.0])
    vec = gaussian_pair_epsilon(1e-5, 0.0, 1.0, means, 1.2)
    assert vec.shape == (3,)
    assert np.all(np.diff(vec) > 0)  # farther apart, larger ε
    for m, e in zip(means, vec):
        assert e == pytest.approx(gaussian_pair_epsilon(1e-5, 0.0, 1.0, m, 1.2))


@pytest.mark.parametrize("call, exc, name", [
    (lambda: gaussian_pair_delta(-1.0, 0, 1, 1, 1), ValueError, "epsilon"),
    (lambda: gaussian_pair_delta(np.inf, 0, 1, 1, 1), ValueError, "epsilon"),
    (lambda: gaussian_pair_delta(1.0, 0, 0.0, 1, 1), ValueError, "std0"),
    (lambda: gaussian_pair_delta(1.0, 0, 1, 1, -2.0), ValueError, "std1"),
    (lambda: gaussian_pair_delta(1.0, np.nan, 1, 1, 1), ValueError, "mean0"),
    (lambda: gaussian_pair_epsilon(0.0, 0, 1, 1, 1), ValueError, "delta"),
    (lambda: gaussian_pair_epsilon(1.0, 0, 1, 1, 1), ValueError, "delta"),
    (lambda: gaussian_pair_epsilon("x", 0, 1, 1, 1), TypeError, "delta"),
    (lambda: gaussian_pair_epsilon(1e-5, 0, 1, np.inf, 1), ValueError, "mean1"),
])
def test_invalid_inputs(call, exc, name):
    with pytest.raises(exc, match=name):
        call()
