"""DPOptimizer (wraps ANY torch.optim.Optimizer) and its variants, built by composition:
error feedback (DiceSGD) through contribution hooks, lazy embedding noise, correlated noise
(a NoiseMechanism from :mod:`dpkit.mechanisms.matrix`)."""

from dpkit.optim.dp_optimizer import DPOptimizer
from dpkit.optim.error_feedback import (
    ErrorFeedback,
    attach_error_feedback,
    calibrate_dicesgd_noise,
    dicesgd_event,
)

__all__ = ["DPOptimizer", "ErrorFeedback", "attach_error_feedback", "calibrate_dicesgd_noise",
           "dicesgd_event"]
