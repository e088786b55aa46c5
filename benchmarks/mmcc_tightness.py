"""MMCC tightness: ε of the cell analysis (n ≤ 3) and of the tail-bound analysis vs the exact ε by
grid integration, then column-normalised BandMF (n = 32) under MMCC vs amplified BandMF (cyclic
Poisson) vs DP-SGD at the same σ. Table + JSON.

Run from the repository root:
``python benchmarks/mmcc_tightness.py [--skip-banded] [--sigmas 1 2 4] [--json out.json]``.
The exact reference is the independent integrator of ``tests/accountants/test_mmcc_cells.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import dp_accounting

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dpkit.accountants.mmcc import banded_amplified_epsilon, mmcc_analysis  # noqa: E402
from dpkit.mechanisms.matrix import banded  # noqa: E402
from tests.accountants.test_mmcc_cells import (THREE_STEP, TWO_STEP,  # noqa: E402
                                               exact_epsilon, exact_privacy_curve)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def tightness():
    rows = []
    for C, sigma, p, delta in TWO_STEP + THREE_STEP:
        kw = dict(noise_multiplier=sigma, sampling_prob=p, delta=delta)
        old, t_old = timed(lambda: mmcc_analysis(C, analysis="tail_bound", **kw))
        new, t_new = timed(lambda: mmcc_analysis(C, analysis="cells", **kw))
        _, hist = exact_privacy_curve(C, sigma, p, [])
        exact = exact_epsilon(hist, delta)  # exact ε lies in (exact − 1e-3, exact]
        rows.append({"C": C.tolist(), "sigma": sigma, "p": p, "delta": delta,
                     "exact": exact, "tail_bound": old.epsilon, "cells": new.epsilon,
                     "ratio_cells": new.epsilon / exact, "ratio_tail_bound": old.epsilon / exact,
                     "seconds_tail_bound": t_old, "seconds_cells": t_new, "cells_count": new.cells})
    return rows


def banded_comparison(n=32, q=0.05, delta=1e-5, sigmas=(1.0,), bands=(2, 4)):
    rows = []
    for sigma in sigmas:
        acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n)
        dpsgd = acc.get_epsilon(delta)
        for b in bands:
            C = banded(n, b).encoder()  # unit columns: sensitivity 1
            res, t = timed(lambda: mmcc_analysis(C, noise_multiplier=sigma, sampling_prob=q,
                                                 delta=delta))
            amp = banded_amplified_epsilon(C, noise_multiplier=sigma, group_sampling_prob=b * q,
                                           delta=delta)
            rows.append({"n": n, "bands": b, "sigma": sigma, "q": q, "delta": delta,
                         "mmcc": res.epsilon, "mmcc_method": res.method,
                         "mmcc_max_probability_ratio": res.max_probability_ratio,
                         "mmcc_seconds": t,
                         "amplified_bandmf (group rate b·q, ceil(n/b) steps)": amp,
                         "dpsgd (rate q, n steps)": dpsgd})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--skip-banded", action="store_true", help="only the n <= 3 tightness table")
    ap.add_argument("--sigmas", type=float, nargs="+", default=[1.0])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    out = {"tightness": tightness()}
    print(f"{'setting':<44}{'exact':>8}{'tail-bound':>12}{'cells':>8}{'cells/exact':>13}{'s':>6}")
    for r in out["tightness"]:
        name = f"n={len(r['C'])} C={r['C']} σ={r['sigma']} p={r['p']} δ={r['delta']:g}"
        print(f"{name[:44]:<44}{r['exact']:>8.3f}{r['tail_bound']:>12.3f}{r['cells']:>8.3f}"
              f"{r['ratio_cells']:>13.4f}{r['seconds_cells']:>6.1f}")
    if not args.skip_banded:
        out["banded"] = banded_comparison(sigmas=tuple(args.sigmas))
        for r in out["banded"]:
            print(r)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
