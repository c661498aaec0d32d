"""Lazy package exports: ``name -> submodule`` tables resolved on first attribute access.

    __getattr__, __dir__ = lazy_exports(__name__, {"load_squad": "load", ...}, globals())

Keeps ``import kdfast.qa`` (and friends) cheap: transformers and datasets load only
when a name that needs them is used.
"""
from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, str], namespace: dict):
    """Module ``__getattr__`` and ``__dir__`` for ``package`` (``exports``: name -> submodule)."""
    names = sorted(exports)

    def __getattr__(name):
        mod = exports.get(name)
        if mod is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{mod}"), name)
        namespace[name] = value
        return value

    def __dir__():
        return names

    return __getattr__, __dir__
