"""In-run audit overhead: DP-SGD step time with and without gradient canaries, one process.

    python benchmarks/audit_overhead.py [--canaries 1000] [--rounds 7] [--json]

Model: the MLP of ``dpkit demo`` (64→64→10) and a wider one (784→256→10), batch 128, SGD; the same
DP-SGD run is timed with no canaries and with ``CanaryAuditor`` (canary directions sampled at the
run's rate and added to the clipped sum each step); steps are interleaved round-robin (median).
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
from dpkit.audit.canaries import CanaryAuditor

sys.path.insert(0, "benchmarks")
import _harness as H  # noqa: E402


def _setup(widths, canaries, batch=128):
    torch.manual_seed(0)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers[:-1])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _, opt, _ = dpkit.make_private(model, opt, None, noise_multiplier=1.0, max_grad_norm=1.0,
                                   sample_rate=0.05, expected_batch_size=batch,
                                   generator=torch.Generator().manual_seed(0))
    if canaries:
        CanaryAuditor(opt, num_canaries=canaries, seed=0)
    x, y = torch.randn(batch, widths[0]), torch.randint(0, widths[-1], (batch,))

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--canaries", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    for widths in ([64, 64, 10], [784, 256, 10]):
        steps = {"dp-sgd": _setup(widths, 0), f"dp-sgd + {args.canaries} canaries": _setup(widths, args.canaries)}
        samples = {k: [] for k in steps}
        for fn in steps.values():
            fn()
        for _ in range(args.rounds):
            for k, fn in steps.items():
                t0 = time.perf_counter()
                for _ in range(10):
                    fn()
                samples[k].append((time.perf_counter() - t0) / 10)
        base, audited = (statistics.median(v) for v in samples.values())
        rows.append({"model": "→".join(map(str, widths)), "step_ms": 1000 * base,
                     "audited_step_ms": 1000 * audited, "overhead": audited / base - 1})
    if args.json:
        print(json.dumps({"machine": H.machine(), "canaries": args.canaries, "rows": rows}))
        return rows
    print(f"in-run audit overhead, {args.canaries} canaries ({H.machine()})")
    print(f"{'model':<14}{'DP-SGD ms':>11}{'+canaries ms':>14}{'overhead':>10}")
    for r in rows:
        print(f"{r['model']:<14}{r['step_ms']:>11.2f}{r['audited_step_ms']:>14.2f}{100 * r['overhead']:>9.1f}%")
    return rows


if __name__ == "__main__":
    main()
