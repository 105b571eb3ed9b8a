"""PEFT-format adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``.

Writes are atomic: every file goes to a temporary name in the target directory and is renamed
into place only when all of them are written, so a failure leaves the previous files intact.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping

import torch
from safetensors.torch import load_file, save_file

from .config import CONFIG_NAME, IA3Config
from .errors import AdapterLoadError

__all__ = ["WEIGHTS_NAME", "save_adapter_files", "read_adapter_files"]

WEIGHTS_NAME = "adapter_model.safetensors"
BIN_WEIGHTS_NAME = "adapter_model.bin"


def _temp_path(directory: str, name: str) -> str:
    fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    return path


def save_adapter_files(
    directory: str | os.PathLike, config: IA3Config, state_dict: Mapping[str, torch.Tensor]
) -> None:
    """Write config and tensors into ``directory`` (created if needed), atomically per file set."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    staged: list[tuple[str, str]] = []
    try:
        tmp = _temp_path(directory, WEIGHTS_NAME)
        staged.append((tmp, os.path.join(directory, WEIGHTS_NAME)))
        save_file(tensors, tmp, metadata={"format": "pt"})
        tmp = _temp_path(directory, CONFIG_NAME)
        staged.append((tmp, os.path.join(directory, CONFIG_NAME)))
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(config.to_json_string())
    except BaseException:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    for tmp, final in staged:
        os.replace(tmp, final)


def read_adapter_files(directory: str | os.PathLike) -> tuple[IA3Config, dict[str, torch.Tensor]]:
    """Read a PEFT IA3 adapter directory (safetensors preferred, ``.bin`` as weights only)."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise AdapterLoadError(f"{directory} is not a directory")
    config = IA3Config.from_pretrained(directory)
    st = os.path.join(directory, WEIGHTS_NAME)
    binary = os.path.join(directory, BIN_WEIGHTS_NAME)
    if os.path.isfile(st):
        try:
            tensors = load_file(st)
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
            raise AdapterLoadError(f"{st} is not a readable safetensors file: {e}") from e
    elif os.path.isfile(binary):
        tensors = torch.load(binary, map_location="cpu", weights_only=True)
    else:
        raise AdapterLoadError(f"no {WEIGHTS_NAME} or {BIN_WEIGHTS_NAME} in {directory}")
    return config, tensors
