"""DPOptimizer: DP-SGD around ANY torch optimizer.

One logical step (Abadi et al., CCS 2016, Alg. 1, with Poisson sampling):

    ḡ = ( Σ_i c_i g_i  +  σ·C·z_t ) / B̄        then   base_optimizer.step() on ḡ

where c_i are the clip factors of the gradient engine, z_t the standardised noise of the noise
mechanism (i.i.d. N(0, I) for DP-SGD), σ the noise multiplier, C the clip norm and B̄ the PUBLIC
expected batch size (never the realised one). After the base step the step's DP event is composed
into the accountant, so the ledger always describes the steps that actually ran.

The wrapper shares ``param_groups``, ``state`` and ``defaults`` with the base optimizer, so
learning-rate schedulers and hooks act on both.
"""

from __future__ import annotations

import torch

from dpkit import _validate
from dpkit.accountants import accumulated_poisson_event, dpsgd_event
from dpkit.errors import AmbiguousStepError, PrivacyBudgetExceeded
from dpkit.grad_sample.engine import GradientEngine
from dpkit.mechanisms.noise import GaussianNoise, NoiseMechanism
from dpkit.mechanisms.randomness import broadcast_seed
from dpkit.optim.lazy_embedding import build_lazy_embedding_noise


class DPOptimizer(torch.optim.Optimizer):
    """Differentially private wrapper of a torch optimizer.

    Args:
        optimizer: the base ``torch.optim.Optimizer`` (SGD, Adam, AdamW, RMSprop, ...).
        engine: the :class:`dpkit.grad_sample.GradientEngine` attached to the model (it owns the
            clip norm and clipping style).
        noise_multiplier: σ ≥ 0; the noise std is σ·C on the clipped sum.
        expected_batch_size: public normaliser B̄ > 0 (e.g. sampling_rate × dataset size, as
            declared by the user, not counted from the data).
        step_event: the ``dp_accounting`` DpEvent of ONE logical step (built from the sampler's
            settings by :func:`dpkit.make_private`), or None to skip accounting.
        accountant: a :class:`dpkit.accountants.Accountant` instance receiving ``step_event`` after
            every logical step (or None).
        noise: a :class:`dpkit.mechanisms.noise.NoiseMechanism`; default i.i.d. Gaussian from
            ``generator`` (or OS entropy with ``secure_mode``).
        generator: ``torch.Generator`` whose ``initial_seed()`` seeds the default noise's keyed
            stream (reproducible runs); default OS entropy.
        secure_mode: draw the default noise from fresh OS entropy every step (see :class:`GaussianNoise`).
        distributed: data-parallel DP-SGD over ``torch.distributed`` (do NOT also wrap the model in
            DistributedDataParallel): every rank clips its own Poisson sample, the clipped sums are
            all-reduced, and the noise — drawn identically on every rank from the same seeded
            ``generator`` — is added once to the global sum, so all ranks take the same step.
            ``expected_batch_size`` is then the GLOBAL expected batch size.
        embedding_noise: ``"eager"`` (default: dense noise on every parameter every step) or
            ``"lazy"``: the ``nn.Embedding``/``nn.EmbeddingBag`` weights are updated sparsely and
            their noise is applied lazily, with the same distribution (LazyDP, Lim et al., ASPLOS
            2024; see :mod:`dpkit.optim.lazy_embedding`); needs base ``torch.optim.SGD`` (momentum
            with dampening 0 is handled exactly). A :class:`~dpkit.mechanisms.lazy.RowNoise` instance means ``"lazy"`` with
            that pending-noise source (e.g. the deterministic test probe).

    Raises:
        TypeError/ValueError: naming the bad argument; optimizer parameters that are not trainable
            parameters of the engine's model are refused (they would escape clipping).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, engine: GradientEngine,
                 noise_multiplier: float, expected_batch_size: float, step_event=None,
                 accountant=None, noise: NoiseMechanism | None = None,
                 generator: torch.Generator | None = None, secure_mode: bool = False,
                 distributed: bool = False, embedding_noise="eager"):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
        if isinstance(optimizer, DPOptimizer):
            raise TypeError("optimizer is already a DPOptimizer; wrap the base optimizer once")
        if not isinstance(engine, GradientEngine):
            raise TypeError(f"engine must be a dpkit GradientEngine; got {type(engine).__name__}")
        self._noise_multiplier = _validate.non_negative("noise_multiplier", noise_multiplier)
        self.expected_batch_size = _validate.positive("expected_batch_size", expected_batch_size)
        if noise is None:
            noise = GaussianNoise(generator, secure_mode=secure_mode)
        elif not isinstance(noise, NoiseMechanism):
            raise TypeError(f"noise must be a dpkit NoiseMechanism; got {type(noise).__name__}")
        if not isinstance(distributed, bool):
            raise TypeError(f"distributed must be a bool; got {distributed!r}")
        if distributed:
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                raise ValueError("distributed=True needs an initialised torch.distributed process group "
                                 "(call torch.distributed.init_process_group first)")
            if secure_mode:
                raise ValueError("distributed=True cannot use secure_mode: ranks must draw identical noise "
                                 "from a shared seed")
            # every rank must add the SAME noise (it is added once to the global sum): rank 0's
            # seed wins, whatever each rank was given
            noise_seed = getattr(noise, "seed", None)
            if noise_seed is None:
                raise ValueError("distributed=True needs a seeded noise mechanism (one with a .seed) so "
                                 "that every rank draws the same noise")
            noise.seed = broadcast_seed(noise_seed)
        self.distributed = distributed
        self.original_optimizer = optimizer
        self.engine = engine
        self.noise = noise
        self.step_event = step_event
        self.accountant = accountant
        self.steps = 0
        self.max_steps: int | None = None  # set when σ was calibrated for a planned run
        self.target: tuple[float, float] | None = None
        self._skip_next_step = False
        self._mid_logical_batch = False
        self._loader = None          # dpkit's DP loader, when make_private built one
        self._draws_since_step = 0   # logical batches it yielded since the last step
        self._contribution_hooks: list = []
        self._pending_sampler = None  # sampler state of a checkpoint loaded before a loader attached
        self._check_parameters()
        # torch.optim.Optimizer bookkeeping (hooks, profiling), then share the base's state
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.defaults = optimizer.defaults
        self._lazy = build_lazy_embedding_noise(
            embedding_noise, optimizer=optimizer, engine=engine, noise=noise, generator=generator,
            secure_mode=secure_mode, distributed=distributed,
            noise_std=self.noise_multiplier * engine.max_grad_norm,
            expected_batch_size=self.expected_batch_size)

    def _check_parameters(self) -> None:
        for p in self.engine.params:
            if p.dtype in (torch.float16, torch.bfloat16):
                raise TypeError(
                    f"parameter {self.engine.parameter_name(p)!r} is {p.dtype}: the clipped sum would be "
                    "rounded to low precision BEFORE the noise is added, and rounding of neighbouring "
                    "sums is not covered by the Gaussian mechanism's analysis. Keep float32 parameters "
                    "and train under torch.autocast(device_type, dtype=torch.bfloat16).")
        model_params = {id(p) for p in self.engine.params}
        for group in self.original_optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in model_params:
                    raise ValueError(
                        "optimizer holds a trainable parameter of shape "
                        f"{tuple(p.shape)} that is not a trainable parameter of the model passed to "
                        "dpkit; its gradient would escape per-example clipping. Build the optimizer "
                        "from model.parameters() of the same model.")

    @property
    def noise_multiplier(self) -> float:
        """σ of the run: fixed, because the accountant composes the event of THIS σ every step."""
        return self._noise_multiplier

    @noise_multiplier.setter
    def noise_multiplier(self, value) -> None:
        raise AttributeError("noise_multiplier is fixed for a dpkit run: the accountant composes the DP event "
                             "of the σ the optimizer was built with, so changing it (e.g. with a noise "
                             "scheduler) would add less noise than is accounted. Train with a constant σ.")

    @property
    def max_grad_norm(self) -> float:
        """C of the run: fixed, because the noise std σ·C and the sensitivity C are accounted together."""
        return self.engine.max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value) -> None:
        raise AttributeError("max_grad_norm is fixed for a dpkit run (the noise is σ·C and the account assumes "
                             "that C); build a new make_private setup to change it.")

    def _recalibrate(self, noise_multiplier: float, step_event) -> None:
        """Replace σ and the per-step event together, before the first step (DiceSGD calibration)."""
        if self.steps > 0:
            raise RuntimeError("σ can only be re-calibrated before the first step")
        self._noise_multiplier = _validate.non_negative("noise_multiplier", noise_multiplier)
        self.step_event = step_event

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    # ----------------------------------------------------------------- step
    def register_contribution_hook(self, hook):
        """Add ``hook(step, params) -> list[Tensor] | None`` to the clipped sum of every logical step.

        Used to insert audit canaries (e.g. :mod:`dpkit.audit.canaries`): the returned tensors
        (one per parameter, same shapes, or None for a parameter it leaves untouched) are added to
        Σ_i c_i g_i BEFORE noise and normalisation, exactly like extra clipped examples. The hook
        is responsible for bounding each canary's contribution by the clip norm. With
        ``embedding_noise="lazy"`` the hook receives (and must return tensors for) the dense
        parameters only. Returns a handle with ``remove()``.
        """
        if not callable(hook):
            raise TypeError(f"hook must be callable; got {type(hook).__name__}")
        self._contribution_hooks.append(hook)
        hooks = self._contribution_hooks

        class _Handle:
            def remove(self_inner):
                if hook in hooks:
                    hooks.remove(hook)
        return _Handle()

    def same_examples(self):
        """Context manager: the forward passes run inside it are views of the SAME examples.

        Use it for multi-view losses (consistency regularisation, R-Drop, two-view contrastive
        losses): each example's gradient is the sum over the passes, clipped once. See
        :meth:`dpkit.grad_sample.GradientEngine.same_examples`.
        """
        return self.engine.same_examples()

    def different_examples(self):
        """Context manager: each forward pass run inside it carries DIFFERENT examples (clipped
        separately). See :meth:`dpkit.grad_sample.GradientEngine.different_examples`."""
        return self.engine.different_examples()

    def attach_loader(self, loader) -> None:
        """Checkpoint ``loader``'s sampler with this optimizer and account its batches per step.

        Called by :meth:`dpkit.data.DPDataLoader.attach_optimizer`.

        Raises:
            ValueError: this optimizer already resumed a run (``steps > 0``) and the loader's
                sampler has a FIXED seed but no restored position: it would replay the batches
                the run already trained on. Attach before ``load_state_dict``.
        """
        if self.steps > 0 and loader.batch_sampler.seed_is_fixed and self._pending_sampler is None:
            raise ValueError("this optimizer resumed a run of {} steps, but the loader's seeded sampler "
                             "starts from its first batch and would replay the run's batches. Build the "
                             "loader with make_private BEFORE optimizer.load_state_dict(...)".format(self.steps))
        self._loader = loader
        if self._pending_sampler is not None:
            loader.load_state_dict(self._pending_sampler)
            self._pending_sampler = None

    def note_batch(self, size: int, *, new_draw: bool, last_chunk: bool, batch=None) -> None:
        """Called by the DP loader before it yields ``batch``, a physical batch of ``size`` examples.

        ``new_draw``: the batch starts a new sampled (logical) batch; ``last_chunk``: it ends one
        (virtual batches: the optimizer only accumulates until then). The engine is told the size
        (and the batch's tensors), so it knows the batch axis of every layer instead of guessing.
        """
        if new_draw:
            self._draws_since_step += 1
        self.signal_skip_step(not last_chunk)
        self.engine.expect_batch(size, batch)

    def signal_skip_step(self, do_skip: bool = True) -> None:
        """Make the next ``step()`` only accumulate (virtual batches: a non-final physical chunk)."""
        self._skip_next_step = bool(do_skip)

    # GradScaler hands itself to step(); dpkit refuses it (see step) instead of clipping scaled grads
    _step_supports_amp_scaling = True

    @torch.no_grad()
    def step(self, closure=None, grad_scaler=None):
        """Clip the pending per-example gradients, add noise once per logical step, step the base.

        If the data loader signalled that the current physical batch is not the last of its logical
        batch, only accumulates (no noise, no base step, no accounting).
        """
        if grad_scaler is not None:
            raise TypeError("torch.amp.GradScaler is not supported by DPOptimizer (per-example clipping "
                            "would see scaled gradients); train with torch.autocast(dtype=torch.bfloat16), "
                            "which needs no loss scaling")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.engine.accumulate()
        if self._skip_next_step:
            self._skip_next_step = False
            self._mid_logical_batch = True
            return loss
        if self.max_steps is not None and self.steps >= self.max_steps:
            target = "" if self.target is None else f" to reach ε={self.target[0]} at δ={self.target[1]}"
            raise PrivacyBudgetExceeded(
                f"noise_multiplier was calibrated for {self.max_steps} steps{target}; step {self.steps + 1} "
                "would exceed that budget. Plan a longer run (epochs=/steps=) when calling make_private.")
        event = self._event_of_this_step()
        self._mid_logical_batch = False
        self._check_all_gradients_seen()
        params = self.params
        if self._lazy is not None:  # lazy embedding tables: sparse update after the base step
            self._lazy.prepare()
            params = [p for p in params if not self._lazy.owns(p)]
        sums = [self.engine.clipped_sum(p) for p in params]
        for hook in self._contribution_hooks:
            extra = hook(self.steps, params)
            if extra is not None:  # a None entry: nothing to add to that parameter
                sums = [s if e is None else s + e for s, e in zip(sums, extra)]
        if self.distributed:
            _all_reduce_sum(sums)
        # after the all-reduce: every rank draws the SAME noise (same seed), so it counts once
        noise = self.noise.sample(self.steps, params) if self.noise_multiplier > 0 else None
        std = self.noise_multiplier * self.max_grad_norm
        for i, p in enumerate(params):
            grad = sums[i] if noise is None else sums[i] + std * noise[i]
            p.grad = grad / self.expected_batch_size
        self.original_optimizer.step()
        if self._lazy is not None:
            self._lazy.step(self.engine)
        self.engine.reset()
        if self.accountant is not None and event is not None:
            self.accountant.compose(event)
        self.steps += 1
        self._draws_since_step = 0
        return loss

    def _event_of_this_step(self):
        """The DP event of the step about to run, from the batches the DP loader yielded for it.

        One sampled batch (or none: a noise-only release) is ``step_event``. k ≥ 2 Poisson batches
        summed before one noise draw (gradient accumulation) is a Gaussian mechanism whose
        sensitivity is C times the number of those batches that hold the differing example,
        Binomial(k, q): a mixture of Gaussians (dp_accounting's MixtureOfGaussiansDpEvent). Without
        a dpkit loader (``data_loader=None``) the caller declared one Poisson batch per step.

        Raises:
            AmbiguousStepError: accumulation that dpkit cannot account here (fixed-size sampling,
                an accountant without mixture support, or a σ calibrated for one batch per step).
        """
        k = self._draws_since_step
        if self.step_event is None or self._loader is None or k <= 1:
            return self.step_event
        fix = ("Accumulate with virtual batches instead: make_private(..., max_physical_batch_size=M) "
               "keeps one sampled batch per step and splits it into chunks of at most M examples")
        if not self._loader.poisson:
            raise AmbiguousStepError(f"{k} fixed-size batches were accumulated into one step; their joint "
                                     f"replace-one sensitivity is not accounted by dpkit. {fix}.")
        if self.target is not None:
            raise AmbiguousStepError(f"{k} Poisson batches were accumulated into one step, but σ was "
                                     f"calibrated for ONE batch per step to reach ε={self.target[0]}. {fix}.")
        if self.step_event != dpsgd_event(self.noise_multiplier, self._loader.sample_rate, 1):
            raise AmbiguousStepError(f"{k} Poisson batches were accumulated into one step of a mechanism other "
                                     f"than plain DP-SGD (its event is {type(self.step_event).__name__}); "
                                     f"dpkit accounts accumulation for DP-SGD only. {fix}.")
        event = accumulated_poisson_event(self.noise_multiplier, self._loader.sample_rate, k)
        if self.accountant is not None and not self.accountant.supports(event):
            raise AmbiguousStepError(f"{k} Poisson batches were accumulated into one step; accountant "
                                     f"{self.accountant.name!r} cannot account that mixture (use 'pld'). {fix}.")
        return event

    def _check_all_gradients_seen(self) -> None:
        """A parameter with an autograd gradient but no per-example contribution was used outside
        the engine's hooks: refuse rather than train it without clipping."""
        for p in self.params:
            if p.grad is not None and id(p) not in self.engine.summed_grads and \
                    id(p) not in self.engine.sparse_sums and \
                    bool((p.grad._values() if p.grad.is_sparse else p.grad).ne(0).any()):
                raise RuntimeError(
                    f"parameter {self.engine.parameter_name(p)!r} received a gradient that dpkit's hooks "
                    "did not see (was the module called outside the model given to make_private?). Its "
                    "update cannot be clipped per example; the step was refused and nothing was spent.")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients; accumulated clipped sums survive inside a logical batch."""
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        if not self._mid_logical_batch:
            self.engine.reset()

    def flush(self) -> None:
        """Apply all pending lazy embedding noise now (no-op with ``embedding_noise="eager"``).

        Afterwards every embedding row holds what eager DP-SGD would hold. Runs automatically
        before ``model.state_dict()``, ``optimizer.state_dict()`` and eval-mode forward passes.
        """
        if self._lazy is not None:
            self._lazy.flush()

    # ------------------------------------------------------------ accounting
    def epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta`` (from the accountant's ledger)."""
        if self.accountant is None:
            raise RuntimeError("this DPOptimizer has no accountant; pass accountant= to track ε")
        return self.accountant.epsilon(_validate.delta("delta", delta))

    # ---------------------------------------------------------- checkpoints
    def state_dict(self):
        """Base optimizer state plus dpkit's: step count, accountant ledger, noise RNG state."""
        state = self.original_optimizer.state_dict()
        state["dpkit"] = {
            "steps": self.steps,
            "max_steps": self.max_steps,
            "noise": self.noise.state_dict(),
            "accountant": self.accountant.state_dict() if self.accountant is not None else None,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "expected_batch_size": self.expected_batch_size,
            "lazy": self._lazy.state_dict() if self._lazy is not None else None,  # flushes first
            "sampler": self._loader.state_dict() if self._loader is not None else None,
            "target": self.target,
            # stateful contribution hooks (DiceSGD's hidden error state: PRIVATE, like the data)
            "hooks": [h.state_dict() if hasattr(h, "state_dict") else None for h in self._contribution_hooks],
        }
        return state

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        dp_state = state_dict.pop("dpkit", None)
        if dp_state is None:
            raise ValueError("state_dict has no 'dpkit' entry: it was not saved by a DPOptimizer, so the "
                             "privacy ledger cannot be restored")
        for key in ("noise_multiplier", "max_grad_norm", "expected_batch_size"):
            if abs(dp_state[key] - getattr(self, key)) > 1e-12 * max(1.0, abs(dp_state[key])):
                raise ValueError(f"checkpoint was trained with {key}={dp_state[key]}; this optimizer "
                                 f"has {getattr(self, key)}. Build it with the same settings.")
        hook_states = [st for st in dp_state.get("hooks") or [] if st is not None]
        stateful = [h for h in self._contribution_hooks if hasattr(h, "load_state_dict")]
        if len(hook_states) != len(stateful):
            raise ValueError(f"checkpoint holds the state of {len(hook_states)} stateful contribution hook(s) "
                             f"(e.g. DiceSGD error feedback); this optimizer has {len(stateful)}. Build it "
                             "with the same error_feedback / audit settings.")
        sampler = dp_state.get("sampler")
        if self._loader is not None and sampler is None and dp_state["steps"] > 0 and \
                self._loader.batch_sampler.seed_is_fixed:
            raise ValueError("checkpoint holds no sampler state, and this optimizer's loader has a fixed "
                             "seed: it would replay the batches the run already trained on. Start a new "
                             "run or build the loader without a fixed seed.")
        # checks done: restore (each part validates its own state before changing anything)
        if self._loader is not None and sampler is not None:
            self._loader.load_state_dict(sampler)
        self.noise.load_state_dict(dp_state["noise"])
        for hook, st in zip(stateful, hook_states):
            hook.load_state_dict(st)
        self.original_optimizer.load_state_dict(state_dict)
        self.param_groups = self.original_optimizer.param_groups
        self.state = self.original_optimizer.state
        self.steps = dp_state["steps"]
        self.max_steps = dp_state.get("max_steps", self.max_steps)
        if dp_state.get("target") is not None:
            self.target = tuple(dp_state["target"])
        if self._loader is None:
            self._pending_sampler = sampler
        self._draws_since_step = 0
        if self.accountant is not None and dp_state["accountant"] is not None:
            self.accountant.load_state_dict(dp_state["accountant"])
        if self._lazy is not None:
            self._lazy.load_state_dict(dp_state.get("lazy"), steps=self.steps)

    def __repr__(self):
        return (f"DPOptimizer(noise_multiplier={self.noise_multiplier}, max_grad_norm={self.max_grad_norm}, "
                f"expected_batch_size={self.expected_batch_size}, base={self.original_optimizer!r})")



def _all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum ``tensors`` over all ranks in place (one flat buffer, one collective)."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n
