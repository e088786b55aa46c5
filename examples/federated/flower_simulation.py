"""User-level DP federated training on Flower's simulation engine (Ray backend), many virtual clients.

    python examples/federated/flower_simulation.py --clients 1000 --rounds 10 \
        [--mechanism dpfedavg|bandmf|tree] [--secagg] [--client-cpus 1] [--json]

Digits (scikit-learn) split into Dirichlet(0.5) non-IID clients (synthetic FedProx data past 1,437
clients), a linear model, dpkit's DP strategy on Flower's ``ServerApp``/``ClientApp`` with
``run_simulation`` and the Ray backend. Mechanisms:

* ``dpfedavg``: fresh noise every round, Poisson client sampling at rate q (McMahan et al. 2018);
* ``bandmf``: banded matrix factorisation across rounds, cyclic participation in b groups, amplified
  BandMF accounting (Choquette-Choo et al., NeurIPS 2023);
* ``tree``: tree-aggregation DP-FTRL (Kairouz et al., ICML 2021), cyclic participation, unamplified
  Gaussian accounting with the cyclic sensitivity.

``--secagg``: SecAgg+ with distributed noise shares (``dpkit.federated.secure``; dpfedavg only).
With --json the last stdout line is one JSON object: backend, rounds, epsilon (user-level at delta),
delta, accuracy, secure_aggregation, mechanism, clients, seconds.
"""

import argparse
import json
import logging
import time
import warnings

import torch

from dpkit.federated import CorrelatedRounds, digits_clients, synthetic_clients
from dpkit.mechanisms.matrix import banded, binary_tree


def _data(clients):
    if clients <= 1437:
        return digits_clients(clients, 0.5, seed=0), 64, 10
    return synthetic_clients(clients, 0.5, 0.5, dim=60, num_classes=10, mean_size=20, seed=0), 60, 10


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--mechanism", choices=["dpfedavg", "bandmf", "tree"], default="dpfedavg")
    p.add_argument("--secagg", action="store_true", help="SecAgg+ with distributed noise (dpfedavg only)")
    p.add_argument("--cohort", type=int, default=50, help="expected clients per round")
    p.add_argument("--groups", type=int, default=4, help="b: cyclic groups / bands (bandmf, tree)")
    p.add_argument("--noise-multiplier", type=float, default=1.0)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--delta", type=float, default=None, help="default 1/(10·clients)")
    p.add_argument("--min-cohort", type=int, default=10, help="SecAgg+: minimum surviving clients")
    p.add_argument("--client-cpus", type=float, default=1.0, help="Ray CPUs per ClientApp actor")
    p.add_argument("--ray-cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--verbose", action="store_true", help="Flower's INFO log")
    args = p.parse_args(argv)
    if args.clients < 2 or args.rounds < 1:
        p.error("--clients must be >= 2 and --rounds >= 1")
    if args.secagg and args.mechanism != "dpfedavg":
        p.error("--secagg supports --mechanism dpfedavg only (correlated noise needs server-side noise)")
    logging.getLogger("flwr").setLevel(logging.INFO if args.verbose else logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)

    from dpkit.federated.flower import DPFedAvgStrategy
    from dpkit.federated.flower_engine import make_client_app, run_ray_simulation

    data, features, classes = _data(args.clients)
    delta = args.delta if args.delta is not None else 1.0 / (10 * args.clients)
    torch.manual_seed(0)
    model = torch.nn.Linear(features, classes)
    init = [t.detach().numpy().copy() for t in model.parameters()]
    q = min(1.0, args.cohort / args.clients)
    correlated = None
    if args.mechanism != "dpfedavg":
        b = min(args.groups, args.rounds)
        strategy_matrix = banded(args.rounds, b) if args.mechanism == "bandmf" else binary_tree(args.rounds)
        correlated = CorrelatedRounds(strategy_matrix, participation="cyclic", num_groups=b)
        q = min(1.0, args.cohort * b / args.clients)   # within-group rate: same expected cohort

    def evaluate(server_round, arrays):
        with torch.no_grad():
            for t, a in zip(model.parameters(), arrays):
                t.copy_(torch.from_numpy(a))
            x, y = data.test
            return 0.0, {"accuracy": float((model(x).argmax(1) == y).double().mean())}

    def client_opt(ps):
        return torch.optim.SGD(ps, lr=0.1)

    common = dict(num_clients=args.clients, sampling_rate=q, noise_multiplier=args.noise_multiplier,
                  clip_norm=args.clip, delta=delta, epsilon_every=args.rounds,
                  server_optimizer=lambda ps: torch.optim.SGD(ps, lr=args.server_lr))
    fit_workflow = None
    if args.secagg:
        from dpkit.federated.secure import SecureDPFedAvgStrategy, make_secure_client_app

        strategy = SecureDPFedAvgStrategy(init, min_cohort=args.min_cohort, **common)
        app = make_secure_client_app(model, data, client_opt, min_cohort=args.min_cohort, local_batch_size=10)
        fit_workflow = strategy.fit_workflow()
    else:
        strategy = DPFedAvgStrategy(init, correlated=correlated, **common)
        app = make_client_app(model, data, client_opt, local_batch_size=10)
    init_args = {"include_dashboard": False}
    if args.ray_cpus:
        init_args["num_cpus"] = args.ray_cpus
    start = time.perf_counter()
    history = run_ray_simulation(strategy, app, args.rounds, client_resources={"num_cpus": args.client_cpus},
                                 ray_init_args=init_args, fit_workflow=fit_workflow)
    seconds = time.perf_counter() - start
    accuracy = evaluate(args.rounds, strategy.current_parameters)[1]["accuracy"]
    out = {"backend": "ray", "mechanism": args.mechanism, "secure_aggregation": args.secagg,
           "clients": args.clients, "rounds": len(history), "expected_cohort": args.cohort,
           "noise_multiplier": args.noise_multiplier, "delta": delta,
           "epsilon": strategy.epsilon(delta), "accounting": strategy.dpfedavg.accountant.name
           if correlated is None else strategy.dpfedavg.accountant.method,
           "accuracy": accuracy, "seconds": seconds,
           # simulation diagnostics (a deployment must not release them): clients aggregated per round
           "reporting_clients": [h["nonprivate"]["reporting_clients"] for h in history]}
    if not args.json:
        print(f"{args.mechanism} on Flower/Ray, {args.clients} clients, {len(history)} rounds: "
              f"user-level ε = {out['epsilon']:.3g} at δ = {delta:g}, accuracy {accuracy:.3f}, {seconds:.0f} s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
