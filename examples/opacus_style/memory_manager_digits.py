"""Opacus-style large logical batches with ``BatchMemoryManager`` (MLP on scikit-learn's digits).

Logical batches of 256 expected examples are processed in physical batches of at most 64; noise
is added and the step accounted once per LOGICAL batch. Written exactly as an Opacus script; the
ONLY dpkit-specific lines are the imports (Opacus: ``from opacus import PrivacyEngine`` and
``from opacus.utils.batch_memory_manager import BatchMemoryManager``).

Run: ``python examples/opacus_style/memory_manager_digits.py [--epochs 4]``
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from dpkit.opacus import PrivacyEngine
from dpkit.opacus.utils.batch_memory_manager import BatchMemoryManager


def evaluate(model, x, y):
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train()
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def main(epochs=4, batch_size=256, max_physical_batch_size=64, noise_multiplier=1.0, delta=1e-5,
         max_grad_norm=1.0, lr=2.0, seed=0, verbose=True):
    torch.manual_seed(seed)
    data = load_digits()
    x = torch.tensor(data.data[:1792] / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target[:1792])
    train_loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    loss_before, _ = evaluate(model, x, y)

    privacy_engine = PrivacyEngine()
    model, optimizer, train_loader = privacy_engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=train_loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
    )
    physical_batches, largest = 0, 0
    for epoch in range(epochs):
        with BatchMemoryManager(data_loader=train_loader, max_physical_batch_size=max_physical_batch_size,
                                optimizer=optimizer) as memory_safe_loader:
            for data, target in memory_safe_loader:
                optimizer.zero_grad()
                loss = criterion(model(data), target)
                loss.backward()
                optimizer.step()
                physical_batches += 1
                largest = max(largest, len(data))
        if verbose:
            print(f"epoch {epoch + 1}: ε = {privacy_engine.get_epsilon(delta):.2f} (δ = {delta})")
    loss_after, accuracy = evaluate(model, x, y)
    if verbose:
        print(f"{physical_batches} physical batches (largest {largest}), loss {loss_before:.3f} -> "
              f"{loss_after:.3f}, accuracy {accuracy:.3f}")
    return {"epsilon": privacy_engine.get_epsilon(delta), "logical_steps": len(privacy_engine.accountant),
            "physical_batches": physical_batches, "largest_physical_batch": largest,
            "noise_multiplier": noise_multiplier, "sample_rate": batch_size / len(x),
            "loss_before": loss_before, "loss_after": loss_after, "accuracy": accuracy}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    main(epochs=parser.parse_args().epochs)
