"""Simulator: JSON-lines log vs the ledger, learning on digits, canary one-shot estimates, validation."""

import json

import numpy as np
import pytest
import torch

from dpkit.federated import AdaptiveClipping, Canaries, FederatedData, FederatedSimulation, digits_clients
from dpkit.federated.canaries import CANARY_SCALE
from tests.federated.helpers import tiny_data

# explicit seeds below are test conveniences (they warn; see test_seeds_and_resume.py)
pytestmark = pytest.mark.filterwarnings("ignore::dpkit.errors.SeededRandomnessWarning")


def _sgd(p):
    return torch.optim.SGD(p, lr=0.1)


def test_jsonl_log_has_one_record_per_round_and_the_ledger_epsilon(tmp_path):
    log = tmp_path / "run.jsonl"
    data = tiny_data(num_clients=8)
    sim = FederatedSimulation(torch.nn.Linear(5, 3), data, client_optimizer=_sgd, sampling_rate=0.5,
                              noise_multiplier=1.0, clip_norm=1.0, adaptive_clipping=AdaptiveClipping(count_stddev=2.0),
                              log_path=str(log), progress=False, epsilon_every=2, delta=1e-4)
    sim.run(5)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["epsilon"] is None for r in records] == [True, False, True, False, False]  # last one always
    assert records[-1]["epsilon"] == pytest.approx(sim.epsilon())
    assert sim.server.accountant.ledger[0][1] == 5
    for r in records:
        assert {"clip_norm", "noisy_unclipped_fraction", "test_accuracy", "nonprivate"} <= set(r)


def test_digits_dp_fedavg_learns():
    torch.manual_seed(0)
    data = digits_clients(60, 0.5, seed=0)
    sim = FederatedSimulation(torch.nn.Linear(64, 10), data, client_optimizer=_sgd, sampling_rate=0.4,
                              noise_multiplier=0.3, clip_norm=1.0, local_epochs=2, progress=False,
                              epsilon_every=100)
    start = sim.evaluate()["test_accuracy"]
    hist = sim.run(10)
    assert start < 0.3 and hist[-1]["test_accuracy"] > 0.75


def _canary_sim(noise_multiplier, seed=0):
    empty = (torch.zeros(0, 20), torch.zeros(0, dtype=torch.int64))
    data = FederatedData(clients=[empty] * 30, test=None, num_classes=5)
    return FederatedSimulation(torch.nn.Linear(20, 5), data, client_optimizer=_sgd, sampling_rate=0.5,
                               noise_multiplier=noise_multiplier, clip_norm=1.0, num_canaries=30,
                               seed=seed, progress=False, epsilon_every=100)


def test_canary_estimate_stays_below_the_claim():
    sim = _canary_sim(2.0)
    sim.run(10)
    est = sim.canary_estimate()
    assert np.isfinite(est["claimed_epsilon"])
    # 30 canaries give a noisy point estimate (it may exceed the claim by chance, depending on the
    # noise draw); the lower confidence end is the statement that must respect the claim
    assert est["final_model"]["epsilon_lower"] <= est["claimed_epsilon"]
    assert est["all_iterates"]["epsilon_lower"] <= est["claimed_epsilon"]


def test_canaries_catch_a_mechanism_that_adds_less_noise_than_it_claims():
    sim = _canary_sim(2.0)
    sim.server.update_noise_multiplier = 0.05  # deliberately broken: accounts z = 2, adds 0.05
    sim.run(10)
    est = sim.canary_estimate()
    assert est["final_model"]["epsilon_lower"] > est["claimed_epsilon"]


def test_canary_update_is_always_clipped_to_the_clip_norm():
    can = Canaries(3, 7, seed=1)
    like = [torch.zeros(2, 3), torch.zeros(1)]
    raw = can.update(1, 0.4, like)
    norm = float(torch.cat([r.reshape(-1) for r in raw]).norm())
    assert norm == pytest.approx(CANARY_SCALE * 0.4, rel=1e-6) and CANARY_SCALE > 1
    np.testing.assert_allclose(torch.cat([r.reshape(-1) for r in raw]).numpy() / norm, can.directions[1],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(data=[1, 2]), TypeError, "data"),
    (dict(client_optimizer=None), TypeError, "optimizer"),
    (dict(local_epochs=0), ValueError, "epochs"),
    (dict(local_batch_size=0), ValueError, "batch_size"),
    (dict(delta=0.0), ValueError, "delta"),
    (dict(num_canaries=1), ValueError, "num_canaries"),
    (dict(num_canaries=-1), ValueError, "num_canaries"),
    (dict(progress="no"), TypeError, "progress"),
    (dict(epsilon_every=0), ValueError, "epsilon_every"),
    (dict(sampling_rate=2.0), ValueError, "sampling_rate"),
    (dict(model=torch.nn.BatchNorm1d(5)), ValueError, "buffers"),
])
def test_simulation_invalid(kwargs, exc, match):
    args = dict(model=torch.nn.Linear(5, 3), data=tiny_data(), client_optimizer=_sgd, sampling_rate=0.5,
                noise_multiplier=1.0, clip_norm=1.0, progress=False)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        FederatedSimulation(args.pop("model"), args.pop("data"), **args)


def test_canary_estimate_needs_canaries():
    sim = FederatedSimulation(torch.nn.Linear(5, 3), tiny_data(), client_optimizer=_sgd, sampling_rate=0.5,
                              noise_multiplier=1.0, clip_norm=1.0, progress=False)
    with pytest.raises(RuntimeError, match="canaries"):
        sim.canary_estimate()


def test_local_training_with_adam_starts_fresh_for_every_client():
    """LocalTrainer vs an independent loop: deep copy of the global model, NEW Adam, same batches."""
    import copy

    from dpkit.federated import LocalTrainer
    from dpkit.federated import _seeds

    data = tiny_data(num_clients=2, sizes=[7, 5])
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    global_params = [p.detach().clone() for p in model.parameters()]
    trainer = LocalTrainer(copy.deepcopy(model), lambda p: torch.optim.Adam(p, lr=0.05), epochs=2, batch_size=3)
    for k, (x, y) in enumerate(data.clients):
        got = trainer.update(global_params, (x, y), _seeds.generator(5, _seeds.LOCAL, 0, k))
        ref = copy.deepcopy(model)
        opt = torch.optim.Adam(ref.parameters(), lr=0.05)
        g = _seeds.generator(5, _seeds.LOCAL, 0, k)
        for _ in range(2):
            order = torch.randperm(len(y), generator=g)
            for s in range(0, len(y), 3):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(ref(x[order[s:s + 3]]), y[order[s:s + 3]]).backward()
                opt.step()
        for d, r, g0 in zip(got, ref.parameters(), global_params):
            torch.testing.assert_close(d, r.detach() - g0, rtol=0, atol=1e-7)
