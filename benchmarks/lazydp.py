"""LazyDP benchmark: per-step time and peak memory of non-private, eager DP-SGD and lazy DP-SGD.

One process. For each table size (default 1M and 10M rows × 64 columns) the three configurations
train the same DLRM-style model — an ``EmbeddingBag`` (sum) over 256 bags × 8 ids = 2,048 lookups
per step, plus a small MLP — one after the other (only one table lives in memory at a time).

* non-private: ``sparse=True`` embedding + plain SGD (the fastest PyTorch baseline: sparse grads);
* eager DP-SGD: dpkit ``make_private`` (BK clipping), dense noise on the whole table every step;
* lazy DP-SGD: the same with ``embedding_noise="lazy"`` (sparse row updates, pending noise).

Time per step: median over ``--steps`` timed steps after one warm-up step. Peak memory: growth of
the process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs before each
configuration) over the RSS right before its first step — so the table itself (allocated before)
is not counted, only what training adds. The flush of all pending noise (needed once before
release) is timed separately for the lazy run.

    python benchmarks/lazydp.py                 # 1M and 10M rows, 3 steps
    python benchmarks/lazydp.py --rows 1000000 --steps 5 --json
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn

import dpkit

sys.path.insert(0, "benchmarks")
import _harness as H  # noqa: E402

DIM, BAGS, IDS_PER_BAG = 64, 256, 8


class _DLRM(nn.Module):
    def __init__(self, rows: int):
        super().__init__()
        self.table = nn.EmbeddingBag(rows, DIM, mode="sum", sparse=True)
        self.mlp = nn.Sequential(nn.Linear(DIM, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, ids):
        return self.mlp(self.table(ids)).squeeze(1)


def run_config(config: str, rows: int, steps: int, seed: int = 0) -> dict:
    """Train ``steps`` (+1 warm-up) steps of one configuration; return timings and memory."""
    torch.manual_seed(seed)
    with torch.no_grad():
        model = _DLRM(rows)
    base = torch.optim.SGD(model.parameters(), lr=0.05)
    opt = base
    if config != "non-private":
        _, opt, _ = dpkit.make_private(model, base, None, max_grad_norm=1.0, noise_multiplier=1.0,
                                       sample_rate=BAGS / 1e7, expected_batch_size=BAGS,
                                       embedding_noise="lazy" if config == "lazy" else "eager",
                                       generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randint(0, rows, (BAGS, IDS_PER_BAG), generator=g),
                torch.randint(0, 2, (BAGS,), generator=g).float()) for _ in range(steps + 1)]
    loss_fn = nn.BCEWithLogitsLoss()
    gc.collect()
    reset_ok = H.reset_peak()
    rss_before = H.status_kib("VmRSS")
    times = []
    for i, (ids, y) in enumerate(batches):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(ids), y).backward()
        opt.step()
        if i > 0:  # the first step is a warm-up
            times.append(time.perf_counter() - t0)
    peak = H.status_kib("VmHWM") if reset_ok else None
    out = {"config": config, "rows": rows, "step_s": statistics.median(times),
           "peak_mib": None if peak is None else max(peak - rss_before, 0) / 1024}
    if config == "lazy":
        t0 = time.perf_counter()
        opt.flush()
        out["flush_s"] = time.perf_counter() - t0
    del model, opt, base, batches
    gc.collect()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--configs", nargs="+", default=["non-private", "eager", "lazy"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine, intra-op threads that "
                             "wait for a busy core make small ops 100x slower)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.steps < 1 or any(r < BAGS * IDS_PER_BAG for r in args.rows):
        parser.error("--steps must be >= 1 and --rows >= 2048")
    results = [run_config(c, rows, args.steps) for rows in args.rows for c in args.configs]
    machine = (f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU, torch {torch.__version__}; "
               "shared 2-core machine (other jobs running: timings are noisy)")
    ratios = []
    for rows in args.rows:
        by = {r["config"]: r for r in results if r["rows"] == rows}
        if "eager" in by and "lazy" in by:
            ratios.append({"rows": rows, "eager_over_lazy": by["eager"]["step_s"] / by["lazy"]["step_s"],
                           "lazy_over_nonprivate": (by["lazy"]["step_s"] / by["non-private"]["step_s"]
                                                    if "non-private" in by else None)})
    if args.json:
        print(json.dumps({"machine": machine, "dim": DIM, "lookups_per_step": BAGS * IDS_PER_BAG,
                          "results": results, "ratios": ratios}, indent=2))
        return 0
    print(f"LazyDP benchmark — {machine}\n{DIM} columns, {BAGS * IDS_PER_BAG} lookups per step\n")
    print(f"{'rows':>11} {'config':>12} {'ms/step':>10} {'peak MiB':>9} {'flush s':>8}")
    for r in results:
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        flush = f"{r['flush_s']:.2f}" if "flush_s" in r else ""
        print(f"{r['rows']:>11,} {r['config']:>12} {1e3 * r['step_s']:>10.1f} {peak:>9} {flush:>8}")
    print()
    for q in ratios:
        extra = "" if q["lazy_over_nonprivate"] is None else f", lazy/non-private {q['lazy_over_nonprivate']:.2f}x"
        print(f"{q['rows']:>11,} rows: eager/lazy {q['eager_over_lazy']:.0f}x{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
