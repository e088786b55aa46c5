"""Federated randomness: OS-entropy default seeds, warned explicit seeds, resume without replay.

Issue 13: the DP-FedAvg server, the simulator and the Flower strategy defaulted to seed=0, so
every default deployment's noise was public. A checkpoint must carry the run seed so that a
freshly built object continues the (seed, round)-keyed streams instead of starting new ones.
"""

import copy
import logging
import warnings

import numpy as np
import pytest
import torch

from dpkit.errors import SeededRandomnessWarning
from dpkit.federated import AdaptiveClipping, DPFedAvg, FederatedSimulation
from tests.federated.helpers import tiny_data

SETTINGS = dict(num_clients=64, sampling_rate=0.5, noise_multiplier=1.0, clip_norm=1.0)


def _params():
    return [torch.zeros(6, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)]


def _noise_only_rounds(server, rounds):
    """Run rounds in which every sampled client sends Δ = 0: the model moves by noise/(qM) only."""
    cohorts, moves = [], []
    for _ in range(rounds):
        before = torch.cat([p.reshape(-1) for p in server.params])
        cohort = server.sample_cohort()
        server.aggregate({k: [torch.zeros_like(p) for p in server.params] for k in cohort})
        cohorts.append(cohort)
        moves.append(torch.cat([p.reshape(-1) for p in server.params]) - before)
    return cohorts, moves


def test_default_servers_draw_different_cohorts_and_noise_and_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", SeededRandomnessWarning)
        a, b = DPFedAvg(_params(), **SETTINGS), DPFedAvg(_params(), **SETTINGS)
    assert a.seed != b.seed and 0 <= a.seed < 2**63
    (ca, ma), (cb, mb) = _noise_only_rounds(a, 2), _noise_only_rounds(b, 2)
    assert ca != cb
    for x, y in zip(ma, mb):
        assert not torch.allclose(x, y)


def test_default_simulations_draw_different_noise():
    data = tiny_data(num_clients=6)

    def final():
        torch.manual_seed(0)
        sim = FederatedSimulation(torch.nn.Linear(5, 3), data, client_optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                                  sampling_rate=1.0, noise_multiplier=1.0, clip_norm=1.0, progress=False)
        sim.run(1)
        return torch.cat([p.reshape(-1) for p in sim.server.params])

    with warnings.catch_warnings():
        warnings.simplefilter("error", SeededRandomnessWarning)
        assert not torch.allclose(final(), final())


def test_explicit_seed_warns_and_points_at_the_caller():
    with pytest.warns(SeededRandomnessWarning, match="seed=3") as record:
        DPFedAvg(_params(), seed=3, **SETTINGS)
    assert record[0].filename == __file__
    data = tiny_data(num_clients=4)
    with pytest.warns(SeededRandomnessWarning) as record:
        FederatedSimulation(torch.nn.Linear(5, 3), data, client_optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                            sampling_rate=0.5, noise_multiplier=1.0, clip_norm=1.0, seed=3, progress=False)
    assert record[0].filename == __file__


@pytest.mark.filterwarnings("ignore::dpkit.errors.SeededRandomnessWarning")
def test_secure_mode_and_seed_validation():
    with pytest.raises(ValueError, match="seed must be None with secure_mode"):
        DPFedAvg(_params(), seed=1, secure_mode=True, **SETTINGS)
    with pytest.raises(TypeError, match="seed must be an integer"):
        DPFedAvg(_params(), seed=1.5, **SETTINGS)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        DPFedAvg(_params(), seed=-1, **SETTINGS)
    server = DPFedAvg(_params(), **SETTINGS)
    with pytest.raises(ValueError, match="secure_mode"):
        server.load_state_dict(DPFedAvg(_params(), secure_mode=True, **SETTINGS).state_dict())
    state = server.state_dict()
    del state["seed"]
    with pytest.raises(ValueError, match="'seed'"):
        DPFedAvg(_params(), **SETTINGS).load_state_dict(state)
    with pytest.raises(ValueError, match="same settings to resume"):
        DPFedAvg(_params(), **{**SETTINGS, "sampling_rate": 0.25}).load_state_dict(server.state_dict())
    with pytest.raises(ValueError, match="same settings to resume"):
        DPFedAvg(_params()[:1], **SETTINGS).load_state_dict(server.state_dict())


def test_server_resume_continues_the_streams_and_does_not_replay(tmp_path):
    with pytest.warns(SeededRandomnessWarning):
        whole = DPFedAvg(_params(), seed=5, **SETTINGS)
    ref_cohorts, ref_moves = _noise_only_rounds(whole, 6)

    first = DPFedAvg(_params(), **SETTINGS)  # default: its own entropy seed
    first_cohorts, first_moves = _noise_only_rounds(first, 3)
    torch.save(first.state_dict(), tmp_path / "server.pt")
    resumed = DPFedAvg(_params(), **SETTINGS)  # a fresh object with ANOTHER entropy seed
    resumed.load_state_dict(torch.load(tmp_path / "server.pt"))
    assert resumed.seed == first.seed and resumed.round == 3
    later_cohorts, later_moves = _noise_only_rounds(resumed, 3)
    # the resumed rounds are rounds 3..5 of the run, not rounds 0..2 again
    assert later_cohorts != first_cohorts
    for early, late in zip(first_moves, later_moves):
        assert not torch.allclose(early, late)
    # and with the seed of `whole`, interrupted == uninterrupted, bit for bit
    with pytest.warns(SeededRandomnessWarning):
        a = DPFedAvg(_params(), seed=5, **SETTINGS)
    ca, ma = _noise_only_rounds(a, 3)
    torch.save(a.state_dict(), tmp_path / "a.pt")
    b = DPFedAvg(_params(), **SETTINGS)
    b.load_state_dict(torch.load(tmp_path / "a.pt"))
    cb, mb = _noise_only_rounds(b, 3)
    assert ca + cb == ref_cohorts
    for x, y in zip(ma + mb, ref_moves):
        assert torch.equal(x, y)
    assert b.accountant.ledger == whole.accountant.ledger
    assert b.epsilon(1e-5) == whole.epsilon(1e-5)


def _float64_sim(seed=None, num_canaries=4):
    data = tiny_data(num_clients=10, seed=3)
    data.clients[:] = [(x.double(), y) for x, y in data.clients]
    data.test = (data.test[0].double(), data.test[1])
    torch.manual_seed(4)
    model = torch.nn.Linear(5, 3).double()
    return FederatedSimulation(model, data, client_optimizer=lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.5),
                               sampling_rate=0.4, noise_multiplier=0.8, clip_norm=0.5, local_epochs=2,
                               local_batch_size=2, server_optimizer="fedadam",
                               adaptive_clipping=AdaptiveClipping(count_stddev=1.0), seed=seed,
                               num_canaries=num_canaries, progress=False)


@pytest.mark.filterwarnings("ignore::dpkit.errors.SeededRandomnessWarning")
def test_simulation_interrupted_and_resumed_equals_uninterrupted_bit_for_bit(tmp_path):
    whole = _float64_sim(seed=21)
    whole.run(6)

    part = _float64_sim(seed=21)
    part.run(3)
    torch.save(part.state_dict(), tmp_path / "sim.pt")
    del part
    resumed = _float64_sim()  # fresh object, default (entropy) seed: the checkpoint's seed wins
    resumed.load_state_dict(torch.load(tmp_path / "sim.pt", weights_only=True))
    resumed.run(3)

    for p, q in zip(whole.server.params, resumed.server.params):
        assert p.dtype == torch.float64 and torch.equal(p, q)
    keys = ("round", "clip_norm", "noisy_unclipped_fraction", "update_norm", "nonprivate", "epsilon",
            "test_accuracy", "test_loss")
    assert [{k: r[k] for k in keys} for r in resumed.history] == [{k: r[k] for k in keys} for r in whole.history]
    assert resumed.server.accountant.ledger == whole.server.accountant.ledger
    assert resumed.canary_estimate() == whole.canary_estimate()
    # the resumed rounds are not a replay of the first three
    updates = np.stack(resumed._round_updates)
    assert not np.allclose(updates[:3], updates[3:])


def test_simulation_state_must_match():
    state = _float64_sim(num_canaries=0).state_dict()
    with pytest.raises(ValueError, match="num_canaries"):
        _float64_sim(num_canaries=4).load_state_dict(state)
    with pytest.raises(TypeError, match="state must be a dict"):
        _float64_sim().load_state_dict([1])


def test_flower_strategy_default_seed_and_resume_bit_for_bit(tmp_path):
    pytest.importorskip("flwr")
    from dpkit.federated.flower import DPFedAvgStrategy, make_client_fn, run_in_process

    logging.getLogger("flwr").setLevel(logging.WARNING)
    data = tiny_data(num_clients=6, seed=2)
    data.clients[:] = [(x.double(), y) for x, y in data.clients]
    torch.manual_seed(1)
    model = torch.nn.Linear(5, 3).double()
    init = [p.detach().numpy().copy() for p in model.parameters()]
    settings = dict(num_clients=6, sampling_rate=0.5, noise_multiplier=0.7, clip_norm=0.5,
                    server_optimizer="fedadam")

    def sgd(p):
        return torch.optim.SGD(p, lr=0.2)

    def clients():
        return make_client_fn(copy.deepcopy(model), data, sgd, local_batch_size=2, seed=9)

    with warnings.catch_warnings():
        warnings.simplefilter("error", SeededRandomnessWarning)
        a, b = DPFedAvgStrategy(init, **settings), DPFedAvgStrategy(init, **settings)
    assert a.dpfedavg.seed != b.dpfedavg.seed

    with pytest.warns(SeededRandomnessWarning):
        whole = DPFedAvgStrategy(init, seed=13, **settings)
    run_in_process(whole, clients(), 6, 4)
    with pytest.warns(SeededRandomnessWarning):
        part = DPFedAvgStrategy(init, seed=13, **settings)
    run_in_process(part, clients(), 6, 2)
    torch.save(part.state_dict(), tmp_path / "strategy.pt")
    resumed = DPFedAvgStrategy(init, **settings)
    resumed.load_state_dict(torch.load(tmp_path / "strategy.pt"))
    run_in_process(resumed, clients(), 6, 2)  # a new Server.fit: Flower's server_round restarts at 1
    for x, y in zip(whole.current_parameters, resumed.current_parameters):
        assert x.dtype == np.float64
        np.testing.assert_array_equal(x, y)
    assert [h["nonprivate"] for h in resumed.history] == [h["nonprivate"] for h in whole.history]
    assert resumed.dpfedavg.accountant.ledger == whole.dpfedavg.accountant.ledger


def test_flower_state_dict_refuses_a_round_in_flight():
    pytest.importorskip("flwr")
    from flwr.server import SimpleClientManager

    from dpkit.federated.flower import DPFedAvgStrategy, InProcessClientProxy

    strategy = DPFedAvgStrategy([np.zeros(3, np.float32)], num_clients=2, sampling_rate=1.0,
                                noise_multiplier=1.0, clip_norm=1.0)
    manager = SimpleClientManager()
    for i in range(2):
        manager.register(InProcessClientProxy(str(i), None))
    assert strategy.configure_fit(1, None, manager)
    with pytest.raises(RuntimeError, match="between rounds"):
        strategy.state_dict()
    with pytest.raises(TypeError, match="state must be a dict"):
        strategy.load_state_dict({"x": 1})
