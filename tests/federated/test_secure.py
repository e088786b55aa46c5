"""Secure aggregation with distributed noise: the unmasked sum is the plain clipped sum plus exactly
the accounted noise (KS test that fails when a share is missing), grid values pass Flower's
quantiser unchanged, small cohorts are refused and still accounted, the unmask guard refuses."""

import copy
import math

import numpy as np
import pytest
import torch
from scipy import stats

flwr = pytest.importorskip("flwr")

from flwr.common import Code, FitRes, Status, ndarrays_to_parameters  # noqa: E402
from flwr.common.secure_aggregation.quantization import dequantize, quantize  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage  # noqa: E402
from flwr.server import SimpleClientManager  # noqa: E402

from dpkit.accountants import dpsgd_event  # noqa: E402
from dpkit.federated import LocalTrainer  # noqa: E402
from dpkit.federated.flower import ROUND_KEY, CLIENT_KEY, DPFedAvgClient, InProcessClientProxy  # noqa: E402
from dpkit.federated.secure import (SHARE_KEY, SecureDPFedAvgClient, SecureDPFedAvgStrategy,  # noqa: E402
                                    min_cohort_mod)
from tests.federated.helpers import tiny_data  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::dpkit.errors.SeededRandomnessWarning")

Z, S, DIM_IN = 1.0, 0.5, 300


def _sgd(p):
    return torch.optim.SGD(p, lr=0.5)


def _setup(num_clients, min_cohort, q=1.0, connected=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(DIM_IN, 8)
    data = tiny_data(num_clients=num_clients, dim=DIM_IN, classes=8, seed=4)
    init = [p.detach().numpy().copy() for p in model.parameters()]
    strategy = SecureDPFedAvgStrategy(init, num_clients=num_clients, sampling_rate=q, noise_multiplier=Z,
                                      clip_norm=S, seed=3, min_cohort=min_cohort)
    manager = SimpleClientManager()
    for i in range(num_clients if connected is None else connected):
        manager.register(InProcessClientProxy(str(i), None))
    return model, data, strategy, manager


def _secagg_round(strategy, manager, model, data, *, drop_share_of=None):
    """Run one round; SecAgg+ emulated with Flower's own quantiser: the server sees only the mean."""
    instructions = strategy.configure_fit(1, None, manager)
    outs, plain = [], []
    for proxy, ins in instructions:
        k = int(proxy.cid)
        params = flwr.common.parameters_to_ndarrays(ins.parameters)
        config = dict(ins.config)
        if k == drop_share_of:
            config[SHARE_KEY] = 0.0          # a client that forgets its noise share
        trainer = LocalTrainer(copy.deepcopy(model), _sgd, batch_size=2)
        g, n, _ = SecureDPFedAvgClient(trainer, data.clients[k], seed=9, index=k).fit(params, config)
        assert n == 1
        q = quantize(g, strategy.clipping_range, strategy.quantization_range)
        back = dequantize(q, strategy.clipping_range, strategy.quantization_range)
        for a, b in zip(g, back):   # on the grid Flower's stochastic quantisation is exact
            np.testing.assert_array_equal(a, b)
        outs.append(g)
        # independent reference: the plain client's trained weights (same shuffling seed), clipped
        ref_trainer = LocalTrainer(copy.deepcopy(model), _sgd, batch_size=2)
        w, _, _ = DPFedAvgClient(ref_trainer, data.clients[k], seed=9).fit(params, {ROUND_KEY: config[ROUND_KEY],
                                                                                  CLIENT_KEY: k})
        delta = [a.astype(np.float64) - b for a, b in zip(w, params)]
        norm = math.sqrt(sum(float((d ** 2).sum()) for d in delta))
        plain.append([d * min(1.0, S / norm) for d in delta])
    n = len(outs)
    mean = [sum(o[i] for o in outs) / n for i in range(len(outs[0]))]
    before = [p.clone() for p in strategy.dpfedavg.params]
    res = FitRes(status=Status(code=Code.OK, message=""), parameters=ndarrays_to_parameters(mean),
                 num_examples=n, metrics={})
    strategy.aggregate_fit(1, [(p, res) for p, _ in instructions], [])
    released = np.concatenate([((a - b) * strategy.dpfedavg.public_normaliser).numpy().ravel()
                               for a, b in zip(strategy.dpfedavg.params, before)])
    plain_sum = np.concatenate([sum(p[i] for p in plain).ravel() for i in range(len(plain[0]))])
    return released - plain_sum, n


def test_unmasked_sum_is_plain_sum_plus_the_accounted_noise():
    model, data, strategy, manager = _setup(2, min_cohort=2)
    residual, n = _secagg_round(strategy, manager, model, data)
    assert n == 2
    # n shares of variance (zS)²/m_min: total (zS)²·n/m_min = (zS)² here; dither adds < h²/12
    assert stats.kstest(residual / (Z * S), "norm").pvalue > 1e-3
    assert strategy.dpfedavg.accountant.ledger == [(dpsgd_event(Z, 1.0), 1)]


def test_missing_share_is_detected():
    model, data, strategy, manager = _setup(2, min_cohort=2)
    residual, _ = _secagg_round(strategy, manager, model, data, drop_share_of=1)
    assert stats.kstest(residual / (Z * S), "norm").pvalue < 1e-3   # half the accounted variance


def test_cohort_below_minimum_is_a_noise_only_accounted_round():
    _, _, strategy, manager = _setup(6, min_cohort=4, connected=3)   # q = 1 but only 3 connected
    assert strategy.configure_fit(1, None, manager) == []
    assert strategy.dpfedavg.round == 1 and strategy.dpfedavg.accountant.ledger == [(dpsgd_event(Z, 1.0), 1)]
    assert strategy.history[0]["nonprivate"]["reporting_clients"] == 0
    # SecAgg+ that failed after configure_fit (unmask refused): settled as an accounted round
    _, _, strategy, manager = _setup(4, min_cohort=2)
    assert strategy.configure_fit(1, None, manager)
    strategy.settle()
    assert strategy.dpfedavg.round == 1 and strategy.dpfedavg.accountant.ledger == [(dpsgd_event(Z, 1.0), 1)]


def test_epsilon_includes_overflow_probability_and_parameters():
    _, _, strategy, manager = _setup(4, min_cohort=2)
    strategy.dpfedavg.aggregate({})
    assert strategy.epsilon(1e-5) == strategy.dpfedavg.epsilon(1e-5 - strategy.overflow_delta)
    assert strategy.clipping_range >= S + 7 * strategy.share_std
    assert math.log2(strategy.clipping_range).is_integer() and strategy.quantization_range == 2 ** 29
    with pytest.raises(ValueError, match="min_cohort"):
        SecureDPFedAvgStrategy([np.zeros(2)], num_clients=4, sampling_rate=1.0, noise_multiplier=1.0,
                               clip_norm=1.0, min_cohort=1)
    from dpkit.federated import AdaptiveClipping
    with pytest.raises(ValueError, match="fixed clipping"):
        SecureDPFedAvgStrategy([np.zeros(2)], num_clients=40, sampling_rate=0.5, noise_multiplier=1.0,
                               clip_norm=1.0, min_cohort=2, adaptive_clipping=AdaptiveClipping())


def test_unmask_guard_refuses_too_few_survivors():
    from types import SimpleNamespace

    from flwr.app import ConfigRecord, RecordDict

    mod = min_cohort_mod(3)

    def unmask(active):   # the part of a Message the mod reads
        return SimpleNamespace(content=RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(
            {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: []})}))
    with pytest.raises(ValueError, match="min_cohort=3"):
        mod(unmask([1, 2]), None, lambda m, c: "shares")
    assert mod(unmask([1, 2, 3]), None, lambda m, c: "shares") == "shares"
