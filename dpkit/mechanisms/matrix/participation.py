"""Cyclic Poisson sampling: the sampler assumed by the amplified BandMF analysis.

The data set is split ONCE into ``num_groups`` = b fixed groups by a seeded permutation; step t
Poisson-samples group ``t mod b``, each of its examples independently with probability q
("(Amplified) Banded Matrix Factorization", Choquette-Choo et al., NeurIPS 2023, §4). With a
b-banded encoder, the accounting is DP-SGD with ceil(n/b) steps at rate q
(:func:`dpkit.accountants.mmcc.banded_amplified_epsilon`). The analysis holds for ANY fixed
assignment of examples to groups (it takes the worst group), so only the Poisson coins need a
secret seed; like every dpkit sampler, the coins of step t are keyed by (seed, t), so a resumed
run continues the sequence (:class:`dpkit.data.KeyedBatchSampler`).
"""

from __future__ import annotations

import torch

from dpkit import _validate
from dpkit.data import KeyedBatchSampler
from dpkit.mechanisms.randomness import fresh_seed, keyed_generator

_PARTITION = 0x7061727469


class CyclicPoissonSampler(KeyedBatchSampler):
    """Batch sampler yielding ``steps`` index lists; step t Poisson-samples group ``t mod b``.

    Use as ``DataLoader(dataset, batch_sampler=CyclicPoissonSampler(...))`` and hand that loader
    to :func:`dpkit.make_private` with ``noise=CorrelatedNoise(banded strategy)``: it then keeps
    this sampler and accounts the run with the amplified BandMF analysis. Batches may be empty (an
    empty batch is still a step: noise is added and the step is accounted).

    Args:
        num_samples: data set size N (>= num_groups).
        num_groups: b, the number of fixed groups (= the encoder's bands for amplified BandMF).
        sampling_prob: q, the Poisson rate inside the sampled group.
        steps: number of batches n.
        seed: seed of the Poisson coins and of the group permutation. Default: OS entropy (kept
            in the optimizer's checkpoint); a fixed seed is for tests.
        generator, secure_mode: see :class:`dpkit.data.KeyedBatchSampler` (in secure mode the
            permutation still comes from a stored seed, the coins from fresh OS entropy).

    Raises:
        TypeError, ValueError: bad arguments.
    """

    kind = "cyclic_poisson"

    def __init__(self, num_samples: int, num_groups: int, sampling_prob: float, steps: int,
                 seed: int | None = None, *, generator: torch.Generator | None = None,
                 secure_mode: bool = False):
        self.num_samples = _validate.positive_int("num_samples", num_samples)
        self.num_groups = _validate.positive_int("num_groups", num_groups)
        if self.num_groups > self.num_samples:
            raise ValueError(f"num_groups must be <= num_samples ({self.num_samples}); "
                             f"got {num_groups}")
        self.sampling_prob = _validate.probability("sampling_prob", sampling_prob)
        super().__init__(_validate.positive_int("steps", steps), generator, seed, secure_mode, 0)
        self._set_partition(self.seed if self.seed is not None else fresh_seed())

    @property
    def sample_rate(self) -> float:
        return self.sampling_prob

    def _set_partition(self, partition_seed: int) -> None:
        self.partition_seed = partition_seed
        perm = torch.randperm(self.num_samples, generator=keyed_generator(partition_seed, _PARTITION))
        # fixed groups for the whole run: group j = perm[j::b]
        self.groups = [perm[j::self.num_groups] for j in range(self.num_groups)]

    def group_of_step(self, step: int) -> int:
        """Index of the group sampled at ``step``."""
        return step % self.num_groups

    def batch(self, t):
        members = self.groups[self.group_of_step(t)]
        keep = torch.rand(members.numel(), generator=self._generator(t)) < self.sampling_prob
        return members[keep].tolist()

    def _config(self):
        return {**super()._config(), "num_groups": self.num_groups, "sampling_prob": self.sampling_prob}

    def state_dict(self):
        return {**super().state_dict(), "partition_seed": self.partition_seed}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._set_partition(int(state["partition_seed"]))
