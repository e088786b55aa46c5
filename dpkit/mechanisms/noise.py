"""Noise mechanisms: what :class:`dpkit.DPOptimizer` adds to the clipped gradient sum each step.

A :class:`NoiseMechanism` returns STANDARDISED noise for a logical step: the optimizer scales it by
``noise_multiplier * max_grad_norm`` and adds it once to the clipped SUM. i.i.d. Gaussian noise
(DP-SGD) is :class:`GaussianNoise`; correlated noise (matrix factorisation) lives in
:mod:`dpkit.mechanisms.matrix` and implements the same interface.
"""

from __future__ import annotations

import abc
import os
from typing import Sequence

import torch


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
    """i.i.d. standard Gaussian noise, seeded or secure.

    Args:
        generator: a ``torch.Generator`` to draw from (seeded, reproducible runs). Ignored when
            ``secure_mode`` is True.
        secure_mode: draw every step's generator seed from the OS entropy pool (``os.urandom``),
            and form each coordinate as the normalised sum of ``secure_draws`` independent
            draws, which blurs the low-order floating-point pattern exploited by attacks on naive
            Gaussian samplers (Holohan & Braghin 2021; Jin et al., "Are We There Yet? Timing and
            Floating-Point Attacks on Differential Privacy Systems", IEEE S&P 2022). The per-step
            stream itself comes from torch's (non-cryptographic) PRNG seeded with 64 fresh bits of
            OS entropy; secure runs are not reproducible and their state is not checkpointed.
    """

    secure_draws = 4

    def __init__(self, generator: torch.Generator | None = None, *, secure_mode: bool = False):
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
        if not isinstance(secure_mode, bool):
            raise TypeError(f"secure_mode must be a bool; got {secure_mode!r}")
        self.secure_mode = secure_mode
        self.generator = None if secure_mode else generator

    def _generator_for(self, device: torch.device) -> torch.Generator | None:
        if self.secure_mode:
            g = torch.Generator(device=device)
            g.manual_seed(int.from_bytes(os.urandom(8), "little"))
            return g
        if self.generator is not None and not _same_device(self.generator.device, device):
            raise ValueError(
                f"generator must live on the parameters' device {device}; got a generator on "
                f"{self.generator.device}. Pass torch.Generator(device={str(device)!r}).")
        return self.generator

    def sample(self, step, like):
        out = []
        for ref in like:
            g = self._generator_for(ref.device)
            if self.secure_mode:
                z = torch.zeros_like(ref)
                for _ in range(self.secure_draws):
                    z.add_(torch.randn(ref.shape, generator=g, dtype=ref.dtype, device=ref.device))
                z.div_(self.secure_draws ** 0.5)
            else:
                z = torch.randn(ref.shape, generator=g, dtype=ref.dtype, device=ref.device)
            out.append(z)
        return out

    def state_dict(self):
        if self.secure_mode or self.generator is None:
            return {"secure_mode": self.secure_mode}
        return {"secure_mode": False, "generator_state": self.generator.get_state()}

    def load_state_dict(self, state):
        if "generator_state" in state and self.generator is not None:
            self.generator.set_state(state["generator_state"])


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` name the same device when 0 is the current one."""
    def index(d):
        if d.type == "cuda" and d.index is None:
            return torch.cuda.current_device()
        return d.index or 0
    return a.type == b.type and index(a) == index(b)
