"""Noise calibration: the smallest σ for a target (ε, δ), and the most steps a budget allows.

Both searches use only that ε grows as σ shrinks and as the number of steps grows (true for the
subsampled Gaussian; Abadi et al. 2016, Mironov et al. 2019) and evaluate the chosen accountant,
so the answer is exact with respect to that accountant's (upper-bound) ε: the returned σ never
gives ε above the target. The search is a bracket found by doubling/halving, then bisection
(as in Opacus' ``get_noise_multiplier`` but returning the upper end, which is always feasible).

Epochs → steps: ``steps = ceil(epochs · ceil(N / B))`` and ``q = B / N`` (:func:`epochs_to_steps`).
dpkit rounds UP (like TF Privacy; Opacus rounds down), so a training run that executes
``floor`` or ``ceil`` steps is covered by the account.
"""

from __future__ import annotations

import math

from dpkit import _validate as V
from dpkit.accountants._schedule import epochs_to_steps
from dpkit.accountants._search import search_targets, smallest_feasible
from dpkit.accountants.base import Accountant
from dpkit.accountants.events import dpsgd_event
from dpkit.accountants.pld import PLDAccountant
from dpkit.accountants.registry import make_accountant
from dpkit.errors import CalibrationError

__all__ = ["calibrate_noise_multiplier", "steps_for_budget", "epochs_to_steps"]

DEFAULT_MAX_NOISE_MULTIPLIER = 1e4
# the search never evaluates σ below this: a PLD of a subsampled Gaussian with σ < 0.1 needs a
# grid of millions of points (minutes, GBs), and such σ only meet targets of ε in the tens
_MIN_NOISE_MULTIPLIER = 0.1
# grid tolerance of the bracketing phase of an adaptive-PLD calibration: only the two small grids
# (~8k and 16k points) are computed, whose ε is within a few % of the fine one
_COARSE_TOLERANCE = 0.5
# relative precision of that bracketing phase
_COARSE_RTOL = 0.01


def accountant_factory(accountant):
    """A zero-argument callable returning a FRESH accountant of the given name or configuration."""
    if isinstance(accountant, Accountant):
        return accountant._fresh
    if isinstance(accountant, str):
        make_accountant(accountant)  # validates the name eagerly
        return lambda: make_accountant(accountant)
    raise TypeError(f"accountant must be a registered name or an Accountant; got {accountant!r} "
                    f"({type(accountant).__name__})")


def _resolve_schedule(sampling_prob, steps, epochs, dataset_size, batch_size) -> tuple[float, int]:
    epoch_form = (epochs, dataset_size, batch_size)
    if sampling_prob is not None or steps is not None:
        if any(v is not None for v in epoch_form):
            raise ValueError("give either sampling_prob and steps, or epochs, dataset_size and "
                             "batch_size, not both")
        if sampling_prob is None or steps is None:
            raise ValueError("sampling_prob and steps must both be given; got "
                             f"sampling_prob={sampling_prob!r}, steps={steps!r}")
        return V.probability("sampling_prob", sampling_prob), V.positive_int("steps", steps)
    if any(v is None for v in epoch_form):
        raise ValueError("give sampling_prob and steps, or all of epochs, dataset_size and batch_size; "
                         f"got epochs={epochs!r}, dataset_size={dataset_size!r}, batch_size={batch_size!r}")
    return epochs_to_steps(epochs, dataset_size, batch_size)


def calibrate_noise_multiplier(target_epsilon, target_delta, sampling_prob=None, steps=None, *,
                               epochs=None, dataset_size=None, batch_size=None, accountant="pld",
                               max_noise_multiplier=DEFAULT_MAX_NOISE_MULTIPLIER, rtol=1e-3) -> float:
    """The smallest DP-SGD noise multiplier σ (within ``rtol``) with ε(σ) ≤ ``target_epsilon``.

    The schedule is ``sampling_prob`` + ``steps``, or ``epochs`` + ``dataset_size`` +
    ``batch_size`` (converted by :func:`epochs_to_steps`, steps rounded up).

    Guarantees (w.r.t. the chosen accountant, assuming ε decreases in σ): ε(σ) ≤ target (never
    overshoots) and ε(σ·(1 − rtol)) > target; the search always terminates (≤ ~60 evaluations).
    σ below 0.1 is never searched: if the target is so loose that σ < 0.2 meets it, the smallest
    feasible σ of the halving sequence 1, 1/2, 1/4, 1/8 is returned (still never overshooting).

    Args:
        target_epsilon: ε > 0.
        target_delta: δ in (0, 1).
        sampling_prob: Poisson rate q in (0, 1].
        steps: number of DP-SGD steps T ≥ 1.
        epochs, dataset_size, batch_size: the alternative schedule (all three together).
        accountant: registered name (default ``"pld"``) or an Accountant whose configuration
            is reused (its ledger is ignored).
        max_noise_multiplier: the largest σ searched.
        rtol: relative width of the final bracket, in (0, 1).

    Returns:
        σ (float).

    Raises:
        CalibrationError: the target is not reachable with σ ≤ ``max_noise_multiplier``
            (a ``ValueError``).
        ValueError, TypeError: an invalid argument or a mixed/incomplete schedule.
    """
    target_epsilon, target_delta, max_sigma, rtol = search_targets(target_epsilon, target_delta,
                                                                   max_noise_multiplier, rtol)
    q, steps = _resolve_schedule(sampling_prob, steps, epochs, dataset_size, batch_size)
    fresh = accountant_factory(accountant)

    def eps(sigma: float) -> float:
        return fresh().compose(dpsgd_event(sigma, q, steps)).epsilon(target_delta)

    def feasible(sigma: float) -> bool:
        return eps(sigma) <= target_epsilon

    def unreachable():
        return CalibrationError(
            f"target_epsilon={target_epsilon} at target_delta={target_delta} is not reachable "
            f"with noise_multiplier <= max_noise_multiplier={max_sigma} (q={q}, steps={steps}, "
            f"ε there = {eps(max_sigma):.4g}); raise the target, lower sampling_prob/steps, or "
            "raise max_noise_multiplier")

    proto = fresh()
    if not (isinstance(proto, PLDAccountant) and proto.is_adaptive):
        # smaller σ are not searched (see the docstring)
        return smallest_feasible(feasible, start=1.0, lower=_MIN_NOISE_MULTIPLIER, upper=max_sigma,
                                 rtol=rtol, unreachable=unreachable)
    # Adaptive PLD: bracket with two small grids per evaluation (an upper bound too, so its σ is
    # feasible), then close in on the accountant's own value by log-log interpolation.
    loose_fresh = proto._fresh_with_tolerance(_COARSE_TOLERANCE)

    def loose(sigma: float) -> float:
        return loose_fresh().compose(dpsgd_event(sigma, q, steps)).epsilon(target_delta)

    hi = smallest_feasible(lambda s: loose(s) <= target_epsilon, start=1.0, lower=_MIN_NOISE_MULTIPLIER,
                           upper=max_sigma, rtol=_COARSE_RTOL, unreachable=unreachable)
    return _refine(eps, target_epsilon, hi, loose, rtol, _MIN_NOISE_MULTIPLIER)


def _refine(eps, target: float, hi: float, loose, rtol: float, lower: float) -> float:
    """Smallest σ in [lower, hi] with eps(σ) ≤ target to ``rtol``, given that ``hi`` is feasible.

    ε of the subsampled Gaussian is smooth and close to a power of σ: the exponent is read off
    the cheap ``loose`` accountant, the first lower end is put just below the predicted root, and
    regula falsi on (log σ, log ε) closes the bracket, checking the guess ± rtol/2. A typical
    call costs 4 evaluations of ``eps`` instead of bisection's ~10. Returns the feasible end.
    """
    e_hi = eps(hi)
    if e_hi <= 0 or not math.isfinite(e_hi):
        return hi
    ratio = 1 - 4 * rtol
    slope = math.log(loose(hi * ratio) / loose(hi)) / math.log(ratio)   # d log ε / d log σ < 0
    lo = hi * (target / e_hi) ** (1 / slope) * (1 - rtol) if slope < 0 else hi * ratio
    step = 4 * rtol
    while True:  # step down until lo is infeasible
        if lo <= lower:
            return hi
        e_lo = eps(lo)
        if e_lo > target:
            break
        hi, e_hi = lo, e_lo
        step = min(0.5, 4 * step)
        lo = hi * (1 - step)
    for _ in range(12):  # invariant: eps(lo) = e_lo > target >= e_hi = eps(hi)
        if hi - lo <= rtol * hi:
            return hi
        if 0 < e_hi < target < e_lo < math.inf:
            t = (math.log(target) - math.log(e_lo)) / (math.log(e_hi) - math.log(e_lo))
            guess = math.exp(math.log(lo) + t * (math.log(hi) - math.log(lo)))
        else:
            guess = 0.5 * (lo + hi)
        for probe in (guess * (1 + rtol / 2), guess * (1 - rtol / 2)):
            if lo < probe < hi:
                value = eps(probe)
                if value <= target:
                    hi, e_hi = probe, value
                else:
                    lo, e_lo = probe, value
    while hi - lo > rtol * hi:
        mid = 0.5 * (lo + hi)
        if eps(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def steps_for_budget(target_epsilon, target_delta, noise_multiplier, sampling_prob, *,
                     accountant="pld", max_steps=10**7) -> int:
    """The largest number of DP-SGD steps T with ε(T) ≤ ``target_epsilon`` (0 if none).

    Doubling then integer bisection on T (ε is non-decreasing in T), so the answer is exact with
    respect to the accountant.

    Args:
        target_epsilon: ε > 0.
        target_delta: δ in (0, 1).
        noise_multiplier: σ ≥ 0 (0 gives 0 steps: nothing non-private fits a finite budget).
        sampling_prob: Poisson rate q in (0, 1].
        accountant: registered name or an Accountant (configuration reused).
        max_steps: the search cap; returned when even that many steps fit the budget.

    Returns:
        T, 0 ≤ T ≤ ``max_steps``.

    Raises:
        ValueError, TypeError: an invalid argument.
    """
    target_epsilon = V.positive("target_epsilon", target_epsilon)
    target_delta = V.delta("target_delta", target_delta)
    sigma = V.non_negative("noise_multiplier", noise_multiplier)
    q = V.probability("sampling_prob", sampling_prob)
    max_steps = V.positive_int("max_steps", max_steps)
    fresh = accountant_factory(accountant)

    def fits(t: int) -> bool:
        return fresh().compose(dpsgd_event(sigma, q, t)).epsilon(target_delta) <= target_epsilon

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= max_steps and fits(hi):
        lo, hi = hi, 2 * hi
    if hi > max_steps:
        if fits(max_steps):
            return max_steps
        hi = max_steps
    # invariant: fits(lo) and not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
