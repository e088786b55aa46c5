"""DP-FedAvg through Flower: dpkit's strategy and client helper on Flower's own server loop.

    pip install 'dpkit[flower]'
    python examples/federated/flower_dpfedavg.py --clients 200 --rounds 20

Flower's Ray-based simulation engine is not needed: :func:`dpkit.federated.flower.run_in_process`
registers in-process client proxies with Flower's ``SimpleClientManager`` and runs Flower's
``Server.fit`` (threads). The same :class:`~dpkit.federated.flower.DPFedAvgStrategy` works with
gRPC clients or ``flwr.simulation`` when Ray is installed. The run seed comes from OS entropy;
re-running dpkit's in-process simulator with the SAME seed (read back from the strategy) gives a
bit-identical released model (checked at the end).
"""

import argparse
import copy
import logging
import warnings

import numpy as np
import torch

from dpkit.errors import SeededRandomnessWarning
from dpkit.federated import FederatedSimulation, digits_clients
from dpkit.federated.flower import DPFedAvgStrategy, make_client_fn, run_in_process


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--q", type=float, default=0.1)
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--delta", type=float, default=1e-4)
    p.add_argument("--data-seed", type=int, default=0, help="seed of the client partition and initial model (not privacy noise)")
    args = p.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(1)

    data = digits_clients(args.clients, 0.5, seed=args.data_seed)
    torch.manual_seed(args.data_seed)
    model = torch.nn.Linear(64, 10)
    x_test, y_test = data.test

    def evaluate_fn(server_round, arrays):
        net = copy.deepcopy(model)
        with torch.no_grad():
            for param, a in zip(net.parameters(), arrays):
                param.copy_(torch.from_numpy(a))
            logits = net(x_test)
        acc = float((logits.argmax(1) == y_test).float().mean())
        if server_round:
            print(f"round {server_round:3d}  acc {acc:.3f}  ε {strategy.epsilon():.3f}", flush=True)
        return float(torch.nn.functional.cross_entropy(logits, y_test)), {"accuracy": acc}

    def sgd(params):
        return torch.optim.SGD(params, lr=0.1)

    settings = dict(sampling_rate=args.q, noise_multiplier=args.sigma, clip_norm=args.clip, delta=args.delta)
    strategy = DPFedAvgStrategy([a.detach().numpy().copy() for a in model.parameters()],
                                num_clients=args.clients, evaluate_fn=evaluate_fn, **settings)  # seed: OS entropy
    seed = strategy.dpfedavg.seed  # secret of this run; the clients' local shuffling uses it too
    run_in_process(strategy, make_client_fn(model, data, sgd, local_epochs=2, seed=seed),
                   args.clients, args.rounds)

    with warnings.catch_warnings():  # deliberately re-using the run's seed to check bit-identity
        warnings.simplefilter("ignore", SeededRandomnessWarning)
        sim = FederatedSimulation(copy.deepcopy(model), data, client_optimizer=sgd, local_epochs=2,
                                  progress=False, epsilon_every=args.rounds, seed=seed, **settings)
    sim.run(args.rounds)
    same = all(np.array_equal(a.numpy(), b) for a, b in zip(sim.server.params, strategy.current_parameters))
    print(f"user-level ε = {strategy.epsilon():.3f} at δ = {args.delta}; "
          f"identical to dpkit's simulator: {same}")


if __name__ == "__main__":
    main()
