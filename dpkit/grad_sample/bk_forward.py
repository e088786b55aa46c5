"""Book-keeping forwards: layers whose backward skips the non-private weight gradient.

In BK the weight gradient autograd would compute (Σ_i G_i, unclipped) is thrown away: the engine
forms Σ_i c_i G_i itself from the kept activations and output gradients. These autograd functions
compute the usual output, keep the output gradient for the engine, and return ONLY the gradient
with respect to the layer input, so earlier layers still receive theirs (Bu, Wang, Zha, Karypis,
ICML 2023, Sec. 3.3: "book-keeping" saves the second back-propagation AND the weight-gradient
products). The parameters still appear as inputs so that the output requires grad even when the
layer input does not (first layer, embeddings).

Layers defined outside torch (integrations) add their own BK forward with
:func:`register_bk_forward`, keyed by the class's qualified name.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# qualified class name ("package.module.Class") -> apply(module, x, record) for integration layers
_REGISTERED: dict[str, Callable] = {}


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, record):
        ctx.save_for_backward(weight)
        ctx.record, ctx.x_dtype = record, x.dtype
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        store_grad(ctx.record, grad_out)
        grad_x = None
        if ctx.needs_input_grad[0]:  # under autocast the output gradient may be bf16/fp16
            grad_x = (grad_out @ weight.to(grad_out.dtype)).to(ctx.x_dtype)
        return grad_x, None, None, None


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, record, conv):
        ctx.save_for_backward(x, weight)
        ctx.record, ctx.conv = record, conv
        return conv._conv_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        conv = ctx.conv
        store_grad(ctx.record, grad_out)
        grad_x = None
        if ctx.needs_input_grad[0]:
            padding = conv.padding
            if isinstance(padding, str):  # only reached for padding="valid": "same" goes generic
                padding = (0,) * len(conv.kernel_size)
            dt = grad_out.dtype
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x.to(dt), weight.to(dt), None, conv.stride, padding, conv.dilation, False,
                [0] * len(conv.kernel_size), conv.groups, [True, False, False])[0].to(x.dtype)
        return grad_x, None, None, None, None


class _Embedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, record, module):
        ctx.record = record
        return F.embedding(ids, weight, module.padding_idx, module.max_norm, module.norm_type,
                           module.scale_grad_by_freq, module.sparse)

    @staticmethod
    def backward(ctx, grad_out):
        store_grad(ctx.record, grad_out)
        return None, None, None, None


# nn.MultiheadAttention's out_proj is a NonDynamicallyQuantizableLinear: a plain Linear
_LINEARS = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)


def store_grad(record, grad_out) -> None:
    """Add a BK layer's output gradient to its record (several backward contributions sum)."""
    grads = record[1]
    grads[0] = grad_out.detach() if grads[0] is None else grads[0] + grad_out.detach()


def register_bk_forward(qualified_name: str, apply: Callable) -> None:
    """Give the class named ``qualified_name`` a BK forward ``apply(module, x, record)``: it must
    return the layer's output, and its backward must call :func:`store_grad` with the output
    gradient and return only the input gradient (none for the layer's parameters).

    Raises:
        TypeError: ``qualified_name`` is not a dotted name or ``apply`` is not callable.
    """
    if not isinstance(qualified_name, str) or "." not in qualified_name:
        raise TypeError(f"qualified_name must be 'package.module.Class'; got {qualified_name!r}")
    if not callable(apply):
        raise TypeError(f"apply must be callable; got {type(apply).__name__}")
    _REGISTERED[qualified_name] = apply


def _qualified(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def supports_bk_forward(module: nn.Module) -> bool:
    """Layers with a weight-gradient-free backward (exact types; subclasses keep their forward)."""
    if _REGISTERED and _qualified(module) in _REGISTERED:
        return True
    if type(module) in _LINEARS:
        return True
    if type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        return module.padding_mode == "zeros" and module.padding != "same"
    if type(module) is nn.Embedding:
        return module.max_norm is None and not module.scale_grad_by_freq
    return False


def bk_apply(module: nn.Module, x: torch.Tensor, record) -> torch.Tensor:
    """Run ``module`` on ``x`` with the BK backward, storing the output gradient in ``record``."""
    registered = _REGISTERED.get(_qualified(module)) if _REGISTERED else None
    if registered is not None:
        return registered(module, x, record)
    if type(module) in _LINEARS:
        return _Linear.apply(x, module.weight, module.bias, record)
    if type(module) is nn.Embedding:
        return _Embedding.apply(x, module.weight, record, module)
    return _Conv.apply(x, module.weight, module.bias, record, module)
