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
_BY_NAME: dict[str, object] = {}  # "package.module.Class" -> rule
# optional library (top-level module name) -> dpkit module that registers its rules on import
_INTEGRATIONS = {"transformers": "dpkit.integrations.transformers"}
_loaded: set[str] = set()


def register_rule(module_class, rule) -> None:
    """Use ``rule`` for every module whose exact class is ``module_class``.

    Args:
        module_class: an ``nn.Module`` subclass, or its qualified name ``"package.module.Class"``
            (an integration can then name a class without importing the module defining it).
        rule: a :class:`~dpkit.grad_sample.layers.LinearViewRule` or
            :class:`~dpkit.grad_sample.layers.PerSampleRule` instance.

    Raises:
        TypeError: ``module_class`` is neither an ``nn.Module`` subclass nor a dotted name.
    """
    if isinstance(module_class, str):
        if "." not in module_class:
            raise TypeError(f"module_class must be a qualified name 'package.module.Class'; got {module_class!r}")
        _BY_NAME[module_class] = rule
        return
    if not (isinstance(module_class, type) and issubclass(module_class, nn.Module)):
        raise TypeError(f"module_class must be an nn.Module subclass; got {module_class!r}")
    _REGISTERED[module_class] = rule


def registered_rule(module: nn.Module):
    """The rule registered for ``type(module)`` (by class, then by qualified name), or None."""
    _load_integrations()
    cls = type(module)
    rule = _REGISTERED.get(cls)
    if rule is None and _BY_NAME:
        rule = _BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
    return rule


def _load_integrations() -> None:
    for library, integration in _INTEGRATIONS.items():
        if library in sys.modules and library not in _loaded:
            _loaded.add(library)
            try:
                importlib.import_module(integration)
            except ModuleNotFoundError as e:
                if e.name != integration:  # the integration module exists but failed: surface it
                    raise
