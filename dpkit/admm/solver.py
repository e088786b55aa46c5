"""Private consensus ADMM as a noisy Krasnosel'skii-Mann (relaxed Douglas-Rachford) iteration.

Problem: ``min_x (1/n) sum_i loss_i(x) + r(x)`` with one record per user. Consensus form
``sum_i loss_i(x_i)/n + r(z)`` s.t. ``x_i = z``; Douglas-Rachford on the product space with step
``gamma = n * step`` is the KM iteration ``u <- u + lambda (R_f R_r u - u)`` (Cyffers, Bellet, Basu,
ICML 2023, Sec. 3-4), i.e. per step::

    z   = prox_{step r}(w),  w = mean_i u_i
    x_i = prox_{step loss_i}(2 z - u_i)                    (users taking part)
    u_i = u_i + 2 lambda clip_L(x_i - z)

``lambda`` in (0, 1) is the KM relaxation. Clipping leaves the fixed points unchanged (at a fixed
point ``x_i = z``); with no noise and ``L = inf`` this is exact ADMM. Where the noise goes:

* ``"centralized"`` (trusted curator, every user every step): the curator keeps the ``u_i`` exact
  and releases only the noisy aggregate ``w_t = mean_i u_i + N(0, s^2 I)``; the next step uses
  ``z = prox(w_t)``. Every ``u_j`` is then a deterministic function of the released ``w`` and of
  user j's data, so adaptive composition applies; replacing user i changes ``u_i`` by at most
  ``4 lambda L`` per step, hence ``mean u`` at step t by at most ``4 lambda L t / n``.
  ``s = sigma * 4 lambda L / n`` (sigma = noise multiplier of the FIRST step).
* ``"federated"``: each client independently with probability ``q`` (Poisson client sampling)
  updates and adds ``N(0, (sigma * 4 lambda L)^2 I)`` to its own ``u_i`` before sending it: every
  message is itself a Gaussian mechanism (local DP); central DP gains from the sampling.
* ``"decentralized"``: a token walks over the complete graph, visiting one uniformly random user
  per step (``T = max_iter * n`` steps, ``q = 1/n``); the visited user adds the same local noise and
  updates the running mean carried by the token.

Accounting: :mod:`dpkit.admm.accounting` (per variant); docs/admm.md explains why the federated
and decentralized variants are accounted as if every ``u_i`` were released after every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dpkit import _validate as v
from dpkit.federated._seeds import resolve_seed

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
        noise_std: per-coordinate std of the noise: of the released aggregate (centralized) or
            of a participating user's update (federated, decentralized).
        sensitivity: replace-one sensitivity of ONE step's released quantity: ``4 lambda L / n``
            for the aggregate (centralized; it grows as ``t`` times this at step t), else
            ``4 lambda L`` for a user's update.
        released: last released aggregate ``w`` (centralized) or ``mean_i u_i`` (other variants).
        history: consensus model after each round (rounds for decentralized = passes), if recorded.
        seed: run seed; round t's sampling and noise come from the stream keyed by (seed, t).
        rounds: rounds (passes for decentralized) completed.
        settings: the arguments that a resumed run must repeat (checked by ``resume=``).
    """

    coef: np.ndarray
    duals: np.ndarray
    steps: int
    sampling_rate: float
    noise_multiplier: float
    noise_std: float
    sensitivity: float
    released: np.ndarray
    history: list = field(default_factory=list)
    seed: int = 0
    rounds: int = 0
    settings: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        """Checkpoint for ``private_admm(..., resume=state)``: seed, rounds done, the users'
        states ``u``, the released aggregate and the run's settings.

        SECRET: ``u`` holds every user's exact (un-noised) state and the seed regenerates the
        noise; store it as privately as the data (``pickle`` / ``torch.save``).
        """
        return {"seed": self.seed, "rounds": self.rounds, "duals": self.duals.copy(),
                "released": self.released.copy(), "history": [h.copy() for h in self.history],
                "settings": dict(self.settings)}


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


def as_generator(name: str, rng) -> np.random.Generator:
    """The run's numpy Generator: ``rng`` itself if it is one, else one seeded with OS entropy
    (None, the default) or with the integer ``rng`` — which emits
    :class:`~dpkit.errors.SeededRandomnessWarning` (it fixes the noise: tests only).

    Raises:
        TypeError, ValueError: ``rng`` is neither None, a Generator nor an integer ≥ 0.
    """
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(resolve_seed(name, rng))


def _clip_rows(D, clip):
    if np.isinf(clip):
        return D
    norms = np.linalg.norm(D, axis=1, keepdims=True)
    return D * np.minimum(1.0, clip / np.maximum(norms, 1e-300))


def _round_rng(seed: int, t: int) -> np.random.Generator:
    # counter-based: round t's draws depend on (seed, t) only, so a resumed run continues the
    # uninterrupted run's streams and never replays round 0's
    return np.random.default_rng(np.random.SeedSequence([seed, t]))


def private_admm(X, y, loss_prox, reg_prox, *, noise_multiplier, clip, variant="centralized",
                 relaxation=0.5, step=1.0, max_iter=100, sampling_rate=None, penalized=None,
                 rng=None, record_history=False, resume=None) -> ADMMResult:
    """Run private consensus ADMM (noisy relaxed Douglas-Rachford) on one record per user.

    Args:
        X: (n, p) features, one row per user.  y: (n,) targets.
        loss_prox: ``loss_prox(V, step, X, y) -> (m, p)`` (see :mod:`dpkit.admm.prox`).
        reg_prox: ``reg_prox(v, step, penalized) -> (p,)`` (see :mod:`dpkit.admm.prox`).
        noise_multiplier: ``sigma >= 0``; the noise std is ``sigma`` times :attr:`ADMMResult.sensitivity`
            (``4 * relaxation * clip / n`` centralized, ``4 * relaxation * clip`` otherwise).
        clip: ``L > 0`` bound on ``||x_i - z||`` used in the update; ``float('inf')`` (no clipping)
            only with ``noise_multiplier = 0``.
        variant: ``"centralized"``, ``"federated"`` or ``"decentralized"``.
        relaxation: KM relaxation ``lambda`` in (0, 1).
        step: prox step (> 0) of both the loss and the regulariser (``gamma / n``).
        max_iter: rounds (>= 1); for ``"decentralized"`` passes over the data (``max_iter * n`` steps).
        sampling_rate: client sampling probability ``q`` in (0, 1] (``"federated"`` only; required there).
        penalized: optional boolean mask (p,) of coordinates the regulariser acts on.
        rng: randomness of sampling and noise: None (default: OS entropy), a
            ``numpy.random.Generator`` (the caller's responsibility; the run seed is drawn from
            it), or an int seed for tests (emits ``SeededRandomnessWarning``). Round t uses the
            stream keyed by (seed, t).
        record_history: keep the consensus model after every round.
        resume: ``ADMMResult.state_dict()`` of an interrupted run with the same data and
            settings: rounds ``state["rounds"]`` .. ``max_iter``−1 are run, with the checkpoint's
            seed, exactly as the uninterrupted run of ``max_iter`` rounds would run them. ``rng``
            must then be None.

    Returns:
        :class:`ADMMResult`.

    Raises:
        ValueError / TypeError: invalid arguments.

    Resume: run ``max_iter = k`` rounds, keep ``result.state_dict()``, then call again with the
    full ``max_iter`` and ``resume=state``. ``result.steps`` always counts the rounds run so far
    from round 0, so :func:`~dpkit.admm.admm_epsilon` of it accounts the whole run (for the
    centralized variant the sensitivity grows with t: the account is that of one run of
    ``steps`` rounds, not of two runs). A restart WITHOUT ``resume`` is a new run and a new release.
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
    settings = {"variant": variant, "shape": (n, p), "noise_multiplier": sigma, "clip": L,
                "relaxation": lam, "step": step, "sampling_rate": q}
    if resume is None:
        seed = (int(rng.integers(2**63)) if isinstance(rng, np.random.Generator)
                else resolve_seed("rng", rng))
        start, u, w, history = 0, np.zeros((n, p)), np.zeros(p), []
    else:
        if rng is not None:
            raise ValueError("rng must be None with resume= (the checkpoint holds the run seed); "
                             f"got {rng!r}")
        if not isinstance(resume, dict) or "settings" not in resume:
            raise TypeError("resume must be a dict from ADMMResult.state_dict()")
        if resume["settings"] != settings:
            raise ValueError("resume must come from a run with the same data shape and settings; "
                             f"checkpoint {resume['settings']!r}, this call {settings!r}")
        start = int(resume["rounds"])
        if start > max_iter:
            raise ValueError(f"max_iter must be >= the {start} rounds already run; got {max_iter}")
        seed, u, w = int(resume["seed"]), np.array(resume["duals"], dtype=float), np.array(resume["released"], dtype=float)
        history = [np.array(h) for h in resume["history"]]

    user_sens = 4.0 * lam * L if np.isfinite(L) else float("inf")
    sens = user_sens / n if variant == "centralized" else user_sens
    noise_std = sigma * sens if sigma > 0 else 0.0
    # w: the public aggregate, mean of u plus the curator's noise if centralized

    def update(idx, z, local_std, rng):
        # one KM step for the users in idx (local noise for federated / decentralized)
        x = np.asarray(loss_prox(2.0 * z - u[idx], step, X[idx], y[idx]), dtype=float)
        if x.shape != (idx.size, p) or not np.all(np.isfinite(x)):
            # a non-finite proximal point would defeat the clipping (inf * 0 = NaN)
            raise ValueError(f"loss_prox must return finite values of shape ({idx.size}, {p}); "
                             f"got shape {x.shape}")
        du = 2.0 * lam * _clip_rows(x - z, L)
        if local_std > 0:
            du = du + local_std * rng.standard_normal(du.shape)
        return du

    if variant == "decentralized":
        steps = max_iter * n
        for t in range(start, max_iter):
            rng = _round_rng(seed, t)
            for k in rng.integers(n, size=n):
                du = update(np.array([k]), reg_prox(w, step, penalized), noise_std, rng)
                u[k] += du[0]
                w = w + du[0] / n
            if record_history:
                history.append(reg_prox(w, step, penalized))
    else:
        steps = max_iter
        everyone = np.arange(n)
        local_std = noise_std if variant == "federated" else 0.0
        for t in range(start, max_iter):
            rng = _round_rng(seed, t)
            idx = everyone if variant == "centralized" else np.flatnonzero(rng.random(n) < q)
            if idx.size:
                u[idx] += update(idx, reg_prox(w, step, penalized), local_std, rng)
            w = u.mean(axis=0)
            if variant == "centralized" and noise_std > 0:
                w = w + noise_std * rng.standard_normal(p)
            if record_history:
                history.append(reg_prox(w, step, penalized))
    return ADMMResult(coef=reg_prox(w, step, penalized), duals=u, steps=steps, sampling_rate=q,
                      noise_multiplier=sigma, noise_std=noise_std, sensitivity=sens, released=w,
                      history=history, seed=seed, rounds=max_iter, settings=settings)
