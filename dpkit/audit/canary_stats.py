"""Canary directions and cosine statistics for one-shot estimation (numpy only).

Andrew et al. (ICLR 2024, "One-shot Empirical Privacy Estimation for Federated Learning",
Sec. 3-4) insert canaries whose contribution is an isotropically random unit direction. The test
statistic of a canary is the cosine between its direction and the released model delta (final-
model threat model) or the maximum over rounds of the cosine with each round's update (all-
iterates threat model). A canary that was never inserted is independent of the model, so its
cosine has mean 0 and variance exactly 1/d: the null distribution.

Directions are counter-based: canary ``i`` of seed ``s`` is drawn from a Philox generator keyed by
``s`` whose counter starts at block ``i``, so any canary can be regenerated alone, in any order,
on any machine, without materialising the others.
"""

from __future__ import annotations

import numbers

import numpy as np

from dpkit import _validate

_MAX_SEED = 2**128  # Philox key width


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer; got {seed!r} ({type(seed).__name__})")
    if not 0 <= int(seed) < _MAX_SEED:
        raise ValueError(f"seed must lie in [0, 2**128); got {seed!r}")
    return int(seed)


def _check_indices(indices) -> np.ndarray:
    if isinstance(indices, numbers.Integral) and not isinstance(indices, bool):
        count = _validate.positive_int("indices", indices)
        return np.arange(count, dtype=np.int64)
    arr = np.asarray(indices)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"indices must be a positive count or a non-empty 1-D array of integers; "
                         f"got {indices!r}")
    if np.any(arr < 0) or np.any(arr >= 2**63):
        raise ValueError(f"indices must be in [0, 2**63); got {indices!r}")
    return arr.astype(np.int64)


def canary_directions(seed, indices, dim, *, dtype=np.float64) -> np.ndarray:
    """Random unit vectors, one per canary, regenerable from (seed, canary index).

    Canary ``i`` is a standard normal vector in R^dim drawn from ``Philox(key=seed)`` with its
    counter starting at block ``i`` (the third 64-bit counter word), normalised to unit length;
    the directions are therefore uniform on the sphere (Andrew et al., ICLR 2024, Sec. 3).

    Args:
        seed: integer key in [0, 2**128).
        indices: a count ``k`` (canaries 0..k-1) or a 1-D array of canary indices.
        dim: dimension d ≥ 1 of the model / update vectors.
        dtype: float dtype of the result (default float64).

    Returns:
        ndarray of shape (len(indices), dim) with unit-norm rows.

    Raises:
        TypeError: seed or dim not an integer.
        ValueError: seed out of range, indices empty/negative/non-integer, dim < 1.
    """
    seed = _check_seed(seed)
    idx = _check_indices(indices)
    dim = _validate.positive_int("dim", dim)
    out = np.empty((idx.size, dim), dtype=dtype)
    for row, i in enumerate(idx):
        # block i of the counter: up to 2**128 draws per canary before blocks could overlap
        gen = np.random.Generator(np.random.Philox(key=seed, counter=[0, 0, int(i), 0]))
        v = gen.standard_normal(dim)
        out[row] = v / np.sqrt(np.square(v).sum())  # not BLAS: per-row dot calls are slow
    return out


def _check_directions(directions, dim: int) -> np.ndarray:
    dirs = np.asarray(directions, dtype=float)
    if dirs.ndim != 2 or dirs.shape[1] != dim or dirs.shape[0] == 0:
        raise ValueError(f"directions must be a non-empty 2-D array with {dim} columns; "
                         f"got shape {dirs.shape}")
    norms = np.linalg.norm(dirs, axis=1)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise ValueError("directions must have finite, non-zero rows")
    return dirs / norms[:, None]


def canary_cosines(vector, directions) -> np.ndarray:
    """Cosine between one vector (e.g. the final model delta) and each canary direction.

    Final-model statistic of Andrew et al. (ICLR 2024, Sec. 4).

    Args:
        vector: 1-D array of length d (the released model delta θ_T − θ_0).
        directions: (k, d) array of canary directions (normalised here if they are not unit).

    Returns:
        (k,) array of cosines in [-1, 1].

    Raises:
        ValueError: wrong shapes, a non-finite or all-zero vector, a zero direction.
    """
    vec = np.asarray(vector, dtype=float)
    if vec.ndim != 1 or vec.size == 0:
        raise ValueError(f"vector must be a non-empty 1-D array; got shape {vec.shape}")
    norm = np.linalg.norm(vec)
    if not np.isfinite(norm) or norm == 0:
        raise ValueError(f"vector must be finite and non-zero; got norm {norm!r}")
    dirs = _check_directions(directions, vec.size)
    return np.clip(dirs @ vec / norm, -1.0, 1.0)


def max_cosines_over_rounds(updates, directions) -> np.ndarray:
    """Per canary, the maximum over rounds of the cosine with each round's update.

    All-iterates statistic of Andrew et al. (ICLR 2024, Sec. 4): an adversary who sees every
    intermediate model can test each round separately. Rounds whose update is exactly zero carry
    no information and are skipped.

    Args:
        updates: (rounds, d) array, one model update per row (or an iterable of 1-D arrays).
        directions: (k, d) array of canary directions.

    Returns:
        (k,) array: max over rounds of the cosines.

    Raises:
        ValueError: wrong shapes, non-finite updates, or every update zero.
    """
    ups = np.asarray(updates if isinstance(updates, np.ndarray) else list(updates), dtype=float)
    if ups.ndim != 2 or ups.shape[0] == 0:
        raise ValueError(f"updates must be a non-empty 2-D array (rounds, d); got shape {ups.shape}")
    if not np.all(np.isfinite(ups)):
        raise ValueError("updates must be finite")
    norms = np.linalg.norm(ups, axis=1)
    keep = norms > 0
    if not np.any(keep):
        raise ValueError("updates must contain at least one non-zero round")
    dirs = _check_directions(directions, ups.shape[1])
    cos = (ups[keep] / norms[keep, None]) @ dirs.T  # (rounds, k)
    return np.clip(cos.max(axis=0), -1.0, 1.0)
