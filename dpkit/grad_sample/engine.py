"""The gradient engine: per-example clipping of a model's gradients from ONE backward pass.

Hooks on every module that owns parameters keep what its rule needs from the forward pass
(activations) and the output gradients from the backward pass. :meth:`GradientEngine.accumulate`
then turns them into per-example norms, clip factors and the clipped SUM Σ_i c_i g_i, added to a
running sum (several physical batches may make up one logical batch). Capture depends on autograd
only (grad enabled), not on ``module.training``: training in eval mode (dropout off) is clipped
like any other step, and ``torch.no_grad()`` evaluation records nothing.

Engines (``mode``):

* ``"bk"`` — book-keeping (Bu, Wang, Zha, Karypis, ICML 2023): layers with a linear view never
  materialise per-example gradients when the ghost norm is cheaper; the clipped sum is one extra
  matrix product per layer.
* ``"per_sample"`` — every per-example gradient is materialised (Opacus-style hooks); a reference
  and a fallback.

Layers without a rule use the torch.func fallback; cross-example layers are refused at wrap time.

**Forward passes and examples.** Every forward pass of the model opens a *generation*: the
records (activations, later output gradients) of the layers it runs. A record is owned by the
autograd graph until its first output gradient arrives, so a pass whose output never reaches a
backward (metrics, validation with grad enabled) is freed with its graph and never counts.
Generations are clipped at the next forward pass after their backward, or at :meth:`accumulate`:

* generations that received gradients in DIFFERENT backward passes are separate sets of examples
  (gradient accumulation: forward, backward, forward, backward);
* two or more generations whose gradients arrived in the SAME backward pass (a multi-view loss
  ``ce(m(x), y) + ((m(x) - m(x_aug))**2).sum()``) are ambiguous — one example reaches the update
  through several passes, and clipping each pass separately would let it move the update by k·C —
  and raise :class:`dpkit.errors.AmbiguousStepError` unless declared: passes inside
  :meth:`same_examples` form one generation (the per-example gradient is the sum over the passes,
  clipped once, exactly like a layer used twice in one pass); passes inside
  :meth:`different_examples` are separate sets of examples.

**Batch axis.** Every captured use is matched to the batch size n of its generation: n declared
by :meth:`expect_batch` (dpkit's data loader does it for each batch; it applies to a forward pass
fed that batch, or whose inputs carry n examples on axis 0) or, undeclared, inferred from
agreement — the first use whose layer fixes its batch axis, else axis 0 of the first use.

* Layers whose API fixes the batch axis (convolutions, GroupNorm/InstanceNorm, EmbeddingBag,
  attention, RNNs and Transformer layers through ``batch_first``, layers inside an
  ``nn.Transformer*`` module through its ``batch_first``, layers inside a model whose class is
  registered batch-first (Hugging Face models: their API takes (batch, ...) inputs, see
  :func:`dpkit.grad_sample.registry.register_batch_first`), registered custom rules: axis 0, or an
  axis given to :meth:`set_batch_axis`) must have size n on that axis.
* Position-wise layers (Linear, LayerNorm, RMSNorm, Embedding) accept any leading axis: the batch
  is the ONE non-feature axis of size n, so a time-major (T, B, d) input with T ≠ B is clipped
  per example exactly. When several axes have size n (T == B), the axis proven for that layer by
  an earlier batch (where it was the only one, with n declared or read on a time-major layer) is
  kept; else, if n was read on axis 0 (undeclared, batch-first convention), axis 0; else the step
  is refused with AmbiguousStepError naming the layer (fix: :meth:`set_batch_axis`). n ≤ 1 is
  never ambiguous (every choice groups the same values).
* An embedding fed ids with size 1 on axis 0 (position ids (1, T) broadcast over the batch) is
  expanded, when n is declared, to n rows (a view of the ids; the looked-up (n, T, d) output is
  what the broadcast add materialises anyway), so example i's gradient arrives as row i. With
  T == n this looks exactly like a time-major tensor with one time step: refused unless declared
  (``set_batch_axis(0, name)``) or proven by an earlier batch.

A tensor a module builds from a parameter and broadcasts over the batch INSIDE its forward (T5's
relative position bias, looked up with (q, k) ids) gives that parameter only the sum of the
examples' gradients; a module class registered with
:func:`dpkit.grad_sample.registry.register_per_example_inputs` gets a per-example copy of it
while a step is recorded (the ``transformers`` integration does it for T5). Other such layers are
refused: no axis of their tensors holds the batch.

Without a declaration a time-major model whose layers all see (T, B, d) cannot be told from a
batch-first one with batch T: let dpkit's loader declare n.

**Parameters used outside their module** (``logits = h @ wte.weight.T``) get autograd gradient no
hook saw; :meth:`accumulate` compares autograd's gradient of every parameter with what the engine
captured and refuses a mismatch, naming the parameter (tie through a module instead).

Output gradients that arrive in a backward pass computing no parameter gradient
(``torch.autograd.grad(loss, x)``, e.g. crafting adversarial examples) are not training gradients
and are ignored: the examples count once, through the pass that trains.

**Copies.** ``copy.deepcopy(model)`` (EMA or evaluation copies) gives a plain model: the copy's
layers run their class's forward with the copy's weights and record nothing.
"""

from __future__ import annotations

import contextlib
import math
import types
import weakref
from collections import defaultdict

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from dpkit import _validate
from dpkit.errors import AmbiguousStepError
from dpkit.grad_sample.attention import (
    AttentionInProjectionRule,
    make_bk_attention_forward,
    supports_bk_attention,
)
from dpkit.grad_sample.bk_forward import bk_apply, supports_bk_forward
from dpkit.grad_sample.contributions import (
    ConvWeightGrad,
    EmbeddingRowGrad,
    ExplicitGrad,
    LinearWeightGrad,
    combine,
)
from dpkit.grad_sample.functorch_fallback import FunctorchFallback, output_axes
from dpkit.grad_sample.layers import (
    ConvRule,
    EmbeddingBagRule,
    EmbeddingRule,
    LayerNormRule,
    LinearRule,
    LinearViewRule,
    RMSNormRule,
    rule_for,
)
from dpkit.grad_sample.registry import is_batch_first, per_example_inputs_hook
from dpkit.grad_sample.rnn import check_rnn
from dpkit.grad_sample.rnn_rule import RECURRENT_TYPES, RecurrentRule
from dpkit.grad_sample.validation import check_model

ENGINES = ("bk", "per_sample")
# modules that use their children's parameters functionally (the children are never called)
ATOMIC_MODULES = (nn.MultiheadAttention,)
CLIP_SCOPES = ("flat", "per_layer")
CLIP_FUNCTIONS = ("standard", "automatic")
# rules that accept any leading axes; value: number of trailing feature axes of the output
_POSITIONWISE = {LinearRule: lambda m: 1, EmbeddingRule: lambda m: 1,
                 LayerNormRule: lambda m: len(m.normalized_shape),
                 RMSNormRule: lambda m: len(m.normalized_shape)}
# containers whose batch_first fixes the batch axis of the layers they call
_TRANSFORMERS = (nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder,
                 nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_MULTI_PASS_FIX = ("run the forward passes inside `with optimizer.same_examples():` if they see the "
                   "SAME examples (e.g. two views of one batch: each example's gradient is summed over "
                   "the passes and clipped once) or inside `with optimizer.different_examples():` if "
                   "each pass carries different examples (each clipped separately)")


class _Generation:
    """The records of one forward pass (or of one ``same_examples`` block)."""

    def __init__(self, index: int, kind: str | None, n: int | None, sink: dict, trains):
        self.index, self.kind, self.n = index, kind, n
        self.trains = trains  # () -> bool: does the running backward compute parameter gradients?
        self.uses: dict = {}  # module -> [weakref to _Record]: the autograd graph owns the records
        self.done: dict = {}  # module -> [_Record] whose output gradient arrived (owned here)
        self.backwards: set[int] = set()  # autograd graph tasks that delivered gradients
        self._sink = sink  # the engine's generations waiting to be clipped

    def arrived(self, record) -> None:
        self.backwards.add(torch._C._current_graph_task_id())
        if not record.has_grad:
            record.has_grad = True
            self.done.setdefault(record.module, []).append(record)
            self._sink[self.index] = self

    def release(self) -> None:
        """Break the generation <-> record references once clipped (frees the activations now)."""
        self.done.clear()
        self.uses.clear()


class _Slots(list):
    """Output-gradient slots of a record; storing a gradient files the record with its generation."""

    def __init__(self, n: int, record):
        super().__init__([None] * n)
        self._record = weakref.ref(record)

    def __setitem__(self, index, value):
        record = self._record()
        if record is not None and not record.gen.trains():
            return  # torch.autograd.grad w.r.t. inputs only (e.g. adversarial examples): not training
        super().__setitem__(index, value)
        if record is not None:
            record.gen.arrived(record)


class _Record(list):
    """``[captured, output-gradient slots]`` of one use of a layer (rules index it as a pair)."""

    def __init__(self, captured, n_outputs: int):
        super().__init__([captured, _Slots(n_outputs, self)])
        self.has_grad = False
        self.gen = None
        self.module = None


class _EngineForward:
    """A layer's forward while the engine is attached. ``copy.deepcopy`` of the model gives the
    copy its class's plain forward: the copy computes with its own weights and records nothing."""

    def __init__(self, module: nn.Module, fn):
        self.module, self.fn = module, fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo):
        copy = memo.get(id(self.module), self.module)
        return types.MethodType(type(copy).forward, copy)


class GradientEngine:
    """Per-example clipping for every trainable parameter of ``model``.

    Args:
        model: the model; validated at construction (cross-example layers raise
            :class:`dpkit.UnsupportedModuleError` naming the module).
        max_grad_norm: clip norm C > 0 (total over all parameters with ``clip_scope="flat"``).
        mode: ``"bk"`` (default) or ``"per_sample"``.
        clip_scope: ``"flat"`` (one norm over all parameters) or ``"per_layer"`` (each parameter
            tensor clipped to C/√P, P the number of tensors trainable AT THIS STEP, so the total
            contribution stays ≤ C when parameters are frozen or unfrozen later).
        clip_function: ``"standard"`` (c_i = min(1, C/‖g_i‖)) or ``"automatic"`` (c_i = C/(‖g_i‖+γ),
            Bu, Mao, Xu, NeurIPS 2023, "Automatic clipping", Eq. 4; ‖c_i g_i‖ < C always).
        loss_reduction: ``"mean"`` if the loss averages over the batch (the captured output
            gradients are multiplied back by the physical batch size) or ``"sum"``.
        stability: γ of automatic clipping.
        track_unclipped: also accumulate the UNCLIPPED sum Σ_i g_i (error-feedback methods such as
            DiceSGD need both sums of the same batch); read it with :meth:`unclipped_sum`.
            :meth:`bound_unclipped` makes it the sum clipped at a larger bound G instead.

    Raises:
        ValueError/TypeError: bad arguments, named.
        UnsupportedModuleError: BatchNorm and other cross-example layers.

    Norms and clip factors are kept in float32 or wider and clipped sums are formed in float32 or
    wider, so a bf16/fp16 autocast step cannot push a contribution past C by rounding the factor.
    """

    def __init__(self, model: nn.Module, *, max_grad_norm: float, mode: str = "bk",
                 clip_scope: str = "flat", clip_function: str = "standard",
                 loss_reduction: str = "mean", stability: float = 0.01, track_unclipped: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        _refuse_attached(model)
        self.max_grad_norm = _validate.positive("max_grad_norm", max_grad_norm)
        self.mode = _validate.one_of("clipping", mode, ENGINES)
        self.clip_scope = _validate.one_of("clip_scope", clip_scope, CLIP_SCOPES)
        self.clip_function = _validate.one_of("clip_function", clip_function, CLIP_FUNCTIONS)
        self.loss_reduction = _validate.one_of("loss_reduction", loss_reduction, ("mean", "sum"))
        self.stability = _validate.positive("stability", stability)
        check_model(model)
        self.model = model
        if not self.params:
            raise ValueError("model must have at least one trainable parameter (requires_grad=True); "
                             "got none")
        self._names = {id(p): n for n, p in model.named_parameters()}
        # every module with parameters gets hooks (frozen ones record nothing while frozen), so
        # that unfreezing a layer later is still clipped
        self._owners: list[tuple[str, nn.Module, object]] = []
        atomic_prefixes: list[str] = []
        for name, module in model.named_modules():
            if any(name.startswith(prefix) for prefix in atomic_prefixes):
                continue  # parameters already owned by an enclosing atomic module
            if self.mode == "bk" and supports_bk_attention(module):
                # projections as linear views; out_proj is called as a module and has its own rule
                if any(True for _ in module.parameters(recurse=False)):
                    self._owners.append((name, module, AttentionInProjectionRule()))
            elif isinstance(module, ATOMIC_MODULES):
                # its children's weights are used functionally, never by calling the children
                atomic_prefixes.append(f"{name}." if name else "")
                if any(True for _ in module.parameters()):
                    self._owners.append((name, module, FunctorchFallback(recurse=True)))
            elif any(True for _ in module.parameters(recurse=False)):
                if isinstance(module, nn.RNNBase) and any(p.requires_grad for p in module.parameters()):
                    check_rnn(name, module)
                rule = rule_for(module) or (RecurrentRule() if type(module) in RECURRENT_TYPES
                                            else FunctorchFallback())
                self._owners.append((name, module, rule))
        self._owner_names = {id(module): name for name, module, _ in self._owners}
        self._ancestor_axes = _transformer_axes(model, self._owners)
        self._declared_axes: dict[str, int] = {}
        self._proven_axes: dict[tuple[int, int], int] = {}  # (id(module), rank) -> batch axis
        # generations with gradients, waiting to be clipped (index -> _Generation)
        self._records: dict[int, _Generation] = {}
        self._current: _Generation | None = None
        self._generation = 0
        self._region: str | None = None  # "same" / "different" inside the declaring blocks
        self._expected: int | None = None
        self._bound: list[tuple[int, list]] = []  # (n, weakrefs to the declared batch's tensors)
        self._accumulators: list = []  # AccumulateGrad nodes of the trainable parameters
        self._accumulated: tuple = ()  # ids of those parameters
        self._trains_cache: tuple[int | None, bool] = (None, True)
        self._handles = []
        self._patched: list[nn.Module] = []
        self._silenced = False
        # functional uses of a parameter (outside its module) are detected by comparing autograd's
        # gradient of the parameter with what the engine saw (see _check_functional_uses)
        self._bk_params: set[int] = set()  # parameters whose module's backward skips their gradient
        self._autograd_sums: dict[int, torch.Tensor] = {}
        self._engine_sums: dict[int, torch.Tensor] = {}
        self._loose: set[int] = set()  # parameters whose captured tensors were low precision
        self.summed_grads: dict[int, torch.Tensor] = {}
        # embedding weights whose clipped sum stays sparse (lazy noise): id -> [(rows, vectors)]
        self.sparse_params: set[int] = set()
        self.sparse_sums: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.track_unclipped = bool(track_unclipped)
        self.unclipped_grads: dict[int, torch.Tensor] = {}
        self.unclipped_bound: float | None = None
        self.examples_seen = 0
        self.paths: dict[str, str] = {}
        self.dropped_examples = 0
        self.attach()

    @property
    def params(self) -> list[torch.Tensor]:
        """The model's parameters that are trainable now (``requires_grad=True``)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    # ------------------------------------------------------------ declarations
    def expect_batch(self, n: int | None, batch=None) -> None:
        """Declare the number of examples in the next physical batch (``None``: unknown).

        dpkit's data loader calls it right before yielding each batch. A forward pass of the
        model is matched to ``n`` when one of its input tensors is a tensor of ``batch`` or a
        view of all of it (a transpose: time-major models) — so batches consumed later than they
        were yielded (prefetched lists, ``zip``) keep their own n — or, failing that, when the latest declaration's n is the size of axis 0
        of one of its inputs (the loader's layout; moving a batch to a device keeps the shape).
        Each captured tensor of a matched pass must carry n examples on its declared or provable
        batch axis (see the module docstring), so a time-major layer is clipped per example, not
        per time step. Other passes are undeclared.

        Args:
            n: number of examples, or None.
            batch: the yielded batch (any nesting of tensors), optional; binds ``n`` to it.

        Raises:
            ValueError/TypeError: ``n`` is not a non-negative integer or None.
        """
        if n is not None:
            if isinstance(n, bool) or not isinstance(n, int):
                raise TypeError(f"n must be an int or None; got {type(n).__name__}")
            if n < 0:
                raise ValueError(f"n must be >= 0; got {n}")
        self._expected = n
        self._bound = [(m, refs) for m, refs in self._bound if any(r() is not None for r in refs)]
        if n is not None and batch is not None:
            leaves = [t for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor) and t.numel()]
            self._bound.append((n, [weakref.ref(t) for t in leaves]))

    def set_batch_axis(self, axis: int, module_name: str | None = None) -> None:
        """Declare that the batch is on ``axis`` of the tensors of module ``module_name`` (None:
        of every position-wise layer without a declaration of its own).

        Needed only where dpkit refuses a step as ambiguous: a position-wise layer (Linear,
        LayerNorm, RMSNorm, Embedding) with several axes of the batch's size and no earlier batch
        proving which one holds the examples — e.g. a batch-first model whose batches have as many
        examples as positions (B == T) from the first step on. Axis 0 on an embedding fed ids of
        shape (1, T) declares them broadcast over the batch.

        Raises:
            ValueError: unknown module name or negative axis.
        """
        if isinstance(axis, bool) or not isinstance(axis, int) or axis < 0:
            raise ValueError(f"axis must be a non-negative int; got {axis!r}")
        names = {name for name, _, _ in self._owners}
        if module_name is not None and module_name not in names:
            raise ValueError(f"module_name must name a module with parameters or be None; got "
                             f"{module_name!r} (known: {sorted(names)})")
        self._declared_axes[module_name] = axis

    @contextlib.contextmanager
    def same_examples(self):
        """Context manager: the forward passes inside are views of the SAME examples.

        They form one generation: each example's gradient is the sum of its gradients through
        all the passes, clipped once (exact in both engines: the book-keeping pairs of the passes
        are concatenated, so the ghost norm keeps the cross terms between passes, as for a layer
        used several times — Bu, Wang, Zha, Karypis, ICML 2023, Sec. 3). For multi-view
        losses (consistency regularisation, R-Drop, two-view contrastive losses); every pass must
        carry the same number of examples in the same order. Leave the block before ``step()``.
        """
        self._enter("same")
        self._flush()
        self._new_generation()
        try:
            yield self
        finally:
            self._region = None
            self._current = None

    @contextlib.contextmanager
    def different_examples(self):
        """Context manager: each forward pass inside carries DIFFERENT examples (each pass is
        clipped as its own set of examples, even when several reach the same backward pass)."""
        self._enter("different")
        try:
            yield self
        finally:
            self._region = None
            self._current = None

    def _enter(self, kind: str) -> None:
        if self._region is not None:
            raise RuntimeError(f"same_examples()/different_examples() blocks cannot be nested "
                               f"(already inside a {self._region}_examples() block)")
        self._region = kind
        self._current = None

    # ------------------------------------------------------------------ hooks
    def attach(self) -> None:
        """Install the hooks (done at construction).

        Raises:
            RuntimeError: another engine's hooks are attached to the model.
        """
        if self._handles:
            return
        _refuse_attached(self.model)
        _ATTACHED[self.model] = weakref.ref(self)
        for name, module, rule in self._owners:
            if isinstance(rule, AttentionInProjectionRule):
                fn = make_bk_attention_forward(module, self._attention_capture(module))
                self._install_forward(module, fn)
            elif self.mode == "bk" and supports_bk_forward(module):
                self._patch_forward(module, rule)
            else:
                self._handles.append(module.register_forward_hook(self._forward_hook(module, rule),
                                                                  with_kwargs=True))
        for name, module, rule in self._owners:
            if module in self._patched:
                self._bk_params.update(id(p) for p in module.parameters(recurse=False))
        for module in self.model.modules():  # tensors a module would broadcast over the batch
            per_example = per_example_inputs_hook(module)
            if per_example is not None:
                self._handles.append(module.register_forward_pre_hook(
                    self._per_example_inputs(module, per_example), with_kwargs=True))
        for p in self.params:
            self._handles.append(p.register_hook(self._param_hook(id(p))))
        # gradient accumulators of the parameters: a backward that runs none of them trains nothing
        self._accumulated = tuple(map(id, self.params))
        self._accumulators = [torch.autograd.graph.get_gradient_edge(p).node for p in self.params]
        # a plain function, not a bound method: copy.deepcopy(model) would deep-copy the engine
        def before_forward(module, args, kwargs):
            return self._before_model_forward(module, args, kwargs)

        self._handles.append(self.model.register_forward_pre_hook(before_forward, with_kwargs=True))

    def _per_example_inputs(self, module, per_example):
        def pre_hook(mod, args, kwargs):
            if mod is module and self._capturing():  # not a deep copy, not no_grad
                return per_example(mod, args, kwargs)
        return pre_hook

    def _install_forward(self, module, fn) -> None:
        module.forward = _EngineForward(module, fn)
        self._patched.append(module)

    def _patch_forward(self, module, rule):
        """BK: this layer's backward returns only the input gradient (see bk_forward)."""
        original = module.forward

        def forward(x):
            if not self._capturing() or not _any_trainable(module, False):
                return original(x)
            record = _Record(None, 1)
            self._record(module, record)
            x = self._broadcast(module, x, ids=True)  # the record must see per-example gradients
            record[0] = rule.capture(module, (x,), None)
            return bk_apply(module, x, record)

        self._install_forward(module, forward)

    def _broadcast(self, module, t, ids=False):
        """Batch-broadcast input (e.g. position ids of shape (1, T)): with n declared, expand the
        embedding's ids or output (views) to n rows, so each example's gradient arrives separately."""
        n = self._current.n if self._current is not None else None
        if n is None or n <= 1 or type(module) is not nn.Embedding:
            return t
        lead = t.shape if ids else t.shape[:-1]
        if len(lead) < 2 or lead[0] != 1:
            return t
        name = self._owner_names.get(id(module))
        known = self._declared_axes.get(name, self._ancestor_axes.get(name, self._declared_axes.get(
            None, self._proven_axes.get((id(module), len(lead) + 1)))))
        if n in lead and known != 0:
            return t  # (1, T) with T == n: broadcast or time-major? _batch_first decides or refuses
        return t.expand(n, *t.shape[1:])

    def _record(self, module, record) -> None:
        """File a use of ``module`` under the current forward pass (generation).

        A module whose earlier use in this generation already received its output gradient is
        being run on a NEW batch (e.g. a training loop that calls sub-modules directly, so the
        model's pre-hook never fires): start a new generation rather than merge two batches'
        examples (merged examples could cancel each other and escape clipping) — except inside
        :meth:`same_examples`, where merging is what was declared.
        """
        gen = self._current
        if gen is None:
            gen = self._new_generation()
        elif self._region != "same":
            uses = gen.uses.get(module)
            last = uses[-1]() if uses else None
            if last is not None and last.has_grad:
                gen = self._new_generation()
        record.gen, record.module = gen, module
        uses = gen.uses.setdefault(module, [])
        if uses and uses[-1]() is None:  # drop uses whose graph is gone (calls never backpropagated)
            uses[:] = [u for u in uses if u() is not None]
        uses.append(weakref.ref(record))

    def _new_generation(self, n: int | None = None) -> _Generation:
        self._generation += 1
        self._current = _Generation(self._generation, self._region, n, self._records,
                                    self._backward_trains)
        return self._current

    def _backward_trains(self) -> bool:
        """Whether the running backward pass computes a gradient of some parameter (``backward()``
        does; ``torch.autograd.grad(loss, x)`` for input gradients does not). Cached per pass."""
        task = torch._C._current_graph_task_id()
        if self._trains_cache[0] != task:
            params = self.params
            if tuple(map(id, params)) != self._accumulated:  # (un)frozen since the last pass
                self._accumulated = tuple(map(id, params))
                self._accumulators = [torch.autograd.graph.get_gradient_edge(p).node for p in params]
            self._trains_cache = (task, any(_will_execute(node) for node in self._accumulators))
        return self._trains_cache[1]

    def _declared_for(self, args, kwargs) -> int | None:
        """The declared batch size, if this forward pass carries that batch.

        The loader declares n when it YIELDS a batch; a training loop may consume batches later
        (prefetched lists, ``zip``), so a declaration is used only for a pass fed (a view of) that
        batch, or with an input tensor of n examples on axis 0. Otherwise — or inside
        :meth:`different_examples`, whose passes may split one loader batch — the pass is
        undeclared and its batch is inferred (see the module docstring).
        """
        if self._region == "different":
            return None
        leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        # an input that IS a declared batch tensor or a view of all of it (transpose, reshape); a
        # slice (micro-batch) holds fewer examples and is not bound
        views = {(t.untyped_storage().data_ptr(), t.numel()) for t in leaves if t.numel()}
        for m, refs in reversed(self._bound):
            for r in refs:
                t = r()
                if t is not None and (t.untyped_storage().data_ptr(), t.numel()) in views:
                    return m
        n = self._expected
        if n is not None and any(t.dim() > 0 and t.shape[0] == n for t in leaves):
            return n
        return None

    def _attention_capture(self, module):
        def capture(inputs):  # out_proj is called by the BK forward only: capture if anything trains
            if not self._capturing() or not _any_trainable(module, True):
                return None
            record = _Record(inputs, 3)
            self._record(module, record)
            return record
        return capture

    def detach(self) -> None:
        """Remove the hooks; the model behaves as a plain module again."""
        if self._handles and _ATTACHED.get(self.model, lambda: None)() is self:
            del _ATTACHED[self.model]
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for module in self._patched:
            del module.forward  # back to the class's forward
        self._patched.clear()
        self._bk_params.clear()
        self._records.clear()
        self._current = None

    def _capturing(self) -> bool:
        # autograd decides, not module.training: eval-mode training (dropout off) must be clipped
        return torch.is_grad_enabled() and not self._silenced

    def _before_model_forward(self, module, args, kwargs):
        if module is not self.model or not self._capturing():
            return  # a deep copy of the model, or no_grad
        n = self._declared_for(args, kwargs)
        if self._region == "same":  # one generation for the whole block; its first pass sets n
            gen = self._current
            if gen is not None and not gen.uses and gen.n is None:
                gen.n = n
            return
        # clip the finished generations now so that their activations are freed (gradient
        # accumulation), then open a new generation for this pass
        self._flush()
        self._new_generation(n)

    def _forward_hook(self, module, rule):
        recurse = isinstance(rule, FunctorchFallback) and rule.recurse

        def hook(mod, args, kwargs, output):
            if mod is not module or not self._capturing() or not _any_trainable(mod, recurse):
                return  # a deep copy, no_grad, or a frozen layer
            if isinstance(mod, nn.RNNBase):  # switched to train() after wrapping: dropout now active
                check_rnn(self._owner_names[id(mod)], mod)
            if isinstance(rule, FunctorchFallback):
                captured = rule.capture(mod, args, kwargs)
            elif isinstance(rule, EmbeddingBagRule):  # offsets / per_sample_weights may be keywords
                names = ("input", "offsets", "per_sample_weights")
                args = args + tuple(kwargs.get(k) for k in names[len(args):])
                captured = rule.capture(mod, args, output)
            else:
                captured = rule.capture(mod, args, output)
            record = _Record(captured, 0)
            self._record(mod, record)
            if isinstance(output, torch.Tensor):
                output = self._broadcast(mod, output)
            leaves, _ = tree_flatten(output)
            record[1] = _Slots(len(leaves), record)
            for i, t in enumerate(leaves):
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(self._grad_hook(record, i))
            return output
        return hook

    @staticmethod
    def _grad_hook(record, index):
        def hook(grad):
            slot = record[1]
            slot[index] = grad.detach() if slot[index] is None else slot[index] + grad.detach()
        return hook

    def _param_hook(self, pid):
        def hook(grad):
            if self._silenced or grad is None or pid in self.sparse_params:
                return  # lazy embedding tables: compared elsewhere, never densified
            g = grad.detach()
            g = g.to_dense() if g.is_sparse else g
            prev = self._autograd_sums.get(pid)
            # never keep autograd's own tensor: AccumulateGrad may later add into it in place
            self._autograd_sums[pid] = g.clone() if prev is None else prev + g
        return hook

    # ------------------------------------------------------------- clipping
    def accumulate(self) -> int:
        """Clip the per-example gradients captured since the last call and add their sum.

        Generations (forward passes) whose gradients arrived in different backward passes are
        separate sets of examples; see the module docstring for passes sharing a backward.
        Returns the number of examples processed (0 for an empty batch or nothing captured).

        Raises:
            AmbiguousStepError: undeclared forward passes shared a backward pass, or a layer's
                batch axis cannot be determined.
            RuntimeError: a parameter's gradient reached it outside its module (functional use).
        """
        if self._region == "same":
            raise RuntimeError("accumulate()/optimizer.step() was called inside a same_examples() block; "
                               "leave the block first (all passes of the block form ONE set of examples)")
        seen = self._flush()
        self._current = None
        self._check_functional_uses()
        return seen

    def _flush(self) -> int:
        """Clip every generation that received gradients (except an open same_examples block)."""
        ready = sorted(i for i in self._records
                       if not (self._region == "same" and self._current is not None and i == self._current.index))
        gens = [self._records.pop(i) for i in ready]
        try:
            self._check_unambiguous(gens)
            return sum(self._accumulate_generation(gen) for gen in gens)
        finally:
            for gen in gens:
                gen.release()

    @staticmethod
    def _check_unambiguous(gens) -> None:
        passes = defaultdict(list)
        for gen in gens:
            for task in gen.backwards:
                passes[task].append(gen)
        for shared in passes.values():
            if len(shared) > 1 and any(gen.kind != "different" for gen in shared):
                raise AmbiguousStepError(
                    f"{len(shared)} forward passes of the model reached the same backward pass; dpkit "
                    "cannot tell whether they carry the same examples or different ones, and guessing "
                    f"wrong breaks the privacy guarantee. Declare it: {_MULTI_PASS_FIX}.")

    def _accumulate_generation(self, gen: _Generation) -> int:
        uses = [(name, module, rule, captured, grads)
                for name, module, rule in self._owners
                for captured, grads in gen.done.get(module, [])
                if any(g is not None for g in grads)]
        if not uses:
            return 0
        n, convention = (gen.n, False) if gen.n is not None else self._inferred_batch(uses)
        contributions: dict[int, list] = defaultdict(list)
        for name, module, rule, captured, grads in uses:
            captured, grads = self._batch_first(name, module, rule, captured, grads, n,
                                                gen.n is not None, convention)
            if n == 0:
                continue  # empty Poisson batch: nothing to clip (noise is still added)
            for p, contrib in self._contributions(name, module, rule, captured, grads):
                contributions[id(p)].append(contrib)
                if _low_precision(contrib):  # autograd's own gradient came from bf16/fp16 products
                    self._loose.add(id(p))
        if n == 0 or not contributions:
            return 0
        merged = {pid: combine(parts) for pid, parts in contributions.items()}
        if self.mode == "per_sample":
            merged = {pid: c if isinstance(c, ExplicitGrad) or pid in self.sparse_params
                      else ExplicitGrad(c.instantiate())
                      for pid, c in merged.items()}
        ones = torch.ones(n, device=next(g for g in uses[0][4] if g is not None).device)
        for pid, contrib in merged.items():  # what autograd also computed (functional-use check)
            if pid not in self._bk_params and pid not in self.sparse_params:
                _add_into(self._engine_sums, pid, contrib.clipped_sum(ones))
        # a mean loss scales every per-example gradient by 1/B: the contributions stay unscaled
        # (no copy of the output gradients); the scale enters the norms and the factors instead
        scale = float(n) if self.loss_reduction == "mean" else 1.0
        factors = self._clip_factors(merged, n, scale)
        for pid, contrib in merged.items():
            if pid in self.sparse_params:
                self.sparse_sums.setdefault(pid, []).append(
                    _clipped_rows(contrib, factors[pid], self._names.get(pid, "<unnamed>")))
                continue
            s = contrib.clipped_sum(factors[pid])
            _add_into(self.summed_grads, pid, s)
            if self.track_unclipped:
                if self.unclipped_bound is None:
                    wide = torch.full_like(factors[pid], scale)
                else:  # min(1, G/‖g_i‖)·scale from the SAME norm: (G/C)·c_i, capped at scale
                    wide = torch.clamp(factors[pid] * (self.unclipped_bound / self.max_grad_norm), max=scale)
                _add_into(self.unclipped_grads, pid, contrib.clipped_sum(wide))
        self.examples_seen += n
        return n

    # ------------------------------------------------------------ batch axis
    def _fixed_axis(self, name, module, rule, grads) -> int | None:
        """The batch axis fixed by the layer's API or a declaration; None for position-wise layers
        (any leading axis may hold the batch)."""
        if isinstance(rule, FunctorchFallback):  # the module's own batch_first
            i = next(i for i, g in enumerate(grads) if g is not None)
            return output_axes(module, len(grads))[i]
        if name in self._declared_axes:
            return self._declared_axes[name]
        if type(rule) in _POSITIONWISE:
            return self._ancestor_axes.get(name, self._declared_axes.get(None))
        return 0

    def _inferred_batch(self, uses) -> tuple[int, bool]:
        """Undeclared batch size: the first use whose batch axis is fixed, else axis 0 of the first
        use; the flag says that n was read on axis 0 (the batch-first convention), not on a
        time-major layer's axis."""
        for name, module, rule, captured, grads in uses:
            axis = self._fixed_axis(name, module, rule, grads)
            if axis is None:
                continue
            if isinstance(rule, FunctorchFallback):  # a packed RNN input counts its sequences
                packed = rule.packed_input(module, captured) is not None
                return rule.batch_size(module, captured, grads), axis == 0 and not packed
            g = next(g for g in grads if g is not None)
            return g.shape[axis], axis == 0
        return next(g for g in uses[0][4] if g is not None).shape[0], True

    def _batch_first(self, name, module, rule, captured, grads, n, declared, convention):
        """Match the use to n examples and move its batch axis to 0 (position-wise layers).

        ``convention``: n was inferred from axis 0 (no declaration, no fixed-axis layer), so axis 0
        is what the inference already assumed and another axis of size n adds no ambiguity.

        Raises:
            RuntimeError: no axis of size n.
            AmbiguousStepError: several axes of size n and nothing proves which one.
        """
        g = next(g for g in grads if g is not None)
        source = f"expect_batch({n})" if declared else f"the other layers ({n} examples)"
        fixed = self._fixed_axis(name, module, rule, grads)
        if isinstance(rule, FunctorchFallback):
            # its own count: the gradient of a packed RNN output has no batch axis (packed steps)
            size = rule.batch_size(module, captured, grads)
            if size != n:
                raise RuntimeError(
                    f"module {name!r} saw {size} examples on its batch axis {fixed} (output shape "
                    f"{tuple(g.shape)}), but {source} says {n}; dpkit needs every layer's batch on "
                    "the axis its API fixes (batch_first for RNN/attention/Transformer layers)")
            return captured, grads
        if fixed is not None:
            if g.dim() <= fixed or g.shape[fixed] != n:
                raise RuntimeError(
                    f"module {name!r} saw tensors of shape {tuple(g.shape)}, with no batch of {n} "
                    f"examples on its batch axis {fixed}, but {source} says {n}; dpkit needs every "
                    "layer's batch on the axis its API fixes (batch_first for RNN/attention/"
                    "Transformer layers, axis 0 otherwise), or declare it with "
                    "engine.set_batch_axis(axis, name)")
            axis = fixed
        else:
            k = g.dim() - _POSITIONWISE[type(rule)](module)
            matches = [ax for ax in range(k) if g.shape[ax] == n]
            proven = self._proven_axes.get((id(module), g.dim()))
            if n > 1 and g.shape[0] == 1 and matches and proven not in matches:
                # size 1 on axis 0: a batch-broadcast input (position ids (1, T) with T == n) looks
                # exactly like a time-major tensor with one time step
                raise AmbiguousStepError(
                    f"module {name!r} saw tensors of shape {tuple(g.shape)}: axis 0 has size 1 and "
                    f"axes {matches} have the batch's size {n}; this is either an input broadcast "
                    "over the batch (e.g. position ids of shape (1, T) with T == batch size) or a "
                    "time-major tensor, and guessing would clip the wrong groups. Declare it: "
                    f"engine.set_batch_axis(0, {name!r}) for a broadcast input (with expect_batch(n) "
                    "declared, dpkit expands it), or the batch's axis for a time-major layer.")
            if len(matches) == 1 or (matches and n <= 1):
                axis = matches[0]
                if not convention and n > 1:  # a proof only when n did not come from axis 0 itself
                    self._proven_axes[(id(module), g.dim())] = axis
            elif not matches:
                raise RuntimeError(
                    f"module {name!r} saw tensors of shape {tuple(g.shape)} with no axis of "
                    f"{n} examples, but {source} says {n}; every layer must see the whole batch "
                    "(an embedding fed ids broadcast over the batch, e.g. position ids (1, T), is "
                    "handled when the batch size is declared: dpkit's data loader does it, or call "
                    "engine.expect_batch(n) before the forward pass)")
            elif proven in matches:
                axis = proven
            elif convention and matches[0] == 0:
                axis = 0
            else:
                raise AmbiguousStepError(
                    f"module {name!r} saw tensors of shape {tuple(g.shape)}: axes {matches} all have "
                    f"the batch's size {n}, and no earlier batch proved which one holds the examples "
                    "(e.g. a time-major (T, B, d) input with T == B). Guessing would clip per time "
                    f"step instead of per example. Declare it: engine.set_batch_axis(axis, {name!r}), "
                    "or engine.set_batch_axis(0) for a batch-first model (optimizer.engine for a "
                    "DPOptimizer); one batch whose size differs from the other axes also proves it.")
        if axis != 0:
            return captured.movedim(axis, 0), [t if t is None else t.movedim(axis, 0) for t in grads]
        if type(rule) is EmbeddingRule and captured.shape[0] == 1 and g.shape[0] != 1:
            # ids broadcast over the batch (see _broadcast): every example looked up the same rows
            captured = captured.expand(g.shape[0], *captured.shape[1:])
        return captured, grads

    def _contributions(self, name, module, rule, captured, grads):
        """Yield (parameter, contribution) for each trainable direct parameter of ``module``."""
        if isinstance(rule, RecurrentRule) and rule.supports(module, captured):
            self.paths[name] = rule.path
            yield from rule.contributions(module, captured, grads)
            return
        if isinstance(rule, FunctorchFallback):
            params = dict(module.named_parameters(recurse=rule.recurse))
            self._silenced = True  # children called inside functional_call must not record
            try:
                with torch.enable_grad():
                    per_sample = rule.per_sample_grads(module, captured, grads)
            finally:
                self._silenced = False
            self.paths[name] = "functorch"
            for pname, g in per_sample.items():
                yield params[pname], ExplicitGrad(g)
            return
        if isinstance(rule, AttentionInProjectionRule):
            view = rule.view(module, captured, grads)
            if module.in_proj_weight.requires_grad:
                contrib = LinearWeightGrad(view.a, view.g, view.weight_shape)
                self.paths[name] = contrib.path
                yield module.in_proj_weight, contrib
            if view.bias_grad is not None:
                yield module.in_proj_bias, ExplicitGrad(view.bias_grad)
            return
        g = grads[0]
        if isinstance(rule, ConvRule) and not isinstance(module.padding, str):
            if module.weight.requires_grad:
                view = lambda: LinearWeightGrad(*_ab(rule.view(module, captured, g)), ghost=True)  # noqa: E731
                contrib = ConvWeightGrad(captured, g, module, view,
                                         ghost=False if self.mode == "per_sample" else None)
                self.paths[name] = contrib.path
                yield module.weight, contrib
            if _trainable(module.bias):
                yield module.bias, ExplicitGrad(g.sum(dim=tuple(range(2, g.dim()))))
            return
        if isinstance(rule, LinearViewRule):
            view = rule.view(module, captured, g)
            if module.weight.requires_grad:
                contrib = LinearWeightGrad(view.a, view.g, view.weight_shape,
                                           ghost=False if self.mode == "per_sample" else None)
                self.paths[name] = contrib.path
                yield module.weight, contrib
            if view.bias_grad is not None:
                yield module.bias, ExplicitGrad(view.bias_grad)
        elif isinstance(rule, (EmbeddingRule, EmbeddingBagRule)):
            example, rows, vecs, dense, gram = rule.rows(module, captured, g)
            self.paths[name] = "embedding_gram" if gram else "embedding_rows"
            yield module.weight, EmbeddingRowGrad(example, rows, vecs, g.shape[0], module.weight.shape,
                                                  dense, gram)
        else:
            self.paths[name] = "per_sample"
            params = dict(module.named_parameters(recurse=False))
            for pname, ps in rule.per_sample_grads(module, captured, g).items():
                yield params[pname], ExplicitGrad(ps)

    def _clip_factors(self, merged: dict, batch_size: int, scale: float) -> dict[int, torch.Tensor]:
        """Factors to apply to the UNSCALED contributions: c_i·scale, c_i from ‖scale·G_i‖."""
        norms_sq = {pid: c.norm_sq() for pid, c in merged.items()}
        any_norm = next(iter(norms_sq.values()))
        if self.clip_scope == "flat":
            total = torch.zeros(batch_size, dtype=any_norm.dtype, device=any_norm.device)
            for n in norms_sq.values():
                total = total + n
            groups = {None: (total, self.max_grad_norm)}
        else:
            # P counted now: a tensor unfrozen after construction must not raise the total above C
            per_tensor = self.max_grad_norm / math.sqrt(len(self.params))
            groups = {pid: (n, per_tensor) for pid, n in norms_sq.items()}
        factors = {}
        for key, (sq, clip) in groups.items():
            norm = sq.clamp(min=0).sqrt() * scale
            bad = ~torch.isfinite(norm)
            if bad.any():  # a NaN/inf gradient: drop that example (factor 0) rather than poison the sum
                self.dropped_examples += int(bad.sum())
                for pid in (merged if key is None else [key]):
                    merged[pid].zero_examples(bad)
                norm = torch.where(bad, 0, norm)
            if self.clip_function == "standard":
                c = (clip / (norm + 1e-12)).clamp(max=1.0)
            else:
                c = clip / (norm + self.stability)
            c = torch.where(bad, 0, c) * scale
            if key is None:
                factors = {pid: c for pid in merged}
            else:
                factors[key] = c
        return factors

    # ----------------------------------------------------------- bookkeeping
    def reset(self) -> None:
        """Forget accumulated sums and any captured activations (start of a logical batch)."""
        self.summed_grads.clear()
        self.sparse_sums.clear()
        self.unclipped_grads.clear()
        self._records.clear()
        self._current = None
        self._autograd_sums.clear()
        self._engine_sums.clear()
        self._loose.clear()
        self.examples_seen = 0

    def clipped_sum(self, p: torch.Tensor) -> torch.Tensor:
        """The accumulated clipped sum for parameter ``p`` (zeros if no example touched it)."""
        s = self.summed_grads.get(id(p))
        return torch.zeros_like(p) if s is None else s.to(p.dtype)

    def sparse_clipped_rows(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The clipped sum of a sparse (lazy-noise) embedding weight as (unique rows, (n, d) sums)."""
        parts = self.sparse_sums.get(id(p), [])
        if not parts:
            return (torch.zeros(0, dtype=torch.long, device=p.device),
                    torch.zeros(0, p.shape[1], dtype=p.dtype, device=p.device))
        rows = torch.cat([r for r, _ in parts])
        vals = torch.cat([v for _, v in parts])
        unique, inverse = torch.unique(rows, return_inverse=True)
        out = torch.zeros(unique.numel(), p.shape[1], dtype=vals.dtype, device=vals.device)
        return unique, out.index_add_(0, inverse, vals)

    def bound_unclipped(self, bound: float) -> None:
        """Track Σ_i clip(g_i, G) instead of the unclipped Σ_i g_i (DiceSGD's enforced bound).

        The factor of example i is min(1, G/‖g_i‖), computed from the same per-example norm as the
        C clip (per tensor with ``clip_scope="per_layer"``: G/√P, so the whole gradient stays ≤ G);
        a dropped (non-finite) example gets 0 in both sums.

        Args:
            bound: G ≥ ``max_grad_norm``.

        Raises:
            RuntimeError: the engine does not track unclipped sums, or uses automatic clipping
                (its factors are not min(1, C/‖g‖), so G/C would not rescale them to a G clip).
            ValueError: G < ``max_grad_norm``.
        """
        if not self.track_unclipped:
            raise RuntimeError("bound_unclipped needs an engine built with track_unclipped=True")
        if self.clip_function != "standard":
            raise RuntimeError("bound_unclipped needs clip_function='standard'; got "
                               f"{self.clip_function!r}")
        bound = _validate.positive("bound", bound)
        if bound < self.max_grad_norm:
            raise ValueError(f"bound must be >= max_grad_norm ({self.max_grad_norm}); got {bound}")
        self.unclipped_bound = float(bound)

    def unclipped_sum(self, p: torch.Tensor) -> torch.Tensor:
        """The accumulated UNCLIPPED sum Σ_i g_i for ``p`` (needs ``track_unclipped=True``), or
        Σ_i clip(g_i, G) after :meth:`bound_unclipped`."""
        if not self.track_unclipped:
            raise RuntimeError("unclipped sums are not tracked; build the engine with track_unclipped=True")
        s = self.unclipped_grads.get(id(p))
        return torch.zeros_like(p) if s is None else s.to(p.dtype)

    def parameter_name(self, p: torch.Tensor) -> str:
        return self._names.get(id(p), "<unnamed>")

    def _check_functional_uses(self) -> None:
        """Refuse a parameter whose autograd gradient disagrees with what its module's hooks saw.

        A weight used by its module AND functionally (``logits = x @ wte.weight.T``) gets autograd
        gradient from the functional use that no hook captured: training on the engine's sum would
        silently drop it, adding it would leave it unclipped. Book-keeping layers compute no weight
        gradient of their own, so ANY autograd gradient there is a functional use; for hooked
        layers autograd's sum must equal the engine's unclipped sum up to rounding.

        The tolerance is relative to the WHOLE model's gradient norm (1e-4; 2e-2 for a parameter
        with low-precision gradients), not to the parameter's own: a parameter whose true gradient
        is zero (a key-projection bias, which softmax ignores) carries only rounding noise, of the
        size of the gradients it was summed from, and a tolerance relative to itself would refuse
        every float32 step. A functional use below that tolerance changes the update by less than
        rounding would; it is dropped, never added unclipped (the optimizer trains on the
        engine's clipped sums only).
        """
        autograd, engine = self._autograd_sums, self._engine_sums
        try:
            checked = [pid for pid in autograd
                       if pid in self._bk_params or pid not in self.sparse_params]
            seen = {pid: engine[pid].to(autograd[pid]) if pid in engine else torch.zeros_like(autograd[pid])
                    for pid in checked if pid not in self._bk_params}
            scale = math.sqrt(sum(max(float(autograd[pid].norm()), float(s.norm())) ** 2
                                  for pid, s in seen.items()))
            for pid in checked:
                got = autograd[pid]
                if pid in self._bk_params:
                    bad = bool(got.ne(0).any())
                else:
                    rtol = 2e-2 if pid in self._loose or got.dtype in _LOW else 1e-4
                    bad = float((got - seen[pid]).norm()) > rtol * scale + 1e-12
                if bad:
                    name = self._names.get(pid, "<unnamed>")
                    raise RuntimeError(
                        f"parameter {name!r} received gradient from a use outside its module (e.g. "
                        f"functionally, logits = x @ {name}.T); dpkit's hooks cannot clip that use per "
                        "example. Call a module instead, e.g. tie a linear layer to it: "
                        f"head = nn.Linear(d, V, bias=False); head.weight = <module>.weight "
                        f"(the same Parameter as {name!r}), and use head(x).")
        finally:
            autograd.clear()
            engine.clear()
            self._loose.clear()


# model -> weakref to the engine whose hooks are attached to it (keyed by the very object: a
# copy.deepcopy of the model is a different key and carries no hooks, see _EngineForward)
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def _refuse_attached(model: nn.Module) -> None:
    """Two engines on one model would each capture every layer and clip from their own records."""
    ref = _ATTACHED.get(model)
    engine = ref() if ref is not None else None
    if engine is not None and engine._handles and engine.model is model:
        raise RuntimeError(
            f"model {type(model).__name__} already has the per-example hooks of another dpkit engine "
            "(an earlier make_private or GradientEngine on this very model object); a second engine "
            "would capture every layer again. Detach the earlier one first "
            "(optimizer.engine.detach() on its DPOptimizer, or engine.detach()), or wrap a fresh "
            "model (copy.deepcopy(model) gives an unhooked copy).")


def _clipped_rows(contrib, factors: torch.Tensor, name: str):
    if not isinstance(contrib, EmbeddingRowGrad):
        raise RuntimeError(f"parameter {name!r} has lazy embedding noise but was used outside its "
                           "embedding (e.g. tied to a linear layer); use embedding_noise='eager'")
    return contrib.clipped_rows(factors)


def _add_into(sums: dict, key, value: torch.Tensor) -> None:
    if key in sums:
        sums[key].add_(value)
    else:
        sums[key] = value


_LOW = (torch.float16, torch.bfloat16)


def _will_execute(node) -> bool:
    try:
        return torch._C._will_engine_execute_node(node)
    except RuntimeError:  # torch.autograd.grad(..., parameters): the leaf's gradient is captured
        return True


def _low_precision(contrib) -> bool:
    if isinstance(contrib, EmbeddingRowGrad):  # without forming its (B·T, d) grads (maybe left unformed)
        return contrib.dtype in _LOW
    return any(isinstance(t, torch.Tensor) and t.dtype in _LOW
               for t in (getattr(contrib, k, None) for k in ("a", "g", "x", "grads")))


def _any_trainable(module: nn.Module, recurse: bool) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=recurse))


def _transformer_axes(model: nn.Module, owners) -> dict[str, int]:
    """Batch axis of position-wise layers called by an ``nn.Transformer*`` module (its
    ``batch_first``) or by a model class registered batch-first (Hugging Face models, see
    :func:`dpkit.grad_sample.registry.register_batch_first`): axis 0; the nearest enclosing
    MultiheadAttention runs batch-first internally (see dpkit.grad_sample.attention), so layers
    inside it keep axis 0. The nearest enclosing such module decides."""
    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            kinds[name] = 0
        elif isinstance(module, _TRANSFORMERS):
            kinds[name] = 0 if _batch_first(module) else 1
        elif is_batch_first(module):
            kinds[name] = 0
    axes = {}
    for name, _, _ in owners:
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):  # nearest proper ancestor first
            prefix = ".".join(parts[:cut])
            if prefix in kinds:
                axes[name] = kinds[prefix]
                break
        else:
            if "" in kinds and name:
                axes[name] = kinds[""]
    return axes


def _batch_first(module: nn.Module) -> bool:
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return module.self_attn.batch_first
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
        return module.layers[0].self_attn.batch_first
    return bool(getattr(module, "batch_first", False))


def _ab(view):
    """(a, g, weight_shape) of a LinearView, for building a LinearWeightGrad."""
    return view.a, view.g, view.weight_shape


def _trainable(p) -> bool:
    return isinstance(p, torch.Tensor) and p.requires_grad
