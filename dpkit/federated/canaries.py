"""Canary clients for one-shot empirical privacy estimation in federated training.

Andrew, Kairouz, Oh, Oprea, McMahan, Suriyakumar, "One-shot Empirical Privacy Estimation for
Federated Learning", ICLR 2024, Sec. 3-4: k extra clients join the population; whenever canary j
is sampled its update is the same random direction u_j (uniform on the sphere, regenerable from
(seed, j) by :func:`dpkit.audit.canary_directions`) scaled to TWICE the current clip norm, so the
server always clips it to exactly S_t. After training, the cosine between the final model delta
and each u_j (or, for the all-iterates threat model, the maximum over rounds of the cosine with
each round's update) is compared with canaries that were never inserted (null: N(0, 1/d)) and
:func:`dpkit.audit.one_shot_epsilon` turns the two samples into ε̂.
"""

from __future__ import annotations

import numpy as np
import torch

from dpkit import _validate
from dpkit.audit import canary_directions
from dpkit.federated import _seeds

#: the canary's raw norm relative to the clip norm: > 1, so it is always clipped to exactly S_t
CANARY_SCALE = 2.0


class Canaries:
    """k inserted canary clients and k_null never-inserted ones, for one model dimension d.

    Args:
        num_canaries: k ≥ 2 inserted canaries.
        dim: model dimension d (number of federated scalars).
        seed: integer seed of the directions (:func:`dpkit.audit.canary_directions`); default
            None draws one from OS entropy (kept in :attr:`seed`). Audit randomness, not privacy
            noise: a fixed seed does not warn.
        num_null: never-inserted canaries (≥ 2) used as the null of the all-iterates statistic.

    Raises:
        ValueError, TypeError: an argument out of range.
    """

    def __init__(self, num_canaries, dim, *, seed=None, num_null=None):
        self.num_canaries = _validate.positive_int("num_canaries", num_canaries)
        if self.num_canaries < 2:
            raise ValueError(f"num_canaries must be >= 2 (one-shot estimation fits a Gaussian); got {num_canaries}")
        self.num_null = self.num_canaries if num_null is None else _validate.positive_int("num_null", num_null)
        if self.num_null < 2:
            raise ValueError(f"num_null must be >= 2; got {num_null}")
        self.dim = _validate.positive_int("dim", dim)
        self.seed = _seeds.resolve_seed("seed", seed, privacy=False)
        both = canary_directions(self.seed, self.num_canaries + self.num_null, self.dim)
        self.directions, self.null_directions = both[: self.num_canaries], both[self.num_canaries:]
        self._torch = torch.from_numpy(self.directions.astype(np.float32))

    def update(self, j: int, clip_norm: float, like) -> list[torch.Tensor]:
        """Canary j's raw update: u_j · CANARY_SCALE · S_t, split into tensors shaped like ``like``."""
        flat = self._torch[j] * (CANARY_SCALE * clip_norm)
        out, offset = [], 0
        for p in like:
            out.append(flat[offset:offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()
        return out

    def estimate(self, final_delta, round_updates=None, *, delta):
        """One-shot ε̂ from the final model delta (and per-round updates for all iterates).

        Args:
            final_delta: 1-D array θ_T − θ_0 of length d.
            round_updates: optional (rounds, d) array of θ_{t+1} − θ_t.
            delta: δ at which ε̂ is reported.

        Returns:
            dict with ``final_model`` (an :class:`dpkit.audit.OneShotEstimate` as a dict; null
            N(0, 1/d)) and, when ``round_updates`` is given, ``all_iterates`` (null fitted to the
            never-inserted canaries' max-over-rounds cosines).
        """
        from dpkit.audit import canary_cosines, max_cosines_over_rounds, one_shot_epsilon

        out = {"final_model": one_shot_epsilon(canary_cosines(final_delta, self.directions),
                                               delta=delta, dim=self.dim).to_dict()}
        if round_updates is not None:
            obs = max_cosines_over_rounds(round_updates, self.directions)
            null = max_cosines_over_rounds(round_updates, self.null_directions)
            out["all_iterates"] = one_shot_epsilon(obs, delta=delta, null_scores=null).to_dict()
        return out
