"""PEFT's name rules for (IA)³ targets: which module names a config's patterns select.

Plain functions of names and patterns, with no torch import, so that the offline checkpoint merge
(:mod:`ia3fx.offline`) can plan from a checkpoint's tensor names alone; :mod:`ia3fx.targeting`
applies the same rules to a model's modules.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

__all__ = ["_excluded", "_guarded", "_matches", "_feedforward", "_modules_to_save"]


def _excluded(name: str, exclude: object) -> bool:
    if not exclude:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, name) is not None
    return name in exclude or any(name.endswith(f".{e}") for e in exclude)


def _guarded(name: str, modules_to_save: Sequence[str] | None) -> bool:
    # PEFT uses the names unescaped, as regexes; so do we, so that a PEFT config means the same here
    return bool(modules_to_save) and any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save)


def _matches(name: str, targets: object) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith(f".{t}") for t in targets)


def _feedforward(name: str, ff: object) -> bool:
    if isinstance(ff, str):
        return re.fullmatch(ff, name) is not None
    hits = [t for t in ff if name.endswith(t)]
    if hits and not any(name == t or name.endswith(f".{t}") for t in hits):
        warnings.warn(
            f"feedforward_modules entry {hits[0]!r} marks {name!r} as feedforward through a plain "
            "suffix match (PEFT's rule, kept so that PEFT files mean the same here); use the full "
            "name or a regex if that is not intended",
            stacklevel=4,
        )
    return bool(hits)


def _modules_to_save(names: Sequence[str], modules_to_save: Sequence[str] | None) -> list[str]:
    """PEFT's wrapping rule (plain ``endswith``); a module inside an already chosen one is skipped."""
    if not modules_to_save:
        return []
    chosen: list[str] = []
    for name in names:
        if name and any(name.endswith(m) for m in modules_to_save):
            if not any(name.startswith(c + ".") for c in chosen):
                chosen.append(name)
    return chosen
