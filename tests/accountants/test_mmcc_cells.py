"""MMCC's history-cell analysis (n = 2, 3) vs an independent numerical integration of the mechanism.

The reference integrates the hockey-stick divergence of N(0, σ²I) vs E_s N(C s, σ²I) on a plain
midpoint grid over θ ∈ R^n, summing the 2^n participation patterns s — no posterior, no cells.
"""

import itertools
import math

import dp_accounting
import numpy as np
import pytest
from scipy import stats

from dpkit.accountants.mmcc import gaussian_epsilon, mmcc_analysis, mmcc_epsilon
from dpkit.accountants.mmcc_cells import cells_delta

_LOSS_BIN = 1e-3


def exact_privacy_curve(C, sigma, p, eps_list, h=None, span=8.0):
    """Grid integration of both hockey-stick divergences of the n-step pair (n = 2 or 3).

    Returns ``(delta, hist)``: max over the two directions of δ(ε) for each ε in ``eps_list``,
    and a histogram of the privacy loss ln(q/p) over the grid (mass of q and of p per 1e-3 bin)
    from which :func:`exact_epsilon` reads δ exactly at the bin edges.
    """
    C = np.asarray(C, float)
    n = C.shape[0]
    h = h or sigma * (0.03 if n == 2 else 0.08)  # midpoint rule: ε moves < 1e-3 down to h/4
    axes = [np.arange(-span * sigma, span * sigma + C[k].sum() + h, h) for k in range(n)]
    patterns = [np.array(s, float) for s in itertools.product([0, 1], repeat=n)]
    weights = [math.prod(p if x else 1 - p for x in s) for s in patterns]
    dens = [[stats.norm.pdf(axes[k], loc=(C @ s)[k], scale=sigma) * h for s in patterns]
            for k in range(n)]
    base = [stats.norm.pdf(axes[k], scale=sigma) * h for k in range(n)]

    def outer(vectors):
        out = vectors[0]
        for vec in vectors[1:]:
            out = np.multiply.outer(out, vec)
        return out

    gammas = np.exp(np.asarray(eps_list, float))
    remove, add = np.zeros(gammas.size), np.zeros(gammas.size)
    bins = int(80 / _LOSS_BIN)
    hist_q, hist_p = np.zeros(bins), np.zeros(bins)
    base_rest = outer(base[1:])
    for i in range(axes[0].size):  # one θ_1 slice at a time keeps memory small
        q = sum(w * dens[0][u][i] * outer([dens[k][u] for k in range(1, n)])
                for u, w in enumerate(weights))
        p_ = base[0][i] * base_rest
        for m, g in enumerate(gammas):
            remove[m] += np.maximum(q - g * p_, 0).sum()
            add[m] += np.maximum(p_ - g * q, 0).sum()
        loss = np.log(q) - np.log(p_)
        idx = np.clip(np.floor((loss + 40) / _LOSS_BIN).astype(int), 0, bins - 1).ravel()
        hist_q += np.bincount(idx, q.ravel(), bins)
        hist_p += np.bincount(idx, p_.ravel(), bins)
    return np.maximum(remove, add), (hist_q, hist_p)


def exact_epsilon(hist, delta):
    """Smallest loss-bin edge ε ≥ 0 with δ(ε) ≤ δ; the exact ε lies in (ε − 1e-3, ε]."""
    hist_q, hist_p = hist
    lower = -40 + _LOSS_BIN * np.arange(hist_q.size)
    for k in range(int(round(40 / _LOSS_BIN)), hist_q.size):
        eps = lower[k]
        remove = np.sum(hist_q[k:] - math.exp(eps) * hist_p[k:])
        sel = lower + _LOSS_BIN <= -eps + 1e-12  # bins where the add-direction loss −ln(q/p) ≥ ε
        add = np.sum(hist_p[sel] - math.exp(eps) * hist_q[sel])
        if max(remove, add) <= delta:
            return eps
    return math.inf


TWO_STEP = [
    (np.array([[1.0, 0.0], [0.5, 1.0]]), 1.0, 0.1, 1e-5),
    (np.array([[1.0, 0.0], [0.6, 0.8]]), 0.8, 0.05, 1e-3),
    (np.array([[0.8, 0.0], [0.6, 1.0]]), 2.0, 0.3, 1e-5),
    (np.array([[1.0, 0.0], [1.0, 1.0]]), 1.0, 0.3, 1e-3),
]
THREE_STEP = [
    (np.array([[1.0, 0, 0], [0.5, 1.0, 0], [0.3, 0.5, 1.0]]), 1.0, 0.1, 1e-5),
    (np.array([[1.0, 0, 0], [0.6, 0.8, 0], [0.0, 0.6, 0.8]]), 2.0, 0.3, 1e-3),
]


@pytest.mark.parametrize("C, sigma, p, delta", TWO_STEP + THREE_STEP)
def test_cells_bound_is_valid_and_within_5_percent_of_exact(C, sigma, p, delta):
    res = mmcc_analysis(C, noise_multiplier=sigma, sampling_prob=p, delta=delta)
    assert res.method == "cells" and res.tail_delta == 0.0 and res.pld_delta == delta
    (exact_delta,), hist = exact_privacy_curve(C, sigma, p, [res.epsilon])
    assert exact_delta <= delta  # valid: the integrated mechanism meets δ at dpkit's ε
    eps_exact = exact_epsilon(hist, delta)
    assert eps_exact - _LOSS_BIN <= res.epsilon  # (implied by validity; checks the integrator)
    assert res.epsilon <= 1.05 * (eps_exact - _LOSS_BIN)


def test_integrator_matches_dp_accounting_on_two_step_dpsgd():
    # C = I is DP-SGD with 2 steps: the reference integrator against dp_accounting directly,
    # and the cell analysis (forced) is DP-SGD within its cell width, never below the exact ε
    sigma, p, delta = 0.8, 0.3, 1e-3
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_accounting.PoissonSampledDpEvent(p, dp_accounting.GaussianDpEvent(sigma)), 2)
    ref = acc.get_epsilon(delta)
    _, hist = exact_privacy_curve(np.eye(2), sigma, p, [])
    assert exact_epsilon(hist, delta) == pytest.approx(ref, abs=2e-3)
    cells = mmcc_epsilon(np.eye(2), noise_multiplier=sigma, sampling_prob=p, delta=delta,
                         analysis="cells")
    assert ref - 2e-3 <= cells <= ref * 1.01
    # auto keeps dp_accounting's PLD for C = I (its tail-bound analysis is exactly DP-SGD)
    auto = mmcc_epsilon(np.eye(2), noise_multiplier=sigma, sampling_prob=p, delta=delta)
    assert auto <= cells


def test_full_participation_cells_is_the_gaussian():
    C = np.array([[1.0, 0, 0], [0.6, 0.8, 0], [0.0, 0.6, 0.8]])
    sigma, delta = 2.0, 1e-5
    exact = gaussian_epsilon(np.linalg.norm(C.sum(axis=1)) / sigma, delta)
    cells = mmcc_epsilon(C, noise_multiplier=sigma, sampling_prob=1.0, delta=delta,
                         analysis="cells")
    assert exact <= cells <= exact * 1.02
    auto = mmcc_analysis(C, noise_multiplier=sigma, sampling_prob=1.0, delta=delta)
    assert auto.method == "tail_bound" and auto.epsilon == pytest.approx(exact, rel=1e-9)


def test_cells_delta_is_monotone_and_tightens_with_the_grid():
    C = np.array([[1.0, 0.0], [0.5, 1.0]])
    kw = dict(noise_multiplier=1.0, sampling_prob=0.1)
    d = [cells_delta(C, epsilon=e, **kw) for e in (1.0, 2.0, 3.0)]
    assert d[0] > d[1] > d[2] > 0
    coarse = cells_delta(C, epsilon=2.0, cells_per_sigma=10, **kw)
    (exact,), _ = exact_privacy_curve(C, 1.0, 0.1, [2.0])
    assert exact <= d[1] < coarse


def test_refining_boxes_never_raises_the_bound_and_stays_above_exact():
    from dpkit.accountants.mmcc_cells import _Cells
    C = np.array([[1.0, 0, 0], [0.5, 1.0, 0], [0.3, 0.5, 1.0]])
    cells = _Cells(C, 1.0, 0.1, 1e-5, 4)
    bounds = [cells.delta(4.2)]
    for _ in range(2):
        cells.refine(4.2)
        bounds.append(cells.delta(4.2))
    (exact,), _ = exact_privacy_curve(C, 1.0, 0.1, [4.2])
    assert bounds[0] > bounds[1] > bounds[2] >= exact


@pytest.mark.parametrize("kwargs, match", [
    (dict(analysis="exact"), "analysis"),
    (dict(analysis="cells", C=np.eye(4)), "n = 2 or 3"),
    (dict(cells_per_sigma=0), "cells_per_sigma"),
])
def test_cells_bad_input(kwargs, match):
    args = dict(C=np.eye(2), noise_multiplier=1.0, sampling_prob=0.1, delta=1e-5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        mmcc_analysis(args.pop("C"), **args)


def test_tiny_sigma_caps_the_grid_and_stays_valid():
    # σ ≪ C: the grid is coarsened to MAX_CELLS (bounded memory), the bound stays above exact
    from dpkit.accountants.mmcc_cells import MAX_CELLS, _Cells
    C = np.array([[1.0, 0, 0], [0.5, 1.0, 0], [0.3, 0.5, 1.0]])
    assert 0.5 * MAX_CELLS < _Cells(C, 0.02, 0.1, 1e-5, 20).cells <= MAX_CELLS
    C2 = np.array([[1.0, 0.0], [0.5, 1.0]])
    eps = mmcc_epsilon(C2, noise_multiplier=0.2, sampling_prob=0.1, delta=1e-5)
    (exact,), _ = exact_privacy_curve(C2, 0.2, 0.1, [eps])
    assert exact <= 1e-5
