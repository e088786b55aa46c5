"""Federated DP: rounds/s (in-process, Flower in-process, Flower on Ray) and accuracy at equal user-level ε.

    python benchmarks/federated.py [--clients 1000 --rounds 20 --q 0.05 --ray-rounds 5
                                    --utility-rounds 40 --epsilons 1 2 4 --json out.json]

Measured side by side in one process, same data (digits, Dirichlet(0.5) non-IID clients), model
(linear) and expected cohort:

Speed (rounds/s): non-private FedAvg through the same code (σ = 0, clip = ∞), DP-FedAvg in
process, DP-FedAvg through Flower's ``Server.fit`` (in-process proxies), DP-FedAvg on Flower's
simulation engine (Ray backend, one virtual SuperNode per client; start-up reported apart).

Utility: test accuracy after ``--utility-rounds`` rounds at user-level ε ∈ ``--epsilons`` (δ =
1/(10·M)) for DP-FedAvg (Poisson q), BandMF across rounds (b = 4 cyclic groups, amplified BandMF
accounting) and tree-aggregation DP-FTRL (cyclic groups, Gaussian accounting), each with its noise
calibrated to the target; the ε printed is the run's own accountant's after the run.

Every run's seed is left None (OS entropy) and read back from the object when needed.
"""

import argparse
import copy
import json
import logging
import math
import os
import platform
import time
import warnings

import torch

from dpkit.accountants import calibrate_noise_multiplier
from dpkit.accountants.mmcc import gaussian_epsilon
from dpkit.federated import CorrelatedRounds, FederatedSimulation, digits_clients
from dpkit.mechanisms.matrix import banded, binary_tree


def _sgd(p):
    return torch.optim.SGD(p, lr=0.1)


def _sim(model, data, **kw):
    return FederatedSimulation(copy.deepcopy(model), data, client_optimizer=_sgd, local_epochs=1, progress=False,
                               epsilon_every=10**9, eval_every=10**9, **kw)


def _time_sim(model, data, rounds, **kw):
    sim = _sim(model, data, **kw)
    start = time.perf_counter()
    for _ in range(rounds):   # run_round, not run: no final ε / evaluation inside the timed loop
        sim.run_round()
    return rounds / (time.perf_counter() - start), sim


def _gaussian_sigma(target, delta):
    """Smallest σ (bisection, never overshooting) with the Gaussian mechanism's ε(1/σ) ≤ target."""
    lo, hi = 0.05, 100.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if gaussian_epsilon(1 / mid, delta) <= target else (mid, hi)
    return hi


def _utility(model, data, args, delta):
    """Accuracy at each target ε for DP-FedAvg, BandMF and tree DP-FTRL (calibrated per mechanism)."""
    R, b, q = args.utility_rounds, 4, args.q
    qb = min(1.0, q * b)   # within-group rate of the cyclic mechanisms: same expected cohort
    rows = []
    for eps in args.epsilons:
        configs = {
            "dp-fedavg": (calibrate_noise_multiplier(eps, delta, q, R), q, None),
            # amplified BandMF (NeurIPS 2023, Thm 4): DP-SGD with ceil(R/b) rounds at the group rate
            "bandmf (b=4, cyclic)": (calibrate_noise_multiplier(eps, delta, qb, math.ceil(R / b)), qb,
                                     CorrelatedRounds(banded(R, b), participation="cyclic", num_groups=b)),
            "tree dp-ftrl (cyclic)": (_gaussian_sigma(eps, delta), qb,
                                      CorrelatedRounds(binary_tree(R), participation="cyclic", num_groups=b)),
        }
        for name, (sigma, rate, correlated) in configs.items():
            sim = _sim(model, data, sampling_rate=rate, noise_multiplier=sigma, clip_norm=args.clip,
                       server_optimizer=lambda p: torch.optim.SGD(p, lr=args.server_lr), delta=delta,
                       correlated=correlated)
            for _ in range(R):
                sim.run_round()
            spent = sim.epsilon()
            if spent > eps * (1 + 1e-9):
                raise RuntimeError(f"{name}: calibrated run spent ε = {spent} > target {eps}")
            rows.append({"target_epsilon": eps, "mechanism": name, "noise_multiplier": sigma,
                         "epsilon": spent, "accuracy": sim.evaluate()["test_accuracy"]})
    return rows


def _ray(model, data, args):
    """DP-FedAvg on Flower's Ray simulation engine: (rounds/s after start-up, start-up seconds)."""
    from dpkit.federated.flower import DPFedAvgStrategy
    from dpkit.federated.flower_engine import make_client_app, run_ray_simulation

    strategy = DPFedAvgStrategy([a.detach().numpy().copy() for a in model.parameters()], num_clients=args.clients,
                                sampling_rate=args.q, noise_multiplier=1.0, clip_norm=1.0, epsilon_every=10**9)
    stamps = []
    configure = strategy.configure_fit

    def timed(*a, **kw):   # the start of each round, as seen by the strategy
        stamps.append(time.perf_counter())
        return configure(*a, **kw)

    strategy.configure_fit = timed
    start = time.perf_counter()
    run_ray_simulation(strategy, make_client_app(model, data, _sgd), args.ray_rounds,
                       client_resources={"num_cpus": args.client_cpus},
                       ray_init_args={"num_cpus": args.threads_ray, "include_dashboard": False})
    end = time.perf_counter()
    # round 1 includes the actors' start: rounds/s over rounds 2.. (to the end of the simulation)
    steady = (len(stamps) - 1) / (end - stamps[1]) if len(stamps) > 1 else float("nan")
    return steady, stamps[0] - start, args.ray_rounds / (end - start)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--q", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ray-rounds", type=int, default=5, help="0 skips the Ray run")
    p.add_argument("--threads-ray", type=int, default=2, help="CPUs given to Ray")
    p.add_argument("--client-cpus", type=float, default=1.0)
    p.add_argument("--utility-rounds", type=int, default=40, help="0 skips the accuracy table")
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    data = digits_clients(args.clients, 0.5, seed=0)   # data split seed: set-up, not privacy randomness
    delta = 1.0 / (10 * args.clients)
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10)
    rows = {}
    rows["fedavg (non-private, same code)"], _ = _time_sim(model, data, args.rounds, sampling_rate=args.q,
                                                          noise_multiplier=0.0, clip_norm=1e12)
    rows["dp-fedavg in-process"], sim = _time_sim(model, data, args.rounds, sampling_rate=args.q,
                                                  noise_multiplier=1.0, clip_norm=1.0)
    print(f"in-process run seed (OS entropy, read back): {sim.server.seed}")
    start = time.perf_counter()
    sim.server.accountant.copy().epsilon(delta)
    eps_seconds = time.perf_counter() - start
    ray = None
    try:
        from dpkit.federated.flower import DPFedAvgStrategy, make_client_fn, run_in_process
    except ImportError:
        pass
    else:
        strategy = DPFedAvgStrategy([a.detach().numpy().copy() for a in model.parameters()],
                                    num_clients=args.clients, sampling_rate=args.q, noise_multiplier=1.0,
                                    clip_norm=1.0, epsilon_every=10**9)
        fn = make_client_fn(model, data, _sgd, local_epochs=1)
        start = time.perf_counter()
        run_in_process(strategy, fn, args.clients, args.rounds)
        rows["dp-fedavg via Flower Server.fit (in-process)"] = args.rounds / (time.perf_counter() - start)
        if args.ray_rounds:
            steady, startup, overall = _ray(model, data, args)
            rows["dp-fedavg on Flower simulation engine (Ray)"] = steady
            ray = {"startup_seconds": startup, "rounds_per_second_including_startup": overall,
                   "client_cpus": args.client_cpus, "ray_cpus": args.threads_ray}
    base = rows["fedavg (non-private, same code)"]
    print(f"{args.clients} clients, q = {args.q} (expected cohort {args.q * args.clients:.0f}), "
          f"{args.rounds} rounds ({args.ray_rounds} on Ray), linear model on digits, torch threads {args.threads}")
    print(f"{'configuration':48s} {'rounds/s':>9s} {'vs non-private':>15s}")
    for name, rps in rows.items():
        print(f"{name:48s} {rps:9.2f} {rps / base:14.2f}x")
    if ray:
        print(f"Ray: start-up to round 1 {ray['startup_seconds']:.1f} s; rounds/s including start-up "
              f"{ray['rounds_per_second_including_startup']:.3f}")
    print(f"PLD ε after {args.rounds} rounds (one query, not cached): {eps_seconds * 1e3:.0f} ms")
    utility = _utility(model, data, args, delta) if args.utility_rounds else []
    if utility:
        print(f"\naccuracy after {args.utility_rounds} rounds, user-level ε at δ = {delta:g} "
              f"(expected cohort {args.q * args.clients:.0f})")
        print(f"{'target ε':>8s}  {'mechanism':24s} {'σ':>7s} {'ε spent':>8s} {'accuracy':>9s}")
        for r in utility:
            print(f"{r['target_epsilon']:8.1f}  {r['mechanism']:24s} {r['noise_multiplier']:7.3f} "
                  f"{r['epsilon']:8.3f} {r['accuracy']:9.3f}")
    out = {"clients": args.clients, "sampling_rate": args.q, "rounds": args.rounds, "delta": delta,
           "rounds_per_second": rows, "ray": ray, "epsilon_query_seconds": eps_seconds, "utility": utility,
           "machine": {"platform": platform.platform(), "processor": platform.processor(),
                       "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": args.threads,
                       "load_average": os.getloadavg()}}
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
