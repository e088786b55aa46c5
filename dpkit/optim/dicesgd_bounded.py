"""DiceSGD under an ENFORCED gradient bound G ≥ C1: the account dpkit can prove, and its accountant.

Zhang, Bu, Wu, Hong, ICLR 2024 (arXiv 2311.14632), Algorithm 1, with one change that makes the
paper's bounded-gradient assumption true by construction: every per-example gradient is first
clipped at G ≥ C1, so the residual it leaves in the hidden error state,
ρ = clip(g, G) − clip(g, C1), has ‖ρ‖ ≤ G − C1 =: Δ. The engine side (the second clip) is in
:mod:`dpkit.optim.error_feedback` (``attach_error_feedback(..., gradient_bound=G)``).

Notation (SUM units, as the noise): s = σ·C1 the std of the noise on the summed gradient, B̄ the
public expected batch size, C2 the error threshold in mean units (the feedback added to the sum is
B̄·clip(e_t, C2)), q the Poisson rate, T the number of steps, add/remove neighbours D and
D' = D ∪ {x*}.

Theorem (participation-count bound). For every ε ≥ 0 both hockey-stick divergences
H_{e^ε}(M(D') ‖ M(D)) and H_{e^ε}(M(D) ‖ M(D')) of the T released noisy sums are at most

    δ_count(ε) = Σ_{k=1..T} Binom(k; T, q) · δ_G(μ_k, ε),
    μ_k = ( √k · C1 + min(k·Δ, √(T−1) · 2B̄C2) ) / s,

with δ_G(μ, ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2), the exact curve of μ-GDP (Balle & Wang,
ICML 2018, Thm. 8; Dong, Roth, Su, JRSS-B 2022, Cor. 2.13).

Proof.
(1) Reveal every other example's Poisson coins (data-independent; releasing more cannot lower a
    divergence) and write M(D') = Σ_b π(b) M_b(D') over the canary's coin pattern b ∈ {0,1}^T,
    π the Binomial-product law. Joint convexity of the hockey-stick divergence, with M(D) as
    every component on the other side, bounds both directions by Σ_b π(b) H(M_b(D') ‖ M(D)) (and
    the reverse): it suffices to bound each fixed pattern with k = |b| participations.
(2) Fix b. Given the released history y_{<t}, the parameters and base-optimizer state are the same
    in both worlds (post-processing of y_{<t}), the other examples' batches and gradients too, so
    step t releases N(μ_t, s²I) in D and N(μ_t + m_t, s²I) in D', with
    m_t = b_t·clip(g*_t, C1) + B̄·(clip(e'_t, C2) − clip(e_t, C2)): an adaptive composition of
    Gaussian mechanisms whose mean differences m_t are functions of the history.
(3) Lemma A (firm nonexpansiveness of a projection; Bauschke & Combettes, Convex Analysis and
    Monotone Operator Theory, 2nd ed. 2017, Prop. 4.16): with P = clip(·, C2), the projection onto
    a closed ball, and R = I − P, ‖Px − Py‖² + ‖Rx − Ry‖² ≤ ‖x − y‖². Directly: ‖x − y‖² =
    ‖Px − Py‖² + ‖Rx − Ry‖² + 2⟨Px − Py, Rx − Ry⟩, and ⟨Px − Py, Rx − Ry⟩ = ⟨Px − Py, x − Px⟩ +
    ⟨Py − Px, y − Py⟩ ≥ 0: both terms are ≥ 0 by the projection's variational inequality
    ⟨z − Pw, w − Pw⟩ ≤ 0 for z in the ball (w = x, z = Py; w = y, z = Px).
(4) Lemma B (feedback energy). Let E_t = B̄(e'_t − e_t), d_t = B̄‖clip(e'_t, C2) − clip(e_t, C2)‖.
    The other examples' residuals cancel, so E_1 = 0 and E_{t+1} = B̄[(I−P)e'_t − (I−P)e_t] + b_t ρ_t
    with ‖ρ_t‖ ≤ Δ. Claim: ‖E_t‖² + Σ_{s<t} d_s² ≤ (k_t Δ)², k_t = Σ_{s<t} b_s. Induction: by
    Lemma A, ‖E_{t+1}‖ ≤ √(‖E_t‖² − d_t²) + b_tΔ, so ‖E_{t+1}‖² + Σ_{s≤t} d_s² ≤ ‖E_t‖² +
    Σ_{s<t} d_s² + 2b_tΔ‖E_t‖ + b_tΔ² ≤ (k_tΔ)² + 2b_tΔ·k_tΔ + b_tΔ² = (k_{t+1}Δ)². Hence
    Σ_t d_t² ≤ (kΔ)²; also d_t ≤ 2B̄C2 (both feedbacks lie in the ball) and d_1 = 0, so
    Σ_t d_t² ≤ min(kΔ, √(T−1)·2B̄C2)².
(5) Minkowski over t: (Σ_t ‖m_t‖²)^½ ≤ (Σ_t b_t C1²)^½ + (Σ_t d_t²)^½ ≤ s·μ_k on EVERY history.
(6) Fully adaptive composition of Gaussian mechanisms (a privacy filter): if Σ_t ‖m_t‖²/s² ≤ μ²
    on every path, the composition is μ-GDP (Smith & Thakurta, "Fully adaptive composition for
    Gaussian differential privacy", arXiv 2210.17520, 2022; Koskela, Tobaben, Honkela, "Individual
    privacy accounting with Gaussian differential privacy", ICLR 2023). μ-GDP gives both
    hockey-stick divergences ≤ δ_G(μ_k, ε); k = 0 gives 0.     ∎

dpkit's account is the better of two valid bounds (a minimum of valid bounds is valid):

* the participation-count bound above (:func:`participation_delta`): the feedback part costs at
  most kΔ in total however it is delivered, but nothing is amplified by sampling beyond the
  Binomial law of k;
* the Gaussian-split bound of :mod:`dpkit.optim.error_feedback` with the feedback sensitivity
  min(2B̄C2, KΔ) after truncating the canary at K participations (:func:`truncation_count`):
  the truncated mechanism differs from the real one only on {Binom(T, q) > K}, so
  H(M(D')‖M(D)) ≤ δ_split + δ' and H(M(D)‖M(D')) ≤ δ_split + e^ε δ' with δ' = P[Binom(T, q) > K]
  (coupling; a rate in {0, q} is dominated by rate q). Its gradient part keeps the amplification
  of DP-SGD, so it wins only when Δ is tiny (G within a few percent of C1).

Tightness: with G = C1 (Δ = 0) the residual is zero and DiceSGD IS DP-SGD; the split bound then
returns exactly DP-SGD's event. The feedback term kΔ is reachable when kΔ ≤ B̄C2: other examples
keep e saturated along the canary's residual (both worlds feed back the same C2·v while the
difference accumulates), then a large opposite residual brings both states inside the ball and
the whole difference kΔ is released in one step. The direct term √k·C1 is not amplified by
sampling: at Δ → 0 the participation bound needs σ ≈ 2.95, 3.2× DP-SGD's, on the task of
docs/dicesgd_dpsgdf.md, which is why the split bound is kept for G close to C1.
"""

from __future__ import annotations

import math

import numpy as np
from dp_accounting import dp_event as _dpe
from scipy import special, stats

from dpkit import _validate as V
from dpkit.accountants._search import search_targets, smallest_feasible
from dpkit.accountants.base import Accountant
from dpkit.accountants.calibration import accountant_factory
from dpkit.errors import CalibrationError

__all__ = ["gaussian_dp_delta", "participation_delta", "truncation_count", "bounded_dicesgd_epsilon",
           "calibrate_bounded_dicesgd_noise", "BoundedDiceSGDAccountant", "validate_gradient_bound"]


def validate_gradient_bound(gradient_bound, clip1) -> float:
    """G as a float, refusing G < C1 (the residual bound G − C1 would be negative)."""
    g = V.positive("gradient_bound", gradient_bound)
    if g < clip1:
        raise ValueError(f"gradient_bound must be >= max_grad_norm (C1 = {clip1}); got {g}. The second "
                         "clip at G comes before the C1 clip, so G = C1 is DP-SGD and G > C1 leaves "
                         "residuals of norm <= G - C1 for the error feedback")
    return g


def gaussian_dp_delta(mu, epsilon):
    """Exact δ(ε) of μ-GDP, Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2) (Balle & Wang 2018, Thm. 8); 0 at μ = 0.

    Vectorised over ``mu`` (array-like, ≥ 0); the second term is formed in log space.
    """
    mu = np.asarray(mu, dtype=float)
    safe = np.where(mu > 0, mu, 1.0)
    value = special.ndtr(-epsilon / safe + safe / 2) - np.exp(epsilon + special.log_ndtr(-epsilon / safe - safe / 2))
    return np.where(mu > 0, np.clip(value, 0.0, 1.0), 0.0)


def _mu_k(sigma, q, steps, clip1, clip2, gradient_bound, batch):
    """k = 0..T and μ_k of the module theorem (step 5)."""
    k = np.arange(steps + 1, dtype=float)
    feedback = np.minimum(k * (gradient_bound - clip1), math.sqrt(steps - 1) * 2.0 * batch * clip2)
    return k, (np.sqrt(k) * clip1 + feedback) / (sigma * clip1)


def _run_settings(sampling_prob, steps, clip1, clip2, gradient_bound, expected_batch_size):
    """(q, T, C1, C2, G, B̄) validated, each error naming its argument."""
    c1 = V.positive("clip1", clip1)
    return (V.probability("sampling_prob", sampling_prob), V.positive_int("steps", steps), c1,
            V.non_negative("clip2", clip2), validate_gradient_bound(gradient_bound, c1),
            V.positive("expected_batch_size", expected_batch_size))


def participation_delta(epsilon, noise_multiplier, sampling_prob, steps, *, clip1, clip2, gradient_bound,
                        expected_batch_size) -> float:
    """δ_count(ε) of the module theorem: Σ_k Binom(k; T, q) δ_G(μ_k, ε), valid in both directions.

    Args:
        epsilon: ε ≥ 0. noise_multiplier: σ > 0 (noise std on the sum / C1).
        sampling_prob: q in (0, 1]. steps: T ≥ 1. clip1: C1 > 0. clip2: C2 ≥ 0 (mean units).
        gradient_bound: G ≥ C1 (per-example clip applied before C1). expected_batch_size: B̄ > 0.

    Returns:
        δ in [0, 1].

    Raises:
        ValueError, TypeError: an argument out of range, named.
    """
    eps = V.non_negative("epsilon", epsilon)
    sigma = V.positive("noise_multiplier", noise_multiplier)
    q, steps, c1, c2, g, b = _run_settings(sampling_prob, steps, clip1, clip2, gradient_bound,
                                           expected_batch_size)
    k, mu = _mu_k(sigma, q, steps, c1, c2, g, b)
    weights = stats.binom.pmf(k, steps, q)
    return float(min(1.0, np.sum(weights * gaussian_dp_delta(mu, eps))))


def _participation_epsilon(delta, sigma, q, steps, **kw) -> float:
    """Smallest ε (upper end of a bisection bracket) with δ_count(ε) ≤ δ."""
    if participation_delta(0.0, sigma, q, steps, **kw) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while participation_delta(hi, sigma, q, steps, **kw) > delta:
        lo, hi = hi, 2.0 * hi
        if hi > 1e6:
            return math.inf
    while hi - lo > 1e-9 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if participation_delta(mid, sigma, q, steps, **kw) <= delta else (mid, hi)
    return hi


def truncation_count(steps, sampling_prob, tail) -> int:
    """Smallest K with P[Binomial(T, q) > K] ≤ ``tail`` (the canary's participations beyond K).

    Raises:
        ValueError, TypeError: an argument out of range, named.
    """
    steps = V.positive_int("steps", steps)
    q = V.probability("sampling_prob", sampling_prob)
    tail = V.probability("tail", tail, allow_zero=True, allow_one=False)
    if tail == 0.0:
        return steps
    k = int(stats.binom.isf(tail, steps, q))
    while k > 0 and stats.binom.sf(k - 1, steps, q) <= tail:  # isf may round up; take the smallest
        k -= 1
    while stats.binom.sf(k, steps, q) > tail:
        k += 1
    return k


def _split_epsilon(delta, sigma, q, steps, *, clip1, clip2, gradient_bound, expected_batch_size,
                   accountant) -> float:
    """ε of the Gaussian split with feedback sensitivity min(2B̄C2, KΔ) and the truncation δ'.

    δ is shared: δ/2 for the split account and e^ε·δ' ≤ δ/2 for the truncation (iterated: K
    depends on ε only through δ' = δ e^{−ε}/2, which changes K slowly).
    """
    from dpkit.optim.error_feedback import dicesgd_event

    residual = gradient_bound - clip1
    fresh = accountant_factory(accountant)

    def split(k_max, target):
        c2_eff = min(clip2, k_max * residual / (2.0 * expected_batch_size))  # sensitivity 2B̄·c2_eff
        event = dicesgd_event(sigma, q, steps, clip1=clip1, clip2=c2_eff, expected_batch_size=expected_batch_size)
        return fresh().compose(event).epsilon(target)

    if steps * residual <= 2.0 * expected_batch_size * clip2:  # no truncation needed (K = T)
        return split(steps, delta)
    guess = 0.0
    for _ in range(20):
        tail = 0.5 * delta * math.exp(-guess)
        k_max = truncation_count(steps, q, tail)
        eps = split(k_max, 0.5 * delta)
        if eps < 700.0 and math.exp(eps) * stats.binom.sf(k_max, steps, q) <= 0.5 * delta:
            return eps
        guess = eps
    return math.inf  # not certified: never report it


def bounded_dicesgd_epsilon(noise_multiplier, sampling_prob, steps, delta, *, clip1, clip2, gradient_bound,
                            expected_batch_size, accountant="pld") -> float:
    """dpkit's ε(δ) for T DiceSGD steps with the enforced bound G: min(participation, split+truncation).

    Args:
        noise_multiplier: σ ≥ 0. sampling_prob: q in (0, 1]. steps: T ≥ 1. delta: δ in (0, 1).
        clip1, clip2, gradient_bound, expected_batch_size: C1, C2 (mean units), G ≥ C1, B̄.
        accountant: name or Accountant for the split bound's numerical composition.

    Returns:
        ε ≥ 0 (``inf`` when σ = 0).

    Raises:
        ValueError, TypeError: an argument out of range, named.
    """
    sigma = V.non_negative("noise_multiplier", noise_multiplier)
    delta = V.delta("delta", delta)
    q, steps, c1, c2, g, b = _run_settings(sampling_prob, steps, clip1, clip2, gradient_bound,
                                           expected_batch_size)
    if sigma == 0.0:
        return math.inf
    kw = dict(clip1=c1, clip2=c2, gradient_bound=g, expected_batch_size=b)
    if c2 == 0.0 or g == c1:  # DP-SGD exactly; the split account is its own
        return _split_epsilon(delta, sigma, q, steps, accountant=accountant, **kw)
    eps_count = _participation_epsilon(delta, sigma, q, steps, **kw)
    # the split's feedback part alone (T un-amplified Gaussians, K ≥ the δ/2 truncation count) bounds
    # the split's ε from below: skip the slow numerical composition when it cannot win
    from dpkit.optim.error_feedback import default_noise_split

    sens = min(2.0 * b * c2, truncation_count(steps, q, 0.5 * delta) * (g - c1))
    f = default_noise_split(q, clip1=c1, clip2=sens / (2.0 * b), expected_batch_size=b)
    mu_b = math.sqrt(steps) * sens / (sigma * c1 * math.sqrt(1.0 - f))
    if _gaussian_epsilon(mu_b, delta) >= eps_count:
        return eps_count
    return min(eps_count, _split_epsilon(delta, sigma, q, steps, accountant=accountant, **kw))


def _gaussian_epsilon(mu, delta) -> float:
    """Smallest ε with δ_G(μ, ε) ≤ δ (bisection; δ_G decreases in ε)."""
    lo, hi = 0.0, 1.0
    while gaussian_dp_delta(mu, hi) > delta:
        lo, hi = hi, 2.0 * hi
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if gaussian_dp_delta(mu, mid) <= delta else (mid, hi)
    return hi


def calibrate_bounded_dicesgd_noise(target_epsilon, target_delta, sampling_prob, steps, *, clip1, clip2,
                                    gradient_bound, expected_batch_size, accountant="pld",
                                    max_noise_multiplier=1e4, rtol=1e-3) -> float:
    """The smallest σ (within ``rtol``, checked feasible) with :func:`bounded_dicesgd_epsilon` ≤ target.

    Raises:
        CalibrationError: unreachable with σ ≤ ``max_noise_multiplier``.
        ValueError, TypeError: invalid arguments, named.
    """
    target_epsilon, target_delta, max_sigma, rtol = search_targets(target_epsilon, target_delta,
                                                                   max_noise_multiplier, rtol)
    kw = dict(clip1=clip1, clip2=clip2, gradient_bound=gradient_bound, expected_batch_size=expected_batch_size,
              accountant=accountant)
    # validate every argument eagerly (cheap: the participation bound at one ε)
    participation_delta(1.0, 1.0, sampling_prob, steps, clip1=clip1, clip2=clip2, gradient_bound=gradient_bound,
                        expected_batch_size=expected_batch_size)

    def feasible(sigma):
        return bounded_dicesgd_epsilon(sigma, sampling_prob, steps, target_delta, **kw) <= target_epsilon

    def unreachable():
        return CalibrationError(
            f"target_epsilon={target_epsilon} at target_delta={target_delta} is not reachable by DiceSGD "
            f"with gradient_bound={gradient_bound} and noise_multiplier <= {max_sigma}; lower "
            "gradient_bound towards max_grad_norm, lower clip2 or steps, or raise the target")

    return smallest_feasible(feasible, start=1.0, lower=1e-2, upper=max_sigma, rtol=rtol,
                             unreachable=unreachable)


class BoundedDiceSGDAccountant(Accountant):
    """The ledger of a DiceSGD run with an enforced gradient bound (add/remove neighbours only).

    Each step is recorded as ``ComposedDpEvent([dpsgd_event(σ, q)])`` (or the bare DP-SGD event): a
    record of the rate and noise, NOT its privacy. ``epsilon``/``delta`` apply the module theorem and the
    truncated split bound to the whole run of T steps with the configured C1, C2, G, B̄. Only one
    (q, σ) per run (the theorem is for a constant σ and rate).

    Args:
        clip1, clip2, gradient_bound, expected_batch_size: C1, C2 (mean units), G ≥ C1, B̄.
        split_accountant: accountant name for the split bound (``"pld"`` default, or ``"rdp"``).
        neighboring_relation: must be ``"add_remove"``.
    """

    name = "dicesgd_bounded"

    def __init__(self, *, clip1, clip2, gradient_bound, expected_batch_size, split_accountant="pld",
                 neighboring_relation="add_remove"):
        super().__init__(neighboring_relation=neighboring_relation)
        self.clip1 = V.positive("clip1", clip1)
        self.clip2 = V.non_negative("clip2", clip2)
        self.gradient_bound = validate_gradient_bound(gradient_bound, self.clip1)
        self.expected_batch_size = V.positive("expected_batch_size", expected_batch_size)
        self.split_accountant = V.one_of("split_accountant", split_accountant, ("pld", "rdp", "prv"))

    def _config(self) -> dict:
        return {"clip1": self.clip1, "clip2": self.clip2, "gradient_bound": self.gradient_bound,
                "expected_batch_size": self.expected_batch_size, "split_accountant": self.split_accountant}

    @staticmethod
    def _rate_and_sigma(event):
        if isinstance(event, _dpe.ComposedDpEvent) and len(event.events) == 1:
            event = event.events[0]
        if isinstance(event, _dpe.PoissonSampledDpEvent) and isinstance(event.event, _dpe.GaussianDpEvent):
            return event.sampling_probability, event.event.noise_multiplier
        if isinstance(event, _dpe.GaussianDpEvent):
            return 1.0, event.noise_multiplier
        if isinstance(event, _dpe.NonPrivateDpEvent):  # dpsgd_event(0, q): ε = ∞
            return 1.0, 0.0
        return None

    def _backend_supports(self, event) -> str | None:
        if self.neighboring_relation.name != "ADD_OR_REMOVE_ONE":
            return "the enforced-bound DiceSGD theorem is proved for add/remove neighbours only"
        if self._rate_and_sigma(event) is None:
            return "it records DiceSGD steps as dpsgd_event(sigma, q) (one Poisson-sampled Gaussian per step)"
        return None

    def compose(self, event, count=1):
        if self._ledger and event != self._ledger[-1][0] and self._rate_and_sigma(event) is not None:
            raise ValueError("a BoundedDiceSGDAccountant run has one (q, sigma); got a second step event "
                             f"{event!r} after {self._ledger[-1][0]!r}")
        return super().compose(event, count)

    def _run(self):
        (event, steps), = self._ledger
        q, sigma = self._rate_and_sigma(event)
        return dict(noise_multiplier=sigma, sampling_prob=q, steps=steps, clip1=self.clip1, clip2=self.clip2,
                    gradient_bound=self.gradient_bound, expected_batch_size=self.expected_batch_size)

    def _epsilon_from_ledger(self, delta):
        return bounded_dicesgd_epsilon(delta=delta, accountant=self.split_accountant, **self._run())

    def _delta_from_ledger(self, epsilon):
        # the participation bound alone (the split bound's δ is defined through its ε search)
        run = self._run()
        if run["noise_multiplier"] == 0.0:
            return 1.0
        return participation_delta(epsilon, **run)
