"""DP proximal SGD: the baseline private ADMM is compared with (Cyffers et al. 2023, Fig. 1).

Step: ``x <- prox_{eta r}(x - eta * (sum_{i in B} clip_C(grad_i) + N(0, (sigma * 2C)^2 I)) / (q n))``
with Poisson batches of rate ``q`` and the PUBLIC normaliser ``q n``. The noise std is ``sigma``
times the replace-one sensitivity ``2C`` of the clipped sum, so
``admm_epsilon(sigma, steps, delta, variant="federated", sampling_rate=q)`` (same neighbouring
relation as private ADMM) accounts it; the prox is post-processing.
"""

from __future__ import annotations

import numpy as np

from dpkit import _validate as v
from dpkit.admm.solver import _check_data, _clip_rows, as_generator


def squared_loss_grad(w, X, y):
    """Per-example gradients of ``0.5 (y_i - <x_i, w>)^2``: rows ``-(y_i - <x_i, w>) x_i``."""
    return -(y - X @ w)[:, None] * X


def logistic_loss_grad(w, X, y):
    """Per-example gradients of ``log(1 + exp(-y_i <x_i, w>))`` (labels in {-1, +1})."""
    return -(y * np.exp(-np.logaddexp(0.0, y * (X @ w))))[:, None] * X


def dp_proximal_sgd(X, y, grad_fn, reg_prox, *, noise_multiplier, clip, learning_rate, steps,
                    sampling_rate=1.0, penalized=None, rng=None):
    """Run DP proximal SGD and return the last iterate.

    Args:
        X: (n, p) features.  y: (n,) targets.
        grad_fn: ``grad_fn(w, X, y) -> (m, p)`` per-example gradients.
        reg_prox: ``reg_prox(v, step, penalized) -> (p,)`` (see :mod:`dpkit.admm.prox`).
        noise_multiplier: ``sigma >= 0`` (noise std over the replace-one sensitivity ``2 * clip``).
        clip: per-example gradient norm bound ``C > 0``.
        learning_rate: ``eta > 0``.  steps: number of steps (>= 1).
        sampling_rate: Poisson sampling rate ``q`` in (0, 1].
        penalized: optional boolean mask of regularised coordinates.
        rng: None (default: OS entropy), a numpy Generator, or an int seed for tests (warns:
            ``SeededRandomnessWarning``).

    Returns:
        (p,) final iterate.

    Raises:
        ValueError / TypeError: invalid arguments.

    Resume: one call without a checkpoint; a restart is a new run and a new release.
    """
    X, y = _check_data(X, y)
    n, p = X.shape
    sigma = v.non_negative("noise_multiplier", noise_multiplier)
    C = v.positive("clip", clip)
    eta = v.positive("learning_rate", learning_rate)
    steps = v.positive_int("steps", steps)
    q = v.probability("sampling_rate", sampling_rate)
    rng = as_generator("rng", rng)
    w = np.zeros(p)
    for _ in range(steps):
        idx = np.flatnonzero(rng.random(n) < q) if q < 1 else np.arange(n)
        total = _clip_rows(grad_fn(w, X[idx], y[idx]), C).sum(axis=0)
        if sigma > 0:
            total = total + sigma * 2.0 * C * rng.standard_normal(p)
        w = reg_prox(w - eta * total / (q * n), eta, penalized)
    return w
