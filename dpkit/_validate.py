"""Shared argument checks. Each raises ``ValueError``/``TypeError`` whose message names the argument.

Messages follow the convention ``"<name> must be <requirement>; got <value!r>"``.
"""

from __future__ import annotations

import math
import numbers


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {value!r} ({type(value).__name__})")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, not NaN; got {value!r}")
    return value


def finite(name: str, value) -> float:
    """Return ``value`` as float; raise unless it is a finite real number."""
    value = _number(name, value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value!r}")
    return value


def positive(name: str, value, *, allow_inf: bool = False) -> float:
    """Return ``value`` as float; raise unless it is > 0 (and finite unless ``allow_inf``)."""
    value = _number(name, value) if allow_inf else finite(name, value)
    if not value > 0:
        raise ValueError(f"{name} must be > 0; got {value!r}")
    return value


def non_negative(name: str, value) -> float:
    """Return ``value`` as float; raise unless it is finite and >= 0."""
    value = finite(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0; got {value!r}")
    return value


def probability(name: str, value, *, allow_zero: bool = False, allow_one: bool = True) -> float:
    """Return ``value`` as float; raise unless it lies in (0, 1] (bounds adjustable)."""
    value = finite(name, value)
    lo_ok = value >= 0 if allow_zero else value > 0
    hi_ok = value <= 1 if allow_one else value < 1
    if not (lo_ok and hi_ok):
        lo = "[0" if allow_zero else "(0"
        hi = "1]" if allow_one else "1)"
        raise ValueError(f"{name} must lie in {lo}, {hi}; got {value!r}")
    return value


def delta(name: str, value) -> float:
    """A δ of (ε, δ)-DP: strictly between 0 and 1."""
    return probability(name, value, allow_zero=False, allow_one=False)


def positive_int(name: str, value, *, allow_zero: bool = False) -> int:
    """Return ``value`` as int; raise unless it is an integer >= 1 (or >= 0 with ``allow_zero``)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer; got {value!r} (bool)")
    if not isinstance(value, numbers.Integral):
        if isinstance(value, numbers.Real) and float(value).is_integer():
            value = int(value)
        else:
            raise TypeError(f"{name} must be an integer; got {value!r} ({type(value).__name__})")
    value = int(value)
    low = 0 if allow_zero else 1
    if value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    return value


def one_of(name: str, value, choices) -> str:
    """Raise unless ``value`` is one of ``choices``; returns it."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)!r}; got {value!r}")
    return value
