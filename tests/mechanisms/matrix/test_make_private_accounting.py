"""make_private with correlated noise builds the accountant of the mechanism that runs — or refuses.

Review found ``make_private(..., noise=CorrelatedNoise(banded(60, 4)))`` with a plain Poisson loader
printing DP-SGD's ε (1.985) where MMCC bounds the run at 67.2, and a ``banded`` accountant accepted
with a sampler its analysis does not cover.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from dp_accounting import dp_event as dpe
from dp_accounting.pld import pld_privacy_accountant
from torch.utils.data import DataLoader, TensorDataset

import dpkit
from dpkit.accountants import MatrixMechanismAccountant, make_accountant, mmcc_analysis
from dpkit.accountants.mmcc import banded_amplified_epsilon
from dpkit.mechanisms.matrix import (CorrelatedNoise, CyclicPoissonSampler, Participation, banded,
                                     binary_tree, identity)

N, B, SIGMA, DELTA = 200, 10, 1.0, 1e-5


def _data():
    x = torch.randn(N, 4, generator=torch.Generator().manual_seed(0))
    return TensorDataset(x, (x[:, 0] > 0).long())


def _run(noise, loader=None, steps=4, **kw):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    _, opt, dp_loader = dpkit.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), loader or DataLoader(_data(), batch_size=B),
        max_grad_norm=1.0, noise=noise, **{"noise_multiplier": SIGMA, **kw})
    done = 0
    for x, y in dp_loader:
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        done += 1
        if done == steps:
            break
    return opt


def _dpsgd_epsilon(q, steps):
    acc = pld_privacy_accountant.PLDAccountant()
    acc.compose(dpe.SelfComposedDpEvent(dpe.PoissonSampledDpEvent(q, dpe.GaussianDpEvent(SIGMA)), steps))
    return acc.get_epsilon(DELTA)


def test_banded_noise_with_poisson_loader_is_accounted_by_mmcc():
    noise = CorrelatedNoise(banded(8, 2), seed=1)
    opt = _run(noise, steps=4)
    assert isinstance(opt.accountant, MatrixMechanismAccountant) and opt.accountant.method == "mmcc"
    C = banded(8, 2).encoder()[:4, :4] / noise.sensitivity
    expected = mmcc_analysis(C, noise_multiplier=SIGMA, sampling_prob=B / N, delta=DELTA).epsilon
    assert opt.epsilon(DELTA) == pytest.approx(expected, rel=1e-9)
    # what was printed before: DP-SGD's ε, below the mechanism's
    assert opt.epsilon(DELTA) > _dpsgd_epsilon(B / N, 4) * 1.05


def test_identity_strategy_is_dpsgd():
    opt = _run(CorrelatedNoise(identity(8), seed=1), steps=4)
    assert opt.epsilon(DELTA) == pytest.approx(_dpsgd_epsilon(B / N, 4), rel=2e-2)


def test_banded_noise_with_cyclic_poisson_sampler_is_amplified_bandmf():
    bands, q, n = 2, 0.2, 8
    noise = CorrelatedNoise(banded(n, bands), seed=1)  # participations hit disjoint rows: single sens
    loader = DataLoader(_data(), batch_sampler=CyclicPoissonSampler(N, bands, q, n, seed=3))
    opt = _run(noise, loader, steps=6)
    assert opt.accountant.method == "banded" and opt.expected_batch_size == pytest.approx(q * N / bands)
    C = banded(n, bands).encoder()[:6, :6] / noise.sensitivity
    expected = banded_amplified_epsilon(C, noise_multiplier=SIGMA, group_sampling_prob=q, delta=DELTA,
                                        bands=bands)
    assert opt.epsilon(DELTA) == pytest.approx(expected, rel=1e-9)
    # amplified BandMF = DP-SGD with ceil(t/b) steps at the group rate (column-normalised C)
    assert expected == pytest.approx(_dpsgd_epsilon(q, math.ceil(6 / bands)), rel=2e-2)


def test_tree_noise_scaled_for_one_participation_is_refused_with_poisson_sampling():
    with pytest.raises(ValueError, match="every step"):
        _run(CorrelatedNoise(binary_tree(16), seed=1))


def test_tree_noise_covering_every_step_is_accounted_unamplified():
    noise = CorrelatedNoise(binary_tree(8), participation=Participation.min_separation(1, 8), seed=1)
    opt = _run(noise, steps=3)
    assert opt.accountant.method == "unamplified"
    assert opt.epsilon(DELTA) == pytest.approx(
        dpkit.accountants.unamplified_epsilon(sensitivity=1.0, noise_multiplier=SIGMA, delta=DELTA))


def test_accountants_that_do_not_describe_the_run_are_refused():
    noise = CorrelatedNoise(banded(8, 2), seed=1)
    C = banded(8, 2).encoder()
    with pytest.raises(ValueError, match="cannot describe correlated noise"):
        _run(noise, accountant=make_accountant("pld"))
    banded_acc = MatrixMechanismAccountant(C, noise_multiplier=SIGMA, sampling_prob=B / N,
                                           sensitivity=noise.sensitivity, method="banded")
    with pytest.raises(ValueError, match="cyclic Poisson"):
        _run(noise, accountant=banded_acc)
    wrong_sens = MatrixMechanismAccountant(C, noise_multiplier=SIGMA, sampling_prob=B / N, sensitivity=2.0)
    with pytest.raises(ValueError, match="sensitivity"):
        _run(noise, accountant=wrong_sens)
    with pytest.raises(ValueError, match="target_epsilon"):
        _run(noise, noise_multiplier=None, target_epsilon=1.0, target_delta=DELTA, steps=8)
    with pytest.raises(ValueError, match="correlated noise"):
        loader = DataLoader(_data(), batch_sampler=CyclicPoissonSampler(N, 2, 0.2, 8, seed=3))
        _run(None, loader)
    with pytest.raises(ValueError, match="bands"):
        loader = DataLoader(_data(), batch_sampler=CyclicPoissonSampler(N, 2, 0.2, 8, seed=3))
        _run(CorrelatedNoise(banded(8, 4), seed=1), loader)


def test_cyclic_sampler_resumes_its_sequence():
    a = CyclicPoissonSampler(N, 4, 0.3, 12)
    first = [a.batch(t) for t in range(12)]
    assert [list(b) for b in a][:12] == first
    state = a.state_dict()
    b = CyclicPoissonSampler(N, 4, 0.3, 12)  # fresh OS-entropy seed and partition
    b.load_state_dict(state)
    assert b.position == 12 and [b.batch(t) for t in range(12)] == first
    nxt = list(b)
    assert nxt and all(tuple(x) not in {tuple(y) for y in first} for x in nxt if x)
    members = {i for g in b.groups for i in g.tolist()}
    assert members == set(range(N)) and np.all([len(g) in (N // 4,) for g in b.groups])


def test_declared_sampling_takes_the_given_matrix_accountant():
    """data_loader=None: the caller samples; a MatrixMechanismAccountant is their declaration."""
    noise = CorrelatedNoise(banded(8, 2), seed=1)
    acc = MatrixMechanismAccountant(banded(8, 2).encoder(), noise_multiplier=SIGMA, sampling_prob=0.2,
                                    sensitivity=noise.sensitivity, method="banded", bands=2)
    model = nn.Linear(4, 2)
    _, opt, _ = dpkit.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), None,
                                   max_grad_norm=1.0, noise_multiplier=SIGMA, sample_rate=0.2,
                                   expected_batch_size=20, noise=noise, accountant=acc)
    assert opt.accountant is acc
    model = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="cannot describe correlated noise"):
        dpkit.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), None,
                           max_grad_norm=1.0, noise_multiplier=SIGMA, sample_rate=0.2, expected_batch_size=20,
                           noise=CorrelatedNoise(banded(8, 2), seed=1), accountant=make_accountant("pld"))
