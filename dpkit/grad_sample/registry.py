"""Per-layer rules contributed from outside :mod:`dpkit.grad_sample.layers` (integrations).

:func:`register_rule` maps a module class to a rule object; :func:`registered_rule` is consulted
first by :func:`dpkit.grad_sample.layers.rule_for`. Integrations for optional libraries (Hugging
Face transformers, ...) register their rules lazily: only when that library has been imported by
the user, so dpkit never imports it itself.

:func:`register_batch_first` names model classes whose API contract puts the batch on axis 0 of
every position-wise layer they call (Hugging Face models: every input is (batch, ...)); the engine
then reads those layers' batch on axis 0 instead of inferring it (see
:mod:`dpkit.grad_sample.engine`, "Batch axis").
"""

from __future__ import annotations

import importlib
import sys

import torch.nn as nn

_REGISTERED: dict[type, object] = {}
_BY_NAME: dict[str, object] = {}  # "package.module.Class" -> rule
_BATCH_FIRST: set[str] = set()  # qualified names of batch-first model classes
_PRE_FORWARD: dict[str, object] = {}  # "package.module.Class" -> per-example input hook
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
        rule = _BY_NAME.get(_qualified(cls))
    return rule


def register_batch_first(model_class) -> None:
    """Declare that every model of ``model_class`` or a subclass keeps the batch on axis 0 of the
    tensors of every position-wise layer (Linear, norms, embeddings) it calls.

    Register only classes whose code guarantees it: a class that transposes to time-major
    internally would be clipped per time step on a batch with as many examples as positions
    (a batch of another size is still refused: the layer's axis 0 does not hold n examples).

    Args:
        model_class: an ``nn.Module`` subclass or its qualified name ``"package.module.Class"``.

    Raises:
        TypeError: neither an ``nn.Module`` subclass nor a dotted name.
    """
    if isinstance(model_class, str):
        if "." not in model_class:
            raise TypeError(f"model_class must be a qualified name 'package.module.Class'; got {model_class!r}")
        _BATCH_FIRST.add(model_class)
        return
    if not (isinstance(model_class, type) and issubclass(model_class, nn.Module)):
        raise TypeError(f"model_class must be an nn.Module subclass; got {model_class!r}")
    _BATCH_FIRST.add(_qualified(model_class))


def is_batch_first(module: nn.Module) -> bool:
    """Whether ``module``'s class or one of its bases was registered with :func:`register_batch_first`."""
    _load_integrations()
    return bool(_BATCH_FIRST) and any(_qualified(c) in _BATCH_FIRST for c in type(module).__mro__)


def register_per_example_inputs(module_class, hook) -> None:
    """Give modules of ``module_class`` (exact class) per-example copies of a tensor they would
    otherwise build once and broadcast over the batch (T5's relative position bias).

    A parameter whose output is broadcast over the batch receives the SUM of the examples'
    gradients, so no rule can split it per example. While the engine records a training step it
    calls ``hook(module, args, kwargs)`` before the module's forward; the hook returns ``None``
    (nothing to do) or ``(args, kwargs)`` with that tensor computed with a leading batch axis
    (e.g. an embedding looked up with ids expanded to (B, ...)), so each example's gradient
    reaches the parameter's rule separately. The result must equal what the module computes.

    Raises:
        TypeError: ``module_class`` is not a qualified name or ``hook`` is not callable.
    """
    if not isinstance(module_class, str) or "." not in module_class:
        raise TypeError(f"module_class must be a qualified name 'package.module.Class'; got {module_class!r}")
    if not callable(hook):
        raise TypeError(f"hook must be callable; got {hook!r}")
    _PRE_FORWARD[module_class] = hook


def per_example_inputs_hook(module: nn.Module):
    """The hook registered with :func:`register_per_example_inputs` for ``type(module)``, or None."""
    _load_integrations()
    return _PRE_FORWARD.get(_qualified(type(module))) if _PRE_FORWARD else None


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _load_integrations() -> None:
    for library, integration in _INTEGRATIONS.items():
        if library in sys.modules and library not in _loaded:
            _loaded.add(library)
            try:
                importlib.import_module(integration)
            except ModuleNotFoundError as e:
                if e.name != integration:  # the integration module exists but failed: surface it
                    raise
