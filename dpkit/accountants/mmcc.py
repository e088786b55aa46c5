"""Privacy accounting for matrix-factorisation (correlated-noise) mechanisms. TORCH-FREE.

Three analyses of the release ``C x + σ z`` (x_j: one example's clipped contribution at step j,
‖x_j‖ ≤ 1; z ~ N(0, I)):

* :func:`unamplified_epsilon` — no sampling assumed: a Gaussian mechanism with sensitivity
  ``sens(C)`` under the participation schema, i.e. noise multiplier σ/sens (Denisov et al. 2022;
  Choquette-Choo et al., ICML 2023, §2). Exact (ε, δ) curve of the Gaussian (Balle & Wang 2018).
* :func:`banded_amplified_epsilon` — b-banded C with cyclic Poisson sampling (data split into b
  groups, step t Poisson-samples group t mod b): as private as DP-SGD with ceil(n/b) steps at the
  group sampling rate and noise multiplier σ/max‖C[:, j]‖ ("(Amplified) Banded Matrix
  Factorization", Choquette-Choo et al., NeurIPS 2023, Theorem 4).
* :func:`mmcc_epsilon` — MMCC (Choquette-Choo, Ganesh, Steinke, Thakurta, "Privacy
  Amplification for Matrix Mechanisms", ICLR 2024) for any non-negative lower-triangular C under
  Poisson sampling with rate p at every step.

MMCC, as implemented here (Algorithm 1 / Theorem 4.x of the paper, with our own proven p̃):
after the paper's reduction the pair is ``N(0, σ²I)`` vs ``E_s N(C s, σ²I)``, s_j ~ Bernoulli(p)
i.i.d. Conditional composition (the paper's Theorem 3.1) lets row i be analysed given the earlier
outputs h = θ_{1:i−1}, at an additive δ for histories outside a "good" set. Given h and the other
participations s_{−j}, the posterior odds of s_j = 1 are ``p/(1−p)·L`` with
``ln L = (⟨h − C' s^{(0)}, c⟩ − ‖c‖²/2)/σ²`` (C' = first i−1 rows, c = C'[:, j], s^{(0)} = s with
s_j = 0). Because C ≥ 0, ``ln L ≤ (⟨h, c⟩ − ‖c‖²/2)/σ²`` for every s_{−j}; under either dataset
``⟨h, c⟩ ≤ Σ_k s_k⟨C'_k, c⟩ + σ‖c‖g`` whose upper tail we bound by the smaller of a Chernoff
bound (any λ > 0 is valid: ``P(X ≥ t) ≤ exp(K(λ) − λt)``) and the exact Gaussian-mixture tail of
the upward-coarsened Bernoulli sum. With probability ≥ 1 − δ_ij, ``L ≤ e^{ε_ij}`` and so every
conditional ``P(s_j = 1 | h, s_{−j}) ≤ p̃_ij = p e^{ε_ij} / (p e^{ε_ij} + 1 − p)``. A sequential
coupling then makes the posterior of s stochastically dominated by independent Bernoulli(p̃_ij),
hence (C ≥ 0) the row's sensitivity ``Σ_j C_ij s_j`` by ``Σ_j C_ij Bernoulli(p̃_ij)``; a
stochastically larger non-negative sensitivity gives a dominating mixture-of-Gaussians pair
(both hockey-stick divergences are increasing in each component's mean). Columns with no mass
above row i keep p̃_ij = p exactly, so C = I is DP-SGD and p = 1 is the Gaussian with
sensitivity ‖C·1‖. δ = δ_PLD + Σ_ij δ_ij (union bound over the pairs that need a tail bound).

Conservative simplifications (all move the bound UP, never down): p̃ rounded up to a grid; the
row's sensitivity support coarsened upward when it has more than ``max_atoms`` atoms; dp_accounting
PLDs in pessimistic mode. The paper's own p̃ may be tighter.

This "tail-bound" analysis is loose: the worst history at the 1 − δ_ij quantile sets p̃ (at σ = 1
p̃/p reaches 17–19 for BandMF with p = 0.05, i.e. p̃ ≈ 0.9), and 1.25–2.4× the exact ε on two-
and three-step cases. Moving δ between the tail bounds and the PLD hardly matters (BandMF n = 32,
b = 2, σ = 1: ε 15.84 / 15.51 / 15.49 / 15.65 / 16.22 at tail_delta_fraction 0.1 / 0.3 / 0.5 /
0.7 / 0.9), so 0.5 stays the default. For n ≤ 3 :mod:`dpkit.accountants.mmcc_cells` replaces the
tail bound by history-dependent dominating pairs (no tail δ; proof in that module): within 0.05 %
(n = 2) and 1 % (n = 3) of the numerically integrated ε. :func:`mmcc_analysis` uses it for
n ≤ 3 whenever a tail bound would be needed and says which analysis answered
(``MMCCResult.method``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import optimize, sparse, special

from dp_accounting import dp_event as _dpe

from dpkit import _validate
from dpkit.accountants import events as _events
from dpkit.accountants.base import Accountant

_RATIO_GRID = 1e-4  # p̃/p is rounded UP to this grid so that equal rows share one PLD


@dataclasses.dataclass(frozen=True)
class MMCCResult:
    """Outcome of :func:`mmcc_analysis`.

    Attributes:
        epsilon: the ε guarantee at total ``delta``.
        delta: total δ = ``pld_delta + tail_delta``.
        pld_delta: δ used for the composed mixture-of-Gaussians PLD.
        tail_delta: δ spent on the conditional-probability tail bounds (0 when none is needed).
        distinct_rows: number of distinct per-row mixtures composed.
        max_probability_ratio: max over (i, j) of p̃_ij / p in the tail-bound analysis (1 means
            no loss from correlation; nan when the cell analysis answered).
        method: the analysis whose ε is reported: ``"cells"`` (history cells, n ≤ 3, see
            :mod:`dpkit.accountants.mmcc_cells`; then ``pld_delta = delta``, ``tail_delta = 0``,
            ``distinct_rows = 0``) or ``"tail_bound"`` (the conditional-composition analysis).
        cells: number of history cells of the cell analysis (0 when it did not answer).
    """

    epsilon: float
    delta: float
    pld_delta: float
    tail_delta: float
    distinct_rows: int
    max_probability_ratio: float
    method: str = "tail_bound"
    cells: int = 0


def _check_encoder(C) -> np.ndarray:
    try:
        C = np.asarray(C, dtype=float)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"C must be a 2-D array of real numbers; got {type(C).__name__}") from exc
    if C.ndim != 2 or C.shape[0] != C.shape[1] or C.size == 0:
        raise ValueError(f"C must be a non-empty square matrix; got shape {C.shape}")
    if not np.all(np.isfinite(C)):
        raise ValueError("C must contain only finite values")
    if np.any(np.triu(C, 1) != 0):
        raise ValueError("C must be lower-triangular; it has entries above the diagonal")
    if np.any(C < 0):
        raise ValueError("C must be non-negative (MMCC's analysis needs C >= 0); got a negative entry "
                         f"{C.min()!r}")
    return C


def _tail_epsilons(c2: float, a_list, sigma: float, p: float, log_inv_delta: float,
                   max_atoms: int = 64) -> float:
    """ε with P(ln L > ε) <= δ, from an upper tail bound t on X = Σ_k s_k a_k + σ‖c‖g.

    Two valid bounds, the smaller is used: (1) Chernoff, ``P(X ≥ t) ≤ exp(K(λ) − λt)`` minimised
    over a λ grid (K = cumulant generating function); (2) the exact mixture tail
    ``Σ_atoms w·Φ̄((t − atom)/(σ‖c‖))`` with the law of the Bernoulli sum coarsened upward,
    inverted by bisection (the returned end point is checked to satisfy the bound).
    """
    a = np.asarray(a_list, float)
    sd = sigma * math.sqrt(c2)
    lam0 = math.sqrt(2.0 * log_inv_delta / (sigma * sigma * c2))
    lam = lam0 * np.geomspace(1e-3, 3.0, 96)
    # K(λ) = λ²σ²‖c‖²/2 + Σ_k log(1 − p + p e^{λ a_k})
    log_mgf = np.logaddexp(math.log1p(-p), math.log(p) + lam[:, None] * a[None, :]).sum(axis=1)
    t_hi = float(((0.5 * lam * lam * sigma * sigma * c2 + log_mgf + log_inv_delta) / lam).min())
    atoms, mass = _row_distribution(a, np.full(a.size, p), max_atoms)
    log_mass = np.log(mass)

    def log_tail(t):
        return float(special.logsumexp(log_mass + special.log_ndtr((atoms - t) / sd)))

    lo, hi = 0.0, t_hi
    if log_tail(hi) <= -log_inv_delta:  # Chernoff's t is valid; tighten by bisection
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            if log_tail(mid) <= -log_inv_delta:
                hi = mid
            else:
                lo = mid
    return (min(hi, t_hi) - 0.5 * c2) / (sigma * sigma)


def conditional_probabilities(C, *, noise_multiplier: float, sampling_prob: float,
                              tail_delta: float):
    """Upper bounds p̃_ij on the posterior participation probabilities (see the module docstring).

    Args:
        C: non-negative lower-triangular ``(n, n)`` encoder.
        noise_multiplier: σ (noise std per unit of clip norm in the release ``C x + σ z``).
        sampling_prob: Poisson rate p.
        tail_delta: total failure probability, split evenly over the pairs that need a bound.

    Returns:
        ``(P, used)``: a sparse CSR matrix with the pattern of C holding p̃_ij, and the δ actually
        spent (0 when no pair needs a tail bound).
    """
    C = _check_encoder(C)
    sigma = _validate.positive("noise_multiplier", noise_multiplier)
    p = _validate.probability("sampling_prob", sampling_prob)
    n = C.shape[0]
    Cs = sparse.csc_matrix(C)
    rows, cols = np.nonzero(C)
    # pairs (i, j) with mass of column j above row i: first nonzero row of column j < i
    first = np.full(n, n)
    for j in range(n):
        nz = Cs.indices[Cs.indptr[j]:Cs.indptr[j + 1]]
        if nz.size:
            first[j] = nz.min()
    needs = first[cols] < rows
    count = int(needs.sum())
    ptilde = np.full(rows.size, p)
    used = 0.0
    if p < 1.0 and count:
        tail_delta = _validate.delta("tail_delta", tail_delta)
        log_inv = math.log(count / tail_delta)
        used = tail_delta
        Cr = sparse.csr_matrix(C)
        memo: dict = {}  # stationary (e.g. banded Toeplitz) pairs repeat exactly
        for idx in np.nonzero(needs)[0]:
            i, j = int(rows[idx]), int(cols[idx])
            top = Cr[:i]
            c = top[:, [j]]
            c2 = float(c.multiply(c).sum())
            a = (top.T @ c).toarray().ravel()
            a = np.sort(a[a > 0])
            key = (c2, a.tobytes())
            if key not in memo:
                memo[key] = _tail_epsilons(c2, a, sigma, p, log_inv)
            eps = memo[key]
            # p̃ = p e^ε / (p e^ε + 1 − p), computed stably via the log-odds
            ptilde[idx] = special.expit(math.log(p) - math.log1p(-p) + eps)
    ratio = np.minimum(np.ceil(ptilde / p / _RATIO_GRID) * _RATIO_GRID, 1.0 / p)
    # (1 + 1e-12): the product ratio·p must not round below the unrounded p̃
    P = sparse.csr_matrix((np.minimum(np.where(ratio > 1.0, ratio * p * (1 + 1e-12), p), 1.0),
                           (rows, cols)), shape=C.shape)
    return P, used


def _row_distribution(values: np.ndarray, probs: np.ndarray, max_atoms: int):
    """Law of Σ_j v_j·Bernoulli(q_j) as (atoms, probs), coarsened UPWARD past max_atoms atoms."""
    atoms, mass = np.array([0.0]), np.array([1.0])
    grid = values.sum() / max_atoms
    for v, q in zip(values, probs):
        atoms = np.concatenate([atoms, atoms + v])
        mass = np.concatenate([mass * (1.0 - q), mass * q])
        if atoms.size > max_atoms:
            atoms = np.ceil(atoms / grid) * grid  # round up: stochastically larger
        atoms, inv = np.unique(atoms, return_inverse=True)
        mass = np.bincount(inv, weights=mass)
        keep = mass > 0
        atoms, mass = atoms[keep], mass[keep]
    return atoms, mass


def _mixture_pld(sigma, atoms, mass, vdi):
    """dp_accounting's mixture-of-Gaussians PLD, with the inverse privacy loss vectorised.

    dp_accounting inverts the (monotone) privacy loss by a recursive scalar bisection, which
    dominates MMCC's run time. The subclass below runs the SAME bisection (same midpoints, same
    stopping width, same final rounding) for all requested losses at once, so the PLD is
    identical (a test checks this) and the pessimistic guarantee is preserved.
    """
    from dp_accounting.pld import privacy_loss_distribution as pld_lib
    from dp_accounting.pld import privacy_loss_mechanism as plm

    create = getattr(pld_lib, "_create_pld_pmf_from_monotone_privacy_loss", None)
    if create is None:  # library internals changed: fall back to the (slow) public constructor
        return pld_lib.from_mixture_gaussian_mechanism(sigma, list(atoms), list(mass),
                                                       value_discretization_interval=vdi)

    class _FastMixture(plm.MixtureGaussianPrivacyLoss):
        def _losses(self, x):
            x_loss = np.multiply.outer(x, self.sensitivities) / self._variance
            if self.adjacency_type == plm.AdjacencyType.ADD:
                return -special.logsumexp(self._precompute_privacy_loss_constants + x_loss, axis=1)
            return special.logsumexp(self._precompute_privacy_loss_constants - x_loss, axis=1)

        def _inverse_privacy_losses_with_range(self, privacy_losses, bounds, precision=1e-6):
            losses = np.asarray(privacy_losses, float)
            if losses.size == 0:
                return []
            lo = np.full(losses.size, float(bounds[0]))
            hi = np.full(losses.size, float(bounds[1]))
            width = bounds[1] - bounds[0]
            while width > precision:
                mid = (lo + hi) / 2
                below = losses < self._losses(mid)  # loss decreasing in x: answer lies right
                lo = np.where(below, mid, lo)
                hi = np.where(below, hi, mid)
                width = width / 2
            return np.floor(hi / precision) * precision

    def one(adjacency):
        return create(_FastMixture(sigma, list(atoms), list(mass), pessimistic_estimate=True,
                                   adjacency_type=adjacency),
                      pessimistic_estimate=True, value_discretization_interval=vdi,
                      use_connect_dots=True)

    return pld_lib.PrivacyLossDistribution(one(plm.AdjacencyType.REMOVE),
                                           one(plm.AdjacencyType.ADD))


_ANALYSES = ("auto", "cells", "tail_bound")


def mmcc_analysis(C, *, noise_multiplier: float, sampling_prob: float, delta: float,
                  tail_delta_fraction: float = 0.5, max_atoms: int = 64,
                  value_discretization_interval: float = 1e-3, analysis: str = "auto",
                  cells_per_sigma: int | None = None) -> MMCCResult:
    """MMCC amplified ε for ``C x + σ z`` under Poisson sampling (see the module docstring).

    For n ≤ 3 steps, p < 1 and a C that needs a tail bound (some column with two non-zeros) the
    history-cell analysis of :mod:`dpkit.accountants.mmcc_cells` runs instead (near-exact: within
    1 % of the numerically integrated ε in the tests, against 1.25–2.4× for the tail bound; falls
    back to the tail bound if its search bracket fails); otherwise the tail-bound analysis, which
    is then exact up to the PLD grid (C = I: DP-SGD; p = 1: the Gaussian).

    Args:
        C: non-negative lower-triangular ``(n, n)`` encoder, in units where the clip norm is 1
            (for a strategy trained with noise ``σ·sens·C⁻¹z`` pass ``C / sens``).
        noise_multiplier: σ.
        sampling_prob: Poisson sampling rate p of every step.
        delta: total δ.
        tail_delta_fraction: share of δ given to the p̃ tail bounds when some are needed.
        max_atoms: cap on the support size of each row's sensitivity law (coarsened upward).
        value_discretization_interval: PLD grid (smaller = tighter and slower).
        analysis: ``"auto"`` (as above), ``"tail_bound"`` (the module's analysis) or
            ``"cells"`` (n = 2 or 3 only).
        cells_per_sigma: initial grid of the cell analysis (cells per σ per axis; default 100
            for n = 2, 5 for n = 3, then refined adaptively; larger = tighter and slower).

    Returns:
        An :class:`MMCCResult`.

    Raises:
        TypeError, ValueError: bad arguments.
    """
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    C = _check_encoder(C)
    sigma = _validate.positive("noise_multiplier", noise_multiplier)
    p = _validate.probability("sampling_prob", sampling_prob)
    delta = _validate.delta("delta", delta)
    frac = _validate.probability("tail_delta_fraction", tail_delta_fraction, allow_one=False)
    max_atoms = _validate.positive_int("max_atoms", max_atoms)
    if max_atoms < 2:
        raise ValueError(f"max_atoms must be >= 2; got {max_atoms}")
    vdi = _validate.positive("value_discretization_interval", value_discretization_interval)
    analysis = _validate.one_of("analysis", analysis, _ANALYSES)
    if cells_per_sigma is not None:
        cells_per_sigma = _validate.positive_int("cells_per_sigma", cells_per_sigma)
    n = C.shape[0]
    if analysis == "cells" and n not in (2, 3):
        raise ValueError(f"analysis='cells' covers n = 2 or 3 steps (its cost grows as "
                         f"cells^(n-1)); got n = {n}: use analysis='auto' or 'tail_bound'")
    # A tail bound is needed only where a column has mass in two rows; otherwise the rows are
    # independent mixtures and their composed PLD is already exact (C = I: DP-SGD).
    if analysis == "cells" or (analysis == "auto" and n in (2, 3) and p < 1.0
                               and np.any(np.count_nonzero(C, axis=0) >= 2)):
        from dpkit.accountants.mmcc_cells import cells_epsilon

        # search bracket: the unamplified Gaussian (sensitivity ‖C·1‖) with a margin
        hi = 1.1 * gaussian_epsilon(float(np.linalg.norm(C.sum(axis=1))) / sigma, delta) + 0.1
        eps, cells = cells_epsilon(C, noise_multiplier=sigma, sampling_prob=p, delta=delta,
                                   epsilon_hi=hi, cells_per_sigma=cells_per_sigma)
        if eps is not None:
            return MMCCResult(epsilon=eps, delta=delta, pld_delta=delta, tail_delta=0.0,
                              distinct_rows=0, max_probability_ratio=math.nan, method="cells",
                              cells=cells)
        if analysis == "cells":
            raise ValueError(f"the cell analysis found no epsilon <= {hi:.4g} at delta={delta}; "
                             "use a larger cells_per_sigma or analysis='auto'")

    P, tail = conditional_probabilities(C, noise_multiplier=sigma, sampling_prob=p,
                                        tail_delta=delta * frac)
    Cr = sparse.csr_matrix(C)
    groups: dict = {}
    deterministic_sq = 0.0  # rows whose sensitivity is a constant compose to one Gaussian
    max_ratio = 1.0
    for i in range(C.shape[0]):
        lo, hi = Cr.indptr[i], Cr.indptr[i + 1]
        cols = Cr.indices[lo:hi]
        values = Cr.data[lo:hi]
        probs = np.asarray(P[i, cols].todense()).ravel() if cols.size else np.zeros(0)
        if cols.size:
            max_ratio = max(max_ratio, float(probs.max() / p))
        if np.all(probs >= 1.0):
            deterministic_sq += float(values.sum()) ** 2
            continue
        atoms, mass = _row_distribution(values, probs, max_atoms)
        if atoms[-1] == 0.0:
            continue
        key = (tuple(atoms.tolist()), tuple(mass.tolist()))
        groups[key] = groups.get(key, 0) + 1

    pld = None
    if deterministic_sq > 0 and groups:
        pld = pld_lib.from_gaussian_mechanism(sigma / math.sqrt(deterministic_sq),
                                              value_discretization_interval=vdi)
    for (atoms, mass), count in groups.items():
        if len(atoms) == 2 and atoms[0] == 0.0:
            # {0, v} with prob q: the Poisson-subsampled Gaussian (DP-SGD's PLD, exactly)
            row = pld_lib.from_gaussian_mechanism(sigma / atoms[1], sampling_prob=mass[1],
                                                  value_discretization_interval=vdi)
        else:
            row = _mixture_pld(sigma, atoms, mass, vdi)
        row = row.self_compose(count) if count > 1 else row
        pld = row if pld is None else pld.compose(row)
    pld_delta = delta - tail
    if not groups:
        # every row is deterministic: one Gaussian with L2 sensitivity ‖C·1‖, exact formula
        eps = gaussian_epsilon(math.sqrt(deterministic_sq) / sigma, pld_delta)
    else:
        eps = float(pld.get_epsilon_for_delta(pld_delta))
    return MMCCResult(epsilon=max(eps, 0.0), delta=delta, pld_delta=pld_delta, tail_delta=tail,
                      distinct_rows=len(groups) + (deterministic_sq > 0),
                      max_probability_ratio=max_ratio)


def mmcc_epsilon(C, *, noise_multiplier: float, sampling_prob: float, delta: float,
                 **options) -> float:
    """MMCC ε of ``C x + σ z`` under Poisson sampling: :func:`mmcc_analysis` (...).epsilon.

    Args:
        C: non-negative lower-triangular ``(n, n)`` encoder (clip norm 1 units).
        noise_multiplier: σ.
        sampling_prob: Poisson rate p.
        delta: total δ.
        **options: ``tail_delta_fraction``, ``max_atoms``, ``value_discretization_interval``,
            ``analysis``, ``cells_per_sigma`` (see :func:`mmcc_analysis`; unknown names raise
            TypeError).

    Returns:
        ε (float).
    """
    return mmcc_analysis(C, noise_multiplier=noise_multiplier, sampling_prob=sampling_prob,
                         delta=delta, **options).epsilon


def gaussian_delta(mu: float, epsilon: float) -> float:
    """Exact δ(ε) of the Gaussian mechanism with sensitivity/σ = ``mu`` (Balle & Wang 2018, Thm 8)."""
    if mu == 0:
        return 0.0
    return float(special.ndtr(-epsilon / mu + mu / 2)
                 - math.exp(epsilon) * special.ndtr(-epsilon / mu - mu / 2)) if epsilon < 700 else 0.0


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Smallest ε with ``gaussian_delta(mu, ε) <= delta`` (bisection; rounds ε UP).

    Args:
        mu: sensitivity / σ (>= 0).
        delta: target δ in (0, 1).
    """
    mu = _validate.non_negative("mu", mu)
    delta = _validate.delta("delta", delta)
    if gaussian_delta(mu, 0.0) <= delta:
        return 0.0
    hi = 1.0
    while gaussian_delta(mu, hi) > delta:
        hi *= 2
    eps = optimize.brentq(lambda e: gaussian_delta(mu, e) - delta, 0.0, hi, xtol=1e-12)
    return float(eps) * (1 + 1e-9) + 1e-12  # round up past the root-finder's tolerance


def unamplified_epsilon(*, sensitivity: float, noise_multiplier: float, delta: float) -> float:
    """ε of ``C x + σ z`` without amplification: the Gaussian mechanism with μ = sens(C)/σ.

    ``sens(C)`` is the encoder's L2 sensitivity under the participation schema (single,
    (k, b) cyclic, b-min-separation; see ``dpkit.mechanisms.matrix.sensitivity``) — an upper
    bound on it is safe. For noise standardised by that sensitivity (``CorrelatedNoise``) pass
    ``sensitivity=1``: the event is ``GaussianDpEvent(σ)``.

    Args:
        sensitivity: sens(C) ≥ 0.
        noise_multiplier: σ > 0 (noise std per unit clip norm in the release).
        delta: δ.

    Returns:
        ε (exact Gaussian curve, rounded up).

    Raises:
        TypeError, ValueError: bad arguments.
    """
    sens = _validate.non_negative("sensitivity", sensitivity)
    sigma = _validate.positive("noise_multiplier", noise_multiplier)
    return gaussian_epsilon(sens / sigma, delta)


def banded_amplified_epsilon(C, *, noise_multiplier: float, group_sampling_prob: float,
                             delta: float, bands: int | None = None,
                             value_discretization_interval: float = 1e-4) -> float:
    """Amplified BandMF ε: DP-SGD with ceil(n/b) steps at the group rate (NeurIPS 2023, Thm 4).

    With cyclic Poisson sampling and a b-banded C, one example's possible participations
    (steps j, j+b, ...) touch disjoint rows of C, each a Poisson-subsampled Gaussian with
    sensitivity ≤ max column norm.

    Args:
        C: square lower-triangular b-banded encoder.
        noise_multiplier: σ of the release ``C x + σ z``.
        group_sampling_prob: Poisson rate within the sampled group.
        delta: δ.
        bands: b (default: C's bandwidth; a larger b is allowed, a smaller one is refused).
        value_discretization_interval: PLD grid.

    Raises:
        ValueError: C is not lower-triangular or has more than ``bands`` bands.
    """
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    C = np.asarray(C, float)
    if C.ndim != 2 or C.shape[0] != C.shape[1] or np.any(np.triu(C, 1) != 0):
        raise ValueError(f"C must be square lower-triangular; got shape {C.shape}")
    sigma = _validate.positive("noise_multiplier", noise_multiplier)
    q = _validate.probability("group_sampling_prob", group_sampling_prob)
    delta = _validate.delta("delta", delta)
    r, c = np.nonzero(C)
    width = int((r - c).max()) + 1 if r.size else 1
    b = width if bands is None else _validate.positive_int("bands", bands)
    if b < width:
        raise ValueError(f"bands must be >= C's bandwidth {width}; got {b}")
    n = C.shape[0]
    steps = math.ceil(n / b)
    sens = float(np.linalg.norm(C, axis=0).max())
    pld = pld_lib.from_gaussian_mechanism(sigma / sens, sampling_prob=q,
                                          value_discretization_interval=value_discretization_interval)
    return float(pld.self_compose(steps).get_epsilon_for_delta(delta))


_METHODS = ("mmcc", "banded", "unamplified")


class MatrixMechanismAccountant(Accountant):
    """Accountant for training with correlated noise ``σ·clip·sens·C⁻¹z`` (e.g. ``CorrelatedNoise``).

    The optimizer composes its per-step DP-SGD event (``dpsgd_event(σ, q, 1)``) once per step; this
    accountant checks σ and q against its configuration, counts the steps t, and reports ε for
    the first t rows of the mechanism ``C x + σ·sens·z`` (the releases so far):

    * ``method="mmcc"``: :func:`mmcc_analysis` on ``C[:t, :t] / sens`` (Poisson sampling with
      rate q at every step over the whole data set).
    * ``method="banded"``: :func:`banded_amplified_epsilon` (cyclic Poisson sampling: q is the
      rate WITHIN the sampled group; C must be b-banded with b = the number of groups).
    * ``method="unamplified"``: the Gaussian with μ = 1/σ (sens already covers the participation
      schema of the whole run, hence every prefix — conservative for partial runs).

    Args:
        encoder: ``(n, n)`` encoder C (array-like, or an object with ``encoder()``); for
            ``method="unamplified"`` any ``(m, n)`` encoder (e.g. a tree) is accepted.
        noise_multiplier: σ of the training run.
        sampling_prob: q of the composed step events (1 = no sampling).
        sensitivity: the sensitivity the noise was standardised with (``CorrelatedNoise.sensitivity``).
        method: ``"mmcc"``, ``"banded"`` or ``"unamplified"``.
        bands: b for ``method="banded"`` (default: C's bandwidth).
        mmcc_options: extra keyword arguments of :func:`mmcc_analysis`.
        neighboring_relation: only ``"add_remove"`` is supported.

    Raises:
        TypeError, ValueError: bad arguments (e.g. a negative C for MMCC).
    """

    name = "matrix"

    def __init__(self, encoder, *, noise_multiplier, sampling_prob, sensitivity=1.0,
                 method="mmcc", bands=None, mmcc_options=None,
                 neighboring_relation="add_remove"):
        super().__init__(neighboring_relation)
        if self._relation is not _events.as_relation("add_remove"):
            raise ValueError("neighboring_relation must be 'add_remove' for matrix mechanisms; "
                             f"got {neighboring_relation!r}")
        if hasattr(encoder, "encoder") and callable(encoder.encoder):
            encoder = encoder.encoder()
        C = np.asarray(encoder, dtype=float)
        self.method = _validate.one_of("method", method, _METHODS)
        # the unamplified analysis only needs n (columns); the others need a square C
        square_ok = C.ndim == 2 and (self.method == "unamplified" or C.shape[0] == C.shape[1])
        if C.ndim != 2 or not square_ok or C.size == 0 or not np.all(np.isfinite(C)):
            raise ValueError("encoder must be a finite 2-D matrix (square unless "
                             f"method='unamplified'); got shape {C.shape}")
        if self.method == "mmcc":
            _check_encoder(C)
        self.noise_multiplier = _validate.positive("noise_multiplier", noise_multiplier)
        self.sampling_prob = _validate.probability("sampling_prob", sampling_prob)
        self.sensitivity = _validate.positive("sensitivity", sensitivity)
        self.bands = None if bands is None else _validate.positive_int("bands", bands)
        if mmcc_options is not None and not isinstance(mmcc_options, dict):
            raise TypeError(f"mmcc_options must be a dict or None; got {type(mmcc_options).__name__}")
        self.mmcc_options = dict(mmcc_options or {})
        self._C = C
        self._results: dict = {}

    def _config(self):
        return {"encoder": self._C.tolist(), "noise_multiplier": self.noise_multiplier,
                "sampling_prob": self.sampling_prob, "sensitivity": self.sensitivity,
                "method": self.method, "bands": self.bands, "mmcc_options": self.mmcc_options}

    def _step_event(self):
        q = self.sampling_prob
        gauss = _dpe.GaussianDpEvent(self.noise_multiplier)
        return gauss if q == 1.0 else _dpe.PoissonSampledDpEvent(q, gauss)

    def _backend_supports(self, event):
        expected = self._step_event()
        for leaf, _ in _events.leaves_with_counts(event):
            if leaf != expected:
                return (f"this accountant only counts the training step event {expected!r} "
                        f"(noise_multiplier={self.noise_multiplier}, "
                        f"sampling_prob={self.sampling_prob}); got {leaf!r}")
        return None

    @property
    def steps(self) -> int:
        """Number of steps composed so far."""
        return sum(c for event, count in self._ledger
                   for _, c in _events.leaves_with_counts(event, count))

    def _prefix(self):
        t = self.steps
        if t > self._C.shape[1]:
            raise ValueError(f"steps must be <= the encoder's n={self._C.shape[1]}; "
                             f"{t} steps were composed")
        return self._C[:t, :t] / self.sensitivity

    def _epsilon_from_ledger(self, delta):
        key = (self.steps, delta)
        if key not in self._results:
            C = self._prefix()
            sigma = self.noise_multiplier
            if self.method == "unamplified":
                eps = gaussian_epsilon(1.0 / sigma, delta)
            elif self.method == "banded":
                eps = banded_amplified_epsilon(C, noise_multiplier=sigma,
                                               group_sampling_prob=self.sampling_prob,
                                               delta=delta, bands=self.bands)
            else:
                eps = mmcc_analysis(C, noise_multiplier=sigma, sampling_prob=self.sampling_prob,
                                    delta=delta, **self.mmcc_options).epsilon
            self._results[key] = eps
        return self._results[key]

    def _delta_from_ledger(self, epsilon):
        # Smallest δ on a log grid with ε(δ) <= epsilon (bisection on log δ; returns the upper end,
        # which is a valid δ because ε(δ_hi) <= epsilon was verified).
        lo, hi = math.log(1e-15), math.log(0.5)
        if self._epsilon_from_ledger(math.exp(hi)) > epsilon:
            return 1.0
        if self._epsilon_from_ledger(math.exp(lo)) <= epsilon:
            return math.exp(lo)
        for _ in range(12):
            mid = (lo + hi) / 2
            if self._epsilon_from_ledger(math.exp(mid)) <= epsilon:
                hi = mid
            else:
                lo = mid
        return math.exp(hi)
