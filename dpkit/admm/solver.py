"""Private consensus ADMM as a noisy Krasnosel'skii-Mann (relaxed Douglas-Rachford) iteration.

Problem: ``min_x (1/n) sum_i loss_i(x) + r(x)`` with one record per user. Consensus form
``sum_i loss_i(x_i)/n + r(z)`` s.t. ``x_i = z``; Douglas-Rachford on the product space with step
``gamma = n * step`` gives, per step (Cyffers, Bellet, Basu, ICML 2023, Sec. 4, private ADMM as
the noisy KM iteration ``u <- u + lambda (R_f R_r u - u) + noise`` of their Sec. 3)::

    z   = prox_{step r}(mean_i u_i)
    x_i = prox_{step loss_i}(2 z - u_i)                    (users taking part)
    u_i = u_i + 2 lambda clip_L(x_i - z) + N(0, (sigma * 4 lambda L)^2 I)

``lambda`` in (0, 1) is the KM relaxation. Replacing one user's data changes its update by at
most ``2 lambda * 2L`` (both clipped vectors lie in the L-ball), so the noise std is ``sigma`` times
that replace-one sensitivity. Clipping leaves the fixed points unchanged (at a fixed point
``x_i = z``), and with ``sigma = 0``, ``L = inf`` this is exact ADMM.

Variants (who takes part in a step):
* ``"centralized"``: every user, every step (``T = max_iter`` steps, ``q = 1``).
* ``"federated"``: each client independently with probability ``q`` (Poisson client sampling);
  clients add their noise locally, so every message is itself a Gaussian mechanism (local DP).
* ``"decentralized"``: a token walks over the complete graph, visiting one uniformly random user
  per step; it carries ``mean_i u_i`` and the visited user updates it (``T = max_iter * n`` steps,
  ``q = 1/n``).

Accounting (:mod:`dpkit.admm.accounting`): every per-user state ``u_i`` is treated as released after
every step, so the next step is a function of released values and the user's data, and adaptive
RDP composition applies; see docs/admm.md for why the tighter bounds that keep ``u_i`` hidden are
not used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dpkit import _validate as v

VARIANTS = ("centralized", "federated", "decentralized")


@dataclass
class ADMMResult:
    """Outcome of :func:`private_admm`.

    Attributes:
        coef: final consensus model ``z`` (a function of the released states).
        duals: final per-user states ``u`` (n, p).
        steps: number of noisy steps ``T`` run (the accounting's step count).
        sampling_rate: per-step participation probability ``q`` of a given user.
        noise_multiplier: ``sigma`` (noise std / replace-one sensitivity).
        noise_std: per-coordinate std of the noise added to a participating user's update.
        sensitivity: replace-one sensitivity ``4 * relaxation * clip`` of one user's update.
        history: consensus model after each round (rounds for decentralized = epochs), if recorded.
    """

    coef: np.ndarray
    duals: np.ndarray
    steps: int
    sampling_rate: float
    noise_multiplier: float
    noise_std: float
    sensitivity: float
    history: list = field(default_factory=list)


def _check_data(X, y):
    X = np.asarray(X, dtype=float)
    y = np.asarray(y, dtype=float)
    if X.ndim != 2 or X.shape[0] < 1 or X.shape[1] < 1:
        raise ValueError(f"X must be a non-empty 2-D array; got shape {X.shape}")
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        raise ValueError(f"y must be a 1-D array with {X.shape[0]} entries; got shape {y.shape}")
    if not (np.all(np.isfinite(X)) and np.all(np.isfinite(y))):
        raise ValueError("X and y must be finite (no NaN or inf)")
    return X, y


def _clip_rows(D, clip):
    if np.isinf(clip):
        return D
    norms = np.linalg.norm(D, axis=1, keepdims=True)
    return D * np.minimum(1.0, clip / np.maximum(norms, 1e-300))


def private_admm(X, y, loss_prox, reg_prox, *, noise_multiplier, clip, variant="centralized",
                 relaxation=0.5, step=1.0, max_iter=100, sampling_rate=None, penalized=None,
                 rng=None, record_history=False) -> ADMMResult:
    """Run private consensus ADMM (noisy relaxed Douglas-Rachford) on one record per user.

    Args:
        X: (n, p) features, one row per user.  y: (n,) targets.
        loss_prox: ``loss_prox(V, step, X, y) -> (m, p)`` (see :mod:`dpkit.admm.prox`).
        reg_prox: ``reg_prox(v, step, penalized) -> (p,)`` (see :mod:`dpkit.admm.prox`).
        noise_multiplier: ``sigma >= 0``; the noise std is ``sigma * 4 * relaxation * clip``.
        clip: ``L > 0`` bound on ``||x_i - z||`` used in the update; ``float('inf')`` (no clipping)
            only with ``noise_multiplier = 0``.
        variant: ``"centralized"``, ``"federated"`` or ``"decentralized"``.
        relaxation: KM relaxation ``lambda`` in (0, 1).
        step: prox step (> 0) of both the loss and the regulariser (``gamma / n``).
        max_iter: rounds (>= 1); for ``"decentralized"`` passes over the data (``max_iter * n`` steps).
        sampling_rate: client sampling probability ``q`` in (0, 1] (``"federated"`` only; required there).
        penalized: optional boolean mask (p,) of coordinates the regulariser acts on.
        rng: ``numpy.random.Generator`` or int seed (or None) for sampling and noise.
        record_history: keep the consensus model after every round.

    Returns:
        :class:`ADMMResult`.

    Raises:
        ValueError / TypeError: invalid arguments.
    """
    X, y = _check_data(X, y)
    n, p = X.shape
    v.one_of("variant", variant, VARIANTS)
    sigma = v.non_negative("noise_multiplier", noise_multiplier)
    L = v.positive("clip", clip, allow_inf=True)
    if np.isinf(L) and sigma > 0:
        raise ValueError("clip must be finite when noise_multiplier > 0 (unbounded sensitivity); got inf")
    lam = v.probability("relaxation", relaxation, allow_one=False)
    step = v.positive("step", step)
    max_iter = v.positive_int("max_iter", max_iter)
    if variant == "federated":
        if sampling_rate is None:
            raise ValueError("sampling_rate must be given for variant='federated'; got None")
        q = v.probability("sampling_rate", sampling_rate)
    elif sampling_rate is not None:
        raise ValueError(f"sampling_rate must be None for variant={variant!r}; got {sampling_rate!r}")
    else:
        q = 1.0 if variant == "centralized" else 1.0 / n
    if not callable(loss_prox) or not callable(reg_prox):
        raise TypeError("loss_prox and reg_prox must be callables")
    if penalized is not None:
        penalized = np.asarray(penalized, dtype=bool)
        if penalized.shape != (p,):
            raise ValueError(f"penalized must be a boolean mask of shape ({p},); got {penalized.shape}")
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)

    sens = 4.0 * lam * L if np.isfinite(L) else float("inf")
    noise_std = sigma * sens if sigma > 0 else 0.0
    u = np.zeros((n, p))
    ubar = np.zeros(p)
    history = []

    def z_of(mean_u):
        return reg_prox(mean_u, step, penalized)

    def update(idx, z):
        # one noisy KM step for the users in idx; returns the change of their states
        x = loss_prox(2.0 * z - u[idx], step, X[idx], y[idx])
        du = 2.0 * lam * _clip_rows(x - z, L)
        if noise_std > 0:
            du = du + noise_std * rng.standard_normal(du.shape)
        return du

    if variant == "decentralized":
        steps = max_iter * n
        for _ in range(max_iter):
            for k in rng.integers(n, size=n):
                du = update(np.array([k]), z_of(ubar))
                u[k] += du[0]
                ubar += du[0] / n
            if record_history:
                history.append(z_of(ubar))
    else:
        steps = max_iter
        everyone = np.arange(n)
        for _ in range(max_iter):
            idx = everyone if variant == "centralized" else np.flatnonzero(rng.random(n) < q)
            if idx.size:
                du = update(idx, z_of(ubar))
                u[idx] += du
                ubar = u.mean(axis=0)
            if record_history:
                history.append(z_of(ubar))
    return ADMMResult(coef=z_of(ubar), duals=u, steps=steps, sampling_rate=q,
                      noise_multiplier=sigma, noise_std=noise_std, sensitivity=sens,
                      history=history)
