"""Weighted averaging by example count: public normaliser (exact formula), private normaliser
(released weight total has the accounted noise: a KS test; ε is DP-SGD's at the joint z)."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from dpkit.accountants import dpsgd_event
from dpkit.federated import DPFedAvg, ExampleWeighting, FederatedSimulation, total_weight
from tests.federated.helpers import tiny_data

pytestmark = pytest.mark.filterwarnings("ignore::dpkit.errors.SeededRandomnessWarning")


def test_public_normaliser_is_the_fixed_denominator_estimator():
    counts = [1, 4, 9, 20]
    W = total_weight(counts, cap=8)
    assert W == pytest.approx(1 / 8 + 4 / 8 + 1 + 1)
    server = DPFedAvg([torch.zeros(3, dtype=torch.float64)], num_clients=4, sampling_rate=1.0, noise_multiplier=0.0,
                      clip_norm=1e9, seed=0, weighting=ExampleWeighting(8, total_weight=W))
    deltas = {k: [torch.full((3,), float(k + 1), dtype=torch.float64)] for k in range(4)}
    info = server.aggregate(deltas, dict(enumerate(counts)))
    expected = sum(min(n / 8, 1) * (k + 1) for k, n in enumerate(counts)) / (1.0 * W)   # Σ w_k Δ_k / (q·W)
    np.testing.assert_allclose(server.params[0].numpy(), expected, rtol=1e-12)
    assert info["normaliser"] == pytest.approx(W)
    assert server.accountant.ledger == [(dpsgd_event(0.0, 1.0), 1)] or server.epsilon(1e-5) == math.inf


def test_private_normaliser_noise_and_joint_account():
    z, sw, rounds = 1.0, 3.0, 400
    weighting = ExampleWeighting(4, weight_stddev=sw, min_denominator=1e-6)
    server = DPFedAvg([torch.zeros(1, dtype=torch.float64)], num_clients=20, sampling_rate=1.0, noise_multiplier=z,
                      clip_norm=1.0, seed=5, weighting=weighting)
    assert server.update_noise_multiplier == pytest.approx((z ** -2 - sw ** -2) ** -0.5)
    counts = {k: 8 for k in range(17)} | {17: 1, 18: 2, 19: 0}   # total weight 17 + 1/4 + 1/2 = 17.75
    released = []
    for _ in range(rounds):
        info = server.aggregate({k: [torch.zeros(1, dtype=torch.float64)] for k in counts}, counts)
        released.append(info["normaliser"])
    # min_denominator is ~6σ_w below: the released normaliser is Σ w_k + N(0, σ_w²)
    assert stats.kstest((np.array(released) - 17.75) / sw, "norm").pvalue > 1e-3
    assert stats.kstest((np.array(released) - 17.75) / (0.7 * sw), "norm").pvalue < 1e-3   # the test has power
    assert server.accountant.ledger == [(dpsgd_event(z, 1.0), rounds)]


def test_simulation_passes_example_counts():
    data = tiny_data(num_clients=4, seed=3, sizes=[1, 2, 3, 8])
    torch.manual_seed(0)
    sim = FederatedSimulation(torch.nn.Linear(5, 3), data, client_optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                              sampling_rate=1.0, noise_multiplier=0.0, clip_norm=1e9, seed=1, progress=False,
                              weighting=ExampleWeighting(4, total_weight=total_weight([1, 2, 3, 8], 4)))
    rec = sim.run_round()
    assert rec["normaliser"] == pytest.approx(0.25 + 0.5 + 0.75 + 1)


def test_weighting_refusals():
    with pytest.raises(ValueError, match="exactly one"):
        ExampleWeighting(4)
    with pytest.raises(ValueError, match="min_denominator"):
        ExampleWeighting(4, weight_stddev=2.0)
    with pytest.raises(ValueError, match="cap"):
        ExampleWeighting(0, total_weight=1.0)
    w = ExampleWeighting(4, weight_stddev=0.5, min_denominator=1.0)
    with pytest.raises(ValueError, match="weight_stddev must be > noise_multiplier"):
        DPFedAvg([torch.zeros(1)], num_clients=2, sampling_rate=1.0, noise_multiplier=1.0, clip_norm=1.0, weighting=w)
    server = DPFedAvg([torch.zeros(1)], num_clients=2, sampling_rate=1.0, noise_multiplier=1.0, clip_norm=1.0,
                      weighting=ExampleWeighting(4, total_weight=2.0))
    with pytest.raises(TypeError, match="num_examples"):
        server.aggregate({0: [torch.zeros(1)]})
    with pytest.raises(ValueError, match=r"num_examples\[0\]"):
        server.aggregate({0: [torch.zeros(1)]}, {0: -1})
    with pytest.raises(ValueError, match="missing"):
        server.aggregate({0: [torch.zeros(1)]}, {1: 3})
    assert server.round == 0 and server.accountant.ledger == []
    plain = DPFedAvg([torch.zeros(1)], num_clients=2, sampling_rate=1.0, noise_multiplier=1.0, clip_norm=1.0)
    with pytest.raises(ValueError, match="only used with weighting"):
        plain.aggregate({0: [torch.zeros(1)]}, {0: 3})
