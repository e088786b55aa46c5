"""Epochs -> DP-SGD steps (kept free of dp_accounting so the CLI can validate input quickly)."""

from __future__ import annotations

import math
from fractions import Fraction

from dpkit import _validate as V

__all__ = ["epochs_to_steps"]


def epochs_to_steps(epochs, dataset_size, batch_size) -> tuple[float, int]:
    """Convert an epochs schedule to DP-SGD's ``(sampling_prob, steps)``.

    Args:
        epochs: number of passes E > 0 (may be fractional).
        dataset_size: N ≥ 1 (public; with Poisson sampling the expected batch is q·N).
        batch_size: expected batch size B, 1 ≤ B ≤ N.

    Returns:
        ``(B / N, ceil(E · ceil(N / B)))``: one epoch is ``ceil(N / B)`` steps — exactly the
        number of batches dpkit's Poisson loader yields per pass — and the total is rounded UP so
        the account covers the run. :func:`dpkit.make_private` uses this same function, so the
        calculator and training agree on the step count.

    Raises:
        ValueError, TypeError: an argument outside its range or of the wrong kind.
    """
    epochs = V.positive("epochs", epochs)
    dataset_size = V.positive_int("dataset_size", dataset_size)
    batch_size = V.positive_int("batch_size", batch_size)
    if batch_size > dataset_size:
        raise ValueError(f"batch_size must be <= dataset_size ({dataset_size}); got {batch_size!r}")
    q = batch_size / dataset_size
    # exact rational arithmetic: float division could push an integer count up or down by one
    steps = math.ceil(Fraction(epochs) * math.ceil(Fraction(dataset_size, batch_size)))
    return q, max(1, steps)
