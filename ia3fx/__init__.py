"""ia3fx: (IA)³ adapters by rewriting torch.fx graphs, with PEFT's semantics and files.

The names below are imported on first use (PEP 562 ``__getattr__``), so that ``import ia3fx``, and
``ia3fx merge`` (the offline merge, which needs neither torch nor transformers), start at once;
``from ia3fx import X`` and ``ia3fx.X`` work as with eager imports.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

# public name -> (submodule, attribute)
_EXPORTS = {
    "AdapterLoadError": ("errors", "AdapterLoadError"),
    "CallSite": ("sites", "CallSite"),
    "IA3Config": ("config", "IA3Config"),
    "IA3Error": ("errors", "IA3Error"),
    "IA3Model": ("model", "IA3Model"),
    "NoMatchingModuleError": ("errors", "NoMatchingModuleError"),
    "Plan": ("model", "Plan"),
    "TraceError": ("errors", "TraceError"),
    "draw": ("viz", "draw"),
    "export": ("export", "export"),
    "find_call_sites": ("sites", "find_call_sites"),
    "get_ia3_model": ("model", "get_ia3_model"),
    "insert_scales": ("passes", "insert_scales"),
    "merge_checkpoint": ("offline", "merge_checkpoint"),
    "plan": ("model", "plan"),
    "redirect_modules_to_save": ("passes", "redirect_modules_to_save"),
    "read_manifest": ("swap", "read_manifest"),
    "report": ("analysis", "report"),
    "swap_adapter": ("swap", "swap_adapter"),
    "to_networkx": ("analysis", "to_networkx"),
    "trace": ("capture", "trace"),
    "view": ("view", "view"),
}

__all__ = [
    "AdapterLoadError",
    "CallSite",
    "IA3Config",
    "IA3Error",
    "IA3Model",
    "NoMatchingModuleError",
    "Plan",
    "TraceError",
    "find_call_sites",
    "get_ia3_model",
    "insert_scales",
    "plan",
    "redirect_modules_to_save",
    "trace",
]


def _load(name: str) -> Any:
    module, attr = _EXPORTS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), attr)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = _load(name)
    if name not in _SHADOWED:
        globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


# functions named as the submodule that defines them
_SHADOWED = ("export", "view")


def _function_named_as_its_module(name: str) -> property:
    def get(self: types.ModuleType) -> Any:
        return _load(name)

    def set_(self: types.ModuleType, value: Any) -> None:
        pass  # the submodule stays reachable as sys.modules["ia3fx.<name>"]

    return property(get, set_)


class _Package(types.ModuleType):
    """``ia3fx.export`` and ``ia3fx.view`` are the functions, as with eager imports, even once the
    submodules of those names are imported (the import system then sets the package attribute to
    the module)."""

    export = _function_named_as_its_module("export")
    view = _function_named_as_its_module("view")


sys.modules[__name__].__class__ = _Package
