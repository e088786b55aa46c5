"""The accountant that matches a correlated-noise mechanism AND the sampler that feeds it.

A noise mechanism and its account must come from one description (review found
``make_private(..., noise=CorrelatedNoise(banded(60, 4)))`` printing DP-SGD's ε = 1.985 where the
run's MMCC bound is 67.2). :func:`matrix_accountant` derives the analysis from the strategy, the
sensitivity the noise was standardised with and the sampler dpkit runs:

=================================  ==============================================================
sampler that runs                  analysis
=================================  ==============================================================
Poisson over the whole data set    MMCC (Choquette-Choo et al., ICLR 2024) for a non-negative
(make_private's default loader)    lower-triangular C; otherwise the unamplified Gaussian, but only
                                   when the noise's sensitivity covers participation in EVERY step
                                   (Poisson sampling allows it) — else refused
``CyclicPoissonSampler`` with b    amplified BandMF (Choquette-Choo et al., NeurIPS 2023, Thm 4):
groups                             C must be banded with at most b bands
=================================  ==============================================================

A user-supplied accountant must be a :class:`~dpkit.accountants.MatrixMechanismAccountant` whose
method is valid for that sampler and whose sensitivity is the noise's; anything else is refused.
"""

from __future__ import annotations

import numpy as np

from dpkit.accountants.base import Accountant
from dpkit.accountants.mmcc import MatrixMechanismAccountant, _check_encoder
from dpkit.mechanisms.matrix.participation import CyclicPoissonSampler
from dpkit.mechanisms.matrix.sensitivity import Participation, sensitivity

__all__ = ["is_mmcc_encoder", "matrix_accountant"]


def matrix_accountant(noise, accountant, *, noise_multiplier: float, sampling_prob: float,
                      sampler) -> MatrixMechanismAccountant:
    """The accountant of training with ``noise`` (a ``CorrelatedNoise``) fed by ``sampler``.

    Args:
        noise: the :class:`~dpkit.mechanisms.matrix.CorrelatedNoise` of the run.
        accountant: a registered accountant name (the analysis is then chosen here) or a
            ``MatrixMechanismAccountant`` to check.
        noise_multiplier: σ. sampling_prob: q of each step (within the group for cyclic sampling).
        sampler: ``"poisson"`` (dpkit's loader samples the whole data set every step), the
            ``CyclicPoissonSampler`` that feeds training, or ``"declared"`` (``data_loader=None``:
            the caller samples; a given ``MatrixMechanismAccountant`` is taken as the declaration of
            the sampler, like ``sample_rate`` is for DP-SGD; a name gets MMCC's Poisson analysis).

    Raises:
        ValueError: the accountant, the strategy and the sampler do not describe one mechanism.
    """
    strategy = noise.strategy
    C = np.asarray(strategy.encoder(), dtype=float)
    sens = float(noise.sensitivity)
    cyclic = isinstance(sampler, CyclicPoissonSampler)
    if isinstance(accountant, Accountant):
        return _checked(accountant, C, sens, cyclic, sampler)
    if not isinstance(accountant, str):
        raise TypeError(f"accountant must be a name or an Accountant; got {type(accountant).__name__}")
    if cyclic:
        _check_banded(strategy, sampler)
        return MatrixMechanismAccountant(C, noise_multiplier=noise_multiplier, sampling_prob=sampling_prob,
                                         sensitivity=sens, method="banded", bands=sampler.num_groups)
    if C.shape[0] == C.shape[1] and is_mmcc_encoder(C):
        return MatrixMechanismAccountant(C, noise_multiplier=noise_multiplier, sampling_prob=sampling_prob,
                                         sensitivity=sens, method="mmcc")
    _check_covers_every_step(C, sens, strategy)
    return MatrixMechanismAccountant(C, noise_multiplier=noise_multiplier, sampling_prob=sampling_prob,
                                     sensitivity=sens, method="unamplified")


def _checked(accountant, C, sens, cyclic, sampler):
    declared = isinstance(sampler, str) and sampler == "declared"
    if not isinstance(accountant, MatrixMechanismAccountant):
        raise ValueError(f"accountant {accountant.name!r} cannot describe correlated noise: its per-step "
                         "events are DP-SGD's, but one example's noise is correlated across steps. Leave "
                         "accountant at its default (dpkit builds the matching MatrixMechanismAccountant) "
                         "or pass a MatrixMechanismAccountant")
    if abs(accountant.sensitivity - sens) > 1e-9 * max(1.0, sens):
        raise ValueError(f"accountant was built with sensitivity={accountant.sensitivity}, but the noise is "
                         f"standardised with sensitivity {sens}; use noise.sensitivity")
    if declared:
        return accountant
    if accountant.method == "banded" and not cyclic:
        raise ValueError("accountant method='banded' (amplified BandMF) needs cyclic Poisson sampling, but "
                         "this run samples the whole data set at every step. Give make_private a DataLoader "
                         "with batch_sampler=CyclicPoissonSampler(...), or use method='mmcc'")
    if accountant.method == "mmcc" and cyclic:
        raise ValueError("accountant method='mmcc' assumes Poisson sampling of the whole data set at every "
                         "step; with CyclicPoissonSampler use method='banded'")
    if accountant.method == "unamplified" and not cyclic:
        _check_covers_every_step(C, sens, None)
    return accountant


def is_mmcc_encoder(C) -> bool:
    """Whether MMCC can analyse ``C`` (square, lower-triangular, non-negative, finite)."""
    try:
        _check_encoder(C)
    except (TypeError, ValueError):
        return False
    return True


def _check_banded(strategy, sampler) -> None:
    if strategy.kind != "banded" or strategy.bands > sampler.num_groups:
        raise ValueError(f"CyclicPoissonSampler with {sampler.num_groups} groups needs a banded strategy with "
                         f"at most {sampler.num_groups} bands (amplified BandMF); got {strategy!r}")


def _check_covers_every_step(C, sens, strategy) -> None:
    """Poisson sampling lets one example take part in every step: sens must cover that."""
    every_step = sensitivity(C, Participation.min_separation(1, C.shape[1]))
    if sens < every_step * (1 - 1e-9):
        raise ValueError(
            f"with Poisson sampling an example can take part in every step, which gives this encoder "
            f"sensitivity {every_step:.4g}; the noise was standardised with {sens:.4g}, so no analysis "
            "dpkit has covers this run. Build CorrelatedNoise(..., participation=Participation."
            f"min_separation(1, {C.shape[1]})) or use a strategy MMCC accepts (non-negative lower-triangular)")
