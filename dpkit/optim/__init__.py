"""DPOptimizer (wraps ANY torch.optim.Optimizer) and its variants, built by composition."""

from dpkit.optim.dp_optimizer import DPOptimizer

__all__ = ["DPOptimizer"]
