"""Train with make_private, checkpointing and resuming as users do (used in and out of process).

``python -m tests.workflows.resume_script MODE CKPT OUT [--seed S] [--secure]``:
  * ``first``: train FIRST_STEPS steps from scratch, save ``{"model", "opt"}`` to CKPT, then keep
    training (the uninterrupted run) for MORE_STEPS steps; save its batches and parameters to OUT.
  * ``resume``: build everything FRESH (other initial weights), load CKPT, train MORE_STEPS steps;
    save batches and parameters to OUT.
Both record every batch's example indices, so a replayed sampler shows up as repeated batches.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import dpkit

N, B, FIRST_STEPS, MORE_STEPS = 200, 10, 20, 20


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 5, generator=g, dtype=torch.float64)
    return TensorDataset(x, (x[:, 0] > 0).long(), torch.arange(N))


def build(init_seed: int, seed: int | None, secure: bool, **kw):
    torch.manual_seed(init_seed)  # what scripts do for reproducibility: also seeds torch's global RNG
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    kw = {"noise_multiplier": 1.0, **kw}
    return dpkit.make_private(model, opt, DataLoader(data(), batch_size=B), max_grad_norm=1.0,
                              generator=generator, secure_mode=secure, **kw)


def train(model, opt, loader, steps):
    batches = []
    while len(batches) < steps:
        for x, y, idx in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            batches.append(idx.tolist())
            if len(batches) == steps:
                break
    return batches


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["first", "resume"])
    parser.add_argument("ckpt")
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--secure", action="store_true")
    args = parser.parse_args(argv)
    if args.mode == "first":
        model, opt, loader = build(0, args.seed, args.secure)
        first = train(model, opt, loader, FIRST_STEPS)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, args.ckpt)
    else:
        model, opt, loader = build(1, args.seed, args.secure)
        ck = torch.load(args.ckpt, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        first = None
    more = train(model, opt, loader, MORE_STEPS)
    torch.save({"first": first, "more": more, "params": [p.detach() for p in model.parameters()],
                "epsilon": opt.epsilon(1e-5), "steps": opt.steps}, args.out)


if __name__ == "__main__":
    main()
