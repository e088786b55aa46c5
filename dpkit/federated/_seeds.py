"""Counter-based seeds: one independent stream per (run seed, purpose, round, client).

Every random choice of a federated run (who is sampled in round t, the noise of round t, the
shuffling of client i's data in round t, canary directions) is keyed by a tuple, so any piece can
be regenerated alone — by the in-process simulator and by the Flower strategy alike — and two
purposes never share a stream. ``secure=True`` draws fresh OS entropy instead (not reproducible).
"""

from __future__ import annotations

import os

import numpy as np
import torch

# purposes (the second key of every derived seed)
SAMPLING, NOISE, LOCAL, CANARY, COUNT_NOISE = range(5)


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for the stream ``keys`` of run ``seed`` (numpy SeedSequence spawn keys)."""
    state = np.random.SeedSequence(entropy=int(seed), spawn_key=tuple(int(k) for k in keys))
    return int(state.generate_state(1, np.uint64)[0] >> np.uint64(1))


def generator(seed: int | None, *keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` for stream ``keys``; OS entropy when ``seed`` is None (secure)."""
    g = torch.Generator()
    if seed is None:
        g.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
    else:
        g.manual_seed(derive_seed(seed, *keys))
    return g
