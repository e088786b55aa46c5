"""The gradient engine: per-example clipping of a model's gradients from ONE backward pass.

Hooks on every module that owns trainable parameters keep what its rule needs from the forward
pass (activations) and the output gradients from the backward pass. :meth:`GradientEngine.accumulate`
then turns them into per-example norms, clip factors and the clipped SUM Σ_i c_i g_i, added to a
running sum (several physical batches may make up one logical batch).

Engines (``mode``):

* ``"bk"`` — book-keeping (Bu, Wang, Zha, Karypis, ICML 2023): layers with a linear view never
  materialise per-example gradients when the ghost norm is cheaper; the clipped sum is one extra
  matrix product per layer.
* ``"per_sample"`` — every per-example gradient is materialised (Opacus-style hooks); a reference
  and a fallback.

Layers without a rule use the torch.func fallback; cross-example layers are refused at wrap time.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from dpkit import _validate
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
from dpkit.grad_sample.layers import ConvRule, EmbeddingBagRule, EmbeddingRule, LinearViewRule, rule_for
from dpkit.grad_sample.rnn import check_rnn
from dpkit.grad_sample.validation import check_model

ENGINES = ("bk", "per_sample")
# modules that use their children's parameters functionally (the children are never called)
ATOMIC_MODULES = (nn.MultiheadAttention,)
CLIP_SCOPES = ("flat", "per_layer")
CLIP_FUNCTIONS = ("standard", "automatic")


class GradientEngine:
    """Per-example clipping for every trainable parameter of ``model``.

    Args:
        model: the model; validated at construction (cross-example layers raise
            :class:`dpkit.UnsupportedModuleError` naming the module).
        max_grad_norm: clip norm C > 0 (total over all parameters with ``clip_scope="flat"``).
        mode: ``"bk"`` (default) or ``"per_sample"``.
        clip_scope: ``"flat"`` (one norm over all parameters) or ``"per_layer"`` (each parameter
            tensor clipped to C/√P, P parameter tensors, so the total contribution is still ≤ C).
        clip_function: ``"standard"`` (c_i = min(1, C/‖g_i‖)) or ``"automatic"`` (c_i = C/(‖g_i‖+γ),
            Bu, Mao, Xu, NeurIPS 2023, "Automatic clipping", Eq. 4; ‖c_i g_i‖ < C always).
        loss_reduction: ``"mean"`` if the loss averages over the batch (the captured output
            gradients are multiplied back by the physical batch size) or ``"sum"``.
        stability: γ of automatic clipping.
        track_unclipped: also accumulate the UNCLIPPED sum Σ_i g_i (error-feedback methods such as
            DiceSGD need both sums of the same batch); read it with :meth:`unclipped_sum`.

    Raises:
        ValueError/TypeError: bad arguments, named.
        UnsupportedModuleError: BatchNorm and other cross-example layers.
    """

    def __init__(self, model: nn.Module, *, max_grad_norm: float, mode: str = "bk",
                 clip_scope: str = "flat", clip_function: str = "standard",
                 loss_reduction: str = "mean", stability: float = 0.01, track_unclipped: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        self.max_grad_norm = _validate.positive("max_grad_norm", max_grad_norm)
        self.mode = _validate.one_of("clipping", mode, ENGINES)
        self.clip_scope = _validate.one_of("clip_scope", clip_scope, CLIP_SCOPES)
        self.clip_function = _validate.one_of("clip_function", clip_function, CLIP_FUNCTIONS)
        self.loss_reduction = _validate.one_of("loss_reduction", loss_reduction, ("mean", "sum"))
        self.stability = _validate.positive("stability", stability)
        check_model(model)
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model must have at least one trainable parameter (requires_grad=True); "
                             "got none")
        self._names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        self._owners: list[tuple[str, nn.Module, object]] = []
        atomic_prefixes: list[str] = []
        for name, module in model.named_modules():
            if any(name.startswith(prefix) for prefix in atomic_prefixes):
                continue  # parameters already owned by an enclosing atomic module
            if self.mode == "bk" and supports_bk_attention(module):
                # projections as linear views; out_proj is called as a module and has its own rule
                if any(p.requires_grad for p in module.parameters(recurse=False)):
                    self._owners.append((name, module, AttentionInProjectionRule()))
            elif isinstance(module, ATOMIC_MODULES):
                # its children's weights are used functionally, never by calling the children
                atomic_prefixes.append(f"{name}.")
                if any(p.requires_grad for p in module.parameters()):
                    self._owners.append((name, module, FunctorchFallback(recurse=True)))
            elif any(p.requires_grad for p in module.parameters(recurse=False)):
                if isinstance(module, nn.RNNBase):
                    check_rnn(name, module)
                rule = rule_for(module) or FunctorchFallback()
                self._owners.append((name, module, rule))
        # forward-pass generation -> module -> list of (captured, output grads), one per use
        self._records: dict[int, dict[nn.Module, list]] = defaultdict(lambda: defaultdict(list))
        self._generation = 0
        self._handles = []
        self._patched: list[nn.Module] = []
        self._silenced = False
        self.summed_grads: dict[int, torch.Tensor] = {}
        # embedding weights whose clipped sum stays sparse (lazy noise): id -> [(rows, vectors)]
        self.sparse_params: set[int] = set()
        self.sparse_sums: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.track_unclipped = bool(track_unclipped)
        self.unclipped_grads: dict[int, torch.Tensor] = {}
        self.examples_seen = 0
        self.paths: dict[str, str] = {}
        self.dropped_examples = 0
        self.attach()

    # ------------------------------------------------------------------ hooks
    def attach(self) -> None:
        """Install the hooks (done at construction)."""
        if self._handles:
            return
        for name, module, rule in self._owners:
            if isinstance(rule, AttentionInProjectionRule):
                module.forward = make_bk_attention_forward(module, self._attention_capture(module))
                self._patched.append(module)
            elif self.mode == "bk" and supports_bk_forward(module):
                self._patch_forward(module, rule)
            else:
                self._handles.append(module.register_forward_hook(self._forward_hook(module, rule),
                                                                  with_kwargs=True))
        self._handles.append(self.model.register_forward_pre_hook(self._before_model_forward))

    def _patch_forward(self, module, rule):
        """BK: this layer's backward returns only the input gradient (see bk_forward)."""
        original = module.forward

        def forward(x):
            if not self._capturing():
                return original(x)
            record = (rule.capture(module, (x,), None), [None])
            self._record(module, record)
            return bk_apply(module, x, record)

        module.forward = forward
        self._patched.append(module)

    def _record(self, module, record) -> None:
        """File a use of ``module`` under the current forward pass (generation).

        A module whose earlier use in this generation already received its output gradient is
        being run on a NEW batch (e.g. a training loop that calls sub-modules directly, so the
        model's pre-hook never fires): start a new generation rather than merge two batches'
        examples (merged examples could cancel each other and escape clipping).
        """
        uses = self._records[self._generation].get(module)
        if uses and any(g is not None for g in uses[-1][1]):
            self._generation += 1
        self._records[self._generation][module].append(record)

    def _attention_capture(self, module):
        def capture(inputs):
            if not self._capturing():
                return None
            record = (inputs, [None, None, None])
            self._record(module, record)
            return record
        return capture

    def detach(self) -> None:
        """Remove the hooks; the model behaves as a plain module again."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for module in self._patched:
            del module.forward  # back to the class's forward
        self._patched.clear()
        self._records.clear()

    def _capturing(self) -> bool:
        return self.model.training and torch.is_grad_enabled() and not self._silenced

    def _before_model_forward(self, module, args):
        # a new forward pass is a new set of examples: never merge its records with earlier ones;
        # clip the finished ones now so that their activations are freed (gradient accumulation)
        if self._capturing():
            done = [gen for gen, recs in self._records.items()
                    if any(g is not None for uses in recs.values() for _, grads in uses for g in grads)]
            for gen in sorted(done):
                self._accumulate_generation(self._records.pop(gen))
            self._generation += 1

    def _forward_hook(self, module, rule):
        def hook(mod, args, kwargs, output):
            if not self._capturing():
                return
            if isinstance(rule, FunctorchFallback):
                captured = rule.capture(mod, args, kwargs)
            else:
                captured = rule.capture(mod, args, output)
            leaves, _ = tree_flatten(output)
            leaves = [t if isinstance(t, torch.Tensor) else None for t in leaves]
            record = (captured, [None] * len(leaves))
            self._record(mod, record)
            for i, t in enumerate(leaves):
                if t is not None and t.requires_grad:
                    t.register_hook(self._grad_hook(record, i))
        return hook

    @staticmethod
    def _grad_hook(record, index):
        def hook(grad):
            slot = record[1]
            slot[index] = grad.detach() if slot[index] is None else slot[index] + grad.detach()
        return hook

    # ------------------------------------------------------------- clipping
    def accumulate(self) -> int:
        """Clip the per-example gradients captured since the last call and add their sum.

        Each forward pass of the model is a separate set of examples (gradient accumulation);
        several uses of a layer within one forward pass belong to the same examples.
        Returns the number of examples processed (0 for an empty batch or nothing captured).
        """
        generations = sorted(self._records)
        records = [self._records.pop(gen) for gen in generations]
        return sum(self._accumulate_generation(r) for r in records)

    def _accumulate_generation(self, records) -> int:
        contributions: dict[int, list] = defaultdict(list)
        batch_size = None
        for name, module, rule in self._owners:
            for captured, grads in records.get(module, []):
                if all(g is None for g in grads):
                    continue  # output did not reach the loss: zero gradient for these uses
                B = self._batch_size(module, rule, grads)
                if B == 0:
                    batch_size = 0
                    continue  # empty Poisson batch: nothing to clip (noise is still added)
                if batch_size is None:
                    batch_size = B
                elif B != batch_size:
                    raise RuntimeError(
                        f"module {name!r} saw a batch of {B} examples but others saw {batch_size}; "
                        "dpkit needs the batch on axis 0 of every layer's input (batch_first)")
                for p, contrib in self._contributions(name, module, rule, captured, grads):
                    contributions[id(p)].append(contrib)
        if batch_size is None or batch_size == 0:
            return 0
        merged = {pid: combine(parts) for pid, parts in contributions.items()}
        if self.mode == "per_sample":
            merged = {pid: c if isinstance(c, ExplicitGrad) or pid in self.sparse_params
                      else ExplicitGrad(c.instantiate())
                      for pid, c in merged.items()}
        # a mean loss scales every per-example gradient by 1/B: the contributions stay unscaled
        # (no copy of the output gradients); the scale enters the norms and the factors instead
        scale = float(batch_size) if self.loss_reduction == "mean" else 1.0
        factors = self._clip_factors(merged, batch_size, scale)
        for pid, contrib in merged.items():
            if pid in self.sparse_params:
                self.sparse_sums.setdefault(pid, []).append(
                    _clipped_rows(contrib, factors[pid], self._names.get(pid, "<unnamed>")))
                continue
            s = contrib.clipped_sum(factors[pid])
            _add_into(self.summed_grads, pid, s)
            if self.track_unclipped:
                _add_into(self.unclipped_grads, pid, contrib.clipped_sum(torch.full_like(factors[pid], scale)))
        self.examples_seen += batch_size
        return batch_size

    @staticmethod
    def _batch_size(module, rule, grads):
        i, g = next((i, g) for i, g in enumerate(grads) if g is not None)
        if isinstance(rule, FunctorchFallback):
            return g.shape[output_axes(module, len(grads))[i]]
        return g.shape[0]

    def _contributions(self, name, module, rule, captured, grads):
        """Yield (parameter, contribution) for each trainable direct parameter of ``module``."""
        if isinstance(rule, FunctorchFallback):
            params = dict(module.named_parameters(recurse=rule.recurse))
            self._silenced = True  # children called inside functional_call must not record
            try:
                with torch.enable_grad():
                    per_sample = rule.per_sample_grads(module, captured, grads, self._batch_size(module, rule, grads))
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
            example, rows, vecs, dense = rule.rows(module, captured, g)
            self.paths[name] = "embedding_gram" if dense is not None else "embedding_rows"
            yield module.weight, EmbeddingRowGrad(example, rows, vecs, g.shape[0], module.weight.shape, dense)
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

    def unclipped_sum(self, p: torch.Tensor) -> torch.Tensor:
        """The accumulated UNCLIPPED sum Σ_i g_i for ``p`` (needs ``track_unclipped=True``)."""
        if not self.track_unclipped:
            raise RuntimeError("unclipped sums are not tracked; build the engine with track_unclipped=True")
        s = self.unclipped_grads.get(id(p))
        return torch.zeros_like(p) if s is None else s.to(p.dtype)

    def parameter_name(self, p: torch.Tensor) -> str:
        return self._names.get(id(p), "<unnamed>")


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


def _ab(view):
    """(a, g, weight_shape) of a LinearView, for building a LinearWeightGrad."""
    return view.a, view.g, view.weight_shape


def _trainable(p) -> bool:
    return isinstance(p, torch.Tensor) and p.requires_grad
