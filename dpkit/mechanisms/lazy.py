"""Lazy noise for embedding rows: closed forms over skipped steps and counter-based Gaussian keys.

LazyDP (Lim, Kwon, Hwang, Maeng, Suh, Rhu, ASPLOS 2024, Sec. 5 "lazy noise update" and
"aggregated noise sampling"): in DP-SGD every row of an embedding table receives fresh Gaussian
noise every step, although only the rows of the batch receive a gradient. A row that no example
touches evolves by a LINEAR Gaussian recursion, so the noise of all the steps it skipped can be
applied in one go, just before the row is read again, with exactly the distribution eager DP-SGD
would have produced.

For plain SGD with learning rate η_t and (decoupled-by-SGD, i.e. L2) weight decay λ_t, eager
DP-SGD updates an untouched row w at step t as

    w_{t+1} = (1 − η_t λ_t) w_t − η_t · s · z_t,       z_t ~ N(0, I_d),  s = σ·C / B̄,

so over the skipped steps [a, b) (writing L_t = Σ_{u<t} log(1 − η_u λ_u))

    w_b = exp(L_b − L_a) · w_a  −  s · Σ_{u=a}^{b−1} η_u exp(L_b − L_{u+1}) z_u
        = exp(L_b − L_a) · w_a  +  N(0, s² · V(a, b) · I_d),
    V(a, b) = Σ_{u=a}^{b−1} η_u² exp(2 (L_b − L_{u+1})).

With λ = 0 and constant η this is the paper's N(0, k·η²s²) for k skipped steps.

Numerics: L and the prefix sums S_t = Σ_{u<t} η_u² exp(−2 L_{u+1}) are kept as double-double
(hi, lo) pairs accumulated with error-free TwoSum, so V(a, b) = exp(2 L_b)(S_b − S_a) loses no
accuracy to cancellation (relative error ≈ 1e-16, not 1e-16 · S_a / (S_b − S_a)). exp(−2L) grows
with the number of steps when λ > 0; :class:`StepHistory` asks for a rebase (a flush of every row
followed by a reset of the prefix arrays) before it can overflow.

Randomness. The default source, :class:`GaussianRowNoise`, makes ONE aggregated draw of
N(0, V(a, b)·I_d) per row and range from a sequential ``torch.Generator`` stream on the table's
device (never re-seeded; its state is checkpointed through the optimizer's ``state_dict``, so a
resumed run continues the stream and never replays noise). Every draw is a fresh, independent
standard normal vector, so the weights have exactly eager DP-SGD's distribution; what is given up
is order independence (the same seed gives the same run only for the same sequence of reads).

Where the noise must be regenerable independently of the order of reads,
:class:`CounterGaussianRowNoise` computes the standard normal vector of (table, row, [a, b)) as a
pure function of (seed, table, row, a, b) with the Philox4x32-10 counter-based generator (Salmon,
Moraes, Dror, Shaw, SC 2011 "Parallel random numbers: as easy as 1, 2, 3") vectorised in numpy
uint64 arithmetic, then Box–Muller on 53-bit uniforms. Ranges of one row are disjoint, so every
draw has a distinct counter: independent across rows, tables and steps (as far as Philox is a
pseudo-random function), reproducible, and order-independent — and ≈ 10x slower than the stream.
"""

from __future__ import annotations

import abc
import hashlib
import math
import zlib

import numpy as np
import torch

from dpkit import _validate
from dpkit.mechanisms.noise import NoiseMechanism
from dpkit.mechanisms.randomness import mix

_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
MAX_COUNTER = 2**31 - 1  # rows and steps are stored as int32 by the optimizer-side state


def philox4x32(counter: tuple, key: tuple[int, int], rounds: int = 10) -> tuple:
    """Philox4x32 block function (Salmon et al., SC 2011, Sec. 4.2), vectorised over arrays.

    Args:
        counter: four arrays (or ints) of 32-bit words, broadcastable to a common shape.
        key: two 32-bit key words.
        rounds: number of rounds (10 is the standard, crush-resistant choice).

    Returns:
        Four ``np.uint64`` arrays holding 32-bit output words.
    """
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & np.uint64(_MASK32) for c in counter)
    c0, c1, c2, c3 = np.broadcast_arrays(c0, c1, c2, c3)
    k0, k1 = np.uint64(key[0] & _MASK32), np.uint64(key[1] & _MASK32)
    m0, m1, mask, sh = np.uint64(_PHILOX_M0), np.uint64(_PHILOX_M1), np.uint64(_MASK32), np.uint64(32)
    for _ in range(rounds):
        p0 = c0 * m0  # 32 x 32 -> 64 bits: exact in uint64
        p1 = c2 * m1
        c0, c1, c2, c3 = (p1 >> sh) ^ c1 ^ k0, p1 & mask, (p0 >> sh) ^ c3 ^ k1, p0 & mask
        k0 = np.uint64((int(k0) + _PHILOX_W0) & _MASK32)
        k1 = np.uint64((int(k1) + _PHILOX_W1) & _MASK32)
    return c0, c1, c2, c3


def philox_normal(key: tuple[int, int], rows: np.ndarray, starts: np.ndarray, stop: int,
                  dim: int) -> np.ndarray:
    """Standard normal vectors, one (dim,) vector per (row, [start, stop)) counter, float64.

    Counter words: (block index within the vector, row, start, stop); each Philox block gives two
    53-bit uniforms and, by Box–Muller, two independent N(0, 1) draws.
    """
    rows = np.asarray(rows, dtype=np.uint64).reshape(-1, 1)
    starts = np.asarray(starts, dtype=np.uint64).reshape(-1, 1)
    blocks = np.arange((dim + 1) // 2, dtype=np.uint64).reshape(1, -1)
    x0, x1, x2, x3 = philox4x32((blocks, rows, starts, np.uint64(stop)), key)
    scale = 2.0 ** -53
    u1 = (((x0 << np.uint64(21)) ^ (x1 >> np.uint64(11))).astype(np.float64) + 0.5) * scale
    u2 = (((x2 << np.uint64(21)) ^ (x3 >> np.uint64(11))).astype(np.float64) + 0.5) * scale
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = (2.0 * math.pi) * u2
    out = np.empty((rows.shape[0], blocks.shape[1], 2), dtype=np.float64)
    out[..., 0] = radius * np.cos(angle)
    out[..., 1] = radius * np.sin(angle)
    return out.reshape(rows.shape[0], -1)[:, :dim]


def _two_sum(a: float, b: float) -> tuple[float, float]:
    """Error-free transformation: a + b = s + e exactly (Knuth)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


class _DoubleDoublePrefix:
    """Growing prefix-sum array kept as hi + lo float64 pairs (compensated accumulation)."""

    def __init__(self):
        self.hi = np.zeros(16)
        self.lo = np.zeros(16)
        self.size = 1  # prefix[0] = 0
        self._hi, self._lo = 0.0, 0.0

    def append(self, term: float) -> None:
        s, e = _two_sum(self._hi, term)
        self._hi, self._lo = _two_sum(s, self._lo + e)
        if self.size == self.hi.shape[0]:
            self.hi = np.concatenate([self.hi, np.zeros_like(self.hi)])
            self.lo = np.concatenate([self.lo, np.zeros_like(self.lo)])
        self.hi[self.size], self.lo[self.size] = self._hi, self._lo
        self.size += 1

    def last(self) -> float:
        return self._hi + self._lo

    def diff(self, stop: int, starts: np.ndarray) -> np.ndarray:
        """prefix[stop] − prefix[starts] without cancellation error beyond one rounding."""
        return (self.hi[stop] - self.hi[starts]) + (self.lo[stop] - self.lo[starts])


class StepHistory:
    """Learning rates and weight decays of the steps since the last rebase, with closed forms.

    Steps are global indices t = 0, 1, ...; the arrays start at ``base`` (every row of the table
    must be noised up to at least ``base``: a rebase is always preceded by a full flush).

    Args:
        base: the first step the history covers.
        rebase_threshold: largest −(L_t − L_base) (in nats) before :meth:`needs_rebase` is True;
            exp(2 · threshold) must stay far below the float64 range.
    """

    def __init__(self, base: int = 0, rebase_threshold: float = 100.0):
        self.base = _validate.positive_int("base", base, allow_zero=True)
        self.rebase_threshold = _validate.positive("rebase_threshold", rebase_threshold)
        self._reset()

    def _reset(self):
        self.decays = False  # some recorded step has η·λ > 0 (else every decay factor is 1)
        self._lr = np.zeros(16)
        self._log_decay = _DoubleDoublePrefix()   # L_t − L_base
        self._scaled_sq = _DoubleDoublePrefix()   # S_t: Σ η_u² exp(−2 (L_{u+1} − L_base))

    @property
    def stop(self) -> int:
        """One past the last recorded step."""
        return self.base + self._log_decay.size - 1

    def append(self, lr: float, weight_decay: float) -> None:
        """Record the hyper-parameters of step ``self.stop``.

        Raises:
            ValueError: lr < 0, weight_decay < 0, or lr·weight_decay ≥ 1 (the SGD weight-decay
                factor 1 − η λ must stay positive for the geometric closed form).
        """
        lr = _validate.non_negative("lr", lr)
        weight_decay = _validate.non_negative("weight_decay", weight_decay)
        if lr * weight_decay >= 1.0:
            raise ValueError(f"lr * weight_decay must be < 1 for lazy embedding noise; got "
                             f"{lr} * {weight_decay} = {lr * weight_decay}")
        k = self._log_decay.size - 1
        if k == self._lr.shape[0]:
            self._lr = np.concatenate([self._lr, np.zeros_like(self._lr)])
        self._lr[k] = lr
        self.decays = self.decays or lr * weight_decay > 0.0
        self._log_decay.append(math.log1p(-lr * weight_decay))
        self._scaled_sq.append(lr * lr * math.exp(-2.0 * self._log_decay.last()))

    def needs_rebase(self) -> bool:
        """True when the prefix sums approach overflow (only with weight decay)."""
        return -self._log_decay.last() > self.rebase_threshold

    def rebase(self) -> None:
        """Forget the recorded steps; the caller has flushed every row to ``self.stop``."""
        self.base = self.stop
        self._reset()

    def _index(self, steps, stop: int):
        idx = np.asarray(steps, dtype=np.int64) - self.base
        if stop > self.stop or stop < self.base or (idx.size and (idx.min() < 0 or idx.max() > stop - self.base)):
            raise RuntimeError(f"steps outside the recorded history [{self.base}, {self.stop}]")
        return idx, stop - self.base

    def decay(self, starts, stop: int) -> np.ndarray:
        """exp(L_stop − L_start) per start: the weight-decay factor accumulated over [start, stop)."""
        idx, k = self._index(starts, stop)
        return np.exp(self._log_decay.diff(k, idx))

    def variance(self, starts, stop: int) -> np.ndarray:
        """V(start, stop) = Σ_{u=start}^{stop−1} η_u² exp(2 (L_stop − L_{u+1})) per start."""
        idx, k = self._index(starts, stop)
        return np.exp(2.0 * self._log_decay.diff(k, np.array(0))) * self._scaled_sq.diff(k, idx)

    def coefficients(self, steps, stop: int) -> np.ndarray:
        """η_u exp(L_stop − L_{u+1}) per step u < stop: the weight of z_u in the row at ``stop``."""
        idx, k = self._index(steps, stop)
        return self._lr[idx] * np.exp(self._log_decay.diff(k, idx + 1))


class MomentumSegment:
    """Closed forms for SGD with momentum over a stretch of steps with constant (η, λ, μ).

    Per coordinate, torch's SGD (dampening 0, no Nesterov) maps the pair x = (w, m) of weight and
    momentum buffer, with gradient G, to

        m' = μ m + G + λ w,   w' = w − η m'     i.e.   x' = A x + β G,
        A = [[1 − ηλ, −ημ], [λ, μ]],   β = (−η, 1).

    For an untouched row G = s z (s = σC/B̄), so over k skipped steps x ← A^k x + s·N(0, Q(k)) per
    coordinate, Q(k) = Σ_{j<k} A^j β βᵀ (A^j)ᵀ = A Q(k−1) Aᵀ + β βᵀ: exact joint (w, m) noise,
    with A^k and Q(k) cached by k. Whenever (η, λ, μ) changes the optimizer flushes every row and
    starts a new segment, so a range never spans two different A.

    Args:
        base: first step of the segment. lr, weight_decay, momentum: the segment's constants.
    """

    def __init__(self, base: int, lr: float, weight_decay: float, momentum: float):
        self.base = base
        self.params = (float(lr), float(weight_decay), float(momentum))
        eta, lam, mu = self.params
        self.A = np.array([[1.0 - eta * lam, -eta * mu], [lam, mu]])
        self.beta = np.array([-eta, 1.0])
        self.length = 0
        self._phi = np.zeros((16, 2, 2))  # A^k, k = 0..length
        self._cov = np.zeros((16, 2, 2))  # Q(k)
        self._phi[0] = np.eye(2)

    @property
    def stop(self) -> int:
        return self.base + self.length

    def append(self) -> None:
        """Record one more step of the segment."""
        k = self.length + 1
        if k == self._phi.shape[0]:
            self._phi = np.concatenate([self._phi, np.zeros_like(self._phi)])
            self._cov = np.concatenate([self._cov, np.zeros_like(self._cov)])
        self._phi[k] = self.A @ self._phi[k - 1]
        self._cov[k] = self.A @ self._cov[k - 1] @ self.A.T + np.outer(self.beta, self.beta)
        self.length = k

    def _k(self, starts, stop):
        k = stop - np.asarray(starts, dtype=np.int64)
        if stop > self.stop or (k.size and (k.min() < 0 or k.max() > self.length)):
            raise RuntimeError(f"steps outside the momentum segment [{self.base}, {self.stop}]")
        return k

    def transition(self, starts, stop: int) -> np.ndarray:
        """A^(stop − start) per start, shape (n, 2, 2)."""
        return self._phi[self._k(starts, stop)]

    def covariance(self, starts, stop: int) -> np.ndarray:
        """Q(stop − start) per start, shape (n, 2, 2)."""
        return self._cov[self._k(starts, stop)]

    def coefficients(self, steps, stop: int) -> np.ndarray:
        """A^(stop − u − 1) β per step u < stop, shape (n, 2): the weight of z_u in (w, m)."""
        return np.einsum("nij,j->ni", self._phi[self._k(np.asarray(steps) + 1, stop)], self.beta)


class RowNoise(abc.ABC):
    """Source of the pending noise of embedding rows.

    :meth:`combined` returns, for each row i, Σ_{u=starts_i}^{stop−1} c_u z_{row_i, u} with
    c_u = ``history.coefficients(u, stop)`` and z_{row, u} ~ N(0, I_dim) i.i.d. over (table, row,
    step): the noise eager DP-SGD would have left in the row, in units of σ·C/B̄.
    """

    @abc.abstractmethod
    def combined(self, table: str, rows: torch.Tensor, starts: torch.Tensor, stop: int,
                 history: StepHistory, shape: tuple[int, int], bulk: bool = False,
                 dtype: torch.dtype = torch.float64, scale: float = 1.0) -> torch.Tensor:
        """(len(rows), shape[1]) tensor of pending noise times ``scale``, of ``dtype`` on
        ``rows.device`` (see the class docstring; the caller's −σC/B̄ folds into the draw's scaling).

        ``bulk=True`` marks a flush of many rows: a source may then draw from a faster sequential
        stream, as long as every draw stays independent of all others.
        """

    def combined_pair(self, table: str, rows: torch.Tensor, starts: torch.Tensor, stop: int,
                      segment: MomentumSegment, shape: tuple[int, int], bulk: bool = False,
                      dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """(len(rows), 2, shape[1]) pending noise of (weight, momentum buffer), of ``dtype``:
        Σ_{u=starts_i}^{stop−1} A^(stop−u−1) β z_{row_i, u} (see :class:`MomentumSegment`)."""
        raise NotImplementedError(f"{type(self).__name__} does not support momentum")

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""


def _check_seed(seed) -> int:
    seed = _validate.positive_int("seed", seed, allow_zero=True)
    if seed >= 2**64:
        raise ValueError(f"seed must be < 2**64; got {seed}")
    return seed


def _pair_cholesky(q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(L11, L21, L22) of each 2x2 covariance in ``q`` (n, 2, 2); Q(1) = ββᵀ is singular (rank
    one): L22 = 0 there."""
    l11 = np.sqrt(q[:, 0, 0])
    l21 = np.divide(q[:, 1, 0], l11, out=np.zeros_like(l11), where=l11 > 0)
    l22 = np.sqrt(np.clip(q[:, 1, 1] - l21 ** 2, 0.0, None))
    return l11, l21, l22


def _correlate_pair(z: torch.Tensor, q: np.ndarray) -> torch.Tensor:
    """(n, 2, d) joint (weight, momentum) noise L z from standard normals ``z`` (n, 2d)."""
    d = z.shape[1] // 2
    l11, l21, l22 = (torch.from_numpy(v).to(z.device, z.dtype).unsqueeze(1) for v in _pair_cholesky(q))
    z1, z2 = z[:, :d], z[:, d:]
    return torch.stack([l11 * z1, l21 * z1 + l22 * z2], 1)


class GaussianRowNoise(RowNoise):
    """Aggregated Gaussian pending noise: ONE draw per (row, range) from a sequential stream.

    LazyDP's aggregated noise sampling (Lim et al., ASPLOS 2024, Sec. 5.2): the b − a eager draws
    of a row's skipped range [a, b) are replaced by one draw of N(0, V(a, b)·I_d)
    (:meth:`StepHistory.variance`; with momentum the exact 2x2 joint covariance of
    :class:`MomentumSegment`), taken from a ``torch.Generator`` on the table's device in the
    table's dtype. The generator is seeded once from ``seed`` and never re-seeded; its state is
    part of :meth:`state_dict`, so a resumed run continues the stream instead of replaying it.
    Every draw is fresh and independent, so the weights have eager DP-SGD's distribution exactly.
    The same seed reproduces a run only for the same sequence of reads; use
    :class:`CounterGaussianRowNoise` where draws must not depend on the order of reads.

    Args:
        seed: 0 ≤ seed < 2**64 (dpkit passes 63 bits of OS entropy unless a generator is given).
            Anyone who knows it and the stream position can regenerate the noise: checkpoints,
            which hold both, are as secret as the model before release.

    Raises:
        TypeError/ValueError: a bad seed.
    """

    def __init__(self, seed: int):
        self.seed = _check_seed(seed)
        self._generators: dict[str, torch.Generator] = {}

    def _generator(self, device) -> torch.Generator:
        key = str(torch.device(device))
        g = self._generators.get(key)
        if g is None:  # one stream per device, seeded apart from the other devices' streams
            g = torch.Generator(device=device)
            g.manual_seed(mix(self.seed, zlib.crc32(key.encode())))
            self._generators[key] = g
        return g

    def _normal(self, n: int, d: int, device, dtype) -> torch.Tensor:
        return torch.randn(n, d, generator=self._generator(device), device=device, dtype=dtype)

    def combined(self, table, rows, starts, stop, history, shape, bulk=False, dtype=torch.float64, scale=1.0):
        std = torch.from_numpy(scale * np.sqrt(history.variance(starts.cpu().numpy(), stop)))
        z = self._normal(rows.numel(), shape[1], rows.device, dtype)
        return z.mul_(std.to(rows.device, dtype).unsqueeze(1))

    def combined_pair(self, table, rows, starts, stop, segment, shape, bulk=False, dtype=torch.float64):
        q = segment.covariance(starts.cpu().numpy(), stop)
        return _correlate_pair(self._normal(rows.numel(), 2 * shape[1], rows.device, dtype), q)

    def state_dict(self):
        return {"seed": self.seed, "generators": {k: g.get_state() for k, g in self._generators.items()}}

    def load_state_dict(self, state):
        self.seed = _check_seed(int(state["seed"]))
        self._generators.clear()
        for device, gstate in state["generators"].items():
            self._generator(device).set_state(gstate)


class CounterGaussianRowNoise(RowNoise):
    """Aggregated Gaussian pending noise from Philox keyed by (seed, table, row, step range).

    One draw of N(0, V(a, b)·I) replaces the b − a eager draws (LazyDP's aggregated noise
    sampling); V comes from :meth:`StepHistory.variance`. The draw of a row's range depends only
    on (seed, table, row, range), never on the order of reads: choose this source (pass it as
    ``embedding_noise=``) where that reproducibility is needed. It is ≈ 10x slower than the
    default :class:`GaussianRowNoise` (numpy Philox on the CPU).

    Flushes (``bulk=True``: many rows at once) draw their standard normals instead from ONE
    sequential ``torch.Generator`` stream (MT19937) owned by this object, 3-8x faster than the
    numpy Philox; the stream is never re-seeded, so its draws never repeat, and it is part of
    :meth:`state_dict`. Both kinds of draw are independent of each other (distinct generators).

    Args:
        seed: 0 ≤ seed < 2**64. Anyone who knows it can regenerate the noise: keep it as secret
            as the model before release (it is part of ``optimizer.state_dict()``, like the eager
            generator state).

    Raises:
        TypeError/ValueError: a bad seed.
    """

    def __init__(self, seed: int):
        self.seed = _check_seed(seed)
        self._keys: dict[str, tuple[int, int]] = {}
        self._bulk = torch.Generator().manual_seed(int.from_bytes(
            hashlib.blake2b(f"{seed}:bulk".encode(), digest_size=8).digest(), "little"))

    def key(self, table: str) -> tuple[int, int]:
        """The Philox key of ``table``: 64 bits of BLAKE2b(seed, table name)."""
        if table not in self._keys:
            digest = hashlib.blake2b(f"{self.seed}:{table}".encode(), digest_size=8).digest()
            k = int.from_bytes(digest, "little")
            self._keys[table] = (k & _MASK32, k >> 32)
        return self._keys[table]

    def _normal(self, table, rows, starts_np, stop, d, bulk):
        if bulk:
            return torch.randn(rows.numel(), d, dtype=torch.float64, generator=self._bulk)
        return torch.from_numpy(philox_normal(self.key(table), rows.cpu().numpy(), starts_np, stop, d))

    def combined(self, table, rows, starts, stop, history, shape, bulk=False, dtype=torch.float64, scale=1.0):
        starts_np = starts.cpu().numpy()
        std = torch.from_numpy(scale * np.sqrt(history.variance(starts_np, stop)))
        z = self._normal(table, rows, starts_np, stop, shape[1], bulk)
        return (z * std.unsqueeze(1)).to(rows.device, dtype)

    def combined_pair(self, table, rows, starts, stop, segment, shape, bulk=False, dtype=torch.float64):
        starts_np = starts.cpu().numpy()
        z = self._normal(table, rows, starts_np, stop, 2 * shape[1], bulk)
        return _correlate_pair(z, segment.covariance(starts_np, stop)).to(rows.device, dtype)

    def state_dict(self):
        return {"seed": self.seed, "bulk_state": self._bulk.get_state()}

    def load_state_dict(self, state):
        self.seed = int(state["seed"])
        self._keys.clear()
        self._bulk.set_state(state["bulk_state"])


class ProbeRowNoise(RowNoise, NoiseMechanism):
    """Deterministic stand-in for Gaussian noise, to test lazy == eager exactly. NOT private.

    z_{u}[k] = sin(0.7·k + 1.3·u + 0.01·n) + 0.5·cos(0.11·k·(u + 1)) for coordinate k of a flattened
    tensor of n entries at step u: it varies with the step, the row and the column, so a lazy
    implementation that mis-weights or mis-aligns any step cannot reproduce the eager parameters.
    Use it as BOTH ``noise=`` (dense parameters, eager path) and ``embedding_noise=`` of
    :class:`dpkit.DPOptimizer`.
    """

    is_test_probe = True  # make_private warns that the run is not private

    @staticmethod
    def _value(step, flat_index, numel):
        step = step.to(torch.float64)
        flat_index = flat_index.to(torch.float64)
        return torch.sin(0.7 * flat_index + 1.3 * step + 0.01 * numel) + \
            0.5 * torch.cos(0.11 * flat_index * (step + 1))

    def sample(self, step, like):
        out = []
        for ref in like:
            idx = torch.arange(ref.numel(), device=ref.device)
            z = self._value(torch.tensor(step, device=ref.device), idx, ref.numel())
            out.append(z.reshape(ref.shape).to(ref.dtype))
        return out

    def _expand(self, rows, starts, stop, shape):
        counts = (stop - starts).cpu()
        owner = torch.repeat_interleave(torch.arange(rows.numel()), counts)
        first = torch.cumsum(counts, 0) - counts
        steps = starts.cpu()[owner] + torch.arange(int(counts.sum())) - first[owner]
        flat = rows.cpu()[owner].unsqueeze(1) * shape[1] + torch.arange(shape[1])
        return owner, steps, self._value(steps.unsqueeze(1), flat, shape[0] * shape[1])

    def combined_pair(self, table, rows, starts, stop, segment, shape, bulk=False, dtype=torch.float64):
        owner, steps, z = self._expand(rows, starts, stop, shape)
        coef = torch.from_numpy(segment.coefficients(steps.numpy(), stop))  # (n, 2)
        out = torch.zeros(rows.numel(), 2, shape[1], dtype=torch.float64)
        return out.index_add_(0, owner, coef.unsqueeze(2) * z.unsqueeze(1)).to(rows.device, dtype)

    def combined(self, table, rows, starts, stop, history, shape, bulk=False, dtype=torch.float64, scale=1.0):
        owner, steps, z = self._expand(rows, starts, stop, shape)
        coef = torch.from_numpy(scale * history.coefficients(steps.numpy(), stop))
        out = torch.zeros(rows.numel(), shape[1], dtype=torch.float64)
        return out.index_add_(0, owner, z * coef.unsqueeze(1)).to(rows.device, dtype)


__all__ = ["CounterGaussianRowNoise", "GaussianRowNoise", "MomentumSegment", "ProbeRowNoise", "RowNoise",
           "StepHistory", "philox4x32", "philox_normal"]
