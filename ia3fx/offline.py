"""Merge a PEFT (IA)³ adapter into a transformers checkpoint on disk, without loading the model.

``merge_checkpoint(base_dir, adapter_dir, out_dir)`` writes ``out_dir``: the base directory with
every adapted weight (and attention-type bias) folded with its vector, and every
``modules_to_save`` tensor of the adapter in place of the base one. Shards keep their names, their
index and their headers byte for byte (merged tensors keep shape and dtype), so the output loads
exactly like the input.

How it stays cheap:

* The layer kinds (``nn.Linear``, transformers ``Conv1D``, ``nn.Conv2d``/``Conv3d`` and their
  groups) and PEFT's target/feedforward matching come from the model built on the **meta** device
  from ``config.json``: no weights are allocated.
* safetensors headers are parsed here (8-byte length + JSON) and the files are streamed: tensors the
  adapter does not touch are copied as raw byte ranges (``os.copy_file_range``, or ``pread`` +
  ``write`` through a small buffer where the kernel cannot), adapted weights are read, folded (on
  one thread) and written a few MB of rows at a time. Peak memory is a few tens of MB above the
  interpreter, whatever the checkpoint size.
* The fold is :func:`ia3fx.scaling.fold_weight` / :func:`~ia3fx.scaling.fold_bias`, the arithmetic of
  the in-memory merge and of PEFT, so the output is bit-identical to ``merge_and_unload()``.

Everything is written into a temporary sibling of ``out_dir`` (``.<out>.ia3fx-<host>-<pid>-<token>.partial``)
that is renamed into place at the end: a failure or Ctrl-C leaves no partial output, and with
``force=True`` the previous output survives until the new one is complete, then the two swap in one
step (``renameat2(RENAME_EXCHANGE)``, :func:`ia3fx.atomic_files.move_into_place`), so even a kill leaves one
complete output under ``out_dir``. Where the exchange is unsupported, a kill between the fallback's
two renames is put right by the next merge to the same place, which also removes what killed
merges left there (see :mod:`ia3fx.atomic_files`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .atomic_files import move_into_place, recover_place, settled_view, staging_directory
from .config import CONFIG_NAME, IA3Config
from .errors import IA3Error
from .scaling import fold_bias, fold_weight, weight_scale
from .sites import CONV_KINDS

__all__ = [
    "CheckpointError",
    "MergeReport",
    "SafetensorsHeader",
    "TensorInfo",
    "merge_checkpoint",
    "read_safetensors_header",
]

PEFT_PREFIX = "base_model.model."
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"

# Weights of other formats that would sit unmerged beside the merged safetensors: not copied.
_STALE_WEIGHT_PREFIXES = ("pytorch_model", "tf_model", "flax_model")
_STALE_WEIGHT_SUFFIXES = (".bin", ".bin.index.json", ".h5", ".msgpack", ".msgpack.index.json")

MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit
FOLD_CHUNK_BYTES = 4 << 20  # rows of an adapted weight read, folded and written at a time
COPY_CHUNK_BYTES = 64 << 20  # one copy_file_range call (progress granularity)
BUFFER_BYTES = 8 << 20  # read/write buffer where copy_file_range is not available
USE_COPY_FILE_RANGE = hasattr(os, "copy_file_range")  # in-kernel copies (Linux); tests turn it off

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_ITEMSIZE = {k: torch.empty((), dtype=v).element_size() for k, v in _DTYPES.items()}
_FLOATS = ("F64", "F32", "F16", "BF16")

_TASK_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "FEATURE_EXTRACTION": "AutoModel",
}


class CheckpointError(IA3Error, ValueError):
    """A checkpoint, an adapter, or the pair of them cannot be merged; nothing was written."""


# --- safetensors headers -----------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file; ``begin``/``end`` are absolute offsets in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class SafetensorsHeader:
    path: str
    data_start: int  # 8 + header length
    file_size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None


def read_safetensors_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and validate a safetensors header without reading any tensor data."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, not even the 8-byte header length)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} bytes is implausible)")
        if 8 + n > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file (the header needs {8 + n} bytes, the file has {size})"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    data_start = 8 + n
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: __metadata__ must be a JSON object")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
            if not isinstance(dtype, str) or any(d < 0 for d in shape):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{path}: bad header entry for tensor {name!r} (needs dtype, shape, data_offsets): {entry!r}"
            ) from None
        if not 0 <= begin <= end:
            raise CheckpointError(f"{path}: tensor {name!r} has data_offsets [{begin}, {end}]")
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} ends at byte {data_start + end}, past the end of the file "
                f"({size} bytes): the file is truncated or its header is wrong"
            )
        info = TensorInfo(name, dtype, shape, data_start + begin, data_start + end)
        if dtype in _ITEMSIZE and info.numel * _ITEMSIZE[dtype] != info.nbytes:
            raise CheckpointError(
                f"{path}: tensor {name!r} ({dtype}, shape {list(shape)}) needs "
                f"{info.numel * _ITEMSIZE[dtype]} bytes, its data_offsets span {info.nbytes}"
            )
        tensors[name] = info
    last_end, last_name = data_start, None
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin < last_end:
            raise CheckpointError(f"{path}: tensors {last_name!r} and {info.name!r} overlap")
        last_end, last_name = info.end, info.name
    return SafetensorsHeader(path, data_start, size, tensors, metadata)


# --- report ------------------------------------------------------------------------------------
@dataclass
class MergeReport:
    """What :func:`merge_checkpoint` did."""

    out_dir: str
    tensors_merged: int = 0  # weights and biases folded with a vector
    tensors_replaced: int = 0  # taken from the adapter (modules_to_save copies, saved base layers)
    tensors_copied: int = 0  # everything else, byte for byte
    files_written: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    layers: int = 0  # adapted layers
    skipped_files: list[str] = field(default_factory=list)
    nonfinite_vectors: list[str] = field(default_factory=list)  # adapter keys of vectors with NaN/inf (warned)

    def summary(self) -> str:
        mb = self.bytes_written / 2**20
        rate = mb / self.seconds if self.seconds > 0 else float("inf")
        text = (
            f"merged {self.layers} layers ({self.tensors_merged} tensors folded, "
            f"{self.tensors_replaced} replaced by the adapter's copies, {self.tensors_copied} copied) "
            f"into {self.out_dir}: {self.files_written} files, {mb:,.1f} MiB in {self.seconds:.2f} s "
            f"({rate:,.0f} MiB/s)"
        )
        if self.skipped_files:
            text += f"; not copied: {', '.join(self.skipped_files)}"
        if self.nonfinite_vectors:
            text += (
                f"; WARNING: {len(self.nonfinite_vectors)} vector(s) hold NaN/inf (first "
                f"{self.nonfinite_vectors[0]}), so do the weights they scale"
            )
        return text


# --- plan ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Replace:
    adapter_key: str
    source: TensorInfo | None  # in the adapter's safetensors file
    tensor: torch.Tensor | None  # from an adapter_model.bin


@dataclass(frozen=True)
class _Fold:
    vector: torch.Tensor  # flattened, in the dtype PEFT's parameter has
    kind: str
    feedforward: bool
    groups: int
    is_bias: bool
    weight_dtype: torch.dtype
    replaced: _Replace | None = None  # fold the adapter's copy of the tensor instead of the base's


@dataclass
class _Adapter:
    config: IA3Config
    keys: list[str]
    header: SafetensorsHeader | None
    tensors: dict[str, torch.Tensor] | None  # .bin adapters only

    def load(self, key: str) -> torch.Tensor:
        if self.tensors is not None:
            return self.tensors[key]
        assert self.header is not None
        return _read_tensor(self.header.path, self.header.tensors[key])


def _read_adapter(adapter_dir: str) -> _Adapter:
    if not os.path.isdir(adapter_dir):
        raise CheckpointError(f"adapter {adapter_dir} is not a directory")
    from .io import _read_config, adapter_file

    view = settled_view(adapter_dir)  # an ia3fx save killed midway is finished first (io's docstring)
    config_path = adapter_file(adapter_dir, CONFIG_NAME, view)
    if config_path is None or not os.path.isfile(config_path):
        raise CheckpointError(f"{adapter_dir} is not a PEFT adapter directory: it has no {CONFIG_NAME}")
    config = _read_config(adapter_dir, view)  # refuses a config without peft_type, or of another type
    st = adapter_file(adapter_dir, ADAPTER_WEIGHTS, view)
    if st is not None and os.path.isfile(st):
        header = read_safetensors_header(st)
        return _Adapter(config, list(header.tensors), header, None)
    binary = adapter_file(adapter_dir, ADAPTER_BIN, view)
    if binary is not None and os.path.isfile(binary):
        from .io import read_adapter_files

        _, tensors = read_adapter_files(adapter_dir)
        return _Adapter(config, list(tensors), None, tensors)
    raise CheckpointError(f"{adapter_dir} has no {ADAPTER_WEIGHTS} (or {ADAPTER_BIN})")


def _weight_files(base_dir: str) -> tuple[list[str], str | None, dict[str, str]]:
    """Names of the base's safetensors files, its index file (or ``None``) and the index's map."""
    if not os.path.isdir(base_dir):
        raise CheckpointError(f"base {base_dir} is not a directory")
    single = os.path.isfile(os.path.join(base_dir, SINGLE_FILE))
    index = os.path.join(base_dir, INDEX_FILE)
    if single and os.path.isfile(index):
        raise CheckpointError(
            f"{base_dir} has both {SINGLE_FILE} and {INDEX_FILE}; keep one of them so that it is clear which weights to merge"
        )
    if single:
        return [SINGLE_FILE], None, {}
    if not os.path.isfile(index):
        others = sorted(f for f in os.listdir(base_dir) if f.endswith((".bin", ".safetensors")))
        hint = f" (found {', '.join(others)}; only safetensors checkpoints are supported)" if others else ""
        raise CheckpointError(f"{base_dir} has no {SINGLE_FILE} or {INDEX_FILE}{hint}")
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index} is not a valid safetensors index (needs a weight_map): {e}") from e
    for shard in shards:
        if os.path.basename(shard) != shard or not os.path.isfile(os.path.join(base_dir, shard)):
            raise CheckpointError(f"{index} names shard {shard!r}, which is not a file in {base_dir}")
    return shards, INDEX_FILE, weight_map


def _meta_model(base_dir: str, task_type: str | None) -> nn.Module:
    """The base model's architecture on the meta device: module types and shapes, no weights."""
    if not os.path.isfile(os.path.join(base_dir, "config.json")):
        raise CheckpointError(f"{base_dir} has no config.json: it is not a transformers model directory")
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # config remarks are for whoever runs the model, not here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _build_on_meta(transformers, base_dir, task_type)
    finally:
        transformers.logging.set_verbosity(verbosity)


def _build_on_meta(transformers: Any, base_dir: str, task_type: str | None) -> nn.Module:
    try:
        hf_config = transformers.AutoConfig.from_pretrained(base_dir)
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"cannot read {os.path.join(base_dir, 'config.json')}: {str(e).splitlines()[0]}") from e
    arch = (getattr(hf_config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with torch.device("meta"):
        if cls is not None:
            return cls(hf_config)
        auto = getattr(transformers, _TASK_AUTO_CLASSES.get(task_type or "", "AutoModel"))
        try:
            return auto.from_config(hf_config)
        except ValueError as e:
            raise CheckpointError(
                f"cannot build the architecture {arch or hf_config.model_type!r} of {base_dir} "
                f"from transformers: {str(e).splitlines()[0]}"
            ) from e


def _vector_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype PEFT's vector parameter has on such a weight (``autocast_adapter_dtype=True``)."""
    return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype


def _plan(
    base_dir: str, adapter: _Adapter, tensors: dict[str, TensorInfo], safe: bool = False
) -> tuple[dict[str, _Fold | _Replace], int, list[str]]:
    """``{base tensor name: what to write instead of its bytes}``, the number of adapted layers, and
    the keys of the vectors holding NaN or inf (with ``safe``, the first is a :class:`CheckpointError`).

    Like PEFT's loader, every adapter tensor that is not a vector replaces the base tensor of the
    same name (``modules_to_save`` copies; base layers PEFT saves with ``save_embedding_layers``,
    whose ``.base_layer.`` segment is dropped); vectors then fold into the (replaced) weights.
    """
    from .targeting import select_targets

    model = _meta_model(base_dir, adapter.config.task_type)
    selection = select_targets(adapter.config, [], model=model)
    prefix = getattr(model, "base_model_prefix", "") or ""

    def base_key(name: str) -> str | None:
        candidates = [name]
        if prefix and name.startswith(prefix + "."):
            candidates.append(name[len(prefix) + 1 :])
        elif prefix:
            candidates.append(f"{prefix}.{name}")
        return next((c for c in candidates if c in tensors), None)

    def need(name: str, adapter_key: str, what: str) -> str:
        key = base_key(name)
        if key is None:
            tied = " (tied weights are not stored, and a tied weight cannot be merged on its own)"
            raise CheckpointError(
                f"adapter tensor {adapter_key!r} needs {what} {name!r}, which is not in the base checkpoint "
                f"{base_dir}" + (tied if name.endswith(".weight") else "")
            )
        return key

    vectors: list[tuple[str, str]] = []
    replace: dict[str, _Replace] = {}
    for key in adapter.keys:
        if not key.startswith(PEFT_PREFIX):
            raise CheckpointError(
                f"adapter tensor {key!r} does not start with {PEFT_PREFIX!r}, as PEFT's adapter files do; "
                "PEFT itself would load no vector from this file"
            )
        rest = key[len(PEFT_PREFIX) :]
        layer = next((rest[: -len(s)] for s in (".ia3_l", ".ia3_l.default") if rest.endswith(s)), None)
        if layer is not None:
            vectors.append((key, layer))
            continue
        name = rest.replace(".base_layer.", ".")
        owned = any(name.startswith(m + ".") for m in selection.modules_to_save)
        if not owned and ".base_layer." not in rest and base_key(name) is None:
            raise CheckpointError(
                f"adapter tensor {key!r} is neither an (IA)³ vector nor a tensor of the base checkpoint "
                f"(modules_to_save: {selection.modules_to_save or 'none'})"
            )
        bkey = need(name, key, "tensor")
        binfo = tensors[bkey]
        shape = adapter.header.tensors[key].shape if adapter.header else tuple(adapter.tensors[key].shape)
        if shape != binfo.shape:
            raise CheckpointError(
                f"adapter tensor {key!r} has shape {list(shape)}, base tensor {bkey!r} has {list(binfo.shape)}"
            )
        if adapter.header is not None:
            replace[bkey] = _Replace(key, adapter.header.tensors[key], None)
        else:
            replace[bkey] = _Replace(key, None, adapter.tensors[key])

    ops: dict[str, _Fold | _Replace] = dict(replace)
    seen: set[str] = set()
    nonfinite: list[str] = []
    for key, layer in vectors:
        target = selection.targets.get(layer)
        if target is None:
            raise CheckpointError(
                f"adapter tensor {key!r}: {layer!r} is not a layer that this adapter's config targets in "
                f"{type(model).__name__} (was the adapter trained on another architecture?)"
            )
        seen.add(layer)
        module = model.get_submodule(layer)
        wkey = need(f"{layer}.weight", key, "weight")
        winfo = tensors[wkey]
        if winfo.shape != tuple(module.weight.shape):
            raise CheckpointError(
                f"base tensor {wkey!r} has shape {list(winfo.shape)}, but config.json builds "
                f"{list(module.weight.shape)}: checkpoint and config do not match"
            )
        vector = adapter.load(key)
        if not bool(torch.isfinite(vector).all()):  # a vector is small: checked whole, as it is read
            if safe:
                raise CheckpointError(
                    f"adapter tensor {key!r} holds NaN or infinite values: refused (safe=True, ia3fx merge "
                    "--safe, as PEFT's safe_merge); nothing was written"
                )
            nonfinite.append(key)
        if tuple(vector.shape) != target.peft_shape:
            raise CheckpointError(
                f"adapter tensor {key!r} has shape {list(vector.shape)}, the layer needs {list(target.peft_shape)}"
            )
        if winfo.dtype not in _FLOATS:
            raise CheckpointError(
                f"base tensor {wkey!r} is {winfo.dtype}: only floating-point weights can be merged (quantized checkpoints cannot)"
            )
        wdtype = _DTYPES[winfo.dtype]
        v = vector.reshape(-1).to(_vector_dtype(wdtype))
        groups = int(getattr(module, "groups", 1)) if target.kind in CONV_KINDS else 1
        ops[wkey] = _Fold(v, target.kind, target.feedforward, groups, False, wdtype, replace.get(wkey))
        if not target.feedforward and getattr(module, "bias", None) is not None:
            bkey = need(f"{layer}.bias", key, "bias")
            binfo = tensors[bkey]
            if binfo.shape != (v.numel(),) or binfo.dtype not in _FLOATS:
                raise CheckpointError(
                    f"base tensor {bkey!r} ({binfo.dtype}, shape {list(binfo.shape)}) cannot take a vector of {v.numel()}"
                )
            ops[bkey] = _Fold(v, target.kind, False, groups, True, wdtype, replace.get(bkey))
    missing = sorted(set(selection.targets) - seen)
    if missing:
        warnings.warn(
            f"the adapter has no vector for {len(missing)} targeted layers ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}); they stay unchanged, as PEFT leaves them at ones",
            stacklevel=3,
        )
    if nonfinite:
        warnings.warn(
            f"{len(nonfinite)} adapter vector(s) hold NaN or infinite values (first {nonfinite[0]!r}): the merged "
            "weights they scale will be NaN/inf. Pass safe=True (ia3fx merge --safe) to refuse such an adapter",
            stacklevel=3,
        )
    return ops, len(seen), nonfinite


# --- streaming ----------------------------------------------------------------------------------
class _Progress:
    def __init__(self, total: int, progress: bool | Callable[[int, int], None] | None) -> None:
        self.total, self.done = total, 0
        self.callback = progress if callable(progress) else None
        self.bar = None
        show = sys.stderr.isatty() if progress is None else progress is True
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merge", file=sys.stderr)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        if self.callback is not None:
            self.callback(self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _read_exact(fd: int, n: int, offset: int, buf: bytearray | memoryview | None = None) -> bytearray | memoryview:
    out = bytearray(n) if buf is None else buf
    view = memoryview(out)[:n]
    got = 0
    while got < n:
        k = os.preadv(fd, [view[got:]], offset + got)
        if k == 0:
            raise CheckpointError(f"unexpected end of file at byte {offset + got} (was the file changed while merging?)")
        got += k
    return out


def _write_all(dst, data) -> int:
    view = memoryview(data).cast("B")
    n = 0
    while n < len(view):
        n += dst.write(view[n:])
    return n


def _read_tensor(path: str, info: TensorInfo) -> torch.Tensor:
    dtype = _DTYPES.get(info.dtype)
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {info.name!r} has unsupported dtype {info.dtype}")
    if info.numel == 0:
        return torch.empty(info.shape, dtype=dtype)
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = _read_exact(fd, info.nbytes, info.begin)
    finally:
        os.close(fd)
    return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


class _Copier:
    """Copies byte ranges between files: in the kernel where possible, else through one buffer."""

    def __init__(self, progress: _Progress) -> None:
        self.progress = progress
        self.kernel = USE_COPY_FILE_RANGE
        self._buf: bytearray | None = None

    def copy(self, src_fd: int, dst, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(COPY_CHUNK_BYTES, end - offset)
            k = 0
            if self.kernel:
                try:
                    k = os.copy_file_range(src_fd, dst.fileno(), n, offset)
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                        raise
                    self.kernel = False
                    continue
                if k == 0:
                    raise CheckpointError(f"unexpected end of file at byte {offset} (was the file changed while merging?)")
            else:
                if self._buf is None:
                    self._buf = bytearray(BUFFER_BYTES)
                k = min(n, BUFFER_BYTES)
                _read_exact(src_fd, k, offset, self._buf)
                _write_all(dst, memoryview(self._buf)[:k])
            offset += k
            self.progress.update(k)


def _fold_tensor(src_fd: int, dst, info: TensorInfo, op: _Fold, progress: _Progress, adapter_path: str | None) -> None:
    """Read ``info`` in row blocks, fold each with ``op`` and write it; the header stays valid."""
    dtype = _DTYPES[info.dtype]
    shape = info.shape
    rows = shape[0] if shape else 1
    rest = shape[1:]
    rep = op.replaced
    src_nbytes = rep.source.nbytes if rep is not None and rep.source is not None else info.nbytes
    fd, own_fd = src_fd, False
    if rep is not None and rep.tensor is not None:  # a .bin adapter's copy, already in memory
        whole = rep.tensor.detach().to("cpu", dtype).reshape((rows,) + rest)

        def read(r0: int, r: int, buf: bytearray) -> torch.Tensor:
            return whole[r0 : r0 + r]

    else:
        src = rep.source if rep is not None else info
        if rep is not None:
            fd, own_fd = os.open(adapter_path, os.O_RDONLY), True
        src_dtype = _DTYPES[src.dtype] if src.dtype in _FLOATS else None
        if src_dtype is None:
            raise CheckpointError(f"adapter tensor {rep.adapter_key!r} is {src.dtype}, not a floating-point weight")
        row_numel = src.numel // rows
        row_bytes = src.nbytes // rows

        def read(r0: int, r: int, buf: bytearray) -> torch.Tensor:
            _read_exact(fd, r * row_bytes, src.begin + r0 * row_bytes, buf)
            t = torch.frombuffer(buf, dtype=src_dtype, count=r * row_numel).reshape((r,) + rest)
            return t if src_dtype == dtype else t.to(dtype)  # PEFT loads a copy into the base's dtype

    try:
        if op.is_bias:
            out = fold_bias(read(0, rows, bytearray(src_nbytes)), op.vector, op.kind, False, op.weight_dtype)
            if out.dtype != dtype:  # a conv bias in another dtype than its weight: keep the header's
                raise CheckpointError(f"merged bias {info.name!r} would change dtype {info.dtype}; cannot keep the header")
            _write_all(dst, _tensor_bytes(out))
            progress.update(info.nbytes)
            return
        in_row_bytes = src_nbytes // rows
        scale = weight_scale(op.kind, op.feedforward, op.vector, torch.Size(shape), op.groups)
        grouped_input = op.kind in CONV_KINDS and op.feedforward and op.groups > 1
        by_rows = scale.shape[0] != 1 and rows > 1  # the vector runs along dim 0: slice it with the rows
        block = rows if grouped_input else max(1, min(rows, FOLD_CHUNK_BYTES // max(1, in_row_bytes)))
        buf = bytearray(block * in_row_bytes)
        out_row_bytes = info.nbytes // rows
        for r0 in range(0, rows, block):
            r = min(block, rows - r0)
            w = read(r0, r, buf)
            if grouped_input:
                out = fold_weight(w, op.vector, op.kind, True, op.groups)
            else:
                v = op.vector[r0 : r0 + r] if by_rows else op.vector
                out = fold_weight(w, v, op.kind, op.feedforward, 1 if op.kind in CONV_KINDS else op.groups)
            _write_all(dst, _tensor_bytes(out))
            progress.update(r * out_row_bytes)
    finally:
        if own_fd:
            os.close(fd)


def _replace_tensor(dst, info: TensorInfo, op: _Replace, adapter_path: str | None, copier: _Copier) -> None:
    dtype = _DTYPES.get(info.dtype)
    src = op.source
    if src is not None and src.dtype == info.dtype:
        fd = os.open(adapter_path, os.O_RDONLY)
        try:
            copier.copy(fd, dst, src.begin, src.nbytes)
        finally:
            os.close(fd)
        return
    if dtype is None:
        raise CheckpointError(f"cannot cast adapter tensor {op.adapter_key!r} to the base's dtype {info.dtype}")
    t = op.tensor if op.tensor is not None else _read_tensor(adapter_path, src)
    _write_all(dst, _tensor_bytes(t.detach().to("cpu", dtype)))
    copier.progress.update(info.nbytes)


def _write_shard(
    header: SafetensorsHeader,
    out_path: str,
    ops: dict[str, _Fold | _Replace],
    adapter_path: str | None,
    copier: _Copier,
    report: MergeReport,
) -> None:
    """The shard with its header and every byte outside the planned tensors copied verbatim."""
    src_fd = os.open(header.path, os.O_RDONLY)
    try:
        with open(out_path, "xb", buffering=0) as dst:
            pos = 0
            for info in sorted(header.tensors.values(), key=lambda t: t.begin):
                op = ops.get(info.name)
                if op is None or info.numel == 0:
                    report.tensors_copied += 1
                    continue  # copied with the next raw range
                copier.copy(src_fd, dst, pos, info.begin - pos)
                if isinstance(op, _Fold):
                    _fold_tensor(src_fd, dst, info, op, copier.progress, adapter_path)
                    report.tensors_merged += 1
                else:
                    _replace_tensor(dst, info, op, adapter_path, copier)
                    report.tensors_replaced += 1
                pos = info.end
            copier.copy(src_fd, dst, pos, header.file_size - pos)
            size = dst.tell()
        if size != header.file_size:
            raise CheckpointError(f"wrote {size} bytes for {header.path}, expected {header.file_size}")
    finally:
        os.close(src_fd)
    report.files_written += 1
    report.bytes_written += header.file_size


# --- directories --------------------------------------------------------------------------------
def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


MERGE_RECORD = "ia3fx_merge.json"  # marks a directory as a merge output, which --force may replace


def _check_dirs(base: str, adapter: str, out: str, force: bool) -> None:
    for role, src in (("base", base), ("adapter", adapter)):
        if _inside(out, src) or _inside(src, out):
            raise CheckpointError(
                f"the output {out} and the {role} directory {src} overlap; write the merged checkpoint elsewhere"
            )
    cwd = os.path.realpath(os.getcwd())
    if _inside(cwd, out):
        raise CheckpointError(
            f"the output directory {out} is the working directory or holds it; name a new directory for the merge"
        )
    recover_place(out)  # an earlier merge killed while replacing out: finished, its leftovers removed
    if not os.path.lexists(out):
        return
    if not force:
        raise FileExistsError(f"{out} already exists; pass --force (force=True) to replace it")
    earlier = os.path.isdir(out) and (not os.listdir(out) or os.path.isfile(os.path.join(out, MERGE_RECORD)))
    if not earlier:
        raise CheckpointError(
            f"{out} is not the output of an earlier merge (no {MERGE_RECORD}) nor an empty directory: --force "
            "replaces only those. Name a new directory, or remove this one yourself"
        )


def _write_record(tmp: str, base: str, adapter: str, report: MergeReport) -> None:
    import json

    path = os.path.join(tmp, MERGE_RECORD)
    with open(path, "w") as f:
        json.dump({"ia3fx_merge": 1, "base_dir": base, "adapter_dir": adapter, "layers": report.layers}, f, indent=1)
    report.files_written += 1
    report.bytes_written += os.path.getsize(path)


def _other_files(base_dir: str, weights: set[str]) -> tuple[list[str], list[str]]:
    """Relative paths of every other file to copy, and of stale weight files left out."""
    copy, skipped = [], []
    for root, dirs, files in os.walk(base_dir):
        if root == base_dir and ".git" in dirs:
            dirs.remove(".git")  # a git clone's history (with LFS, the weights again) is not the model
            skipped.append(".git/")
        dirs.sort()
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(root, name), base_dir)
            if rel in weights:
                continue
            if root == base_dir and name.startswith(_STALE_WEIGHT_PREFIXES) and name.endswith(_STALE_WEIGHT_SUFFIXES):
                skipped.append(rel)
                continue
            copy.append(rel)
    return copy, skipped


def _finish(tmp: str, out: str) -> None:
    """Give ``tmp`` the usual directory permissions (mkdtemp's are private), then move it to ``out``."""
    os.chmod(tmp, 0o777 & ~_umask())
    move_into_place(tmp, out)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- entry point --------------------------------------------------------------------------------
def merge_checkpoint(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    force: bool = False,
    progress: bool | Callable[[int, int], None] | None = None,
    safe: bool = False,
) -> MergeReport:
    """Write ``out_dir``: ``base_dir`` with the PEFT IA3 adapter of ``adapter_dir`` merged in.

    ``base_dir`` is a transformers model directory (``config.json`` and ``model.safetensors``, or
    shards with ``model.safetensors.index.json``); every other file in it is copied. The result is
    bit-identical to PEFT's ``merge_and_unload()`` followed by ``save_pretrained``, but the model
    is never built with weights: memory stays a few tens of MB above the interpreter.

    ``force`` replaces an existing ``out_dir`` (only once the new one is complete) if it is empty
    or an earlier merge's output (which holds ``ia3fx_merge.json``: the inputs it was made from);
    any other directory, a file, the working directory or one holding it is refused. ``progress``:
    ``None`` shows a tqdm bar on stderr when it is a terminal, ``True``/``False`` force it on/off,
    a callable gets ``(bytes_done, bytes_total)``.

    Adapter vectors holding NaN or inf are warned about (and listed in the report's
    ``nonfinite_vectors``); ``safe=True`` (PEFT's ``safe_merge``) refuses them instead, with a
    :class:`CheckpointError` naming the tensor, before anything is written.

    Raises :class:`CheckpointError` (a ``ValueError``) for inputs that cannot be merged, naming the
    file or tensor, and ``FileExistsError`` for an existing output without ``force``. Nothing is
    written to the inputs, and on any error no output appears.
    """
    t0 = time.perf_counter()
    base = os.path.realpath(os.fspath(base_dir))
    adapter_root = os.path.realpath(os.fspath(adapter_dir))
    if not os.fspath(out_dir).strip():
        raise CheckpointError("the output directory is empty (''): name a new directory for the merged checkpoint")
    out = os.path.realpath(os.fspath(out_dir))
    _check_dirs(base, adapter_root, out, force)

    shards, index, weight_map = _weight_files(base)
    headers = [read_safetensors_header(os.path.join(base, s)) for s in shards]
    tensors: dict[str, TensorInfo] = {}
    shard_of: dict[str, str] = {}
    for shard, h in zip(shards, headers, strict=True):
        for name, info in h.tensors.items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} is in two shards of {base}: {shard_of[name]} and {shard}")
            tensors[name], shard_of[name] = info, shard
    for name, shard in weight_map.items():
        if shard_of.get(name) != shard:
            raise CheckpointError(
                f"{os.path.join(base, INDEX_FILE)} maps {name!r} to {shard}, but that shard has no such tensor"
            )

    adapter = _read_adapter(adapter_root)
    ops, layers, nonfinite = _plan(base, adapter, tensors, safe)
    adapter_path = adapter.header.path if adapter.header is not None else None

    others, skipped = _other_files(base, set(shards))
    for rel in skipped:
        why = "a git repository" if rel == ".git/" else "unmerged weights in another format"
        warnings.warn(f"{rel} is not copied: it holds {why}", stacklevel=2)
    total = sum(h.file_size for h in headers) + sum(os.path.getsize(os.path.join(base, r)) for r in others)

    report = MergeReport(out_dir=out, layers=layers, skipped_files=skipped, nonfinite_vectors=nonfinite)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = staging_directory(parent, os.path.basename(out))  # private (0o700) until _finish
    bar = _Progress(total, progress)
    threads = torch.get_num_threads()
    # a fold is a memory-bound multiply on a few MB: one thread is as fast, and avoids the
    # thread-pool synchronisation that costs milliseconds per block on a busy machine
    torch.set_num_threads(1)
    try:
        copier = _Copier(bar)
        for shard, header in zip(shards, headers, strict=True):
            _write_shard(header, os.path.join(tmp, shard), ops, adapter_path, copier, report)
        for rel in others:
            src, dst = os.path.join(base, rel), os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(src, dst)
            size = os.path.getsize(dst)
            bar.update(size)
            report.files_written += 1
            report.bytes_written += size
        _write_record(tmp, base, adapter_root, report)
        _finish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
        bar.close()
    report.seconds = time.perf_counter() - t0
    return report
