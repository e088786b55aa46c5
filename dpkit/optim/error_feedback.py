"""Error-feedback DP-SGD (DiceSGD) on top of :class:`~dpkit.optim.DPOptimizer`.

Zhang, Bu, Wu, Hong, "Differentially Private SGD Without Clipping Bias: An Error-Feedback
Approach", ICLR 2024 (arXiv 2311.14632), Algorithm 1 (DiceSGD). With per-example threshold C1
(the engine's clip norm), error threshold C2, public expected batch size B̄ and e_0 = 0::

    v_t     = (1/B̄) Σ_i clip(g_i, C1) + clip(e_t, C2)
    x_{t+1} = x_t − η (v_t + w_t),             w_t ~ N(0, (σ C1 / B̄)² I)
    e_{t+1} = e_t − clip(e_t, C2) + (1/B̄) Σ_i (g_i − clip(g_i, C1))

i.e. e_{t+1} = e_t + (1/B̄)Σ g_i − v_t, the paper's update (the state keeps exactly what the
released direction has not yet delivered; the reference code's update differs when ‖e‖ is large).
The state e is in MEAN units, like the paper's; inside dpkit the contribution added to the clipped
SUM is B̄·clip(e_t, C2). The base optimizer consumes v_t + w_t, so any torch optimizer works.

Privacy (what dpkit accounts, and why it is not the paper's calibration)
------------------------------------------------------------------------
The hidden state carries the UNCLIPPED residual g − clip(g, C1) of every example, which has no
bound. Once an example has been sampled, the released feedback clip(e_t, C2) of EVERY later step
may differ between neighbouring datasets by up to 2·C2 (mean units), i.e. 2·B̄·C2 on the sum,
whether or not the example is sampled again — so that part gets no amplification by sampling. An
example with a huge gradient realises this: it shifts the next ‖residual‖/(B̄·C2) outputs by
≈ B̄·C2 each. dpkit therefore accounts each step as the composition of

* A: the Poisson-subsampled Gaussian on Σ clip(g_i, C1) (sensitivity C1, noise std s_A), and
* B: a Gaussian on the feedback (sensitivity 2·B̄·C2, noise std s_B, no subsampling),

with s_A² + s_B² = (σ C1)², the noise that is actually added once. Validity: split the added
noise into two independent parts and release A_t = Σ clip + N(0, s_A²) and B_t = B̄ clip(e_t) +
N(0, s_B²) separately (the real output A_t + B_t is post-processing). Given the other examples'
(hidden) sampling coins — a mixture common to both datasets, handled by joint convexity of the
hockey-stick divergence — and the released history, A_t is exactly the subsampled Gaussian with a
fresh coin, and B_t is a mixture of Gaussians whose centres all lie within 2·B̄·C2 of the
neighbour's centre, hence dominated by the Gaussian pair of that sensitivity (joint convexity
again); A_t and B_t are conditionally independent, and adaptive composition of dominating pairs
(Dong, Roth, Su 2019, Thm. 3.2) gives the bound. Any fixed split is valid; the default split
minimises the Gaussian-DP (CLT) approximation μ² ≈ T(q² C1²/s_A² + 4 B̄² C2²/s_B²), i.e.
s_A² : s_B² = q C1 : 2 B̄ C2.

Consequences: C2 = 0 is exactly DP-SGD (the event is ``dpsgd_event``); for C2 > 0 the ε is
strictly larger than DP-SGD's at the same σ and C1; and C2 must be small compared with C1/B̄ for
the cost to stay moderate. The paper gives an algorithm-specific Rényi-DP analysis with a noise only
slightly larger than DP-SGD's; we could not retrieve its exact statement nor reproduce such a
calibration for arbitrary data (it needs a bound on the per-example gradients), so without one dpkit
uses the worst-case bound above. See docs/dicesgd_dpsgdf.md.

Enforced gradient bound (``gradient_bound=G``): every per-example gradient is clipped at G ≥ C1
BEFORE the C1 clip, so the residual fed to e is clip(g, G) − clip(g, C1), of norm ≤ G − C1 by
construction (formed from the engine's own C1 factors: min(1, G/‖g‖) = min(1, (G/C1)·min(1, C1/‖g‖))).
The run is then accounted by :mod:`dpkit.optim.dicesgd_bounded` (a proved participation-count
bound: the feedback costs at most k(G − C1) in total over a run in which the example is sampled
k times), orders of magnitude below the bound above unless G − C1 is large.
"""

from __future__ import annotations

import math

import torch
from dp_accounting import dp_event as _dpe

from dpkit import _validate as V
from dpkit.accountants._search import search_targets, smallest_feasible
from dpkit.accountants.calibration import accountant_factory
from dpkit.errors import CalibrationError
from dpkit.mechanisms.noise import GaussianNoise
from dpkit.optim.dp_optimizer import DPOptimizer

__all__ = ["ErrorFeedback", "attach_error_feedback", "dicesgd_event", "default_noise_split",
           "calibrate_dicesgd_noise"]

_CONFIG_KEYS = ("clip2", "noise_split", "calibration", "gradient_bound")


def default_noise_split(sampling_prob, *, clip1, clip2, expected_batch_size) -> float:
    """Fraction f of the noise VARIANCE attributed to the clipped gradients (the rest covers the feedback).

    Minimises the Gaussian-DP approximation q²C1²/(f s²) + (2B̄C2)²/((1−f) s²) of the per-step
    cost: f = q·C1 / (q·C1 + 2·B̄·C2). Only a heuristic choice; every f in (0, 1] gives a valid
    account (see the module docstring).

    Args:
        sampling_prob: Poisson rate q in (0, 1].
        clip1: per-example clip norm C1 > 0.
        clip2: error threshold C2 ≥ 0 (mean units).
        expected_batch_size: B̄ > 0.

    Returns:
        f in (0, 1] (1 when C2 = 0).

    Raises:
        ValueError, TypeError: an argument out of range, named.
    """
    q = V.probability("sampling_prob", sampling_prob)
    c1 = V.positive("clip1", clip1)
    c2 = V.non_negative("clip2", clip2)
    b = V.positive("expected_batch_size", expected_batch_size)
    return q * c1 / (q * c1 + 2.0 * b * c2)


def dicesgd_event(noise_multiplier, sampling_prob, steps=1, *, clip1, clip2, expected_batch_size,
                  noise_split=None) -> _dpe.DpEvent:
    """The DP event of ``steps`` DiceSGD steps (a valid upper bound; see the module docstring).

    Each step is ``ComposedDpEvent([PoissonSampled(q, Gaussian(σ√f)), Gaussian(σ C1 √(1−f) / (2 B̄ C2))])``:
    the clipped-gradient part with noise multiplier σ√f (sensitivity C1) and the feedback part
    with sensitivity 2·B̄·C2, both carved out of the single noise N(0, (σC1)²) on the sum.
    Zhang et al. ICLR 2024, Algorithm 1; accounting per dpkit's Gaussian-split argument.

    Args:
        noise_multiplier: σ ≥ 0, the std of the added noise divided by C1 (as in DP-SGD).
        sampling_prob: Poisson rate q in (0, 1].
        steps: T ≥ 1.
        clip1: per-example clip norm C1 > 0.
        clip2: error threshold C2 ≥ 0 in mean units; 0 gives exactly ``dpsgd_event``.
        expected_batch_size: the public normaliser B̄ > 0.
        noise_split: f in (0, 1) (fraction of the noise variance for the gradient part), or None
            for :func:`default_noise_split`.

    Returns:
        A ``dp_accounting`` DpEvent (``NonPrivateDpEvent`` steps when σ = 0).

    Raises:
        ValueError, TypeError: an argument out of range or of the wrong kind, named.
    """
    sigma = V.non_negative("noise_multiplier", noise_multiplier)
    q = V.probability("sampling_prob", sampling_prob)
    steps = V.positive_int("steps", steps)
    c1 = V.positive("clip1", clip1)
    c2 = V.non_negative("clip2", clip2)
    b = V.positive("expected_batch_size", expected_batch_size)
    if noise_split is not None:
        noise_split = V.probability("noise_split", noise_split, allow_one=False)
    if c2 == 0.0:
        from dpkit.accountants import dpsgd_event

        return dpsgd_event(sigma, q, steps)
    if sigma == 0.0:
        step = _dpe.NonPrivateDpEvent()
    else:
        f = default_noise_split(q, clip1=c1, clip2=c2, expected_batch_size=b) if noise_split is None \
            else noise_split
        sigma_a = sigma * math.sqrt(f)
        sigma_b = sigma * c1 * math.sqrt(1.0 - f) / (2.0 * b * c2)
        grad_part = _dpe.GaussianDpEvent(sigma_a) if q == 1.0 else \
            _dpe.PoissonSampledDpEvent(q, _dpe.GaussianDpEvent(sigma_a))
        step = _dpe.ComposedDpEvent([grad_part, _dpe.GaussianDpEvent(sigma_b)])
    return step if steps == 1 else _dpe.SelfComposedDpEvent(step, steps)


def calibrate_dicesgd_noise(target_epsilon, target_delta, sampling_prob, steps, *, clip1, clip2,
                            expected_batch_size, noise_split=None, accountant="pld",
                            max_noise_multiplier=1e4, rtol=1e-3) -> float:
    """The smallest σ (within ``rtol``) whose DiceSGD account stays ≤ ``target_epsilon``.

    Same contract as :func:`dpkit.accountants.calibrate_noise_multiplier` (never overshoots,
    always ends), for :func:`dicesgd_event` with a fixed noise split (ε decreases in σ).

    Args:
        target_epsilon: ε > 0. target_delta: δ in (0, 1).
        sampling_prob, steps, clip1, clip2, expected_batch_size, noise_split: as in
            :func:`dicesgd_event`.
        accountant: registered name or an Accountant (its configuration is reused).
        max_noise_multiplier: the largest σ searched. rtol: final relative bracket width.

    Returns:
        σ (float).

    Raises:
        CalibrationError: unreachable with σ ≤ ``max_noise_multiplier``.
        ValueError, TypeError: invalid arguments, named.
    """
    target_epsilon, target_delta, max_sigma, rtol = search_targets(target_epsilon, target_delta,
                                                                   max_noise_multiplier, rtol)
    # validate the event arguments once, eagerly
    dicesgd_event(1.0, sampling_prob, steps, clip1=clip1, clip2=clip2,
                  expected_batch_size=expected_batch_size, noise_split=noise_split)
    fresh = accountant_factory(accountant)

    def feasible(sigma: float) -> bool:
        event = dicesgd_event(sigma, sampling_prob, steps, clip1=clip1, clip2=clip2,
                              expected_batch_size=expected_batch_size, noise_split=noise_split)
        return fresh().compose(event).epsilon(target_delta) <= target_epsilon

    def unreachable():
        return CalibrationError(
            f"target_epsilon={target_epsilon} at target_delta={target_delta} is not reachable by "
            f"DiceSGD with noise_multiplier <= {max_sigma} (clip2={clip2}): the feedback part is "
            "not amplified by sampling; lower clip2 or steps, or raise the target")

    # the un-amplified feedback part alone needs σ ≥ sigma_b_min; start there so that the numerical
    # accountant is never asked about a near-noiseless Gaussian (slow and pointless)
    start = max(1.0, _feedback_sigma_floor(target_epsilon, target_delta, steps, clip1, clip2,
                                           expected_batch_size, sampling_prob, noise_split))
    return smallest_feasible(feasible, start=start, lower=1e-2, upper=max_sigma, rtol=rtol,
                             unreachable=unreachable)


def _gaussian_delta(mu: float, eps: float) -> float:
    """Exact δ(ε) of the Gaussian mechanism with μ = sensitivity/std (Balle & Wang 2018, Thm. 8)."""
    from scipy.special import ndtr

    return float(ndtr(-eps / mu + mu / 2) - math.exp(eps) * ndtr(-eps / mu - mu / 2))


def _feedback_sigma_floor(eps, delta, steps, clip1, clip2, batch, q, noise_split) -> float:
    """Smallest σ for which the feedback part ALONE (T Gaussians, μ² = T(2B̄C2/s_B)²) meets (ε, δ)."""
    c2 = V.non_negative("clip2", clip2)
    if c2 == 0.0:
        return 0.0
    f = default_noise_split(q, clip1=clip1, clip2=c2, expected_batch_size=batch) if noise_split is None \
        else noise_split
    # μ(σ) = k/σ; find the largest μ with δ(ε) ≤ δ, by bisection (δ increases with μ)
    lo, hi = 1e-6, 1.0
    while _gaussian_delta(hi, eps) <= delta:
        hi *= 2
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _gaussian_delta(mid, eps) <= delta else (lo, mid)
    k = math.sqrt(steps) * 2.0 * batch * c2 / (clip1 * math.sqrt(1.0 - f))
    return k / hi


class ErrorFeedback:
    """The DiceSGD error state of one :class:`DPOptimizer`, fed back through its contribution hook.

    Build it with :func:`attach_error_feedback` (or ``make_private(..., error_feedback={...})``).
    The state ``error`` (mean units, one tensor per parameter) is HIDDEN: it holds unclipped,
    un-noised gradient residuals and is not differentially private. Never release or log it;
    checkpoint it with :meth:`state_dict` only into storage as private as the training data.

    Args:
        optimizer: the DPOptimizer (its engine must track unclipped sums).
        clip2: C2 ≥ 0, threshold of the fed-back error in mean units (Zhang et al. Alg. 1).
        gradient_bound: None, or G ≥ C1: per-example gradients are clipped at G before the C1 clip
            (residuals of norm ≤ G − C1; see :mod:`dpkit.optim.dicesgd_bounded`).

    Raises:
        TypeError, ValueError: see :func:`attach_error_feedback`.
    """

    def __init__(self, optimizer: DPOptimizer, *, clip2: float, gradient_bound=None):
        self.optimizer = optimizer
        self.clip2 = V.non_negative("clip2", clip2)
        if gradient_bound is not None:
            from dpkit.optim.dicesgd_bounded import validate_gradient_bound

            gradient_bound = validate_gradient_bound(gradient_bound, optimizer.engine.max_grad_norm)
        self.gradient_bound = gradient_bound
        if gradient_bound is not None:  # the engine's "unclipped" sum becomes Σ clip(g_i, G)
            optimizer.engine.bound_unclipped(gradient_bound)
        self.error: list[torch.Tensor] | None = None
        # set by attach_error_feedback(calibration="reference"): the reference code's UNVERIFIED claim
        self.reference = None

    def __call__(self, step: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Contribution hook: return B̄·clip(e_t, C2) and advance e to e_{t+1} (paper's update)."""
        engine = self.optimizer.engine
        b = self.optimizer.expected_batch_size
        if self.error is None:  # at least float32: residuals accumulate over many steps
            self.error = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))
                          for p in params]
        if len(self.error) != len(params) or any(e.shape != p.shape for e, p in zip(self.error, params)):
            raise RuntimeError("the optimizer's parameters changed since the error state was created; "
                               "error feedback needs a fixed set of trainable parameters")
        norm = math.sqrt(sum(float(e.double().pow(2).sum()) for e in self.error))
        factor = 0.0 if self.clip2 == 0.0 else min(1.0, self.clip2 / norm) if norm > 0 else 1.0
        feedback = [factor * e for e in self.error]
        for i, p in enumerate(params):
            residual = (engine.unclipped_sum(p) - engine.clipped_sum(p)) / b
            self.error[i] = self.error[i] - feedback[i] + residual.to(self.error[i].dtype)
        return [(b * f).to(p.dtype) for f, p in zip(feedback, params)]

    def state_dict(self) -> dict:
        """The hidden error state (PRIVATE data: see the class docstring), C2 and G."""
        return {"clip2": self.clip2, "gradient_bound": self.gradient_bound,
                "error": None if self.error is None else [e.detach().clone() for e in self.error]}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output; C2 and G must match (a state without G has none)."""
        if not isinstance(state, dict) or "error" not in state or "clip2" not in state:
            raise ValueError("state must be a dict from ErrorFeedback.state_dict()")
        for key in ("clip2", "gradient_bound"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"state was saved with {key}={state.get(key)}; this ErrorFeedback has "
                                 f"{key}={getattr(self, key)}")
        self.error = None if state["error"] is None else [e.clone() for e in state["error"]]


def attach_error_feedback(optimizer, *, clip2, sampling_prob, noise_split=None,
                          calibration="dpkit", gradient_bound=None) -> ErrorFeedback:
    """Turn a fresh Poisson-sampled :class:`DPOptimizer` into DiceSGD and fix its privacy account.

    Registers the feedback as a contribution hook (added to the clipped sum before noise and
    normalisation) and replaces the optimizer's per-step event by :func:`dicesgd_event`, so the
    accountant's ledger describes what runs. If the optimizer's σ was calibrated for a target ε
    (``make_private(target_epsilon=...)``), σ is re-calibrated for DiceSGD over the same planned
    steps with the same accountant, so the target still holds.

    Args:
        optimizer: a DPOptimizer that has not stepped yet, whose engine was built with
            ``track_unclipped=True``, not distributed.
        clip2: C2 ≥ 0 (mean units); 0 reproduces DP-SGD exactly.
        sampling_prob: the Poisson rate q the data loader uses (the one of the optimizer's event).
        noise_split: see :func:`dicesgd_event`.
        calibration: ``"dpkit"`` (default: σ calibrated to dpkit's account) or ``"reference"``:
            σ from the authors' code, :func:`dpkit.optim.dicesgd_reference.reference_dicesgd_calibration`
            (needs a target ε and planned steps; warns; its ε is only CLAIMED by the reference code,
            kept in ``feedback.reference``; ``optimizer.epsilon()`` stays dpkit's account).
        gradient_bound: None (default) or G ≥ C1: clip every per-example gradient at G before
            the C1 clip and account the run with :class:`~dpkit.optim.dicesgd_bounded.
            BoundedDiceSGDAccountant` (replaces the optimizer's accountant; σ re-calibrated by
            :func:`~dpkit.optim.dicesgd_bounded.calibrate_bounded_dicesgd_noise` if a target was
            set). Needs the standard clip function and the "dpkit" calibration.

    Returns:
        The attached :class:`ErrorFeedback`.

    Raises:
        TypeError: ``optimizer`` is not a DPOptimizer.
        ValueError: the engine does not track unclipped sums, the optimizer already stepped, is
            distributed or uses non-i.i.d./lazy noise, or an argument is out of range.
    """
    if not isinstance(optimizer, DPOptimizer):
        raise TypeError(f"optimizer must be a dpkit DPOptimizer; got {type(optimizer).__name__}")
    clip2 = V.non_negative("clip2", clip2)
    q = V.probability("sampling_prob", sampling_prob)
    if noise_split is not None:
        noise_split = V.probability("noise_split", noise_split, allow_one=False)
    if not optimizer.engine.track_unclipped:
        raise ValueError("optimizer.engine must be built with track_unclipped=True for error feedback "
                         "(make_private(..., error_feedback={...}) does this)")
    if optimizer.steps > 0:
        raise ValueError(f"optimizer must not have stepped yet; it ran {optimizer.steps} steps")
    if optimizer.distributed:
        raise ValueError("error feedback does not support distributed=True (the error state would be "
                         "per rank while the noise is global)")
    if not isinstance(optimizer.noise, GaussianNoise) or getattr(optimizer, "_lazy", None) is not None:
        raise ValueError("error feedback is accounted for i.i.d. Gaussian noise on every parameter only; "
                         "got a custom noise mechanism or embedding_noise='lazy'")
    if any(isinstance(h, ErrorFeedback) for h in optimizer._contribution_hooks):
        raise ValueError("optimizer already has error feedback attached")
    kwargs = dict(clip1=optimizer.max_grad_norm, clip2=clip2,
                  expected_batch_size=optimizer.expected_batch_size, noise_split=noise_split)
    calibration = V.one_of("calibration", calibration, ("dpkit", "reference"))
    if gradient_bound is not None:
        return _attach_bounded(optimizer, clip2, q, gradient_bound, noise_split, calibration)
    reference = None
    if calibration == "reference":
        if optimizer.target is None or optimizer.max_steps is None:
            raise ValueError("calibration='reference' needs target_epsilon, target_delta and planned "
                             "steps/epochs (it calibrates sigma for that target)")
        from dpkit.optim.dicesgd_reference import reference_dicesgd_calibration

        reference = reference_dicesgd_calibration(*optimizer.target, q, optimizer.max_steps, clip1=kwargs["clip1"],
                                                  clip2=clip2, expected_batch_size=kwargs["expected_batch_size"])
        sigma = reference.noise_multiplier
    elif optimizer.target is not None and optimizer.max_steps is not None:
        eps, delta = optimizer.target
        accountant = optimizer.accountant if optimizer.accountant is not None else "pld"
        sigma = calibrate_dicesgd_noise(eps, delta, q, optimizer.max_steps, accountant=accountant, **kwargs)
    else:
        sigma = optimizer.noise_multiplier
    feedback = ErrorFeedback(optimizer, clip2=clip2)
    feedback.reference = reference
    optimizer._recalibrate(sigma, dicesgd_event(sigma, q, 1, **kwargs))
    if optimizer.accountant is not None and not optimizer.accountant.supports(optimizer.step_event):
        raise ValueError(f"accountant {optimizer.accountant.name!r} cannot account DiceSGD steps; "
                         "use 'pld', 'rdp' or 'prv'")
    optimizer.register_contribution_hook(feedback)
    return feedback


def configure_error_feedback(optimizer, config, *, sampling_prob, poisson_sampling=True) -> ErrorFeedback:
    """Validate ``make_private``'s ``error_feedback`` dict and attach it (internal helper).

    Args:
        optimizer: the DPOptimizer built by ``make_private``.
        config: ``{"clip2": C2, "noise_split": f (optional), "calibration": "dpkit" | "reference"
            (optional)}``.
        sampling_prob: the Poisson rate. poisson_sampling: must be True.

    Returns:
        The attached :class:`ErrorFeedback`.

    Raises:
        TypeError: ``config`` is not a dict. ValueError: unknown/missing keys, fixed-size sampling.
    """
    if not isinstance(config, dict):
        raise TypeError(f"error_feedback must be a dict like {{'clip2': 0.01}} or None; got {config!r}")
    unknown = sorted(set(config) - set(_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"error_feedback keys must be among {list(_CONFIG_KEYS)}; got unknown {unknown}")
    if "clip2" not in config:
        raise ValueError("error_feedback must give 'clip2' (the error threshold C2); got "
                         f"{sorted(config)}")
    if not poisson_sampling:
        raise ValueError("error_feedback is accounted for Poisson sampling only; "
                         "use poisson_sampling=True")
    return attach_error_feedback(optimizer, clip2=config["clip2"], sampling_prob=sampling_prob,
                                 noise_split=config.get("noise_split"),
                                 calibration=config.get("calibration", "dpkit"),
                                 gradient_bound=config.get("gradient_bound"))


def _attach_bounded(optimizer, clip2, q, gradient_bound, noise_split, calibration) -> ErrorFeedback:
    """attach_error_feedback(gradient_bound=G): second clip, bounded accountant, calibration."""
    from dpkit.accountants import dpsgd_event
    from dpkit.optim.dicesgd_bounded import (BoundedDiceSGDAccountant, calibrate_bounded_dicesgd_noise,
                                             validate_gradient_bound)

    engine = optimizer.engine
    g = validate_gradient_bound(gradient_bound, engine.max_grad_norm)
    if calibration != "dpkit" or noise_split is not None:
        raise ValueError("gradient_bound is accounted by dpkit's bounded DiceSGD theorem only; drop "
                         "calibration='reference' and noise_split")
    if engine.clip_function != "standard":
        raise ValueError("gradient_bound needs clip_function='standard' (the residual clip(g, G) - clip(g, C1) "
                         f"is bounded by G - C1 for projections only); got {engine.clip_function!r}")
    split = "pld"
    if optimizer.accountant is not None:
        split = optimizer.accountant.name
        if split not in ("pld", "rdp", "prv"):
            raise ValueError(f"gradient_bound composes its split bound with 'pld', 'rdp' or 'prv'; the "
                             f"optimizer's accountant is {split!r}")
    kw = dict(clip1=optimizer.max_grad_norm, clip2=clip2, gradient_bound=g,
              expected_batch_size=optimizer.expected_batch_size)
    bounded = None
    if optimizer.accountant is not None:
        bounded = BoundedDiceSGDAccountant(split_accountant=split, neighboring_relation=
                                           optimizer.accountant.neighboring_relation, **kw)
        if not bounded.supports(dpsgd_event(1.0, q, 1)):
            raise ValueError("gradient_bound is accounted under add/remove neighbours only; build the "
                             "optimizer with an add_remove accountant")
    if optimizer.target is not None and optimizer.max_steps is not None:
        sigma = calibrate_bounded_dicesgd_noise(*optimizer.target, q, optimizer.max_steps, accountant=split, **kw)
    else:
        sigma = optimizer.noise_multiplier
    # every check passed: only now touch the optimizer and its engine
    feedback = ErrorFeedback(optimizer, clip2=clip2, gradient_bound=g)
    # the step event records (q, σ) (wrapped, so the optimizer does not mistake the run for plain DP-SGD,
    # e.g. when batches are accumulated); the bounded accountant turns the run into ε (module theorem)
    optimizer._recalibrate(sigma, _dpe.ComposedDpEvent([dpsgd_event(sigma, q, 1)]))
    if bounded is not None:
        optimizer.accountant = bounded
    optimizer.register_contribution_hook(feedback)
    return feedback
