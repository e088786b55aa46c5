"""Workload matrices A (n×n, lower-triangular): what a DP-FTRL run releases, as a linear map of the
per-step clipped gradient sums.

The model after step t is θ_t = θ_0 − (A g)_t, so A is the prefix-sum matrix for plain SGD with
unit learning rate, and a weighted prefix sum with a learning-rate schedule or momentum
(Denisov et al., NeurIPS 2022, §2; Choquette-Choo et al., "Multi-Epoch Matrix Factorization
Mechanisms for Private ML", ICML 2023, §2).
"""

from __future__ import annotations

import numpy as np

from dpkit import _validate


def prefix_sum(n: int) -> np.ndarray:
    """Prefix-sum workload: the lower-triangular all-ones matrix.

    Args:
        n: number of steps.

    Returns:
        ``(n, n)`` float64 array with ``A[i, j] = 1`` for ``j <= i``.

    Raises:
        TypeError, ValueError: ``n`` is not a positive integer.
    """
    n = _validate.positive_int("n", n)
    return np.tril(np.ones((n, n)))


def momentum_prefix_sum(n: int, *, momentum: float = 0.0, learning_rates=None) -> np.ndarray:
    """Learning-rate and heavy-ball-momentum weighted prefix sums.

    With ``m_t = β m_{t-1} + g_t`` and ``θ_t = θ_{t-1} − η_t m_t``, the model is
    ``θ_t = θ_0 − Σ_{j≤t} A[t, j] g_j`` with ``A[t, j] = Σ_{k=j}^{t} η_k β^{k-j}``
    (Denisov et al. 2022, eq. for momentum workloads).

    Args:
        n: number of steps.
        momentum: β in [0, 1).
        learning_rates: optional length-``n`` sequence of positive η_t (default all ones).

    Returns:
        ``(n, n)`` float64 lower-triangular array.

    Raises:
        TypeError, ValueError: bad ``n``, ``momentum`` or ``learning_rates``.
    """
    n = _validate.positive_int("n", n)
    beta = _validate.non_negative("momentum", momentum)
    if beta >= 1:
        raise ValueError(f"momentum must lie in [0, 1); got {momentum!r}")
    if learning_rates is None:
        eta = np.ones(n)
    else:
        eta = np.asarray(learning_rates, dtype=float)
        if eta.shape != (n,) or not np.all(np.isfinite(eta)) or np.any(eta <= 0):
            raise ValueError(
                f"learning_rates must be {n} finite positive numbers; got shape {eta.shape}")
    k = np.arange(n)
    # decay[k, j] = β^{k-j} for k >= j; A[t, j] = Σ_{k=j}^{t} η_k β^{k-j} = cumsum over k.
    diff = k[:, None] - k[None, :]
    decay = np.where(diff >= 0, beta ** np.clip(diff, 0, None), 0.0)
    return np.cumsum(eta[:, None] * decay, axis=0)
