"""In-run audit overhead: DP-SGD step time with and without gradient canaries, one process.

    python benchmarks/audit_overhead.py [--canaries 1000] [--rounds 7] [--threads 1] [--json]

(the ratio table, then its JSON line; ``--json``: the JSON line only).

Model: the MLP of ``dpkit demo`` (64→64→10) and a wider one (784→256→10), batch 128, q = 0.05, SGD;
the wider one also with the canaries confined to its last layer (``parameters=model[-1].parameters()``,
d' = 2,570 canary coordinates: row "784→256→10 [last]"). The same DP-SGD run is timed with no
canaries and with ``CanaryAuditor`` (canary directions sampled at the run's rate and added to the
clipped sum each step); steps are interleaved round-robin in this process, in rounds of 256 steps
(one block of canary sums, so amortised costs count): median, the min–max of the per-round
overheads as the spread, and the ratio of the fastest rounds, the least disturbed by other load on
a shared machine. Two more columns locate the floor: ``hook`` is the auditor's contribution alone
(coins, block sums of the ≈ q·m sampled directions, views), called back to back on a second
auditor, so its table stays in cache (in a run the steps in between evict it: a lower bound);
``read k·d`` a plain sum of k contiguous rows at a random offset of the same direction table (k·d
float32 values) — the per-step traffic of inserting k dense d-dim directions row by row (d = d'
with a subset).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn as nn

import dpkit
from dpkit.audit.canaries import _MAX_SUM_STEPS, CanaryAuditor

sys.path.insert(0, "benchmarks")
import _harness as H  # noqa: E402

RATE = 0.05


def _setup(widths, canaries, batch=128, last_layer=False):
    torch.manual_seed(0)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers[:-1])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _, opt, _ = dpkit.make_private(model, opt, None, noise_multiplier=1.0, max_grad_norm=1.0,
                                   sample_rate=RATE, expected_batch_size=batch,
                                   generator=torch.Generator().manual_seed(0))
    subset = model[-1].parameters() if last_layer else None
    auditor = (CanaryAuditor(opt, num_canaries=canaries, num_unseen=2, seed=0, parameters=subset)
               if canaries else None)
    x, y = torch.randn(batch, widths[0]), torch.randint(0, widths[-1], (batch,))

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return step, auditor, opt


def _timed(fn, reps):
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--canaries", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for widths, last in (([64, 64, 10], False), ([784, 256, 10], False), ([784, 256, 10], True)):
        base, _, _ = _setup(widths, 0)
        audited, auditor, _ = _setup(widths, args.canaries, last_layer=last)
        # the hook is timed on its own auditor (its optimizer never steps): sharing one would make
        # the timed steps and the hook calls evict each other's block of canary sums
        _, probe, opt = _setup(widths, args.canaries, last_layer=last)
        k = round(RATE * args.canaries)
        counter = iter(range(10**9))
        starts = iter(torch.randint(0, args.canaries - k, (10**5,)).tolist())
        fns = {"base": base, "audited": audited,
               "hook": lambda: probe._contribute(next(counter), opt.params),
               "read": lambda: probe._directions[next(starts):][:k].sum()}
        samples = {name: [] for name in fns}
        for fn in fns.values():
            fn()
        for _ in range(args.rounds):
            for name, fn in fns.items():
                # a whole block of canary sums per round (CanaryAuditor's largest): amortised costs count
                samples[name].append(_timed(fn, _MAX_SUM_STEPS))
        med = {name: statistics.median(v) for name, v in samples.items()}
        overheads = [a / b - 1 for a, b in zip(samples["audited"], samples["base"])]
        rows.append({"model": "→".join(map(str, widths)) + (" [last]" if last else ""),
                     "dim": auditor.dim, "sampled_k": k,
                     "step_ms": 1000 * med["base"], "audited_step_ms": 1000 * med["audited"],
                     "overhead": med["audited"] / med["base"] - 1,
                     "overhead_min": min(overheads), "overhead_max": max(overheads),
                     "overhead_of_fastest": min(samples["audited"]) / min(samples["base"]) - 1,
                     "hook_ms": 1000 * med["hook"], "read_kd_ms": 1000 * med["read"]})
    out = {"machine": H.machine(), "canaries": args.canaries, "sampling_rate": RATE,
           "rounds": args.rounds, "rows": rows}
    if not args.json:
        print(f"in-run audit overhead, {args.canaries} canaries, q = {RATE} ({H.machine()})")
        print(f"{'model':<18}{'d':>8}{'DP-SGD ms':>11}{'+canaries':>11}{'overhead':>10}"
              f"{'spread':>18}{'fastest':>9}{'hook ms':>9}{'read k·d ms':>13}")
        for r in rows:
            spread = f"{100 * r['overhead_min']:.1f}% – {100 * r['overhead_max']:.1f}%"
            print(f"{r['model']:<18}{r['dim']:>8}{r['step_ms']:>11.2f}{r['audited_step_ms']:>11.2f}"
                  f"{100 * r['overhead']:>9.1f}%{spread:>18}{100 * r['overhead_of_fastest']:>8.1f}%"
                  f"{r['hook_ms']:>9.3f}{r['read_kd_ms']:>13.3f}")
    print(json.dumps(out))
    return rows


if __name__ == "__main__":
    main()
