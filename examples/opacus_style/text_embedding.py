"""Opacus-style DP training of a small text classifier (embedding + mean pooling + linear).

Synthetic "sentiment" data: sentences of token ids; the label says whether "positive" tokens
(ids 1–10) outnumber "negative" ones (ids 11–20). Written exactly as an Opacus script with a fixed
noise multiplier, the RDP accountant and Adam; the ONLY dpkit-specific line is the import
(Opacus: ``from opacus import PrivacyEngine``).

Run: ``python examples/opacus_style/text_embedding.py [--epochs 3]``
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from dpkit.opacus import PrivacyEngine

VOCAB, LENGTH = 100, 12


class BagOfEmbeddings(nn.Module):
    def __init__(self, vocab=VOCAB, dim=16):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.classifier = nn.Linear(dim, 2)

    def forward(self, tokens):
        return self.classifier(self.embedding(tokens).mean(dim=1))


def sentences(n, generator):
    tokens = torch.randint(0, VOCAB, (n, LENGTH), generator=generator)
    positive = ((tokens >= 1) & (tokens <= 10)).sum(1)
    negative = ((tokens >= 11) & (tokens <= 20)).sum(1)
    return tokens, (positive > negative).long()


def evaluate(model, x, y):
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train()
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def main(epochs=3, batch_size=128, noise_multiplier=1.0, delta=1e-5, max_grad_norm=1.0, lr=0.05,
         seed=0, verbose=True):
    torch.manual_seed(seed)
    x, y = sentences(2048, torch.Generator().manual_seed(seed))
    train_loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    model = BagOfEmbeddings()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    loss_before, _ = evaluate(model, x, y)

    privacy_engine = PrivacyEngine(accountant="rdp")
    model, optimizer, train_loader = privacy_engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=train_loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
    )
    steps = 0
    for epoch in range(epochs):
        for tokens, labels in train_loader:
            optimizer.zero_grad()
            loss = criterion(model(tokens), labels)
            loss.backward()
            optimizer.step()
            steps += 1
        if verbose:
            print(f"epoch {epoch + 1}: ε = {privacy_engine.get_epsilon(delta):.2f} (δ = {delta})")
    loss_after, accuracy = evaluate(model, x, y)
    if verbose:
        print(f"loss {loss_before:.3f} -> {loss_after:.3f}, accuracy {accuracy:.3f}")
    return {"epsilon": privacy_engine.get_epsilon(delta), "steps": steps,
            "noise_multiplier": noise_multiplier, "sample_rate": batch_size / len(x),
            "loss_before": loss_before, "loss_after": loss_after, "accuracy": accuracy,
            "history": privacy_engine.accountant.history}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    main(epochs=parser.parse_args().epochs)
