"""Wrap-time model checks and the BatchNorm replacement helper."""

from __future__ import annotations

import torch.nn as nn

from dpkit.errors import UnsupportedModuleError

# layers whose output for one example depends on other examples of the batch
_CROSS_EXAMPLE = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)


def check_model(model: nn.Module) -> None:
    """Refuse layers that mix examples (their per-example gradients are not defined): BatchNorm
    (batch statistics) and embeddings with ``scale_grad_by_freq`` (batch-wide row counts).

    Raises:
        UnsupportedModuleError: naming the first offending module and the fix.
    """
    for name, module in model.named_modules():
        if isinstance(module, _CROSS_EXAMPLE):
            raise UnsupportedModuleError(
                f"module {name or '<root>'!r} ({type(module).__name__}) mixes examples through batch "
                "statistics, so per-example gradients (and DP-SGD) are undefined for it. Replace it, e.g. "
                "model = dpkit.replace_batchnorm(model) swaps every BatchNorm for GroupNorm.")
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.scale_grad_by_freq:
            raise UnsupportedModuleError(
                f"module {name or '<root>'!r} ({type(module).__name__}) has scale_grad_by_freq=True: "
                "each row's gradient is divided by its count over the WHOLE batch, so one example's "
                "gradient depends on the others and per-example clipping does not bound it. Build it "
                "with scale_grad_by_freq=False (e.g. module.scale_grad_by_freq = False).")


def replace_batchnorm(model: nn.Module, num_groups: int = 32) -> nn.Module:
    """Replace every BatchNorm layer by a GroupNorm with the same number of channels (in place).

    The group count is the largest divisor of the channel count not above ``num_groups``. Affine
    parameters start fresh (weight 1, bias 0): BatchNorm's statistics have no GroupNorm equivalent.

    Returns:
        The same model object, modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive integer; got {num_groups!r}")
    for name, child in list(model.named_children()):
        if isinstance(child, _CROSS_EXAMPLE):
            channels = child.num_features
            groups = max(g for g in range(1, min(num_groups, channels) + 1) if channels % g == 0)
            setattr(model, name, nn.GroupNorm(groups, channels, affine=child.affine))
        else:
            replace_batchnorm(child, num_groups)
    return model
