"""User-level DP in centralized training: sample users, clip each user's SUMMED gradient, once.

With ``make_private(..., privacy_unit="user", user_ids=ids)`` the privacy unit is a user (all of
their examples): the neighbouring data sets differ by one user's whole data (add/remove). Each step

1. Poisson-samples USERS at rate q = B_u / U (B_u = the loader's ``batch_size``, read as the
   expected number of users per step; U = number of distinct users);
2. feeds the sampled users' examples as "slots": slot j holds the j-th example of every sampled
   user (a user with fewer examples repeats their first one with mask 0, so it adds nothing);
3. the training loop runs the slots inside ``optimizer.same_examples()``: the engine sums each
   user's gradient over the slots and clips that sum ONCE to C (user-level clipping, McMahan,
   Ramage, Talwar, Zhang, ICLR 2018, "Learning differentially private recurrent language models",
   Alg. 1 with one user per "client");
4. noise σ·C is added once; the sum is divided by the public B_u.

Removing one user changes the clipped sum by at most C and that user joins a step with probability
q, so each step is the Poisson-subsampled Gaussian at q — the same event as DP-SGD, at user level.

``max_examples_per_user`` caps the slots (compute); which examples are kept is a public rule (the
first ones in data set order), so the cap does not touch privacy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dpkit import _validate
from dpkit.data import DPDataLoader, PoissonBatchSampler

__all__ = ["UserLevelLoader", "group_by_user"]


def group_by_user(user_ids: Sequence, dataset_size: int, max_examples_per_user: int | None = None
                  ) -> list[list[int]]:
    """Example indices of each distinct user (users in order of first appearance).

    Raises:
        ValueError: ``user_ids`` does not have one entry per example, or a bad cap.
    """
    try:
        ids = user_ids.tolist() if hasattr(user_ids, "tolist") else list(user_ids)
    except TypeError:
        raise TypeError(f"user_ids must be a sequence with one user id per example; got "
                        f"{type(user_ids).__name__}") from None
    if len(ids) != dataset_size:
        raise ValueError(f"user_ids must have one entry per example ({dataset_size}); got {len(ids)}")
    cap = None if max_examples_per_user is None else _validate.positive_int(
        "max_examples_per_user", max_examples_per_user)
    groups: dict = {}
    for index, user in enumerate(ids):
        groups.setdefault(user, []).append(index)
    return [examples[:cap] for examples in groups.values()]


class UserLevelLoader(DPDataLoader):
    """Yields, per step, a list of slots ``(batch, mask)`` over the Poisson-sampled users.

    ``batch`` is collated over the sampled users (row i = user i's j-th example, or their first
    one again), ``mask`` a float tensor with 1 where the row is a real example. An empty draw
    yields one slot with zero rows (still a step). Train with::

        for slots in loader:
            optimizer.zero_grad()
            with optimizer.same_examples():
                loss = sum((mask * per_example_loss(model, batch)).sum() for batch, mask in slots)
            loss.backward()
            optimizer.step()

    Args:
        dataset: map-style dataset of examples.
        users: example indices per user (:func:`group_by_user`).
        batch_sampler: a :class:`~dpkit.data.PoissonBatchSampler` over the USERS.
        collate_fn: as for ``DataLoader``.
    """

    def __init__(self, dataset, users: list[list[int]], batch_sampler: PoissonBatchSampler, *, collate_fn=None):
        if not isinstance(batch_sampler, PoissonBatchSampler):
            raise TypeError("batch_sampler must be a PoissonBatchSampler over the users; got "
                            f"{type(batch_sampler).__name__}")
        if batch_sampler.num_samples != len(users):
            raise ValueError(f"batch_sampler must sample the {len(users)} users; it samples "
                             f"{batch_sampler.num_samples}")
        super().__init__(dataset, batch_sampler, collate_fn=collate_fn)
        self.users = users

    def _slots(self, sampled: list[int]):
        if not sampled:
            return [(self._collate([]), torch.zeros(0))]
        examples = [self.users[u] for u in sampled]
        slots = []
        for j in range(max(len(e) for e in examples)):
            rows = [e[j] if j < len(e) else e[0] for e in examples]
            mask = torch.tensor([1.0 if j < len(e) else 0.0 for e in examples])
            slots.append((self._collate([self.dataset[i] for i in rows]), mask))
        return slots

    def __iter__(self):
        for sampled in self.batch_sampler.draws(self.batch_sampler.position):
            slots = self._slots(sampled)
            self.batch_sampler.position += 1
            if self._optimizer is not None:  # one sampled batch of len(sampled) users per step
                self._optimizer.note_batch(len(sampled), new_draw=True, last_chunk=True)
            yield slots
