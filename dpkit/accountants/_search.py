"""The one noise search every calibration in dpkit uses."""

from __future__ import annotations

from typing import Callable

from dpkit import _validate as V


def search_targets(target_epsilon, target_delta, max_noise_multiplier, rtol) -> tuple:
    """The arguments every σ calibration shares, validated: (ε, δ, largest σ searched, rtol)."""
    return (V.positive("target_epsilon", target_epsilon), V.delta("target_delta", target_delta),
            V.positive("max_noise_multiplier", max_noise_multiplier),
            V.probability("rtol", rtol, allow_one=False))


def smallest_feasible(feasible: Callable[[float], bool], *, start: float, lower: float, upper: float,
                      rtol: float, unreachable: Callable[[], Exception]) -> float:
    """Smallest x in [lower, upper] with ``feasible(x)``, to relative precision ``rtol``.

    Assumes feasibility is monotone (infeasible below a threshold, feasible above), as ε is
    decreasing in the noise. Brackets by halving/doubling from ``start``, then bisects. The
    returned x was itself checked feasible (a calibration never overshoots its target), and
    x·(1 − rtol) is infeasible unless x is the smallest value tried above ``lower``.

    Raises:
        the exception built by ``unreachable()`` when even ``upper`` is infeasible.
    """
    hi = min(max(start, lower), upper)
    if feasible(hi):
        while True:
            lo = hi / 2
            if lo < lower:
                return hi
            if not feasible(lo):
                break
            hi = lo
    else:
        while True:
            if hi >= upper:
                raise unreachable()
            lo, hi = hi, min(2 * hi, upper)
            if feasible(hi):
                break
    # invariant: infeasible(lo), feasible(hi)
    while hi - lo > rtol * hi:
        mid = 0.5 * (lo + hi)
        if feasible(mid):
            hi = mid
        else:
            lo = mid
    return hi
