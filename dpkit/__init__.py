"""dpkit: differential-privacy training and auditing for PyTorch.

Torch-free parts (``dpkit.accountants``, ``dpkit.audit``, the CLI) import without torch; the
torch-dependent public names below are loaded lazily on first access (PEP 562), so that
``import dpkit`` alone never imports torch.
"""

from importlib import import_module

from dpkit.errors import (
    AmbiguousStepError,
    CalibrationError,
    DPKitError,
    NoisePendingError,
    PrivacyBudgetExceeded,
    UnsupportedEventError,
    UnsupportedModuleError,
    SeededRandomnessWarning,
)

__version__ = "0.1.0"

# public name -> module that defines it (imported on first use)
_LAZY = {
    "make_private": "dpkit.privacy_engine",
    "DPOptimizer": "dpkit.optim",
    "DPDataLoader": "dpkit.data",
    "PoissonBatchSampler": "dpkit.data",
    "GradientEngine": "dpkit.grad_sample",
    "CorrelatedNoise": "dpkit.mechanisms.matrix",
    "replace_batchnorm": "dpkit.grad_sample",
}
_SUBPACKAGES = {"accountants", "audit", "mechanisms", "grad_sample", "optim", "data",
                "preprocessing", "admm", "federated"}

__all__ = sorted(
    ["AmbiguousStepError", "CalibrationError", "DPKitError", "SeededRandomnessWarning", "NoisePendingError", "PrivacyBudgetExceeded",
     "UnsupportedEventError", "UnsupportedModuleError", "__version__", *_LAZY, *_SUBPACKAGES]
)


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    if name in _SUBPACKAGES:
        return import_module(f"dpkit.{name}")
    raise AttributeError(f"module 'dpkit' has no attribute {name!r}")


def __dir__():
    return __all__
