"""Self-audit of every optimizer variant: canaries inserted into the SAME run, one-shot lower
bound ≤ the ε that variant's accountant claims, and — where the claim is small enough for the audit
to have power — an under-noised variant that the same pipeline must flag. (DP-SGD itself, and a
broken noise-free run, are in test_self_audit.py; federated canaries in tests/federated.)"""

import itertools

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import dpkit
from dpkit.accountants import MatrixMechanismAccountant
from dpkit.audit.canaries import CanaryAuditor
from dpkit.mechanisms.matrix import CorrelatedNoise
from dpkit.mechanisms.matrix.strategies import banded

N, BATCH, EPOCHS, DELTA = 200, 10, 5, 1e-5
# fixed seeds make these statistical checks deterministic; they are test conveniences
pytestmark = pytest.mark.filterwarnings("ignore::dpkit.errors.SeededRandomnessWarning")


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 32, generator=g)
    return x, (x @ torch.randn(32, 10, generator=g)).argmax(dim=1)


def _model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10))


def _train(model, opt, batches):
    for xb, yb in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()


def _dicesgd_audit(noise_multiplier, seed, clip2=1e-3):
    """DiceSGD (σ, C1 = 1, C2) for 5 epochs (q = 0.05, T = 100) with 200 gradient canaries."""
    x, y = _data(seed)
    model = _model(seed)
    _, opt, loader = dpkit.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.5), DataLoader(TensorDataset(x, y), batch_size=BATCH),
        noise_multiplier=noise_multiplier, max_grad_norm=1.0, error_feedback={"clip2": clip2},
        generator=torch.Generator().manual_seed(seed + 1))
    auditor = CanaryAuditor(opt, num_canaries=200, sampling_rate=BATCH / N, seed=seed)
    for _ in range(EPOCHS):
        _train(model, opt, loader)
    assert opt.steps == EPOCHS * N // BATCH
    return auditor.estimate(delta=DELTA), opt


def test_self_audit_dicesgd_passes_and_flags_an_under_noised_variant():
    """DiceSGD with C2 = 1e-3 (mean units; B̄·C2 ≪ C1) so that its worst-case ledger claims a few
    units of ε, not ≈ 4·10⁴ as with C2 = C1, where no estimate could ever exceed the claim. The
    same pipeline must then (a) stay below dpkit's claim for the real configuration and (b) flag a
    variant that adds 5× less noise than the σ it claims."""
    estimate, opt = _dicesgd_audit(1.0, seed=1)
    claimed = opt.epsilon(DELTA)
    assert 2.0 < claimed < 10.0                    # small enough for the audit to have power
    assert estimate.epsilon > 0.5                   # the canaries are visible
    assert estimate.epsilon_lower <= claimed
    broken, _ = _dicesgd_audit(0.2, seed=1)         # adds σ = 0.2, still claims σ = 1's ε
    assert broken.epsilon_lower > claimed, (broken.epsilon_lower, claimed)


def test_self_audit_banded_matrix_factorisation_with_mmcc():
    x, y = _data(1)
    steps, q = EPOCHS * N // BATCH, BATCH / N
    strategy = banded(steps, 4, toeplitz=True)  # Toeplitz bands: MMCC stays fast (few distinct atoms)
    noise = CorrelatedNoise(strategy, seed=3)
    accountant = MatrixMechanismAccountant(strategy, noise_multiplier=1.0, sampling_prob=q,
                                           sensitivity=noise.sensitivity, method="mmcc")
    model = _model(1)
    _, opt, loader = dpkit.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.5), DataLoader(TensorDataset(x, y), batch_size=BATCH),
        noise_multiplier=1.0, max_grad_norm=1.0, noise=noise, accountant=accountant,
        generator=torch.Generator().manual_seed(2))
    auditor = CanaryAuditor(opt, num_canaries=200, seed=1)
    while opt.steps < steps:
        _train(model, opt, itertools.islice(loader, steps - opt.steps))  # lazily: one batch, one step
    estimate = auditor.estimate(delta=DELTA)
    claimed = opt.epsilon(DELTA)
    assert estimate.epsilon > 0.1  # the canaries are visible
    assert estimate.epsilon_lower <= claimed
