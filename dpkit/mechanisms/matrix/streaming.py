"""Streaming correlated noise ``(M z)_t`` for a matrix-factorisation strategy, bounded memory.

Each standard normal vector ``z_k`` is regenerated on demand from the counter ``(seed, k, tensor
index)`` with a freshly seeded ``torch.Generator`` (counter-based randomness), so nothing but the
strategy's own recursion state is stored (a BLT step is one GEMV over its buffers plus one fused
buffer update; memory traffic over the buffers is all it adds to drawing z_t):

=========  ======================================================  ==========================
kind       recursion for step t                                    stored tensors (per param)
=========  ======================================================  ==========================
banded     w_t = (z_t − Σ_{k=1}^{b−1} C[t,t−k] w_{t−k}) / C[t,t]   b − 1 past outputs
blt        w_t = z_t + Σ_j ω_j s_j;  s_j ← θ_j s_j + z_t           d buffers
tree       stack of completed-node estimates; w_t = P_t − P_{t−1}  ≤ log2(n) + 2
toeplitz   w_t = Σ_{k≤t} r_{t−k} z_k (z_k regenerated)             none (O(t) time per step)
dense      w_t = Σ_{k≤t} C⁻¹[t, k] z_k (z_k regenerated)           none (O(t) time per step)
=========  ======================================================  ==========================
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from dpkit import _validate
from dpkit.mechanisms.matrix.strategies import Strategy
from dpkit.mechanisms.noise import NoiseMechanism
from dpkit.mechanisms.randomness import fresh_seed, keyed_generator


def counter_normal(seed: int, key: int, index: int, like: torch.Tensor,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal tensor shaped like ``like``, determined by ``(seed, key, index)``.

    Args:
        seed: stream seed.
        key: noise counter (the step, or a tree node's key).
        index: position of the tensor in the parameter list.
        like: reference tensor (shape and device).
        dtype: dtype of the draw (default ``like.dtype``).

    Returns:
        A tensor of i.i.d. N(0, 1) entries.
    """
    g = keyed_generator(seed, key, index, device=like.device)
    return torch.randn(like.shape, generator=g, dtype=dtype or like.dtype, device=like.device)


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class CorrelatedNoise(NoiseMechanism):
    """Streaming matrix-factorisation noise: ``sample(t, like)`` returns ``sens·(M z)_t``.

    ``sens`` is the L2 sensitivity of the encoder C under ``participation`` (clip norm 1), so that
    the optimizer's ``σ·clip·sens·(M z)_t`` makes the release equivalent to ``C x + σ·clip·sens·z``,
    a Gaussian mechanism with noise multiplier σ relative to the sensitivity; for the identity
    strategy this is exactly DP-SGD's noise (Denisov et al., NeurIPS 2022, §3; Choquette-Choo et al.,
    ICML 2023, §2). Steps must be requested in order 0, 1, 2, ... (a repeat of the last step
    returns the same noise, so callers must not modify the returned tensors in place).

    Args:
        strategy: a :class:`~dpkit.mechanisms.matrix.strategies.Strategy`.
        participation: a :class:`~dpkit.mechanisms.matrix.sensitivity.Participation` used for
            ``sens`` (default single participation); ignored when ``sensitivity`` is given.
        seed: integer seed of the counter-based stream; ``None`` draws 63 bits from
            ``os.urandom`` (the seed is part of :meth:`state_dict`: keep checkpoints secret).
        sensitivity: override the computed sensitivity (must be >= the true one to stay private).

    Raises:
        TypeError, ValueError: bad arguments.
    """

    def __init__(self, strategy: Strategy, *, participation=None, seed: int | None = None,
                 sensitivity: float | None = None):
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a dpkit matrix Strategy; got {type(strategy).__name__}")
        if seed is None:
            seed = fresh_seed()
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None; got {seed!r}")
        elif seed < 0:
            raise ValueError(f"seed must be >= 0; got {seed!r}")
        self.strategy = strategy
        self.seed = seed
        self.sensitivity = (strategy.sensitivity(participation) if sensitivity is None
                            else _validate.positive("sensitivity", sensitivity))
        if strategy.kind == "banded":
            self._coef = strategy.band_coefficients()
        self._reset()

    def _reset(self):
        self._next = 0
        self._last = None        # (step, outputs) to answer a repeated request
        self._past = deque()     # banded: last b-1 outputs (unit scale), newest last
        self._buffers = None     # blt: list over params of (d, *shape) tensors
        self._stack = []         # tree: [(level, [tensors])]
        self._prev_prefix = None  # tree: P_{t-1}

    def _z(self, key, like, dtype):
        return [counter_normal(self.seed, key, i, ref, dtype) for i, ref in enumerate(like)]

    def sample(self, step, like):
        step = _validate.positive_int("step", step, allow_zero=True)
        like = list(like)
        if self._last is not None and step == self._last[0]:
            return [w.clone() for w in self._last[1]]
        if step != self._next:
            raise ValueError(f"step must be the next step {self._next} (or a repeat of the last); "
                             f"got {step}. Correlated noise is a stream: restore with load_state_dict")
        if step >= self.strategy.n:
            raise ValueError(f"step must be < the strategy's n={self.strategy.n}; got {step}")
        dtypes = [_work_dtype(ref) for ref in like]
        unit = getattr(self, f"_step_{self.strategy.kind}")(step, like, dtypes)
        # banded outputs are kept as recursion state: scale a copy; every other kind's are fresh
        kept = self.strategy.kind == "banded" and self._coef.shape[1] > 1
        out = [(w * self.sensitivity if kept else w.mul_(self.sensitivity)).to(ref.dtype)
               for w, ref in zip(unit, like)]
        self._next = step + 1
        self._last = (step, out)  # the caller must not modify the returned tensors in place
        return out

    def _step_banded(self, t, like, dtypes):
        coef = self._coef[t]
        w = [zi.to(dt) for zi, dt in zip(self._z(t, like, None), dtypes)]
        for k, past in enumerate(reversed(self._past), start=1):
            if k < coef.size and coef[k] != 0.0:
                for wi, pi in zip(w, past):
                    wi.sub_(pi, alpha=float(coef[k]))  # in place: w is a fresh draw
        if coef[0] != 1.0:
            for wi in w:
                wi.div_(float(coef[0]))
        if self._coef.shape[1] > 1:
            self._past.append(w)
            if len(self._past) > self._coef.shape[1] - 1:
                self._past.popleft()
        return w

    def _step_blt(self, t, like, dtypes):
        s = self.strategy
        z = [zi.to(dt) for zi, dt in zip(self._z(t, like, None), dtypes)]
        if self._buffers is None:
            self._buffers = [torch.zeros((s.theta.size, *ref.shape), dtype=dt, device=ref.device)
                             for ref, dt in zip(like, dtypes)]
        out = []
        for i, zi in enumerate(z):
            buf = self._buffers[i].view(s.theta.size, -1)  # (d, numel): one pass per operation
            omega = torch.as_tensor(s.omega, dtype=buf.dtype, device=buf.device)
            theta = torch.as_tensor(s.theta, dtype=buf.dtype, device=buf.device).unsqueeze(1)
            flat = zi.reshape(-1)
            out.append(torch.addmv(flat, buf.t(), omega).view(zi.shape))  # z_t + Σ_j ω_j s_j
            torch.addcmul(flat, buf, theta, out=buf)                       # s_j ← θ_j s_j + z_t
        return out

    def _step_toeplitz(self, t, like, dtypes):
        r = self.strategy.inverse_coefficients
        out = [torch.zeros(ref.shape, dtype=dt, device=ref.device) for ref, dt in zip(like, dtypes)]
        for k in range(t + 1):
            if r[t - k] != 0.0:
                for o, zi in zip(out, self._z(k, like, None)):
                    o.add_(zi.to(o.dtype), alpha=float(r[t - k]))
        return out

    def _step_dense(self, t, like, dtypes):
        row = self.strategy._M[t]
        out = [torch.zeros(ref.shape, dtype=dt, device=ref.device) for ref, dt in zip(like, dtypes)]
        for k in np.nonzero(row[:t + 1])[0]:
            for o, zi in zip(out, self._z(int(k), like, None)):
                o.add_(zi.to(o.dtype), alpha=float(row[k]))
        return out

    def _step_tree(self, t, like, dtypes):
        s = self.strategy
        leaf = [zi.to(dt) for zi, dt in zip(self._z(s.node_key(t, 0), like, None), dtypes)]
        self._stack.append((0, leaf))
        while len(self._stack) >= 2 and self._stack[-1][0] == self._stack[-2][0]:
            lvl = self._stack[-1][0] + 1
            (_, right), (_, left) = self._stack.pop(), self._stack.pop()
            y = [zi.to(dt) for zi, dt in zip(self._z(s.node_key(t, lvl), like, None), dtypes)]
            w = s.merge_weight(lvl)
            if w == 1.0:
                est = y
            else:
                est = [w * yi + (1 - w) * (li + ri) for yi, li, ri in zip(y, left, right)]
            self._stack.append((lvl, est))
        prefix = [sum(e[i] for _, e in self._stack) for i in range(len(like))]
        prev = self._prev_prefix or [torch.zeros_like(p) for p in prefix]
        self._prev_prefix = prefix
        return [p - q for p, q in zip(prefix, prev)]

    def state_dict(self):
        """Seed, next step and the recursion state (tensors cloned)."""
        def clone(ts):
            return None if ts is None else [x.clone() for x in ts]
        return {
            "seed": self.seed, "next_step": self._next, "sensitivity": self.sensitivity,
            "strategy": (self.strategy.kind, self.strategy.n, self.strategy.name),
            "last": None if self._last is None else (self._last[0], clone(self._last[1])),
            "past": [clone(p) for p in self._past],
            "buffers": clone(self._buffers),
            "stack": [(lvl, clone(e)) for lvl, e in self._stack],
            "prev_prefix": clone(self._prev_prefix),
        }

    def load_state_dict(self, state):
        """Restore :meth:`state_dict` (the strategy must be the same one).

        Raises:
            ValueError: the state belongs to a different strategy.
        """
        key = (self.strategy.kind, self.strategy.n, self.strategy.name)
        if tuple(state["strategy"]) != key:
            raise ValueError(f"state must come from a {key} strategy; got {tuple(state['strategy'])}")
        self._reset()
        self.seed = int(state["seed"])
        self.sensitivity = float(state["sensitivity"])
        self._next = int(state["next_step"])
        self._last = None if state["last"] is None else (state["last"][0], list(state["last"][1]))
        self._past = deque(list(p) for p in state["past"])
        self._buffers = None if state["buffers"] is None else list(state["buffers"])
        self._stack = [(lvl, list(e)) for lvl, e in state["stack"]]
        self._prev_prefix = None if state["prev_prefix"] is None else list(state["prev_prefix"])


def dense_noise_matrix(strategy: Strategy, seed: int, like: torch.Tensor) -> np.ndarray:
    """Z (m × like.numel()) from the same counters as :class:`CorrelatedNoise` (for references).

    Row k is ``counter_normal(seed, key_k, 0, like)`` flattened, with key_k the step for square
    strategies and the node key for trees.
    """
    if strategy.kind == "tree":
        keys = [strategy.node_key(t, lvl) for t, lvl in strategy.nodes]
    else:
        keys = range(strategy.n)
    return np.stack([counter_normal(seed, k, 0, like, torch.float64).reshape(-1).cpu().numpy()
                     for k in keys])
