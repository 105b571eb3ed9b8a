"""PEFT-format adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``.

Layout as PEFT's ``save_pretrained``: the adapter named ``default`` goes into the directory itself,
any other into ``<directory>/<adapter name>/``. Tensors are keyed
``base_model.model.<module>.ia3_l`` (and ``base_model.model.<module>.<param>`` for
``modules_to_save``), shaped as PEFT stores them.

Reading accepts ``adapter_model.safetensors`` or, failing that, ``adapter_model.bin`` through
``torch.load(weights_only=True)``: no other pickle is ever loaded.

Saves are atomic as a set, even across a kill: every file is written to a temporary next to its
final name, then all are committed under a journal (:func:`ia3fx.atomic_files.commit_files`), and
a save or a read first finishes a save into the directory that a kill interrupted. Why and how:
:mod:`ia3fx.atomic_files`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from .adapter_dirs import _adapters_below, _read_config, adapter_file  # noqa: F401 (io's names)
from .atomic_files import (
    clean_stale_temporaries,
    commit_files,
    discard_staged,
    finish_interrupted_save,
    fsync_file,
    settled_view,
    temp_path,
)
from .config import CONFIG_NAME, IA3Config
from .errors import AdapterLoadError

if TYPE_CHECKING:
    from .targeting import Target

__all__ = [
    "WEIGHTS_NAME",
    "BIN_WEIGHTS_NAME",
    "adapter_directory",
    "adapter_file",
    "config_for_peft",
    "peft_can_reload",
    "save_adapter_files",
    "read_adapter_files",
]

WEIGHTS_NAME = "adapter_model.safetensors"
BIN_WEIGHTS_NAME = "adapter_model.bin"


def adapter_directory(save_directory: str | os.PathLike, adapter_name: str) -> str:
    """Where PEFT puts an adapter: the directory itself for ``default``, else a subdirectory."""
    save_directory = os.fspath(save_directory)
    return save_directory if adapter_name == "default" else os.path.join(save_directory, adapter_name)


# --- writing -----------------------------------------------------------------------------------
def save_adapter_files(
    directory: str | os.PathLike,
    config: IA3Config,
    state_dict: Mapping[str, torch.Tensor],
    extra_weights: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> None:
    """Write config and tensors into ``directory`` (created if needed), atomically as a set.

    ``extra_weights`` maps more safetensors file names to their tensors, written in the same set
    (the copy of the adapter that transformers' Trainer reads back when resuming). A save killed
    earlier in this directory is finished first and its temporaries are removed
    (:mod:`ia3fx.atomic_files`).
    """
    directory = os.fspath(directory)
    if os.path.isfile(directory):
        raise ValueError(f"Provided path ({directory}) should be a directory, not a file")
    os.makedirs(directory, exist_ok=True)
    finish_interrupted_save(directory)
    clean_stale_temporaries(directory)
    files = {WEIGHTS_NAME: state_dict, **(extra_weights or {})}
    text = config.to_json_string()
    staged: list[tuple[str, str]] = []
    try:
        for name, tensors in files.items():
            tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
            tmp = temp_path(directory, name)
            final = os.path.join(directory, name)
            staged.append((tmp, final))
            mode = os.stat(final if os.path.exists(final) else tmp).st_mode & 0o777
            save_file(tensors, tmp, metadata={"format": "pt"})
            os.chmod(tmp, mode)  # safetensors writes 0o600; keep the file's mode, or the usual one
            fsync_file(tmp)
        tmp = temp_path(directory, CONFIG_NAME)
        final = os.path.join(directory, CONFIG_NAME)
        staged.append((tmp, final))
        if os.path.exists(final):
            os.chmod(tmp, os.stat(final).st_mode & 0o777)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        discard_staged(staged)
        raise
    commit_files(staged, directory)


# --- the config PEFT can reload ----------------------------------------------------------------
def peft_can_reload(config: IA3Config) -> bool:
    """PEFT's ``IA3Config.__post_init__`` check: list targets and list feedforward modules must be
    subsets *as strings* (``model.layers.0.mlp.down_proj`` is not ``down_proj`` to it)."""
    targets, ff = config.target_modules, config.feedforward_modules
    if targets is None or ff is None:
        return False
    if isinstance(targets, (set, list, tuple)) and isinstance(ff, (set, list, tuple)):
        return set(ff).issubset(set(targets))
    return True


def _alternation(names: list[str]) -> str:
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def config_for_peft(
    config: IA3Config,
    targets: Mapping[str, Target],
    modules_to_save: list[str],
    reselect: Callable[[IA3Config], tuple[dict[str, bool], list[str]] | None],
) -> IA3Config:
    """The config to write for an adapter whose layers are ``targets``: PEFT reloads it, and
    PEFT's matching (which ``reselect`` runs on the same model) picks exactly these layers with
    exactly these placements again.

    Tried in order, the first that passes wins:

    1. the resolved config as PEFT itself would write it (default targets for the model type,
       ``all-linear`` expanded to full names): suffix lists like ``["k_proj", "v_proj",
       "down_proj"]`` / ``["down_proj"]`` or the user's regexes stay as they are;
    2. both lists as the full names of the layers targeted / feedforward (what PEFT writes for
       ``all-linear``, but with the feedforward list in the same form, which PEFT cannot reload
       otherwise);
    3. both as regexes of the escaped full names (exact under ``re.fullmatch``).
    """
    want = ({name: t.feedforward for name, t in targets.items()}, list(modules_to_save))
    names = list(targets)
    ff_names = [n for n, t in targets.items() if t.feedforward]

    resolved = config.copy()
    full = config.copy()
    full.target_modules, full.feedforward_modules = set(names), set(ff_names)
    regex = config.copy()
    regex.target_modules = _alternation(names)
    regex.feedforward_modules = _alternation(ff_names) if ff_names else set()

    chosen = regex
    for candidate in (resolved, full):
        if peft_can_reload(candidate) and reselect(candidate) == want:
            chosen = candidate
            break
    fan_in_fan_out = chosen.fan_in_fan_out
    for t in targets.values():  # PEFT saves the value of the last layer it wrapped
        if t.kind == "linear":
            fan_in_fan_out = False
        elif t.kind == "conv1d":
            fan_in_fan_out = True
    chosen.fan_in_fan_out = fan_in_fan_out
    return chosen


# --- reading -----------------------------------------------------------------------------------
def _check_tensors(tensors: Any, path: str) -> dict[str, torch.Tensor]:
    if not isinstance(tensors, Mapping):
        raise AdapterLoadError(f"{path} holds a {type(tensors).__name__}, not a mapping of names to tensors")
    bad = [k for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise AdapterLoadError(f"{path}: entries that are not tensors under string names: {bad[:5]}")
    return dict(tensors)


def read_adapter_files(directory: str | os.PathLike) -> tuple[IA3Config, dict[str, torch.Tensor]]:
    """Read a PEFT IA3 adapter directory (safetensors preferred, ``.bin`` as weights only).

    Every problem is an :class:`~ia3fx.AdapterLoadError` naming the file: not a directory, no
    ``adapter_config.json`` (with a hint when adapters sit in subdirectories), another PEFT type,
    an invalid config, no weights file, an unreadable one, or a pickle that is not plain tensors.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        what = "a file" if os.path.isfile(directory) else "missing"
        raise AdapterLoadError(f"{directory} is not an adapter directory ({what})")
    view = settled_view(directory)  # a save killed midway is finished first: one complete version
    config = _read_config(directory, view)
    st = adapter_file(directory, WEIGHTS_NAME, view)
    binary = adapter_file(directory, BIN_WEIGHTS_NAME, view)
    if st is not None and os.path.isfile(st):
        try:
            tensors = load_file(st)
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
            raise AdapterLoadError(f"{st} is not a readable safetensors file: {e}") from e
        return config, _check_tensors(tensors, st)
    if binary is not None and os.path.isfile(binary):
        try:
            tensors = torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - UnpicklingError, EOFError, RuntimeError, ...
            raise AdapterLoadError(
                f"{binary} could not be read as plain tensors (torch.load with weights_only=True; "
                f"no other pickle is loaded): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ) from e
        return config, _check_tensors(tensors, binary)
    raise AdapterLoadError(f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME} or {BIN_WEIGHTS_NAME}")
