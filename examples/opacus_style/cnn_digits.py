"""Opacus-style DP-SGD on a small CNN (the Opacus MNIST tutorial, on scikit-learn's 8×8 digits).

Written exactly as an Opacus script; the ONLY dpkit-specific line is the import
(Opacus: ``from opacus import PrivacyEngine``). Calibrates σ for a target ε over the planned
epochs with ``make_private_with_epsilon`` and prints ε after every epoch.

Run: ``python examples/opacus_style/cnn_digits.py [--epochs 3] [--epsilon 3]``
"""

import argparse

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from dpkit.opacus import PrivacyEngine


class SampleConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 2 * 2, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)   # 8x8 -> 4x4
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)   # 4x4 -> 2x2
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def digits(n=1792):
    data = load_digits()
    x = torch.tensor(data.images[:n] / 16.0, dtype=torch.float32).unsqueeze(1)
    return (x - 0.3) / 0.4, torch.tensor(data.target[:n])


def evaluate(model, x, y):
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train()
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def main(epochs=3, batch_size=64, target_epsilon=3.0, delta=1e-5, max_grad_norm=1.0, lr=0.5, seed=0,
         verbose=True):
    torch.manual_seed(seed)
    x, y = digits()
    train_loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    model = SampleConvNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.5)
    criterion = nn.CrossEntropyLoss()
    loss_before, _ = evaluate(model, x, y)

    privacy_engine = PrivacyEngine()
    model, optimizer, train_loader = privacy_engine.make_private_with_epsilon(
        module=model,
        optimizer=optimizer,
        data_loader=train_loader,
        target_epsilon=target_epsilon,
        target_delta=delta,
        epochs=epochs,
        max_grad_norm=max_grad_norm,
    )
    steps = 0
    for epoch in range(epochs):
        losses = []
        for data, target in train_loader:
            optimizer.zero_grad()
            loss = criterion(model(data), target)
            loss.backward()
            optimizer.step()
            steps += 1
            losses.append(loss.item())
        epsilon = privacy_engine.get_epsilon(delta)
        if verbose:
            print(f"epoch {epoch + 1}: train loss {np.nanmean(losses):.3f}  (ε = {epsilon:.2f}, δ = {delta})")
    loss_after, accuracy = evaluate(model, x, y)
    if verbose:
        print(f"σ = {optimizer.noise_multiplier:.4f}, {steps} steps, accuracy {accuracy:.3f}")
    return {"epsilon": privacy_engine.get_epsilon(delta), "steps": steps,
            "noise_multiplier": optimizer.noise_multiplier, "loss_before": loss_before,
            "loss_after": loss_after, "accuracy": accuracy, "dataset_size": len(x)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--epsilon", type=float, default=3.0)
    args = parser.parse_args()
    main(epochs=args.epochs, target_epsilon=args.epsilon)
