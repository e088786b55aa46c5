"""Matrix-mechanism benchmark: MMCC time, strategy optimisation time, step overhead of correlated
noise vs i.i.d. noise, and ε of the accounting methods side by side. Table + JSON.

Run: ``python benchmarks/matrix.py [--quick] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import dp_accounting
import torch

from dpkit.accountants.mmcc import banded_amplified_epsilon, mmcc_analysis, unamplified_epsilon
from dpkit.mechanisms.matrix import (CorrelatedNoise, banded, binary_tree, blt, identity,
                                     multi_epoch, toeplitz_sqrt)
from dpkit.mechanisms.noise import GaussianNoise


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def step_overhead(params, steps):
    like = [torch.zeros(p) for p in params]
    rows = []
    gen = GaussianNoise(torch.Generator().manual_seed(0))
    _, base = timed(lambda: [gen.sample(t, like) for t in range(steps)])
    rows.append({"noise": "iid gaussian", "ms_per_step": 1e3 * base / steps, "ratio": 1.0})
    for s in (identity(steps), banded(steps, 8), blt(steps, 4, maxiter=20),
              binary_tree(steps, honaker=True)):
        noise = CorrelatedNoise(s, seed=0)
        _, dt = timed(lambda: [noise.sample(t, like) for t in range(steps)])
        rows.append({"noise": s.name, "ms_per_step": 1e3 * dt / steps, "ratio": dt / base})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (CI smoke run)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: stable timings on a shared machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    quick = args.quick
    out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "torch": torch.__version__, "threads": args.threads}}

    # 1. optimisation time of strategies (error: mean squared prefix-sum error per unit σ·clip,
    # under the participation schema each strategy is built for)
    from dpkit.mechanisms.matrix import Participation
    me_n, me_b = (64, 8) if quick else (128, 8)
    cyc = Participation.cyclic(me_b)
    opt_rows = []
    for label, fn, part in [
        ("banded n=1000 b=16", lambda: banded(1000, 16), None),
        ("blt n=10000 d=4", lambda: blt(10_000, 4), None),
        ("toeplitz-sqrt n=100000", lambda: toeplitz_sqrt(100_000), None),
        (f"banded n={me_n} b={me_b} (cyclic k={me_n // me_b})", lambda: banded(me_n, me_b), cyc),
        (f"multi-epoch n={me_n} b={me_b} cyclic", lambda: multi_epoch(me_n, me_b), cyc),
    ]:
        s, dt = timed(fn)
        opt_rows.append({"strategy": label, "seconds": dt,
                         "mean_error": s.errors(participation=part)["mean"]})
    out["optimisation"] = opt_rows

    # 2. accounting: MMCC time and ε vs amplified banded / unamplified / DP-SGD
    n, b, sigma, p, delta = (500 if quick else 2000), 8, 4.0, 0.01, 1e-6
    C = banded(n, b).encoder()  # unit columns: sens = 1
    res, t_mmcc = timed(lambda: mmcc_analysis(C, noise_multiplier=sigma, sampling_prob=p, delta=delta))
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(p, dp_accounting.GaussianDpEvent(sigma)), n)
    k = math.ceil(n / b)
    out["accounting"] = {
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

    # 3. per-step overhead of streaming correlated noise (1M parameters in 4 tensors)
    params = [250_000] * 4 if not quick else [25_000] * 4
    out["step_overhead"] = step_overhead(params, 64 if quick else 256)
    out["step_overhead_params"] = sum(params)

    print(f"machine: {out['machine']['platform']}, {out['machine']['cpus']} CPUs, torch {torch.__version__}")
    print("\nstrategy optimisation")
    print(f"{'strategy':<32}{'seconds':>9}{'mean sq. error':>16}")
    for r in opt_rows:
        print(f"{r['strategy']:<32}{r['seconds']:>9.2f}{r['mean_error']:>16.3f}")
    print("\naccounting (banded C, unit columns)")
    for key, val in out["accounting"].items():
        print(f"  {key}: {val}")
    print(f"\nnoise step overhead ({sum(params):,} parameters)")
    print(f"{'noise':<20}{'ms/step':>10}{'× iid':>8}")
    for r in out["step_overhead"]:
        print(f"{r['noise']:<20}{r['ms_per_step']:>10.2f}{r['ratio']:>8.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
