"""Matrix-mechanism benchmark: MMCC time, strategy optimisation time and quality (next to
jax_privacy's recorded losses), step overhead of correlated noise vs i.i.d. noise (interleaved
rounds in one process, with the floor: the i.i.d. draw plus one read and write of a state of the
same size), and ε of the accounting methods side by side. Table + JSON.

Run: ``python benchmarks/matrix.py [--quick] [--sections overhead ...] [--device cuda] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import dp_accounting
import torch
from threadpoolctl import threadpool_limits

from dpkit.accountants.mmcc import banded_amplified_epsilon, mmcc_analysis, unamplified_epsilon
from dpkit.mechanisms.matrix import (CorrelatedNoise, banded, binary_tree, blt, identity,
                                     multi_epoch, toeplitz_sqrt)
from dpkit.mechanisms.noise import GaussianNoise


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


class _Floor:
    """What any d-state streaming recursion must cost: the i.i.d. draw plus one read and one
    write of ``state`` vectors of the same size (torch.addmv + torch.addcmul over the state)."""

    def __init__(self, like, state):
        device = like[0].device
        self.gen = GaussianNoise(torch.Generator(device).manual_seed(1))
        self.buf = [torch.zeros(state, x.numel(), device=device) for x in like]
        self.w = torch.ones(state, device=device)
        self.theta = torch.full((state, 1), 0.5, device=device)

    def sample(self, step, like):
        out = []
        for z, b in zip(self.gen.sample(step, like), self.buf):
            out.append(torch.addmv(z.reshape(-1), b.t(), self.w))
            torch.addcmul(z.reshape(-1), b, self.theta, out=b)
        return out


def step_overhead(params, steps, rounds=7, device="cpu"):
    """ms per noise step, interleaved rounds (median), and the ratio to i.i.d. Gaussian noise."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    like = [torch.zeros(p, device=device) for p in params]
    n = steps * (rounds + 1)
    sources = {"iid gaussian": GaussianNoise(torch.Generator(device).manual_seed(0))}
    for s in (identity(n), banded(n, 8, toeplitz=True), blt(n, 4, error="max"), binary_tree(n, honaker=True)):
        sources[s.name] = CorrelatedNoise(s, seed=0)
    sources["floor: iid + 4-vector state"] = _Floor(like, 4)
    sources["floor: iid + 7-vector state"] = _Floor(like, 7)
    times = {k: [] for k in sources}
    for r in range(rounds + 1):  # round 0 warms up
        for name, src in sources.items():
            sync()
            t0 = time.perf_counter()
            for t in range(r * steps, (r + 1) * steps):
                src.sample(t, like)
            sync()
            if r:
                times[name].append((time.perf_counter() - t0) / steps)
    base = statistics.median(times["iid gaussian"])
    return [{"noise": k, "ms_per_step": 1e3 * statistics.median(v), "ratio": statistics.median(v) / base,
             "ms_min_max": [1e3 * min(v), 1e3 * max(v)]} for k, v in times.items()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (CI smoke run)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: stable timings on a shared machine)")
    ap.add_argument("--sections", nargs="+", default=["optimisation", "accounting", "overhead"],
                    choices=["optimisation", "accounting", "overhead"])
    ap.add_argument("--device", default="cpu", help="device of the noise-overhead tensors")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)  # BLAS threads: the strategy optimisers' O(n³) products
    quick = args.quick
    out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "torch": torch.__version__, "threads": args.threads, "device": args.device}}
    if "optimisation" in args.sections:
        out["optimisation"] = optimisation(quick)
    if "accounting" in args.sections:
        out["accounting"] = accounting(quick)
    if "overhead" in args.sections:
        # per-step cost of streaming correlated noise (1M parameters in 4 tensors)
        params = [250_000] * 4 if not quick else [25_000] * 4
        out["step_overhead"] = step_overhead(params, 4 if quick else 8, rounds=3 if quick else 7,
                                             device=args.device)
        out["step_overhead_params"] = sum(params)
    report(out)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


def optimisation(quick):
    """Optimisation time and error × sensitivity² of strategies, under the participation each is
    built for (single unless noted), with jax_privacy's recorded losses where measured."""
    from dpkit.mechanisms.matrix import Participation
    me_n, me_b = (64, 8) if quick else (128, 8)
    cyc = Participation.cyclic(me_b)
    me_big = 200 if quick else 1000
    rows = []
    for label, fn, part, err in [
        ("banded n=1000 b=16 (toeplitz)", lambda: banded(1000, 16), None, "mean"),
        ("bandmf n=256 b=8 (general)", lambda: banded(256, 8), None, "mean"),
        ("blt n=1024 d=3 (max)", lambda: blt(1024, 3, error="max"), None, "max"),
        ("blt n=10000 d=4 (max)", lambda: blt(10_000, 4, error="max"), None, "max"),
        ("toeplitz-sqrt n=100000", lambda: toeplitz_sqrt(100_000), None, "mean"),
        (f"banded n={me_n} b={me_b} (cyclic k={me_n // me_b})", lambda: banded(me_n, me_b), cyc, "mean"),
        (f"multi-epoch n={me_n} b={me_b} cyclic", lambda: multi_epoch(me_n, me_b), cyc, "mean"),
        (f"multi-epoch n={me_big} b={me_big // 10} cyclic", lambda: multi_epoch(me_big, me_big // 10),
         Participation.cyclic(me_big // 10), "mean"),
    ]:
        s, dt = timed(fn)
        rows.append({"strategy": label, "seconds": dt, "error": err, "value": s.errors(participation=part)[err],
                     "jax_privacy": JAX_PRIVACY.get(label)})
    return rows


# jax_privacy 2.0.0 on the same problems (recorded; how: tests/mechanisms/matrix/test_strategies.py)
JAX_PRIVACY = {"blt n=1024 d=3 (max)": 10.742660917552001, "bandmf n=256 b=8 (general)": 20.348961927466238}


def accounting(quick):
    """MMCC time and ε vs amplified banded / unamplified / DP-SGD (banded C, unit columns)."""
    n, b, sigma, p, delta = (500 if quick else 2000), 8, 4.0, 0.01, 1e-6
    C = banded(n, b).encoder()  # unit columns: sens = 1
    res, t_mmcc = timed(lambda: mmcc_analysis(C, noise_multiplier=sigma, sampling_prob=p, delta=delta))
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(p, dp_accounting.GaussianDpEvent(sigma)), n)
    k = math.ceil(n / b)
    return {
        "setting": {"n": n, "bands": b, "sigma": sigma, "sampling_prob": p, "delta": delta},
        "mmcc_seconds": t_mmcc, "mmcc_epsilon": res.epsilon, "mmcc_tail_delta": res.tail_delta,
        "mmcc_distinct_rows": res.distinct_rows,
        "mmcc_max_probability_ratio": res.max_probability_ratio,
        "banded_amplified_epsilon (group rate b·p)": banded_amplified_epsilon(
            C, noise_multiplier=sigma, group_sampling_prob=b * p, delta=delta),
        f"unamplified_epsilon (b-min-sep, k={k})": unamplified_epsilon(
            sensitivity=math.sqrt(k), noise_multiplier=sigma, delta=delta),
        "dpsgd_epsilon (same σ, p, n)": acc.get_epsilon(delta),
    }


def report(out):
    m = out["machine"]
    print(f"machine: {m['platform']}, {m['cpus']} CPUs, {m['threads']} threads, {m['device']}, torch {m['torch']}")
    if "optimisation" in out:
        print("\nstrategy optimisation")
        print(f"{'strategy':<40}{'seconds':>9}{'error x sens^2':>22}{'jax_privacy':>13}")
        for r in out["optimisation"]:
            ref = "" if r["jax_privacy"] is None else f"{r['jax_privacy']:>13.4f}"
            print(f"{r['strategy']:<40}{r['seconds']:>9.2f}{r['value']:>15.4f} ({r['error']}){ref}")
    if "accounting" in out:
        print("\naccounting (banded C, unit columns)")
        for key, val in out["accounting"].items():
            print(f"  {key}: {val}")
    if "step_overhead" in out:
        print(f"\nnoise step overhead ({out['step_overhead_params']:,} parameters, interleaved rounds)")
        print(f"{'noise':<32}{'ms/step':>10}{'min-max':>16}{'x iid':>8}")
        for r in out["step_overhead"]:
            lo, hi = r["ms_min_max"]
            print(f"{r['noise']:<32}{r['ms_per_step']:>10.2f}{lo:>8.1f}-{hi:<7.1f}{r['ratio']:>8.2f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
