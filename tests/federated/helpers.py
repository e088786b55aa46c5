"""Small fixtures and independent references for the federated tests (no dpkit logic reused)."""

import copy

import torch

from dpkit.federated import FederatedData
from dpkit.federated import _seeds


def tiny_data(num_clients=6, dim=5, classes=3, seed=0, sizes=None):
    """Clients with a few Gaussian examples each and a small test set."""
    g = torch.Generator().manual_seed(seed)
    sizes = sizes or [2 + (k % 4) for k in range(num_clients)]
    clients = [(torch.randn(n, dim, generator=g), torch.randint(0, classes, (n,), generator=g)) for n in sizes]
    test = (torch.randn(30, dim, generator=g), torch.randint(0, classes, (30,), generator=g))
    return FederatedData(clients=clients, test=test, num_classes=classes)


def plain_fedavg(model, data, rounds, *, lr, epochs, batch_size, seed):
    """Textbook FedAvg, all clients every round, UNWEIGHTED mean of client models, server lr 1.

    Every client trains its own deep copy of the global model with plain SGD; the shuffling order
    of client k in round t uses the same (seed, round, client) stream as dpkit so that the two runs
    see the same minibatches.
    """
    global_model = copy.deepcopy(model)
    for t in range(rounds):
        client_models = []
        for k, (x, y) in enumerate(data.clients):
            local = copy.deepcopy(global_model)
            opt = torch.optim.SGD(local.parameters(), lr=lr)
            g = _seeds.generator(seed, _seeds.LOCAL, t, k)
            for _ in range(epochs):
                order = torch.randperm(len(y), generator=g)
                for s in range(0, len(y), batch_size):
                    idx = order[s:s + batch_size]
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(local(x[idx]), y[idx]).backward()
                    opt.step()
            client_models.append(local)
        with torch.no_grad():
            for name, p in global_model.named_parameters():
                p.copy_(torch.stack([dict(m.named_parameters())[name] for m in client_models]).mean(0))
    return global_model
