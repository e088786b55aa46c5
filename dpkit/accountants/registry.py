"""Accountants by name: ``make_accountant("pld" | "rdp" | "prv" | "gdp")`` and a registry for more.

Built-in accountants are imported on first use, so ``import dpkit.accountants`` stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from dpkit.accountants.base import Accountant

__all__ = ["make_accountant", "register_accountant", "available_accountants",
           "accountants_supporting", "fresh_accountant"]

_BUILTIN = {
    "pld": ("dpkit.accountants.pld", "PLDAccountant"),
    "rdp": ("dpkit.accountants.rdp", "RDPAccountant"),
    "prv": ("dpkit.accountants.prv", "PRVAccountant"),
    "gdp": ("dpkit.accountants.gdp", "GDPAccountant"),
}


def _lazy_class(module: str, cls: str) -> Callable:
    def factory(**kwargs):
        return getattr(import_module(module), cls)(**kwargs)
    factory.__name__ = cls
    return factory


_REGISTRY: dict[str, Callable] = {name: _lazy_class(*spec) for name, spec in _BUILTIN.items()}


def make_accountant(name="pld", **kwargs):
    """Create a fresh accountant by registered name.

    Args:
        name: ``"pld"`` (default; tight, dp_accounting), ``"rdp"`` (Rényi DP, looser),
            ``"prv"`` (prv_accountant, reports its upper bound), ``"gdp"`` (μ-GDP central-limit
            approximation; may UNDER-state ε, warns), or any name added with
            :func:`register_accountant`.
        **kwargs: passed to the accountant's constructor (e.g. ``neighboring_relation``,
            ``value_discretization_interval`` for "pld", ``orders`` for "rdp"); an unknown
            keyword raises ``TypeError``.

    Returns:
        A new :class:`~dpkit.accountants.base.Accountant` with an empty ledger.

    Raises:
        ValueError: unknown ``name``.
        TypeError: ``name`` not a string, or a keyword the accountant does not take.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a string; got {name!r} ({type(name).__name__})")
    if name not in _REGISTRY:
        raise ValueError(f"name must be one of {available_accountants()!r}; got {name!r}")
    return _REGISTRY[name](**kwargs)


def register_accountant(name, factory, *, overwrite=False) -> None:
    """Register ``factory`` (called with the keyword arguments of :func:`make_accountant`) as ``name``.

    Args:
        name: non-empty string.
        factory: callable returning an :class:`~dpkit.accountants.base.Accountant`.
        overwrite: replace an existing registration (refused by default so that a plugin cannot
            silently change what ``"pld"`` means).

    Raises:
        ValueError: ``name`` empty or already registered and ``overwrite`` is False.
        TypeError: ``name`` not a string or ``factory`` not callable.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a string; got {name!r} ({type(name).__name__})")
    if not name:
        raise ValueError("name must be a non-empty string; got ''")
    if not callable(factory):
        raise TypeError(f"factory must be callable; got {factory!r} ({type(factory).__name__})")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"name {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = factory


def available_accountants() -> list[str]:
    """Registered accountant names, sorted."""
    return sorted(_REGISTRY)


def accountants_supporting(event, neighboring_relation) -> list[str]:
    """Names of registered accountants that can account ``event`` under the relation."""
    names = []
    for name, factory in sorted(_REGISTRY.items()):
        try:
            if factory(neighboring_relation=neighboring_relation).supports(event):
                names.append(name)
        except Exception:  # a broken third-party factory must not hide the real error message
            continue
    return names


def fresh_accountant(accountant) -> Accountant:
    """An accountant with an EMPTY ledger: built from a registered name, or the given instance.

    Raises:
        ValueError: an instance that already holds events (its spend would be double counted), or
            an unknown name.
        TypeError: neither a name nor an Accountant.
    """
    from dpkit.accountants.base import Accountant  # noqa: F811 (runtime import; base imports this module)

    if isinstance(accountant, Accountant):
        if accountant.ledger:
            raise ValueError("accountant must be fresh (empty ledger); pass a new one or a name")
        return accountant
    if not isinstance(accountant, str):
        raise TypeError(f"accountant must be a name or an Accountant; got {type(accountant).__name__}")
    return make_accountant(accountant)
