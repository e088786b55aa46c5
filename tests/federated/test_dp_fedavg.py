"""DP-FedAvg server: limits, sampling vs ledger, noise level, empty cohorts, FedAdam, validation."""

import math

import numpy as np
import pytest
import torch
from dp_accounting import dp_event, pld
from scipy import stats

from dpkit.accountants import dpsgd_event
from dpkit.federated import DPFedAvg, FedAdam, FederatedSimulation
from tests.federated.helpers import plain_fedavg, tiny_data

# explicit seeds below are test conveniences (they warn; see test_seeds_and_resume.py)
pytestmark = pytest.mark.filterwarnings("ignore::dpkit.errors.SeededRandomnessWarning")


def _zeros(shapes):
    return [torch.zeros(s) for s in shapes]


def _server(**kw):
    args = dict(num_clients=10, sampling_rate=0.5, noise_multiplier=1.0, clip_norm=1.0, seed=0)
    args.update(kw)
    return DPFedAvg(args.pop("params", _zeros([(3, 2), (2,)])), **args)


def test_sigma0_huge_clip_equals_plain_fedavg():
    data = tiny_data(num_clients=5, seed=1)
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    ref = plain_fedavg(model, data, rounds=3, lr=0.3, epochs=2, batch_size=2, seed=7)
    sim = FederatedSimulation(model, data, client_optimizer=lambda p: torch.optim.SGD(p, lr=0.3),
                              sampling_rate=1.0, noise_multiplier=0.0, clip_norm=1e9, local_epochs=2,
                              local_batch_size=2, seed=7, progress=False)
    sim.run(3)
    for p, r in zip(sim.server.params, ref.parameters()):
        torch.testing.assert_close(p, r.detach(), rtol=0, atol=2e-6)
    assert sim.epsilon() == math.inf  # σ = 0 never reports a finite ε


def test_subsampled_sigma0_is_sum_over_cohort_divided_by_public_qm():
    """q < 1: the update is Σ_{k∈cohort} Δ_k / (q·M), never divided by the realised cohort size."""
    m, q = 8, 0.5
    server = _server(params=_zeros([(4,)]), num_clients=m, sampling_rate=q, noise_multiplier=0.0,
                     clip_norm=1e9)
    deltas = {k: [torch.full((4,), float(k + 1))] for k in range(m)}
    for _ in range(3):
        before = server.params[0].clone()
        cohort = server.sample_cohort()
        server.aggregate({k: deltas[k] for k in cohort})
        expected = sum((k + 1.0 for k in cohort), 0.0) / (q * m)
        torch.testing.assert_close(server.params[0] - before, torch.full((4,), expected))


def test_clipping_bounds_each_user_and_scales_exactly():
    server = _server(params=_zeros([(3,), (4,)]), num_clients=1, sampling_rate=1.0, noise_multiplier=0.0,
                     clip_norm=2.0)
    big = [torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 4.0, 0.0, 0.0])]  # norm 5
    info = server.aggregate({0: big})
    flat = torch.cat([p.reshape(-1) for p in server.params])
    assert float(flat.norm()) == pytest.approx(2.0, rel=1e-6)
    torch.testing.assert_close(flat, torch.cat(big) * (2.0 / 5.0))
    assert info["nonprivate"]["unclipped_fraction"] == 0.0


def test_ledger_matches_the_sampler_that_ran():
    m, q, z, rounds = 200, 0.1, 1.3, 150
    server = _server(params=_zeros([(2,)]), num_clients=m, sampling_rate=q, noise_multiplier=z)
    total, cohorts = 0, []
    for _ in range(rounds):
        cohort = server.sample_cohort()
        assert cohort == server.sample_cohort()  # stable within the round
        cohorts.append(tuple(cohort))
        total += len(cohort)
        server.aggregate({})
    # the ledger holds the event of THIS q and exactly one entry per round that ran
    assert server.accountant.ledger == [(dpsgd_event(z, q), rounds)]
    # the sampler really samples at rate q: total ~ Binomial(rounds*M, q) (a test that can fail)
    n = rounds * m
    zscore = (total - n * q) / math.sqrt(n * q * (1 - q))
    assert abs(zscore) < 4.5, zscore
    assert len(set(cohorts)) == rounds  # fresh cohorts
    # and ε is dp_accounting's own PLD of that composition
    acc = pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), rounds)
    assert server.epsilon(1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=2e-3)


def test_empty_cohort_still_adds_noise_and_is_accounted():
    d = 4000
    server = _server(params=_zeros([(d,)]), num_clients=3, sampling_rate=1e-9, noise_multiplier=0.8,
                     clip_norm=1.5)
    assert server.sample_cohort() == []
    info = server.aggregate({})
    assert info["nonprivate"]["cohort_size"] == 0
    assert server.accountant.ledger == [(dpsgd_event(0.8, 1e-9), 1)]
    # noise std on the average: z·C/(q·M); KS test against that normal (can fail)
    scale = 0.8 * 1.5 / (1e-9 * 3)
    assert stats.kstest(server.params[0].double().numpy() / scale, "norm").pvalue > 1e-3


def test_noise_level_on_zero_updates_is_one_sigma_c_on_the_sum():
    d, m, z, c = 5000, 4, 2.0, 0.5
    server = _server(params=_zeros([(d,)]), num_clients=m, sampling_rate=1.0, noise_multiplier=z, clip_norm=c)
    server.aggregate({k: [torch.zeros(d)] for k in range(m)})
    x = server.params[0].double().numpy()
    expected = z * c / m
    # variance test (chi-square, two-sided at 1e-4)
    chi2 = float(np.sum(x ** 2) / expected ** 2)
    assert stats.chi2.ppf(1e-4, d) < chi2 < stats.chi2.ppf(1 - 1e-4, d)


def test_same_seed_same_run_different_seed_different_noise():
    def run(seed):
        s = _server(seed=seed)
        for _ in range(3):
            s.aggregate({k: [torch.ones(3, 2), torch.ones(2)] for k in s.sample_cohort()})
        return torch.cat([p.reshape(-1) for p in s.params])
    torch.testing.assert_close(run(3), run(3), rtol=0, atol=0)
    assert not torch.equal(run(3), run(4))


def test_secure_mode_is_not_reproducible():
    a, b = _server(seed=None, secure_mode=True), _server(seed=None, secure_mode=True)
    a.aggregate({}), b.aggregate({})
    assert not torch.equal(a.params[0], b.params[0])


def test_state_dict_round_trip_continues_identically():
    a = _server(server_optimizer="fedadam")
    for _ in range(2):
        a.aggregate({k: [torch.ones(3, 2) * k, torch.ones(2)] for k in a.sample_cohort()})
    state = a.state_dict()
    b = _server(server_optimizer="fedadam")
    b.load_state_dict(state)
    for s in (a, b):
        s.aggregate({k: [torch.ones(3, 2), torch.ones(2) * k] for k in s.sample_cohort()})
    for p, q in zip(a.params, b.params):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert a.accountant.ledger == b.accountant.ledger


def test_fedadam_matches_reddi_et_al_algorithm_2_in_numpy():
    lr, b1, b2, tau = 0.05, 0.8, 0.95, 1e-2
    rng = np.random.default_rng(0)
    deltas = rng.normal(size=(4, 6))
    x = torch.zeros(6, dtype=torch.float64)
    opt = FedAdam([x], lr=lr, betas=(b1, b2), tau=tau)
    ref, m, v = np.zeros(6), np.zeros(6), np.full(6, tau ** 2)
    for dlt in deltas:
        x.grad = -torch.from_numpy(dlt)
        opt.step()
        m = b1 * m + (1 - b1) * dlt
        v = b2 * v + (1 - b2) * dlt ** 2
        ref = ref + lr * m / (np.sqrt(v) + tau)
    np.testing.assert_allclose(x.numpy(), ref, rtol=1e-12)


def test_update_from_unsampled_client_is_refused():
    server = _server(num_clients=10, sampling_rate=0.3)
    outsider = next(k for k in range(10) if k not in server.sample_cohort())
    with pytest.raises(ValueError, match="sampled"):
        server.aggregate({outsider: [torch.zeros(3, 2), torch.zeros(2)]})


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(num_clients=0), ValueError, "num_clients"),
    (dict(num_clients=2.5), TypeError, "num_clients"),
    (dict(sampling_rate=0.0), ValueError, "sampling_rate"),
    (dict(sampling_rate=1.5), ValueError, "sampling_rate"),
    (dict(noise_multiplier=-1.0), ValueError, "noise_multiplier"),
    (dict(noise_multiplier=float("nan")), ValueError, "noise_multiplier"),
    (dict(clip_norm=0.0), ValueError, "clip_norm"),
    (dict(clip_norm="1"), TypeError, "clip_norm"),
    (dict(server_optimizer="sgd"), ValueError, "server_optimizer"),
    (dict(server_optimizer=3), TypeError, "server_optimizer"),
    (dict(adaptive_clipping=0.5), TypeError, "adaptive_clipping"),
    (dict(accountant="nope"), ValueError, "name"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=1, secure_mode=True), ValueError, "seed"),
    (dict(secure_mode="yes"), TypeError, "secure_mode"),
    (dict(params=torch.zeros(3)), TypeError, "params"),
    (dict(params=[]), ValueError, "params"),
])
def test_invalid_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _server(**kwargs)


@pytest.mark.parametrize("update, match", [
    ([torch.zeros(3, 2)], "sequence of 2"),
    ([torch.zeros(2, 3), torch.zeros(2)], "shape"),
    ([torch.zeros(3, 2), torch.tensor([float("nan"), 0.0])], "finite"),
])
def test_invalid_updates(update, match):
    server = _server(sampling_rate=1.0)
    with pytest.raises(ValueError, match=match):
        server.aggregate({0: update})


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(lr=0.0), ValueError, "lr"),
    (dict(betas=(1.0, 0.9)), ValueError, "betas"),
    (dict(betas=0.9), TypeError, "betas"),
    (dict(tau=-1.0), ValueError, "tau"),
])
def test_fedadam_invalid(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        FedAdam([torch.zeros(2)], **kwargs)


@pytest.mark.parametrize("bad", [
    [torch.zeros(3, 2), torch.tensor([float("inf"), 0.0])],
    [torch.full((3, 2), float("nan")), torch.zeros(2)],
    [torch.zeros(3, 3), torch.zeros(2)],
    [torch.zeros(3, 2)],
])
def test_a_bad_update_refuses_the_round_atomically_and_a_retry_is_accounted_once(bad):
    """Issue 16: a NaN/Inf or misshaped update raises before anything is released or accounted;
    the same cohort can then be aggregated without that client (a drop-out), accounted once."""
    server = _server(params=_zeros([(3, 2), (2,)]), num_clients=4, sampling_rate=1.0, noise_multiplier=1.0)
    good = {k: [torch.full((3, 2), 0.1), torch.full((2,), 0.1)] for k in range(4)}
    before = [p.clone() for p in server.params]
    with pytest.raises(ValueError, match=r"updates\[2\]"):
        server.aggregate({**good, 2: bad})
    assert server.round == 0 and server.accountant.ledger == []
    for p, q in zip(server.params, before):
        assert torch.equal(p, q)
    del good[2]                                   # client 2 treated as a drop-out
    info = server.aggregate(good)
    assert info["nonprivate"]["reporting_clients"] == 3 and info["nonprivate"]["cohort_size"] == 4
    assert server.round == 1 and server.accountant.ledger == [(dpsgd_event(1.0, 1.0), 1)]
    with pytest.raises(TypeError, match="updates must be a mapping"):
        server.aggregate([good[0]])
