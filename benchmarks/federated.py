"""Rounds per second of dpkit's federated simulator (1,000 digits clients) and of the Flower path.

    python benchmarks/federated.py [--clients 1000 --rounds 20 --q 0.05 --json out.json]

Measured side by side in one process, same data, model and cohort sizes:
  * non-private FedAvg through the same code (σ = 0, clip = ∞): the baseline;
  * DP-FedAvg (fixed clip), DP-FedAvg with adaptive clipping and canaries;
  * the same DP-FedAvg through Flower's ``Server.fit`` with dpkit's strategy (if flwr is installed);
  * the accountant alone: ε after the run (PLD), which the simulator computes each round by default.
Prints a table and a JSON object (with the machine).
"""

import argparse
import copy
import json
import logging
import os
import platform
import time

import torch

from dpkit.federated import AdaptiveClipping, FederatedSimulation, digits_clients


def _time_sim(model, data, rounds, **kw):
    sim = FederatedSimulation(copy.deepcopy(model), data, client_optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                              local_epochs=1, progress=False, epsilon_every=10**9, eval_every=10**9, **kw)
    # run_round (not run): no final ε / evaluation inside the timed loop
    start = time.perf_counter()
    for _ in range(rounds):
        sim.run_round()
    elapsed = time.perf_counter() - start
    return rounds / elapsed, sim


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--q", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = digits_clients(args.clients, 0.5, seed=0)
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10)
    common = dict(sampling_rate=args.q, seed=0)
    rows = {}
    rows["fedavg (non-private, same code)"], _ = _time_sim(model, data, args.rounds, noise_multiplier=0.0,
                                                          clip_norm=1e12, **common)
    rows["dp-fedavg"], sim = _time_sim(model, data, args.rounds, noise_multiplier=1.0, clip_norm=1.0, **common)
    rows["dp-fedavg + adaptive clip + 20 canaries"], _ = _time_sim(
        model, data, args.rounds, noise_multiplier=1.0, clip_norm=1.0, adaptive_clipping=AdaptiveClipping(),
        num_canaries=20, **common)
    start = time.perf_counter()
    sim.server.accountant.copy().epsilon(1e-4)
    eps_seconds = time.perf_counter() - start
    try:
        from dpkit.federated.flower import DPFedAvgStrategy, make_client_fn, run_in_process
    except ImportError:
        flower = None
    else:
        logging.getLogger("flwr").setLevel(logging.WARNING)
        strategy = DPFedAvgStrategy([a.detach().numpy().copy() for a in model.parameters()],
                                    num_clients=args.clients, noise_multiplier=1.0, clip_norm=1.0,
                                    epsilon_every=10**9, **common)
        fn = make_client_fn(model, data, lambda q: torch.optim.SGD(q, lr=0.1), local_epochs=1, seed=0)
        start = time.perf_counter()
        run_in_process(strategy, fn, args.clients, args.rounds)
        flower = args.rounds / (time.perf_counter() - start)
        rows["dp-fedavg via Flower Server.fit (in-process)"] = flower
    base = rows["fedavg (non-private, same code)"]
    print(f"{args.clients} clients, q = {args.q} (expected cohort {args.q * args.clients:.0f}), "
          f"{args.rounds} rounds, linear model on digits, torch threads {args.threads}")
    print(f"{'configuration':48s} {'rounds/s':>9s} {'vs non-private':>15s}")
    for name, rps in rows.items():
        print(f"{name:48s} {rps:9.2f} {rps / base:14.2f}x")
    print(f"PLD ε after {args.rounds} rounds (one query, not cached): {eps_seconds * 1e3:.0f} ms")
    out = {"clients": args.clients, "sampling_rate": args.q, "rounds": args.rounds,
           "rounds_per_second": rows, "epsilon_query_seconds": eps_seconds,
           "machine": {"platform": platform.platform(), "processor": platform.processor(),
                       "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": args.threads,
                       "load_average": os.getloadavg()}}
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
