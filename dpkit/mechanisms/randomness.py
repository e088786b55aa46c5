"""Counter-based randomness: every privacy-relevant draw is a pure function of (seed, keys).

Noise of logical step t and the Poisson coins of draw t are generated from a ``torch.Generator``
seeded with a 63-bit mix (SplitMix64, Steele, Lea, Flood, OOPSLA 2014) of the run's seed and the
counters. Consequences the privacy account relies on:

* a run resumed from a checkpoint (seed + counters) continues the SAME sequence instead of
  replaying it — bit-identical to the uninterrupted run;
* distinct counters give independent streams (different generator seeds), so sampling and noise
  never share draws.

Seeds default to 63 bits of OS entropy (:func:`fresh_seed`): anyone who knows a seed can remove
the noise, so a fixed seed is a test convenience and checkpoints (which carry the seed) are
secrets. ``secure_mode`` callers draw a fresh OS-entropy seed per draw instead
(:func:`secure_generator`) and keep nothing to replay.
"""

from __future__ import annotations

import os

import torch

_MASK = (1 << 64) - 1

# stream tags (first key) keep the randomness of different roles apart
NOISE, SAMPLER, LAZY_ROWS = 0x6E6F697365, 0x73616D706C, 0x6C617A79


def splitmix64(x: int) -> int:
    """One SplitMix64 output for state ``x`` (a 64-bit integer mixer)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def mix(seed: int, *keys: int) -> int:
    """63-bit generator seed determined by ``seed`` and the integer ``keys`` (in order)."""
    state = splitmix64(seed & _MASK)
    for key in keys:
        state = splitmix64(state ^ (key & _MASK))
    return state & ((1 << 63) - 1)


def keyed_generator(seed: int, *keys: int, device="cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`mix` of ``seed`` and ``keys``."""
    g = torch.Generator(device=device)
    g.manual_seed(mix(seed, *keys))
    return g


def fresh_seed() -> int:
    """63 bits from the OS entropy pool (``os.urandom``)."""
    return int.from_bytes(os.urandom(8), "little") >> 1


def secure_generator(device="cpu") -> torch.Generator:
    """A generator seeded with fresh OS entropy, for one draw of a secure-mode run."""
    g = torch.Generator(device=device)
    g.manual_seed(fresh_seed())
    return g


def check_seed(name: str, seed) -> int:
    """Validate an integer seed 0 ≤ seed < 2**63."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{name} must be an int or None; got {seed!r}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"{name} must be in [0, 2**63); got {seed!r}")
    return seed


def resolve_seed(generator, seed, secure_mode) -> int | None:
    """The seed of a keyed stream from the user's ``generator=`` / ``seed=`` / ``secure_mode=``.

    Returns None in secure mode (every draw from fresh OS entropy), the given seed, the
    generator's ``initial_seed()``, or else 63 bits of OS entropy.

    Raises:
        TypeError: a generator that is not a ``torch.Generator``, a non-bool ``secure_mode``.
        ValueError: both ``generator`` and ``seed``, or a seed out of range.
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    if not isinstance(secure_mode, bool):
        raise TypeError(f"secure_mode must be a bool; got {secure_mode!r}")
    if generator is not None and seed is not None:
        raise ValueError("give at most one of generator and seed")
    if secure_mode:
        return None
    if seed is not None:
        return check_seed("seed", seed)
    return seed_from_generator(generator) if generator is not None else fresh_seed()


def seed_from_generator(generator: torch.Generator) -> int:
    """The seed a user-supplied ``torch.Generator`` stands for: its ``initial_seed()``.

    Keyed streams derive everything from this seed, so the generator's own position is irrelevant
    and a rebuilt generator with the same seed resumes the same run.
    """
    return generator.initial_seed() & ((1 << 63) - 1)


def broadcast_seed(seed: int) -> int:
    """Rank 0's ``seed`` on every rank of the initialised ``torch.distributed`` group."""
    value = torch.tensor([seed], dtype=torch.int64)
    torch.distributed.broadcast(value, src=0)
    return int(value.item())
