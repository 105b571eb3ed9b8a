"""Export an adapted model: a ``torch.export`` program, an ONNX file, or a merged transformers checkpoint.

``export(model, path, format)`` writes one of

* ``"pt2"``: the eval graph re-exported with :func:`torch.export.export` and saved with
  :func:`torch.export.save`; ``torch.export.load(path).module()`` runs it.
* ``"onnx"``: the same program through ``torch.onnx.export(..., dynamo=True)``; the batch and
  sequence dims stay symbolic (``batch``, ``sequence``), so other sizes run in onnxruntime.
* ``"transformers"``: a directory that ``AutoModelFor*.from_pretrained`` loads: ``config.json``,
  safetensors with the adapters folded in (and ``modules_to_save`` copies in place of the
  originals), and the tokenizer files when there are any.

With ``merged=True`` (the default) the exported graph is :meth:`IA3Model.merged_graph_module`: the
base model's operations only. ``merged=False`` keeps the scale nodes, and the vectors are
parameters of the exported program (``ia3_l.<layer>.<input|output>``).

Nothing is written to the model: merged tensors are computed beside the live ones. Every output
is written under a temporary name next to ``path`` (``.<name>.ia3fx-<host>-<pid>-<token>.partial``)
and moved into place when complete (:func:`ia3fx.atomic_files.move_into_place`), and an existing
``path`` is only replaced with ``overwrite=True``. Each export first puts right what a killed
export, swap or merge to the same ``path`` left (:func:`ia3fx.atomic_files.recover_place`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from .atomic_files import move_into_place, recover_place, staging_directory
from .capture import _dim_spec, _dynamic_shapes, _training_mode, is_transformers_model, normalize_inputs
from .model import IA3Model
from .onnx_ops import check_translatable, translation_table
from .passes._lazy import realize
from .passes.complex_to_real import complex_to_real

__all__ = ["FORMATS", "export", "exported_program", "merged_state_dict"]

FORMATS = ("pt2", "onnx", "transformers")
METADATA_KEY = "ia3fx.json"  # pt2 extra file / ONNX metadata entry: what swap_adapter reads

# files a tokenizer (or processor) leaves in a model directory, copied along with the weights
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)


# --- the graph to export ------------------------------------------------------------------------
def _synthetic_inputs(gm: GraphModule) -> tuple[tuple, dict]:
    """Inputs shaped like the ones ``gm`` was captured with (ones: valid ids, masks and floats)."""
    spec = getattr(gm, "_in_spec", None)
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    if spec is None or any(v is None for v in vals):
        raise ValueError(
            "this model's graph was captured without example inputs (torch.fx.symbolic_trace): "
            "pass example_inputs to export it"
        )
    leaves = []
    for v in vals:
        if isinstance(v, torch.Tensor):
            shape = [d if isinstance(d, int) else (d.node.hint or 2) for d in v.shape]
            leaves.append(torch.ones(shape, dtype=v.dtype, device=v.device))
        else:
            leaves.append(v)
    args, kwargs = pytree.tree_unflatten(leaves, spec)
    return tuple(args), dict(kwargs)


def _static_dims(ep: torch.export.ExportedProgram, token_dims: bool) -> list[str]:
    """Dims asked to be dynamic that came out fixed (a re-export keeps a static capture static)."""
    out = []
    for node in ep.graph.nodes:
        val = node.meta.get("val")
        if node.op != "placeholder" or node.name not in ep.graph_signature.user_inputs:
            continue
        for d in _dim_spec(val, token_dims) or ():
            if isinstance(val.shape[d], int):
                out.append(f"{node.name} dim {d} = {val.shape[d]}")
    return out


@contextlib.contextmanager
def deployment_inputs(model: IA3Model, example_inputs: Any = None) -> Iterator[tuple[tuple, dict]]:
    """Inside: the eval graph's mode (flags restored after; a graph handed in as such has one mode
    only), no grad, and the inputs of the graph to export: ``example_inputs``, or the first graph's
    inputs reproduced from its placeholders."""
    eval_mode = _training_mode(model, False) if model._retraceable else contextlib.nullcontext()
    with eval_mode, torch.no_grad():
        if example_inputs is None:
            yield _synthetic_inputs(model.graph_module)
        else:
            yield normalize_inputs(example_inputs)


def warn_static_dims(ep: torch.export.ExportedProgram, token_dims: bool) -> None:
    static = _static_dims(ep, token_dims)
    if static:
        warnings.warn(
            f"the exported program has fixed sizes where dynamic ones were asked for ({', '.join(static)}): "
            "the graph was captured that way (a size-1 or specialised example input). Build the IA3Model "
            "with example_inputs of batch and sequence sizes >= 2 for a program that takes other sizes.",
            stacklevel=4,
        )


def exported_program(
    model: IA3Model, *, merged: bool = True, example_inputs: Any = None
) -> torch.export.ExportedProgram:
    """The model's eval graph (merged, or with its scale nodes) as a ``torch.export`` program.

    ``example_inputs`` picks the graph (and is captured if new); without them, the first graph's
    inputs are reproduced from its placeholders. Batch (and, for transformers models, sequence)
    dims are exported as dynamic as the captured graph allows; dims that stay fixed are warned about.
    """
    if not isinstance(model, IA3Model):
        raise TypeError(f"export takes an ia3fx.IA3Model, got {type(model).__name__}")
    with deployment_inputs(model, example_inputs) as (args, kwargs):
        if merged:
            gm = model.merged_graph_module((args, kwargs))
        else:
            gm = realize(model._graph_for(args, kwargs))  # its code (and signature) generated
        token_dims = is_transformers_model(model.model)
        dynamic = _dynamic_shapes(gm, args, kwargs, token_dims)
        ep = torch.export.export(gm, args, kwargs, dynamic_shapes=dynamic, strict=False)
    warn_static_dims(ep, token_dims)
    return ep


# --- a merged transformers checkpoint ------------------------------------------------------------
def merged_state_dict(model: IA3Model) -> dict[str, torch.Tensor]:
    """The base model's state dict as the model computes now: active adapters folded, copies in place.

    Nothing is modified: folded tensors are new. Tied weights are refused as in
    :meth:`IA3Model.merge_adapter` (``SharedWeightError``). Adapters already merged in place are in
    the weights already; inside ``disable_adapter()`` the base weights come out.
    """
    base = model.model
    state = base.state_dict()
    names: dict[int, list[str]] = {}
    for key, t in [*base.named_parameters(remove_duplicate=False), *base.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), []).append(key)
    pending = [] if model._disabled else [a for a in model.active_adapters if a not in model.merged_adapters]
    if pending:
        for param, folded in model._merge_plan(pending, safe_merge=False):
            for key in names[id(param)]:
                state[key] = folded
    state.update(saved_copies_state(model))
    return state


def saved_copies_state(model: IA3Model) -> dict[str, torch.Tensor]:
    """The tensors of the ``modules_to_save`` copies the model runs now, under the originals' keys."""
    state = {}
    for module in model._all_saved():
        chosen = model._saved_value(module)
        for key, t in chosen.state_dict().items():
            state[f"{module}.{key}"] = t
    return state


def _copy_tokenizer_files(source: str, directory: str) -> None:
    if not source or not os.path.isdir(source):
        return
    for name in TOKENIZER_FILES:
        path = os.path.join(source, name)
        if os.path.isfile(path):
            shutil.copy2(path, os.path.join(directory, name))


def _write_transformers(model: IA3Model, directory: str, tokenizer: Any) -> None:
    base = model.model
    if not is_transformers_model(base):
        raise TypeError(
            f"format='transformers' needs an IA3Model built on a transformers PreTrainedModel, "
            f"not on a {type(base).__name__}; use 'pt2' or 'onnx'"
        )
    base.save_pretrained(directory, state_dict=merged_state_dict(model))
    _write_tokenizer(base, directory, tokenizer)


def _write_tokenizer(base: Any, directory: str, tokenizer: Any) -> None:
    """The tokenizer given, else the tokenizer files of the base model's own directory."""
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    else:
        _copy_tokenizer_files(getattr(base, "name_or_path", "") or "", directory)


# --- ONNX -----------------------------------------------------------------------------------------
def _output_names(ep: torch.export.ExportedProgram) -> list[str]:
    """``logits`` for a transformers output, ``output_0``... for tuples."""
    spec = ep.call_spec.out_spec
    if spec is None:
        return []
    paths = pytree.tree_flatten_with_path(pytree.tree_unflatten(list(range(spec.num_leaves)), spec))[0]
    names = []
    for path, _ in paths:
        name = re.sub(r"[^0-9A-Za-z_]+", "_", pytree.keystr(path)).strip("_") or "output"
        names.append(f"output_{name}" if name[0].isdigit() else name)
    return names if len(set(names)) == len(names) else []


def _axis_names(program: Any, token_dims: bool) -> dict[str, str]:
    """Readable names for the symbolic input dims: ``batch``, ``sequence``, else ``<input>_dim<i>``."""
    mapping: dict[str, str] = {}
    for value in program.model.graph.inputs:
        for i, dim in enumerate(value.shape or ()):
            sym = getattr(dim, "value", None)
            if not isinstance(sym, str) or sym in mapping:
                continue
            name = "batch" if i == 0 else ("sequence" if i == 1 and token_dims else f"{value.name}_dim{i}")
            if name in mapping.values():
                name = f"{value.name}_{name}"
            mapping[sym] = name
    return mapping


def _onnx_ready(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``ep`` with complex values on real pairs (ONNX has none), checked for ops nothing translates."""
    complex_to_real(ep.graph_module)
    check_translatable(ep)
    return ep


def _write_onnx(ep: torch.export.ExportedProgram, file: str, token_dims: bool, meta: dict | None = None) -> None:
    """With ``meta`` (a table export): unoptimised, so that no table is merged with an equal one,
    and the manifest in the model's metadata."""
    ep = _onnx_ready(ep)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        program = torch.onnx.export(ep, dynamo=True, verbose=False, output_names=_output_names(ep) or None,
                                    optimize=meta is None, custom_translation_table=translation_table())
    program.rename_axes(_axis_names(program, token_dims))
    if meta is not None:
        _check_vectors_kept(program, meta)
        program.model.metadata_props[METADATA_KEY] = json.dumps(meta)
    program.save(file)


def _check_vectors_kept(program: Any, meta: dict) -> None:
    held = set(program.model.graph.initializers)
    lost = [name for name in meta["vectors"] if name not in held]
    if lost:
        raise RuntimeError(f"the ONNX conversion dropped the vector {lost[0]!r} ({len(lost)} in all); please report this")


def _write_onnx_with_past(ep: torch.export.ExportedProgram, file: str, meta: dict) -> None:
    from .generation_export import io_names, onnx_axis_names

    inputs, outputs = io_names(meta["num_layers"])
    if meta.get("table"):
        inputs.append("adapter_index")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # unoptimised when it holds vectors: the optimiser drops a multiply by a vector of ones
        # (a fresh adapter), and with it the initializer that swap_adapter replaces
        ep = _onnx_ready(ep)
        program = torch.onnx.export(ep, dynamo=True, verbose=False, input_names=inputs, output_names=outputs,
                                    optimize=meta["merged"], custom_translation_table=translation_table())
    program.rename_axes(onnx_axis_names(program, meta["num_layers"]))
    _check_vectors_kept(program, meta)
    program.model.metadata_props[METADATA_KEY] = json.dumps(meta)
    program.save(file)


def _generation_program(
    model: IA3Model, format: str, merged: bool, batch_size: int, max_cache_len: int | None, adapters: list[str] | None
) -> tuple[torch.export.ExportedProgram, dict]:
    from .generation_export import past_key_values_program, static_cache_program

    if format == "pt2":
        return static_cache_program(model, merged=merged, batch_size=batch_size, max_cache_len=max_cache_len,
                                    adapters=adapters)
    return past_key_values_program(model, merged=merged, adapters=adapters)


# --- entry point ----------------------------------------------------------------------------------
def export(
    model: IA3Model,
    path: str | os.PathLike,
    format: str = "pt2",
    *,
    merged: bool | None = None,
    example_inputs: Any = None,
    overwrite: bool = False,
    tokenizer: Any = None,
    for_generation: bool = False,
    batch_size: int = 1,
    max_cache_len: int | None = None,
    progress: Callable[[str], None] | None = None,
    adapters: Sequence[str] | None = None,
) -> str:
    """Write ``model`` to ``path`` as ``format`` (``"pt2"``, ``"onnx"`` or ``"transformers"``).

    ``merged``: fold the active adapters into the weights (the base graph's operations only), or,
    with ``False``, keep the scale nodes and export the vectors as parameters (pt2/onnx only).
    ``example_inputs`` pick the graph to export (default: the inputs the model was captured with).
    ``tokenizer`` is saved into a transformers directory; without it, tokenizer files found in the
    base model's ``name_or_path`` directory are copied. Returns the absolute path written.

    ``for_generation=True`` (a decoder-only transformers causal LM) exports a program with a KV
    cache (see :mod:`ia3fx.generation_export`): pt2 in transformers' ExecuTorch form with a static
    cache of ``batch_size`` x ``max_cache_len``, ONNX with past key values in Optimum's naming.
    Unmerged, the vectors are named tensors of the artifact, which :func:`ia3fx.swap_adapter`
    replaces. A ``path`` that does not end in ``.pt2`` / ``.onnx`` is a directory: ``model.pt2`` or
    ``model.onnx`` with ``config.json``, ``generation_config.json`` and the tokenizer files. A
    transformers checkpoint generates as it is (the flag changes nothing there).
    ``progress`` is called with the name of each stage as it starts.

    ``adapters=[names...]`` (pt2/onnx) exports a program that serves all of them: it takes one more
    input, ``adapter_index`` (int64, one per batch row: 0 the base model, ``i`` the ``i``-th listed
    adapter), and holds the adapters' vectors as one stacked table per site (see
    :mod:`ia3fx.table_export`); :func:`ia3fx.swap_adapter` replaces or adds a row. Unmerged by
    nature (``merged`` defaults to ``True`` otherwise).

    The model is not modified. The output appears only once complete; an existing ``path`` raises
    ``FileExistsError`` unless ``overwrite=True``, and is then replaced only by a complete new one.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; use one of {FORMATS}")
    if not isinstance(model, IA3Model):
        raise TypeError(f"export takes an ia3fx.IA3Model, got {type(model).__name__}")
    if adapters is not None:
        if format == "transformers":
            raise ValueError("a transformers checkpoint holds one set of weights: adapters=[...] exports pt2 or onnx")
        if merged:
            raise ValueError("adapters=[...] exports the adapters' vectors as a table: it cannot be merged (drop merged=True)")
        from .table_export import check_table_adapters

        adapters = check_table_adapters(model, adapters)  # before anything is written
        merged = False
    merged = True if merged is None else merged
    if format == "transformers" and not merged:
        raise ValueError(
            "a transformers checkpoint holds plain weights: export it with merged=True, or save the "
            "adapter itself with IA3Model.save_pretrained"
        )
    if for_generation and example_inputs is not None and format != "transformers":
        raise ValueError("for_generation=True builds its own inputs (a token, a cache position, past key values): drop example_inputs")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if max_cache_len is not None and (not isinstance(max_cache_len, int) or max_cache_len < 2):
        raise ValueError(f"max_cache_len must be an int >= 2, got {max_cache_len!r}")
    say = progress or (lambda stage: None)
    out = os.path.abspath(os.fspath(path))
    recover_place(out)  # a killed replacement of out put right, killed writes' leftovers removed
    if os.path.lexists(out) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (ia3fx export --force) to replace it")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = staging_directory(parent, os.path.basename(out))
    try:
        if format == "transformers":
            staged = os.path.join(tmp, "checkpoint")
            os.mkdir(staged)  # not the private temporary directory itself: the usual permissions
            say("fold the adapters and write the checkpoint")
            _write_transformers(model, staged, tokenizer)
            move_into_place(staged, out)
            return out
        say("export the graph" + (" with its KV cache" if for_generation else ""))
        if for_generation:
            ep, meta = _generation_program(model, format, merged, batch_size, max_cache_len, adapters)
        elif adapters is not None:
            from .table_export import table_program

            ep, meta = table_program(model, adapters, example_inputs)
        else:
            ep, meta = exported_program(model, merged=merged, example_inputs=example_inputs), None
        if for_generation and not out.endswith(f".{format}"):
            # a deployment directory: the program, the config and generation config, the tokenizer
            staged = os.path.join(tmp, "export")
            os.mkdir(staged)
            _write_program(ep, meta, format, os.path.join(staged, f"model.{format}"), say, model)
            say("write the config and tokenizer files")
            _write_model_files(model, staged, tokenizer)
            move_into_place(staged, out)
            return out
        staged = os.path.join(tmp, os.path.basename(out))
        _write_program(ep, meta, format, staged, say, model)
        # ONNX models over 2 GB keep their tensors in a side file, which must be in place first
        for name in sorted(os.listdir(tmp)):
            if name == os.path.basename(out):
                continue
            side = os.path.join(parent, name)
            if os.path.lexists(side) and not overwrite:
                raise FileExistsError(f"{side} already exists; pass overwrite=True to replace it")
            move_into_place(os.path.join(tmp, name), side)
        move_into_place(staged, out)
        return out
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


class _WriteErrorKept(io.RawIOBase):
    """A file for torch's pt2 writer that keeps the first write error instead of raising it: a
    writer that sees its stream fail aborts the whole process from a C++ destructor (a full disk
    would kill the caller), so the error is raised once the writer has finished. After an error
    the position is kept by count, so that the writer's seeks and tells still agree."""

    def __init__(self, file: Any) -> None:
        super().__init__()
        self.file, self.error = file, None
        self.pos = self.end = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def _try(self, op: Callable[[], Any]) -> None:
        if self.error is None:
            try:
                op()
            except OSError as e:
                self.error = e

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self._try(lambda: self.file.write(data))
        self.pos += len(data)
        self.end = max(self.end, self.pos)
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.pos = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.end}[whence] + offset
        self._try(lambda: self.file.seek(self.pos))
        return self.pos

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        self._try(self.file.flush)


def save_pt2(program: torch.export.ExportedProgram, path: str, extra_files: dict[str, str] | None = None) -> None:
    """``torch.export.save`` to ``path``; a failed write (a full disk) is an ``OSError`` naming it."""
    with open(path, "wb") as f:
        kept = _WriteErrorKept(f)
        torch.export.save(program, kept, extra_files=extra_files)
        if kept.error is not None:
            raise kept.error
        f.flush()
        os.fsync(f.fileno())


def _write_program(ep: torch.export.ExportedProgram, meta: dict | None, format: str, file: str,
                   say: Callable[[str], None], model: IA3Model) -> None:
    if format == "pt2":
        say("write the pt2 archive")
        extra = {METADATA_KEY: json.dumps(meta)} if meta is not None else None
        save_pt2(ep, file, extra)
    elif meta is not None and meta["form"] == "table":
        say("convert to ONNX")
        _write_onnx(ep, file, token_dims=is_transformers_model(model.model), meta=meta)
    elif meta is not None:
        say("convert to ONNX")
        _write_onnx_with_past(ep, file, meta)
    else:
        say("convert to ONNX")
        _write_onnx(ep, file, token_dims=is_transformers_model(model.model))
    if format == "onnx":  # Netron shows the scale multiplies as ia3/<layer>/<input|output>
        from .onnx_names import name_adapter_nodes

        name_adapter_nodes(file)


def _write_model_files(model: IA3Model, directory: str, tokenizer: Any) -> None:
    """What a decode loop reads beside the program: ``config.json``, ``generation_config.json``,
    the tokenizer (saved, or its files copied from the base model's directory)."""
    base = model.model
    base.config.save_pretrained(directory)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(directory)
    _write_tokenizer(base, directory, tokenizer)
