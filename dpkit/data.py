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
from collections import deque

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

from dpkit import _validate
from dpkit.mechanisms.randomness import SAMPLER, check_seed, keyed_generator, resolve_seed, secure_generator


class KeyedBatchSampler(Sampler):
    """Base of dpkit's samplers: draw t is a pure function of (seed, stream, t).

    ``position`` counts the draws already handed out; iterating yields ``steps`` draws starting
    there. Resuming from :meth:`state_dict` (seed + position) continues the same sequence — a
    resumed run never replays the batches it already trained on
    (:mod:`dpkit.mechanisms.randomness`).

    Args:
        generator: a ``torch.Generator`` whose ``initial_seed()`` is the seed (reproducible runs).
        seed: the seed itself; at most one of ``generator`` and ``seed``. Default: OS entropy.
        secure_mode: every draw from fresh OS entropy (not reproducible, nothing to resume).
        stream: an integer kept apart from other streams of the same seed (e.g. the rank of a
            distributed run, so that ranks draw independent coins from one shared seed).
    """

    kind = ""

    def __init__(self, steps, generator, seed, secure_mode, stream):
        self.seed = resolve_seed(generator, seed, secure_mode)
        self.steps = steps
        self.secure_mode = secure_mode
        self.stream = _validate.positive_int("stream", stream, allow_zero=True)
        # a fixed seed would replay its batches in a new process unless the position is restored
        self.seed_is_fixed = not secure_mode and (generator is not None or seed is not None)
        self.position = 0

    def _generator(self, t: int) -> torch.Generator:
        if self.secure_mode:
            return secure_generator()
        return keyed_generator(self.seed, SAMPLER, self.stream, t)

    def batch(self, t: int) -> list[int]:  # pragma: no cover - abstract
        """The index list of draw ``t``."""
        raise NotImplementedError

    def draws(self, start: int):
        """The ``steps`` index lists of one pass starting at draw ``start`` (no state change)."""
        for t in range(start, start + self.steps):
            yield self.batch(t)

    def __len__(self):
        return self.steps

    def __iter__(self):
        for t in range(self.position, self.position + self.steps):
            self.position = t + 1
            yield self.batch(t)

    def _config(self) -> dict:
        return {"kind": self.kind, "num_samples": self.num_samples, "stream": self.stream,
                "steps": self.steps}

    def state_dict(self) -> dict:
        """Seed and position (the config is kept to refuse a checkpoint of another sampler)."""
        return {**self._config(), "seed": self.seed, "position": self.position,
                "secure_mode": self.secure_mode}

    def load_state_dict(self, state: dict) -> None:
        """Continue the checkpointed sequence.

        Raises:
            ValueError: the checkpoint belongs to a sampler with other settings.
        """
        expected = self._config()
        got = {k: state.get(k) for k in expected}
        if got != expected or bool(state.get("secure_mode")) != self.secure_mode:
            raise ValueError(f"checkpoint's sampler {got} (secure_mode={state.get('secure_mode')}) does "
                             f"not match this one {expected} (secure_mode={self.secure_mode}); build the "
                             "loader with the same dataset and settings")
        self.position = _validate.positive_int("position", state["position"], allow_zero=True)
        if not self.secure_mode:
            self.seed = check_seed("seed", int(state["seed"]))


class PoissonBatchSampler(KeyedBatchSampler):
    """Poisson sampling: yields ``steps`` index lists, each example kept with probability q.

    Args:
        num_samples: dataset size N.
        sample_rate: q ∈ (0, 1].
        steps: batches per pass; default ceil(1/q) (one expected epoch).
        generator, seed, secure_mode, stream: see :class:`KeyedBatchSampler` (default seed: OS
            entropy).
    """

    kind = "poisson"

    def __init__(self, num_samples: int, sample_rate: float, steps: int | None = None,
                 generator: torch.Generator | None = None, *, seed: int | None = None,
                 secure_mode: bool = False, stream: int = 0):
        self.num_samples = _validate.positive_int("num_samples", num_samples)
        self.sample_rate = _validate.probability("sample_rate", sample_rate)
        steps = (math.ceil(1 / self.sample_rate) if steps is None
                 else _validate.positive_int("steps", steps))
        super().__init__(steps, generator, seed, secure_mode, stream)

    def batch(self, t):
        mask = torch.rand(self.num_samples, generator=self._generator(t)) < self.sample_rate
        return mask.nonzero().flatten().tolist()

    def _config(self):
        return {**super()._config(), "sample_rate": self.sample_rate}


class FixedSizeBatchSampler(KeyedBatchSampler):
    """Uniform sampling of exactly ``batch_size`` distinct examples per step, fresh each step."""

    kind = "fixed_size"

    def __init__(self, num_samples: int, batch_size: int, steps: int | None = None,
                 generator: torch.Generator | None = None, *, seed: int | None = None,
                 secure_mode: bool = False, stream: int = 0):
        self.num_samples = _validate.positive_int("num_samples", num_samples)
        self.batch_size = _validate.positive_int("batch_size", batch_size)
        if self.batch_size > self.num_samples:
            raise ValueError(f"batch_size must be <= the dataset size {self.num_samples}; got {batch_size}")
        steps = (math.ceil(self.num_samples / self.batch_size) if steps is None
                 else _validate.positive_int("steps", steps))
        super().__init__(steps, generator, seed, secure_mode, stream)

    def batch(self, t):
        return torch.randperm(self.num_samples, generator=self._generator(t))[: self.batch_size].tolist()

    def _config(self):
        return {**super()._config(), "batch_size": self.batch_size}


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

    The loader, not the sampler, counts the draws CONSUMED by training (a torch ``DataLoader``
    with workers prefetches ahead), so a checkpoint resumes exactly after the last batch the
    training loop saw. Each logical batch it yields is reported to the attached
    :class:`~dpkit.DPOptimizer`, which accounts every Poisson batch behind a step (gradient
    accumulation over several batches is accounted as what it is, never as one batch).

    Args:
        dataset: a map-style dataset.
        batch_sampler: a :class:`KeyedBatchSampler` (:class:`PoissonBatchSampler`,
            :class:`FixedSizeBatchSampler`, or the matrix mechanisms' ``CyclicPoissonSampler``).
        max_physical_batch_size: split each logical batch into chunks of at most this many examples.
        collate_fn, num_workers, pin_memory: passed to the underlying ``torch.utils.data.DataLoader``.
    """

    def __init__(self, dataset: Dataset, batch_sampler, *, max_physical_batch_size: int | None = None,
                 collate_fn=None, num_workers: int = 0, pin_memory: bool = False):
        if not isinstance(batch_sampler, KeyedBatchSampler):
            raise TypeError("batch_sampler must be a dpkit sampler (PoissonBatchSampler, FixedSizeBatchSampler, "
                            f"CyclicPoissonSampler); got {type(batch_sampler).__name__}")
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
        return s.batch_size / s.num_samples if isinstance(s, FixedSizeBatchSampler) else s.sample_rate

    @property
    def poisson(self) -> bool:
        """Each example is drawn independently (Poisson, possibly cyclic), not a fixed-size batch."""
        return not isinstance(self.batch_sampler, FixedSizeBatchSampler)

    def attach_optimizer(self, optimizer) -> None:
        """Report batches to ``optimizer`` and let it checkpoint this loader (done by make_private)."""
        self._optimizer = optimizer
        optimizer.attach_loader(self)

    def state_dict(self) -> dict:
        """The sampler's seed and the number of draws consumed (see :class:`KeyedBatchSampler`)."""
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.load_state_dict(state)

    def __len__(self):
        return len(self.batch_sampler)

    def _chunks(self, flags):
        """Physical index lists of one pass; ``(is_first, is_last, size)`` appended to ``flags``."""
        limit = self.max_physical_batch_size
        for indices in self.batch_sampler.draws(self.batch_sampler.position):
            if limit is None or len(indices) <= limit:
                flags.append((True, True, len(indices)))
                yield indices
                continue
            for start in range(0, len(indices), limit):
                flags.append((start == 0, start + limit >= len(indices), len(indices[start:start + limit])))
                yield indices[start:start + limit]

    def __iter__(self):
        flags = deque()
        loader = DataLoader(self.dataset, batch_sampler=_OnePass(self._chunks(flags), len(self)),
                            collate_fn=self._collate, **self._loader_kwargs)
        for batch in loader:
            is_first, is_last, size = flags.popleft()
            if is_first:
                self.batch_sampler.position += 1
            if self._optimizer is not None:
                self._optimizer.note_batch(size, new_draw=is_first, last_chunk=is_last, batch=batch)
            yield batch


class _OnePass:
    """A batch sampler object over one generator of index lists (what ``DataLoader`` expects)."""

    def __init__(self, index_lists, length):
        self._index_lists = index_lists
        self._length = length

    def __iter__(self):
        return iter(self._index_lists)

    def __len__(self):
        return self._length
