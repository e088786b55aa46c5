"""Generic per-example gradients for any module with its own parameters, via torch.func.

For a module m with direct parameters θ, captured inputs x and output gradients ḡ, the
per-example gradient is ∇_θ ⟨m(θ, x_i), ḡ_i⟩, computed for all i at once with
``vmap(grad(...))`` over the batch axis (the per-example-gradient construction of Opacus' functorch
path; Yousefpour et al., "Opacus", 2021). Children of m keep their own rules: their parameters are
held constant here and their hooks are silenced while this runs (see the engine).

Exactness needs every input to be split on its TRUE batch axis: a tensor that carries examples but
is vmapped on the wrong axis (or broadcast to every example) mixes examples and breaks the
sensitivity bound. Modules with a known signature (recurrent layers, nn.MultiheadAttention) map each
argument to its documented batch axis; other modules split the tensors whose batch axis has the
batch size and broadcast the rest (shared buffers, masks of shape (1, T)).

Exactness also needs m to treat examples independently along the batch axis (no BatchNorm-like
mixing); that cannot be checked in general, and dpkit refuses the known cross-example layers at
wrap time.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap
from torch.nn.utils.rnn import PackedSequence
from torch.utils._pytree import tree_flatten, tree_unflatten

from dpkit.grad_sample.rnn import packed_gradients, unpack_input, unrolled_forward


def batch_axis(module: nn.Module) -> int:
    """Axis holding the batch in the module's main tensor inputs (RNNs and attention can be
    time-major)."""
    if isinstance(module, (nn.RNNBase, nn.MultiheadAttention, nn.Transformer,
                           nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return 0 if getattr(module, "batch_first", False) else 1
    return 0


def output_axes(module: nn.Module, n_leaves: int) -> list[int]:
    """Batch axis of each tensor leaf of the module's output (pytree order).

    A recurrent layer run on a :class:`PackedSequence` returns the packed output (4 leaves: data,
    batch_sizes, sorted_indices, unsorted_indices) before the hidden states; the packed data has no
    batch axis (axis 0 counts packed time steps), use :meth:`FunctorchFallback.batch_size`.
    """
    axis = batch_axis(module)
    if isinstance(module, nn.RNNBase):  # (output, h_n[, c_n]): hidden states are (layers, B, H)
        n_states = 2 if module.mode == "LSTM" else 1
        n_out = n_leaves - n_states
        return [axis] * n_out + [1] * n_states
    if isinstance(module, nn.MultiheadAttention):  # attention weights are always batch-first
        return [axis] + [0] * (n_leaves - 1)
    return [axis] * n_leaves


# nn.MultiheadAttention.forward's arguments: batch axis of each, by name
# ("axis": the module's batch axis; "heads": a 3-D attn_mask of shape (B·num_heads, L, S))
_MHA_AXES = {"query": "axis", "key": "axis", "value": "axis", "key_padding_mask": 0,
             "attn_mask": "heads"}


class FunctorchFallback:
    """Rule computing explicit per-example gradients of a module's direct parameters (or of all
    its parameters with ``recurse=True``, for modules that never call their children)."""

    def __init__(self, recurse: bool = False):
        self.recurse = recurse

    def capture(self, module, args, kwargs):
        detach = lambda v: v.detach() if isinstance(v, torch.Tensor) else v  # noqa: E731
        return tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()}

    def batch_size(self, module, captured, grad_outputs) -> int:
        """Number of examples of one captured use (a packed RNN input counts its sequences)."""
        packed = self.packed_input(module, captured)
        if packed is not None:
            return int(packed.batch_sizes[0])
        i, g = next((i, g) for i, g in enumerate(grad_outputs) if g is not None)
        return g.shape[output_axes(module, len(grad_outputs))[i]]

    @staticmethod
    def packed_input(module, captured) -> PackedSequence | None:
        """The PackedSequence input of a recurrent layer, or None (its output data has no batch
        axis: axis 0 counts packed time steps)."""
        if not isinstance(module, nn.RNNBase):
            return None
        args, kwargs = captured
        x = args[0] if args else kwargs["input"]
        return x if isinstance(x, PackedSequence) else None

    def per_sample_grads(self, module, captured, grad_outputs):
        """{param name: (B, *shape)} for the module's trainable direct parameters, B being
        :meth:`batch_size` (the engine matched it to the batch).

        ``grad_outputs`` lists, for each tensor leaf of the module's output (pytree order), its
        gradient or None.
        """
        own = dict(module.named_parameters(recurse=self.recurse))
        params = {n: p.detach() for n, p in own.items() if p.requires_grad}
        frozen = {n: p.detach() for n, p in own.items() if not p.requires_grad}
        batch_size = self.batch_size(module, captured, grad_outputs)
        if isinstance(module, nn.RNNBase):
            return self._rnn(module, params, frozen, captured, grad_outputs)
        args, kwargs = captured
        leaves, spec = tree_flatten((args, kwargs))
        dims, heads = _input_axes(module, args, kwargs, batch_size)
        tensors = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
        values = tuple(leaves[i].unflatten(0, (batch_size, heads[i])) if heads[i] else leaves[i]
                       for i in tensors)
        in_dims = tuple(dims[i] for i in tensors)
        leaf_axes = output_axes(module, len(grad_outputs))

        def inner_product(p, tensor_vals, gouts):
            vals = list(leaves)
            for i, v, d in zip(tensors, tensor_vals, in_dims):
                if d is not None:
                    v = v.unsqueeze(d)
                    if heads[i]:  # (1, H, L, S) -> (H, L, S)
                        v = v.flatten(0, 1)
                vals[i] = v
            a, kw = tree_unflatten(vals, spec)
            return _dot(functional_call(module, {**p, **frozen}, a, kw), gouts, leaf_axes)

        out_dims = tuple(ax if g is not None else None for g, ax in zip(grad_outputs, leaf_axes))
        fn = vmap(grad(inner_product), in_dims=(None, in_dims, out_dims))
        return fn(params, values, tuple(grad_outputs))

    @staticmethod
    def _rnn(module, params, frozen, captured, grad_outputs):
        """Recurrent layers: fused kernels cannot be vmapped, so the recurrence is unrolled
        (:mod:`dpkit.grad_sample.rnn`); the input is split on its batch axis and the initial state
        ``hx`` on ITS batch axis, 1 ((layers, B, H) whether or not the module is batch_first)."""
        args, kwargs = captured
        names = ("input", "hx")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        x, lengths = unpack_input(module, bound["input"])
        hx = bound.get("hx")
        gouts = packed_gradients(module, bound["input"], grad_outputs)
        axis = batch_axis(module)
        hx_dims = None if hx is None else (tuple(1 for _ in hx) if isinstance(hx, tuple) else 1)
        len_dims = None if lengths is None else 0
        out_axes = output_axes(module, len(gouts))
        out_dims = tuple(ax if g is not None else None for g, ax in zip(gouts, out_axes))

        def inner_product(p, x_, hx_, lengths_, gouts_):
            x_ = x_.unsqueeze(axis)
            if hx_ is not None:
                hx_ = tuple(h.unsqueeze(1) for h in hx_) if isinstance(hx_, tuple) else hx_.unsqueeze(1)
            lengths_ = None if lengths_ is None else lengths_.unsqueeze(0)
            out = unrolled_forward(module, {**p, **frozen}, x_, hx_, lengths=lengths_)
            return _dot(out, gouts_, out_axes)

        fn = vmap(grad(inner_product), in_dims=(None, axis, hx_dims, len_dims, out_dims))
        return fn(params, x, hx, lengths, gouts)


def _dot(out, gouts, axes):
    """Σ over output leaves of ⟨output, its gradient⟩ for ONE example (gradients lack the batch axis)."""
    outs, _ = tree_flatten(out)
    total = 0.0
    for o, g, ax in zip(outs, gouts, axes):
        if g is not None and isinstance(o, torch.Tensor):
            total = total + (o * g.unsqueeze(ax)).sum()
    return total


def _input_axes(module, args, kwargs, batch_size):
    """Per pytree leaf of (args, kwargs): the batch axis to split on (None: shared by every
    example), and for a 3-D attention mask of shape (B·H, L, S) the head count H (else None)."""
    leaves, _ = tree_flatten((args, kwargs))
    if isinstance(module, nn.MultiheadAttention):
        names = list(inspect.signature(module.forward).parameters)
        bound = dict(zip(names, args))
        bound.update(kwargs)
        axis = batch_axis(module)
        per_arg = {}
        for name, value in bound.items():
            rule = _MHA_AXES.get(name)
            if not isinstance(value, torch.Tensor) or rule is None:
                per_arg[name] = (None, None)
            elif rule == "axis":
                per_arg[name] = (axis, None)
            elif rule == "heads":
                per_arg[name] = (0, module.num_heads) if value.dim() == 3 else (None, None)
            else:
                per_arg[name] = (rule, None)
        # the same order as tree_flatten's leaves: positional arguments, then kwargs by insertion
        pairs = [per_arg[n] for n in names[:len(args)]] + [per_arg[k] for k in kwargs]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    axis = batch_axis(module)
    dims = [axis if isinstance(v, torch.Tensor) and v.dim() > axis and v.shape[axis] == batch_size
            else None for v in leaves]
    return dims, [None] * len(leaves)
