"""Streamed correlated noise equals the dense product sens·M·Z for the same Z."""

import numpy as np
import pytest
import torch
from scipy import stats

from dpkit.mechanisms.matrix import (CorrelatedNoise, Participation, banded, binary_tree, blt,
                                     identity, multi_epoch, toeplitz_sqrt)
from dpkit.mechanisms.matrix.streaming import counter_normal, dense_noise_matrix
from dpkit.mechanisms.noise import NoiseMechanism

N = 21
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device"))]


def _strategies():
    return [identity(N), binary_tree(N, honaker=False), binary_tree(N, honaker=True),
            banded(N, 4), toeplitz_sqrt(N), blt(N, 3), multi_epoch(N, 3, maxiter=10)]


def _stream(noise, like, steps):
    return [noise.sample(t, like) for t in range(steps)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", _strategies(), ids=lambda s: s.name)
def test_streamed_equals_dense_product(strategy, device):
    like = [torch.zeros(3, 2, dtype=torch.float64, device=device),
            torch.zeros(4, dtype=torch.float64, device=device)]
    noise = CorrelatedNoise(strategy, seed=11)
    out = _stream(noise, like, N)
    M = strategy.noise_operator()
    for i, ref in enumerate(like):
        if i == 0:
            Z = dense_noise_matrix(strategy, 11, ref)
        else:  # second tensor: build Z from the counters directly (index 1)
            keys = ([strategy.node_key(t, l) for t, l in strategy.nodes]
                    if strategy.kind == "tree" else range(N))
            Z = np.stack([counter_normal(11, k, 1, ref, torch.float64).cpu().numpy() for k in keys])
        dense = noise.sensitivity * (M @ Z.reshape(Z.shape[0], -1))
        got = np.stack([o[i].reshape(-1).cpu().numpy() for o in out])
        np.testing.assert_allclose(got, dense, atol=1e-10)


def test_identity_strategy_is_dpsgd_noise():
    noise = CorrelatedNoise(identity(200), seed=3)
    assert isinstance(noise, NoiseMechanism) and noise.sensitivity == 1.0
    like = [torch.zeros(50)]
    draws = torch.cat([noise.sample(t, like)[0] for t in range(200)]).numpy()
    assert stats.kstest(draws, "norm").pvalue > 1e-3  # i.i.d. N(0, 1), can fail if broken
    assert abs(np.corrcoef(draws[:-50], draws[50:])[0, 1]) < 0.05  # no step-to-step correlation


def test_banded_noise_covariance_matches_inverse():
    # Statistical check (independent of counters): Cov(w) = sens² C⁻¹C⁻ᵀ over many coordinates.
    s = banded(6, 3)
    noise = CorrelatedNoise(s, seed=5)
    like = [torch.zeros(40_000, dtype=torch.float64)]
    W = torch.stack([noise.sample(t, like)[0] for t in range(6)]).numpy()
    M = s.noise_operator()
    np.testing.assert_allclose(np.cov(W), noise.sensitivity ** 2 * M @ M.T, atol=0.05)


@pytest.mark.parametrize("strategy", _strategies(), ids=lambda s: s.name)
def test_state_dict_resumes_same_stream(strategy):
    like = [torch.zeros(5)]
    full = _stream(CorrelatedNoise(strategy, seed=7), like, N)
    first = CorrelatedNoise(strategy, seed=7)
    _stream(first, like, 9)
    state = first.state_dict()
    resumed = CorrelatedNoise(strategy, seed=0)
    resumed.load_state_dict(state)
    rest = [resumed.sample(t, like) for t in range(9, N)]
    for a, b in zip(full[9:], rest):
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)


def test_bounded_memory():
    like = [torch.zeros(3)]
    nb = CorrelatedNoise(banded(64, 4), seed=1)
    nt = CorrelatedNoise(binary_tree(64), seed=1)
    for t in range(64):
        nb.sample(t, like)
        nt.sample(t, like)
        assert len(nb._past) <= 3
        assert len(nt._stack) <= int(np.log2(64)) + 1
    nl = CorrelatedNoise(blt(64, 3), seed=1)
    nl.sample(0, like)
    assert nl._buffers[0].shape == (3, 3)


def test_order_repeat_dtype_and_participation():
    s = banded(10, 2)
    noise = CorrelatedNoise(s, seed=2, participation=Participation.min_separation(2, 5))
    assert noise.sensitivity == pytest.approx(np.sqrt(5))
    like = [torch.zeros(4, dtype=torch.float32)]
    a = noise.sample(0, like)
    assert a[0].dtype == torch.float32
    torch.testing.assert_close(noise.sample(0, like)[0], a[0])  # repeat: same noise
    with pytest.raises(ValueError, match="step"):
        noise.sample(2, like)
    assert not torch.equal(noise.sample(1, like)[0], a[0])
    other = CorrelatedNoise(s, seed=3)
    assert not torch.equal(other.sample(0, like)[0], a[0])


@pytest.mark.parametrize("call, exc", [
    (lambda: CorrelatedNoise(np.eye(3)), TypeError),
    (lambda: CorrelatedNoise(identity(3), seed=-1), ValueError),
    (lambda: CorrelatedNoise(identity(3), seed=1.5), TypeError),
    (lambda: CorrelatedNoise(identity(3), sensitivity=0.0), ValueError),
    (lambda: CorrelatedNoise(identity(3), participation="single"), TypeError),
    (lambda: CorrelatedNoise(identity(3), seed=1).sample(-1, [torch.zeros(1)]), ValueError),
    (lambda: CorrelatedNoise(identity(1), seed=1).load_state_dict(
        CorrelatedNoise(identity(2), seed=1).state_dict()), ValueError),
])
def test_invalid_inputs(call, exc):
    with pytest.raises(exc):
        call()


def test_steps_beyond_n_refused():
    noise = CorrelatedNoise(identity(1), seed=1)
    noise.sample(0, [torch.zeros(1)])
    with pytest.raises(ValueError, match="n=1"):
        noise.sample(1, [torch.zeros(1)])
