"""Strategies reproduce their workload (B·C = A), against dense matrix products and brute force."""

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from dpkit.mechanisms.matrix import (
    BandedStrategy, BLTStrategy, DenseStrategy, Participation, ToeplitzStrategy, banded,
    binary_tree, blt, identity, momentum_prefix_sum, multi_epoch, prefix_sum, toeplitz_sqrt,
    workload_errors)

N = 23  # not a power of two: exercises incomplete trees


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """The O(n³) strategy optimisers run 30x slower when BLAS threads compete for the cores of a
    shared test machine; one thread each keeps the suite fast (results do not depend on it)."""
    with threadpool_limits(1):
        yield


def _strategies(n=N):
    return [identity(n), binary_tree(n, honaker=False), binary_tree(n, honaker=True),
            banded(n, 3), banded(n, 5, normalize_columns=False), toeplitz_sqrt(n), blt(n, 2),
            multi_epoch(n, 4, maxiter=20)]


@pytest.mark.parametrize("strategy", _strategies(), ids=lambda s: s.name)
@pytest.mark.parametrize("workload", ["prefix", "momentum"])
def test_decoder_times_encoder_is_workload(strategy, workload):
    A = prefix_sum(N) if workload == "prefix" else momentum_prefix_sum(
        N, momentum=0.9, learning_rates=np.linspace(1.0, 0.1, N))
    B = A @ strategy.noise_operator()
    np.testing.assert_allclose(B @ strategy.encoder(), A, atol=1e-9 * np.abs(A).max())


def test_momentum_workload_matches_simulated_sgd():
    n, beta = 9, 0.8
    lrs = np.linspace(0.5, 0.1, n)
    rng = np.random.default_rng(0)
    g = rng.normal(size=n)
    theta, m, out = 0.0, 0.0, []
    for t in range(n):  # heavy-ball SGD written as a loop, independent of the matrix form
        m = beta * m + g[t]
        theta -= lrs[t] * m
        out.append(-theta)
    A = momentum_prefix_sum(n, momentum=beta, learning_rates=lrs)
    np.testing.assert_allclose(A @ g, out, rtol=1e-12)


def test_honaker_decoder_is_blue_of_released_nodes():
    n = 13
    tree = binary_tree(n, honaker=True)
    C = tree.encoder()
    B = tree.decoder_prefix()
    for t in range(n):
        released = [k for k, (step, _) in enumerate(tree.nodes) if step <= t]
        target = np.r_[np.ones(t + 1), np.zeros(n - t - 1)]
        blue = target @ np.linalg.pinv(C[released])  # min-variance unbiased, i.i.d. noise
        np.testing.assert_allclose(B[t, released], blue, atol=1e-10)
        assert np.all(B[t, [k for k in range(len(tree.nodes)) if k not in released]] == 0)


def test_honaker_reduces_error_and_tree_sensitivity_is_levels():
    plain, hon = binary_tree(64, honaker=False), binary_tree(64, honaker=True)
    assert hon.errors()["mean"] < plain.errors()["mean"]
    assert plain.sensitivity() == pytest.approx(np.sqrt(7))  # leaf 0 is in 7 released nodes


def test_toeplitz_sqrt_squares_to_prefix_sum():
    C = toeplitz_sqrt(40).encoder()
    np.testing.assert_allclose(C @ C, prefix_sum(40), atol=1e-12)


@pytest.mark.parametrize("strategy", [toeplitz_sqrt(30), blt(30, 3)], ids=lambda s: s.name)
def test_toeplitz_fast_paths_match_dense(strategy):
    C = strategy.encoder()
    np.testing.assert_allclose(strategy.noise_operator(), np.linalg.inv(C), atol=1e-9)
    assert strategy.sensitivity() == pytest.approx(np.linalg.norm(C, axis=0).max(), rel=1e-12)
    dense = workload_errors(prefix_sum(30), np.linalg.inv(C), np.linalg.norm(C, axis=0).max())
    fast = strategy.errors()
    assert fast["max"] == pytest.approx(dense["max"], rel=1e-9)
    assert fast["mean"] == pytest.approx(dense["mean"], rel=1e-9)


def test_blt_streams_past_ten_thousand_steps_and_beats_sqrt_truncation():
    n = 10_001
    s = blt(n, 3, maxiter=5)
    assert isinstance(s, BLTStrategy) and s.n == n
    assert s.errors()["mean"] < 1.3 * toeplitz_sqrt(n).errors()["mean"]
    assert s.errors()["mean"] < identity(50).errors()["mean"] * n / 50 / 10


def test_banded_optimisation_improves_on_start_and_identity():
    n = 64
    A = prefix_sum(n)
    for b in (2, 4, 8):
        s = banded(n, b)
        assert s.bands == b
        # independent objective: dense inverse, max column norm
        C = s.encoder()
        obj = np.linalg.norm(C, axis=0).max() ** 2 * np.linalg.norm(A @ np.linalg.inv(C)) ** 2
        assert obj < np.linalg.norm(A) ** 2  # identity's objective
        start = np.zeros((n, n))
        from dpkit.mechanisms.matrix.strategies import _sqrt_coefficients
        for k, ck in enumerate(_sqrt_coefficients(b)):
            start += np.diag(np.full(n - k, ck), -k)
        start_obj = np.linalg.norm(start, axis=0).max() ** 2 * np.linalg.norm(A @ np.linalg.inv(start)) ** 2
        assert obj <= start_obj * (1 + 1e-9)
    np.testing.assert_allclose(np.linalg.norm(banded(n, 4).encoder(), axis=0), 1.0)


@pytest.mark.parametrize("constraint, participation", [
    ("cyclic", Participation.cyclic(4)), ("min_separation", Participation.min_separation(4, 8))])
def test_multi_epoch_beats_or_equals_banded_on_its_objective(constraint, participation):
    n, b = 32, 4
    A = prefix_sum(n)
    me, bd = multi_epoch(n, b, constraint=constraint), banded(n, b, toeplitz=True)

    def objective(C):  # dense, independent: sens² × ‖A C⁻¹‖_F² (sens² = 8 for both, checked)
        return np.linalg.norm(A @ np.linalg.inv(C)) ** 2 * 8

    assert me.sensitivity(participation) ** 2 == pytest.approx(8)
    assert bd.sensitivity(participation) ** 2 == pytest.approx(8)
    assert objective(me.encoder()) <= objective(bd.encoder()) * (1 + 1e-9)
    np.testing.assert_allclose(np.linalg.norm(me.encoder(), axis=0), 1.0, atol=1e-9)
    if constraint == "cyclic":  # strictly better than BandMF when cross-epoch entries are free
        assert objective(me.encoder()) < 0.99 * objective(bd.encoder())
    else:  # the same convex problem as general BandMF: the same optimum
        assert objective(me.encoder()) == pytest.approx(objective(banded(n, b).encoder()), rel=1e-4)


# Reference losses recorded from jax_privacy 2.0.0 (jax 0.10.2, jax_enable_x64=True, CPU), in a
# separate virtualenv (jax is not a dpkit dependency):
#   blt = jax_privacy.matrix_factorization.buffered_toeplitz.optimize(
#             n=1024, error="max", min_buffers=d, max_buffers=d)
#   buffered_toeplitz.max_loss(blt, 1024)              # sens² × max prefix-sum error
#   C = jax_privacy.matrix_factorization.banded.optimize(256, bands=8)   # 100 steps (default)
#   jnp.mean(banded.per_query_error(C))                # column-normalised: sens = 1
JAX_PRIVACY_BLT_MAX_N1024 = {3: 10.742660917552001, 4: 10.712160440781114}
JAX_PRIVACY_BANDMF_MEAN_N256_B8 = 20.348961927466238


@pytest.mark.parametrize("buffers", [3, 4])
def test_blt_max_error_matches_jax_privacy(buffers):
    n = 1024
    s = blt(n, buffers, error="max")
    ref = JAX_PRIVACY_BLT_MAX_N1024[buffers]
    # independent check of the loss: dense C, its inverse, max column norm, max row of A C⁻¹
    C = s.encoder()
    B = prefix_sum(n) @ np.linalg.inv(C)
    dense = np.linalg.norm(C, axis=0).max() ** 2 * np.max(np.sum(B * B, axis=1))
    assert s.errors()["max"] == pytest.approx(dense, rel=1e-8)
    assert ref * (1 - 1e-3) <= dense <= ref * 1.005
    # the streamed form r_m = Σ ω θ^(m−1) is the optimised rational C⁻¹ (θ, ω from partial fractions)
    assert s.inverse_coefficients[0] == 1.0 and np.all(np.abs(s.inverse_coefficients) < 1.0 + 1e-12)


def test_blt_mean_objective_beats_max_objective_on_mean_and_vice_versa():
    n = 256
    by_mean, by_max = blt(n, 3, error="mean"), blt(n, 3, error="max")
    assert by_mean.errors()["mean"] < by_max.errors()["mean"]
    assert by_max.errors()["max"] < by_mean.errors()["max"]


def test_general_bandmf_matches_jax_privacy_and_beats_toeplitz():
    n, b = 256, 8
    s, toe = banded(n, b), banded(n, b, toeplitz=True)
    C = s.encoder()
    assert s.bands == b and np.all(np.triu(C, 1) == 0)
    np.testing.assert_allclose(np.linalg.norm(C, axis=0), 1.0, atol=1e-9)
    B = prefix_sum(n) @ np.linalg.inv(C)  # independent: dense inverse, sens = 1 (unit columns)
    mean = np.mean(np.sum(B * B, axis=1))
    assert mean == pytest.approx(s.errors()["mean"], rel=1e-9)
    assert JAX_PRIVACY_BANDMF_MEAN_N256_B8 * (1 - 1e-3) <= mean <= JAX_PRIVACY_BANDMF_MEAN_N256_B8 * 1.005
    assert mean < toe.errors()["mean"]


@pytest.mark.parametrize("call, exc", [
    (lambda: multi_epoch(8, 9), ValueError),
    (lambda: multi_epoch(8, 2, constraint="none"), ValueError),
    (lambda: DenseStrategy(np.triu(np.ones((3, 3)))), ValueError),
    (lambda: banded(0, 1), ValueError),
    (lambda: banded(10, 11), ValueError),
    (lambda: banded(10, 2.5), TypeError),
    (lambda: banded(10, 2, workload=np.ones((3, 3))), ValueError),
    (lambda: banded(10, 2, toeplitz=False, normalize_columns=False), ValueError),
    (lambda: banded(10, 2, toeplitz="yes"), TypeError),
    (lambda: blt(10, 2, error="median"), ValueError),
    (lambda: identity("5"), TypeError),
    (lambda: binary_tree(8, honaker="yes"), TypeError),
    (lambda: BandedStrategy(np.ones((3, 3))), ValueError),
    (lambda: BandedStrategy(np.zeros((3, 3))), ValueError),
    (lambda: BandedStrategy(np.ones((2, 3))), ValueError),
    (lambda: BandedStrategy([[1.0, np.nan], [0.0, 1.0]]), ValueError),
    (lambda: ToeplitzStrategy([0.0, 1.0]), ValueError),
    (lambda: BLTStrategy(5, [1.5], [0.1]), ValueError),
    (lambda: BLTStrategy(5, [0.5, 0.2], [0.1]), ValueError),
    (lambda: momentum_prefix_sum(5, momentum=1.0), ValueError),
    (lambda: momentum_prefix_sum(5, learning_rates=[1, 2]), ValueError),
    (lambda: prefix_sum(-1), ValueError),
    (lambda: identity(4).errors(workload=np.ones((3, 3))), ValueError),
])
def test_invalid_inputs(call, exc):
    with pytest.raises(exc):
        call()
