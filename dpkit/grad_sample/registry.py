"""Per-layer rules contributed from outside :mod:`dpkit.grad_sample.layers` (integrations).

:func:`register_rule` maps a module class to a rule object; :func:`registered_rule` is consulted
first by :func:`dpkit.grad_sample.layers.rule_for`. Integrations for optional libraries (Hugging
Face transformers, ...) register their rules lazily: only when that library has been imported by
the user, so dpkit never imports it itself.
"""

from __future__ import annotations

import importlib
import sys

import torch.nn as nn

_REGISTERED: dict[type, object] = {}
# optional library (top-level module name) -> dpkit module that registers its rules on import
_INTEGRATIONS = {"transformers": "dpkit.integrations.transformers"}
_loaded: set[str] = set()


def register_rule(module_class: type, rule) -> None:
    """Use ``rule`` for every module whose exact class is ``module_class``.

    Raises:
        TypeError: ``module_class`` is not an ``nn.Module`` subclass.
    """
    if not (isinstance(module_class, type) and issubclass(module_class, nn.Module)):
        raise TypeError(f"module_class must be an nn.Module subclass; got {module_class!r}")
    _REGISTERED[module_class] = rule


def registered_rule(module: nn.Module):
    """The rule registered for ``type(module)``, or None."""
    _load_integrations()
    return _REGISTERED.get(type(module))


def _load_integrations() -> None:
    for library, integration in _INTEGRATIONS.items():
        if library in sys.modules and library not in _loaded:
            _loaded.add(library)
            try:
                importlib.import_module(integration)
            except ModuleNotFoundError as e:
                if e.name != integration:  # the integration module exists but failed: surface it
                    raise
