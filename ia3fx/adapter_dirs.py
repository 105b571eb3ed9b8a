"""Reading an adapter directory's ``adapter_config.json``: no torch import, so that the offline
checkpoint merge (:mod:`ia3fx.offline`) can start without it; :mod:`ia3fx.io` reads adapters with it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from .config import CONFIG_NAME, IA3Config
from .errors import AdapterLoadError

__all__ = ["adapter_file"]


def _adapters_below(directory: str) -> list[str]:
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        return []
    return [e for e in entries if os.path.isfile(os.path.join(directory, e, CONFIG_NAME))]


def adapter_file(directory: str, name: str, view: Mapping[str, str | None]) -> str | None:
    """The path to read file ``name`` of ``directory`` from, given
    :func:`~ia3fx.atomic_files.settled_view`'s ``view`` (``None``: the file is absent)."""
    return view[name] if name in view else os.path.join(directory, name)


def _read_config(directory: str, view: Mapping[str, str | None] | None = None) -> IA3Config:
    """``directory``'s config (read from where ``view`` says: :func:`~ia3fx.atomic_files.settled_view`)."""
    path = adapter_file(directory, CONFIG_NAME, view or {})
    if path is None or not os.path.isfile(path):
        below = _adapters_below(directory)
        hint = (
            f"; it holds adapters in subdirectories {below} (PEFT saves adapters not named 'default' "
            f"there): pass {os.path.join(directory, below[0])!r}"
            if below
            else ""
        )
        raise AdapterLoadError(f"{directory} is not an adapter directory: it has no {CONFIG_NAME}{hint}")
    try:
        with open(path, encoding="utf-8") as f:
            data: Any = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterLoadError(f"{path} is not a readable JSON file: {e}") from e
    if not isinstance(data, dict):
        raise AdapterLoadError(f"{path} holds a JSON {type(data).__name__}, not an adapter config object")
    if "peft_type" not in data:
        raise AdapterLoadError(f"{path} has no 'peft_type': it is not a PEFT adapter config")
    if str(data["peft_type"]) != "IA3":
        raise AdapterLoadError(
            f"{path} is a {data['peft_type']} adapter (peft_type={data['peft_type']!r}); ia3fx only reads IA3 adapters"
        )
    try:
        return IA3Config.from_dict(data)  # unknown keys: a warning naming them, as PEFT
    except (TypeError, ValueError) as e:
        raise AdapterLoadError(f"{path} is not a valid IA3 config: {e}") from e
