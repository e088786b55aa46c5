"""Factorisation strategies for the matrix mechanism: identity (DP-SGD), binary tree (plain and
Honaker), b-banded (BandMF), Toeplitz (square-root factorisation) and BLT.

A strategy is an encoder ``C`` (m×n) and its gradient-space noise operator ``M`` (n×m) with
``C M = I`` restricted to what is released: training adds ``σ·clip·sens·(M z)_t`` to the clipped
gradient sum at step t, so a run with workload A releases ``A(x + σ sens M z) = A x + σ sens B z``
with decoder ``B = A M`` and ``B C = A`` (Denisov et al., NeurIPS 2022; Choquette-Choo et al.,
ICML 2023). For square lower-triangular C, ``M = C⁻¹``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import linalg, optimize, signal

from dpkit import _validate
from dpkit.mechanisms.matrix.sensitivity import (_as_matrix, _check_participation,
                                                 sensitivity as _sensitivity, workload_errors)
from dpkit.mechanisms.matrix.workloads import prefix_sum


class Strategy:
    """Base class: a factorisation for ``n`` steps.

    Attributes:
        n: number of steps.
        name: short label used in tables.
        kind: streaming structure: ``"banded"``, ``"tree"``, ``"toeplitz"`` or ``"blt"``.
    """

    kind = "dense"

    def __init__(self, n: int, name: str):
        self.n = _validate.positive_int("n", n)
        self.name = name

    def encoder(self) -> np.ndarray:
        """Dense encoder ``C`` (m×n)."""
        raise NotImplementedError

    def noise_operator(self) -> np.ndarray:
        """Dense gradient-space noise operator ``M`` (n×m): step t gets ``(M z)_t``."""
        raise NotImplementedError

    def sensitivity(self, participation=None) -> float:
        """L2 sensitivity of ``C`` (see :func:`dpkit.mechanisms.matrix.sensitivity`)."""
        return _sensitivity(self.encoder(), participation)

    def errors(self, workload=None, participation=None) -> dict:
        """Max and mean squared error of ``workload`` (default prefix sums) per unit σ·clip.

        Returns:
            dict with keys ``"max"`` and ``"mean"``.
        """
        A = prefix_sum(self.n) if workload is None else np.asarray(workload, float)
        if A.shape != (self.n, self.n):
            raise ValueError(f"workload must have shape ({self.n}, {self.n}); got {A.shape}")
        return workload_errors(A, self.noise_operator(), self.sensitivity(participation))

    def __repr__(self):
        return f"{type(self).__name__}(n={self.n}, name={self.name!r})"


class BandedStrategy(Strategy):
    """Square lower-triangular b-banded encoder (identity when b = 1); ``M = C⁻¹``.

    Streams with ``b − 1`` past noise vectors by forward substitution.

    Args:
        C: ``(n, n)`` lower-triangular array with ``C[i, j] = 0`` for ``i − j >= bands`` and a
            positive diagonal.
        name: label.

    Raises:
        ValueError: ``C`` is not square, lower-triangular, banded as claimed, or has a
            non-positive diagonal.
    """

    kind = "banded"

    def __init__(self, C, *, name: str = "banded"):
        C = _as_matrix("C", C)
        n = C.shape[0]
        if C.shape != (n, n):
            raise ValueError(f"C must be square; got shape {C.shape}")
        if np.any(np.triu(C, 1) != 0):
            raise ValueError("C must be lower-triangular (causal); it has entries above the diagonal")
        if np.any(np.diag(C) <= 0):
            raise ValueError("C must have a positive diagonal (invertible, causal)")
        super().__init__(n, name)
        offsets = np.nonzero(np.tril(C))
        self.bands = int((offsets[0] - offsets[1]).max()) + 1
        self._C = C

    def encoder(self):
        return self._C.copy()

    def noise_operator(self):
        return linalg.solve_triangular(self._C, np.eye(self.n), lower=True)

    def band_coefficients(self) -> np.ndarray:
        """``(n, bands)`` array: ``[t, k] = C[t, t − k]`` (0 where ``t − k < 0``)."""
        out = np.zeros((self.n, self.bands))
        for k in range(self.bands):
            out[k:, k] = np.diagonal(self._C, -k)
        return out


def identity(n: int) -> BandedStrategy:
    """The identity factorisation ``C = I``: i.i.d. noise, i.e. DP-SGD.

    Raises:
        TypeError, ValueError: ``n`` is not a positive integer.
    """
    n = _validate.positive_int("n", n)
    return BandedStrategy(np.eye(n), name="identity")


def _toeplitz_inverse_impulse(c: np.ndarray, n: int) -> np.ndarray:
    """First n coefficients of the power series 1 / c(x) (c[0] > 0)."""
    impulse = np.zeros(n)
    impulse[0] = 1.0
    return signal.lfilter([1.0], c, impulse)


def _banded_objective(tail: np.ndarray, n: int, A: np.ndarray | None) -> float:
    c = np.concatenate([[1.0], tail])
    r = _toeplitz_inverse_impulse(c, n)
    if A is None:  # prefix sums: A C⁻¹ is Toeplitz with coefficients cumsum(r)
        q = np.cumsum(r)
        frob = float(np.sum((n - np.arange(n)) * q * q))
    else:  # rows x of A C⁻¹ solve x C = a: backward recursion along each row
        X = signal.lfilter([1.0], c, A[:, ::-1], axis=1)[:, ::-1]
        frob = float(np.sum(X * X))
    val = float(c @ c) * frob  # sens² (max column norm² = ‖c‖²) × squared error
    return val if np.isfinite(val) else 1e300


GENERAL_BANDED_MAX_N = 512  # banded(toeplitz=None) optimises every band entry up to this n


def banded(n: int, bands: int, *, workload=None, normalize_columns: bool = True,
           toeplitz: bool | None = None, maxiter: int = 200) -> BandedStrategy:
    """BandMF: a b-banded lower-triangular encoder optimised for the workload's mean error.

    Two families (Choquette-Choo et al., "(Amplified) Banded Matrix Factorization", NeurIPS 2023,
    §3; McKenna, "Scaling up the Banded Matrix Factorization Mechanism", arXiv 2405.15913):

    * general (``toeplitz=False``): every band entry is free. Optimised as the convex problem
      min tr(AᵀA X⁻¹) over X = CᵀC ≻ 0 with diag(X) = 1 and X_uv = 0 for |u − v| >= b (the
      b-banded Gram matrices are exactly those of b-banded C with unit columns), by projected
      gradient descent from the Toeplitz solution, then C = reverse Cholesky of X. Unit columns,
      so sens = 1 (single participation) and sqrt(k) under b-min-separation. O(n³) per iteration.
    * Toeplitz (``toeplitz=True``): minimises ``‖c‖²·‖A C⁻¹‖_F²`` over the band coefficients
      ``c_1..c_{b−1}`` (``c_0 = 1``) with L-BFGS from the truncated square-root factorisation,
      O(n·b) per evaluation for prefix sums; then optionally rescales columns to unit norm.
      Within 0.5% of the general optimum for n >= 1000, b <= 32 (McKenna 2024).

    Args:
        n: steps.
        bands: b >= 1 (b = 1 is the identity / DP-SGD).
        workload: ``(n, n)`` workload, default prefix sums.
        normalize_columns: rescale columns to unit L2 norm (the general family always has them).
        toeplitz: the family; ``None`` chooses general for n <= ``GENERAL_BANDED_MAX_N`` (512)
            when ``normalize_columns`` is set, Toeplitz otherwise.
        maxiter: iterations of the optimiser.

    Returns:
        A :class:`BandedStrategy`.

    Raises:
        TypeError, ValueError: bad arguments (``toeplitz=False`` with ``normalize_columns=False``).
    """
    n = _validate.positive_int("n", n)
    bands = _validate.positive_int("bands", bands)
    maxiter = _validate.positive_int("maxiter", maxiter)
    if bands > n:
        raise ValueError(f"bands must be <= n ({n}); got {bands}")
    if toeplitz is not None and not isinstance(toeplitz, bool):
        raise TypeError(f"toeplitz must be a bool or None; got {toeplitz!r}")
    if toeplitz is False and not normalize_columns:
        raise ValueError("toeplitz=False optimises column-normalised encoders; got normalize_columns=False")
    if toeplitz is None:
        toeplitz = not (normalize_columns and n <= GENERAL_BANDED_MAX_N)
    A = None
    if workload is not None:
        A = np.asarray(workload, float)
        if A.shape != (n, n):
            raise ValueError(f"workload must have shape ({n}, {n}); got {A.shape}")
    init = _sqrt_coefficients(bands)[1:]
    if bands > 1:
        res = optimize.minimize(_banded_objective, init, args=(n, A), method="L-BFGS-B",
                                options={"maxiter": maxiter})
        tail = res.x if res.fun <= _banded_objective(init, n, A) else init
    else:
        tail = init
    c = np.concatenate([[1.0], tail])
    C = np.zeros((n, n))
    for k, ck in enumerate(c):
        C += np.diag(np.full(n - k, ck), -k)
    if normalize_columns:
        C = C / np.linalg.norm(C, axis=0)
    if toeplitz or bands == 1:
        return BandedStrategy(C, name=f"banded(b={bands})")
    idx = np.arange(n)
    within = np.abs(idx[:, None] - idx[None, :]) < bands
    X = _optimize_gram(prefix_sum(n) if A is None else A, within, C.T @ C, maxiter)
    C = _reverse_cholesky(X)
    C[~np.tril(within)] = 0.0  # exact zeros outside the band (Cholesky keeps the bandwidth)
    return BandedStrategy(C, name=f"banded(b={bands}, general)")


def _sqrt_coefficients(n: int) -> np.ndarray:
    """Coefficients of (1 − x)^{-1/2}: c_k = binom(2k, k) / 4^k (C·C = prefix sums)."""
    c = np.ones(n)
    for k in range(1, n):
        c[k] = c[k - 1] * (2 * k - 1) / (2 * k)
    return c


def _series_inverse(r: np.ndarray, n: int) -> np.ndarray:
    """First n coefficients of 1 / r(x) by Newton iteration with FFT products, O(n log n)."""
    g = np.array([1.0 / r[0]])
    m = 1
    while m < n:
        m = min(2 * m, n)
        size = 1 << (3 * m - 1).bit_length()
        R = np.fft.rfft(r[:m], size)
        G = np.fft.rfft(g, size)
        rg = np.fft.irfft(R * G, size)[:m]
        corr = np.fft.irfft(np.fft.rfft(rg, size) * G, size)[:m]
        g = np.concatenate([g, np.zeros(m - g.size)])
        g = 2 * g - corr
    return g[:n]


class ToeplitzStrategy(Strategy):
    """Lower-triangular Toeplitz encoder given by its inverse's coefficients (``M = C⁻¹``).

    Works on coefficient vectors (O(n) memory, FFT arithmetic) so errors and single-participation
    sensitivity scale past 10,000 steps; dense matrices are built only on request. Streaming costs
    O(t) noise regenerations at step t (use :func:`blt` for O(1)).

    Args:
        inverse_coefficients: ``r`` with ``C⁻¹[i, j] = r[i − j]``, ``r[0] > 0``, length n.
        name: label.
    """

    kind = "toeplitz"

    def __init__(self, inverse_coefficients, *, name: str = "toeplitz"):
        r = np.asarray(inverse_coefficients, dtype=float)
        if r.ndim != 1 or r.size == 0 or not np.all(np.isfinite(r)) or r[0] <= 0:
            raise ValueError("inverse_coefficients must be a non-empty finite 1-D array with a "
                             "positive first entry")
        super().__init__(r.size, name)
        self.inverse_coefficients = r
        self.coefficients = _series_inverse(r, r.size)

    @staticmethod
    def _toeplitz(v):
        n = v.size
        idx = np.arange(n)
        diff = idx[:, None] - idx[None, :]
        return np.where(diff >= 0, v[np.clip(diff, 0, None)], 0.0)

    def encoder(self):
        return self._toeplitz(self.coefficients)

    def noise_operator(self):
        return self._toeplitz(self.inverse_coefficients)

    def sensitivity(self, participation=None):
        p = _check_participation(participation)
        if p.kind == "single":  # every column is a prefix of the first one
            return float(np.linalg.norm(self.coefficients))
        return super().sensitivity(p)

    def errors(self, workload=None, participation=None):
        if workload is not None:
            return super().errors(workload, participation)
        q = np.cumsum(self.inverse_coefficients)  # A C⁻¹ is Toeplitz with coefficients q
        s2 = self.sensitivity(participation) ** 2
        n = self.n
        return {"max": float(np.sum(q * q)) * s2,
                "mean": float(np.sum((n - np.arange(n)) * q * q)) / n * s2}


def toeplitz_sqrt(n: int) -> ToeplitzStrategy:
    """The square-root factorisation of prefix sums: ``C = A^{1/2}`` (Toeplitz, ``C·C = A``).

    ``C⁻¹`` has the coefficients of (1 − x)^{1/2}. Near-optimal for single participation
    (Fichtenberger, Henzinger, Upadhyay, ICML 2023; Henzinger et al., SODA 2024).

    Raises:
        TypeError, ValueError: ``n`` is not a positive integer.
    """
    n = _validate.positive_int("n", n)
    r = np.ones(n)
    for k in range(1, n):
        r[k] = r[k - 1] * (k - 1.5) / k
    return ToeplitzStrategy(r, name="toeplitz-sqrt")


class BLTStrategy(ToeplitzStrategy):
    """Buffered linear Toeplitz ``C⁻¹``: r_0 = 1, r_m = Σ_j ω_j θ_j^{m−1} (m >= 1).

    Streams ``(C⁻¹ z)_t = z_t + Σ_j ω_j s_j`` with d buffers ``s_j ← θ_j s_j + z_t``
    (Dvijotham, McMahan, Pillutla, Steinke, Thakurta, "Efficient and Near-Optimal Noise
    Generation for Streaming Differential Privacy", FOCS 2024; McKenna, "Scaling up the Banded
    Matrix Factorization Mechanism", 2024).

    Args:
        n: steps.
        theta: buffer decays, each in (0, 1).
        omega: buffer output weights.
    """

    kind = "blt"

    def __init__(self, n: int, theta, omega, *, name: str = "blt"):
        n = _validate.positive_int("n", n)
        theta = np.asarray(theta, float).ravel()
        omega = np.asarray(omega, float).ravel()
        if theta.shape != omega.shape or theta.size == 0:
            raise ValueError("theta and omega must be non-empty and of equal length; got "
                             f"{theta.size} and {omega.size}")
        if not (np.all(theta > 0) and np.all(theta < 1)):
            raise ValueError(f"theta must lie in (0, 1); got {theta.tolist()}")
        if not np.all(np.isfinite(omega)):
            raise ValueError("omega must be finite")
        self.theta, self.omega = theta, omega
        super().__init__(_blt_coefficients(theta, omega, n), name=name)


def _blt_coefficients(theta, omega, n):
    m = np.arange(n - 1, dtype=float)
    r = np.empty(n)
    r[0] = 1.0
    r[1:] = (omega[None, :] * theta[None, :] ** m[:, None]).sum(axis=1)
    return r


def _rational_series(zeros: np.ndarray, poles: np.ndarray, n: int) -> np.ndarray:
    """First n coefficients of Π_j (1 − zeros_j x) / Π_j (1 − poles_j x) (exact recursion)."""
    impulse = np.zeros(n)
    impulse[0] = 1.0
    return signal.lfilter(np.poly(zeros), np.poly(poles), impulse)


def _blt_log_loss(x: np.ndarray, n: int, d: int, weights: np.ndarray) -> tuple[float, np.ndarray]:
    """log(‖c‖² · Σ_k w_k q_k²) and its gradient in the logits ``x`` of (zeros, poles) of C⁻¹.

    C⁻¹(x) = Π(1 − ζ_j x) / Π(1 − θ_j x) with ζ, θ ∈ (0, 1): C⁻¹ and C = 1 / C⁻¹ are both
    stable BLTs (the "buffer-decay pair" parameterisation of McKenna, arXiv 2404.16706 / jax_privacy),
    so every iterate is a valid strategy. r = series of C⁻¹, c = series of C, q = cumsum(r):
    ‖c‖² is the single-participation sensitivity², Σ w_k q_k² the prefix-sum error (w = 1: max
    error, the last row; w_k = (n − k)/n: mean error). ∂(N/D)/∂ζ_j = −x (N/D)/(1 − ζ_j x) and
    ∂(N/D)/∂θ_j = +x (N/D)/(1 − θ_j x) give the derivatives of r and c as O(n) recursions.
    """
    t = 1.0 / (1.0 + np.exp(-np.clip(x, -40, 40)))
    r = _rational_series(t[:d], t[d:], n)
    c = _rational_series(t[d:], t[:d], n)
    q = np.cumsum(r)
    cc, err = float(c @ c), float(np.sum(weights * q * q))
    f = cc * err
    if not np.isfinite(f) or f <= 0:
        return 1e300, np.zeros_like(x)
    wq = np.cumsum((weights * q)[::-1])[::-1]  # adjoint of cumsum: Σ_k w_k q_k dq_k = wq · dr
    shift_r, shift_c = np.concatenate([[0.0], r[:-1]]), np.concatenate([[0.0], c[:-1]])
    grad = np.empty(2 * d)
    for j in range(2 * d):
        sign = -1.0 if j < d else 1.0
        dr = sign * signal.lfilter([1.0], [1.0, -t[j]], shift_r)
        dc = -sign * signal.lfilter([1.0], [1.0, -t[j]], shift_c)
        grad[j] = 2.0 * (err * float(c @ dc) + cc * float(wq @ dr)) / f
    return math.log(f), grad * t * (1 - t)


def _blt_from_pair(zeros: np.ndarray, poles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(θ, ω) of C⁻¹ = Π(1 − ζx)/Π(1 − θx) = 1 + Σ_j ω_j x / (1 − θ_j x) (partial fractions)."""
    omega = np.empty_like(poles)
    for j, th in enumerate(poles):
        others = np.delete(poles, j)
        omega[j] = th * np.prod(1.0 - zeros / th) / np.prod(1.0 - others / th)
    return poles, omega


def blt(n: int, buffers: int = 4, *, error: str = "mean", maxiter: int = 1000) -> BLTStrategy:
    """A BLT strategy with ``buffers`` buffers optimised for prefix sums (single participation).

    Minimises sensitivity² × error, ``‖c‖²·Σ_k w_k q_k²`` (q = cumsum of C⁻¹'s coefficients; w = 1
    for the max error over steps, which is the last step's; w_k = (n − k)/n for the mean), over
    the zeros and poles of C⁻¹ (both in (0, 1), so C and C⁻¹ stay stable BLTs; McKenna, "Scaling
    up the Banded Matrix Factorization Mechanism", arXiv 2404.16706, and Dvijotham et al., FOCS
    2024) with L-BFGS and an analytic gradient from O(n·buffers) recursions, from three
    interlaced geometric spreads of decays; the best is kept. Runs in well under a second at
    n = 10,000. Matches jax_privacy 2.0's ``buffered_toeplitz.optimize`` losses (see the tests).

    Args:
        n: steps.
        buffers: d >= 1.
        error: ``"mean"`` or ``"max"`` squared prefix-sum error.
        maxiter: L-BFGS iterations per start.

    Returns:
        A :class:`BLTStrategy`.

    Raises:
        TypeError, ValueError: bad arguments.
    """
    n = _validate.positive_int("n", n)
    d = _validate.positive_int("buffers", buffers)
    maxiter = _validate.positive_int("maxiter", maxiter)
    _validate.one_of("error", error, {"mean", "max"})
    weights = np.ones(n) if error == "max" else (n - np.arange(n)) / n
    best = None
    for low in (0.5, 1.0, 2.0):  # decays 1 − low/n ... 0.2, alternating zero / pole of C⁻¹
        decays = np.clip(1.0 - np.geomspace(low / n, 0.8, 2 * d), 0.1, None)
        t0 = np.concatenate([decays[0::2], decays[1::2]])
        res = optimize.minimize(_blt_log_loss, np.log(t0 / (1 - t0)), args=(n, d, weights), jac=True,
                                method="L-BFGS-B", options={"maxiter": maxiter})
        if best is None or res.fun < best.fun:
            best = res
    t = 1.0 / (1.0 + np.exp(-np.clip(best.x, -40, 40)))
    theta, omega = _blt_from_pair(t[:d], t[d:])
    return BLTStrategy(n, theta, omega, name=f"blt(d={d}, {error})")


class TreeStrategy(Strategy):
    """Binary-tree aggregation: one noisy node per dyadic interval completed within n steps.

    Node (level ℓ, index i) covers steps [i·2^ℓ, (i+1)·2^ℓ − 1] and is released at its last step.
    The causal decoder estimates the prefix [0, t] from the maximal completed nodes (binary
    decomposition of t+1); with ``honaker=True`` each such node's value is first replaced by
    the minimum-variance unbiased estimate from its whole (completed) subtree, computed bottom-up
    by inverse-variance weighting (Honaker, "Efficient Use of Differentially Private Binary
    Trees", 2015; Kairouz et al., ICML 2021, Appendix). Streams with O(log n) node estimates.

    Args:
        n: steps.
        honaker: use Honaker's variance reduction.
    """

    kind = "tree"

    def __init__(self, n: int, *, honaker: bool = False):
        if not isinstance(honaker, bool):
            raise TypeError(f"honaker must be a bool; got {honaker!r}")
        super().__init__(n, "tree-honaker" if honaker else "tree")
        self.honaker = honaker
        self.levels = int(math.floor(math.log2(self.n))) + 1
        # nodes ordered by release step, then level: id = step·levels + level
        nodes = []
        for t in range(self.n):
            for lvl in range(self.levels):
                if (t + 1) % (1 << lvl) == 0:
                    nodes.append((t, lvl))
        self.nodes = nodes
        self.node_index = {nd: i for i, nd in enumerate(nodes)}

    def node_key(self, step: int, level: int) -> int:
        """Counter used to draw node noise: unique per (release step, level)."""
        return step * self.levels + level

    def encoder(self):
        C = np.zeros((len(self.nodes), self.n))
        for row, (t, lvl) in enumerate(self.nodes):
            C[row, t + 1 - (1 << lvl):t + 1] = 1.0
        return C

    def merge_weight(self, level: int) -> float:
        """Weight of a node's own noisy value in Honaker's bottom-up estimate (1 if plain)."""
        if not self.honaker or level == 0:
            return 1.0
        v = self.estimate_variance(level - 1)
        return 2 * v / (1 + 2 * v)

    def estimate_variance(self, level: int) -> float:
        """Variance (unit node noise) of a completed node's estimate at ``level``."""
        v = 1.0
        if self.honaker:
            for _ in range(level):
                v = 2 * v / (1 + 2 * v)
        return v

    def decoder_prefix(self) -> np.ndarray:
        """Dense causal decoder for prefix sums, (n × m): row t estimates Σ_{j≤t} x_j."""
        m = len(self.nodes)
        B = np.zeros((self.n, m))
        stack = []  # (level, coefficient vector over nodes)
        for t in range(self.n):
            e = np.zeros(m)
            e[self.node_index[(t, 0)]] = 1.0
            stack.append((0, e))
            while len(stack) >= 2 and stack[-1][0] == stack[-2][0]:
                lvl = stack[-1][0] + 1
                (_, right), (_, left) = stack.pop(), stack.pop()
                y = np.zeros(m)
                y[self.node_index[(t, lvl)]] = 1.0
                w = self.merge_weight(lvl)
                stack.append((lvl, w * y + (1 - w) * (left + right)))
            B[t] = sum(v for _, v in stack)
        return B

    def noise_operator(self):
        B = self.decoder_prefix()
        return np.diff(B, axis=0, prepend=0.0)  # A⁻¹ B for prefix sums: successive differences


def binary_tree(n: int, *, honaker: bool = True) -> TreeStrategy:
    """Binary-tree DP-FTRL strategy (see :class:`TreeStrategy`).

    Raises:
        TypeError, ValueError: bad arguments.
    """
    return TreeStrategy(n, honaker=honaker)


class DenseStrategy(Strategy):
    """Any square lower-triangular invertible encoder, streamed by regenerating past noise.

    Step t costs O(t) counter-based draws and stores nothing (``M = C⁻¹`` is kept, n×n).

    Args:
        C: ``(n, n)`` lower-triangular array with a positive diagonal.
        name: label.
    """

    kind = "dense"

    def __init__(self, C, *, name: str = "dense"):
        C = _as_matrix("C", C)
        n = C.shape[0]
        if C.shape != (n, n) or np.any(np.triu(C, 1) != 0) or np.any(np.diag(C) <= 0):
            raise ValueError("C must be square lower-triangular with a positive diagonal; got "
                             f"shape {C.shape}")
        super().__init__(n, name)
        self._C = C
        self._M = linalg.solve_triangular(C, np.eye(n), lower=True)

    def encoder(self):
        return self._C.copy()

    def noise_operator(self):
        return self._M.copy()


def _reverse_cholesky(X: np.ndarray) -> np.ndarray:
    """Lower-triangular C with CᵀC = X (Cholesky of the index-reversed X, reversed back)."""
    L = np.linalg.cholesky(X[::-1, ::-1])
    return L.T[::-1, ::-1].copy()


def _optimize_gram(A: np.ndarray, mask: np.ndarray, X: np.ndarray, maxiter: int) -> np.ndarray:
    """Minimise tr(AᵀA X⁻¹) over X ≻ 0 with diag(X) = 1 and X_uv = 0 where ``mask`` is False.

    Projected gradient descent on the free entries (gradient −X⁻¹AᵀAX⁻¹ = −G Gᵀ with
    G = X⁻¹Aᵀ = L⁻ᵀ(L⁻¹Aᵀ), L = chol(X): two triangular solves and one product, ≈ 3.3 n³ flops),
    Barzilai–Borwein steps and Armijo backtracking that also keeps X positive definite (a trial
    costs one Cholesky and one triangular solve). The objective is convex in X, so this converges
    to the global optimum; every iterate is feasible. Starts from ``X`` (made feasible).
    """
    mask = mask.copy()
    np.fill_diagonal(mask, False)  # diag(X) = 1 is fixed
    X = np.where(mask, X, 0.0)
    np.fill_diagonal(X, 1.0)
    At = np.ascontiguousarray(A.T)

    def value(X):
        try:
            L = linalg.cholesky(X, lower=True, check_finite=False)
        except linalg.LinAlgError:
            return None
        H = linalg.solve_triangular(L, At, lower=True, check_finite=False)
        return float(np.sum(H * H)), L, H

    def gradient(L, H):
        G = linalg.solve_triangular(L, H, lower=True, trans="T", check_finite=False)
        return np.where(mask, -(G @ G.T), 0.0)

    f, L, H = value(X)
    D = gradient(L, H)
    step = 0.1 / max(np.abs(D).max(), 1e-300)
    for _ in range(maxiter):
        gnorm2 = float(np.sum(D * D))
        if gnorm2 == 0.0:
            break
        while True:
            trial = X - step * D
            out = value(trial)
            if out is not None and out[0] <= f - 1e-4 * step * gnorm2:
                break
            step *= 0.5
            if step < 1e-18:
                return X
        f_new, L, H = out
        D_new = gradient(L, H)
        s_vec, y_vec = trial - X, D_new - D
        sy = float(np.sum(s_vec * y_vec))
        X, D = trial, D_new
        converged = f - f_new <= 1e-9 * f
        f = f_new
        if converged:
            break
        step = float(np.sum(s_vec * s_vec)) / sy if sy > 0 else step * 2.0
    return X


def multi_epoch(n: int, separation: int, *, workload=None, constraint: str = "cyclic",
                maxiter: int = 100) -> DenseStrategy:
    """Optimal multi-epoch factorisation: minimise tr(AᵀA X⁻¹) over X = CᵀC ≻ 0 with a sensitivity
    fixed by linear constraints, then C = reverse Cholesky of X.

    Constraints (Choquette-Choo et al., "Multi-Epoch Matrix Factorization Mechanisms for Private
    ML", ICML 2023, §3 and eq. (4)): ``diag(X) = 1`` and

    * ``"cyclic"``: ``X_uv = 0`` for u ≠ v in the same participation pattern (u ≡ v mod b), so
      under cyclic (k, b)-participation ``sens² = Σ_{u∈π} X_uu = k`` exactly;
    * ``"min_separation"``: ``X_uv = 0`` for ``|u − v| >= b``, so under b-min-separation with k
      participations ``sens² = k`` exactly (the X-banded family of BandMF).

    The free entries are optimised by projected gradient descent (gradient ``−X⁻¹ AᵀA X⁻¹``,
    Barzilai–Borwein steps, Armijo backtracking that also keeps X positive definite), starting
    from the column-normalised BandMF with b bands (feasible for both constraints), so the result
    is never worse than BandMF on this objective. O(n³) per iteration.

    Args:
        n: steps.
        separation: b (participations are b steps apart; k = ceil(n/b) epochs).
        workload: ``(n, n)`` workload (default prefix sums).
        constraint: ``"cyclic"`` or ``"min_separation"``.
        maxiter: gradient iterations.

    Returns:
        A :class:`DenseStrategy` with unit column norms.

    Raises:
        TypeError, ValueError: bad arguments.
    """
    n = _validate.positive_int("n", n)
    b = _validate.positive_int("separation", separation)
    maxiter = _validate.positive_int("maxiter", maxiter)
    _validate.one_of("constraint", constraint, {"cyclic", "min_separation"})
    if b > n:
        raise ValueError(f"separation must be <= n ({n}); got {b}")
    A = prefix_sum(n) if workload is None else np.asarray(workload, float)
    if A.shape != (n, n):
        raise ValueError(f"workload must have shape ({n}, {n}); got {A.shape}")
    idx = np.arange(n)
    diff = np.abs(idx[:, None] - idx[None, :])
    mask = (diff % b != 0) if constraint == "cyclic" else (diff < b)
    start = banded(n, min(b, n), workload=workload, toeplitz=True).encoder()
    X = _optimize_gram(A, mask, start.T @ start, maxiter)
    C = _reverse_cholesky(X)
    C[np.triu_indices(n, 1)] = 0.0
    return DenseStrategy(C, name=f"multi-epoch({constraint}, b={b})")
