"""Weighted client averaging by example count, with a public or a privately estimated normaliser.

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models"
(ICLR 2018), Sec. 2: user k gets weight w_k = min(n_k / ŵ, 1) ∈ [0, 1] (n_k its example count,
ŵ a public cap), and the round's update is Σ_{k∈C} w_k·clip(Δ_k) plus noise, divided by

* ``total_weight`` given (the paper's fixed-denominator estimator f̃_f, Eq. 1): the PUBLIC
  q·W, W = Σ_k w_k over the whole population (declared by the caller: it must not be computed
  from private data without accounting). Sensitivity of the weighted sum stays S (w_k ≤ 1), so
  the round is accounted exactly as unweighted DP-FedAvg.
* ``weight_stddev`` given (a privately estimated normaliser): the server also releases
  Ŵ_t = Σ_{k∈C} w_k + N(0, σ_w²) (sensitivity 1 under add/remove of one user) and divides by
  max(Ŵ_t, ``min_denominator``). The two releases form ONE Gaussian mechanism with sensitivity
  vector (S, 1): rescaling the weight coordinate by S·z_Δ/σ_w gives noise multiplier
  z = (z_Δ⁻² + σ_w⁻²)^(−1/2) (the same argument as Andrew et al., NeurIPS 2021, Thm 1, for the
  clipped count). The accountant sees z; the update noise is raised to z_Δ = (z⁻² − σ_w⁻²)^(−1/2),
  which needs σ_w > z. The division is post-processing.
"""

from __future__ import annotations

import math

from dpkit import _validate


class ExampleWeighting:
    """Weights w_k = min(n_k / cap, 1) and the normaliser of the weighted sum (see module docstring).

    Exactly one of ``total_weight`` (public normaliser) and ``weight_stddev`` (private) is given.

    Args:
        cap: ŵ > 0, the example count at which a user's weight saturates at 1.
        total_weight: W > 0, the PUBLIC population total Σ_k min(n_k/ŵ, 1) (declared).
        weight_stddev: σ_w > 0, the noise std of the released cohort weight total.
        min_denominator: public floor > 0 of the private normaliser (required with
            ``weight_stddev``; e.g. a fraction of the expected cohort weight).

    Raises:
        TypeError, ValueError: bad or inconsistent arguments.
    """

    def __init__(self, cap, *, total_weight=None, weight_stddev=None, min_denominator=None):
        self.cap = _validate.positive("cap", cap)
        if (total_weight is None) == (weight_stddev is None):
            raise ValueError("give exactly one of total_weight (public normaliser) and weight_stddev "
                             f"(privately estimated normaliser); got total_weight={total_weight!r}, "
                             f"weight_stddev={weight_stddev!r}")
        self.total_weight = None if total_weight is None else _validate.positive("total_weight", total_weight)
        self.weight_stddev = None if weight_stddev is None else _validate.positive("weight_stddev", weight_stddev)
        if self.weight_stddev is not None:
            if min_denominator is None:
                raise ValueError("min_denominator must be given with weight_stddev (a public floor of the "
                                 "noisy normaliser)")
            self.min_denominator = _validate.positive("min_denominator", min_denominator)
        else:
            if min_denominator is not None:
                raise ValueError("min_denominator is only used with weight_stddev; got it with total_weight")
            self.min_denominator = None

    @property
    def private(self) -> bool:
        """True when the normaliser is released with noise (and accounted jointly)."""
        return self.weight_stddev is not None

    def weight(self, name: str, num_examples) -> float:
        """w = min(n / cap, 1) for a user with ``num_examples`` = n ≥ 0 examples.

        Raises:
            TypeError, ValueError: n is not an integer ≥ 0 (``name`` is named in the message).
        """
        n = _validate.positive_int(name, num_examples, allow_zero=True)
        return min(n / self.cap, 1.0)

    def update_noise_multiplier(self, noise_multiplier: float) -> float:
        """z_Δ = (z⁻² − σ_w⁻²)^(−1/2) for the private normaliser; z itself for the public one.

        Raises:
            ValueError: σ_w ≤ z (the weight release alone would spend the whole budget).
        """
        z = noise_multiplier
        if not self.private or z == 0:
            return z
        if not self.weight_stddev > z:
            raise ValueError(f"weight_stddev must be > noise_multiplier = {z}; got {self.weight_stddev!r}")
        return (z ** -2 - self.weight_stddev ** -2) ** -0.5

    def __repr__(self):
        if self.private:
            return (f"ExampleWeighting(cap={self.cap}, weight_stddev={self.weight_stddev}, "
                    f"min_denominator={self.min_denominator})")
        return f"ExampleWeighting(cap={self.cap}, total_weight={self.total_weight})"


def total_weight(example_counts, cap) -> float:
    """W = Σ_k min(n_k / cap, 1): a helper for DECLARING the public total (e.g. from public counts).

    Raises:
        TypeError, ValueError: a count is not an integer ≥ 0, or cap ≤ 0.
    """
    w = ExampleWeighting(cap, total_weight=1.0)
    return math.fsum(w.weight(f"example_counts[{i}]", n) for i, n in enumerate(example_counts))
