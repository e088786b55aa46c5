"""Data-parallel DP-SGD over torch.distributed (CPU, gloo) on scikit-learn digits.

Launch:  torchrun --nproc_per_node 2 examples/ddp_train.py [--epochs 5 --sigma 1.0]

``dpkit.make_private(..., distributed=True)`` shards the dataset r::world, Poisson-samples each
shard at q = B/N (B is the GLOBAL expected batch size), all-reduces the clipped gradient sums and
adds ONE noise draw from a generator seeded identically on every rank, so every rank takes the
same step and ε is that of single-process DP-SGD with the same q and steps. Do not also wrap the
model in DistributedDataParallel (it would all-reduce unclipped gradients).
"""

import argparse

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import dpkit


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64, help="global expected batch size B")
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    dist.init_process_group("gloo")  # torchrun sets RANK / WORLD_SIZE / MASTER_ADDR
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))
    train, test = perm[:1400], perm[1400:]

    torch.manual_seed(args.seed)  # same initial model on every rank
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    loader = DataLoader(TensorDataset(x[train], y[train]), batch_size=args.batch_size)
    model, optimizer, loader = dpkit.make_private(
        model, optimizer, loader, noise_multiplier=args.sigma, max_grad_norm=args.clip,
        generator=torch.Generator().manual_seed(args.seed + 1),  # SAME seed on every rank: noise once
        distributed=True)

    for epoch in range(args.epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            if len(yb):
                torch.nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()  # an empty local batch still joins the all-reduce and the step
        with torch.no_grad():
            acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
        if rank == 0:
            print(f"epoch {epoch + 1}: test accuracy {acc:.3f}  ε = {optimizer.epsilon(args.delta):.3f} "
                  f"(δ = {args.delta}, {optimizer.steps} steps, world {world})", flush=True)

    # every rank must hold the same model: compare a checksum across ranks
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(gathered, checksum)
    if rank == 0:
        same = all(torch.equal(g, gathered[0]) for g in gathered)
        print(f"parameters identical on all {world} ranks: {same}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
