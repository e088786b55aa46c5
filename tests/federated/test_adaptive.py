"""Adaptive clipping (Andrew et al., NeurIPS 2021): joint accounting, noise split, quantile tracking."""

import math

import numpy as np
import pytest
import torch
from dp_accounting import dp_event, pld
from scipy import integrate, stats

from dpkit.accountants import dpsgd_event
from dpkit.federated import AdaptiveClipping, DPFedAvg, joint_noise_multiplier, update_noise_multiplier

# explicit seeds below are test conveniences (they warn; see test_seeds_and_resume.py)
pytestmark = pytest.mark.filterwarnings("ignore::dpkit.errors.SeededRandomnessWarning")


def _two_dim_gaussian_delta(s1, s2, epsilon):
    """δ(ε) of N((1, ½), diag(s1², s2²)) vs N(0, same): quadrature over x of the exact inner y-integral.

    For fixed x the log-likelihood ratio is (2x−1)/(2s1²) + (y−¼)/(2s2²), increasing in y, so the
    region where p > e^ε q is y > y*(x) and the inner integral is a difference of normal tails.
    """
    def inner(x):
        y_star = 0.25 + 2 * s2 ** 2 * (epsilon - (2 * x - 1) / (2 * s1 ** 2))
        return (stats.norm.pdf(x, 1, s1) * stats.norm.sf(y_star, 0.5, s2)
                - math.exp(epsilon) * stats.norm.pdf(x, 0, s1) * stats.norm.sf(y_star, 0, s2))
    val, _ = integrate.quad(inner, -30 * s1, 1 + 30 * s1, limit=400, epsabs=1e-13, epsrel=1e-10)
    return val


def test_joint_release_is_the_gaussian_of_the_accounted_multiplier():
    """Thm. 1: update noise z_Δ (sensitivity 1) + count noise σ_b (sensitivity ½) ≡ Gaussian(z)."""
    z, sb = 0.9, 0.6
    zd = update_noise_multiplier(z, sb)
    assert zd > z
    for eps in (0.5, 1.5):
        ref = _two_dim_gaussian_delta(zd, sb, eps)
        acc = pld.PLDAccountant(value_discretization_interval=1e-4)
        acc.compose(dp_event.GaussianDpEvent(z))
        assert acc.get_delta(eps) == pytest.approx(ref, rel=5e-3, abs=1e-9)
    assert joint_noise_multiplier(zd, sb) == pytest.approx(z, rel=1e-12)


def test_adaptive_round_accounts_z_and_adds_the_raised_update_noise():
    d, m, z, c = 3000, 5, 1.2, 0.7
    ac = AdaptiveClipping(count_stddev=1.5)
    server = DPFedAvg([torch.zeros(d)], num_clients=m, sampling_rate=1.0, noise_multiplier=z, clip_norm=c,
                      adaptive_clipping=ac, seed=1)
    server.aggregate({k: [torch.zeros(d)] for k in range(m)})
    assert server.accountant.ledger == [(dpsgd_event(z, 1.0), 1)]
    # the update noise actually added: z_Δ·C on the sum, z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) > z
    zd = (z ** -2 - (2 * 1.5) ** -2) ** -0.5
    x = server.params[0].double().numpy() * m / (zd * c)
    chi2 = float(np.sum(x ** 2))
    assert stats.chi2.ppf(1e-4, d) < chi2 < stats.chi2.ppf(1 - 1e-4, d)


def test_adaptive_epsilon_equals_fixed_clipping_epsilon_at_same_z():
    kw = dict(num_clients=50, sampling_rate=0.2, noise_multiplier=0.9, clip_norm=1.0, seed=0)
    fixed = DPFedAvg([torch.zeros(3)], **kw)
    adaptive = DPFedAvg([torch.zeros(3)], adaptive_clipping=AdaptiveClipping(), **kw)
    for s in (fixed, adaptive):
        for _ in range(5):
            s.aggregate({k: [torch.ones(3)] for k in s.sample_cohort()})
    assert adaptive.epsilon(1e-5) == fixed.epsilon(1e-5)
    assert adaptive.count_stddev == pytest.approx(0.2 * 50 / 20)  # the paper's default m/20


def test_geometric_update_formula_with_noiseless_count():
    """q = 1 and a negligible count noise: b̄ is the true unclipped fraction; C ← C·exp(−η(b̄ − γ))."""
    ac = AdaptiveClipping(target_quantile=0.3, learning_rate=0.2, count_stddev=1e-9)
    server = DPFedAvg([torch.zeros(1)], num_clients=4, sampling_rate=1.0, noise_multiplier=0.0, clip_norm=2.0,
                      adaptive_clipping=ac, seed=0)
    updates = {k: [torch.tensor([v])] for k, v in enumerate([0.5, 1.0, 3.0, 5.0])}
    info = server.aggregate(updates)
    assert info["noisy_unclipped_fraction"] == pytest.approx(0.5, abs=1e-8)
    assert server.clip_norm == pytest.approx(2.0 * math.exp(-0.2 * (0.5 - 0.3)), rel=1e-8)


def test_clip_tracks_the_target_quantile():
    """Update norms uniform on [0, 10]: C settles near the γ-quantile 10γ (statistical, can fail)."""
    rng = np.random.default_rng(0)
    gamma = 0.7
    ac = AdaptiveClipping(target_quantile=gamma, learning_rate=0.2)
    server = DPFedAvg([torch.zeros(2)], num_clients=400, sampling_rate=0.25, noise_multiplier=1.0,
                      clip_norm=0.5, adaptive_clipping=ac, seed=0)
    clips = []
    for _ in range(120):
        ups = {}
        for k in server.sample_cohort():
            v = rng.normal(size=2)
            ups[k] = [torch.tensor(v / np.linalg.norm(v) * rng.uniform(0, 10), dtype=torch.float32)]
        server.aggregate(ups)
        clips.append(server.clip_norm)
    assert np.mean(clips[-40:]) == pytest.approx(10 * gamma, rel=0.1)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(target_quantile=1.0), ValueError, "target_quantile"),
    (dict(target_quantile=0.0), ValueError, "target_quantile"),
    (dict(learning_rate=0.0), ValueError, "learning_rate"),
    (dict(count_stddev=-1.0), ValueError, "count_stddev"),
    (dict(count_stddev="x"), TypeError, "count_stddev"),
])
def test_adaptive_invalid(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        AdaptiveClipping(**kwargs)


def test_count_noise_too_small_for_the_budget_is_refused():
    with pytest.raises(ValueError, match="count_stddev must be > noise_multiplier / 2"):
        update_noise_multiplier(2.0, 1.0)
    with pytest.raises(ValueError, match="count_stddev"):
        DPFedAvg([torch.zeros(1)], num_clients=20, sampling_rate=0.5, noise_multiplier=2.0, clip_norm=1.0,
                 adaptive_clipping=AdaptiveClipping())  # default σ_b = 10/20 = 0.5 ≤ z/2
