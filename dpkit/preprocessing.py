"""Private feature preprocessing for linear models (DPSGD-F).

Sun, Suresh, Menon, "The importance of feature preprocessing for differentially private linear
optimization", ICLR 2024 (arXiv 2307.11106). DP-SGD's optimality gap on linear models can scale
with the largest feature norm max‖x‖; DPSGD-F spends part of the budget on private
preprocessing — a private mean, centering, a private norm bound — and trains DP-SGD on the
centred, rescaled features, so the gap scales with the feature DIAMETER max‖x − x'‖.

dpkit's pipeline (each release is a Gaussian mechanism; add/remove adjacency). Means divide by a
DECLARED, public dataset size N (``dataset_size``), never by the realised count n: under
add/remove adjacency n itself changes, and (S + Z)/n moves by up to 2R/n when one record of norm R
is added (the record AND the changed divisor), twice the sensitivity R/N of (S + Z)/N that a
Gaussian with noise multiplier σ assumes. With the constant N each mean stage is exactly the
Gaussian mechanism on the clipped sum S (sensitivity = the clip bound) followed by a public
rescaling. The label set of a classifier is public too (declared ``classes``; see
:func:`dpsgdf_train`).

1. coarse centre   c0 = (Σ clip(x_i, R) + N(0, (σ1 R)² I)) / N     (R: public bound on ‖x‖)
2. radius          r  = private upper quantile of ‖x_i − c0‖ from a Gaussian histogram over a
                        geometric grid (one example moves one count: sensitivity 1)
3. fine mean       μ̂  = c0 + (Σ clip(x_i − c0, r) + N(0, (σ3 r)² I)) / N
4. norm bound      ρ  = private upper quantile of ‖x_i − μ̂‖ (histogram as in 2)
5. DP-SGD          on x̃_i = clip(x_i − μ̂, ρ) / ρ  (a public per-example map), with a bias term.

If ``dataset_size`` differs from the actual number of rows the estimate is biased (sums divided
by N ≠ n) but still private: the privacy guarantee never depends on N being right.

Steps 1–3 form :func:`private_mean`: if no point is clipped in step 3 and N = n, μ̂ − mean is
exactly N(0, (σ3 r / N)² I), and r ≲ √2 (diameter + ‖c0 − mean‖) — an error governed by the diameter,
with the max-norm bound R entering only through the coarse centre (the two-stage structure of the
paper's mean estimator; its exact sub-algorithms were not available to us, these are standard
Gaussian/histogram mechanisms with the same role). All events go into ONE dpkit accountant with
the DP-SGD steps; ``preprocessing_fraction`` of the target ε is given to steps 1–4 (the four
Gaussians compose exactly into one Gaussian, μ² = Σ μ_j²), the rest calibrates DP-SGD's σ so
that the composed total meets the target.
"""

from __future__ import annotations

import math
import secrets
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from dpkit import _validate as V
from dpkit.accountants import dpsgd_event, gaussian_event, make_accountant
from dpkit.errors import CalibrationError, SeededRandomnessWarning

__all__ = ["PrivateMean", "private_mean", "private_norm_bound", "FeaturePreprocessor",
           "DPSGDFResult", "dpsgdf_train", "DPSGDFClassifier", "DEFAULT_PREPROCESSING_FRACTION"]

DEFAULT_PREPROCESSING_FRACTION = 0.2
# shares of the preprocessing Gaussian budget μ² for: coarse centre, radius, fine mean, norm bound
_STAGE_WEIGHTS = (0.4, 0.1, 0.4, 0.1)
_GRID_SIZE = 48            # geometric grid with ratio √2: 2R down to 2R·2^-23.5
_QUANTILE_SLACK = 3.0      # noisy count above the chosen radius ≤ slack · (its noise std)


def _as_features(name: str, x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a numpy array or torch tensor; got {type(x).__name__}")
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} must be a 2-d array (n ≥ 1 examples × d ≥ 1 features); got shape {tuple(x.shape)}")
    x = x.to("cpu", torch.float64)  # small linear-model data: the noise and statistics are on CPU
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} must contain only finite values")
    return x


def _check_generator(generator) -> torch.Generator:
    """The caller's generator, or a fresh one seeded from OS entropy (never torch's global RNG,
    which scripts commonly seed with a constant)."""
    if generator is None:
        return torch.Generator().manual_seed(secrets.randbits(63))
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    return generator


def _check_dataset_size(dataset_size) -> int:
    return V.positive_int("dataset_size", dataset_size)


def _noisy_mean(v: torch.Tensor, bound: float, noise_multiplier: float, dataset_size: int, generator):
    """(Σ clip(v_i, bound) + N(0, (σ·bound)² I)) / N: the Gaussian mechanism on a sum of
    sensitivity ``bound`` (add/remove one row), rescaled by the PUBLIC N."""
    total = _clip_rows(v, bound).sum(0) + _noise((v.shape[1],), noise_multiplier * bound, generator)
    return total / dataset_size


def _noise(shape, std, generator) -> torch.Tensor:
    return std * torch.randn(shape, dtype=torch.float64, generator=generator)


def _clip_rows(v: torch.Tensor, bound: float) -> torch.Tensor:
    norms = v.norm(dim=1, keepdim=True)
    return v * torch.clamp(bound / norms.clamp(min=1e-300), max=1.0)


def _private_radius(distances: torch.Tensor, top: float, noise_multiplier: float, generator) -> float:
    """Smallest grid edge whose noisy count of larger distances is within noise of zero.

    Gaussian histogram (std ``noise_multiplier`` per count; one example changes one count by 1)
    over edges top·2^{-k/2}, k = 0..K−1, plus an overflow bin above ``top``; post-processing
    picks the smallest edge r_k with Σ_{bins above r_k} noisy counts ≤ slack·σ·√(#bins above).
    """
    edges = top * 2.0 ** (-0.5 * torch.arange(_GRID_SIZE - 1, -1, -1, dtype=torch.float64))  # ascending
    # bin j < K holds distances in (edges[j-1], edges[j]]; bin K is the overflow (> top)
    idx = torch.bucketize(distances, edges, right=False)
    counts = torch.bincount(idx, minlength=_GRID_SIZE + 1).to(torch.float64)
    noisy = counts + _noise(counts.shape, noise_multiplier, generator)
    above = torch.flip(torch.cumsum(torch.flip(noisy, [0]), 0), [0])  # above[j] = Σ_{i ≥ j} noisy[i]
    for k in range(_GRID_SIZE):  # edge k: the bins above it are k+1..K
        m = _GRID_SIZE - k
        if above[k + 1] <= _QUANTILE_SLACK * noise_multiplier * math.sqrt(m):
            return float(edges[k])
    return float(top)


@dataclass
class PrivateMean:
    """Output of :func:`private_mean` (all fields are DP releases).

    Attributes:
        mean: the private mean μ̂ (float64 tensor, shape (d,)).
        radius: r, the private radius around ``center`` used to clip in the fine stage.
        center: c0, the coarse private centre.
        events: the three ``dp_accounting`` GaussianDpEvents (coarse, radius, fine).
        fine_noise_multiplier: σ3, so that the fine-stage noise on μ̂ has std σ3·r/N per coordinate.
        dataset_size: the public N that the sums were divided by.
    """

    mean: torch.Tensor
    radius: float
    center: torch.Tensor
    events: list = field(default_factory=list)
    fine_noise_multiplier: float = 0.0
    dataset_size: int = 0


def _stage_sigmas(noise_multiplier: float, weights) -> list[float]:
    # a Gaussian with μ = 1/σ split into parts with μ_j² = w_j μ²  (Σ w_j = 1 ⇒ exact composition)
    return [noise_multiplier / math.sqrt(w) for w in weights]


def private_mean(x, *, norm_bound, noise_multiplier, dataset_size, generator=None,
                 weights=_STAGE_WEIGHTS[:3]) -> PrivateMean:
    """Private mean whose error scales with the data's diameter (two-stage, Gaussian mechanisms).

    Coarse centre from features clipped at the public ``norm_bound`` R, a private radius r of the
    data around it, then the mean of the features clipped to the ball B(c0, r) (module docstring,
    steps 1–3; the structure of DPSGD-F's mean estimation, Sun et al. ICLR 2024, Sec. 4).
    Error: if no point lies farther than r from c0 and N = n, μ̂ − mean(x) ~ N(0, (σ3 r / N)² I)
    exactly.

    Args:
        x: (n, d) features (numpy or torch).
        norm_bound: public R > 0, an a-priori bound on ‖x_i‖ (larger norms are clipped in stage 1).
        noise_multiplier: σ > 0 of the WHOLE estimator: its three Gaussian releases compose to
            exactly one Gaussian mechanism with noise multiplier σ (μ = 1/σ) under add/remove
            adjacency — because the sums are divided by the public ``dataset_size``.
        dataset_size: public N ≥ 1, the declared number of records (not measured on ``x``: the
            realised n differs between neighbouring datasets).
        generator: ``torch.Generator`` for the noise (None: a fresh OS-entropy generator).
        weights: shares of μ² for (coarse, radius, fine); positive, normalised internally.

    Returns:
        :class:`PrivateMean`.

    Raises:
        ValueError, TypeError: bad arguments, named.
    """
    x = _as_features("x", x)
    R = V.positive("norm_bound", norm_bound)
    sigma = V.positive("noise_multiplier", noise_multiplier)
    N = _check_dataset_size(dataset_size)
    generator = _check_generator(generator)
    w = _weights(weights, 3)
    s1, s2, s3 = _stage_sigmas(sigma, w)
    c0 = _noisy_mean(x, R, s1, N, generator)
    r = _private_radius((x - c0).norm(dim=1), 2.0 * R, s2, generator)
    mu = c0 + _noisy_mean(x - c0, r, s3, N, generator)
    return PrivateMean(mean=mu, radius=r, center=c0,
                       events=[gaussian_event(s1), gaussian_event(s2), gaussian_event(s3)],
                       fine_noise_multiplier=s3, dataset_size=N)


def _weights(weights, k) -> list[float]:
    if not isinstance(weights, (tuple, list)) or len(weights) != k:
        raise ValueError(f"weights must be a sequence of {k} positive numbers; got {weights!r}")
    w = [V.positive(f"weights[{i}]", v) for i, v in enumerate(weights)]
    total = sum(w)
    return [v / total for v in w]


def private_norm_bound(x, center, *, norm_bound, noise_multiplier, generator=None):
    """Private upper quantile of ‖x_i − center‖ (Gaussian histogram on a geometric grid).

    Args:
        x: (n, d) features. center: (d,) public (already private) centre, e.g. ``private_mean().mean``.
        norm_bound: public R > 0; the grid spans 2R·2^{-23.5} … 2R (+ overflow), so pass the bound
            of the distances (R + ‖center‖ is always enough).
        noise_multiplier: σ > 0 of the histogram (count sensitivity 1).
        generator: ``torch.Generator`` or None (a fresh OS-entropy generator).

    Returns:
        ``(bound, event)``: the radius ρ (float) and its ``GaussianDpEvent``.

    Raises:
        ValueError, TypeError: bad arguments, named.
    """
    x = _as_features("x", x)
    center = torch.as_tensor(center, dtype=torch.float64)
    if center.shape != (x.shape[1],):
        raise ValueError(f"center must have shape ({x.shape[1]},); got {tuple(center.shape)}")
    R = V.positive("norm_bound", norm_bound)
    sigma = V.positive("noise_multiplier", noise_multiplier)
    generator = _check_generator(generator)
    return _private_radius((x - center).norm(dim=1), 2.0 * R, sigma, generator), gaussian_event(sigma)


class FeaturePreprocessor:
    """DPSGD-F's private centring and scaling: x ↦ clip(x − μ̂, ρ) / ρ.

    Args:
        norm_bound: public bound R on ‖x‖.
        noise_multiplier: σ of the whole preprocessing (four Gaussians composing to one with
            μ = 1/σ; split by ``weights`` = shares of μ² for coarse, radius, fine mean, norm bound).
        dataset_size: public N, the declared number of records (see :func:`private_mean`).
        generator: ``torch.Generator`` or None (a fresh OS-entropy generator per fit).

    Attributes (after :meth:`fit`): ``mean_``, ``scale_`` (ρ), ``mean_result_``, ``events_``.

    Raises:
        ValueError, TypeError: bad arguments, named.
    """

    def __init__(self, *, norm_bound, noise_multiplier, dataset_size, generator=None, weights=_STAGE_WEIGHTS):
        self.norm_bound = V.positive("norm_bound", norm_bound)
        self.noise_multiplier = V.positive("noise_multiplier", noise_multiplier)
        self.dataset_size = _check_dataset_size(dataset_size)
        if generator is not None:
            _check_generator(generator)
        self.generator = generator
        self.weights = _weights(weights, 4)

    def fit(self, x) -> "FeaturePreprocessor":
        """Privately estimate the mean and the norm bound of the centred features."""
        x = _as_features("x", x)
        generator = _check_generator(self.generator)
        s = _stage_sigmas(self.noise_multiplier, self.weights)
        # re-express the first three stages as one estimator with its own σ and weights
        w3 = self.weights[:3]
        sigma3 = self.noise_multiplier / math.sqrt(sum(w3))
        self.mean_result_ = private_mean(x, norm_bound=self.norm_bound, noise_multiplier=sigma3,
                                         dataset_size=self.dataset_size, generator=generator,
                                         weights=tuple(w3))
        self.mean_ = self.mean_result_.mean
        bound = self.norm_bound + float(self.mean_.norm())  # ‖x − μ̂‖ ≤ ‖x‖ + ‖μ̂‖ for ‖x‖ ≤ R
        self.scale_, event = private_norm_bound(x, self.mean_, norm_bound=bound, noise_multiplier=s[3],
                                                generator=generator)
        self.events_ = self.mean_result_.events + [event]
        return self

    def transform(self, x) -> torch.Tensor:
        """clip(x − μ̂, ρ) / ρ (float64); a public map once fitted."""
        if not hasattr(self, "mean_"):
            raise RuntimeError("FeaturePreprocessor is not fitted; call fit(x) first")
        x = _as_features("x", x)
        return _clip_rows(x - self.mean_, self.scale_) / self.scale_


def _gaussian_mu(epsilon: float, delta: float) -> float:
    """Largest μ with the Gaussian mechanism (ε, δ)-DP (Balle & Wang 2018, Thm. 8, by bisection)."""
    from scipy.special import ndtr

    def delta_of(mu):
        return float(ndtr(-epsilon / mu + mu / 2) - math.exp(epsilon) * ndtr(-epsilon / mu - mu / 2))

    lo, hi = 1e-8, 1.0
    while delta_of(hi) <= delta:
        hi *= 2
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if delta_of(mid) <= delta else (lo, mid)
    return lo


def _calibrate_total(pre_events, target_epsilon, delta, q, steps, accountant, rtol=1e-3) -> float:
    """Smallest DP-SGD σ (within rtol) with ε(pre events ∘ DP-SGD(σ, q, T)) ≤ target; never overshoots."""
    def eps(sigma):
        acc = make_accountant(accountant)
        for event in pre_events:
            acc.compose(event)
        return acc.compose(dpsgd_event(sigma, q, steps)).epsilon(delta)

    hi = 1.0
    while eps(hi) > target_epsilon:
        hi *= 2
        if hi > 1e4:
            raise CalibrationError(f"target_epsilon={target_epsilon} is not reachable with the DP-SGD "
                                   "noise multiplier <= 1e4 after preprocessing; lower "
                                   "preprocessing_fraction or the number of steps")
    lo = hi / 2
    while eps(lo) <= target_epsilon:
        if lo < 1e-2:
            return lo
        hi, lo = lo, lo / 2
    while hi - lo > rtol * hi:
        mid = 0.5 * (lo + hi)
        hi, lo = (mid, lo) if eps(mid) <= target_epsilon else (hi, mid)
    return hi


@dataclass
class DPSGDFResult:
    """Output of :func:`dpsgdf_train`.

    Attributes:
        model: the trained ``nn.Linear`` (inputs: ``transform(x)``).
        transform: the public feature map (callable on (n, d) arrays).
        accountant: the ONE dpkit accountant holding preprocessing and DP-SGD events.
        epsilon: ε spent at ``delta`` (from ``accountant``). delta: the δ.
        noise_multiplier: DP-SGD's σ. preprocessing_noise_multiplier: σ of the composed preprocessing
            (None without preprocessing). steps: DP-SGD steps run.
        preprocessor: the fitted :class:`FeaturePreprocessor` (None without preprocessing).
        classes: the declared label set, in the order of the model's outputs (None for ``"linear"``).
    """

    model: nn.Module
    transform: object
    accountant: object
    epsilon: float
    delta: float
    noise_multiplier: float
    preprocessing_noise_multiplier: float | None
    steps: int
    preprocessor: FeaturePreprocessor | None = None
    classes: np.ndarray | None = None


def _run_seed(seed, stacklevel: int) -> int:
    """OS entropy for None; an explicit seed (it fixes noise and sampling) warns."""
    if seed is None:
        return secrets.randbits(62)
    seed = V.positive_int("seed", seed, allow_zero=True)
    warnings.warn(f"seed={seed} fixes the preprocessing noise, DP-SGD's sampling and noise: anyone who "
                  "knows it can remove the noise. Use a fixed seed for tests only (default None: OS "
                  "entropy)", SeededRandomnessWarning, stacklevel=stacklevel + 1)
    return seed


def _label_targets(y, classes) -> tuple[np.ndarray, torch.Tensor]:
    """Index of each label in the declared, public ``classes``; refuses labels outside it."""
    if classes is None:
        raise ValueError("classes must be declared for task='logistic' (the public label set, e.g. "
                         "classes=range(10)): deriving it from y would release it outside the privacy "
                         "ledger (one person with a rare label changes the model's output size)")
    if isinstance(classes, (str, bytes)):
        raise TypeError(f"classes must be a sequence of labels; got {classes!r}")
    classes = np.asarray(list(classes))
    if classes.ndim != 1 or classes.size < 2:
        raise ValueError(f"classes must list at least 2 labels; got {classes.tolist()!r}")
    if np.unique(classes).size != classes.size:
        raise ValueError(f"classes must not repeat a label; got {classes.tolist()!r}")
    order = np.argsort(classes, kind="stable")
    pos = np.clip(np.searchsorted(classes, y, sorter=order), 0, classes.size - 1)
    idx = order[pos]
    outside = classes[idx] != y
    if outside.any():
        raise ValueError(f"y has {int(outside.sum())} label(s) outside the declared classes "
                         f"{classes.tolist()!r}; declare the full public label set in classes=")
    return classes, torch.from_numpy(idx.astype(np.int64))


def dpsgdf_train(x, y, *, target_epsilon, target_delta, feature_bound, dataset_size, classes=None,
                 task="logistic", epochs=20, batch_size=64, lr=0.5, momentum=0.0, max_grad_norm=1.0,
                 preprocessing_fraction=DEFAULT_PREPROCESSING_FRACTION, preprocess=True,
                 accountant="pld", seed=None) -> DPSGDFResult:
    """Train a linear or logistic (softmax) model with DPSGD-F at a total (ε, δ) — one call.

    Sun, Suresh, Menon (ICLR 2024), Algorithm DPSGD-F: private preprocessing (module docstring,
    steps 1–4) with ``preprocessing_fraction``·ε, then DP-SGD (Poisson sampling, dpkit's
    :func:`~dpkit.make_private`) on the preprocessed features, σ calibrated so that the whole
    ledger meets (ε, δ). With ``preprocess=False`` it is plain DP-SGD on clip(x, R)/R with the
    whole budget (the baseline of the paper's comparison).

    Args:
        x: (n, d) features. y: (n,) integer labels (``"logistic"``) or real targets (``"linear"``).
        target_epsilon: total ε > 0. target_delta: δ in (0, 1).
        feature_bound: public R > 0 bounding ‖x_i‖ (declared, not measured on the data).
        dataset_size: public N ≥ 1 dividing the private means (declared, not measured on the
            data; see the module docstring). DP-SGD's sampling rate is B/n as in
            :func:`~dpkit.make_private`.
        classes: the public label set (``"logistic"``; required): the model has one output per
            entry, in this order; a label of ``y`` outside it is refused. None for ``"linear"``.
        task: ``"logistic"`` (softmax cross-entropy over ``classes``) or ``"linear"`` (squared loss).
        epochs: DP-SGD epochs (integer ≥ 1; each is ceil(n / batch_size) Poisson steps).
        batch_size: expected batch size B (q = B/n). lr, momentum: SGD settings.
        max_grad_norm: per-example clip norm C.
        preprocessing_fraction: share of ε for preprocessing, in (0, 1) (default 0.2).
        preprocess: False → DP-SGD baseline without preprocessing.
        accountant: dpkit accountant name (``"pld"`` default, ``"rdp"``, ``"prv"``).
        seed: integer seed for noise, sampling and initialisation, for tests: it emits
            :class:`~dpkit.errors.SeededRandomnessWarning`. Default None: OS entropy.

    Returns:
        :class:`DPSGDFResult`.

    Raises:
        ValueError, TypeError: bad arguments, named (a label outside ``classes`` included).
        CalibrationError: the target is unreachable.

    Resume: this is one call, with no checkpoint; an interrupted run cannot be continued (a
    restart is a new run with new randomness and must be accounted as another release).
    """
    return _dpsgdf_train(x, y, target_epsilon=target_epsilon, target_delta=target_delta,
                         feature_bound=feature_bound, dataset_size=dataset_size, classes=classes,
                         task=task, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                         max_grad_norm=max_grad_norm, preprocessing_fraction=preprocessing_fraction,
                         preprocess=preprocess, accountant=accountant, seed=seed, _stacklevel=3)


def _dpsgdf_train(x, y, *, target_epsilon, target_delta, feature_bound, dataset_size, classes, task, epochs,
                  batch_size, lr, momentum, max_grad_norm, preprocessing_fraction, preprocess, accountant,
                  seed, _stacklevel) -> DPSGDFResult:
    from dpkit.privacy_engine import make_private

    x = _as_features("x", x)
    n, d = x.shape
    task = V.one_of("task", task, ("logistic", "linear"))
    y = np.asarray(y)
    if y.shape != (n,):
        raise ValueError(f"y must have shape ({n},) to match x; got {tuple(y.shape)}")
    N = _check_dataset_size(dataset_size)
    eps = V.positive("target_epsilon", target_epsilon)
    delta = V.delta("target_delta", target_delta)
    R = V.positive("feature_bound", feature_bound)
    epochs = V.positive_int("epochs", epochs)
    batch_size = V.positive_int("batch_size", batch_size)
    if batch_size > n:
        raise ValueError(f"batch_size must be <= the number of examples {n}; got {batch_size}")
    lr = V.positive("lr", lr)
    momentum = V.non_negative("momentum", momentum)
    C = V.positive("max_grad_norm", max_grad_norm)
    frac = V.probability("preprocessing_fraction", preprocessing_fraction, allow_one=False)
    if not isinstance(preprocess, bool):
        raise TypeError(f"preprocess must be a bool; got {preprocess!r}")
    if task == "logistic":
        classes, targets = _label_targets(y, classes)
        out_dim = classes.size
    elif classes is not None:
        raise ValueError(f"classes must be None for task='linear'; got {classes!r}")
    else:
        targets = torch.as_tensor(y, dtype=torch.float32)
        out_dim = 1
    make_accountant(accountant)  # validate the name eagerly
    gen = torch.Generator().manual_seed(_run_seed(seed, _stacklevel))

    pre, pre_sigma, pre_events = None, None, []
    if preprocess:
        # ε_pre = frac·ε for the composed preprocessing Gaussian; DP-SGD then gets what is left
        pre_sigma = 1.0 / _gaussian_mu(frac * eps, delta)
        pre = FeaturePreprocessor(norm_bound=R, noise_multiplier=pre_sigma, dataset_size=N,
                                  generator=gen).fit(x)
        pre_events = pre.events_
        transform = pre.transform
    else:
        def transform(z):
            return _clip_rows(_as_features("x", z), R) / R

    steps_per_epoch = math.ceil(n / batch_size)
    steps = epochs * steps_per_epoch
    sigma = _calibrate_total(pre_events, eps, delta, batch_size / n, steps, accountant)

    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the global RNG
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
        model = nn.Linear(d, out_dim)
    features = transform(x).to(torch.float32)
    loader = DataLoader(TensorDataset(features, targets), batch_size=batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    model, optimizer, loader = make_private(model, optimizer, loader, max_grad_norm=C,
                                            noise_multiplier=sigma, accountant=accountant, generator=gen)
    for event in pre_events:  # ONE ledger: preprocessing and DP-SGD composed
        optimizer.accountant.compose(event)
    loss_fn = nn.CrossEntropyLoss() if task == "logistic" else nn.MSELoss()
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            out = model(xb)
            loss = loss_fn(out, yb) if task == "logistic" else loss_fn(out.squeeze(1), yb)
            loss.backward()
            optimizer.step()
    return DPSGDFResult(model=model, transform=transform, accountant=optimizer.accountant,
                        epsilon=optimizer.epsilon(delta), delta=delta, noise_multiplier=sigma,
                        preprocessing_noise_multiplier=pre_sigma, steps=optimizer.steps,
                        preprocessor=pre, classes=classes if task == "logistic" else None)


def _sklearn_bases():
    from sklearn.base import BaseEstimator, ClassifierMixin

    return ClassifierMixin, BaseEstimator


class DPSGDFClassifier(*_sklearn_bases()):
    """scikit-learn-style softmax classifier trained with DPSGD-F (or DP-SGD: ``preprocess=False``).

    Args:
        epsilon, delta: the total privacy budget of ``fit``.
        feature_bound: public bound R on ‖x‖.
        classes: the public label set (required before ``fit``): ``classes_`` is this, never
            ``np.unique(y)``, which would release the labels present outside the ledger.
        dataset_size: the public number of records N (required before ``fit``).
        epochs, batch_size, lr, momentum, max_grad_norm, preprocessing_fraction, preprocess,
        accountant, random_state: as in :func:`dpsgdf_train` (``random_state`` is its ``seed``;
            an explicit value warns, default None: OS entropy).

    Attributes (after ``fit``): ``classes_``, ``result_`` (:class:`DPSGDFResult`), ``epsilon_``.
    """

    def __init__(self, *, epsilon=1.0, delta=1e-5, feature_bound=1.0, classes=None, dataset_size=None,
                 epochs=20, batch_size=64, lr=0.5, momentum=0.0, max_grad_norm=1.0,
                 preprocessing_fraction=DEFAULT_PREPROCESSING_FRACTION, preprocess=True, accountant="pld",
                 random_state=None):
        self.epsilon = epsilon
        self.classes = classes
        self.dataset_size = dataset_size
        self.delta = delta
        self.feature_bound = feature_bound
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.max_grad_norm = max_grad_norm
        self.preprocessing_fraction = preprocessing_fraction
        self.preprocess = preprocess
        self.accountant = accountant
        self.random_state = random_state

    def fit(self, X, y) -> "DPSGDFClassifier":
        """Train privately; spends (``epsilon``, ``delta``) on (X, y).

        Raises:
            ValueError: ``classes`` or ``dataset_size`` not declared, a label outside ``classes``,
                or any error of :func:`dpsgdf_train`.
        """
        if self.dataset_size is None:
            raise ValueError("dataset_size must be declared (the public number of records N), e.g. "
                             "DPSGDFClassifier(dataset_size=60000, ...); got None")
        self.result_ = _dpsgdf_train(
            X, y, target_epsilon=self.epsilon, target_delta=self.delta, feature_bound=self.feature_bound,
            dataset_size=self.dataset_size, classes=self.classes, task="logistic", epochs=self.epochs,
            batch_size=self.batch_size, lr=self.lr, momentum=self.momentum,
            max_grad_norm=self.max_grad_norm, preprocessing_fraction=self.preprocessing_fraction,
            preprocess=self.preprocess, accountant=self.accountant, seed=self.random_state, _stacklevel=3)
        self.classes_ = self.result_.classes
        self.epsilon_ = self.result_.epsilon
        return self

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (columns in the order of ``classes_``)."""
        if not hasattr(self, "result_"):
            raise RuntimeError("DPSGDFClassifier is not fitted; call fit(X, y) first")
        with torch.no_grad():
            logits = self.result_.model(self.result_.transform(X).to(torch.float32))
        return torch.softmax(logits, dim=1).numpy()

    def predict(self, X) -> np.ndarray:
        """Most probable class per row."""
        proba = self.predict_proba(X)  # raises if not fitted
        return self.classes_[proba.argmax(axis=1)]
