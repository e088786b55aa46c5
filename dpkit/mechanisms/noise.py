"""Noise mechanisms: what :class:`dpkit.DPOptimizer` adds to the clipped gradient sum each step.

A :class:`NoiseMechanism` returns STANDARDISED noise for a logical step: the optimizer scales it by
``noise_multiplier * max_grad_norm`` and adds it once to the clipped SUM. i.i.d. Gaussian noise
(DP-SGD) is :class:`GaussianNoise`; correlated noise (matrix factorisation) lives in
:mod:`dpkit.mechanisms.matrix` and implements the same interface.
"""

from __future__ import annotations

import abc
from typing import Sequence

import torch

from dpkit.mechanisms.randomness import NOISE, check_seed, keyed_generator, resolve_seed, secure_generator


class NoiseMechanism(abc.ABC):
    """Interface of a per-step noise source.

    ``sample(step, like)`` returns, for logical step ``step`` (0-based), one tensor per entry of
    ``like`` with the same shape, dtype and device, whose marginal law is what the accounting
    assumes in units of σ·C (for DP-SGD: i.i.d. N(0, 1) per coordinate).
    """

    @abc.abstractmethod
    def sample(self, step: int, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Standardised noise for logical step ``step``, shaped like ``like``."""

    def state_dict(self) -> dict:
        """Everything needed to continue the same noise stream after a restart."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore the state returned by :meth:`state_dict`."""


class GaussianNoise(NoiseMechanism):
    """i.i.d. standard Gaussian noise from counter-based streams keyed by (seed, step, tensor).

    The noise of logical step t is a pure function of the run's seed and t
    (:mod:`dpkit.mechanisms.randomness`), so a run resumed from a checkpoint (which holds the seed;
    the optimizer holds t) continues the same noise sequence — it never replays earlier noise.

    Args:
        generator: a ``torch.Generator`` whose ``initial_seed()`` becomes the seed (reproducible
            runs; the generator's position is not used). Ignored when ``secure_mode`` is True.
        seed: the seed itself (0 ≤ seed < 2**63); give at most one of ``generator`` and ``seed``.
            Default: 63 bits of OS entropy, kept in :meth:`state_dict` (checkpoints are secrets).
        secure_mode: draw every step's generator seed from the OS entropy pool (``os.urandom``),
            and form each coordinate as the normalised sum of ``secure_draws`` independent
            draws, which blurs the low-order floating-point pattern exploited by attacks on naive
            Gaussian samplers (Holohan & Braghin 2021; Jin et al., "Are We There Yet? Timing and
            Floating-Point Attacks on Differential Privacy Systems", IEEE S&P 2022). The per-step
            stream itself comes from torch's (non-cryptographic) PRNG seeded with 63 fresh bits of
            OS entropy; secure runs are not reproducible and have no state to checkpoint.
    """

    secure_draws = 4

    def __init__(self, generator: torch.Generator | None = None, *, seed: int | None = None,
                 secure_mode: bool = False):
        self.seed = resolve_seed(generator, seed, secure_mode)
        self.secure_mode = secure_mode

    def sample(self, step, like):
        out = []
        for index, ref in enumerate(like):
            if self.secure_mode:
                g = secure_generator(ref.device)
                z = torch.zeros_like(ref)
                for _ in range(self.secure_draws):
                    z.add_(torch.randn(ref.shape, generator=g, dtype=ref.dtype, device=ref.device))
                z.div_(self.secure_draws ** 0.5)
            else:
                g = keyed_generator(self.seed, NOISE, step, index, device=ref.device)
                z = torch.randn(ref.shape, generator=g, dtype=ref.dtype, device=ref.device)
            out.append(z)
        return out

    def state_dict(self):
        return {"secure_mode": self.secure_mode, "seed": self.seed}

    def load_state_dict(self, state):
        """Continue the checkpointed stream (its seed); a secure-mode run has nothing to restore.

        Raises:
            ValueError: the checkpoint's ``secure_mode`` differs from this mechanism's.
        """
        if bool(state.get("secure_mode", False)) != self.secure_mode:
            raise ValueError(f"checkpoint was written with secure_mode={state.get('secure_mode')}; this "
                             f"noise has secure_mode={self.secure_mode}. Build it with the same setting.")
        if not self.secure_mode:
            if state.get("seed") is None:
                raise ValueError("checkpoint holds no noise seed (written by an older dpkit): resuming "
                                 "could replay earlier noise; start a new run")
            self.seed = check_seed("seed", int(state["seed"]))
