"""Samplers whose law is exactly what the accountant assumes, and the loader built on them.

* :class:`PoissonBatchSampler` — each step includes every example independently with
  probability q (the subsampled-Gaussian analysis of DP-SGD; Abadi et al. 2016, Mironov et al.
  2019). Batches vary in size and may be EMPTY; an empty batch is still a step (noise is added and
  the step is accounted).
* :class:`FixedSizeBatchSampler` — each step draws exactly B distinct examples uniformly, fresh
  every step (sampling without replacement; accounted under the replace-one relation).

Both are independent across steps; shuffled-and-partitioned epochs are a DIFFERENT mechanism and are
not offered here as if they were Poisson.
Virtual batches: with ``max_physical_batch_size`` a logical batch is yielded as several physical
chunks; the loader tells the :class:`~dpkit.DPOptimizer` to accumulate on all but the last, so noise
is added once per logical step.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

from dpkit import _validate


class PoissonBatchSampler(Sampler):
    """Poisson sampling: yields ``steps`` index lists, each example kept with probability q.

    Args:
        num_samples: dataset size N.
        sample_rate: q ∈ (0, 1].
        steps: batches per pass; default ceil(1/q) (one expected epoch).
        generator: ``torch.Generator`` for reproducible sampling (None: torch's global RNG).
    """

    def __init__(self, num_samples: int, sample_rate: float, steps: int | None = None,
                 generator: torch.Generator | None = None):
        self.num_samples = _validate.positive_int("num_samples", num_samples)
        self.sample_rate = _validate.probability("sample_rate", sample_rate)
        self.steps = (math.ceil(1 / self.sample_rate) if steps is None
                      else _validate.positive_int("steps", steps))
        self.generator = generator

    def __len__(self):
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            yield mask.nonzero().flatten().tolist()


class FixedSizeBatchSampler(Sampler):
    """Uniform sampling of exactly ``batch_size`` distinct examples per step, fresh each step."""

    def __init__(self, num_samples: int, batch_size: int, steps: int | None = None,
                 generator: torch.Generator | None = None):
        self.num_samples = _validate.positive_int("num_samples", num_samples)
        self.batch_size = _validate.positive_int("batch_size", batch_size)
        if self.batch_size > self.num_samples:
            raise ValueError(f"batch_size must be <= the dataset size {self.num_samples}; got {batch_size}")
        self.steps = (math.ceil(self.num_samples / self.batch_size) if steps is None
                      else _validate.positive_int("steps", steps))
        self.generator = generator

    def __len__(self):
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield torch.randperm(self.num_samples, generator=self.generator)[: self.batch_size].tolist()


class _EmptySafeCollate:
    """Collate that turns an empty index list into correctly shaped zero-length tensors."""

    def __init__(self, dataset: Dataset, collate_fn):
        self.dataset = dataset
        self.collate_fn = collate_fn or default_collate

    def __call__(self, batch):
        if len(batch) > 0:
            return self.collate_fn(batch)
        template = self.collate_fn([self.dataset[0]])
        return _empty_like(template)


def _empty_like(x):
    if isinstance(x, torch.Tensor):
        return x[:0]
    if isinstance(x, (list, tuple)):
        return type(x)(_empty_like(v) for v in x)
    if isinstance(x, dict):
        return {k: _empty_like(v) for k, v in x.items()}
    raise TypeError(f"cannot build an empty batch for collated element of type {type(x).__name__}")


class DPDataLoader:
    """Iterable of (physical) batches drawn by a DP sampler, optionally split into virtual chunks.

    Args:
        dataset: a map-style dataset.
        batch_sampler: :class:`PoissonBatchSampler` or :class:`FixedSizeBatchSampler`.
        max_physical_batch_size: split each logical batch into chunks of at most this many examples.
        collate_fn, num_workers, pin_memory: passed to the underlying ``torch.utils.data.DataLoader``.
    """

    def __init__(self, dataset: Dataset, batch_sampler, *, max_physical_batch_size: int | None = None,
                 collate_fn=None, num_workers: int = 0, pin_memory: bool = False):
        if not isinstance(batch_sampler, (PoissonBatchSampler, FixedSizeBatchSampler)):
            raise TypeError("batch_sampler must be a PoissonBatchSampler or FixedSizeBatchSampler; "
                            f"got {type(batch_sampler).__name__}")
        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self.max_physical_batch_size = (None if max_physical_batch_size is None else
                                        _validate.positive_int("max_physical_batch_size",
                                                               max_physical_batch_size))
        self._collate = _EmptySafeCollate(dataset, collate_fn)
        self._loader_kwargs = {"num_workers": num_workers, "pin_memory": pin_memory}
        self._optimizer = None

    @property
    def sample_rate(self) -> float:
        s = self.batch_sampler
        return s.sample_rate if isinstance(s, PoissonBatchSampler) else s.batch_size / s.num_samples

    def attach_optimizer(self, optimizer) -> None:
        """Let the loader signal virtual-batch boundaries to ``optimizer`` (done by make_private)."""
        self._optimizer = optimizer

    def __len__(self):
        return len(self.batch_sampler)

    def _chunks(self):
        limit = self.max_physical_batch_size
        for indices in self.batch_sampler:
            if limit is None or len(indices) <= limit:
                yield indices, True
                continue
            for start in range(0, len(indices), limit):
                yield indices[start:start + limit], start + limit >= len(indices)

    def __iter__(self):
        chunks = list(self._chunks()) if self.max_physical_batch_size else None
        index_lists = [c for c, _ in chunks] if chunks is not None else self.batch_sampler
        loader = DataLoader(self.dataset, batch_sampler=index_lists, collate_fn=self._collate,
                            **self._loader_kwargs)
        lasts = (last for _, last in chunks) if chunks is not None else None
        for batch in loader:
            is_last = True if lasts is None else next(lasts)
            if self._optimizer is not None:
                self._optimizer.signal_skip_step(not is_last)
            yield batch
