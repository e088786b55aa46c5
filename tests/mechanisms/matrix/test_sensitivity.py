"""Sensitivity under participation schemas vs brute force over participation patterns."""

import itertools

import numpy as np
import pytest

from dpkit.mechanisms.matrix import Participation, banded, sensitivity


def _patterns(n, b, k):
    for r in range(1, k + 1):
        for S in itertools.combinations(range(n), r):
            if all(S[i + 1] - S[i] >= b for i in range(r - 1)):
                yield list(S)


def _brute(C, patterns):
    X = C.T @ C
    return np.sqrt(max(np.abs(X[np.ix_(S, S)]).sum() for S in patterns))


@pytest.mark.parametrize("seed", range(6))
def test_min_separation_is_upper_bound_and_exact_for_banded(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 9))
    b, k = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    C = np.tril(rng.random((n, n)))
    brute = _brute(C, _patterns(n, b, k))
    bound = sensitivity(C, Participation.min_separation(b, k))
    assert bound >= brute * (1 - 1e-12)
    Cb = np.tril(C) - np.tril(C, -b)  # b-banded: exact (NeurIPS 2023 banded theorem)
    assert sensitivity(Cb, Participation.min_separation(b, k)) == pytest.approx(
        _brute(Cb, _patterns(n, b, k)), rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_cyclic_is_exact_for_nonnegative_gram(seed):
    rng = np.random.default_rng(10 + seed)
    n, b = 8, int(rng.integers(1, 5))
    C = np.tril(rng.random((n, n)))
    patterns = [list(range(j, n, b)) for j in range(b)]
    assert sensitivity(C, Participation.cyclic(b)) == pytest.approx(_brute(C, patterns), rel=1e-12)


def test_signed_encoder_bound_dominates_random_adversaries():
    rng = np.random.default_rng(3)
    n, b, k = 7, 2, 3
    C = np.tril(rng.normal(size=(n, n)))
    bound = sensitivity(C, Participation.min_separation(b, k))
    for S in _patterns(n, b, k):
        for _ in range(20):  # random unit contributions in R^3 at each participation
            g = rng.normal(size=(len(S), 3))
            g /= np.linalg.norm(g, axis=1, keepdims=True)
            assert np.linalg.norm(C[:, S] @ g) <= bound + 1e-12


def test_single_is_max_column_norm_and_banded_multi_epoch():
    s = banded(40, 4)
    C = s.encoder()
    assert sensitivity(C) == pytest.approx(np.linalg.norm(C, axis=0).max())
    # unit columns, 4-banded, 10 participations 4 apart: sqrt(10)
    assert s.sensitivity(Participation.min_separation(4, 10)) == pytest.approx(np.sqrt(10))


@pytest.mark.parametrize("call, exc", [
    (lambda: Participation.cyclic(0), ValueError),
    (lambda: Participation.min_separation(2, 0), ValueError),
    (lambda: Participation.min_separation(1.5, 2), TypeError),
    (lambda: sensitivity(np.eye(3), "single"), TypeError),
    (lambda: sensitivity(np.ones(3)), ValueError),
    (lambda: sensitivity([[np.inf]]), ValueError),
    (lambda: sensitivity("abc"), TypeError),
])
def test_invalid_inputs(call, exc):
    with pytest.raises(exc):
        call()
