"""ε and wall time of dpkit's accountants next to dp_accounting / prv_accountant called directly.

Usage: python benchmarks/accounting.py [--json] [--skip-large]

For each DP-SGD setting: ε (at the setting's δ) and seconds for dpkit "pld", "rdp", "prv", "gdp", for
dp_accounting's PLDAccountant (value_discretization_interval 1e-3 and 1e-4) and RdpAccountant, and
prv_accountant's PRVAccountant upper bound (eps_error 0.05) -- all in one process, side by side.
Then the time of calibrate_noise_multiplier (PLD) to hit the ε that PLD reported. Numbers are
machine dependent: run it on the machine you care about.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings

import dp_accounting
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant

from dpkit.accountants import calibrate_noise_multiplier, dpsgd_event, make_accountant

DELTA = 1e-5
SETTINGS = [  # (label, q, σ, steps, δ)
    ("q=0.01 s=1.0 T=10k", 0.01, 1.0, 10_000, DELTA),
    ("issue-15 q=0.001 s=0.8 T=10k d=1e-6", 0.001, 0.8, 10_000, 1e-6),
    ("MNIST q=256/60k s=1.1 60ep", 256 / 60000, 1.1, 14_063, DELTA),
    ("q=0.001 s=0.8 T=1M", 0.001, 0.8, 1_000_000, DELTA),
]
LARGE = 1_000_000


def _timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def _dpa_event(q, sigma, steps):
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)


def _dpa_pld(q, sigma, steps, vdi, delta):
    acc = PLDAccountant(value_discretization_interval=vdi)
    acc.compose(_dpa_event(q, sigma, steps))
    return acc.get_epsilon(delta)


def _dpa_rdp(q, sigma, steps, delta):
    acc = RdpAccountant()
    acc.compose(_dpa_event(q, sigma, steps))
    return acc.get_epsilon(delta)


def _prv(q, sigma, steps, delta):
    acc = PRVAccountant(prvs=[PoissonSubsampledGaussianMechanism(q, sigma)], max_self_compositions=[steps],
                        eps_error=0.05, delta_error=delta / 1000)
    return acc.compute_epsilon(delta, [steps])[2]


def run(skip_large: bool) -> list[dict]:
    rows = []
    for label, q, sigma, steps, delta in SETTINGS:
        large = steps >= LARGE
        if large and skip_large:
            continue
        row = {"setting": label, "q": q, "noise_multiplier": sigma, "steps": steps, "delta": delta}
        candidates = {f"dpkit:{n}": (lambda n=n: make_accountant(n).compose(dpsgd_event(sigma, q, steps))
                                     .epsilon(delta)) for n in ("pld", "rdp", "prv", "gdp")}
        candidates.update({
            "dp_accounting:pld(1e-3)": lambda: _dpa_pld(q, sigma, steps, 1e-3, delta),
            "dp_accounting:pld(1e-4)": lambda: _dpa_pld(q, sigma, steps, 1e-4, delta),
            "dp_accounting:rdp": lambda: _dpa_rdp(q, sigma, steps, delta),
            "prv_accountant:upper": lambda: _prv(q, sigma, steps, delta),
        })
        if large:  # the 1e-4 PLD grid and prv's FFT at 1M steps take minutes on a small machine
            candidates.pop("dp_accounting:pld(1e-4)")
            candidates.pop("prv_accountant:upper")
            candidates.pop("dpkit:prv")
        for name, fn in candidates.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                eps, seconds = _timed(fn)
            row[name] = {"epsilon": eps, "seconds": seconds}
        grid = make_accountant("pld").compose(dpsgd_event(sigma, q, steps))
        grid.epsilon(delta)
        row["dpkit:pld"]["details"] = grid.details()
        if "dp_accounting:pld(1e-4)" in row:
            row["dpkit:pld"]["over_dpa_1e-4_percent"] = 100 * (
                row["dpkit:pld"]["epsilon"] / row["dp_accounting:pld(1e-4)"]["epsilon"] - 1)
        target = row["dpkit:pld"]["epsilon"]
        sigma_cal, seconds = _timed(lambda: calibrate_noise_multiplier(target, delta, q, steps))
        row["calibration"] = {"target_epsilon": target, "noise_multiplier": sigma_cal, "seconds": seconds}
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--skip-large", action="store_true", help="skip the 1M-step setting")
    args = parser.parse_args(argv)
    rows = run(args.skip_large)
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "python": platform.python_version(), "dp_accounting": getattr(dp_accounting, "__version__", "?")}
    if args.json:
        print(json.dumps({"machine": machine, "results": rows}, indent=1))
        return 0
    print(f"machine: {machine}")
    for row in rows:
        print(f"\n{row['setting']}  (q={row['q']:.6g}, σ={row['noise_multiplier']}, T={row['steps']}, "
              f"δ={row['delta']:g})")
        print(f"  {'accountant':<26}{'epsilon':>10}{'seconds':>10}")
        for name, res in row.items():
            if isinstance(res, dict) and "epsilon" in res:
                print(f"  {name:<26}{res['epsilon']:>10.4f}{res['seconds']:>10.3f}")
        if "over_dpa_1e-4_percent" in row["dpkit:pld"]:
            print(f"  dpkit pld vs dp_accounting 1e-4: {row['dpkit:pld']['over_dpa_1e-4_percent']:+.3f}%  "
                  f"grid {row['dpkit:pld']['details']}")
        cal = row["calibration"]
        print(f"  calibrate (pld) to ε={cal['target_epsilon']:.4f}: σ={cal['noise_multiplier']:.5f} "
              f"in {cal['seconds']:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
