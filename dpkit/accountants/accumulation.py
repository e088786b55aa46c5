"""The DP event of one step that sums several Poisson-sampled batches before adding noise once.

Gradient accumulation over k independently Poisson-sampled batches (rate q each) followed by ONE
Gaussian noise draw N(0, σ²C²) releases Σ_j S_j + Z. Under add/remove of one example x, x falls
into K ~ Binomial(k, q) of the batches, so its (worst-case aligned) contribution is K·C: the step
is the mixture-of-Gaussians mechanism with sensitivities 0, 1, ..., k (in units of C) and weights
P(K = j) (dp_accounting's ``MixtureOfGaussiansDpEvent``; Choquette-Choo et al., ICLR 2024,
"Privacy amplification for matrix mechanisms", where the same mixture arises). For k = 1 it is
exactly the Poisson-subsampled Gaussian.
"""

from __future__ import annotations

import math

from dp_accounting import dp_event as _dpe

from dpkit import _validate as V
from dpkit.accountants.events import dpsgd_event

__all__ = ["accumulated_poisson_event"]


def accumulated_poisson_event(noise_multiplier: float, sampling_prob: float, batches: int):
    """Event of one noise draw added to the sum of ``batches`` independent Poisson batches.

    Args:
        noise_multiplier: σ (noise std / C).
        sampling_prob: q of each batch.
        batches: k ≥ 1 batches summed before the noise.

    Returns:
        ``dpsgd_event(σ, q, 1)`` for k = 1, else a ``MixtureOfGaussiansDpEvent`` (add/remove).

    Raises:
        ValueError, TypeError: an argument outside its range.
    """
    sigma = V.non_negative("noise_multiplier", noise_multiplier)
    q = V.probability("sampling_prob", sampling_prob)
    k = V.positive_int("batches", batches)
    if k == 1 or sigma == 0:
        return dpsgd_event(sigma, q, 1)
    weights = [math.comb(k, j) * q ** j * (1 - q) ** (k - j) for j in range(k + 1)]
    return _dpe.MixtureOfGaussiansDpEvent(sigma, list(range(k + 1)), weights)
