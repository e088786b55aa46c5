"""Self-audit of every optimizer variant: canaries inserted into the SAME run, one-shot lower
bound ≤ the ε that variant's accountant claims. (DP-SGD itself, and a broken noise-free run that
the audit must flag, are in test_self_audit.py; federated canaries in tests/federated.)"""

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import dpkit
from dpkit.accountants import MatrixMechanismAccountant
from dpkit.audit.canaries import CanaryAuditor
from dpkit.mechanisms.matrix import CorrelatedNoise
from dpkit.mechanisms.matrix.strategies import banded

N, BATCH, EPOCHS, DELTA = 200, 10, 5, 1e-5


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


def test_self_audit_dicesgd():
    x, y = _data(0)
    model = _model(0)
    _, opt, loader = dpkit.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.5), DataLoader(TensorDataset(x, y), batch_size=BATCH),
        noise_multiplier=1.0, max_grad_norm=1.0, error_feedback={"clip2": 1.0},
        accountant="rdp",  # a valid upper bound; PLD of the near-noiseless feedback part is slow
        generator=torch.Generator().manual_seed(1))
    auditor = CanaryAuditor(opt, num_canaries=200, sampling_rate=BATCH / N, seed=0)
    for _ in range(EPOCHS):
        _train(model, opt, loader)
    estimate = auditor.estimate(delta=DELTA)
    assert estimate.epsilon_lower <= opt.epsilon(DELTA)


def test_self_audit_banded_matrix_factorisation_with_mmcc():
    x, y = _data(1)
    steps, q = EPOCHS * N // BATCH, BATCH / N
    strategy = banded(steps, 4)
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
        _train(model, opt, [b for b, _ in zip(loader, range(steps - opt.steps))])
    estimate = auditor.estimate(delta=DELTA)
    claimed = opt.epsilon(DELTA)
    assert estimate.epsilon > 0.1  # the canaries are visible
    assert estimate.epsilon_lower <= claimed
