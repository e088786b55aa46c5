"""Book-keeping forwards: layers whose backward skips the non-private weight gradient.

In BK the weight gradient autograd would compute (Σ_i G_i, unclipped) is thrown away: the engine
forms Σ_i c_i G_i itself from the kept activations and output gradients. These autograd functions
compute the usual output, keep the output gradient for the engine, and return ONLY the gradient
with respect to the layer input, so earlier layers still receive theirs (Bu, Wang, Zha, Karypis,
ICML 2023, Sec. 3.3: "book-keeping" saves the second back-propagation AND the weight-gradient
products). The parameters still appear as inputs so that the output requires grad even when the
layer input does not (first layer, embeddings).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, record):
        ctx.save_for_backward(weight)
        ctx.record, ctx.x_dtype = record, x.dtype
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        _store(ctx.record, grad_out)
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
        _store(ctx.record, grad_out)
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
        _store(ctx.record, grad_out)
        return None, None, None, None


# nn.MultiheadAttention's out_proj is a NonDynamicallyQuantizableLinear: a plain Linear
_LINEARS = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)


def _store(record, grad_out):
    grads = record[1]
    grads[0] = grad_out.detach() if grads[0] is None else grads[0] + grad_out.detach()


def supports_bk_forward(module: nn.Module) -> bool:
    """Layers with a weight-gradient-free backward (exact types; subclasses keep their forward)."""
    if type(module) in _LINEARS:
        return True
    if type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        return module.padding_mode == "zeros" and module.padding != "same"
    if type(module) is nn.Embedding:
        return module.max_norm is None and not module.scale_grad_by_freq
    return False


def bk_apply(module: nn.Module, x: torch.Tensor, record) -> torch.Tensor:
    """Run ``module`` on ``x`` with the BK backward, storing the output gradient in ``record``."""
    if type(module) in _LINEARS:
        return _Linear.apply(x, module.weight, module.bias, record)
    if type(module) is nn.Embedding:
        return _Embedding.apply(x, module.weight, record, module)
    return _Conv.apply(x, module.weight, module.bias, record, module)
