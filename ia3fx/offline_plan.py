"""What the offline merge writes instead of each base tensor: the plan, from names, shapes and the config.

Which layers an adapter's config targets, and whether a vector scales a layer's input or output,
are PEFT's rules on module **names** (:mod:`ia3fx.name_rules`). A checkpoint's tensor names give
the module names (every dotted prefix of a tensor name), and a weight's shape gives the layer's
sizes, so for the usual checkpoint the plan needs neither torch nor transformers:
:func:`layers_from_names`. What names cannot tell is decided by the model built on the meta
device (:func:`ia3fx.offline_meta.layers_from_model`), and the merge switches to it whenever
:func:`layers_from_names` raises :class:`NeedsModel`: conv layers (their groups), targets given as
a regex, ``all-linear`` or left to PEFT's defaults, names the checkpoint does not hold (tied
weights, a ``base_model_prefix`` difference), architectures that need remote code or that
transformers' installed sources do not describe, and every adapter key that does not fit (so that
refusals read the same whichever way the plan was made).

Linear layers and transformers ``Conv1D`` layers both have 2-D weights, ``(out, in)`` and
``(in, out)``: the Conv1D layers of an architecture are those of :data:`CONV1D_LAYERS`, and any
other architecture whose modeling source (found without importing transformers) mentions
``Conv1D`` is planned with the model.

The plan does not import numpy either: every check, the vectors' NaN/inf included
(:func:`has_nonfinite`, on their bytes), is made before anything is written, and the vectors'
values are only converted (:func:`load_vectors`, numpy) once the kernel is already copying the
untouched bytes, so that numpy's import (a fifth of a second) overlaps with the copy.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import TASK_MODULES_TO_SAVE, IA3Config
from .name_rules import _excluded, _feedforward, _guarded, _matches, _modules_to_save
from .offline_format import FLOATS, CheckpointError, SafetensorsHeader, TensorInfo, read_exact

if TYPE_CHECKING:
    import numpy as np

__all__ = ["CONV1D_LAYERS", "LayerSpec", "Layers", "NeedsModel", "has_nonfinite", "layers_from_names", "load_vectors",
           "plan"]

PEFT_PREFIX = "base_model.model."

# model_type -> names (last component) of its transformers Conv1D layers; tests check these
# against the modules transformers builds
CONV1D_LAYERS: dict[str, frozenset[str]] = {
    "gpt2": frozenset({"c_attn", "q_attn", "c_proj", "c_fc"}),
    "imagegpt": frozenset({"c_attn", "q_attn", "c_proj", "c_fc"}),
    "decision_transformer": frozenset({"c_attn", "q_attn", "c_proj", "c_fc"}),
}
_USES_CONV1D = re.compile(rb"(?<![A-Za-z0-9_])Conv1D\b")


class NeedsModel(Exception):
    """The names and shapes do not settle the plan: build the model on the meta device instead."""


@dataclass(frozen=True)
class LayerSpec:
    """A targeted layer as the plan needs it."""

    kind: str  # linear, conv1d (weight (in, out)), conv2d, conv3d
    feedforward: bool
    groups: int
    weight_shape: tuple[int, ...]  # the shape the architecture gives the weight
    has_bias: bool
    peft_shape: tuple[int, ...]  # the vector's shape in PEFT's files


@dataclass
class Layers:
    """What a config selects in an architecture, however it was found out."""

    targets: dict[str, LayerSpec]
    modules_to_save: list[str]
    prefix: str  # base_model_prefix ("" when the plan came from names: exact names only)
    architecture: str
    from_names: bool


def peft_shape(kind: str, feedforward: bool, size: int) -> tuple[int, ...]:
    spatial = {"conv2d": 2, "conv3d": 3}.get(kind)
    if spatial:
        return (1, size) + (1,) * spatial
    return (1, size) if feedforward else (size, 1)


# --- the adapter ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Replace:
    """A base tensor taken from the adapter (``modules_to_save`` copies, base layers PEFT saves)."""

    adapter_key: str
    source: TensorInfo | None  # in the adapter's safetensors file
    tensor: Any = None  # a torch tensor of an adapter_model.bin


@dataclass(frozen=True)
class Fold:
    """A base tensor scaled by a vector (a weight, or the bias of an attention-type layer)."""

    vector_key: str  # the adapter's vector; its values: load_vectors
    vector_dtype: str  # fp32 on fp16/bf16 weights, else the weight's dtype (PEFT's parameter)
    kind: str
    feedforward: bool
    groups: int
    is_bias: bool
    weight_dtype: str
    replaced: Replace | None = None  # fold the adapter's copy of the tensor instead of the base's


@dataclass
class Adapter:
    config: IA3Config
    keys: list[str]
    header: SafetensorsHeader | None
    tensors: dict[str, Any] | None  # torch tensors of an adapter_model.bin

    def shape(self, key: str) -> tuple[int, ...]:
        return self.header.tensors[key].shape if self.header is not None else tuple(self.tensors[key].shape)

    def raw(self, key: str) -> tuple[bytes | bytearray, str]:
        """A floating-point tensor's bytes (little-endian) and its safetensors dtype name; no numpy."""
        if self.tensors is not None:
            return torch_bytes(self.tensors[key], key)
        info = self.header.tensors[key]
        if info.dtype not in FLOATS:
            raise CheckpointError(f"adapter tensor {key!r} is {info.dtype}: (IA)³ vectors are floating-point")
        fd = os.open(self.header.path, os.O_RDONLY)
        try:
            return read_exact(fd, info.nbytes, info.begin), info.dtype
        finally:
            os.close(fd)

    def values(self, key: str) -> tuple[np.ndarray, str]:
        """A tensor's exact values (bf16 widened to fp32) and its safetensors dtype name (imports numpy)."""
        from .offline_fold import decode

        raw, dtype = self.raw(key)
        return decode(raw, dtype, self.shape(key)), dtype

    def load(self, key: str) -> np.ndarray:
        """A tensor's exact values (bf16 widened to fp32)."""
        return self.values(key)[0]


def torch_bytes(t: Any, key: str) -> tuple[bytes, str]:
    """A torch tensor's (of an ``adapter_model.bin``) bytes and dtype name, as :meth:`Adapter.raw` gives a file's."""
    import torch

    names = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    if t.dtype not in names:
        raise CheckpointError(f"adapter tensor {key!r} is {t.dtype}, not a floating-point tensor")
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), names[t.dtype]


def torch_values(t: Any, key: str) -> tuple[np.ndarray, str]:
    """A torch tensor (of an ``adapter_model.bin``) as :meth:`Adapter.values` gives a file's."""
    from .offline_fold import decode

    raw, name = torch_bytes(t, key)
    return decode(raw, name, tuple(t.shape)), name


def _all_set(mask: int) -> bytes:
    """A ``bytes.translate`` table: 1 for the bytes whose ``mask`` bits are all set, else 0."""
    return bytes(int(b & mask == mask) for b in range(256))


# size, then translate tables for the top byte and the byte below it (little-endian), marking where a
# float's exponent bits are all ones: a value is inf or NaN exactly when they are in both (F16's
# exponent fits in its top byte)
_EXPONENT_BITS = {"F64": (8, _all_set(0x7F), _all_set(0xF0)), "F32": (4, _all_set(0x7F), _all_set(0x80)),
                  "F16": (2, _all_set(0x7C), None), "BF16": (2, _all_set(0x7F), _all_set(0x80))}


def has_nonfinite(raw: bytes | bytearray, dtype: str) -> bool:
    """Whether the ``dtype`` values in ``raw`` hold an inf or NaN, from their exponent bits.

    Byte slices and ``translate`` run in C, so the plan checks every vector without importing
    numpy (its import is left to overlap with the copying: see the module's docstring).
    """
    size, top, below = _EXPONENT_BITS[dtype]
    hit = bytes(raw[size - 1 :: size]).translate(top)
    if below is None:
        return b"\x01" in hit
    low = bytes(raw[size - 2 :: size]).translate(below)
    return int.from_bytes(hit, "little") & int.from_bytes(low, "little") != 0


def vector_dtype(weight_dtype: str) -> str:
    """The dtype PEFT's vector parameter has on such a weight (``autocast_adapter_dtype=True``)."""
    return "F32" if weight_dtype in ("F16", "BF16") else weight_dtype


# --- layers from names ------------------------------------------------------------------------------
def _model_types(config: Any) -> list[str]:
    """Every ``model_type`` in a ``config.json`` (composite models nest their parts' configs)."""
    found: list[str] = []
    if isinstance(config, dict):
        if isinstance(config.get("model_type"), str):
            found.append(config["model_type"])
        for value in config.values():
            found += _model_types(value)
    return found


def _conv1d_names(model_type: str) -> frozenset[str]:
    """Names of the architecture's Conv1D layers; :class:`NeedsModel` where its source cannot tell."""
    spec = importlib.util.find_spec("transformers")  # the installed package's location: nothing imported
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    folder = next((os.path.join(r, "models", model_type.replace("-", "_")) for r in roots
                   if os.path.isdir(os.path.join(r, "models", model_type.replace("-", "_")))), None)
    if folder is None:
        raise NeedsModel(f"transformers has no sources for model_type {model_type!r}")
    if model_type in CONV1D_LAYERS:
        return CONV1D_LAYERS[model_type]
    for name in os.listdir(folder):
        if name.startswith("modeling_") and name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as f:
                if _USES_CONV1D.search(f.read()):
                    raise NeedsModel(f"{model_type} has Conv1D layers that CONV1D_LAYERS does not list")
    return frozenset()


def _module_names(tensors: dict[str, TensorInfo]) -> list[str]:
    """Every module that holds a tensor, parents before children (the order of ``named_modules``)."""
    names: dict[str, None] = {}
    for tensor in tensors:
        parts = tensor.split(".")[:-1]
        for i in range(1, len(parts) + 1):
            names.setdefault(".".join(parts[:i]))
    return list(names)


def layers_from_names(base_dir: str, config: IA3Config, tensors: dict[str, TensorInfo]) -> Layers:
    """:class:`Layers` from the checkpoint's tensor names and ``config.json``; :class:`NeedsModel`
    wherever that could differ from what the model built on the meta device gives."""
    path = os.path.join(base_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{base_dir} has no config.json: it is not a transformers model directory")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NeedsModel(f"config.json is not plain JSON: {e}") from e
    if not isinstance(hf, dict) or "auto_map" in hf or not _model_types(hf):
        raise NeedsModel("custom code or no model_type")
    conv1d = frozenset().union(*(_conv1d_names(t) for t in _model_types(hf)))
    tm, ff, exclude = config.target_modules, config.feedforward_modules, config.exclude_modules
    if not isinstance(tm, (set, list)) or not tm or ff is None:
        raise NeedsModel("targets as a regex, all-linear or PEFT's defaults")
    saving = list(config.modules_to_save or [])
    saving += [m for m in TASK_MODULES_TO_SAVE.get(config.task_type or "", []) if m not in saving]
    names = _module_names(tensors)
    targets: dict[str, LayerSpec] = {}
    n_excluded = 0
    for name in names:
        if _excluded(name, exclude):
            n_excluded += 1
            continue
        if _guarded(name, saving) or not _matches(name, tm):
            continue
        weight = tensors.get(f"{name}.weight")
        if weight is None or len(weight.shape) != 2:
            raise NeedsModel(f"target {name} is not a layer with a 2-D weight")
        kind = "conv1d" if name.rsplit(".", 1)[-1] in conv1d else "linear"
        feedforward = _feedforward(name, ff)
        n_in, n_out = weight.shape if kind == "conv1d" else weight.shape[::-1]
        size = n_in if feedforward else n_out
        targets[name] = LayerSpec(kind, feedforward, 1, weight.shape, f"{name}.bias" in tensors,
                                  peft_shape(kind, feedforward, size))
    saved = _modules_to_save(names, saving)
    unmatched = (
        not targets
        or (exclude and not n_excluded)
        or any(t == m or t.startswith(m + ".") for t in targets for m in saved)
        or any(not any(_matches(n, [e]) for n in names) for e in tm)
        or (isinstance(ff, str) and not any(re.fullmatch(ff, t) for t in targets))
        or (not isinstance(ff, str) and any(not any(t.endswith(e) for t in targets) for e in ff))
    )
    if unmatched:  # the model's matching raises or warns here: let it, with its messages
        raise NeedsModel("the config selects nothing, or something the checkpoint does not hold")
    for m in config.modules_to_save or ():  # as ia3fx.targeting warns (PEFT adds both classifier and score)
        if not _modules_to_save(names, [m]):
            warnings.warn(f"modules_to_save entry {m!r} matches no module of this model; check its spelling",
                          stacklevel=3)
    arch = (hf.get("architectures") or [hf["model_type"]])[0]
    return Layers(targets, saved, "", str(arch), True)


# --- the plan -----------------------------------------------------------------------------------
def plan(
    base_dir: str, adapter: Adapter, tensors: dict[str, TensorInfo], layers: Layers, safe: bool = False
) -> tuple[dict[str, Fold | Replace], int, list[str]]:
    """``{base tensor name: what to write instead of its bytes}``, the number of adapted layers, and
    the keys of the vectors holding NaN or inf (with ``safe``, the first is a :class:`CheckpointError`).

    Like PEFT's loader, every adapter tensor that is not a vector replaces the base tensor of the
    same name (``modules_to_save`` copies; base layers PEFT saves with ``save_embedding_layers``,
    whose ``.base_layer.`` segment is dropped); vectors then fold into the (replaced) weights.
    With ``layers.from_names``, a key that does not fit raises :class:`NeedsModel`, so that the
    model's plan makes the refusal.
    """
    prefix = layers.prefix

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
            if layers.from_names:
                raise NeedsModel(f"{name} is not in the checkpoint")
            tied = " (tied weights are not stored, and a tied weight cannot be merged on its own)"
            raise CheckpointError(
                f"adapter tensor {adapter_key!r} needs {what} {name!r}, which is not in the base checkpoint "
                f"{base_dir}" + (tied if name.endswith(".weight") else "")
            )
        return key

    vectors: list[tuple[str, str]] = []
    replace: dict[str, Replace] = {}
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
        owned = any(name.startswith(m + ".") for m in layers.modules_to_save)
        if not owned and ".base_layer." not in rest and base_key(name) is None:
            if layers.from_names:
                raise NeedsModel(f"{key} names no tensor of the checkpoint")
            raise CheckpointError(
                f"adapter tensor {key!r} is neither an (IA)³ vector nor a tensor of the base checkpoint "
                f"(modules_to_save: {layers.modules_to_save or 'none'})"
            )
        bkey = need(name, key, "tensor")
        binfo = tensors[bkey]
        shape = adapter.shape(key)
        if shape != binfo.shape:
            raise CheckpointError(
                f"adapter tensor {key!r} has shape {list(shape)}, base tensor {bkey!r} has {list(binfo.shape)}"
            )
        if adapter.header is not None:
            replace[bkey] = Replace(key, adapter.header.tensors[key])
        else:
            replace[bkey] = Replace(key, None, adapter.tensors[key])

    ops: dict[str, Fold | Replace] = dict(replace)
    seen: set[str] = set()
    nonfinite: list[str] = []
    for key, layer in vectors:
        target = layers.targets.get(layer)
        if target is None:
            if layers.from_names:
                raise NeedsModel(f"{layer} is not a target found by name")
            raise CheckpointError(
                f"adapter tensor {key!r}: {layer!r} is not a layer that this adapter's config targets in "
                f"{layers.architecture} (was the adapter trained on another architecture?)"
            )
        seen.add(layer)
        wkey = need(f"{layer}.weight", key, "weight")
        winfo = tensors[wkey]
        if winfo.shape != target.weight_shape:
            raise CheckpointError(
                f"base tensor {wkey!r} has shape {list(winfo.shape)}, but config.json builds "
                f"{list(target.weight_shape)}: checkpoint and config do not match"
            )
        if has_nonfinite(*adapter.raw(key)):  # a vector is small: checked whole, on its bytes
            if safe:
                raise CheckpointError(
                    f"adapter tensor {key!r} holds NaN or infinite values: refused (safe=True, ia3fx merge "
                    "--safe, as PEFT's safe_merge); nothing was written"
                )
            nonfinite.append(key)
        shape = tuple(adapter.shape(key))
        if shape != target.peft_shape:
            raise CheckpointError(
                f"adapter tensor {key!r} has shape {list(shape)}, the layer needs {list(target.peft_shape)}"
            )
        if winfo.dtype not in FLOATS:
            raise CheckpointError(
                f"base tensor {wkey!r} is {winfo.dtype}: only floating-point weights can be merged (quantized checkpoints cannot)"
            )
        vdtype = vector_dtype(winfo.dtype)
        ops[wkey] = Fold(key, vdtype, target.kind, target.feedforward, target.groups, False, winfo.dtype,
                         replace.get(wkey))
        if not target.feedforward and target.has_bias:
            bkey = need(f"{layer}.bias", key, "bias")
            binfo = tensors[bkey]
            size = math.prod(shape)
            if binfo.shape != (size,) or binfo.dtype not in FLOATS:
                raise CheckpointError(
                    f"base tensor {bkey!r} ({binfo.dtype}, shape {list(binfo.shape)}) cannot take a vector of {size}"
                )
            ops[bkey] = Fold(key, vdtype, target.kind, False, target.groups, True, winfo.dtype, replace.get(bkey))
    missing = sorted(set(layers.targets) - seen)
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


def load_vectors(adapter: Adapter, ops: dict[str, Fold | Replace]) -> dict[str, np.ndarray]:
    """``{adapter key: vector}`` of every fold in ``ops``, flattened and in the dtype PEFT's parameter
    has (:func:`vector_dtype`: an fp64 vector on an fp32 weight is rounded to fp32, as PEFT's
    loader does). The only step of the plan that needs numpy."""
    from .offline_fold import decode, encode

    out = {}
    for op in ops.values():
        if isinstance(op, Fold) and op.vector_key not in out:
            values, _ = adapter.values(op.vector_key)
            out[op.vector_key] = decode(encode(values.reshape(-1), op.vector_dtype), op.vector_dtype)
    return out
