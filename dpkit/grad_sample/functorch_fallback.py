"""Generic per-example gradients for any module with its own parameters, via torch.func.

For a module m with direct parameters θ, captured inputs x and output gradients ḡ, the
per-example gradient is ∇_θ ⟨m(θ, x_i), ḡ_i⟩, computed for all i at once with
``vmap(grad(...))`` over the batch axis. Children of m keep their own rules: their parameters are
held constant here and their hooks are silenced while this runs (see the engine).

Exactness needs m to treat examples independently along the batch axis (no BatchNorm-like mixing);
that cannot be checked in general, and dpkit refuses the known cross-example layers at wrap time.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten

from dpkit.grad_sample.rnn import unrolled_forward


def batch_axis(module: nn.Module) -> int:
    """Axis holding the batch in the module's tensor inputs (RNNs and attention can be time-major)."""
    if isinstance(module, (nn.RNNBase, nn.MultiheadAttention, nn.Transformer,
                           nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return 0 if getattr(module, "batch_first", False) else 1
    return 0


def output_axes(module: nn.Module, n_leaves: int) -> list[int]:
    """Batch axis of each tensor leaf of the module's output (pytree order)."""
    axis = batch_axis(module)
    if isinstance(module, nn.RNNBase):  # (output, h_n[, c_n]): hidden states are (layers, B, H)
        return [axis] + [1] * (n_leaves - 1)
    if isinstance(module, nn.MultiheadAttention):  # attention weights are always batch-first
        return [axis] + [0] * (n_leaves - 1)
    return [axis] * n_leaves


class FunctorchFallback:
    """Rule computing explicit per-example gradients of a module's direct parameters (or of all
    its parameters with ``recurse=True``, for modules that never call their children)."""

    def __init__(self, recurse: bool = False):
        self.recurse = recurse

    def capture(self, module, args, kwargs):
        detach = lambda v: v.detach() if isinstance(v, torch.Tensor) else v  # noqa: E731
        return tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()}

    def per_sample_grads(self, module, captured, grad_outputs, batch_size):
        """{param name: (B, *shape)} for the module's trainable direct parameters.

        ``grad_outputs`` lists, for each tensor leaf of the module's output (pytree order), its
        gradient or None.
        """
        args, kwargs = captured
        axis = batch_axis(module)
        own = dict(module.named_parameters(recurse=self.recurse))
        params = {n: p.detach() for n, p in own.items() if p.requires_grad}
        frozen = {n: p.detach() for n, p in own.items() if not p.requires_grad}

        def batched(v):
            return isinstance(v, torch.Tensor) and v.dim() > axis and v.shape[axis] == batch_size

        arg_dims = tuple(axis if batched(a) else None for a in args)
        kw_names = sorted(kwargs)
        kw_vals = tuple(kwargs[k] for k in kw_names)
        kw_dims = tuple(axis if batched(v) else None for v in kw_vals)
        leaf_axes = output_axes(module, len(grad_outputs))
        out_dims = tuple(ax if g is not None else None for g, ax in zip(grad_outputs, leaf_axes))

        def inner_product(p, arg_vals, kw_vals_, gouts):
            arg_vals = tuple(a.unsqueeze(axis) if d is not None else a for a, d in zip(arg_vals, arg_dims))
            kws = {k: (v.unsqueeze(axis) if d is not None else v) for k, v, d in zip(kw_names, kw_vals_, kw_dims)}
            if isinstance(module, nn.RNNBase):  # fused kernels cannot be vmapped: unroll
                out = unrolled_forward(module, {**p, **frozen}, *arg_vals, **kws)
            else:
                out = functional_call(module, {**p, **frozen}, arg_vals, kws)
            outs, _ = tree_flatten(out)
            total = 0.0
            for o, g, ax in zip(outs, gouts, leaf_axes):
                if g is not None and isinstance(o, torch.Tensor):
                    total = total + (o * g.unsqueeze(ax)).sum()
            return total

        fn = vmap(grad(inner_product), in_dims=(None, arg_dims, kw_dims, out_dims))
        return fn(params, args, kw_vals, tuple(grad_outputs))
