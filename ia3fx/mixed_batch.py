"""``adapter_names=``: one adapter per row of a call, on the adapted model (see :mod:`ia3fx.mixed`).

The model side of a mixed batch: the checks before anything runs (known names, one per row, no
merged or disabled state, no ``modules_to_save``), each slot's per-row vectors gathered from the
live parameters (so that each adapter's vectors get the gradient of their own rows), and the
per-row copy of each whole-model graph. Block graphs and scale hooks read the row choice
themselves (``blocks.py``).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from .adapter_store import Slot, _key, _slot
from .mixed import Rows, row_index, stacked_rows
from .passes._graph import SAVED_ROOT
from .passes.insert import slot_attr
from .passes.per_row import scale_per_row
from .sites import get_attr_path

__all__ = ["MixedBatchMixin", "LiveRows"]

# the inputs that carry the batch, in the order they are looked for
_BATCH_INPUTS = ("input_ids", "inputs_embeds", "pixel_values", "input_features", "input_values", "decoder_input_ids")


def batch_dim(args: tuple, kwargs: dict) -> Any:
    """Dim 0 of a call's first batch input, as it is (an int, or a symbol while exporting)."""
    for name in _BATCH_INPUTS:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.dim():
            return value.shape[0]
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim():
            return value.shape[0]
    return None


def batch_size(args: tuple, kwargs: dict) -> int | None:
    """The number of rows of a call (``None``: no tensor input)."""
    dim = batch_dim(args, kwargs)
    return None if dim is None else int(dim)


class LiveRows(nn.Module):
    """``gm.ia3_rows`` of a live per-row graph: the call's per-row vectors of a slot, or ones."""

    def __init__(self, shapes: dict[Slot, torch.Size]) -> None:
        super().__init__()
        self.shapes = shapes

    def forward(self, layer: str, placement: str) -> torch.Tensor:
        from .mixed import current_rows

        rows = current_rows()
        if rows is None:
            raise RuntimeError("a per-row graph ran outside a call with adapter_names")
        value = rows.value(layer, placement)
        if value is None:
            like = rows.ones(layer, placement, self.shapes[(layer, placement)])
            value = like.unsqueeze(0).expand(rows.batch, *like.shape)
        return value


class MixedBatchMixin:
    """The row choice of a call with ``adapter_names``, and the per-row whole-model graphs."""

    def _row_choice(self, names: Any, args: tuple, kwargs: dict) -> Rows:
        """Checked before anything runs: a refused call changes nothing."""
        self._check_loaded()
        if self._merged:
            raise ValueError(
                f"adapters {self._merged} are merged into the weights, so every row would get them: call "
                "unmerge_adapter() before a call with adapter_names"
            )
        if self._disabled:
            raise ValueError("adapter_names inside disable_adapter(): leave the block, or use '__base__' rows")
        used, index = row_index(names, list(self.ia3_l), batch_size(args, kwargs))
        saved = [a for a in used if self._selections[a].modules_to_save]
        if saved:
            raise ValueError(
                f"adapter(s) {saved} train copies of whole modules (modules_to_save), which one batch cannot hold "
                "per row; call those adapters one at a time (set_adapter)"
            )
        if self.training and torch.is_grad_enabled():
            frozen = [a for a in used if not any(p.requires_grad for p in self.ia3_l[a].parameters())]
            if frozen:
                warnings.warn(
                    f"adapter(s) {frozen} are frozen: their rows run, but their vectors get no gradient. Call "
                    f"set_requires_grad({used!r}) to train every adapter of the batch",
                    stacklevel=3,
                )
        keys = [{_slot(t): _key(name) for name, t in self._selections[a].targets.items()} for a in used]
        stores = self._modules["ia3_l"]._modules  # registered parameters, read at call time (FSDP2)
        on_device: dict[torch.device, torch.Tensor] = {}

        def value(layer: str, placement: str) -> torch.Tensor | None:
            slot = (layer, placement)
            vecs = [stores[a]._parameters[k[slot]] if slot in k else None for a, k in zip(used, keys)]
            if all(v is None for v in vecs):
                return None
            device = next(v for v in vecs if v is not None).device
            idx = on_device.get(device)
            if idx is None:
                idx = on_device[device] = index.to(device)
            return stacked_rows(vecs, idx)

        return Rows(index, value, self._row_ones)

    def _row_ones(self, layer: str, placement: str, shape: torch.Size) -> torch.Tensor:
        template = self._all_slots().get((layer, placement))
        if template is not None:
            return torch.ones_like(template, requires_grad=False)
        # a slot whose adapters were all deleted: ones where the model's tensors are
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        return torch.ones(shape, device=device)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Let these adapters' vectors (and trained copies) train, or freeze them, as PEFT's method:
        a mixed batch (``adapter_names=``) trains every adapter whose vectors require grad."""
        self._check_loaded()
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.ia3_l]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; adapters: {list(self.ia3_l)}")
        for n in names:
            for p in (*self.ia3_l[n].parameters(), *self.modules_to_save[n].parameters()):
                p.requires_grad_(requires_grad)

    def _per_row_graph(self, graph: GraphModule) -> GraphModule:
        """The per-row copy of a whole-model graph (made once per set of slots): its slot reads
        take the call's row choice, and its ``modules_to_save`` redirects the original modules."""
        info = graph.meta["ia3fx"]
        kept = info.get("per_row")
        key = tuple(info["slots"])
        if kept is not None and kept[0] == key:
            return kept[1]
        rows_graph, _ = scale_per_row(graph, LiveRows(slot_shapes(graph)), attrs=self._saved_originals(graph))
        info["per_row"] = (key, rows_graph)
        return rows_graph

    def _saved_originals(self, graph: GraphModule) -> dict[str, object]:
        """A graph's ``modules_to_save`` redirects, bound to the original modules (per-row rows
        never run a trained copy: adapters with one are refused)."""
        originals = {}
        prefix = SAVED_ROOT + "."
        for node in graph.graph.nodes:
            if node.op in ("get_attr", "call_module") and isinstance(node.target, str) and node.target.startswith(prefix):
                originals[node.target] = get_attr_path(self.model, node.target[len(prefix):])
        return originals


def slot_shapes(graph: GraphModule) -> dict[Slot, torch.Size]:
    """The vector shape of each slot a whole-model graph reads."""
    return {slot: get_attr_path(graph, slot_attr(*slot)).shape for slot in graph.meta["ia3fx"]["slots"]}

