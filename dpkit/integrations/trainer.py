"""DP-SGD inside a Hugging Face ``Trainer``: :class:`DPTrainer`.

``DPTrainer`` is a ``transformers.Trainer`` whose training is the mechanism dpkit accounts
(Abadi et al., CCS 2016, Alg. 1, with Poisson sampling):

* **Sampling.** The Trainer's shuffled sampler is replaced by dpkit's Poisson loader
  (:func:`dpkit.make_private`) over the same ``train_dataset`` and ``data_collator``: each optimizer
  step draws ONE Poisson batch at rate q = B/N, where the expected (logical) batch size is
  B = ``per_device_train_batch_size`` × ``gradient_accumulation_steps``.
* **Gradient accumulation** is mapped onto dpkit's virtual batches: the drawn batch is split into
  physical chunks of at most ``per_device_train_batch_size`` examples, each chunk runs its own
  forward/backward pass, and the noise is added ONCE, on the last chunk. So
  ``gradient_accumulation_steps`` changes memory use, never the mechanism (k independent Poisson
  batches per step would be a different, costlier mechanism; see docs/training.md). The Trainer
  itself runs with one loader item (one logical batch) per optimizer step.
* **Clipping and noise** are dpkit's (:class:`dpkit.DPOptimizer` around the optimizer the Trainer
  builds, or the one given in ``optimizers=``); the Trainer's own batch-gradient clipping
  (``TrainingArguments.max_grad_norm``) is switched off, and the non-private gradient norm it would
  log (``grad_norm``) is not computed.
* **Accounting.** ``epsilon`` at the run's δ is added to every log entry (so it lands in
  ``trainer.state.log_history`` and ``trainer_state.json``); the accountant's ledger, the noise
  seed and the sampler's position travel in the checkpoint's ``optimizer.pt``, so
  ``train(resume_from_checkpoint=...)`` continues the run: same ledger, no replayed batch or noise.

Losses must be per-example separable: the loss of a chunk must be the mean over its examples of
each example's own loss (dpkit recovers per-example gradients from it). A token-level loss averaged
over ALL label tokens of the chunk couples the examples when they carry different numbers of label
tokens (-100 padding), so such a chunk is refused unless a ``compute_loss_func`` is given.

Nothing here is imported by ``import dpkit``; ``pip install dpkit[hf]`` installs transformers.
"""

from __future__ import annotations

import copy
import os
import warnings

import torch
from torch.utils.data import DataLoader, IterableDataset

try:
    import transformers
    from transformers.trainer import OPTIMIZER_NAME
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError("dpkit.integrations.trainer needs Hugging Face transformers: "
                      "pip install dpkit[hf]") from None

from dpkit import _validate
from dpkit.optim.dp_optimizer import DPOptimizer
from dpkit.privacy_engine import make_private

__all__ = ["DPTrainer", "LogicalBatch"]


class DPTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that trains with DP-SGD and reports ε.

    Args:
        model: the model (float32 parameters; ``bf16=True`` autocast is fine). Per-example hooks
            are attached to it when training starts.
        args: the ``TrainingArguments``. ``per_device_train_batch_size`` × ``gradient_accumulation_steps``
            is the expected batch size B of each step (q = B / len(train_dataset));
            ``per_device_train_batch_size`` is the largest physical chunk. The DPTrainer keeps a copy
            with ``gradient_accumulation_steps=1`` (one logical batch per loader item),
            ``max_grad_norm=0`` and ``ignore_data_skip=True`` (a resumed run continues from the
            sampler position in the checkpoint); ``self.args`` is that copy.
        max_grad_norm: per-example clip norm C > 0.
        noise_multiplier: σ ≥ 0. Exactly one of ``noise_multiplier`` and ``target_epsilon``.
        target_epsilon: calibrate σ so that the planned run (``max_steps``, or
            ``num_train_epochs`` × ceil(N / B) steps) spends at most this ε at ``target_delta``;
            the optimizer refuses to step beyond that run.
        target_delta: δ of the run: the δ at which ε is calibrated (with ``target_epsilon``) and
            logged. Required.
        accountant: accountant name (``"pld"``, ``"rdp"``, ``"prv"``, ``"gdp"``) or instance.
        clipping: gradient engine, ``"bk"`` (book-keeping, default) or ``"per_sample"``.
        clip_scope: ``"flat"`` or ``"per_layer"``.
        generator: a ``torch.Generator`` seeding the sampler and the noise (reproducible runs; anyone
            who knows the seed can remove the noise). Default: OS entropy.
        secure_mode: draw noise and Poisson coins from fresh OS entropy (see :func:`dpkit.make_private`).
        **trainer_kwargs: the other ``transformers.Trainer`` arguments (``train_dataset``,
            ``data_collator``, ``eval_dataset``, ``optimizers``, ``callbacks``, ...), passed on.

    Raises:
        TypeError: ``args`` is not a ``TrainingArguments``; ``train_dataset`` is missing, iterable
            or has no length.
        ValueError: ``fp16=True`` (GradScaler loss scaling; use ``bf16=True``), ``save_only_model=True``
            (the checkpoint would lose the privacy ledger), ``auto_find_batch_size``, ``model_init``,
            DeepSpeed/FSDP or several processes/GPUs, and bad DP arguments (named by
            :func:`dpkit.make_private` when training starts).

    Warns:
        UserWarning: ``TrainingArguments.max_grad_norm`` > 0 is overridden to 0: the Trainer would
            clip the (non-private) batch gradient, which dpkit replaces by per-example clipping at
            ``max_grad_norm`` of the DPTrainer.
    """

    def __init__(self, model=None, args=None, *, max_grad_norm: float, noise_multiplier: float | None = None,
                 target_epsilon: float | None = None, target_delta: float, accountant="pld",
                 clipping: str = "bk", clip_scope: str = "flat", generator: torch.Generator | None = None,
                 secure_mode: bool = False, **trainer_kwargs):
        if not isinstance(args, transformers.TrainingArguments):
            raise TypeError("args must be a transformers.TrainingArguments (its per_device_train_batch_size × "
                            f"gradient_accumulation_steps is the DP batch size); got {type(args).__name__}")
        _check_train_dataset(trainer_kwargs.get("train_dataset"))
        if trainer_kwargs.get("model_init") is not None:
            raise ValueError("model_init is not supported by DPTrainer (a re-initialised model would escape the "
                             "hooks and the ledger of the run); pass model= instead")
        _check_args(args)
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier and target_epsilon; got "
                             f"noise_multiplier={noise_multiplier!r}, target_epsilon={target_epsilon!r}")
        self.dp_settings = {
            "max_grad_norm": _validate.positive("max_grad_norm", max_grad_norm),
            "noise_multiplier": noise_multiplier, "target_epsilon": target_epsilon, "accountant": accountant,
            "clipping": clipping, "clip_scope": clip_scope, "generator": generator, "secure_mode": secure_mode,
        }
        self.target_delta = _validate.delta("target_delta", target_delta)
        self.logical_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps
        self.dp_optimizer: DPOptimizer | None = None
        self.dp_loader = None
        self._logical_batches = None
        super().__init__(model=model, args=_internal_args(args), **trainer_kwargs)

    # -------------------------------------------------------------- private setup
    def create_optimizer(self, model=None):
        """Build the Trainer's optimizer (or take the one in ``optimizers=``) and make it private.

        On the first call, :func:`dpkit.make_private` wraps it in a :class:`dpkit.DPOptimizer` and
        builds the Poisson loader over ``train_dataset``; later calls return the same optimizer.

        Returns:
            the optimizer the Trainer steps (the DPOptimizer, possibly wrapped by accelerate).
        """
        if self.dp_optimizer is None:
            base = super().create_optimizer(model)
            if isinstance(base, DPOptimizer):
                raise TypeError("optimizers= holds a DPOptimizer; give DPTrainer the base torch optimizer "
                                "(it makes it private itself)")
            self._make_private(base)
        return self.optimizer

    def _make_private(self, base: torch.optim.Optimizer) -> None:
        """make_private over the train dataset with the logical batch and per-device chunks."""
        dataset, collator = self.train_dataset, self.data_collator
        if _is_hf_dataset(dataset):
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        loader = DataLoader(dataset, batch_size=self.logical_batch_size, collate_fn=collator,
                            num_workers=self.args.dataloader_num_workers,
                            pin_memory=self.args.dataloader_pin_memory)
        s = self.dp_settings
        plan = {}
        if s["target_epsilon"] is not None:
            plan = {"target_epsilon": s["target_epsilon"], "target_delta": self.target_delta}
            plan.update({"steps": self.args.max_steps} if self.args.max_steps > 0
                        else {"epochs": self.args.num_train_epochs})
        _, self.dp_optimizer, self.dp_loader = make_private(
            self.model, base, loader, max_grad_norm=s["max_grad_norm"], noise_multiplier=s["noise_multiplier"],
            accountant=s["accountant"], clipping=s["clipping"], clip_scope=s["clip_scope"],
            max_physical_batch_size=self.args.per_device_train_batch_size, generator=s["generator"],
            secure_mode=s["secure_mode"], **plan)
        self._logical_batches = _LogicalBatches(self.dp_loader, self.dp_optimizer)
        self.optimizer = self.dp_optimizer

    def get_train_dataloader(self):
        """One item per optimizer step: a :class:`LogicalBatch` over dpkit's Poisson loader.

        Builds the private setup first (:meth:`create_optimizer`): the Trainer asks for the loader
        before it builds the optimizer.
        """
        self.create_optimizer()
        return self._logical_batches

    # --------------------------------------------------------------------- steps
    def training_step(self, model, inputs, num_items_in_batch=None):
        """Forward/backward every physical chunk of one logical batch; noise comes at the Trainer's step.

        Non-final chunks are accumulated by the DPOptimizer (clipped, no noise); the Trainer then
        calls ``optimizer.step()`` once, which clips the last chunk, adds the noise once and steps.
        An empty Poisson batch runs no forward pass (the step still adds noise and is accounted).

        Returns:
            the mean training loss over the examples of the logical batch (0 for an empty batch).
            It is NOT private (as in any DP-SGD loop that prints its loss).
        """
        if not isinstance(inputs, LogicalBatch):
            raise TypeError("DPTrainer trains on the logical batches of its own DP loader; got "
                            f"{type(inputs).__name__} (do not override get_train_dataloader)")
        total, seen = None, 0
        for chunk, size, last in inputs:
            if size > 0:
                loss = super().training_step(model, chunk) * size
                self.current_flos += float(super().floating_point_ops(chunk))
                total = loss if total is None else total + loss
                seen += size
            if not last:
                self.dp_optimizer.step()       # accumulate this chunk's clipped sum (no noise)
                self.dp_optimizer.zero_grad()  # keeps the accumulated sums inside the logical batch
        if total is None:
            return torch.zeros((), device=self.args.device)
        return total / seen

    def floating_point_ops(self, inputs) -> int:
        """0 for a logical batch: :meth:`training_step` counts each chunk's operations itself."""
        if isinstance(inputs, LogicalBatch):
            return 0
        return super().floating_point_ops(inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The Trainer's loss of one chunk, refused in training when it couples the chunk's examples.

        ``num_items_in_batch`` is never passed on in training: it normalises by the label tokens
        of the whole step, a data-dependent constant shared by all examples.

        Raises:
            ValueError: token-level labels whose number of non-ignored (-100) targets differs
                between the chunk's examples, with the model's own loss (mean over all tokens).
        """
        if model.training:
            if self.compute_loss_func is None:
                _check_separable(inputs.get("labels") if isinstance(inputs, dict) else None,
                                 shifted=getattr(self, "_loss_shifts_labels", False))
            num_items_in_batch = None
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def _get_grad_norm(self, model, grad_norm=None):
        """None: the norm of the gradient before dpkit's step is not private, so it is not logged."""
        return None

    # ----------------------------------------------------------------- accounting
    def epsilon(self, delta: float | None = None) -> float:
        """ε spent so far at ``delta`` (default: the run's ``target_delta``), from the ledger.

        Raises:
            RuntimeError: training has not started (there is no DPOptimizer yet).
        """
        if self.dp_optimizer is None:
            raise RuntimeError("no DP step has run yet: call train() first")
        return self.dp_optimizer.epsilon(self.target_delta if delta is None else delta)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log entry plus ``epsilon`` (at ``target_delta``) once training has started."""
        if self.dp_optimizer is not None:
            logs = {**logs, "epsilon": self.epsilon()}
        super().log(logs, start_time)

    # ---------------------------------------------------------------- checkpoints
    def _load_optimizer_and_scheduler(self, checkpoint):
        """Restore the optimizer (ledger, noise stream, sampler position) and check it was restored.

        Raises:
            ValueError: the checkpoint has no ``optimizer.pt`` or its DP step count differs from
                the Trainer's ``global_step`` (the ledger would not describe the run).
        """
        if checkpoint is not None and not os.path.isfile(os.path.join(checkpoint, OPTIMIZER_NAME)):
            raise ValueError(f"checkpoint {checkpoint!r} has no {OPTIMIZER_NAME}: it holds dpkit's privacy "
                             "ledger, noise stream and sampler position, so the run cannot be resumed from it")
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.dp_optimizer.steps != self.state.global_step:
            raise ValueError(f"checkpoint {checkpoint!r} restored {self.dp_optimizer.steps} DP steps but the "
                             f"Trainer is at global_step {self.state.global_step} (was the scheduler file "
                             "missing?); the ledger would not describe the run")


class LogicalBatch:
    """The physical chunks of ONE Poisson draw, read lazily (what the Trainer sees as one batch).

    Iterating yields ``(chunk, size, is_last)``; each chunk is pulled from dpkit's loader only when
    its turn comes, because the loader tells the DPOptimizer about a chunk as it yields it.
    """

    def __init__(self, chunks, boundary):
        self._chunks = chunks
        self._boundary = boundary
        self.consumed = False

    def __contains__(self, key) -> bool:
        return False  # no "labels"/"input_ids" at this level: the Trainer counts nothing across chunks

    def __iter__(self):
        if self.consumed:
            raise RuntimeError("a logical batch can be read once (its chunks drive the DP optimizer)")
        while True:
            chunk = next(self._chunks)
            last = self._boundary.last_chunk
            yield chunk, self._boundary.size, last
            if last:
                self.consumed = True
                return


class _ChunkBoundary:
    """Forwards the loader's batch reports to the DPOptimizer and remembers where a draw ends."""

    def __init__(self, optimizer: DPOptimizer):
        self.optimizer = optimizer
        self.last_chunk, self.size = True, 0

    def attach_loader(self, loader) -> None:
        self.optimizer.attach_loader(loader)

    def note_batch(self, size, *, new_draw, last_chunk, batch=None) -> None:
        self.optimizer.note_batch(size, new_draw=new_draw, last_chunk=last_chunk, batch=batch)
        self.last_chunk, self.size = last_chunk, size


class _LogicalBatches:
    """One pass of the DP loader as ``len(loader)`` logical batches (the Trainer's train loader)."""

    def __init__(self, loader, optimizer: DPOptimizer):
        self.loader = loader
        self.dataset = loader.dataset
        self._boundary = _ChunkBoundary(optimizer)
        loader.attach_optimizer(self._boundary)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        chunks = iter(self.loader)
        for _ in range(len(self.loader)):
            batch = LogicalBatch(chunks, self._boundary)
            yield batch
            if not batch.consumed:
                raise RuntimeError("the Trainer asked for the next logical batch before training on this one; "
                                   "its Poisson draw would be lost from the account")


# ----------------------------------------------------------------- validation
def _check_train_dataset(dataset) -> None:
    if dataset is None:
        raise TypeError("train_dataset is required: DPTrainer Poisson-samples it (q = B / len(train_dataset))")
    if isinstance(dataset, IterableDataset):
        raise TypeError("train_dataset must be a map-style dataset with a length; an IterableDataset cannot "
                        "be Poisson-sampled (each example must be kept independently with probability q)")
    try:
        len(dataset)
    except TypeError:
        raise TypeError(f"train_dataset must have a length (map-style); got {type(dataset).__name__}") from None


def _check_args(args) -> None:
    if args.fp16:
        raise ValueError("fp16=True is not supported: GradScaler loss scaling would reach the per-example "
                         "clipping scaled; use bf16=True (autocast, no scaler) with float32 weights")
    if args.save_only_model:
        raise ValueError("save_only_model=True is not supported: the checkpoint's optimizer.pt holds the privacy "
                         "ledger, noise stream and sampler position a resumed run needs")
    if args.auto_find_batch_size:
        raise ValueError("auto_find_batch_size=True is not supported: the batch size fixes the sampling rate q "
                         "of the account; set per_device_train_batch_size (memory) and "
                         "gradient_accumulation_steps (logical batch) yourself")
    if args.deepspeed or args.fsdp:
        raise ValueError("DeepSpeed and FSDP are not supported by DPTrainer")
    if args.world_size > 1 or args.n_gpu > 1:
        raise ValueError(f"DPTrainer runs on one device (world_size={args.world_size}, n_gpu={args.n_gpu}); "
                         "for data parallelism use dpkit.make_private(..., distributed=True) in your own loop")
    if args.max_grad_norm:
        warnings.warn(f"TrainingArguments.max_grad_norm={args.max_grad_norm} is ignored (set to 0): the Trainer "
                      "would clip the non-private batch gradient, which dpkit replaces by per-example clipping "
                      "at DPTrainer(max_grad_norm=...)", UserWarning, stacklevel=3)


def _internal_args(args):
    """The Trainer's copy of ``args``: one logical batch per optimizer step, no batch clipping, and
    no batch skipping on resume (the sampler position is restored from the checkpoint instead)."""
    args = copy.copy(args)
    args.gradient_accumulation_steps = 1
    args.max_grad_norm = 0.0
    args.ignore_data_skip = True
    return args


def _check_separable(labels, *, shifted: bool) -> None:
    """Refuse token-level labels with per-example target counts that differ (a coupled mean loss)."""
    if not isinstance(labels, torch.Tensor) or labels.dim() < 2 or labels.shape[0] < 2:
        return
    targets = labels[..., 1:] if shifted else labels
    counts = targets.ne(-100).flatten(1).sum(1)
    if bool((counts != counts[0]).any()):
        raise ValueError(
            "the model's loss averages over all label tokens of the batch, and these examples have different "
            f"numbers of label tokens ({counts.tolist()}): each example's gradient would depend on the others, "
            "which per-example clipping does not bound. Give every example the same number of label tokens "
            "(pack the text into fixed-length blocks), or pass compute_loss_func=... returning the mean over "
            "examples of each example's own loss")


def _is_hf_dataset(dataset) -> bool:
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(dataset, datasets.Dataset)
