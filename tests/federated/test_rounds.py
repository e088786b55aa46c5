"""DP-FTRL / BandMF across rounds: the server's noise is the dense matrix product, ε is the analysis
called directly (dp_accounting for amplified BandMF), mismatches and over-long runs are refused."""

import math

import numpy as np
import pytest
import torch
from dp_accounting.pld import privacy_loss_distribution as pld_lib

from dpkit.accountants.mmcc import MatrixMechanismAccountant, gaussian_epsilon, mmcc_epsilon
from dpkit.federated import CorrelatedRounds, DPFedAvg, FederatedSimulation
from dpkit.mechanisms.matrix import Participation, banded, binary_tree, sensitivity
from dpkit.mechanisms.matrix.streaming import counter_normal
from tests.federated.helpers import tiny_data

pytestmark = pytest.mark.filterwarnings("ignore::dpkit.errors.SeededRandomnessWarning")

DIM, Z, S = 4, 1.5, 2.0


def _noise_only_run(rounds, num_clients=10, q=0.5):
    """σ > 0, no client reports: params_t − params_{t−1} is the round's noise / (q·M) (FedAvg, lr 1)."""
    server = DPFedAvg([torch.zeros(DIM, dtype=torch.float64)], num_clients=num_clients, sampling_rate=q,
                      noise_multiplier=Z, clip_norm=S, seed=3, correlated=rounds)
    steps = []
    for _ in range(rounds.rounds):
        before = server.params[0].clone()
        server.sample_cohort()
        server.aggregate({})
        steps.append((server.params[0] - before).numpy())
    return server, np.stack(steps)


def _z_rows(seed, keys):
    like = torch.zeros(DIM, dtype=torch.float64)
    return np.stack([counter_normal(seed, k, 0, like, torch.float64).numpy() for k in keys])


def test_banded_noise_is_dense_inverse_product_and_epsilon_is_dp_sgd_over_bands():
    strategy = banded(8, 2)
    server, steps = _noise_only_run(CorrelatedRounds(strategy, participation="cyclic", num_groups=2))
    C = strategy.encoder()
    sens = float(np.linalg.norm(C, axis=0).max())
    Zm = _z_rows(server._correlated_noise.seed, range(8))
    expected = Z * S * sens * np.linalg.solve(C, Zm) / server.expected_cohort
    np.testing.assert_allclose(steps, expected, rtol=1e-10, atol=1e-12)
    assert server.expected_cohort == pytest.approx(0.5 * 10 / 2)
    # amplified BandMF (NeurIPS 2023, Thm 4): DP-SGD, ceil(n/b) = 4 rounds at rate q, σ/sens
    ref = pld_lib.from_gaussian_mechanism(Z, sampling_prob=0.5, value_discretization_interval=1e-4)
    assert server.epsilon(1e-5) == pytest.approx(ref.self_compose(4).get_epsilon_for_delta(1e-5), rel=1e-9)


def test_cyclic_cohorts_come_from_fixed_groups():
    rounds = CorrelatedRounds(banded(6, 3), participation="cyclic", num_groups=3)
    server = DPFedAvg([torch.zeros(2)], num_clients=30, sampling_rate=1.0, noise_multiplier=1.0, clip_norm=1.0,
                      correlated=rounds)
    cohorts = []
    for _ in range(6):
        cohorts.append(set(server.sample_cohort()))
        server.aggregate({})
    for t in range(3):   # q = 1: round t and t + 3 serve the same whole group; groups partition the users
        assert cohorts[t] == cohorts[t + 3] and len(cohorts[t]) == 10
    assert set().union(*cohorts[:3]) == set(range(30))


def test_tree_noise_and_unamplified_epsilon_with_every_round_sensitivity():
    strategy = binary_tree(8)
    server, steps = _noise_only_run(CorrelatedRounds(strategy))
    every_round = sensitivity(strategy.encoder(), Participation.min_separation(1, 8))
    assert server._correlated_noise.sensitivity == pytest.approx(every_round)
    keys = [strategy.node_key(t, lvl) for t, lvl in strategy.nodes]
    expected = Z * S * every_round * strategy.noise_operator() @ _z_rows(server._correlated_noise.seed, keys)
    np.testing.assert_allclose(steps, expected / server.expected_cohort, rtol=1e-10, atol=1e-12)
    assert server.accountant.method == "unamplified"
    assert server.epsilon(1e-5) == pytest.approx(gaussian_epsilon(1 / Z, 1e-5))


def test_poisson_banded_uses_mmcc_on_the_rounds_run_so_far():
    strategy = banded(5, 2)
    server, _ = _noise_only_run(CorrelatedRounds(strategy))
    C = strategy.encoder()
    sens = float(np.linalg.norm(C, axis=0).max())
    assert server.accountant.method == "mmcc"
    assert server.epsilon(1e-5) == pytest.approx(
        mmcc_epsilon(C / sens, noise_multiplier=Z, sampling_prob=0.5, delta=1e-5), rel=1e-9)


def test_refusals():
    rounds = CorrelatedRounds(banded(3, 2), participation="cyclic", num_groups=2)
    server = DPFedAvg([torch.zeros(2)], num_clients=4, sampling_rate=0.5, noise_multiplier=1.0, clip_norm=1.0,
                      correlated=rounds)
    for _ in range(3):
        server.aggregate({})
    with pytest.raises(ValueError, match="past the 3 rounds"):
        server.aggregate({})
    assert server.round == 3 and server.accountant.steps == 3
    with pytest.raises(ValueError, match="num_groups must be given"):
        CorrelatedRounds(banded(4, 2), participation="cyclic")
    with pytest.raises(ValueError, match="participation"):
        CorrelatedRounds(banded(4, 2), participation="shuffled")
    with pytest.raises(TypeError, match="strategy"):
        CorrelatedRounds(np.eye(3))
    from dpkit.federated import AdaptiveClipping
    with pytest.raises(ValueError, match="adaptive_clipping"):
        DPFedAvg([torch.zeros(2)], num_clients=4, sampling_rate=0.5, noise_multiplier=1.0, clip_norm=1.0,
                 correlated=CorrelatedRounds(banded(4, 2)), adaptive_clipping=AdaptiveClipping())
    with pytest.raises(ValueError, match="noise_multiplier must be > 0"):
        DPFedAvg([torch.zeros(2)], num_clients=4, sampling_rate=0.5, noise_multiplier=0.0, clip_norm=1.0,
                 correlated=CorrelatedRounds(banded(4, 2)))
    # an accountant describing another mechanism: MMCC for cyclic groups, or a too-small sensitivity
    C = banded(4, 2).encoder()
    with pytest.raises(ValueError, match="mmcc"):
        DPFedAvg([torch.zeros(2)], num_clients=4, sampling_rate=0.5, noise_multiplier=1.0, clip_norm=1.0,
                 correlated=CorrelatedRounds(banded(4, 2), participation="cyclic", num_groups=2),
                 accountant=MatrixMechanismAccountant(C, noise_multiplier=1.0, sampling_prob=0.5, method="mmcc"))
    tree = binary_tree(4)
    with pytest.raises(ValueError, match="sensitivity"):
        DPFedAvg([torch.zeros(2)], num_clients=4, sampling_rate=0.5, noise_multiplier=1.0, clip_norm=1.0,
                 correlated=CorrelatedRounds(tree, participation="cyclic", num_groups=2),
                 accountant=MatrixMechanismAccountant(tree.encoder(), noise_multiplier=1.0, sampling_prob=0.5,
                                                      method="unamplified", sensitivity=1.0))


def test_simulation_resume_continues_the_noise_stream():
    data = tiny_data(num_clients=6, seed=1)

    def build():
        torch.manual_seed(0)
        return FederatedSimulation(torch.nn.Linear(5, 3), data, client_optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                                   sampling_rate=0.5, noise_multiplier=1.0, clip_norm=0.5, seed=7, progress=False, epsilon_every=100,
                                   correlated=CorrelatedRounds(banded(6, 2), participation="cyclic", num_groups=2))
    whole = build()
    whole.run(6)
    first = build()
    first.run(3)
    resumed = build()
    resumed.load_state_dict(first.state_dict())
    resumed.run(3)
    for a, b in zip(whole.server.params, resumed.server.params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert resumed.epsilon() == whole.epsilon() and math.isfinite(whole.epsilon())
