"""LazyDP benchmark: step time of non-private SGD, dpkit lazy DP-SGD and dpkit eager DP-SGD,
measured side by side in ONE process with interleaved rounds; ratios printed as a table and JSON,
followed by the parts of the non-private, lazy and floor steps.

Workload (issue 17): a DLRM-style model — ``EmbeddingBag`` (sum) of ``--rows`` × 64 over
512 bags × 8 ids = 4,096 lookups per step, then a 64→32→1 MLP — trained with SGD.

* non-private: ``sparse=True`` embedding + plain SGD (PyTorch's fastest baseline: sparse grads);
* lazy: dpkit ``make_private`` (BK clipping) with ``embedding_noise="lazy"`` (default
  :class:`~dpkit.mechanisms.lazy.GaussianRowNoise`: one aggregated draw per touched row);
* lazy-keyed: the same with the order-independent Philox source
  (:class:`~dpkit.mechanisms.lazy.CounterGaussianRowNoise`), for reproducibility;
* floor: the non-private step plus what any lazy DP-SGD must add to it — draw the pending noise
  of the rows the batch reads (``torch.unique`` of the ids, ``torch.randn`` of those rows) and
  scatter it into the table (one ``index_add_``);
* eager: dpkit DP-SGD with dense noise on the whole table every step (the DP-SGD baseline;
  ``--eager-steps`` steps per round, default 1: a step takes seconds on a CPU).

The only peer with per-sample embedding gradients, Opacus, materialises a (batch × rows × 64)
per-sample gradient (512 × 1M × 64 floats = 128 GiB): it cannot run this workload.

Each round runs ``--steps`` steps of every configuration in turn (all models live in memory at
once). Per configuration: the median over rounds of the per-step mean, and the ratio to the
non-private step of the SAME round (median over rounds, min–max = the run-to-run spread).
Inside the same rounds, the parts of each step are timed with ``perf_counter`` (forward,
backward, optimizer step; for lazy also the materialisation in the forward pre-hook, the engine's
per-example clipping and the lazy sparse update; for the floor its extra unique/randn/scatter;
on CUDA each part is synchronised) and printed as medians over rounds next to each other.
The time to flush all pending noise (needed once before release) is reported separately.

``--baseline DIR`` adds "lazy (baseline)": the lazy step of ANOTHER dpkit tree (``DIR/dpkit``), in
the same rounds, for before/after tables from one process (its modules are swapped into
``sys.modules`` while it builds its optimizer; a tree that imports dpkit modules inside its step
would pick up the running tree's).

    python benchmarks/lazydp.py                        # 1M rows, 7 rounds x 10 steps
    python benchmarks/lazydp.py --quick --json out.json
    git archive 85ab2f9 dpkit | tar -x -C /tmp/before && \
        python benchmarks/lazydp.py --configs lazy floor --baseline /tmp/before
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn

import dpkit
from dpkit.mechanisms.lazy import CounterGaussianRowNoise

DIM, IDS_PER_BAG = 64, 8
FLOOR = "floor (non-private + draw & scatter touched rows' noise)"
BASELINE = "lazy (baseline)"


class _DLRM(nn.Module):
    def __init__(self, rows: int):
        super().__init__()
        self.table = nn.EmbeddingBag(rows, DIM, mode="sum", sparse=True)
        self.mlp = nn.Sequential(nn.Linear(DIM, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, ids):
        return self.mlp(self.table(ids)).squeeze(1)


def build(config: str, rows: int, bags: int, seed: int = 0, lib=dpkit):
    """(model, optimizer) of one configuration (``lib``: the dpkit package that makes it private)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        model = _DLRM(rows)
    base = torch.optim.SGD(model.parameters(), lr=0.05)
    if config in ("non-private", FLOOR):
        return model, base
    emb = {"lazy": "lazy", BASELINE: "lazy", "lazy-keyed": CounterGaussianRowNoise(seed), "eager": "eager"}[config]
    _, opt, _ = lib.make_private(model, base, None, max_grad_norm=1.0, noise_multiplier=1.0,
                                 sample_rate=bags / 1e7, expected_batch_size=bags, embedding_noise=emb,
                                 generator=torch.Generator().manual_seed(seed))
    return model, opt


def build_baseline(path: str, rows: int, bags: int):
    """The lazy configuration built by the dpkit package under ``path`` (swapped into
    ``sys.modules`` while it builds: dpkit imports some of its modules at construction)."""
    ours = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "dpkit" or k.startswith("dpkit.")}
    sys.path.insert(0, path)
    try:
        return build(BASELINE, rows, bags, lib=importlib.import_module("dpkit"))
    finally:
        sys.path.remove(path)
        for k in [k for k in sys.modules if k == "dpkit" or k.startswith("dpkit.")]:
            del sys.modules[k]
        sys.modules.update(ours)


class _Timer:
    """Wall time per label, for one configuration and round; ``wrap`` times a method of one object
    (as an instance attribute)."""

    def __init__(self, sync):
        self.total = collections.defaultdict(float)
        self.sync = sync

    def wrap(self, obj, method: str, label: str) -> None:
        inner = getattr(obj, method)

        def timed(*args, **kwargs):
            return self(label, lambda: inner(*args, **kwargs))
        setattr(obj, method, timed)

    def __call__(self, label: str, fn):
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        self.total[label] += time.perf_counter() - t0
        return out


PARTS = {  # label -> printed name (indented: a part of the row above)
    "zero_grad": "zero_grad",
    "forward": "forward",
    "lazy read": "  lazy materialisation in the pre-hook (dedup, markers, randn, scatter)",
    "backward": "backward",
    "step": "optimizer.step",
    "engine": "  engine: per-example norms and clipping (accumulate)",
    "lazy step": "  lazy sparse update of the touched rows",
    "unique": "floor extra: unique of the ids",
    "randn": "floor extra: randn of the touched rows",
    "scatter": "floor extra: index_add_ of their noise",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--bags", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10, help="steps per configuration per round")
    parser.add_argument("--eager-steps", type=int, default=1, help="steps of 'eager' per round")
    parser.add_argument("--configs", nargs="+", default=["non-private", "lazy", "lazy-keyed", "floor", "eager"],
                        choices=["non-private", "lazy", "lazy-keyed", "floor", "eager"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="100k rows, 3 rounds x 3 steps (smoke run)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: stable timings on a shared machine)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also time the lazy step of the dpkit package in DIR/dpkit (before/after)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.rounds, args.steps = min(args.rows, 100_000), min(args.rounds, 3), min(args.steps, 3)
    torch.set_num_threads(args.threads)
    if min(args.steps, args.eager_steps, args.rounds) < 1 or args.rows < args.bags * IDS_PER_BAG:
        parser.error("--steps, --eager-steps and --rounds must be >= 1 and --rows >= bags * 8")
    configs = ["non-private"] + [FLOOR if c == "floor" else c for c in args.configs if c != "non-private"]
    if args.baseline:
        if not os.path.isfile(os.path.join(args.baseline, "dpkit", "__init__.py")):
            parser.error(f"--baseline {args.baseline!r} must hold a dpkit package (DIR/dpkit/__init__.py), "
                         "e.g. from: git archive REV dpkit | tar -x -C DIR")
        configs.insert(1, BASELINE)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    loss_fn = nn.BCEWithLogitsLoss()
    g = torch.Generator().manual_seed(1)
    n_batches = (args.rounds + 1) * args.steps
    batches = [(torch.randint(0, args.rows, (args.bags, IDS_PER_BAG), generator=g).to(device),
                torch.randint(0, 2, (args.bags,), generator=g).float().to(device)) for _ in range(n_batches)]
    runs = {}
    for c in configs:
        model, opt = build_baseline(args.baseline, args.rows, args.bags) if c == BASELINE else \
            build(c, args.rows, args.bags)
        runs[c] = (model.to(device), opt)

    def step(model, opt, ids, y, timer):
        timer("zero_grad", lambda: opt.zero_grad(set_to_none=True))
        loss = timer("forward", lambda: loss_fn(model(ids), y))
        timer("backward", loss.backward)
        timer("step", opt.step)

    def floor_step(model, opt, ids, y, timer):  # non-private + the noise any lazy scheme draws and writes
        step(model, opt, ids, y, timer)
        rows = timer("unique", lambda: torch.unique(ids))
        z = timer("randn", lambda: torch.randn(rows.numel(), DIM, device=device))
        with torch.no_grad():
            timer("scatter", lambda: model.table.weight.index_add_(0, rows, z))

    timers = {c: _Timer(sync) for c in configs}
    if "lazy" in runs:  # the lazy step's parts (a few µs of wrapping per step)
        _, opt = runs["lazy"]
        timers["lazy"].wrap(opt._lazy, "_read", "lazy read")
        timers["lazy"].wrap(opt.engine, "accumulate", "engine")
        timers["lazy"].wrap(opt._lazy, "step", "lazy step")
    timed = {c: [] for c in configs}
    parts = {c: collections.defaultdict(list) for c in configs}
    for r in range(args.rounds + 1):  # round 0 is a warm-up
        for c in configs:
            model, opt = runs[c]
            steps = args.eager_steps if c == "eager" else args.steps
            fn = floor_step if c == FLOOR else step
            timers[c].total.clear()
            sync()
            t0 = time.perf_counter()
            for ids, y in batches[r * args.steps:r * args.steps + steps]:
                fn(model, opt, ids, y, timers[c])
            sync()
            if r > 0:
                timed[c].append((time.perf_counter() - t0) / steps)
                for label, v in timers[c].total.items():
                    parts[c][label].append(1e3 * v / steps)
    ms = {c: 1e3 * statistics.median(v) for c, v in timed.items()}
    spread = {c: [1e3 * min(v), 1e3 * max(v)] for c, v in timed.items()}
    ratios = {c: [a / b for a, b in zip(v, timed["non-private"])] for c, v in timed.items()}
    out = {"machine": f"{platform.machine()} {platform.processor() or ''}, {device}, "
                      f"{torch.get_num_threads()} torch threads, torch {torch.__version__}",
           "workload": {"rows": args.rows, "dim": DIM, "bags": args.bags, "ids_per_bag": IDS_PER_BAG,
                        "rounds": args.rounds, "steps_per_round": args.steps,
                        "eager_steps_per_round": args.eager_steps},
           "ms_per_step": ms, "ms_min_max": spread,
           "ratio_to_non_private": {c: statistics.median(v) for c, v in ratios.items()},
           "ratio_min_max": {c: [min(v), max(v)] for c, v in ratios.items()}}
    if BASELINE in timed and "lazy" in timed:  # paired per round: the machine's load cancels
        paired = [a / b for a, b in zip(timed["lazy"], timed[BASELINE])]
        out["lazy_over_baseline"] = {"median": statistics.median(paired), "min_max": [min(paired), max(paired)]}
    out["parts_ms"] = {c: {label: statistics.median(v) for label, v in parts[c].items()}
                       for c in configs if c != "eager"}
    for c in ("lazy", BASELINE, "lazy-keyed"):
        if c in runs:
            sync()
            t0 = time.perf_counter()
            runs[c][1].flush()
            sync()
            out.setdefault("flush_s", {})[c] = time.perf_counter() - t0
    print(f"LazyDP benchmark — {out['machine']}")
    print(f"EmbeddingBag {args.rows:,} x {DIM}, {args.bags} bags x {IDS_PER_BAG} ids + MLP; "
          f"{args.rounds} interleaved rounds x {args.steps} steps (eager: {args.eager_steps})\n")
    print(f"{'config':<58}{'ms/step':>9}{'min-max':>16}{'x non-private':>15}{'min-max':>14}")
    for c in configs:
        lo, hi = out["ratio_min_max"][c]
        print(f"{c:<58}{ms[c]:>9.2f}{spread[c][0]:>8.1f}-{spread[c][1]:<7.1f}"
              f"{out['ratio_to_non_private'][c]:>15.2f}{lo:>8.2f}-{hi:<5.2f}")
    if "lazy_over_baseline" in out:
        r = out["lazy_over_baseline"]
        print(f"\nlazy / lazy (baseline), paired per round: {r['median']:.3f} "
              f"(min-max {r['min_max'][0]:.3f}-{r['min_max'][1]:.3f})")
    shown = [c for c in ("non-private", "lazy", FLOOR) if c in out["parts_ms"]]
    print("\nparts of the step, ms (median over rounds; timed inside the same rounds):")
    print(f"{'':<74}" + "".join(f"{c.split(' (')[0]:>13}" for c in shown))
    for label, name in PARTS.items():
        if any(label in out["parts_ms"][c] for c in shown):
            print(f"{name:<74}" + "".join(f"{out['parts_ms'][c][label]:>13.3f}" if label in out["parts_ms"][c]
                                          else f"{'':>13}" for c in shown))
    for c, s in out.get("flush_s", {}).items():
        print(f"flush of all pending noise ({c}): {s:.2f} s")
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
