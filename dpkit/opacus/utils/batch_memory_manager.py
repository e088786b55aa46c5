"""``BatchMemoryManager`` with Opacus' signature, on dpkit's virtual batches.

A Poisson-sampled logical batch can be far larger than its expected size B. Inside the context
manager the data loader yields every logical batch as physical chunks of at most
``max_physical_batch_size`` examples (its own ``max_physical_batch_size`` setting, the one
:func:`dpkit.make_private` takes): the loader reports each chunk to the
:class:`~dpkit.DPOptimizer`, which only accumulates until the last chunk. Per-example clipping is
unchanged; noise is added and the step accounted ONCE per logical batch, with the public
normaliser B — the same mechanism as without the manager.
"""

from __future__ import annotations

from dpkit import _validate
from dpkit.data import DPDataLoader
from dpkit.optim.dp_optimizer import DPOptimizer

__all__ = ["BatchMemoryManager"]


class BatchMemoryManager:
    """Context manager: within it, the loader yields batches of at most ``max_physical_batch_size``.

    Same keyword-only signature as Opacus 1.6's ``opacus.utils.batch_memory_manager.BatchMemoryManager``.
    ``with ... as loader`` gives the SAME loader object (so that its sampler position, which the
    optimizer checkpoints, is the one that advances) with physical chunking switched on; its
    previous ``max_physical_batch_size`` is restored on exit.

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
        self._previous: list[int | None] = []

    def __enter__(self) -> DPDataLoader:
        self._previous.append(self.data_loader.max_physical_batch_size)
        self.data_loader.max_physical_batch_size = self.max_physical_batch_size
        return self.data_loader

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.data_loader.max_physical_batch_size = self._previous.pop()
