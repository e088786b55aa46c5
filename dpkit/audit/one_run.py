"""ε lower bounds from guessing games: one-run auditing and the classic many-runs audit.

One run — Steinke, Nasr, Jagielski, NeurIPS 2023, "Privacy Auditing with One (1) Training Run".
m canaries are each included independently with probability 1/2; an attack makes r guesses
(abstaining on the rest) of which v are correct. If the mechanism is (ε, δ)-DP then (Thm. 5.2)

    P[V ≥ v] ≤ f(v) + 2mδ · max_{1 ≤ i ≤ v} (f(v − i) − f(v)) / i,
    f(u) = P[Binomial(r, e^ε / (1 + e^ε)) ≥ u].

The audit rejects "ε-DP" when that tail is ≤ 1 − confidence; because ε-DP implies ε'-DP for
every ε' ≥ ε, every rejected ε is a valid lower bound, and the largest one found by bisection is
reported (the paper's Algorithm 2). δ = 0 gives the pure binomial tail.

Many runs — the classic audit (Jagielski, Ullman, Oprea, NeurIPS 2020; Nasr et al., S&P 2021):
for a test run many times on neighbouring inputs, (ε, δ)-DP forces FPR + e^ε·FNR ≥ 1 − δ and
FNR + e^ε·FPR ≥ 1 − δ. Clopper-Pearson upper bounds on FPR and FNR (each at level
1 − (1 − confidence)/2, so both hold jointly with probability ≥ confidence) give
ε ≥ max(log((1 − δ − FNR⁺)/FPR⁺), log((1 − δ − FPR⁺)/FNR⁺)).
"""

from __future__ import annotations

import math

import numpy as np
# scipy.special, not scipy.stats: scipy.stats fails to import when torch is masked as absent
# (sys.modules["torch"] = None), which is how dpkit tests that this package is torch-free
from scipy.special import bdtrc, betaincinv, expit

from dpkit import _validate

_BISECTION_STEPS = 60
_MAX_EPSILON = 700.0  # e^ε overflows float64 beyond this


def _one_run_tail(eps: float, m: int, r: int, v: int, delta: float) -> float:
    """Steinke et al. (2023), Thm. 5.2: upper bound on P[V ≥ v] under (ε, δ)-DP."""
    q = expit(eps)  # e^ε / (1 + e^ε) without overflow

    def f(u):  # P[Binomial(r, q) ≥ u] = P[X > u − 1]; equals 1 for u ≤ 0
        u = np.asarray(u)
        return np.where(u <= 0, 1.0, bdtrc(np.maximum(u - 1, 0), r, q))

    tail = float(f(v))
    if delta > 0 and v > 0:
        i = np.arange(1, v + 1)
        tail += 2.0 * m * delta * float(np.max((f(v - i) - tail) / i))
    return tail


def one_run_epsilon_lower_bound(num_canaries, num_guesses, num_correct, *, delta=0.0,
                                confidence=0.95) -> float:
    """ε lower bound from one run: m canaries, r guesses, v correct (Steinke et al., 2023).

    Args:
        num_canaries: m ≥ 1, canaries each included with probability 1/2.
        num_guesses: r with 0 ≤ r ≤ m (the attack abstains on m − r canaries).
        num_correct: v with 0 ≤ v ≤ r.
        delta: δ in [0, 1) of the (ε, δ)-DP hypothesis being tested.
        confidence: probability in (0, 1) with which the bound holds.

    Returns:
        ε̂ ≥ 0 such that, if the mechanism were (ε̂, δ)-DP, v or more correct guesses would have
        probability ≤ 1 − confidence. 0 when nothing can be rejected.

    Raises:
        ValueError/TypeError: counts not integers or out of order, δ or confidence invalid.
    """
    m = _validate.positive_int("num_canaries", num_canaries)
    r = _validate.positive_int("num_guesses", num_guesses, allow_zero=True)
    v = _validate.positive_int("num_correct", num_correct, allow_zero=True)
    if r > m:
        raise ValueError(f"num_guesses must be <= num_canaries ({m}); got {r!r}")
    if v > r:
        raise ValueError(f"num_correct must be <= num_guesses ({r}); got {v!r}")
    delta = _validate.probability("delta", delta, allow_zero=True, allow_one=False)
    confidence = _validate.probability("confidence", confidence, allow_one=False)
    level = 1.0 - confidence

    def rejected(eps):
        return _one_run_tail(eps, m, r, v, delta) <= level

    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi) and hi < _MAX_EPSILON:
        lo, hi = hi, 2.0 * hi
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
    return lo  # a rejected ε: a valid lower bound


def one_run_guesses(scores, included, *, num_positive, num_negative):
    """Score-ranking attack of Steinke et al. (2023, Sec. 6): count guesses and correct ones.

    Guesses "included" for the ``num_positive`` highest scores, "excluded" for the
    ``num_negative`` lowest, abstains on the rest.

    Args:
        scores: 1-D array, one attack score per canary (higher = more likely included).
        included: 1-D boolean array, the true inclusion of each canary.
        num_positive, num_negative: counts of positive / negative guesses (sum ≤ m).

    Returns:
        (num_guesses, num_correct), ready for :func:`one_run_epsilon_lower_bound`.

    Raises:
        ValueError/TypeError: mismatched shapes, non-finite scores, counts out of range.
    """
    s = np.asarray(scores, dtype=float)
    inc = np.asarray(included)
    if s.ndim != 1 or s.size == 0 or inc.shape != s.shape:
        raise ValueError(f"scores and included must be non-empty 1-D arrays of equal length; "
                         f"got shapes {s.shape} and {inc.shape}")
    if inc.dtype != bool:
        raise TypeError(f"included must be a boolean array; got dtype {inc.dtype}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    k_pos = _validate.positive_int("num_positive", num_positive, allow_zero=True)
    k_neg = _validate.positive_int("num_negative", num_negative, allow_zero=True)
    if k_pos + k_neg > s.size:
        raise ValueError(f"num_positive + num_negative must be <= the number of canaries "
                         f"({s.size}); got {k_pos + k_neg}")
    order = np.argsort(s, kind="stable")
    correct = int(inc[order[s.size - k_pos:]].sum()) if k_pos else 0
    correct += int((~inc[order[:k_neg]]).sum())
    return k_pos + k_neg, correct


def clopper_pearson_interval(successes, trials, *, confidence=0.95):
    """Exact (Clopper-Pearson) two-sided confidence interval for a binomial proportion.

    Clopper & Pearson (Biometrika 1934): lower = Beta quantile (α/2; k, n − k + 1), upper =
    Beta quantile (1 − α/2; k + 1, n − k), α = 1 − confidence; coverage ≥ confidence for every
    true proportion.

    Args:
        successes: k with 0 ≤ k ≤ n.
        trials: n ≥ 1.
        confidence: level in (0, 1).

    Returns:
        (lower, upper) floats in [0, 1].

    Raises:
        ValueError/TypeError: invalid counts or confidence.
    """
    n = _validate.positive_int("trials", trials)
    k = _validate.positive_int("successes", successes, allow_zero=True)
    if k > n:
        raise ValueError(f"successes must be <= trials ({n}); got {k!r}")
    alpha = 1.0 - _validate.probability("confidence", confidence, allow_one=False)
    lower = 0.0 if k == 0 else float(betaincinv(k, n - k + 1, alpha / 2))
    upper = 1.0 if k == n else float(betaincinv(k + 1, n - k, 1 - alpha / 2))
    return lower, upper


def many_runs_epsilon_lower_bound(false_positives, negatives, false_negatives, positives, *,
                                  delta=0.0, confidence=0.95) -> float:
    """Classic audit: ε lower bound from an attack's errors over repeated runs.

    Args:
        false_positives: runs WITHOUT the target record that the attack called "in".
        negatives: number of runs without the target record (≥ 1).
        false_negatives: runs WITH the target record that the attack called "out".
        positives: number of runs with the target record (≥ 1).
        delta: δ in [0, 1) of the hypothesis.
        confidence: joint level in (0, 1) (each rate bounded at 1 − (1 − confidence)/2).

    Returns:
        ε lower bound ≥ 0, valid with probability ≥ confidence.

    Raises:
        ValueError/TypeError: invalid counts, δ or confidence.
    """
    delta = _validate.probability("delta", delta, allow_zero=True, allow_one=False)
    confidence = _validate.probability("confidence", confidence, allow_one=False)
    # the upper end of a two-sided interval at level c is a one-sided bound at 1 − (1 − c)/2:
    # with c = confidence each rate fails with probability ≤ α/2, jointly ≤ α (union bound)
    fpr_hi = clopper_pearson_interval(false_positives, negatives, confidence=confidence)[1]
    fnr_hi = clopper_pearson_interval(false_negatives, positives, confidence=confidence)[1]
    candidates = [0.0]
    for a, b in ((fpr_hi, fnr_hi), (fnr_hi, fpr_hi)):
        if 1.0 - delta - b > 0 and a > 0:
            candidates.append(math.log((1.0 - delta - b) / a))
    return max(candidates)
