"""Exported programs that serve several adapters: a table of vectors and an ``adapter_index`` input.

``ia3fx.export(model, path, format, adapters=[...])`` stacks, per adapted site, the vectors of the
listed adapters under ones: row 0 is the base, row ``i`` the ``i``-th listed adapter (ones where
it does not scale that site). The program takes ``adapter_index`` (int64, one per batch row) and
each scale multiply reads its rows of the table (``table[adapter_index]``, then the per-row
broadcast of :mod:`ia3fx.mixed`), so one deployed model answers each request with its own adapter.

The table is a buffer per site, named ``ia3.<layer>.<input|output>`` in a program for generation and
``base.ia3.<layer>.<input|output>`` in a whole-model one (a pt2 buffer, an ONNX
initializer), and the manifest (``ia3fx.json``) lists the adapters in table order, so
:func:`ia3fx.swap_adapter` can replace a row or add one without exporting again.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .adapter_store import Slot, _key, _slot
from .generation_export import EXPORTED_VECTORS, VectorTable
from .mixed import BASE, Rows, choosing, current_rows

__all__ = ["RowTable", "adapter_table", "check_table_adapters", "take_adapter_index", "table_manifest"]


def check_table_adapters(model: Any, adapters: Any) -> list[str]:
    """The adapters of a table export, checked: known, distinct, unmerged, without modules_to_save."""
    if isinstance(adapters, str) or not isinstance(adapters, Sequence) or not adapters:
        raise ValueError(f"adapters must be a non-empty list of adapter names, got {adapters!r}")
    names = list(adapters)
    if BASE in names:
        raise ValueError(f"{BASE!r} is row 0 of every table (adapter_index 0): list only adapters")
    unknown = [n for n in names if n not in model.ia3_l]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; adapters: {list(model.ia3_l)}")
    if len(set(names)) != len(names):
        raise ValueError(f"adapters lists a name twice: {names}")
    if model._merged:
        raise ValueError(f"adapters {model._merged} are merged into the weights: unmerge_adapter() before a table export")
    saved = [a for a in names if model._selections[a].modules_to_save]
    if saved:
        raise ValueError(
            f"adapter(s) {saved} train copies of whole modules (modules_to_save): a table holds vectors only; "
            "export those adapters one at a time"
        )
    return names


def adapter_table(model: Any, adapters: Sequence[str]) -> dict[Slot, torch.Tensor]:
    """Per site any listed adapter scales: ``(1 + len(adapters), *shape)``, row 0 ones."""
    slots: dict[Slot, list[torch.Tensor | None]] = {}
    for i, adapter in enumerate(adapters):
        store = model.ia3_l[adapter]
        for name, target in model._selections[adapter].targets.items():
            rows = slots.setdefault(_slot(target), [None] * len(adapters))
            rows[i] = store[_key(name)].detach()
    table = {}
    for slot, vecs in slots.items():
        template = next(v for v in vecs if v is not None)
        ones = torch.ones_like(template)
        table[slot] = torch.stack([ones, *(ones if v is None else v.to(template.dtype) for v in vecs)])
    return table


class RowTable(VectorTable):
    """The stacked vectors of an exported program, read by row: called with ``(layer, placement)``
    (a per-row graph's slot read, :mod:`ia3fx.passes.per_row`) or through :meth:`rows` (the scale
    hooks of a generation export). A site no listed adapter scales is ones for every row."""

    def __init__(self, table: dict[Slot, torch.Tensor], shapes: dict[Slot, torch.Size] | None = None) -> None:
        super().__init__(table)
        self.shapes = dict(shapes or {})

    def value(self, layer: str, placement: str) -> torch.Tensor | None:
        return None  # a table is read by rows only

    def rows(self, layer: str, placement: str) -> torch.Tensor | None:
        if (layer, placement) not in self._known:
            return None
        index = current_rows().index
        return self.get_submodule(layer).get_buffer(placement).index_select(0, index)

    def forward(self, layer: str, placement: str) -> torch.Tensor:
        value = self.rows(layer, placement)
        if value is None:  # not in the table: ones for every row
            index = current_rows().index
            shape = self.shapes[(layer, placement)]
            value = torch.ones((index.shape[0], *shape), device=index.device)
        return value


def _signature_with_index(forward: Any) -> inspect.Signature:
    params = [p for p in inspect.signature(forward).parameters.values() if p.kind != p.VAR_KEYWORD]
    return inspect.Signature([*params, inspect.Parameter("adapter_index", inspect.Parameter.KEYWORD_ONLY)])


def take_adapter_index(module: nn.Module, table: RowTable) -> nn.Module:
    """``module``, now taking one more input, ``adapter_index``, that picks each row's table row.

    The instance's ``forward`` gets the class's signature plus ``adapter_index`` (what torch.export
    binds dynamic shapes and names inputs by); nothing else of the module changes, so its tensors
    keep their names in the program, and the table's are ``ia3.<layer>.<placement>``."""
    setattr(module, EXPORTED_VECTORS, table)
    module.forward = take_adapter_index_forward(module.forward, table)
    return module


class _Indexed(nn.Module):
    """A whole-model graph behind a ``forward`` that also takes ``adapter_index`` (a GraphModule's
    own ``forward`` cannot be replaced on the instance: export runs its class's)."""

    def __init__(self, graph: nn.Module, table: RowTable) -> None:
        super().__init__()
        # the table at base.ia3: the names torch.export and the ONNX exporter agree on. Not "graph":
        # the unlifted program is a GraphModule, whose .graph is its Graph
        self.base = graph
        self.forward = take_adapter_index_forward(graph.forward, table)


def take_adapter_index_forward(original: Any, table: RowTable) -> Any:
    from .mixed_batch import batch_dim

    def forward(*args: Any, adapter_index: torch.Tensor, **kwargs: Any) -> Any:
        batch = batch_dim(args, kwargs)
        if batch is not None:  # one size in the program: a mismatched index is an error, not a broadcast
            torch._check(adapter_index.shape[0] == batch)
        with choosing(Rows(adapter_index, table.rows)):
            return original(*args, **kwargs)

    forward.__signature__ = _signature_with_index(original)  # type: ignore[attr-defined]
    return forward


def table_manifest(model: Any, table: RowTable, adapters: Sequence[str], prefix: str = "") -> dict[str, dict[str, Any]]:
    """Per table buffer: its layer, placement, rows, and the key and shape of one row in a PEFT file."""
    out = {}
    for layer, placement in table.slots:
        buf = table.get_submodule(layer).get_buffer(placement)
        target = next((model._selections[a].targets[layer] for a in adapters if layer in model._selections[a].targets), None)
        out[f"{prefix}{EXPORTED_VECTORS}.{layer}.{placement}"] = {
            "layer": layer,
            "placement": placement,
            "peft_key": f"base_model.model.{layer}.ia3_l",
            "peft_shape": list(target.peft_shape) if target is not None else list(buf.shape[1:]),
            "shape": list(buf.shape[1:]),
            "rows": int(buf.shape[0]),
            "dtype": str(buf.dtype).removeprefix("torch."),
        }
    return out


def table_program(model: Any, adapters: Sequence[str], example_inputs: Any = None) -> tuple[torch.export.ExportedProgram, dict]:
    """The eval whole-model graph with the adapters' table and an ``adapter_index`` input, exported
    (batch and sequence dims dynamic, as :func:`ia3fx.export.exported_program`), and its manifest."""
    from .capture import _dynamic_shapes, is_transformers_model
    from .export import deployment_inputs, warn_static_dims
    from .mixed_batch import batch_size, slot_shapes
    from .passes._lazy import realize
    from .passes.per_row import scale_per_row

    names = check_table_adapters(model, adapters)
    token_dims = is_transformers_model(model.model)
    with deployment_inputs(model, example_inputs) as (args, kwargs):
        gm = realize(model._graph_for(args, kwargs))
        table = RowTable(adapter_table(model, names), slot_shapes(gm))
        rows_gm, _ = scale_per_row(gm, table, attrs=model._saved_originals(gm), rows_attr=EXPORTED_VECTORS)
        program = _Indexed(rows_gm, table)
        batch = batch_size(args, kwargs)
        if batch is None:
            raise ValueError("a table export needs a batch input (input_ids, pixel_values, ...) to size adapter_index by")
        device = next((t.device for t in table.buffers()), torch.device("cpu"))
        index = torch.zeros(batch, dtype=torch.long, device=device)
        dynamic = _dynamic_shapes(program, args, {**kwargs, "adapter_index": index}, token_dims)
        ep = torch.export.export(program, args, {**kwargs, "adapter_index": index}, dynamic_shapes=dynamic, strict=False)
    warn_static_dims(ep, token_dims)
    meta = {
        "ia3fx_export": 1,
        "form": "table",
        "merged": False,
        "adapters": names,
        "table": True,
        "model_type": getattr(getattr(model.model, "config", None), "model_type", None),
        "vectors": table_manifest(model, table, names, prefix="base."),
        "modules_to_save": [],
    }
    return ep, meta
