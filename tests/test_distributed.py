"""Distributed DP-SGD (torch.distributed, gloo, 2 CPU processes) vs single-process DP-SGD.

``make_private(..., distributed=True)`` shards the dataset r::world, Poisson-samples each shard at
q = B/N, all-reduces the clipped sums and adds ONE seeded noise draw, identical on every rank.
Checked here against an independent single-process run on the union of the ranks' batches:
  * every rank ends with the same parameters;
  * they equal single-process DP-SGD on the same global batches with the same seed;
  * with zero gradients the update is exactly one σ·C noise draw / B (a chi-square variance test:
    noise added on each rank would show a variance ≥ 2× larger).
"""

import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

import dpkit

N, D, B, STEPS, SIGMA, CLIP, LR, SEED = 48, 6, 12, 3, 0.8, 0.7, 0.5, 123
ZERO_DIM = 800  # input width of the zero-gradient model: 2·800 + 2 noisy coordinates


def _dataset():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    y = torch.randint(0, 3, (N,), generator=g)
    return TensorDataset(x, y, torch.arange(N))


def _model(width=D):
    torch.manual_seed(0)
    return torch.nn.Linear(width, 3 if width == D else 2)


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        model, opt, loader = dpkit.make_private(
            model, opt, DataLoader(_dataset(), batch_size=B), noise_multiplier=SIGMA, max_grad_norm=CLIP,
            generator=torch.Generator().manual_seed(SEED), distributed=True)
        batches = []
        for step, (x, y, idx) in enumerate(loader):
            if step == STEPS:
                break
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            batches.append(idx.tolist())
        # zero per-example gradients: the update is the noise alone
        zmodel = _model(ZERO_DIM)
        zopt = torch.optim.SGD(zmodel.parameters(), lr=1.0)
        zdata = TensorDataset(torch.randn(N, ZERO_DIM), torch.zeros(N))
        zmodel, zopt, zloader = dpkit.make_private(
            zmodel, zopt, DataLoader(zdata, batch_size=B), noise_multiplier=SIGMA, max_grad_norm=CLIP,
            generator=torch.Generator().manual_seed(SEED + 1), distributed=True)
        before = torch.cat([p.detach().reshape(-1).clone() for p in zmodel.parameters()])
        x, _ = next(iter(zloader))
        zopt.zero_grad()
        (zmodel(x) * 0.0).sum().backward()
        zopt.step()
        after = torch.cat([p.detach().reshape(-1) for p in zmodel.parameters()])
        # the usual script: equal global seeds on every rank, no generator= (review: both ranks drew
        # identical Poisson coins on their shards, and the guard meant to refuse this never fired)
        torch.manual_seed(0)
        dmodel = _model()
        dmodel, dopt, dloader = dpkit.make_private(
            dmodel, torch.optim.SGD(dmodel.parameters(), lr=LR), DataLoader(_dataset(), batch_size=B),
            noise_multiplier=SIGMA, max_grad_norm=CLIP, distributed=True)
        default_positions = []
        for step, (x, y, idx) in enumerate(dloader):
            dopt.zero_grad()
            torch.nn.functional.cross_entropy(dmodel(x), y).backward()
            dopt.step()
            default_positions.append(sorted(i // world for i in idx.tolist()))  # position in the shard
        torch.save({"params": [p.detach().clone() for p in model.parameters()], "batches": batches,
                    "noise_update": (after - before).double(),
                    "default_params": [p.detach().clone() for p in dmodel.parameters()],
                    "default_positions": default_positions}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    for attempt in range(2):  # gloo can abort at process teardown on a loaded machine: retry once
        with tempfile.TemporaryDirectory() as tmp:
            try:
                mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
            except mp.ProcessExitedException:
                outputs = [os.path.join(tmp, f"rank{r}.pt") for r in range(2)]
                if not all(os.path.exists(o) for o in outputs):
                    if attempt == 0:
                        continue
                    raise
                # both ranks finished and saved: the abort happened in teardown, results are whole
            return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]


def test_all_ranks_hold_the_same_parameters(ranks):
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_distributed_equals_single_process_on_the_union_batch(ranks):
    for r, res in enumerate(ranks):  # the sharding the reference relies on: rank r sees r::2
        assert all(i % 2 == r for batch in res["batches"] for i in batch)
    data = _dataset()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    # a loader is passed only so that make_private consumes the generator exactly as on the ranks
    model, opt, _ = dpkit.make_private(model, opt, DataLoader(data, batch_size=B), noise_multiplier=SIGMA,
                                       max_grad_norm=CLIP, generator=torch.Generator().manual_seed(SEED))
    x_all, y_all, _ = data.tensors
    for step in range(STEPS):
        union = sorted(ranks[0]["batches"][step] + ranks[1]["batches"][step])
        opt.zero_grad()
        if union:
            torch.nn.functional.cross_entropy(model(x_all[union]), y_all[union]).backward()
        opt.step()
    for got, want in zip(ranks[0]["params"], model.parameters()):
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)


def test_noise_is_added_exactly_once(ranks):
    from scipy import stats  # imported here: the spawned ranks re-import this module, keep it light

    upd = ranks[0]["noise_update"].numpy()
    np.testing.assert_array_equal(upd, ranks[1]["noise_update"].numpy())
    scale = SIGMA * CLIP / B   # lr 1: one N(0, (σC)²) draw on the sum, divided by the public B
    chi2 = float(np.sum((upd / scale) ** 2))
    d = upd.size
    assert stats.chi2.ppf(1e-4, d) < chi2 < stats.chi2.ppf(1 - 1e-4, d)
    # two independent draws (noise on each rank) would double the variance: far outside the interval
    assert stats.chi2.ppf(1 - 1e-4, d) < 2 * d * 0.9


def test_default_seeds_agree_on_noise_and_draw_independent_coins_per_rank(ranks):
    """Without generator=: rank 0's OS-entropy seed is broadcast (same noise, same parameters on every
    rank) and each rank draws its own coins (a shared global seed no longer gives equal coins)."""
    for a, b in zip(ranks[0]["default_params"], ranks[1]["default_params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    pos0, pos1 = ranks[0]["default_positions"], ranks[1]["default_positions"]
    assert len(pos0) == len(pos1) == N // B
    assert sum(a == b for a, b in zip(pos0, pos1) if a or b) == 0
