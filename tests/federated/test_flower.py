"""Flower adapter: same model as dpkit's simulator for the same seeds; empty rounds; validation."""

import copy
import logging

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")

from flwr.common import Code, FitRes, Status, ndarrays_to_parameters  # noqa: E402
from flwr.server import SimpleClientManager  # noqa: E402

from dpkit.accountants import dpsgd_event  # noqa: E402
from dpkit.federated import AdaptiveClipping, FederatedSimulation  # noqa: E402
from dpkit.federated.flower import (DPFedAvgStrategy, InProcessClientProxy, make_client_fn,  # noqa: E402
                                    run_in_process)
from tests.federated.helpers import tiny_data  # noqa: E402

# explicit seeds below are test conveniences (they warn; see test_seeds_and_resume.py)
pytestmark = pytest.mark.filterwarnings("ignore::dpkit.errors.SeededRandomnessWarning")

logging.getLogger("flwr").setLevel(logging.WARNING)


def _sgd(p):
    return torch.optim.SGD(p, lr=0.2)


def _both(num_clients, q, rounds, adaptive=None, **kw):
    data = tiny_data(num_clients=num_clients, seed=2)
    torch.manual_seed(1)
    model = torch.nn.Linear(5, 3)
    init = [p.detach().numpy().copy() for p in model.parameters()]
    settings = dict(sampling_rate=q, noise_multiplier=0.7, clip_norm=0.5, seed=11, **kw)
    sim = FederatedSimulation(copy.deepcopy(model), data, client_optimizer=_sgd, local_epochs=2,
                              local_batch_size=2, progress=False, adaptive_clipping=copy.deepcopy(adaptive),
                              **settings)
    sim.run(rounds)
    strategy = DPFedAvgStrategy(init, num_clients=num_clients, adaptive_clipping=copy.deepcopy(adaptive), **settings)
    run_in_process(strategy, make_client_fn(model, data, _sgd, local_epochs=2, local_batch_size=2, seed=11),
                   num_clients, rounds)
    return sim, strategy


def test_flower_strategy_equals_dpkit_simulator():
    """FedAdam + adaptive clipping (fixed clipping and FedAvg: the empty-rounds test below)."""
    sim, strategy = _both(8, 0.5, 4, AdaptiveClipping(count_stddev=1.0), server_optimizer="fedadam")
    for a, b in zip(sim.server.params, strategy.current_parameters):
        np.testing.assert_array_equal(a.numpy(), b)
    assert [h["nonprivate"]["cohort_size"] for h in sim.history] == \
           [h["nonprivate"]["cohort_size"] for h in strategy.history]
    assert strategy.dpfedavg.accountant.ledger == sim.server.accountant.ledger == [(dpsgd_event(0.7, 0.5), 4)]
    assert strategy.epsilon() == sim.epsilon()


def test_flower_empty_rounds_still_add_noise_and_are_accounted():
    sim, strategy = _both(3, 0.2, 10)
    sizes = [h["nonprivate"]["cohort_size"] for h in strategy.history]
    assert 0 in sizes and len(sizes) == 10  # Flower skipped aggregate_fit, the strategy did not
    assert strategy.dpfedavg.accountant.ledger == [(dpsgd_event(0.7, 0.2), 10)]
    for a, b in zip(sim.server.params, strategy.current_parameters):
        np.testing.assert_array_equal(a.numpy(), b)


def _fit_res(arrays):
    return FitRes(status=Status(code=Code.OK, message=""), parameters=ndarrays_to_parameters(arrays),
                  num_examples=1, metrics={})


def test_driving_the_strategy_with_flower_messages():
    """configure_fit samples from the whole population; an unsampled client's result is refused."""
    init = [np.zeros((2, 2), np.float32)]
    strategy = DPFedAvgStrategy(init, num_clients=6, sampling_rate=0.5, noise_multiplier=0.0, clip_norm=1e6, seed=4)
    manager = SimpleClientManager()
    proxies = [InProcessClientProxy(str(i), None) for i in range(6)]
    for p in proxies:
        manager.register(p)
    params = strategy.initialize_parameters(manager)
    instructions = strategy.configure_fit(1, params, manager)
    cohort = [int(p.cid) for p, _ in instructions]
    assert cohort == strategy.dpfedavg.sample_cohort() and cohort
    results = [(p, _fit_res([np.full((2, 2), 1.0, np.float32)])) for p, _ in instructions]
    new, metrics = strategy.aggregate_fit(1, results, [])
    # σ = 0, huge clip: Σ Δ / (q·M) with the public q·M = 3
    np.testing.assert_allclose(flwr.common.parameters_to_ndarrays(new)[0], len(cohort) / 3.0)
    assert metrics["epsilon"] == float("inf")
    instructions = strategy.configure_fit(2, new, manager)
    outsider = next(p for p in proxies if int(p.cid) not in strategy.dpfedavg.sample_cohort())
    with pytest.raises(ValueError, match="sampled"):
        strategy.aggregate_fit(2, [(outsider, _fit_res([np.zeros((2, 2), np.float32)]))], [])


def test_strategy_invalid_arguments():
    with pytest.raises(TypeError, match="client_index"):
        DPFedAvgStrategy([np.zeros(2)], num_clients=2, sampling_rate=0.5, noise_multiplier=1.0, clip_norm=1.0,
                         client_index=3)
    with pytest.raises(ValueError, match="sampling_rate"):
        DPFedAvgStrategy([np.zeros(2)], num_clients=2, sampling_rate=0.0, noise_multiplier=1.0, clip_norm=1.0)


def test_dropouts_and_malformed_results():
    init = [np.zeros(3, np.float32)]
    strategy = DPFedAvgStrategy(init, num_clients=4, sampling_rate=1.0, noise_multiplier=0.0, clip_norm=1e6, seed=0)
    manager = SimpleClientManager()
    for i in range(3):  # client 3 is sampled (q = 1) but never connected: a drop-out
        manager.register(InProcessClientProxy(str(i), None))
    instructions = strategy.configure_fit(1, None, manager)
    assert sorted(int(p.cid) for p, _ in instructions) == [0, 1, 2]
    ok = [(p, _fit_res([np.full(3, 2.0, np.float32)])) for p, _ in instructions[:2]]  # client 2 fails too
    new, _ = strategy.aggregate_fit(1, ok, [RuntimeError("lost")])
    # Σ Δ / (q·M): 2 reporting clients, public denominator 4
    np.testing.assert_allclose(flwr.common.parameters_to_ndarrays(new)[0], 2 * 2.0 / 4)
    instructions = strategy.configure_fit(2, new, manager)
    with pytest.raises(ValueError, match="shape"):
        strategy.aggregate_fit(2, [(instructions[0][0], _fit_res([np.zeros(4, np.float32)]))], [])
