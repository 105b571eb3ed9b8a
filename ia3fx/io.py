"""PEFT-format adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``.

Layout as PEFT's ``save_pretrained``: the adapter named ``default`` goes into the directory itself,
any other into ``<directory>/<adapter name>/``. Tensors are keyed
``base_model.model.<module>.ia3_l`` (and ``base_model.model.<module>.<param>`` for
``modules_to_save``), shaped as PEFT stores them.

Writes are atomic per adapter: every file goes to a temporary name in the target directory first;
only when all are written are they renamed into place, and if a rename fails the files already
replaced are put back. A failure or an interrupt (``KeyboardInterrupt``) therefore leaves the
previous files as they were, and no temporary file behind.

Reading accepts ``adapter_model.safetensors`` or, failing that, ``adapter_model.bin`` through
``torch.load(weights_only=True)``: no other pickle is ever loaded.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from .config import CONFIG_NAME, IA3Config
from .errors import AdapterLoadError

if TYPE_CHECKING:
    from .targeting import Target

__all__ = [
    "WEIGHTS_NAME",
    "BIN_WEIGHTS_NAME",
    "adapter_directory",
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
def _temp_path(directory: str, name: str, create: bool = True) -> str:
    """A fresh hidden name next to the final file. Created with mode 0o666 minus the umask (as
    ``open`` would), not ``mkstemp``'s 0o600, so the renamed file gets the usual permissions."""
    for _ in range(100):
        path = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
        if not create:
            if not os.path.lexists(path):
                return path
            continue
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return path
    raise FileExistsError(f"no free temporary name for {name} in {directory}")


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _remove(path: str | None) -> None:
    if path and os.path.lexists(path):
        os.remove(path)


def _backup(final: str, directory: str) -> str | None:
    """A second name for the current ``final`` (a hard link, or a copy where links fail)."""
    if not os.path.exists(final):
        return None
    backup = _temp_path(directory, os.path.basename(final) + ".bak", create=False)
    try:
        os.link(final, backup)
    except OSError:
        shutil.copy2(final, backup)
    return backup


def move_into_place(staged: str, final: str) -> None:
    """Rename ``staged`` (a file or a directory) to ``final``. An existing ``final`` is set aside
    under a fresh name first and removed only once the rename succeeded; if it fails, it is put
    back. Shared by the exporters and the offline merge, which write whole directories."""
    old = None
    if os.path.lexists(final):
        old = _temp_path(os.path.dirname(final) or ".", os.path.basename(final) + ".old", create=False)
        os.rename(final, old)
    try:
        os.rename(staged, final)
    except BaseException:
        if old is not None:
            os.rename(old, final)
        raise
    if old is not None:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.remove(old)


def _commit(staged: list[tuple[str, str]], directory: str) -> None:
    """Rename every staged file into place; on any failure put the previous files back."""
    backups: list[tuple[str, str | None]] = []
    done: list[int] = []
    try:
        for _, final in staged:
            backups.append((final, _backup(final, directory)))
        for i, (tmp, final) in enumerate(staged):
            os.replace(tmp, final)
            done.append(i)
    except BaseException:
        for i in reversed(done):
            final, backup = backups[i]
            if backup is not None:
                os.replace(backup, final)
            else:
                _remove(final)
        raise
    finally:
        for _, backup in backups:
            _remove(backup)
        for tmp, _ in staged:
            _remove(tmp)


def save_adapter_files(
    directory: str | os.PathLike,
    config: IA3Config,
    state_dict: Mapping[str, torch.Tensor],
    extra_weights: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> None:
    """Write config and tensors into ``directory`` (created if needed), atomically as a set.

    ``extra_weights`` maps more safetensors file names to their tensors, written in the same set
    (the copy of the adapter that transformers' Trainer reads back when resuming).
    """
    directory = os.fspath(directory)
    if os.path.isfile(directory):
        raise ValueError(f"Provided path ({directory}) should be a directory, not a file")
    os.makedirs(directory, exist_ok=True)
    files = {WEIGHTS_NAME: state_dict, **(extra_weights or {})}
    text = config.to_json_string()
    staged: list[tuple[str, str]] = []
    try:
        for name, tensors in files.items():
            tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
            tmp = _temp_path(directory, name)
            final = os.path.join(directory, name)
            staged.append((tmp, final))
            mode = os.stat(final if os.path.exists(final) else tmp).st_mode & 0o777
            save_file(tensors, tmp, metadata={"format": "pt"})
            os.chmod(tmp, mode)  # safetensors writes 0o600; keep the file's mode, or the usual one
            _fsync(tmp)
        tmp = _temp_path(directory, CONFIG_NAME)
        final = os.path.join(directory, CONFIG_NAME)
        staged.append((tmp, final))
        if os.path.exists(final):
            os.chmod(tmp, os.stat(final).st_mode & 0o777)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        for tmp, _ in staged:
            _remove(tmp)
        raise
    _commit(staged, directory)


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
def _adapters_below(directory: str) -> list[str]:
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        return []
    return [e for e in entries if os.path.isfile(os.path.join(directory, e, CONFIG_NAME))]


def _read_config(directory: str) -> IA3Config:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
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
    config = _read_config(directory)
    st = os.path.join(directory, WEIGHTS_NAME)
    binary = os.path.join(directory, BIN_WEIGHTS_NAME)
    if os.path.isfile(st):
        try:
            tensors = load_file(st)
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
            raise AdapterLoadError(f"{st} is not a readable safetensors file: {e}") from e
        return config, _check_tensors(tensors, st)
    if os.path.isfile(binary):
        try:
            tensors = torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - UnpicklingError, EOFError, RuntimeError, ...
            raise AdapterLoadError(
                f"{binary} could not be read as plain tensors (torch.load with weights_only=True; "
                f"no other pickle is loaded): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ) from e
        return config, _check_tensors(tensors, binary)
    raise AdapterLoadError(f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME} or {BIN_WEIGHTS_NAME}")
