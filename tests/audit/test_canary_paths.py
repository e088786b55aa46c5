"""CanaryAuditor's two summation paths (fused embedding_bag; streaming row adds for large d on CPU)
and its block-drawn coins, against float64 regenerations of the directions."""

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy import stats

import dpkit
from dpkit.audit import canary_directions
from dpkit.audit.canaries import _ROW_ADD_MIN_DIM, CanaryAuditor


def _one_zero_loss_step(model, opt, x):
    opt.zero_grad()
    (0.0 * model(x).sum()).backward()
    opt.step()


@pytest.mark.parametrize("width", [8, 300])  # d = 90 (fused) and 77,110 > _ROW_ADD_MIN_DIM (row adds)
def test_step_inserts_clip_times_the_sampled_float64_directions(width, device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, 256), nn.Tanh(), nn.Linear(256, 10)).to(device) \
        if width > 8 else nn.Linear(width, 10).to(device)
    lr, clip, q, batch = 0.5, 1.5, 0.4, 4.0
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    _, opt, _ = dpkit.make_private(model, opt, None, noise_multiplier=0.0, max_grad_norm=clip,
                                   sample_rate=q, expected_batch_size=batch)
    auditor = CanaryAuditor(opt, num_canaries=30, num_unseen=4, sampling_rate=q, seed=3)
    assert (auditor.dim > _ROW_ADD_MIN_DIM) == (width > 8)
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().cpu()
    _one_zero_loss_step(model, opt, torch.randn(3, width, device=device))
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().cpu()
    sampled = auditor.inclusions.astype(bool)
    assert 0 < sampled.sum() < 30
    dirs = canary_directions(3, 30, auditor.dim)
    expected = -lr * clip * dirs[sampled].sum(axis=0) / batch
    np.testing.assert_allclose((after - before).numpy(), expected, atol=1e-6)
    # unseen directions are regenerated at scoring time: canaries 30..33 of the same seed
    _, unseen = auditor.scores()
    delta = -(after - before).numpy()
    ref = canary_directions(3, np.arange(30, 34), auditor.dim) @ delta / np.linalg.norm(delta)
    np.testing.assert_allclose(unseen, ref, atol=1e-9)


def test_coins_across_mask_blocks_are_fresh_bernoulli_draws():
    torch.manual_seed(0)
    model = nn.Linear(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _, opt, _ = dpkit.make_private(model, opt, None, noise_multiplier=0.0, max_grad_norm=1.0,
                                   sample_rate=0.2, expected_batch_size=2)
    auditor = CanaryAuditor(opt, num_canaries=20, num_unseen=2, sampling_rate=0.2, seed=11)
    coins = np.array([auditor._inclusion_mask(t) for t in range(200)])  # blocks 0..3
    assert stats.binomtest(int(coins.sum()), coins.size, 0.2).pvalue > 1e-3
    # consecutive blocks are not copies of each other, and a step's coins do not depend on order
    assert not np.array_equal(coins[:64], coins[64:128])
    np.testing.assert_array_equal(auditor._inclusion_mask(70), coins[70])
    np.testing.assert_array_equal(auditor._inclusion_mask(3), coins[3])


def test_every_step_of_a_sum_block_inserts_its_own_canaries():
    # σ = 0, zero data loss: step t moves θ by −lr·C·Σ_{j ∈ S_t} u_j / B̄ exactly; 270 steps cross
    # coin blocks (64 steps) and a sum block (256), and q is low enough that some steps are empty
    torch.manual_seed(0)
    model = nn.Linear(8, 10)
    lr, clip, q, batch = 0.5, 1.5, 0.02, 4.0
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    _, opt, _ = dpkit.make_private(model, opt, None, noise_multiplier=0.0, max_grad_norm=clip,
                                   sample_rate=q, expected_batch_size=batch)
    auditor = CanaryAuditor(opt, num_canaries=40, num_unseen=4, sampling_rate=q, seed=7)
    assert auditor._sum_steps == 256
    dirs = canary_directions(7, 40, auditor.dim)
    x, empty = torch.randn(3, 8), 0
    for _ in range(270):
        before = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
        counts = auditor.inclusions.copy()
        _one_zero_loss_step(model, opt, x)
        after = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
        sampled = (auditor.inclusions - counts).astype(bool)
        empty += not sampled.any()
        np.testing.assert_allclose((after - before).numpy(), -lr * clip * dirs[sampled].sum(0) / batch,
                                   atol=1e-6)
    assert 0 < empty < 270
