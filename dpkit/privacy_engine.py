"""``make_private``: turn a model, an optimizer and a data loader into a DP-SGD training setup.

The sampler that feeds training, the DP event given to the accountant and the public normaliser
are all derived HERE from the same settings, so they cannot disagree:

* Poisson sampling (default): q = B / N with B the loader's batch size (public, user-declared)
  and N = len(dataset); event ``dpsgd_event(σ, q)`` per step, add/remove adjacency.
* Fixed-size sampling without replacement (``poisson_sampling=False``): event
  ``fixed_size_event(σ, B, N)`` per step, replace-one adjacency (RDP accountant).

With a target ε, σ is calibrated for steps = epochs × ceil(N / B) (rounded UP, so the account
covers the whole run; Opacus rounds down) or for the given ``steps``; the optimizer then refuses
to run more steps than were calibrated (:class:`dpkit.PrivacyBudgetExceeded`).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from dpkit import _validate
from dpkit.accountants import (
    Accountant,
    calibrate_noise_multiplier,
    dpsgd_event,
    epochs_to_steps,
    fixed_size_event,
    make_accountant,
)
from dpkit.accountants.registry import fresh_accountant
from dpkit.data import DPDataLoader, FixedSizeBatchSampler, PoissonBatchSampler
from dpkit.errors import PrivacyBudgetExceeded
from dpkit.grad_sample.engine import GradientEngine
from dpkit.mechanisms.matrix.participation import CyclicPoissonSampler
from dpkit.mechanisms.matrix.plan import matrix_accountant
from dpkit.mechanisms.matrix.streaming import CorrelatedNoise
from dpkit.mechanisms.noise import GaussianNoise, NoiseMechanism
from dpkit.user_level import UserLevelLoader, group_by_user
from dpkit.mechanisms.randomness import broadcast_seed, fresh_seed, seed_from_generator
from dpkit.optim.dp_optimizer import DPOptimizer


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader | None, *,
                 max_grad_norm: float, noise_multiplier: float | None = None,
                 target_epsilon: float | None = None, target_delta: float | None = None,
                 epochs: float | None = None, steps: int | None = None, accountant="pld",
                 poisson_sampling: bool = True, clipping: str = "bk", clip_scope: str = "flat",
                 clip_function: str = "standard", loss_reduction: str = "mean",
                 max_physical_batch_size: int | None = None, sample_rate: float | None = None,
                 expected_batch_size: float | None = None, noise: NoiseMechanism | None = None,
                 secure_mode: bool = False, generator: torch.Generator | None = None,
                 distributed: bool = False, embedding_noise="eager", error_feedback: dict | None = None,
                 batch_first: bool | None = None, privacy_unit: str = "example", user_ids=None,
                 max_examples_per_user: int | None = None):
    """Make ``model``/``optimizer``/``data_loader`` train with DP-SGD and track ε.

    Args:
        model: the model (kept as is — no wrapper, so its ``state_dict`` keys do not change);
            per-example hooks are attached to it.
        optimizer: any ``torch.optim.Optimizer`` over ``model.parameters()``.
        data_loader: a ``DataLoader`` over a map-style dataset whose ``batch_size`` is the expected
            batch size B; it is replaced by a DP sampler over the same dataset (its own shuffling
            is not used). ``None``: give ``sample_rate`` and ``expected_batch_size`` and sample
            yourself — the accounting assumes Poisson sampling at that rate.
        max_grad_norm: clip norm C > 0.
        noise_multiplier: σ ≥ 0 (noise std / C). Exactly one of ``noise_multiplier`` and
            ``target_epsilon``.
        target_epsilon, target_delta: calibrate σ so the planned run has ε ≤ target at δ.
        epochs, steps: length of the planned run (one of them, required with a target ε).
        accountant: registered name (``"pld"``, ``"rdp"``, ``"prv"``, ``"gdp"``) or an Accountant.
            Fixed-size sampling is accounted by ``"rdp"`` under replace-one adjacency only.
        poisson_sampling: Poisson (True) or fixed-size without replacement (False).
        clipping: gradient engine, ``"bk"`` (book-keeping, default) or ``"per_sample"``.
        clip_scope: ``"flat"`` or ``"per_layer"``. clip_function: ``"standard"`` or ``"automatic"``.
        loss_reduction: ``"mean"`` (loss averaged over the batch) or ``"sum"``.
        max_physical_batch_size: split logical batches into chunks of at most this size (memory);
            noise is still added once per logical step.
        sample_rate, expected_batch_size: only with ``data_loader=None``.
        noise: a custom :class:`~dpkit.mechanisms.noise.NoiseMechanism` (e.g. correlated noise);
            the accountant must then be one that accounts it.
        secure_mode: noise AND sampling coins from fresh OS entropy at every draw (see
            :class:`~dpkit.mechanisms.noise.GaussianNoise`); not reproducible.
        generator: a ``torch.Generator`` whose ``initial_seed()`` seeds the run's keyed noise and
            sampling streams (reproducible runs; anyone who knows the seed can remove the noise).
            Default: OS entropy. Either way the seeds and the sampler's position travel in
            ``optimizer.state_dict()``, so a resumed run continues instead of replaying.
        distributed: data-parallel DP-SGD over an initialised ``torch.distributed`` group (do not
            wrap the model in DDP). ``data_loader.batch_size`` is the GLOBAL expected batch size B;
            rank r Poisson-samples the shard ``r::world_size`` at rate q = B/N, so the union of the
            ranks' batches is one Poisson sample of the whole dataset. Pass the same seeded
            ``generator`` on every rank (identical noise, added once; see :class:`DPOptimizer`).
        embedding_noise: ``"eager"`` (default) or ``"lazy"``: embedding tables are updated sparsely
            and their DP-SGD noise is applied lazily with the same distribution and the same ε
            (LazyDP, Lim et al., ASPLOS 2024; needs ``torch.optim.SGD``, momentum allowed). See
            :class:`DPOptimizer`.
        error_feedback: ``None`` (default) or ``{"clip2": C2, "noise_split": f (optional),
            "calibration": "dpkit" | "reference" (optional)}``: DiceSGD error feedback (Zhang et
            al., ICLR 2024) with error threshold C2 (mean units), accounted by
            :func:`dpkit.optim.error_feedback.dicesgd_event`; with a target ε, σ is re-calibrated
            for it. ``"reference"`` reproduces the authors' code's calibration (needs a target ε;
            warns: its claim is unverified and dpkit's audits contradict it) while
            ``optimizer.epsilon`` stays dpkit's account. The attached feedback is
            ``optimizer.error_feedback``. Poisson sampling, i.i.d. Gaussian noise, not distributed.
            See :mod:`dpkit.optim.error_feedback`.

        batch_first: ``None`` (default): dpkit proves each layer's batch axis from the batch it
            yielded and refuses a step where it cannot (e.g. a (B, T, d) tensor with B == T before
            any batch proved the layout). ``True``/``False``: declare that position-wise layers
            (Linear, norms, embeddings) see the batch on axis 0 / axis 1 (time-major); a tensor
            that contradicts the declaration is still refused. RNNs and attention follow their own
            ``batch_first`` flags.

        privacy_unit: ``"example"`` (default) or ``"user"``: user-level DP — ``user_ids`` (one per
            example) groups the examples, ``data_loader.batch_size`` is the expected number of
            USERS per step, users are Poisson-sampled, each user's summed gradient is clipped once
            and ε is user-level (see :mod:`dpkit.user_level`; needs ``loss_reduction="sum"``).
        user_ids, max_examples_per_user: only with ``privacy_unit="user"``.

    Returns:
        ``(model, dp_optimizer, dp_data_loader)`` (``dp_data_loader`` is None if none was given).

    Raises:
        ValueError/TypeError: a bad or contradictory argument, named.
        UnsupportedModuleError: a layer that mixes examples (BatchNorm).
        CalibrationError: the target ε is unreachable.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
    if not isinstance(poisson_sampling, bool):
        raise TypeError(f"poisson_sampling must be a bool; got {poisson_sampling!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    max_grad_norm = _validate.positive("max_grad_norm", max_grad_norm)

    users = _users(privacy_unit, user_ids, max_examples_per_user, data_loader, loss_reduction, poisson_sampling,
                   distributed, max_physical_batch_size, noise, error_feedback)
    cyclic = _cyclic_sampler(data_loader)
    if users is not None:
        dataset_size, batch_size, q = _user_sampling(users, data_loader)
    elif cyclic is not None:
        dataset_size, batch_size, q = _cyclic_sampling(data_loader, cyclic, sample_rate, expected_batch_size)
    else:
        dataset_size, batch_size, q = _sampling(data_loader, sample_rate, expected_batch_size)
    if target_epsilon is not None and (cyclic is not None or isinstance(noise, CorrelatedNoise)):
        raise ValueError("target_epsilon calibration is not available with correlated noise; give "
                         "noise_multiplier and read the MMCC / amplified-BandMF ε from optimizer.epsilon")
    if not poisson_sampling and data_loader is None:
        raise ValueError("poisson_sampling=False needs a data_loader (dpkit must own the sampler)")
    if not poisson_sampling and not float(batch_size).is_integer():
        raise ValueError(f"fixed-size sampling needs an integer batch size; got {batch_size}")
    requested_accountant = accountant
    accountant = _accountant(accountant, poisson_sampling)

    planned_steps = _planned_steps(epochs, steps, dataset_size, batch_size, data_loader)
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("give exactly one of noise_multiplier and target_epsilon; got "
                         f"noise_multiplier={noise_multiplier!r}, target_epsilon={target_epsilon!r}")
    if target_epsilon is not None:
        if target_delta is None:
            raise ValueError("target_delta must be given with target_epsilon (e.g. 1e-5, below 1/N)")
        if planned_steps is None:
            raise ValueError("a target_epsilon needs the length of the run: give epochs= or steps=")
        if not poisson_sampling:
            raise ValueError("target_epsilon calibration is available for Poisson sampling only; "
                             "give noise_multiplier with poisson_sampling=False")
        noise_multiplier = calibrate_noise_multiplier(target_epsilon, target_delta, q, planned_steps,
                                                      accountant=accountant)
    noise_multiplier = _validate.non_negative("noise_multiplier", noise_multiplier)

    if cyclic is not None or isinstance(noise, CorrelatedNoise):
        if not poisson_sampling:
            raise ValueError("correlated noise is accounted for Poisson or cyclic Poisson sampling only; "
                             "got poisson_sampling=False")
        if not isinstance(noise, CorrelatedNoise):
            raise ValueError("a CyclicPoissonSampler loader is for correlated noise (amplified BandMF): "
                             "pass noise=CorrelatedNoise(banded(n, bands)) with bands <= its num_groups")
        accountant = matrix_accountant(noise, requested_accountant, noise_multiplier=noise_multiplier, sampling_prob=q,
                                       sampler=cyclic if cyclic is not None else
                                       "poisson" if data_loader is not None else "declared")
    elif getattr(noise, "is_test_probe", False):
        warnings.warn(f"noise={type(noise).__name__} is a deterministic test probe: the run is NOT private "
                      "and its printed ε does not describe it", UserWarning, stacklevel=2)
    elif noise is not None and not isinstance(noise, GaussianNoise):
        raise ValueError(f"make_private cannot account noise of type {type(noise).__name__}: give a "
                         "dpkit CorrelatedNoise (accounted by MMCC / amplified BandMF) or build the "
                         "DPOptimizer and its accountant yourself")
    if poisson_sampling:
        step_event = dpsgd_event(noise_multiplier, q, 1)
    else:
        step_event = fixed_size_event(noise_multiplier, int(batch_size), dataset_size, 1)
    if not accountant.supports(step_event):
        raise ValueError(f"accountant {accountant.name!r} cannot account this run's steps "
                         f"({type(step_event).__name__}); choose another accountant")

    if batch_first is not None and not isinstance(batch_first, bool):
        raise TypeError(f"batch_first must be True, False or None; got {batch_first!r}")
    engine = GradientEngine(model, max_grad_norm=max_grad_norm, mode=clipping, clip_scope=clip_scope,
                            clip_function=clip_function, loss_reduction=loss_reduction,
                            track_unclipped=error_feedback is not None)
    if batch_first is not None:
        engine.set_batch_axis(0 if batch_first else 1)
    dp_optimizer = DPOptimizer(optimizer, engine=engine, noise_multiplier=noise_multiplier,
                               expected_batch_size=batch_size, step_event=step_event,
                               accountant=accountant, noise=noise, generator=generator,
                               secure_mode=secure_mode, distributed=distributed,
                               embedding_noise=embedding_noise)
    if target_epsilon is not None:
        dp_optimizer.max_steps = planned_steps
        dp_optimizer.target = (target_epsilon, target_delta)
    if error_feedback is not None:
        from dpkit.optim.error_feedback import configure_error_feedback

        dp_optimizer.error_feedback = configure_error_feedback(dp_optimizer, error_feedback, sampling_prob=q,
                                                               poisson_sampling=poisson_sampling)

    dp_loader = None
    if data_loader is not None:
        if users is not None:
            seed = None if generator is None or secure_mode else seed_from_generator(generator)
            sampler = PoissonBatchSampler(len(users), q, steps=math.ceil(dataset_size / batch_size), seed=seed,
                                          secure_mode=secure_mode)
            sampler.seed_is_fixed = generator is not None and not secure_mode
            dp_loader = UserLevelLoader(data_loader.dataset, users, sampler, collate_fn=data_loader.collate_fn)
        elif cyclic is not None:
            if distributed:
                raise ValueError("distributed=True does not support CyclicPoissonSampler")
            dp_loader = DPDataLoader(data_loader.dataset, cyclic, max_physical_batch_size=max_physical_batch_size,
                                     collate_fn=data_loader.collate_fn, num_workers=data_loader.num_workers,
                                     pin_memory=data_loader.pin_memory)
        else:
            dp_loader = _build_loader(data_loader, dataset_size, batch_size, q, poisson_sampling,
                                      generator=generator, secure_mode=secure_mode, distributed=distributed,
                                      max_physical_batch_size=max_physical_batch_size)
        dp_loader.attach_optimizer(dp_optimizer)
    return model, dp_optimizer, dp_loader


def _build_loader(data_loader, dataset_size, batch_size, q, poisson_sampling, *, generator, secure_mode,
                  distributed, max_physical_batch_size) -> DPDataLoader:
    """dpkit's DP loader over ``data_loader``'s dataset: counter-based sampler keyed by (seed, t).

    The sampler's seed is the generator's seed (its stream is kept apart from the noise's), or OS
    entropy; distributed ranks share rank 0's seed and draw on their own stream (the rank), so the
    union of their coins is one Poisson sample of the whole data set.
    """
    dataset = data_loader.dataset
    seed = None if generator is None or secure_mode else seed_from_generator(generator)
    stream = 0
    if distributed:
        if not poisson_sampling:
            raise ValueError("distributed=True supports Poisson sampling only")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        dataset = Subset(dataset, range(rank, dataset_size, world))
        seed, stream = broadcast_seed(fresh_seed() if seed is None else seed), rank
    steps = math.ceil(dataset_size / batch_size)
    if poisson_sampling:
        batch_sampler = PoissonBatchSampler(len(dataset), q, steps=steps, seed=seed,
                                            secure_mode=secure_mode, stream=stream)
    else:
        batch_sampler = FixedSizeBatchSampler(dataset_size, int(batch_size), seed=seed, secure_mode=secure_mode)
    # a seed derived from generator= is fixed: resuming must restore the position (checked on attach)
    batch_sampler.seed_is_fixed = generator is not None and not secure_mode
    return DPDataLoader(dataset, batch_sampler, max_physical_batch_size=max_physical_batch_size,
                        collate_fn=data_loader.collate_fn, num_workers=data_loader.num_workers,
                        pin_memory=data_loader.pin_memory)


def _users(privacy_unit, user_ids, max_examples_per_user, data_loader, loss_reduction, poisson_sampling,
           distributed, max_physical_batch_size, noise, error_feedback):
    """Example indices per user for ``privacy_unit="user"`` (None for example-level DP)."""
    _validate.one_of("privacy_unit", privacy_unit, ("example", "user"))
    if privacy_unit == "example":
        if user_ids is not None or max_examples_per_user is not None:
            raise ValueError("user_ids and max_examples_per_user need privacy_unit='user'")
        return None
    if user_ids is None or data_loader is None:
        raise ValueError("privacy_unit='user' needs user_ids= (one per example) and a data_loader whose "
                         "batch_size is the expected number of users per step")
    unsupported = {"loss_reduction='mean'": loss_reduction != "sum", "poisson_sampling=False": not poisson_sampling,
                   "distributed=True": distributed, "max_physical_batch_size": max_physical_batch_size is not None,
                   "noise=": noise is not None, "error_feedback=": error_feedback is not None}
    bad = [name for name, on in unsupported.items() if on]
    if bad:
        raise ValueError(f"privacy_unit='user' supports loss_reduction='sum', Poisson sampling and i.i.d. "
                         f"noise only; got {', '.join(bad)}")
    _sampling(data_loader, None, None)  # validates the loader
    return group_by_user(user_ids, len(data_loader.dataset), max_examples_per_user)


def _user_sampling(users, data_loader):
    """(number of users U, expected users per step B_u, q = B_u / U)."""
    b = _validate.positive_int("data_loader.batch_size", data_loader.batch_size)
    if b > len(users):
        raise ValueError(f"data_loader.batch_size (expected users per step) must be <= the number of users "
                         f"{len(users)}; got {b}")
    return len(users), float(b), b / len(users)


def _cyclic_sampler(data_loader):
    """The loader's CyclicPoissonSampler, kept as the run's sampler (amplified BandMF), or None."""
    if isinstance(data_loader, DataLoader) and isinstance(data_loader.batch_sampler, CyclicPoissonSampler):
        return data_loader.batch_sampler
    return None


def _cyclic_sampling(data_loader, sampler, sample_rate, expected_batch_size):
    """(N, public expected batch size q·N/b, q within the group) of a cyclic Poisson loader."""
    if sample_rate is not None or expected_batch_size is not None:
        raise ValueError("sample_rate and expected_batch_size are derived from the CyclicPoissonSampler; "
                         "do not give them")
    n = len(data_loader.dataset)
    if n != sampler.num_samples:
        raise ValueError(f"CyclicPoissonSampler was built for {sampler.num_samples} examples; the dataset "
                         f"has {n}")
    return n, sampler.sampling_prob * n / sampler.num_groups, sampler.sampling_prob


def _sampling(data_loader, sample_rate, expected_batch_size):
    """(dataset size or None, public expected batch size, sampling rate)."""
    if data_loader is None:
        if sample_rate is None or expected_batch_size is None:
            raise ValueError("with data_loader=None, sample_rate and expected_batch_size are required "
                             f"(got sample_rate={sample_rate!r}, expected_batch_size={expected_batch_size!r})")
        q = _validate.probability("sample_rate", sample_rate)
        return None, _validate.positive("expected_batch_size", expected_batch_size), q
    if not isinstance(data_loader, DataLoader):
        raise TypeError(f"data_loader must be a torch DataLoader or None; got {type(data_loader).__name__}")
    if sample_rate is not None or expected_batch_size is not None:
        raise ValueError("sample_rate and expected_batch_size are derived from data_loader; "
                         "give them only with data_loader=None")
    try:
        n = len(data_loader.dataset)
    except TypeError:
        raise TypeError("data_loader.dataset must be a map-style dataset with a length "
                        "(an IterableDataset cannot be Poisson-sampled)") from None
    if data_loader.batch_size is None:
        raise ValueError("data_loader must have a batch_size (it is the expected batch size B); "
                         "it was built with a custom batch_sampler")
    n = _validate.positive_int("len(data_loader.dataset)", n)
    b = _validate.positive_int("data_loader.batch_size", data_loader.batch_size)
    if b > n:
        raise ValueError(f"data_loader.batch_size must be <= the dataset size {n}; got {b}")
    return n, float(b), b / n


def _accountant(accountant, poisson_sampling) -> Accountant:
    if poisson_sampling or not isinstance(accountant, str):
        return fresh_accountant(accountant)
    if accountant not in ("rdp", "pld"):
        raise ValueError("fixed-size sampling (poisson_sampling=False) is accounted by the 'rdp' "
                         f"accountant under replace-one adjacency; got accountant={accountant!r}")
    return make_accountant("rdp", neighboring_relation="replace_one")


def _planned_steps(epochs, steps, dataset_size, batch_size, data_loader):
    if epochs is not None and steps is not None:
        raise ValueError(f"give epochs or steps, not both; got epochs={epochs!r}, steps={steps!r}")
    if steps is not None:
        return _validate.positive_int("steps", steps)
    if epochs is None:
        return None
    epochs = _validate.positive("epochs", epochs)
    if data_loader is None:
        raise ValueError("epochs needs a data_loader (to know the dataset size); give steps= instead")
    return epochs_to_steps(epochs, dataset_size, int(batch_size))[1]


__all__ = ["make_private", "PrivacyBudgetExceeded"]
