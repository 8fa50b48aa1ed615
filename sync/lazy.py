"""Names a package exports but imports from their own modules on first use, so that importing the
package does not load what a command may never use (PEP 562's module ``__getattr__``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any


def lazy_names(package: str, homes: Mapping[str, str]) -> Callable[[str], Any]:
    """A ``__getattr__`` for ``package``: each name in ``homes`` is imported from the module it maps to
    when first asked for; any other name is an AttributeError, as for a plain module."""

    def __getattr__(name: str) -> Any:
        if name in homes:
            return getattr(import_module(homes[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
