"""The ``"gdp"`` accountant: μ-Gaussian-DP with the central-limit approximation (APPROXIMATE).

Dong, Roth, Su, "Gaussian Differential Privacy" (JRSS-B 2022): the Gaussian mechanism with noise
multiplier σ is exactly (1/σ)-GDP and μ-GDP composes as μ² = Σ μ_i² (Cor. 3.3). For T steps of
the Poisson-subsampled Gaussian, Bu, Dong, Long, Su, "Deep Learning with Gaussian Differential
Privacy" (HDSR 2020, Sec. 3, CLT Thm. 5 of Dong et al.) use μ = q·sqrt(T·(e^{1/σ²} − 1)), an
ASYMPTOTIC (T → ∞, q√T fixed) approximation that can UNDER-state ε (notably for small σ or few
steps), so this accountant sets ``is_approximate = True`` and warns whenever it reports a
number. μ-GDP → (ε, δ): δ(ε) = Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2) (Dong et al., Cor. 2.13),
inverted by root finding for ε(δ).

Supported (add/remove): Poisson-sampled Gaussian, Gaussian, and compositions of those.
"""

from __future__ import annotations

import math
import warnings

from dp_accounting import dp_event as _dpe
from dpkit.accountants import events as _events
from dpkit.accountants._gaussian import gaussian_delta, gaussian_epsilon
from dpkit.accountants.base import Accountant

__all__ = ["GDPAccountant"]


class GDPAccountant(Accountant):
    """μ-GDP accountant with the CLT for Poisson subsampling; APPROXIMATE (may under-state ε).

    Args:
        neighboring_relation: must be ``"add_remove"`` for any event to be supported.

    Raises:
        ValueError, TypeError: invalid relation.
    """

    name = "gdp"
    is_approximate = True

    def _backend_supports(self, event):
        for leaf, _ in _events.leaves_with_counts(event):
            if isinstance(leaf, (_dpe.NoOpDpEvent, _dpe.NonPrivateDpEvent, _dpe.GaussianDpEvent)):
                continue
            if isinstance(leaf, _dpe.PoissonSampledDpEvent) and isinstance(leaf.event, _dpe.GaussianDpEvent):
                continue
            return f"the GDP accountant supports (Poisson-sampled) Gaussian events only; got {type(leaf).__name__}"
        return None

    def mu(self) -> float:
        """The μ of the ledger (CLT approximation for subsampled steps); inf if non-private."""
        mu_sq = 0.0
        for event, count in self._ledger:
            for leaf, n in _events.leaves_with_counts(event, count):
                if isinstance(leaf, _dpe.NonPrivateDpEvent):
                    return math.inf
                if isinstance(leaf, _dpe.GaussianDpEvent):
                    q, sigma = 1.0, leaf.noise_multiplier
                elif isinstance(leaf, _dpe.PoissonSampledDpEvent):
                    q, sigma = leaf.sampling_probability, leaf.event.noise_multiplier
                else:  # NoOp
                    continue
                if q == 0:
                    continue
                if sigma == 0:
                    return math.inf
                if q == 1:
                    mu_sq += n / sigma**2          # exact: Gaussian is (1/σ)-GDP
                else:
                    mu_sq += n * q**2 * math.expm1(1.0 / sigma**2)   # CLT (Bu et al. 2020)
        return math.sqrt(mu_sq)

    def _warn(self) -> None:
        warnings.warn("the 'gdp' accountant uses a central-limit approximation that can UNDER-state "
                      "ε; use 'pld' (default) or 'prv' for a guaranteed upper bound",
                      UserWarning, stacklevel=4)

    def _epsilon_from_ledger(self, delta: float) -> float:
        self._warn()
        return gaussian_epsilon(self.mu(), delta)

    def _delta_from_ledger(self, epsilon: float) -> float:
        self._warn()
        return gaussian_delta(self.mu(), epsilon)
