"""Matrix-factorisation (correlated-noise) mechanisms: DP-FTRL / BandMF / BLT / tree.

Numpy strategies (:mod:`.strategies`), workloads (:mod:`.workloads`), sensitivities under
participation schemas (:mod:`.sensitivity`); the torch parts — the streaming noise
:class:`CorrelatedNoise` and the cyclic-Poisson batch sampler — are loaded lazily so that the
numpy parts import without torch.
"""

from dpkit._lazy import lazy_exports

from dpkit.mechanisms.matrix.sensitivity import Participation, sensitivity, workload_errors
from dpkit.mechanisms.matrix.strategies import (
    BandedStrategy,
    DenseStrategy,
    BLTStrategy,
    Strategy,
    ToeplitzStrategy,
    TreeStrategy,
    banded,
    binary_tree,
    blt,
    identity,
    multi_epoch,
    toeplitz_sqrt,
)
from dpkit.mechanisms.matrix.workloads import momentum_prefix_sum, prefix_sum

_LAZY = {"CorrelatedNoise": "streaming", "CyclicPoissonSampler": "participation"}

__all__ = sorted([
    "Participation", "sensitivity", "workload_errors", "Strategy", "BandedStrategy", "DenseStrategy",
    "multi_epoch",
    "BLTStrategy", "ToeplitzStrategy", "TreeStrategy", "banded", "binary_tree", "blt", "identity",
    "toeplitz_sqrt", "momentum_prefix_sum", "prefix_sum", *_LAZY])


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
