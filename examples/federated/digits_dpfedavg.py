"""User-level DP-FedAvg on non-IID digits (or FedProx synthetic) clients, in process.

    python examples/federated/digits_dpfedavg.py                      # 1,000 clients × 50 rounds
    python examples/federated/digits_dpfedavg.py --adaptive --server-opt fedadam --canaries 20
    python examples/federated/digits_dpfedavg.py --dataset synthetic --clients 1000

Prints the test accuracy and the user-level ε (add/remove one whole client) after each round and
writes one JSON object per round to --log. Follows McMahan et al., ICLR 2018 (DP-FedAvg), with
optional adaptive clipping (Andrew et al., NeurIPS 2021) and canary clients for a one-shot ε̂
(Andrew et al., ICLR 2024).
"""

import argparse
import time

import torch

from dpkit.federated import AdaptiveClipping, FederatedSimulation, digits_clients, synthetic_clients


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=["digits", "synthetic"], default="digits")
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew (digits) / FedProx α")
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--q", type=float, default=0.05, help="client sampling rate")
    p.add_argument("--sigma", type=float, default=1.0, help="noise multiplier z")
    p.add_argument("--clip", type=float, default=1.0, help="(initial) clip norm S")
    p.add_argument("--adaptive", action="store_true", help="adaptive clipping to the median")
    p.add_argument("--server-opt", choices=["fedavg", "fedadam"], default="fedavg")
    p.add_argument("--client-lr", type=float, default=0.1)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--canaries", type=int, default=0)
    p.add_argument("--delta", type=float, default=1e-4, help="user-level δ (≪ 1/clients)")
    p.add_argument("--seed", type=int, default=None,
                   help="run seed of sampling and noise (default: OS entropy; a fixed seed is for tests and warns)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the client partition and initial model (not privacy noise)")
    p.add_argument("--log", default=None, help="JSON-lines file, one record per round")
    args = p.parse_args()

    torch.set_num_threads(1)  # many tiny local trainings: threads only add overhead
    if args.dataset == "digits":
        data = digits_clients(args.clients, args.alpha, seed=args.data_seed)
    else:
        data = synthetic_clients(args.clients, args.alpha, args.alpha, seed=args.data_seed)
    torch.manual_seed(args.data_seed)
    model = torch.nn.Linear(data.num_features, data.num_classes)
    sim = FederatedSimulation(
        model, data, client_optimizer=lambda params: torch.optim.SGD(params, lr=args.client_lr),
        local_epochs=args.local_epochs, local_batch_size=10, sampling_rate=args.q,
        noise_multiplier=args.sigma, clip_norm=args.clip, server_optimizer=args.server_opt,
        adaptive_clipping=AdaptiveClipping() if args.adaptive else None, delta=args.delta,
        seed=args.seed, num_canaries=args.canaries, log_path=args.log, progress=False)
    print(f"{data.num_clients} clients (+{args.canaries} canaries), q={args.q}, "
          f"expected cohort {sim.server.expected_cohort:.1f}, z={args.sigma}, "
          f"update noise z_Δ={sim.server.update_noise_multiplier:.3f}")
    start = time.perf_counter()
    for _ in range(args.rounds):
        r = sim.run_round()
        print(f"round {r['round']:3d}  acc {r['test_accuracy']:.3f}  loss {r['test_loss']:.3f}  "
              f"ε {r['epsilon']:.3f}  clip {r['clip_norm']:.3f}", flush=True)
    print(f"{args.rounds} rounds in {time.perf_counter() - start:.1f} s; final user-level "
          f"ε = {sim.epsilon():.3f} at δ = {args.delta}")
    if args.canaries:
        est = sim.canary_estimate()
        for model in ("final_model", "all_iterates"):
            e = est[model]
            print(f"one-shot ε̂ ({model}): {e['epsilon']:.3f}  "
                  f"[{e['epsilon_lower']:.3f}, {e['epsilon_upper']:.3f}] at {e['confidence']:.0%} per side")
        print(f"claimed ε: {est['claimed_epsilon']:.3f} (an upper bound; ε̂ is an estimate, not a bound)")


if __name__ == "__main__":
    main()
