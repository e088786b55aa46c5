"""Attack-success bounds for DP-SGD from its privacy-loss distribution (PLD).

An (ε, δ(ε))-DP mechanism constrains every membership test: for all ε ≥ 0,
TPR ≤ e^ε·FPR + δ(ε) and TPR ≤ 1 − e^{−ε}(1 − δ(ε) − FPR) (Kairouz, Oh, Viswanath, ICML 2015,
Thm. 2.1; Dong, Roth, Su 2019, f-DP). Intersecting over the whole curve ε ↦ δ(ε) of the
subsampled Gaussian gives the trade-off bound; at ε = 0 it gives the advantage TPR − FPR ≤ δ(0),
the total-variation distance (Cherubin et al., USENIX Security 2024, compare their bounds to it).

δ(ε) comes from dp_accounting's PLD (pessimistic estimate), so every number here is a valid upper
bound on attack success for the claimed (σ, p, T); "substitution" uses dp_accounting's
REPLACE_ONE relation (mixtures shifted by ±C, i.e. two records whose clipped gradients are 2C
apart).
"""

from __future__ import annotations

import numpy as np

from dpkit import _validate

RELATIONS = ("add_remove", "substitution")
_EPS_GRID = np.concatenate([[0.0], np.geomspace(1e-4, 60.0, 600)])


def dpsgd_pld(noise_multiplier, sampling_rate, steps, *, relation="add_remove",
              pessimistic=True, discretization=1e-3):
    """dp_accounting PLD of T steps of the Poisson-subsampled Gaussian (DP-SGD, clip norm 1).

    Args:
        noise_multiplier: σ > 0.
        sampling_rate: Poisson rate p in (0, 1].
        steps: T ≥ 1.
        relation: ``"add_remove"`` or ``"substitution"``.
        pessimistic: True gives an upper bound on every δ(ε) (the safe side for a claim);
            False gives dp_accounting's optimistic estimate, a LOWER bound (used by tests).
        discretization: privacy-loss discretization interval (> 0).

    Returns:
        a ``dp_accounting.pld.privacy_loss_distribution.PrivacyLossDistribution``.

    Raises:
        ValueError/TypeError: invalid arguments.
    """
    import dp_accounting
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    sigma = _validate.positive("noise_multiplier", noise_multiplier)
    p = _validate.probability("sampling_rate", sampling_rate)
    steps = _validate.positive_int("steps", steps)
    _validate.one_of("relation", relation, RELATIONS)
    discretization = _validate.positive("discretization", discretization)
    rel = (dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE if relation == "add_remove"
           else dp_accounting.NeighboringRelation.REPLACE_ONE)
    pld = pld_lib.from_gaussian_mechanism(
        standard_deviation=sigma, sensitivity=1.0, sampling_prob=p,
        pessimistic_estimate=pessimistic, use_connect_dots=pessimistic,
        value_discretization_interval=discretization, neighboring_relation=rel)
    return pld.self_compose(steps)


def pld_advantage(noise_multiplier, sampling_rate, steps, *, relation="add_remove",
                  pessimistic=True, discretization=1e-3) -> float:
    """Maximal membership advantage TPR − FPR = total variation = δ(ε = 0) of the PLD.

    Args:
        noise_multiplier, sampling_rate, steps, relation, pessimistic, discretization: as in
            :func:`dpsgd_pld`.

    Returns:
        the advantage in [0, 1] (an upper bound when ``pessimistic``, a lower bound otherwise).

    Raises:
        ValueError/TypeError: invalid arguments.
    """
    pld = dpsgd_pld(noise_multiplier, sampling_rate, steps, relation=relation,
                    pessimistic=pessimistic, discretization=discretization)
    return float(min(max(pld.get_delta_for_epsilon(0.0), 0.0), 1.0))


def tpr_at_fpr_bound(fpr, noise_multiplier, sampling_rate, steps, *, relation="add_remove"):
    """Upper bound on the true-positive rate of ANY membership test at the given FPRs.

    TPR ≤ min over ε of min(1, e^ε·FPR + δ(ε), 1 − e^{−ε}(1 − δ(ε) − FPR)), with δ(ε) from the
    pessimistic PLD on a grid of 601 ε values in [0, 60] (a minimum over a subset of ε is still
    a valid bound).

    Args:
        fpr: false-positive rate(s) in [0, 1] (scalar or 1-D array).
        noise_multiplier: σ > 0.
        sampling_rate: Poisson rate p in (0, 1].
        steps: T ≥ 1.
        relation: ``"add_remove"`` or ``"substitution"``.

    Returns:
        float or ndarray of TPR bounds, same shape as ``fpr``.

    Raises:
        ValueError/TypeError: invalid arguments.
    """
    alpha = np.asarray(fpr, dtype=float)
    if alpha.ndim > 1 or not np.all(np.isfinite(alpha)) or np.any((alpha < 0) | (alpha > 1)):
        raise ValueError(f"fpr must be a scalar or 1-D array of values in [0, 1]; got {fpr!r}")
    pld = dpsgd_pld(noise_multiplier, sampling_rate, steps, relation=relation)
    deltas = np.minimum(np.asarray(pld.get_delta_for_epsilon(_EPS_GRID), dtype=float), 1.0)
    a = np.atleast_1d(alpha)[:, None]
    first = np.exp(_EPS_GRID)[None, :] * a + deltas[None, :]
    second = 1.0 - np.exp(-_EPS_GRID)[None, :] * (1.0 - deltas[None, :] - a)
    bound = np.clip(np.minimum(first, second).min(axis=1), 0.0, 1.0)
    bound = np.maximum(bound, np.atleast_1d(alpha))  # a test can always reach TPR = FPR
    return float(bound[0]) if alpha.ndim == 0 else bound
