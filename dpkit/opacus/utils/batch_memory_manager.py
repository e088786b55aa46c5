"""``BatchMemoryManager`` with Opacus' signature, on dpkit's virtual batches.

A Poisson-sampled logical batch can be far larger than its expected size B. Inside the context
manager every logical batch is yielded as physical chunks of at most ``max_physical_batch_size``
examples, and the :class:`~dpkit.DPOptimizer` is told to only accumulate on all chunks but the
last: per-example clipping is unchanged, noise is added and the step is accounted ONCE per
logical batch, with the public normaliser B — the same mechanism as without the manager.
"""

from __future__ import annotations

import math

import torch

from dpkit import _validate
from dpkit.data import DPDataLoader
from dpkit.optim.dp_optimizer import DPOptimizer

__all__ = ["BatchMemoryManager"]


class BatchMemoryManager:
    """Context manager yielding a loader whose batches have at most ``max_physical_batch_size`` rows.

    Same keyword-only signature as Opacus 1.6's ``opacus.utils.batch_memory_manager.BatchMemoryManager``.
    The given loader is not modified; iterate the loader returned by ``with ... as loader``.

    Args:
        data_loader: the data loader returned by :meth:`dpkit.opacus.PrivacyEngine.make_private`
            (or :func:`dpkit.make_private`).
        max_physical_batch_size: largest number of examples per forward/backward pass (≥ 1).
        optimizer: the DP optimizer returned with that loader.

    Raises:
        TypeError: ``data_loader`` or ``optimizer`` is not the dpkit object returned by make_private.
        ValueError: ``max_physical_batch_size`` is not a positive integer.

    Example::

        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=32,
                                optimizer=optimizer) as memory_safe_loader:
            for x, y in memory_safe_loader:
                optimizer.zero_grad()
                criterion(model(x), y).backward()
                optimizer.step()            # steps (noise + accounting) only after the last chunk
    """

    def __init__(self, *, data_loader: DPDataLoader, max_physical_batch_size: int,
                 optimizer: DPOptimizer):
        if not isinstance(data_loader, DPDataLoader):
            raise TypeError("data_loader must be the loader returned by PrivacyEngine.make_private "
                            f"(a dpkit DPDataLoader); got {type(data_loader).__name__}")
        if not isinstance(optimizer, DPOptimizer):
            raise TypeError("optimizer must be the optimizer returned by PrivacyEngine.make_private "
                            f"(a dpkit DPOptimizer); got {type(optimizer).__name__}")
        self.data_loader = data_loader
        self.optimizer = optimizer
        self.max_physical_batch_size = _validate.positive_int("max_physical_batch_size",
                                                              max_physical_batch_size)

    def __enter__(self) -> "PhysicalBatchLoader":
        return PhysicalBatchLoader(self.data_loader, self.max_physical_batch_size, self.optimizer)

    def __exit__(self, exc_type, exc, traceback) -> None:
        return None


class PhysicalBatchLoader:
    """Iterable over the physical chunks of a DP loader's logical batches (see :class:`BatchMemoryManager`).

    Each collated logical batch is cut along axis 0 (every tensor in the batch structure — tuples,
    lists, dicts — is sliced the same way) into consecutive chunks of at most
    ``max_physical_batch_size`` rows. Before each chunk the optimizer is told whether it ends the
    logical batch. Empty logical batches are yielded as they are (they are still steps).
    """

    def __init__(self, data_loader: DPDataLoader, max_physical_batch_size: int, optimizer: DPOptimizer):
        self.data_loader = data_loader
        self.dataset = data_loader.dataset
        self.max_physical_batch_size = max_physical_batch_size
        self.optimizer = optimizer

    def __len__(self) -> int:
        """Expected number of physical batches per pass (like Opacus: logical batches × ⌈B/m⌉)."""
        per_logical = math.ceil(self.optimizer.expected_batch_size / self.max_physical_batch_size)
        return len(self.data_loader) * per_logical

    def __iter__(self):
        limit = self.max_physical_batch_size
        for batch in self.data_loader:
            rows = _rows(batch)
            chunks = max(1, math.ceil(rows / limit))
            for k in range(chunks):
                self.optimizer.signal_skip_step(k < chunks - 1)
                yield batch if chunks == 1 else _slice(batch, k * limit, (k + 1) * limit)


def _leaves(batch):
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, (list, tuple)):
        for item in batch:
            yield from _leaves(item)
    elif isinstance(batch, dict):
        for item in batch.values():
            yield from _leaves(item)
    else:
        raise TypeError("BatchMemoryManager splits batches made of tensors (in tuples, lists or "
                        f"dicts); got an element of type {type(batch).__name__}. Collate it into a tensor "
                        "(e.g. token ids), or give max_physical_batch_size to dpkit.make_private instead")


def _rows(batch) -> int:
    sizes = {leaf.shape[0] if leaf.dim() > 0 else None for leaf in _leaves(batch)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError("every tensor of a batch must have the examples on axis 0 with the same "
                         f"length to be split into physical batches; got lengths {sorted(map(str, sizes))}")
    return sizes.pop()


def _slice(batch, start: int, stop: int):
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, dict):
        return {key: _slice(value, start, stop) for key, value in batch.items()}
    return type(batch)(_slice(item, start, stop) for item in batch)
