"""Cyclic Poisson sampling: the sampler assumed by the amplified BandMF analysis.

The data set is split ONCE into ``num_groups`` = b fixed groups by a seeded permutation; step t
Poisson-samples group ``t mod b``, each of its examples independently with probability q
("(Amplified) Banded Matrix Factorization", Choquette-Choo et al., NeurIPS 2023, §4). With a
b-banded encoder, the accounting is DP-SGD with ceil(n/b) steps at rate q
(:func:`dpkit.accountants.mmcc.banded_amplified_epsilon`).
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

from dpkit import _validate


class CyclicPoissonSampler(Sampler):
    """Batch sampler yielding ``steps`` index lists; step t Poisson-samples group ``t mod b``.

    Use as ``DataLoader(dataset, batch_sampler=CyclicPoissonSampler(...))``. Batches may be empty
    (an empty batch is still a step: noise is added and the step is accounted).

    Args:
        num_samples: data set size N (>= num_groups).
        num_groups: b, the number of fixed groups (= the encoder's bands for amplified BandMF).
        sampling_prob: q, the Poisson rate inside the sampled group.
        steps: number of batches n.
        seed: seed of the group permutation and of the Poisson draws.

    Raises:
        TypeError, ValueError: bad arguments.
    """

    def __init__(self, num_samples: int, num_groups: int, sampling_prob: float, steps: int,
                 seed: int = 0):
        self.num_samples = _validate.positive_int("num_samples", num_samples)
        self.num_groups = _validate.positive_int("num_groups", num_groups)
        if self.num_groups > self.num_samples:
            raise ValueError(f"num_groups must be <= num_samples ({self.num_samples}); "
                             f"got {num_groups}")
        self.sampling_prob = _validate.probability("sampling_prob", sampling_prob)
        self.steps = _validate.positive_int("steps", steps)
        self.seed = _validate.positive_int("seed", seed, allow_zero=True)
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(self.num_samples, generator=g)
        # fixed groups for the whole run: group j = perm[j::b]
        self.groups = [perm[j::self.num_groups] for j in range(self.num_groups)]

    def __len__(self):
        return self.steps

    def group_of_step(self, step: int) -> int:
        """Index of the group sampled at ``step``."""
        return step % self.num_groups

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + 1)
        for t in range(self.steps):
            members = self.groups[self.group_of_step(t)]
            keep = torch.rand(members.numel(), generator=g) < self.sampling_prob
            yield members[keep].tolist()
