"""Opacus drop-in: run an Opacus training script on dpkit by changing its imports.

::

    from dpkit.opacus import PrivacyEngine                                   # was: from opacus import ...
    from dpkit.opacus.utils.batch_memory_manager import BatchMemoryManager  # was: from opacus.utils...

:class:`PrivacyEngine` accepts Opacus 1.6's public signatures and builds everything with
:func:`dpkit.make_private`, so sampling, noise, normaliser and accounting come from dpkit. What
differs from Opacus (the model is not wrapped, epochs round up, what is refused and why) is listed
in ``docs/opacus.md``.
"""

from dpkit.opacus.engine import AccountantView, PrivacyEngine
from dpkit.opacus.utils.batch_memory_manager import BatchMemoryManager

__all__ = ["AccountantView", "BatchMemoryManager", "PrivacyEngine"]
