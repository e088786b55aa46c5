"""Counter-based seeds: one independent stream per (run seed, purpose, round, client).

Every random choice of a federated run (who is sampled in round t, the noise of round t, the
shuffling of client i's data in round t, canary directions) is keyed by a tuple, so any piece can
be regenerated alone — by the in-process simulator and by the Flower strategy alike — two purposes
never share a stream, and a run resumed at round t draws exactly what an uninterrupted run draws
at round t (never the streams of rounds 0, 1, ... again).

The run seed itself comes from OS entropy unless the caller asks for a fixed one
(:func:`resolve_seed`): a seed written in code is known to anyone who reads the code, and with it
the noise can be subtracted (:func:`resolve_seed` is shared with the numpy-only
:mod:`dpkit.admm`). ``secure=True`` paths draw fresh OS entropy per stream instead (not
reproducible, nothing to keep secret).
"""

from __future__ import annotations

import os
import secrets
import sys
import warnings

import numpy as np

from dpkit import _validate
from dpkit.errors import SeededRandomnessWarning

# purposes (the second key of every derived seed)
SAMPLING, NOISE, LOCAL, CANARY, COUNT_NOISE, CORRELATED_NOISE, GROUPS, WEIGHT_NOISE = range(8)

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _outside_dpkit_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` called by our caller that points at the user's code."""
    frame, level = sys._getframe(2), 2   # the frame that called resolve_seed
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


def resolve_seed(name: str, seed, *, privacy: bool = True) -> int:
    """The run seed: 63 bits of OS entropy for ``None``, else the validated explicit ``seed``.

    An explicit seed that drives privacy noise or sampling (``privacy=True``) emits
    :class:`dpkit.errors.SeededRandomnessWarning`: it is a test convenience — whoever knows it can
    regenerate and subtract the noise. Either way the returned seed is what an object keeps in its
    ``state_dict`` so that a resumed run continues its streams (keep such checkpoints secret).

    Raises:
        TypeError, ValueError: ``seed`` is neither None nor an integer ≥ 0.
    """
    if seed is None:
        return secrets.randbits(63)
    seed = _validate.positive_int(name, seed, allow_zero=True)
    if privacy:
        warnings.warn(f"{name}={seed} fixes the privacy noise and sampling: anyone who knows it can "
                      f"remove the noise. Use a fixed seed for tests only; leave {name}=None in "
                      "deployments (OS entropy)", SeededRandomnessWarning,
                      stacklevel=_outside_dpkit_stacklevel())
    return seed


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for the stream ``keys`` of run ``seed`` (numpy SeedSequence spawn keys)."""
    state = np.random.SeedSequence(entropy=int(seed), spawn_key=tuple(int(k) for k in keys))
    return int(state.generate_state(1, np.uint64)[0] >> np.uint64(1))


def generator(seed: int | None, *keys: int):
    """A CPU ``torch.Generator`` for stream ``keys``; OS entropy when ``seed`` is None (secure)."""
    import torch  # here, not at the top: the torch-free ADMM package imports resolve_seed

    g = torch.Generator()
    if seed is None:
        g.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
    else:
        g.manual_seed(derive_seed(seed, *keys))
    return g
