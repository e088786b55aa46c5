"""The ``"prv"`` accountant: Microsoft's ``prv_accountant`` (privacy random variables).

Gopi, Lee, Wutschitz, "Numerical Composition of Differential Privacy" (NeurIPS 2021): the
privacy loss random variables are discretised on a truncated domain and composed by FFT; Thm. 5.5
gives an error bound, so ``compute_epsilon`` returns (lower, estimate, UPPER). dpkit reports the
UPPER bound (estimate + ``eps_error``, evaluated at δ − ``delta_error``).

Supported (add/remove only): Poisson-subsampled Gaussian (``dpsgd_event``), Gaussian
(``gaussian_event``), Laplace (``laplace_event``; prv's ``LaplaceMechanism(mu = 1/scale)``), and
compositions of those (heterogeneous composition). Refused: sampling without replacement,
Poisson-sampled Laplace and every other event type (use "pld" or "rdp").

prv_accountant's subsampled-Gaussian variable is the "remove" direction (mixture vs N(0, σ²)),
the dominating one for ε ≥ 0 (checked against dp_accounting's two-direction PLD in the tests).
A ledger made only of Gaussian releases is answered in closed form (exact; the composition of
Gaussians is a Gaussian), since prv's grid would be enormous for a tiny effective σ.
When prv_accountant cannot produce a number (it raises for some very large ε / strongly
non-private settings, cf. Opacus #591), dpkit falls back to the RDP upper bound with a
``UserWarning``, which is still a valid (looser) bound.
"""

from __future__ import annotations

import math
import warnings

from dp_accounting import dp_event as _dpe

from dpkit import _validate as V
from dpkit.accountants import events as _events
from dpkit.accountants._gaussian import gaussian_delta, gaussian_epsilon
from dpkit.accountants.base import Accountant

__all__ = ["PRVAccountant"]

# δ-slack of the PRV bound as a fraction of the queried δ (prv_accountant's own recommendation)
_DELTA_ERROR_RATIO = 1e-3
# δ-slack used when a δ is queried for a given ε (no δ scale is known then)
_DELTA_QUERY_ERROR = 1e-10


def _leaf_key(leaf):
    """Hashable description of a supported leaf, or None if unsupported."""
    if isinstance(leaf, (_dpe.NoOpDpEvent, _dpe.NonPrivateDpEvent)):
        return ("noop",) if isinstance(leaf, _dpe.NoOpDpEvent) else ("nonprivate",)
    if isinstance(leaf, _dpe.GaussianDpEvent):
        return ("nonprivate",) if leaf.noise_multiplier == 0 else ("gaussian", float(leaf.noise_multiplier))
    if isinstance(leaf, _dpe.LaplaceDpEvent):
        return ("nonprivate",) if leaf.noise_multiplier == 0 else ("laplace", float(leaf.noise_multiplier))
    if isinstance(leaf, _dpe.PoissonSampledDpEvent) and isinstance(leaf.event, _dpe.GaussianDpEvent):
        q, sigma = float(leaf.sampling_probability), float(leaf.event.noise_multiplier)
        if q == 0:
            return ("noop",)
        if sigma == 0:
            return ("nonprivate",)
        return ("gaussian", sigma) if q == 1 else ("poisson_gaussian", q, sigma)
    return None


class PRVAccountant(Accountant):
    """prv_accountant-backed accountant reporting its rigorous upper bound.

    Args:
        neighboring_relation: must be ``"add_remove"`` for any event to be supported.
        eps_error: the ε-width of prv's error bound, > 0 (default 0.05: ~0.4 s for 10,000
            DP-SGD steps; the reported ε exceeds the estimate by exactly this much).

    Raises:
        ValueError, TypeError: invalid relation or ``eps_error``.
    """

    name = "prv"
    is_approximate = False

    def __init__(self, neighboring_relation="add_remove", *, eps_error=0.05):
        super().__init__(neighboring_relation)
        self._eps_error = V.positive("eps_error", eps_error)

    def _config(self) -> dict:
        return {"eps_error": self._eps_error}

    def _backend_supports(self, event):
        for leaf, _ in _events.leaves_with_counts(event):
            if _leaf_key(leaf) is None:
                return (f"prv_accountant supports Poisson-sampled Gaussian, Gaussian and Laplace "
                        f"events only; got {type(leaf).__name__}")
        return None

    def _grouped(self) -> dict:
        counts: dict = {}
        for event, count in self._ledger:
            for leaf, n in _events.leaves_with_counts(event, count):
                key = _leaf_key(leaf)
                counts[key] = counts.get(key, 0) + n
        return counts

    def _prv_accountant(self, delta_error: float):
        """A prv_accountant.PRVAccountant over the grouped ledger (None if nothing private ran)."""
        from prv_accountant import (GaussianMechanism, LaplaceMechanism, PoissonSubsampledGaussianMechanism,
                                    PRVAccountant as _PRV)

        cache = self._backend_cache = self._backend_cache or {}
        if delta_error not in cache:
            prvs, counts = [], []
            # all Gaussian releases compose exactly to one Gaussian (events.merge_gaussians)
            inv_var = sum(n / key[1] ** 2 for key, n in self._grouped().items() if key[0] == "gaussian")
            if inv_var > 0:
                prvs.append(GaussianMechanism(noise_multiplier=inv_var ** -0.5))
                counts.append(1)
            for key, count in self._grouped().items():
                if key[0] == "laplace":
                    prvs.append(LaplaceMechanism(mu=1.0 / key[1]))
                elif key[0] == "poisson_gaussian":
                    prvs.append(PoissonSubsampledGaussianMechanism(sampling_probability=key[1],
                                                                   noise_multiplier=key[2]))
                else:
                    continue
                counts.append(count)
            cache[delta_error] = (_PRV(prvs=prvs, eps_error=self._eps_error, delta_error=delta_error,
                                       max_self_compositions=counts), counts) if prvs else None
        return cache[delta_error]

    def _fallback(self, what: str, exc: Exception):
        from dpkit.accountants.rdp import RDPAccountant

        warnings.warn(f"prv_accountant could not compute {what} ({exc}); reporting the RDP upper "
                      "bound instead", UserWarning, stacklevel=4)
        rdp = RDPAccountant(self._relation)
        for event, count in self._ledger:
            rdp.compose(event, count)
        return rdp

    def _gaussian_only(self):
        """μ when the ledger holds only Gaussian releases (closed form, exact), else None."""
        grouped = self._grouped()
        if not grouped or any(key[0] not in ("gaussian", "noop") for key in grouped):
            return None
        inv_var = sum(n / key[1] ** 2 for key, n in grouped.items() if key[0] == "gaussian")
        return math.sqrt(inv_var) if inv_var > 0 else None

    def _epsilon_from_ledger(self, delta: float) -> float:
        if ("nonprivate",) in self._grouped():
            return math.inf
        mu = self._gaussian_only()
        if mu is not None:  # exact; prv's FFT grid would be huge for a tiny effective σ
            return gaussian_epsilon(mu, delta)
        try:  # prv_accountant raises while building (discretisation) or while inverting
            built = self._prv_accountant(delta * _DELTA_ERROR_RATIO)
            if built is None:
                return 0.0
            prv, counts = built
            return prv.compute_epsilon(delta=delta, num_self_compositions=counts)[2]
        except (RuntimeError, ValueError, OverflowError, FloatingPointError, MemoryError) as exc:
            return self._fallback("epsilon", exc).epsilon(delta)

    def _delta_from_ledger(self, epsilon: float) -> float:
        if ("nonprivate",) in self._grouped():
            return 1.0
        mu = self._gaussian_only()
        if mu is not None:
            return gaussian_delta(mu, epsilon)
        try:
            built = self._prv_accountant(_DELTA_QUERY_ERROR)
            if built is None:
                return 0.0
            prv, counts = built
            return prv.compute_delta(epsilon=epsilon, num_self_compositions=counts)[2]
        except (RuntimeError, ValueError, OverflowError, FloatingPointError, MemoryError) as exc:
            return self._fallback("delta", exc).delta(epsilon)
