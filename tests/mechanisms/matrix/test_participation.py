"""Cyclic Poisson sampler: fixed groups, group t mod b at step t, Poisson rate q inside it."""

import pytest
import torch
from scipy import stats

from dpkit.mechanisms.matrix import CyclicPoissonSampler


def test_groups_partition_and_steps_use_their_group():
    s = CyclicPoissonSampler(103, 4, 0.5, steps=40, seed=3)
    members = torch.cat(s.groups)
    assert sorted(members.tolist()) == list(range(103))
    batches = list(s)
    assert len(batches) == len(s) == 40
    for t, batch in enumerate(batches):
        assert set(batch) <= set(s.groups[t % 4].tolist())
    assert list(CyclicPoissonSampler(103, 4, 0.5, steps=40, seed=3)) == batches  # seeded: reproducible
    assert list(s) != batches  # a second pass continues the sequence: never replays it


def test_inclusion_rate_is_q():
    q, s = 0.2, CyclicPoissonSampler(500, 5, 0.2, steps=200, seed=1)
    included = sum(len(b) for b in s)
    trials = 200 * 100  # each step samples a group of 100
    assert stats.binomtest(included, trials, q).pvalue > 1e-3


@pytest.mark.parametrize("kwargs, exc", [
    (dict(num_samples=3, num_groups=4, sampling_prob=0.1, steps=2), ValueError),
    (dict(num_samples=10, num_groups=2, sampling_prob=0.0, steps=2), ValueError),
    (dict(num_samples=10, num_groups=2, sampling_prob=0.1, steps=0), ValueError),
    (dict(num_samples=10, num_groups=2.5, sampling_prob=0.1, steps=2), TypeError),
    (dict(num_samples=10, num_groups=2, sampling_prob=0.1, steps=2, seed=-1), ValueError),
])
def test_invalid_inputs(kwargs, exc):
    with pytest.raises(exc):
        CyclicPoissonSampler(**kwargs)
