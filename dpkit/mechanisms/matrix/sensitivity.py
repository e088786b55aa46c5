"""L2 sensitivity of the encoder x ↦ C x under participation schemas, and workload error metrics.

One example contributes a clipped gradient g_j (‖g_j‖ ≤ 1) at each step j where it participates,
so ``sens² = max_pattern max_g ‖Σ_j C[:, j] g_jᵀ‖_F² = max_pattern max_g Σ_{u,v} X_uv ⟨g_u, g_v⟩``
with ``X = CᵀC``. This is at most ``max_pattern Σ_{u,v∈pattern} |X_uv|``, with equality when
``X ≥ 0`` elementwise (take all g_j equal) — Choquette-Choo et al., "Multi-Epoch Matrix
Factorization Mechanisms for Private ML" (ICML 2023), §2 and Theorem 2.1 (the non-negative case).

Participation schemas (:class:`Participation`):

* ``single()``: each example takes part at most once — sens = max column norm.
* ``cyclic(b)``: fixed epoch order, example of group j takes part at steps j, j+b, j+2b, ...
  (k = ceil(n/b) epochs) — exact for ``X ≥ 0``, an upper bound otherwise.
* ``min_separation(b, k)``: at most k participations, any two at least b steps apart
  (b-min-separation) — a PROVEN upper bound computed by dynamic programming (see
  :func:`sensitivity`), exact when ``X ≥ 0`` and ``X_uv = 0`` for ``|u−v| ≥ b`` (e.g. a
  b-banded C, "(Amplified) Banded Matrix Factorization", NeurIPS 2023, Theorem 2).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from dpkit import _validate


@dataclasses.dataclass(frozen=True)
class Participation:
    """How often, and how far apart, one example may contribute to the n steps.

    Build with :meth:`single`, :meth:`cyclic` or :meth:`min_separation`.
    """

    kind: str
    separation: int = 1
    max_participations: int = 1

    @classmethod
    def single(cls) -> "Participation":
        """At most one participation in the whole run."""
        return cls("single", 1, 1)

    @classmethod
    def cyclic(cls, separation: int) -> "Participation":
        """Fixed epoch order: participations exactly ``separation`` steps apart, every epoch.

        Raises:
            TypeError, ValueError: ``separation`` is not a positive integer.
        """
        return cls("cyclic", _validate.positive_int("separation", separation), 0)

    @classmethod
    def min_separation(cls, separation: int, max_participations: int) -> "Participation":
        """At most ``max_participations`` participations, pairwise ``>= separation`` steps apart.

        Raises:
            TypeError, ValueError: either argument is not a positive integer.
        """
        return cls("min_separation", _validate.positive_int("separation", separation),
                   _validate.positive_int("max_participations", max_participations))


def _check_participation(participation) -> Participation:
    if participation is None:
        return Participation.single()
    if not isinstance(participation, Participation):
        raise TypeError("participation must be a Participation (Participation.single(), "
                        f".cyclic(b), .min_separation(b, k)); got {type(participation).__name__}")
    return participation


def _max_separated_sum(weights: np.ndarray, separation: int, k: int) -> np.ndarray:
    """Row-wise max of Σ_{j∈S} w[r, j] over sets S, |S| <= k, pairwise gaps >= separation.

    Dynamic programme over the columns, vectorised over rows: best[t][c] = best value using
    columns < t with c picks. ``weights`` must be >= 0 (so 'at most k' is monotone).
    """
    rows, n = weights.shape
    # Only the last `separation` DP layers are needed: keep a ring of them (memory O(b·rows·k)).
    ring = [np.zeros((rows, k + 1)) for _ in range(separation)]
    current = ring[0]
    for t in range(1, n + 1):
        back = ring[t % separation]  # holds layer t - separation (zeros = layer 0 when t < b)
        nxt = current.copy()
        nxt[:, 1:] = np.maximum(current[:, 1:], weights[:, t - 1][:, None] + back[:, :-1])
        ring[t % separation] = nxt
        current = nxt
    return current[:, k]


def sensitivity(C, participation: Participation | None = None) -> float:
    """L2 sensitivity of ``x ↦ C x`` for one example with per-step clipped contributions of norm 1.

    Args:
        C: encoder matrix, shape ``(m, n)`` (n steps).
        participation: a :class:`Participation` (default: single participation).

    Returns:
        The sensitivity (exact for ``single``; exact for ``cyclic`` when ``CᵀC >= 0``; for
        ``min_separation`` a proven upper bound: with ``Y = |CᵀC|``, each row's best
        b-separated ≤k-subset sum ``r_u = max_{S∋u} Σ_{v∈S} Y_uv`` bounds that row's part of any
        pattern, and the best separated ≤k-subset of the ``r_u`` bounds the total).

    Raises:
        TypeError, ValueError: bad ``C`` or ``participation``.
    """
    C = _as_matrix("C", C)
    p = _check_participation(participation)
    n = C.shape[1]
    col_sq = np.einsum("ij,ij->j", C, C)
    if p.kind == "single":
        return float(math.sqrt(col_sq.max()))
    Y = np.abs(C.T @ C)
    b = p.separation
    if p.kind == "cyclic":
        best = 0.0
        for j in range(min(b, n)):
            idx = np.arange(j, n, b)
            best = max(best, float(Y[np.ix_(idx, idx)].sum()))
        return math.sqrt(best)
    k = min(p.max_participations, math.ceil(n / b))
    # r_u = Y_uu + best separated subset (size <= k-1) of the other columns compatible with u.
    masked = Y.copy()
    for u in range(n):
        masked[u, max(0, u - b + 1):min(n, u + b)] = 0.0  # columns too close to u
    if k > 1:
        # Separated subsets avoiding u's window: run the DP on the masked row; the window is zero,
        # so picks inside it add nothing, and picks on both sides of u are >= b apart from u.
        r = np.diag(Y) + _max_separated_sum(masked, b, k - 1)
    else:
        r = np.diag(Y).copy()
    total = _max_separated_sum(r[None, :], b, k)[0]
    return float(math.sqrt(total))


def _as_matrix(name, C) -> np.ndarray:
    try:
        C = np.asarray(C, dtype=float)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a 2-D array of real numbers; got {type(C).__name__}") from exc
    if C.ndim != 2 or C.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array; got shape {C.shape}")
    if not np.all(np.isfinite(C)):
        raise ValueError(f"{name} must contain only finite values")
    return C


def workload_errors(A, noise_operator, sens: float) -> dict:
    """Error of the released workload ``A(x + sens·M z)``, z ~ N(0, I), per unit σ and clip norm.

    Args:
        A: workload ``(n, n)``.
        noise_operator: ``M`` with ``(n, m)`` shape (the gradient-space noise map, C⁻¹ for
            square C).
        sens: the encoder's sensitivity.

    Returns:
        ``{"max": max_t E(AMz)_t²·sens², "mean": mean_t E(AMz)_t²·sens²}`` (the "max squared
        error" and "mean squared error" of Choquette-Choo et al. 2023, §2).
    """
    B = np.asarray(A, float) @ np.asarray(noise_operator, float)
    row = np.einsum("ij,ij->i", B, B) * sens ** 2
    return {"max": float(row.max()), "mean": float(row.mean())}
