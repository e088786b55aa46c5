"""PEP 562 lazy exports shared by dpkit's packages: a public name is imported from the submodule
that owns it on first access, so importing a package stays cheap (and torch-free where it must)."""

from __future__ import annotations

from importlib import import_module


def lazy_exports(package: str, owners: dict[str, str], public: list[str]):
    """``(__getattr__, __dir__)`` for ``package`` resolving ``owners[name]`` (a submodule name
    relative to the package) on first access; ``public`` is what ``dir()`` lists."""

    def __getattr__(name):
        if name in owners:
            return getattr(import_module(f"{package}.{owners[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return public

    return __getattr__, __dir__
