"""Swap the adapter inside an exported program, without exporting again.

An unmerged export for generation holds each adapted site's vector as a named tensor
(``ia3.<layer>.<input|output>``: a pt2 buffer, an ONNX initializer) and a manifest
(``ia3fx.json``: pt2 extra file, ONNX metadata) with each vector's PEFT key and shape. Serving
another adapter of the same targets is then a matter of replacing those tensors: the program,
its cache and its weights are copied as they are.

The new adapter must fit exactly: the same PEFT keys (a missing or extra key is named), the same
shapes, finite values, no ``modules_to_save`` weights (those are weights of the program, not
vectors). The output is written under a temporary name and moved into place when complete, as
:mod:`ia3fx.export` does (what a killed write to the same place left is put right first); an
existing output is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import shutil
from functools import partial
from typing import Any

import torch

from .atomic_files import move_into_place, recover_place, staging_directory
from .errors import AdapterLoadError
from .export import METADATA_KEY, save_pt2
from .io import read_adapter_files

__all__ = ["swap_adapter", "read_manifest", "program_file"]


def program_file(path: str) -> str:
    """The program in ``path``: the file itself, or an export directory's ``model.pt2`` / ``model.onnx``."""
    if not os.path.isdir(path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is neither an exported program nor an export directory")
        return path
    found = [os.path.join(path, n) for n in ("model.pt2", "model.onnx") if os.path.isfile(os.path.join(path, n))]
    if len(found) != 1:
        raise FileNotFoundError(f"{path} holds {'no' if not found else 'both'} model.pt2 / model.onnx: not an export directory")
    return found[0]


def _format_of(path: str) -> str:
    if path.endswith(".onnx"):
        return "onnx"
    if path.endswith(".pt2"):
        return "pt2"
    raise ValueError(f"cannot tell the format of {path!r}: an exported program ends in .pt2 or .onnx")


def _load(path: str, fmt: str) -> tuple[Any, dict]:
    if fmt == "pt2":
        extra = {METADATA_KEY: ""}
        program = torch.export.load(path, extra_files=extra)
        text = extra[METADATA_KEY]
    else:
        import onnx

        program = onnx.load(path)
        text = next((p.value for p in program.metadata_props if p.key == METADATA_KEY), "")
    if not text:
        raise ValueError(
            f"{path} was not written by ia3fx.export(..., for_generation=True): it has no {METADATA_KEY} manifest "
            "naming its vectors. Export the model again with for_generation=True, merged=False"
        )
    return program, json.loads(text)


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of an exported program: its form, whether merged, and its vectors."""
    path = program_file(os.fspath(path))
    return _load(path, _format_of(path))[1]


def _new_vectors(manifest: dict, adapter_dir: str, path: str) -> dict[str, torch.Tensor]:
    """The adapter's vectors under the program's tensor names, checked against the manifest.

    A table program (``adapters=[...]``) takes an adapter of fewer sites: its row is ones there."""
    if manifest.get("merged"):
        raise ValueError(
            f"{path} was exported merged: the adapter is folded into its weights and cannot be swapped. "
            "Export with merged=False (ia3fx export --unmerged) to swap adapters"
        )
    saved = manifest.get("modules_to_save") or []
    if saved:
        raise ValueError(
            f"{path} holds the trained copies of modules_to_save {saved[:3]} in its weights: swapping in another "
            "adapter would keep them. Export the model with the other adapter instead"
        )
    vectors = manifest["vectors"]
    if not vectors:
        raise ValueError(
            f"{path} holds no vectors (its adapters were merged into the weights or disabled when it was exported): "
            "export with merged=False from a model whose adapters are active and unmerged"
        )
    _config, tensors = read_adapter_files(adapter_dir)
    by_key = {entry["peft_key"]: name for name, entry in vectors.items()}
    extra = sorted(k for k in tensors if k not in by_key)
    if extra:
        what = "modules_to_save weights" if not extra[0].endswith(".ia3_l") else "a vector the program does not have"
        raise AdapterLoadError(
            f"{adapter_dir} holds {extra[0]!r} ({what}; {len(extra)} such key(s)): the program at {path} adapts "
            f"{len(by_key)} layers and nothing else; export the model with this adapter instead"
        )
    missing = sorted(k for k in by_key if k not in tensors)
    if manifest.get("table"):
        if len(missing) == len(by_key):
            raise AdapterLoadError(f"{adapter_dir} scales none of the {len(by_key)} sites of the table in {path}")
        missing = []
        tensors = {**{k: torch.ones(vectors[by_key[k]]["peft_shape"]) for k in by_key if k not in tensors}, **tensors}
    if missing:
        raise AdapterLoadError(
            f"{adapter_dir} has no {missing[0]!r} ({len(missing)} key(s) missing): the program at {path} scales that "
            "layer; an adapter for the same target modules is needed"
        )
    out = {}
    for key, name in by_key.items():
        entry, t = vectors[name], tensors[key]
        if list(t.shape) != entry["peft_shape"]:
            raise AdapterLoadError(
                f"{adapter_dir}: {key!r} has shape {tuple(t.shape)}, the program's vector takes "
                f"{tuple(entry['peft_shape'])} ({entry['placement']} of {entry['layer']})"
            )
        if not t.is_floating_point():
            raise AdapterLoadError(f"{adapter_dir}: {key!r} is {t.dtype}; (IA)³ vectors are floating point")
        if not torch.isfinite(t).all():
            raise AdapterLoadError(f"{adapter_dir}: {key!r} holds NaN or infinite values")
        out[name] = t.reshape(entry["shape"]).to(getattr(torch, entry["dtype"])).contiguous()
    return out


def _table_row(old: torch.Tensor, value: torch.Tensor, row: int) -> torch.Tensor:
    """The table ``old`` with ``value`` at ``row`` (one past the end: a row added)."""
    value = value.to(dtype=old.dtype, device=old.device)
    if row == old.shape[0]:
        return torch.cat([old, value.unsqueeze(0)]).contiguous()
    new = old.clone()
    new[row] = value
    return new


def _write_pt2(program: torch.export.ExportedProgram, manifest: dict, vectors: dict, staged: str,
               row: int | None = None) -> None:
    held = program.state_dict
    for name, value in vectors.items():
        old = held[name]
        held[name] = value.to(old.device) if row is None else _table_row(old, value, row)
    if row is not None:
        _resize_placeholders(program, {name: held[name] for name in vectors})
    save_pt2(program, staged, {METADATA_KEY: json.dumps(manifest)})


def _resize_placeholders(program: torch.export.ExportedProgram, tables: dict[str, torch.Tensor]) -> None:
    """A table that gained a row: its placeholder's recorded shape follows (the graph reads the
    table by index only, so nothing else in it depends on the number of rows)."""
    by_target = {spec.target: spec.arg.name for spec in program.graph_signature.input_specs if spec.target in tables}
    for node in program.graph.nodes:
        if node.op != "placeholder":
            continue
        for target, name in by_target.items():
            if node.name == name and "val" in node.meta:
                val = node.meta["val"]
                node.meta["val"] = val.new_empty(tables[target].shape)
                node.meta["tensor_meta"] = None


def _write_onnx(model: Any, manifest: dict, vectors: dict, staged: str, row: int | None = None) -> None:
    import onnx
    from onnx import numpy_helper

    inits = {init.name: init for init in model.graph.initializer}
    for name, value in vectors.items():
        init = inits.get(name)
        if init is None:
            raise ValueError(f"the ONNX model has no initializer {name!r} although its manifest names it")
        if row is not None:
            value = _table_row(torch.from_numpy(numpy_helper.to_array(init).copy()), value, row)
        init.CopyFrom(numpy_helper.from_array(value.numpy(), name))
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            prop.value = json.dumps(manifest)
    large = model.ByteSize() > 2**31 - 2**26
    onnx.save(model, staged, save_as_external_data=large, location=os.path.basename(staged) + ".data")


def _table_row_of(manifest: dict, adapter_name: str | None, path: str) -> int | None:
    """The table row ``adapter_name`` goes to (``None``: the program has no table)."""
    if not manifest.get("table"):
        if adapter_name is not None:
            raise ValueError(f"{path} holds one adapter, not a table: drop adapter_name (export with adapters=[...] for a table)")
        return None
    if not isinstance(adapter_name, str) or not adapter_name or adapter_name == "__base__":
        raise ValueError(
            f"{path} holds a table of adapters {manifest['adapters']}: pass adapter_name, a listed name to replace "
            "its row or a new name to add one ('__base__', row 0, stays the base model)"
        )
    names = manifest["adapters"]
    return names.index(adapter_name) + 1 if adapter_name in names else len(names) + 1


def swap_adapter(
    exported_path: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    overwrite: bool = False,
    adapter_name: str | None = None,
) -> str:
    """Write ``exported_path`` (pt2 or ONNX, unmerged, for generation) to ``out_path`` with the
    vectors of the PEFT IA3 adapter in ``adapter_dir``. Returns the absolute path written.

    A program exported with ``adapters=[...]`` holds a table: ``adapter_name`` says which row the
    adapter goes to: a listed name's row is replaced, a new name is added as the next row (its
    ``adapter_index`` is then ``len(adapters) + 1``; the manifest lists the names in order).

    Raises :class:`~ia3fx.AdapterLoadError` naming the key when the adapter does not fit the
    program's vectors, and ``FileExistsError`` for an existing ``out_path`` without ``overwrite``.
    """
    src = os.path.abspath(os.fspath(exported_path))
    out = os.path.abspath(os.fspath(out_path))
    directory = os.path.isdir(src)  # an export directory: model.<pt2|onnx> and the model's files
    src_file = program_file(src)
    fmt = _format_of(src_file)
    if directory and os.path.splitext(out)[1] in (".pt2", ".onnx"):
        raise ValueError(f"{src} is an export directory: write another directory, not {os.path.basename(out)}")
    if not directory and _format_of(out) != fmt:
        raise ValueError(f"{out} would change the format: write a .{fmt} file")
    if os.path.realpath(out) == os.path.realpath(src):
        raise ValueError(f"{out} is the program being read: write the swapped program somewhere else")
    recover_place(out)  # a killed replacement of out put right, killed writes' leftovers removed
    if os.path.lexists(out) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (ia3fx swap-adapter --force) to replace it")
    program, manifest = _load(src_file, fmt)
    row = _table_row_of(manifest, adapter_name, src)
    vectors = _new_vectors(manifest, os.fspath(adapter_dir), src)
    if row is None:
        manifest = {**manifest, "adapters": [os.path.basename(os.path.normpath(os.fspath(adapter_dir)))]}
    else:
        names = list(manifest["adapters"])
        if row > len(names):
            names.append(adapter_name)
        vectors_meta = {k: {**v, "rows": len(names) + 1} for k, v in manifest["vectors"].items()}
        manifest = {**manifest, "adapters": names, "vectors": vectors_meta}
    write = partial(_write_pt2 if fmt == "pt2" else _write_onnx, row=row)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = staging_directory(parent, os.path.basename(out))
    try:
        if directory:
            staged = os.path.join(tmp, "export")
            shutil.copytree(src, staged, ignore=shutil.ignore_patterns(os.path.basename(src_file), "*.data"))
            write(program, manifest, vectors, os.path.join(staged, os.path.basename(src_file)))
            move_into_place(staged, out)
            return out
        staged = os.path.join(tmp, os.path.basename(out))
        write(program, manifest, vectors, staged)
        for name in sorted(os.listdir(tmp)):  # an ONNX side file goes first
            if name != os.path.basename(out):
                move_into_place(os.path.join(tmp, name), os.path.join(parent, name))
        move_into_place(staged, out)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
