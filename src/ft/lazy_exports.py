"""`lazy_exports`: the names a package re-exports, imported on first use (PEP 562).

A package whose `__init__` imports its torch-heavy modules makes every submodule
import torch too, even a config dataclass or a table of names. `ft --help` builds
its parser from such submodules and must not wait for torch, so `ft.models`,
`ft.lora` and `ft.generation` set `__getattr__ = lazy_exports(__name__, {...})`
instead: `from ft.lora import apply_lora` still works and imports `ft.lora.apply`
then.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Mapping, Sequence


def lazy_exports(package: str, exports: Mapping[str, Sequence[str]]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`; `exports` maps each submodule to the names
    the package re-exports from it."""
    home = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home[name]), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    return __getattr__


__all__ = ["lazy_exports"]
