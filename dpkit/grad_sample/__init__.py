"""Per-example gradient engines: book-keeping (BK) hooks, per-sample hooks, torch.func fallback,
one rule per layer type (see :mod:`dpkit.grad_sample.layers`)."""

from dpkit.grad_sample.engine import GradientEngine
from dpkit.grad_sample.layers import LinearViewRule, PerSampleRule, register_rule
from dpkit.grad_sample.validation import check_model, replace_batchnorm

__all__ = ["GradientEngine", "LinearViewRule", "PerSampleRule", "check_model", "register_rule",
           "replace_batchnorm"]
