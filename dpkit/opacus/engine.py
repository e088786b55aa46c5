"""``PrivacyEngine`` with Opacus 1.6's public signatures, built on :func:`dpkit.make_private`.

Every argument Opacus accepts is either mapped to the dpkit setting with the same meaning or
refused with the reason and the fix; none is silently ignored. The mechanism that runs is dpkit's
(Abadi et al., CCS 2016, DP-SGD with Poisson sampling): the sampling rate is q = B/N with B the
loader's ``batch_size`` (Opacus uses 1/len(loader), equal when B divides N), the normaliser is B,
and the accountant is composed once per logical step by the optimizer.
"""

from __future__ import annotations

import copy
import math
import os
from numbers import Real

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from dp_accounting import dp_event

from dpkit.accountants import make_accountant
from dpkit.grad_sample import check_model, replace_batchnorm
from dpkit.privacy_engine import make_private as _dpkit_make_private

__all__ = ["PrivacyEngine", "AccountantView"]

# Opacus accountant name -> dpkit accountant name ("pld" is dpkit's own default, accepted too)
_ACCOUNTANTS = {"prv": "prv", "rdp": "rdp", "gdp": "gdp", "pld": "pld"}

_REFUSED_MODES = {
    "functorch": "dpkit computes per-example gradients with its own engine and already falls back "
                 "to torch.func for layers without a rule",
    "ew": "ExpandedWeights is an Opacus engine; dpkit uses its own per-example engine",
    "ghost_fsdp": "dpkit does not support FSDP",
    "no_op": "'no_op' skips per-example clipping, which dpkit never does",
}

_ADAPTIVE_KWARGS = ("target_unclipped_quantile", "clipbound_learning_rate", "max_clipbound",
                    "min_clipbound", "unclipped_num_std")


class AccountantView:
    """Opacus-style view of the privacy ledger (``privacy_engine.accountant``).

    Reads the dpkit accountant that the :class:`~dpkit.DPOptimizer` composes into; before
    ``make_private`` it is an empty accountant of the chosen kind.

    Attributes:
        history: ``[(noise_multiplier, sample_rate, steps)]`` read from the ledger (runs of identical
            steps merged, as in Opacus); empty before the first step.
    """

    def __init__(self, mechanism: str):
        self._mechanism = mechanism
        self._empty = make_accountant(_ACCOUNTANTS[mechanism])
        self._optimizer = None
        self._sample_rate = None

    def _bind(self, optimizer, sample_rate: float) -> None:
        self._optimizer = optimizer
        self._sample_rate = sample_rate

    @property
    def dpkit_accountant(self):
        """The underlying :class:`dpkit.accountants.Accountant` (its ``ledger`` holds the DP events)."""
        return self._empty if self._optimizer is None else self._optimizer.accountant

    def mechanism(self) -> str:
        """The accountant name given to :class:`PrivacyEngine` (``"prv"``, ``"rdp"``, ``"gdp"``, ``"pld"``)."""
        return self._mechanism

    def __len__(self) -> int:
        """Number of logical (noised, accounted) steps taken so far."""
        return sum(count for _, count in self.dpkit_accountant.ledger)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [(*self._sigma_and_rate(event), count) for event, count in self.dpkit_accountant.ledger]

    def _sigma_and_rate(self, event) -> tuple[float, float]:
        """(σ, q) of one ledger event as Opacus records them; the run's settings for other events
        (e.g. accumulated Poisson batches, accounted as a mixture of Gaussians)."""
        if isinstance(event, dp_event.PoissonSampledDpEvent) and isinstance(event.event, dp_event.GaussianDpEvent):
            return event.event.noise_multiplier, event.sampling_probability
        if isinstance(event, dp_event.GaussianDpEvent):
            return event.noise_multiplier, 1.0
        return self._optimizer.noise_multiplier, self._sample_rate

    def get_epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta`` (0 before any step).

        Raises:
            ValueError, TypeError: ``delta`` not in (0, 1).
        """
        return self.dpkit_accountant.epsilon(delta)

    def state_dict(self) -> dict:
        """The dpkit accountant's state (name, relation, ledger) as JSON builtins."""
        return self.dpkit_accountant.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the ledger only. To resume training, load the OPTIMIZER's state_dict instead
        (it holds this ledger plus the step count and noise RNG state)."""
        self.dpkit_accountant.load_state_dict(state_dict)


class _DetachHandle:
    """What ``make_private(wrap_model=False)`` returns in place of Opacus' ``GradSampleHooks``."""

    def __init__(self, engine):
        self._engine = engine

    def cleanup(self) -> None:
        """Remove dpkit's per-example hooks from the model (after training)."""
        self._engine.detach()


class _ReducedLoss:
    """Opacus ghost-mode criterion: per-example losses reduced by ``loss_reduction``."""

    def __init__(self, criterion, loss_reduction: str):
        self.criterion = copy.copy(criterion)
        self.criterion.reduction = "none"
        self.loss_reduction = loss_reduction

    def __call__(self, *args, **kwargs):
        losses = self.criterion(*args, **kwargs)
        return losses.mean() if self.loss_reduction == "mean" else losses.sum()


class PrivacyEngine:
    """Opacus-compatible entry point; each ``make_private`` call is :func:`dpkit.make_private`.

    Args:
        accountant: ``"prv"`` (Opacus' default; dpkit's PRV accountant, the upper bound of
            Gopi et al. 2021 via ``prv_accountant``), ``"rdp"`` (Rényi DP, Mironov et al. 2019),
            ``"gdp"`` (μ-GDP central-limit approximation, may under-state ε; warns) or ``"pld"``
            (dpkit's default, exact privacy loss distributions via ``dp_accounting``).
        secure_mode: draw noise and sampling from OS entropy (dpkit needs no ``torchcsprng``).

    Raises:
        ValueError: unknown ``accountant``. TypeError: non-bool ``secure_mode``.
    """

    def __init__(self, *, accountant: str = "prv", secure_mode: bool = False):
        if not isinstance(accountant, str) or accountant not in _ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {sorted(_ACCOUNTANTS)!r}; got {accountant!r}")
        if not isinstance(secure_mode, bool):
            raise TypeError(f"secure_mode must be a bool; got {secure_mode!r}")
        self.secure_mode = secure_mode
        self.accountant = AccountantView(accountant)
        self._optimizer = None

    # ------------------------------------------------------------------ make_private
    def make_private(self, *, module: nn.Module, optimizer: torch.optim.Optimizer,
                     criterion=nn.CrossEntropyLoss(), data_loader: DataLoader, noise_multiplier: float,
                     max_grad_norm, batch_first: bool = True, loss_reduction: str = "mean",
                     poisson_sampling: bool = True, clipping: str = "flat",
                     noise_generator: torch.Generator | None = None, grad_sample_mode: str = "hooks",
                     wrap_model: bool = True, rand_on_empty: bool = False, **kwargs):
        """Make ``module``/``optimizer``/``data_loader`` private with noise multiplier σ.

        Args (Opacus names; see ``docs/opacus.md`` for the mapping):
            module: the model; returned UNCHANGED (no GradSampleModule wrapper, same state_dict
                keys). With ``wrap_model=True``, ``module._module`` is set to the module itself so
                that Opacus code reading ``model._module`` keeps working.
            optimizer: any ``torch.optim.Optimizer`` over ``module.parameters()``.
            criterion: only used with ``grad_sample_mode="ghost"`` (as in Opacus): returned as a
                callable computing the per-example losses reduced by ``loss_reduction``.
            data_loader: a ``DataLoader`` whose ``batch_size`` B is the expected batch size; it is
                replaced by a Poisson sampler at q = B/N over the same dataset.
            noise_multiplier: σ ≥ 0 (noise std / max_grad_norm).
            max_grad_norm: clip norm C > 0; with ``clipping="per_layer"`` a list of one equal norm
                per trainable parameter tensor.
            batch_first: must be True (dpkit needs the batch on axis 0 of every layer input).
            loss_reduction: ``"mean"`` or ``"sum"``: how the loss reduces over the batch.
            poisson_sampling: True; False draws B distinct examples afresh each step, accounted by
                RDP under replace-one adjacency (needs ``PrivacyEngine(accountant="rdp")``).
            clipping: ``"flat"`` or ``"per_layer"``.
            noise_generator: ``torch.Generator`` for the noise (and, derived from it, sampling).
            grad_sample_mode: ``"hooks"`` or ``"ghost"`` (same dpkit engine; ``"ghost"`` returns the
                criterion too, like Opacus).
            wrap_model: False returns a handle with ``cleanup()`` in place of the model.
            rand_on_empty: must be False (dpkit yields empty batches as zero-length tensors).
            **kwargs: Opacus passes these to its optimizer classes; dpkit refuses every one.

        Returns:
            ``(module, optimizer, data_loader)``, or ``(module, optimizer, criterion, data_loader)``
            with ``grad_sample_mode="ghost"``.

        Raises:
            ValueError/TypeError: an argument dpkit cannot honour, with the reason and the fix.
            UnsupportedModuleError: a layer that mixes examples (BatchNorm).
        """
        return self._make_private(
            module=module, optimizer=optimizer, criterion=criterion, data_loader=data_loader,
            max_grad_norm=max_grad_norm, batch_first=batch_first, loss_reduction=loss_reduction,
            poisson_sampling=poisson_sampling, clipping=clipping, noise_generator=noise_generator,
            grad_sample_mode=grad_sample_mode, wrap_model=wrap_model, rand_on_empty=rand_on_empty,
            kwargs=kwargs, noise={"noise_multiplier": noise_multiplier})

    def make_private_with_epsilon(self, *, module: nn.Module, optimizer: torch.optim.Optimizer,
                                  criterion=nn.CrossEntropyLoss(), data_loader: DataLoader,
                                  target_epsilon: float, target_delta: float, epochs: float,
                                  max_grad_norm, batch_first: bool = True, loss_reduction: str = "mean",
                                  poisson_sampling: bool = True, clipping: str = "flat",
                                  noise_generator: torch.Generator | None = None,
                                  grad_sample_mode: str = "hooks", wrap_model: bool = True, **kwargs):
        """:meth:`make_private` with σ calibrated so that ``epochs`` epochs spend ≤ ``target_epsilon``.

        The run is planned as ``ceil(epochs · ceil(N/B))`` steps (Opacus: ``int(epochs · len(loader))``,
        the same for whole epochs with ``drop_last=False``). dpkit's calibration never overshoots the
        target, and the optimizer REFUSES a step beyond the planned ones
        (:class:`dpkit.PrivacyBudgetExceeded`) where Opacus would keep spending.

        Args: as :meth:`make_private`, with ``target_epsilon``, ``target_delta`` and ``epochs``
            in place of ``noise_multiplier``. Poisson sampling only.

        Returns / Raises: as :meth:`make_private`; ``CalibrationError`` if the target is unreachable.
        """
        if poisson_sampling is False:
            raise ValueError("poisson_sampling=False cannot be combined with a target epsilon: dpkit "
                             "calibrates the noise for Poisson sampling only. Keep poisson_sampling=True, "
                             "or call make_private with an explicit noise_multiplier")
        return self._make_private(
            module=module, optimizer=optimizer, criterion=criterion, data_loader=data_loader,
            max_grad_norm=max_grad_norm, batch_first=batch_first, loss_reduction=loss_reduction,
            poisson_sampling=poisson_sampling, clipping=clipping, noise_generator=noise_generator,
            grad_sample_mode=grad_sample_mode, wrap_model=wrap_model, rand_on_empty=False,
            kwargs=kwargs, noise={"target_epsilon": target_epsilon, "target_delta": target_delta,
                                  "epochs": epochs})

    def _make_private(self, *, module, optimizer, criterion, data_loader, max_grad_norm, batch_first,
                      loss_reduction, poisson_sampling, clipping, noise_generator, grad_sample_mode,
                      wrap_model, rand_on_empty, kwargs, noise):
        if self._optimizer is not None:
            raise RuntimeError("this PrivacyEngine already made a model private, and dpkit keeps each run's "
                               "ledger in its optimizer; create a new PrivacyEngine for another run")
        _refuse_kwargs(kwargs)
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module; got {type(module).__name__}")
        if isinstance(module, DistributedDataParallel):
            raise ValueError("module must not be wrapped in DistributedDataParallel: dpkit all-reduces the "
                             "clipped sums itself. Pass the plain model to dpkit.make_private(..., "
                             "distributed=True, generator=<same seeded generator on every rank>)")
        if not isinstance(data_loader, DataLoader):
            raise TypeError("data_loader must be a torch DataLoader (its batch_size is the expected batch "
                            f"size); got {type(data_loader).__name__}")
        if not isinstance(grad_sample_mode, str):
            raise TypeError(f"grad_sample_mode must be a string; got {grad_sample_mode!r}")
        if grad_sample_mode in _REFUSED_MODES:
            raise ValueError(f"grad_sample_mode={grad_sample_mode!r} is not supported: "
                             f"{_REFUSED_MODES[grad_sample_mode]}. Use grad_sample_mode='hooks' (or 'ghost')")
        if grad_sample_mode not in ("hooks", "ghost"):
            raise ValueError(f"grad_sample_mode must be 'hooks' or 'ghost'; got {grad_sample_mode!r}")
        if batch_first is not True:
            raise ValueError("batch_first must be True: dpkit needs the batch on axis 0 of every layer "
                             f"input; got {batch_first!r}. Transpose your inputs (nn.RNN/LSTM/GRU: build "
                             "them with batch_first=True)")
        if rand_on_empty is not False:
            raise ValueError("rand_on_empty must be False: dpkit yields an empty Poisson batch as "
                             "zero-length tensors (still a noised, accounted step) rather than random data; "
                             f"got {rand_on_empty!r}")
        if not isinstance(wrap_model, bool):
            raise TypeError(f"wrap_model must be a bool; got {wrap_model!r}")
        if not isinstance(poisson_sampling, bool):
            raise TypeError(f"poisson_sampling must be a bool; got {poisson_sampling!r}")
        if not poisson_sampling and self.accountant.mechanism() != "rdp":
            raise ValueError("poisson_sampling=False draws B distinct examples afresh each step, which "
                             "dpkit accounts with RDP under replace-one adjacency; create "
                             "PrivacyEngine(accountant='rdp') (or keep poisson_sampling=True); got "
                             f"accountant={self.accountant.mechanism()!r}")
        if noise_generator is not None and self.secure_mode:
            raise ValueError("noise_generator must be None with secure_mode=True (secure noise comes from "
                             "OS entropy, a seeded generator would make it reproducible)")
        if grad_sample_mode == "ghost":
            if not hasattr(criterion, "reduction"):
                raise TypeError("grad_sample_mode='ghost' needs a torch loss module with a 'reduction' "
                                f"attribute as criterion; got {type(criterion).__name__}")
            criterion = _ReducedLoss(criterion, loss_reduction)
        clip_scope, clip_norm = _clipping(clipping, max_grad_norm, module)

        model, dp_optimizer, dp_loader = _dpkit_make_private(
            module, optimizer, data_loader, max_grad_norm=clip_norm,
            accountant=_ACCOUNTANTS[self.accountant.mechanism()], poisson_sampling=poisson_sampling,
            clip_scope=clip_scope, loss_reduction=loss_reduction, secure_mode=self.secure_mode,
            generator=noise_generator, batch_first=True, **noise)  # Opacus' batch_first=True, declared
        self._optimizer = dp_optimizer
        self.accountant._bind(dp_optimizer, dp_loader.sample_rate)
        if wrap_model:
            if not hasattr(model, "_module"):  # Opacus code reads model._module; no registration, no new keys
                object.__setattr__(model, "_module", model)
            first = model
        else:
            first = _DetachHandle(dp_optimizer.engine)
        if grad_sample_mode == "ghost":
            return first, dp_optimizer, criterion, dp_loader
        return first, dp_optimizer, dp_loader

    # ------------------------------------------------------------------ accounting
    def get_epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta``, from the optimizer's ledger (0 before any step).

        Raises:
            ValueError, TypeError: ``delta`` not in (0, 1).
        """
        return self.accountant.get_epsilon(delta)

    # ------------------------------------------------------------------ compatibility
    def is_compatible(self, *, module: nn.Module, optimizer=None, data_loader=None) -> bool:
        """Whether dpkit can clip every layer of ``module`` per example (no BatchNorm)."""
        try:
            self.validate(module=module, optimizer=optimizer, data_loader=data_loader)
        except TypeError:
            return False
        return True

    def validate(self, *, module: nn.Module, optimizer=None, data_loader=None) -> None:
        """Raise :class:`dpkit.UnsupportedModuleError` (a TypeError) naming a layer that mixes examples."""
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module; got {type(module).__name__}")
        check_model(module)

    @classmethod
    def get_compatible_module(cls, module: nn.Module) -> nn.Module:
        """A deep copy of ``module`` with every BatchNorm replaced by GroupNorm, validated."""
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module; got {type(module).__name__}")
        fixed = replace_batchnorm(copy.deepcopy(module))
        check_model(fixed)
        return fixed

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, *, path: str | os.PathLike, module: nn.Module, optimizer=None,
                        noise_scheduler=None, grad_clip_scheduler=None, checkpoint_dict: dict | None = None,
                        module_state_dict_kwargs: dict | None = None,
                        torch_save_kwargs: dict | None = None) -> None:
        """Save module, optimizer (with dpkit's ledger, step count and noise RNG) and accountant.

        Keys as in Opacus: ``module_state_dict``, ``optimizer_state_dict``,
        ``privacy_accountant_state_dict``, plus whatever ``checkpoint_dict`` holds.

        Raises:
            ValueError: ``optimizer`` missing after ``make_private`` (the resumable privacy state
                lives in it), or a scheduler given.
        """
        _refuse_schedulers(noise_scheduler, grad_clip_scheduler)
        self._require_optimizer(optimizer, "save_checkpoint")
        checkpoint = dict(checkpoint_dict or {})
        checkpoint["module_state_dict"] = module.state_dict(**(module_state_dict_kwargs or {}))
        checkpoint["privacy_accountant_state_dict"] = self.accountant.state_dict()
        if optimizer is not None:
            checkpoint["optimizer_state_dict"] = optimizer.state_dict()
        torch.save(checkpoint, path, **(torch_save_kwargs or {}))

    def load_checkpoint(self, *, path: str | os.PathLike, module: nn.Module, optimizer=None,
                        noise_scheduler=None, grad_clip_scheduler=None,
                        module_load_dict_kwargs: dict | None = None,
                        torch_load_kwargs: dict | None = None) -> dict:
        """Load what :meth:`save_checkpoint` saved into ``module`` and ``optimizer``; return the dict.

        The optimizer's state restores the ledger, step count and noise RNG together, so training
        resumes without re-using noise. Loads with ``weights_only=True`` unless ``torch_load_kwargs``
        says otherwise.

        Raises:
            ValueError: ``optimizer`` missing after ``make_private``, the checkpoint has no
                optimizer state, or a scheduler given.
        """
        _refuse_schedulers(noise_scheduler, grad_clip_scheduler)
        self._require_optimizer(optimizer, "load_checkpoint")
        checkpoint = torch.load(path, **{"weights_only": True, **(torch_load_kwargs or {})})
        module.load_state_dict(checkpoint["module_state_dict"], **(module_load_dict_kwargs or {}))
        if optimizer is None:
            self.accountant.load_state_dict(checkpoint["privacy_accountant_state_dict"])
        elif "optimizer_state_dict" not in checkpoint:
            raise ValueError("the checkpoint has no optimizer_state_dict; it was saved without the "
                             "optimizer, so the noise RNG and step count cannot be restored")
        else:
            optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
        return checkpoint

    def _require_optimizer(self, optimizer, what: str) -> None:
        if self._optimizer is None:
            return
        if optimizer is None:
            raise ValueError(f"{what} needs optimizer=: dpkit keeps the privacy ledger, the step count and "
                             "the noise RNG state in the DP optimizer's state_dict, and resuming without "
                             "them would re-use noise or lose spent privacy")
        if optimizer is not self._optimizer:
            raise ValueError(f"{what}: optimizer must be the one returned by this engine's make_private")


def _refuse_kwargs(kwargs: dict) -> None:
    if not kwargs:
        return
    adaptive = sorted(k for k in kwargs if k in _ADAPTIVE_KWARGS)
    if adaptive:
        raise TypeError(f"{adaptive} configure Opacus' adaptive clipping, which dpkit's make_private does "
                        "not offer; use clipping='flat' with a fixed max_grad_norm")
    raise TypeError(f"unsupported keyword argument(s) {sorted(kwargs)!r}: Opacus passes them to its "
                    "optimizer classes, dpkit has no equivalent. Remove them, or use dpkit.make_private")


def _refuse_schedulers(noise_scheduler, grad_clip_scheduler) -> None:
    if noise_scheduler is not None or grad_clip_scheduler is not None:
        raise ValueError("noise_scheduler and grad_clip_scheduler must be None: Opacus schedulers change "
                         "σ or C behind dpkit's accountant, which dpkit does not support")


def _clipping(clipping, max_grad_norm, module: nn.Module) -> tuple[str, float]:
    """(dpkit clip_scope, dpkit max_grad_norm) for Opacus' ``clipping`` and ``max_grad_norm``."""
    if clipping == "adaptive":
        raise ValueError("clipping='adaptive' is not supported: dpkit's make_private has no adaptive "
                         "clipping for DP-SGD. Use clipping='flat' with a fixed max_grad_norm")
    if clipping not in ("flat", "per_layer"):
        raise ValueError(f"clipping must be 'flat' or 'per_layer'; got {clipping!r}")
    is_list = isinstance(max_grad_norm, (list, tuple))
    if clipping == "flat":
        if is_list:
            raise TypeError("max_grad_norm must be a number with clipping='flat'; a list of "
                            f"per-parameter norms needs clipping='per_layer'; got {max_grad_norm!r}")
        return "flat", max_grad_norm
    if not is_list:
        raise TypeError("max_grad_norm must be a list of per-parameter norms with clipping='per_layer' "
                        f"(as in Opacus); got {max_grad_norm!r}")
    count = sum(1 for p in module.parameters() if p.requires_grad)
    if len(max_grad_norm) != count:
        raise ValueError(f"max_grad_norm must have one norm per trainable parameter tensor ({count}); "
                         f"got {len(max_grad_norm)}")
    if not all(isinstance(c, Real) and not isinstance(c, bool) and c > 0 for c in max_grad_norm):
        raise ValueError(f"max_grad_norm entries must be positive numbers; got {max_grad_norm!r}")
    if max(max_grad_norm) - min(max_grad_norm) > 1e-12 * max(max_grad_norm):
        raise ValueError("max_grad_norm must hold the SAME norm for every parameter with "
                         "clipping='per_layer': dpkit clips each of the P tensors to C/√P. Give "
                         f"[c] * {count}; got {max_grad_norm!r}")
    # Opacus' total norm sqrt(Σ c_i²) = c·√P; dpkit clips each tensor to C/√P = c with C = c·√P
    return "per_layer", float(max_grad_norm[0]) * math.sqrt(count)
