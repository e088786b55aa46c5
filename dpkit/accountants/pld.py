"""The ``"pld"`` accountant: privacy-loss distributions on an adaptive, size-bounded grid (default).

Privacy-loss distributions (PLD) follow Koskela, Jälkö, Honkela, "Computing tight differential
privacy guarantees using FFT" (AISTATS 2020) and Doroshenko, Ghazi, Kamath, Kumar, Manurangsi,
"Connect the Dots: Tighter Discrete Approximations of Privacy Loss Distributions" (PETS 2022), as
implemented by ``dp_accounting.pld``. Every grid is PESSIMISTIC (connect-the-dots, dp_accounting's
default), so every reported ε is an upper bound on the true ε of the composed mechanism, whatever
the grid step; dpkit only chooses the step.

**Adaptive grid** (``value_discretization_interval=None``, the default). The ε over-statement of a
connect-the-dots grid with step v behaves as K·v² (measured: a 3.3× finer grid is ~11× tighter). The
accountant (1) predicts the width W (in privacy-loss units) of the composed PLD from the Chernoff
bounds dp_accounting itself uses to truncate a self-composition (:func:`composed_width`), on a
small probe grid; (2) computes ε on two cheap grids with ``W/2^13`` and ``W/2^14`` points' step;
(3) estimates K from the two and, if their gap says the error can exceed ``relative_tolerance``·ε,
computes a third grid with step ``sqrt(tol·ε/K)``. The answer is the smallest of the computed
values (each one an upper bound).

**Bounded work.** No grid is ever larger than :data:`MAX_GRID_POINTS` points (about 100 MB of FFT
buffers): a step count or a tiny σ that would need more gets the step ``W/MAX_GRID_POINTS`` (a
coarser grid, still an upper bound) and, when that leaves the error above tolerance, the Rényi-DP
bound is computed too and the smaller value reported. Which one answered is in :meth:`PLDAccountant.details`.

A fixed ``value_discretization_interval`` (e.g. 1e-4, dp_accounting's own default) gives the plain
single-grid account, still capped at :data:`MAX_GRID_POINTS`.

Plain Gaussian releases are folded into ONE equivalent Gaussian before composing (exact), and a
ledger of Gaussian releases only is answered in closed form (Balle & Wang, ICML 2018, Thm. 8).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from dp_accounting import dp_event as _dpe
from dp_accounting.pld import common as _pld_common
from dp_accounting.pld import pld_pmf as _pld_pmf
from dp_accounting.pld import PLDAccountant as _DPAPLDAccountant
from dp_accounting.pld.privacy_loss_distribution import PrivacyLossDistribution as _PLD
from scipy import fft

from dpkit import _validate as V
from dpkit.accountants import events as _events
from dpkit.accountants._gaussian import gaussian_delta, gaussian_epsilon
from dpkit.accountants._backed import DpAccountingBacked

__all__ = ["PLDAccountant", "MAX_GRID_POINTS", "composed_width"]

#: the largest composed grid (points) any query may build: bounded time (< ~1 s) and memory
MAX_GRID_POINTS = 2**20
#: points of the two cheap grids the adaptive account starts from
_COARSE_POINTS = 2**13
#: points of the probe grid used to predict the composed width
_PROBE_POINTS = 2**12
#: dp_accounting's tail-mass truncation of a self-composition (pld_pmf.self_compose's default)
_TAIL_MASS = 1e-15
#: grid steps beyond this (loss units) are not used (dp_accounting computes expm1(step))
_MAX_STEP = 100.0
#: Chernoff orders of the truncation bounds, per support length (see _bounds)
_ORDERS = np.geomspace(1e-4, 20.0, 16)
DEFAULT_RELATIVE_TOLERANCE = 5e-4


def _loss_range(leaf) -> float:
    """A generous bound on the privacy-loss range of one release of ``leaf`` (loss units).

    For a Gaussian of std σ and sensitivity s, dp_accounting keeps x within ~11σ of the means
    (log-mass truncation e^-50), where the loss (s² + 2s|x|)/(2σ²) is at most (s² + 22sσ)/(2σ²);
    subsampling only shrinks it. Sensitivity 2 covers replace-one. Other leaves get 100.
    """
    if isinstance(leaf, _dpe.PoissonSampledDpEvent):
        leaf = leaf.event
    if isinstance(leaf, _dpe.GaussianDpEvent):
        sigma, s = float(leaf.noise_multiplier), 2.0
    elif isinstance(leaf, _dpe.MixtureOfGaussiansDpEvent):
        sigma, s = float(leaf.standard_deviation), 2.0 * max(abs(x) for x in leaf.sensitivities)
    elif isinstance(leaf, _dpe.LaplaceDpEvent):
        return 4.0 / float(leaf.noise_multiplier)
    else:
        return 100.0
    return (s * s + 22.0 * s * sigma) / (2.0 * sigma * sigma)


def _dense(pmf):
    """The dense form of a dp_accounting PLD PMF (small supports are kept sparse)."""
    return pmf if hasattr(pmf, "_probs") else pmf.to_dense_pmf()


def _bounds(probs, count: int) -> tuple[int, int]:
    """Index range holding all but ``_TAIL_MASS`` of the ``count``-fold self-convolution of ``probs``.

    Chernoff bounds (as in dp_accounting's ``compute_self_convolve_bounds``) over orders spread
    geometrically over 1e-4 .. 20 (per support length), so that the optimal order ~1/sqrt(count)
    is on the grid even for 10⁹ compositions; dp_accounting's default orders (±1..20 per length)
    miss it and then keep a support ~20× wider than needed.
    """
    orders = _ORDERS / len(probs)
    return _pld_common.compute_self_convolve_bounds(probs, count, _TAIL_MASS,
                                                   orders=np.concatenate([-orders, orders]))


def _self_compose(pmf, count: int, bounds: tuple[int, int]):
    """``count``-fold self-composition of a PLD PMF by one real FFT, truncated to ``bounds``
    (from :func:`_bounds`).

    The truncated tails (mass ≤ 1e-15) are moved to the infinity mass, so a pessimistic PMF stays
    pessimistic (Koskela et al. 2020; Doroshenko et al. 2022).
    """
    pmf = _dense(pmf)
    probs = pmf._probs
    lo, hi = bounds
    out_len = hi - lo + 1
    size = fft.next_fast_len(max(out_len, len(probs)), real=True)
    spectrum = fft.rfft(probs, size)
    conv = fft.irfft(spectrum ** count, size)
    out = np.roll(conv, -lo)[:out_len]
    inf_mass = _TAIL_MASS - math.expm1(count * math.log1p(-pmf._infinity_mass))
    return _pld_pmf.DensePLDPmf(pmf._discretization, pmf._lower_loss * count + lo, out, inf_mass,
                                pmf._pessimistic_estimate)


def composed_width(leaf, count: int, relation) -> float:
    """Predicted width, in privacy-loss units, of ``count`` self-compositions of ``leaf``'s PLD.

    The self-composition is truncated to the index range of :func:`_bounds`; those bounds, taken
    on a probe grid of ~4,096 points, give the width W, and a grid of step v has about W / v
    points. Returns ``math.inf`` when a single release's loss range is beyond any grid (σ far
    below 1e-3,
    or a probe step beyond :data:`_MAX_STEP`).
    """
    loss_range = _loss_range(leaf)
    v = max(loss_range / _PROBE_POINTS, 1e-6)
    if v > _MAX_STEP:
        return math.inf
    probe = _DPAPLDAccountant(relation, value_discretization_interval=v)
    probe.compose(leaf)
    width = 0.0
    for pmf in (probe._pld._pmf_remove, probe._pld._pmf_add):  # dp_accounting keeps both directions
        probs = _dense(pmf)._probs
        lo, hi = _bounds(probs, count)
        width = max(width, (max(hi - lo, len(probs)) + 1) * v)
    return width


class _GridTooLarge(Exception):
    """A grid would exceed MAX_GRID_POINTS; carries the number of points it would have."""

    def __init__(self, points: int):
        super().__init__(points)
        self.points = points


class PLDAccountant(DpAccountingBacked):
    """Privacy-loss-distribution accountant (tight; pessimistic; adaptive, size-bounded grid).

    Args:
        neighboring_relation: ``"add_remove"`` (default) or ``"replace_one"``.
        value_discretization_interval: ``None`` (default) for the adaptive grid described in the
            module docstring, or a fixed grid step > 0. ε is an upper bound in every case.
        relative_tolerance: the adaptive grid's target for its own over-statement of ε (or δ),
            relative, in (0, 1); default 5e-4.

    Raises:
        ValueError, TypeError: invalid relation, interval or tolerance.
    """

    name = "pld"
    is_approximate = False
    _backend_label = "PLDAccountant"

    def __init__(self, neighboring_relation="add_remove", *, value_discretization_interval=None,
                 relative_tolerance=DEFAULT_RELATIVE_TOLERANCE):
        super().__init__(neighboring_relation)
        self._vdi = (None if value_discretization_interval is None
                     else V.positive("value_discretization_interval", value_discretization_interval))
        self._tol = V.probability("relative_tolerance", relative_tolerance, allow_one=False)
        self._details: dict = {}

    def _config(self) -> dict:
        return {"value_discretization_interval": self._vdi, "relative_tolerance": self._tol}

    @property
    def is_adaptive(self) -> bool:
        """Whether the grid step is chosen per query (``value_discretization_interval=None``)."""
        return self._vdi is None

    def _fresh_with_tolerance(self, tolerance: float):
        """A factory of empty accountants like this one but with ``relative_tolerance=tolerance``."""
        return lambda: type(self)(self._relation, relative_tolerance=tolerance)

    def _new_backend(self, vdi: float = 1e-3) -> _DPAPLDAccountant:
        return _DPAPLDAccountant(self._relation, value_discretization_interval=vdi)

    def _components(self):
        """``(sigma of the merged Gaussian or None, [(leaf, count), ...] of the rest)``."""
        leaves = (pair for event, count in self._ledger for pair in _events.leaves_with_counts(event, count))
        return _events.merge_gaussians(leaves)

    def _gaussian_only(self):
        """μ of the ledger when it holds nothing but Gaussian releases (else None)."""
        sigma, rest = self._components()
        if sigma is None or any(not isinstance(leaf, _dpe.NoOpDpEvent) for leaf, _ in rest):
            return None
        return 1.0 / sigma

    def _nonprivate(self) -> bool:
        """Whether the ledger holds a release without noise (then ε = inf)."""
        _, rest = self._components()
        for leaf, _ in rest:
            if isinstance(leaf, _dpe.PoissonSampledDpEvent) and leaf.sampling_probability > 0:
                leaf = leaf.event
            if isinstance(leaf, _dpe.NonPrivateDpEvent) or getattr(leaf, "noise_multiplier", 1) == 0:
                return True
        return False

    # ------------------------------------------------------------------ grid planning
    def _width(self) -> float:
        """Predicted width (loss units) of the composed PLD of the ledger (cached per ledger)."""
        cache = self._cache_dict()
        if "width" not in cache:
            sigma, rest = self._components()
            parts = [] if sigma is None else [composed_width(_dpe.GaussianDpEvent(sigma), 1, self._relation)]
            parts += [composed_width(leaf, count, self._relation) for leaf, count in rest
                      if not isinstance(leaf, (_dpe.NoOpDpEvent, _dpe.NonPrivateDpEvent))]
            cache["width"] = sum(parts) if parts else 0.0
        return cache["width"]

    def _cache_dict(self) -> dict:
        if self._backend_cache is None:
            self._backend_cache = {"plds": {}}
        return self._backend_cache

    def _single(self, leaf, vdi: float):
        """dp_accounting's PLD of ONE release of ``leaf`` on a grid of step ``vdi``."""
        backend = self._new_backend(vdi)
        backend.compose(leaf)
        return backend._pld

    def _pld_at(self, vdi: float) -> _PLD:
        """The PLD of the ledger on a grid of step ``vdi`` (cached per step).

        Self-compositions go through :func:`_self_compose` (dense, tight truncation): besides
        its wider truncation, dp_accounting's sparse PMF estimates its composed size as
        ``size ** count``, an integer with ~count bits (hours and GBs for 10⁹ steps). The order of
        composition does not change the PLD of an (adaptive) composition.

        Raises:
            _GridTooLarge: the composed grid would exceed :data:`MAX_GRID_POINTS` (checked before
                any large array is allocated).
        """
        plds = self._cache_dict()["plds"]
        if vdi not in plds:
            sigma, rest = self._components()
            parts = [] if sigma is None else [(_dpe.GaussianDpEvent(sigma), 1)]
            parts += [(leaf, count) for leaf, count in rest if not isinstance(leaf, _dpe.NoOpDpEvent)]
            single_points = sum(_loss_range(leaf) for leaf, _ in parts) / vdi
            if single_points > MAX_GRID_POINTS:
                raise _GridTooLarge(int(single_points))
            points, singles = 0, []
            for leaf, count in parts:
                pld = self._single(leaf, vdi)
                pmfs = [pld._pmf_remove] if pld._symmetric else [pld._pmf_remove, pld._pmf_add]
                pmfs = [_dense(pmf) for pmf in pmfs]
                bounds = [_bounds(pmf._probs, count) if count > 1 else (0, pmf.size - 1) for pmf in pmfs]
                points += sum(hi - lo + 1 for lo, hi in bounds)
                singles.append((pmfs, bounds, count))
            if points > MAX_GRID_POINTS:
                raise _GridTooLarge(int(points))
            total = None
            for pmfs, bounds, count in singles:
                if count > 1:
                    pmfs = [_self_compose(pmf, count, b) for pmf, b in zip(pmfs, bounds)]
                pld = _PLD(*pmfs)
                total = pld if total is None else total.compose(pld)
            plds[vdi] = total
        return plds[vdi]

    def _fitting(self, vdi: float) -> float:
        """The smallest step ≥ ``vdi`` (by ×1.1·excess rescaling) whose grid fits; ``inf`` if none."""
        for _ in range(8):
            if vdi > _MAX_STEP:
                return math.inf
            try:
                self._pld_at(vdi)
                return vdi
            except _GridTooLarge as exc:
                vdi *= 1.1 * exc.points / MAX_GRID_POINTS
        return math.inf

    @staticmethod
    def _grid_points(pld) -> int:
        return max(pmf.size for pmf in (pld._pmf_remove, pld._pmf_add))

    def _rdp(self):
        from dpkit.accountants.rdp import RDPAccountant

        rdp = RDPAccountant(self._relation)
        for event, count in self._ledger:
            rdp.compose(event, count)
        return rdp

    def _answer(self, query, rdp_query) -> float:
        """Run ``query(PLD)`` on the grids chosen as in the module docstring."""
        try:
            width = self._width()
            if width == 0:  # nothing but no-op releases: ε = δ = 0
                self._details = {"method": "no_op"}
                return 0.0
            return self._answer_on_grids(query, rdp_query, width)
        except (OverflowError, MemoryError, FloatingPointError) as exc:
            self._details = {"method": "rdp", "reason": f"PLD failed ({type(exc).__name__})"}
            return rdp_query(self._rdp())

    def _answer_on_grids(self, query, rdp_query, width: float) -> float:
        asked = self._vdi if self._vdi is not None else width / _COARSE_POINTS
        v1 = self._fitting(asked) if math.isfinite(width) else math.inf
        if not math.isfinite(v1):
            self._details = {"method": "rdp", "reason": "the privacy-loss range is beyond any PLD grid "
                             f"of at most {MAX_GRID_POINTS} points"}
            return rdp_query(self._rdp())
        e1 = query(self._pld_at(v1))
        best, vdi, coarse = e1, v1, v1 > asked
        if self._vdi is None and not coarse:
            v2 = self._fitting(v1 / 2)
            e2 = query(self._pld_at(v2))
            if e2 <= best:
                best, vdi = e2, v2
            if v2 < v1 and math.isfinite(e2) and e2 > 0 and e1 > e2:
                k = (e1 - e2) / (v1 * v1 - v2 * v2)        # over-statement ≈ K·v² (connect the dots)
                if k * v2 * v2 > self._tol * e2:
                    wanted = math.sqrt(self._tol * e2 / k)
                    v3 = self._fitting(max(wanted, v2 * self._grid_points(self._pld_at(v2)) / MAX_GRID_POINTS))
                    e3 = query(self._pld_at(v3))
                    if e3 <= best:
                        best, vdi = e3, v3
                    coarse = v3 > wanted
        self._details = {"method": "pld", "value_discretization_interval": vdi,
                         "grid_points": self._grid_points(self._pld_at(vdi)), "coarsened": coarse}
        return self._with_rdp(best, rdp_query) if coarse else best

    def _with_rdp(self, value: float, rdp_query) -> float:
        """The smaller of a coarse-grid PLD bound and the RDP bound (both are upper bounds)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            other = rdp_query(self._rdp())
        if other < value:
            self._details = {**self._details, "method": "rdp", "pld_value": value,
                             "reason": f"PLD grid capped at {MAX_GRID_POINTS} points; RDP is smaller"}
            return other
        return value

    def details(self) -> dict:
        """How the last ε/δ was computed.

        Returns:
            ``{"method": "closed_form" | "pld" | "rdp", ...}``: for ``"pld"`` the grid step
            ``value_discretization_interval``, ``grid_points`` of the grid that answered, the
            predicted ``width`` and ``coarsened`` (True when :data:`MAX_GRID_POINTS` forced a
            coarser grid than the tolerance asked); for ``"rdp"`` the ``reason``. Empty before
            any query.
        """
        return dict(self._details)

    # ------------------------------------------------------------------ queries
    def _epsilon_from_ledger(self, delta: float) -> float:
        mu = self._gaussian_only()
        if mu is not None:
            self._details = {"method": "closed_form"}
            return gaussian_epsilon(mu, delta)
        if self._nonprivate():
            self._details = {"method": "non_private"}
            return math.inf
        return self._answer(lambda pld: pld.get_epsilon_for_delta(delta), lambda r: r.epsilon(delta))

    def _delta_from_ledger(self, epsilon: float) -> float:
        mu = self._gaussian_only()
        if mu is not None:
            self._details = {"method": "closed_form"}
            return gaussian_delta(mu, epsilon)
        if self._nonprivate():
            self._details = {"method": "non_private"}
            return 1.0
        return self._answer(lambda pld: pld.get_delta_for_epsilon(epsilon), lambda r: r.delta(epsilon))
