"""Flower's simulation engine (Ray backend): the same ledger, cohorts and model as dpkit's simulator.

Two Ray runs (about 20 s each here): plain DP (BandMF rounds) compared with the simulator, and
SecAgg+ with distributed noise, nodes mapped to users by get_properties.
"""

import copy
import logging

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("ray")

from dpkit.federated import CorrelatedRounds, FederatedSimulation  # noqa: E402
from dpkit.federated.flower import DPFedAvgStrategy  # noqa: E402
from dpkit.federated.flower_engine import make_client_app, run_ray_simulation  # noqa: E402
from dpkit.mechanisms.matrix import banded  # noqa: E402
from tests.federated.helpers import tiny_data  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::dpkit.errors.SeededRandomnessWarning",
                                        "ignore::DeprecationWarning", "ignore::FutureWarning")

M, ROUNDS = 16, 4


def _sgd(p):
    return torch.optim.SGD(p, lr=0.2)


@pytest.fixture(scope="module")
def runs():
    logging.getLogger("flwr").setLevel(logging.WARNING)
    data = tiny_data(num_clients=M, seed=2)
    torch.manual_seed(1)
    model = torch.nn.Linear(5, 3)
    init = [p.detach().numpy().copy() for p in model.parameters()]
    # BandMF across rounds with cyclic participation: exercises the cohort sampler and the
    # correlated noise of DPFedAvg through Flower's engine
    settings = dict(sampling_rate=0.5, noise_multiplier=0.9, clip_norm=0.5, seed=11,
                    correlated=CorrelatedRounds(banded(ROUNDS, 2), participation="cyclic", num_groups=2))
    sim = FederatedSimulation(copy.deepcopy(model), data, client_optimizer=_sgd, local_epochs=2,
                              local_batch_size=2, progress=False, epsilon_every=ROUNDS,
                              **copy.deepcopy(settings))
    sim.run(ROUNDS)
    strategy = DPFedAvgStrategy(init, num_clients=M, epsilon_every=ROUNDS, **copy.deepcopy(settings))
    app = make_client_app(model, data, _sgd, local_epochs=2, local_batch_size=2, seed=11)
    run_ray_simulation(strategy, app, ROUNDS, client_resources={"num_cpus": 1},
                       ray_init_args={"num_cpus": 2, "include_dashboard": False})
    return sim, strategy


def test_ray_run_has_the_simulators_ledger_cohorts_and_model(runs):
    sim, strategy = runs
    assert strategy.dpfedavg.accountant.ledger == sim.server.accountant.ledger
    assert strategy.dpfedavg.accountant.steps == ROUNDS
    assert strategy.epsilon(1e-5) == sim.epsilon(1e-5)
    sizes = [h["nonprivate"]["cohort_size"] for h in strategy.history]
    assert sizes == [h["nonprivate"]["cohort_size"] for h in sim.history] and sum(sizes) > 0
    assert [h["nonprivate"]["reporting_clients"] for h in strategy.history] == sizes   # nobody lost
    for a, b in zip(sim.server.params, strategy.current_parameters):
        np.testing.assert_allclose(a.numpy(), b, rtol=0, atol=1e-6)


def test_run_ray_simulation_argument_errors():
    strategy = DPFedAvgStrategy([np.zeros(2, np.float32)], num_clients=2, sampling_rate=0.5,
                                noise_multiplier=1.0, clip_norm=1.0)
    with pytest.raises(TypeError, match="client_app"):
        run_ray_simulation(strategy, object(), 1)
    app = make_client_app(torch.nn.Linear(2, 1), tiny_data(num_clients=2, dim=2), _sgd)
    with pytest.raises(TypeError, match="client_resources"):
        run_ray_simulation(strategy, app, 1, client_resources=[1])
    with pytest.raises(ValueError, match="num_rounds"):
        run_ray_simulation(strategy, app, 0)


def test_secagg_on_ray_with_queried_identities():
    """SecAgg+ with distributed noise on Ray, nodes mapped to users by get_properties: every round
    aggregates the whole cohort (q = 1, no drop-outs) and is accounted once."""
    from dpkit.accountants import dpsgd_event
    from dpkit.federated.secure import SecureDPFedAvgStrategy, make_secure_client_app

    logging.getLogger("flwr").setLevel(logging.WARNING)
    data = tiny_data(num_clients=6, seed=2)
    model = torch.nn.Linear(5, 3)
    strategy = SecureDPFedAvgStrategy([p.detach().numpy().copy() for p in model.parameters()], num_clients=6,
                                      sampling_rate=1.0, noise_multiplier=1.0, clip_norm=0.5, min_cohort=3)
    app = make_secure_client_app(model, data, _sgd, min_cohort=3, local_batch_size=2)
    run_ray_simulation(strategy, app, 2, identity="query", fit_workflow=strategy.fit_workflow(),
                       client_resources={"num_cpus": 1}, ray_init_args={"num_cpus": 2, "include_dashboard": False})
    assert [h["nonprivate"]["reporting_clients"] for h in strategy.history] == [6, 6]
    assert strategy.dpfedavg.accountant.ledger == [(dpsgd_event(1.0, 1.0), 2)]
