"""LazyDP benchmark: step time of non-private SGD, dpkit lazy DP-SGD and dpkit eager DP-SGD,
measured side by side in ONE process with interleaved rounds; ratios printed as a table and JSON.

Workload (issue 17): a DLRM-style model — ``EmbeddingBag`` (sum) of ``--rows`` × 64 over
512 bags × 8 ids = 4,096 lookups per step, then a small MLP — trained with SGD.

* non-private: ``sparse=True`` embedding + plain SGD (PyTorch's fastest baseline: sparse grads);
* lazy: dpkit ``make_private`` (BK clipping) with ``embedding_noise="lazy"`` (default
  :class:`~dpkit.mechanisms.lazy.GaussianRowNoise`: one aggregated draw per touched row);
* lazy-keyed: the same with the order-independent Philox source
  (:class:`~dpkit.mechanisms.lazy.CounterGaussianRowNoise`), for reproducibility;
* eager: dpkit DP-SGD with dense noise on the whole table every step (the DP-SGD baseline).

The only peer with per-sample embedding gradients, Opacus, materialises a (batch × rows × 64)
per-sample gradient (512 × 1M × 64 floats = 128 GiB): it cannot run this workload.

Each round runs ``--steps`` steps of every configuration in turn (all models live in memory at
once); the per-configuration time is the median over rounds of the per-step mean. The floor of
the lazy step is also measured: the non-private step plus ``torch.randn`` of the touched rows.
The time to flush all pending noise (needed once before release) is reported separately.

    python benchmarks/lazydp.py                        # 1M rows, 7 rounds x 3 steps
    python benchmarks/lazydp.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn as nn

import dpkit
from dpkit.mechanisms.lazy import CounterGaussianRowNoise

DIM, IDS_PER_BAG = 64, 8


class _DLRM(nn.Module):
    def __init__(self, rows: int):
        super().__init__()
        self.table = nn.EmbeddingBag(rows, DIM, mode="sum", sparse=True)
        self.mlp = nn.Sequential(nn.Linear(DIM, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, ids):
        return self.mlp(self.table(ids)).squeeze(1)


def build(config: str, rows: int, bags: int, seed: int = 0):
    """(model, optimizer) of one configuration."""
    torch.manual_seed(seed)
    with torch.no_grad():
        model = _DLRM(rows)
    base = torch.optim.SGD(model.parameters(), lr=0.05)
    if config == "non-private":
        return model, base
    emb = {"lazy": "lazy", "lazy-keyed": CounterGaussianRowNoise(seed), "eager": "eager"}[config]
    _, opt, _ = dpkit.make_private(model, base, None, max_grad_norm=1.0, noise_multiplier=1.0,
                                   sample_rate=bags / 1e7, expected_batch_size=bags, embedding_noise=emb,
                                   generator=torch.Generator().manual_seed(seed))
    return model, opt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--bags", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="steps per configuration per round")
    parser.add_argument("--configs", nargs="+", default=["non-private", "lazy", "lazy-keyed", "eager"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="100k rows, 3 rounds (smoke run)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: stable timings on a shared machine)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.rounds = min(args.rows, 100_000), min(args.rounds, 3)
    torch.set_num_threads(args.threads)
    if args.steps < 1 or args.rounds < 1 or args.rows < args.bags * IDS_PER_BAG:
        parser.error("--steps and --rounds must be >= 1 and --rows >= bags * 8")
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    loss_fn = nn.BCEWithLogitsLoss()
    g = torch.Generator().manual_seed(1)
    n_batches = (args.rounds + 1) * args.steps
    batches = [(torch.randint(0, args.rows, (args.bags, IDS_PER_BAG), generator=g).to(device),
                torch.randint(0, 2, (args.bags,), generator=g).float().to(device)) for _ in range(n_batches)]
    runs = {}
    for c in args.configs:
        model, opt = build(c, args.rows, args.bags)
        runs[c] = (model.to(device), opt)

    def step(model, opt, ids, y):
        opt.zero_grad(set_to_none=True)
        loss_fn(model(ids), y).backward()
        opt.step()

    def floor_step(model, opt, ids, y):  # non-private + the noise draw of the touched rows
        step(model, opt, ids, y)
        torch.randn(int(torch.unique(ids).numel()), DIM, device=device)

    timed = {c: [] for c in args.configs}
    timed["floor (non-private + randn of touched rows)"] = []
    fns = {c: step for c in args.configs}
    fns["floor (non-private + randn of touched rows)"] = floor_step
    for r in range(args.rounds + 1):  # round 0 is a warm-up
        for name, fn in fns.items():
            model, opt = runs.get(name, runs.get("non-private"))
            sync()
            t0 = time.perf_counter()
            for ids, y in batches[r * args.steps:(r + 1) * args.steps]:
                fn(model, opt, ids, y)
            sync()
            if r > 0:
                timed[name].append((time.perf_counter() - t0) / args.steps)
    ms = {c: 1e3 * statistics.median(v) for c, v in timed.items() if v}
    spread = {c: [1e3 * min(v), 1e3 * max(v)] for c, v in timed.items() if v}
    base = ms.get("non-private")
    out = {"machine": f"{platform.machine()} {platform.processor() or ''}, {device}, "
                      f"{torch.get_num_threads()} torch threads, torch {torch.__version__}",
           "workload": {"rows": args.rows, "dim": DIM, "bags": args.bags, "ids_per_bag": IDS_PER_BAG,
                        "rounds": args.rounds, "steps_per_round": args.steps},
           "ms_per_step": ms, "ms_min_max": spread,
           "ratio_to_non_private": {c: v / base for c, v in ms.items()} if base else None}
    for c in ("lazy", "lazy-keyed"):
        if c in runs:
            sync()
            t0 = time.perf_counter()
            runs[c][1].flush()
            sync()
            out.setdefault("flush_s", {})[c] = time.perf_counter() - t0
    print(f"LazyDP benchmark — {out['machine']}")
    print(f"EmbeddingBag {args.rows:,} x {DIM}, {args.bags} bags x {IDS_PER_BAG} ids + MLP; "
          f"median of {args.rounds} interleaved rounds x {args.steps} steps\n")
    print(f"{'config':<46}{'ms/step':>9}{'min-max':>15}{'x non-private':>15}")
    for c, v in ms.items():
        ratio = f"{v / base:.2f}" if base else "n/a"
        print(f"{c:<46}{v:>9.2f}{spread[c][0]:>7.1f}-{spread[c][1]:<7.1f}{ratio:>15}")
    for c, s in out.get("flush_s", {}).items():
        print(f"flush of all pending noise ({c}): {s:.2f} s")
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
