"""The whole-model graphs: traced from the base model, rewritten with the scales, and bound to the
adapter state through slots. They run the forward of models without transformers blocks (plain
modules, GraphModules, ExportedPrograms) and are what drawing, export and merged graphs use.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from .adapter_store import Slot
from .blocks import CAPTURE_LOCK, GATE
from .capture import _copy_graph, accepts, input_signature, normalize_inputs, trace
from .default_inputs import default_inputs, with_defaults_hint
from .errors import TraceError
from .passes import cleanup_graph, fold_scales, insert_scales, redirect_modules_to_save, slot_attr
from .passes._graph import SAVED_ROOT, container, set_module, set_tensor
from .passes._lazy import batched, realize
from .sites import CallSite, check_targets_scaled, find_call_sites, get_attr_path


def _rebind_tensor(owner: nn.Module, attr: str, value: torch.Tensor) -> None:
    """``set_tensor`` for an attribute that already exists, without walking the path again."""
    if isinstance(value, nn.Parameter):
        owner._buffers.pop(attr, None)
        owner._parameters[attr] = value
    else:
        owner._parameters.pop(attr, None)
        owner._buffers[attr] = value
        owner._non_persistent_buffers_set.add(attr)


def _swap_in_saved_copies(graph: GraphModule) -> None:
    """Give ``modules_to_save`` copies their originals' names in a merged graph, as
    ``merge_and_unload`` swaps the modules, so its state dict keys are the base model's. An
    original still read from outside its module (a tied weight) keeps its own name and tensor."""
    prefix = f"{SAVED_ROOT}."
    reads = {n.target for n in graph.graph.nodes if n.op == "get_attr" and not n.target.startswith(prefix)}
    for node in graph.graph.nodes:
        if node.op not in ("get_attr", "call_module") or not node.target.startswith(prefix):
            continue
        original = node.target[len(prefix):]
        if original in reads:
            continue
        if node.op == "get_attr":
            value = get_attr_path(graph, node.target)
            parent, _, name = original.rpartition(".")
            if isinstance(value, nn.Parameter):
                container(graph, parent).register_parameter(name, value)
            else:
                container(graph, parent).register_buffer(name, value)
        else:
            set_module(graph, original, graph.get_submodule(node.target))
        node.target = original
    if not any(isinstance(n.target, str) and n.target.startswith(prefix) for n in graph.graph.nodes):
        if hasattr(graph, SAVED_ROOT):
            delattr(graph, SAVED_ROOT)
    graph.graph.lint()
    graph.recompile()


_ANY = "*"  # the signature key of a graph that takes any input (symbolic_trace, a graph given)


class WholeGraphMixin:
    """Whole-model graphs: traced, rewritten, bound to the adapter state, cached per signature."""

    def _slot_value(
        self, slot: Slot, template: torch.Tensor, live: list[dict[Slot, nn.Parameter]] | None = None
    ) -> torch.Tensor:
        live = self._live_slots() if live is None else live
        vecs = [slots[slot] for slots in live if slot in slots]
        if not vecs:
            return torch.ones_like(template, requires_grad=False)
        out = vecs[0]
        for v in vecs[1:]:
            out = out * v  # several active adapters multiply, as in PEFT
        return out

    def _saved_value(self, module: str) -> nn.Module:
        if not self._disabled:
            for adapter in self._active:
                saved = self._saved_modules(adapter)
                if module in saved:
                    return saved[module]
        return self.model.get_submodule(module)

    def _bind(
        self,
        graph: GraphModule,
        only: Sequence[Slot] | None = None,
        live: list[dict[Slot, nn.Parameter]] | None = None,
        templates: dict[Slot, nn.Parameter] | None = None,
    ) -> None:
        info = graph.meta["ia3fx"]
        slots = info["slots"] if only is None else [s for s in only if s in info["slots"]]
        live = self._live_slots() if live is None else live
        templates = self._all_slots() if templates is None else templates
        owners = info.get("slot_owners")
        if owners is None or owners[0] is not graph:  # a copy of the graph finds its own owners
            owners = info["slot_owners"] = (graph, {})
        for slot in slots:
            # a slot whose adapters were all deleted keeps its node: it reads ones of its old shape
            template = templates.get(slot)
            if template is None:
                template = get_attr_path(graph, slot_attr(*slot))
            value = self._slot_value(slot, template, live)
            owner = owners[1].get(slot)
            if owner is None:
                path = slot_attr(*slot)
                set_tensor(graph, path, value)
                parent, _, attr = path.rpartition(".")
                owners[1][slot] = (graph.get_submodule(parent), attr)
            else:  # the attribute exists: rebinding is a dict assignment (switching is per call site)
                _rebind_tensor(*owner, value)
        if only is None:
            for module in info["saved"]:
                set_module(graph, f"{SAVED_ROOT}.{module}", self._saved_value(module))

    def _rebind_all(self) -> None:
        """Bind every graph's slots to what the adapter state says now. Exclusive: a forward in
        another thread sees the bindings before or after, never a slot half rebound."""
        with GATE.exclusive():
            self._rebind_all_now()

    def _rebind_all_now(self) -> None:
        # slot maps are built once per rebind, so that switching costs O(call sites), not O(n²)
        live = self._live_slots()
        counts: dict[Slot, int] = {}
        for slots in live:
            for slot in slots:
                counts[slot] = counts.get(slot, 0) + 1
        self._product_slots = [slot for slot, n in counts.items() if n > 1]
        templates = self._all_slots()
        for graph in self._flat_graphs():
            self._bind(graph, live=live, templates=templates)
        self._refresh_live()

    def _install(self, graph: GraphModule, sites: list[CallSite] | None = None) -> None:
        """Insert every adapter's slots and modules_to_save redirects, then bind the state."""
        with batched(graph):  # one lint at the end, one code generation at the first call
            cleanup_graph(graph)
            raw = sites if sites is not None else find_call_sites(graph)
            if sites is None:  # a later capture (the first one was checked with its adapter)
                check_targets_scaled(graph, raw, {layer for layer, _ in self._all_slots()})
            slots = self._all_slots()
            insert_scales(graph, raw, slots)
            saved = self._all_saved()
            redirect_modules_to_save(graph, saved)
        info = graph.meta.setdefault("ia3fx", {})
        info.update(raw_sites=raw, slots=list(slots), saved=list(saved))
        self._bind(graph)

    def _check_scaled(self, targets: Iterable[str], graph: GraphModule | None = None) -> None:
        """Before an adapter is added: every graph it will run in must have a call site for each
        of its layers (see :func:`~ia3fx.sites.check_targets_scaled`)."""
        if graph is not None:
            check_targets_scaled(graph, self._sites0, targets)
        for g in self._flat_graphs():
            check_targets_scaled(g, g.meta["ia3fx"]["raw_sites"], targets)

    def _extend_graphs(self) -> None:
        """After a new adapter: add its slots and redirects to every graph captured so far."""
        slots, saved = self._all_slots(), self._all_saved()
        if self._blocks_mode:
            self._hook_targets()
            self._dispatch_saved()
            self._forget_block_graphs()  # recaptured with the new slots at the next call
        for graph in self._flat_graphs():
            info = graph.meta["ia3fx"]
            insert_scales(graph, info["raw_sites"], {s: v for s, v in slots.items() if s not in info["slots"]})
            redirect_modules_to_save(graph, {m: c for m, c in saved.items() if m not in info["saved"]})
            info.update(slots=list(slots), saved=list(saved))
        self._rebind_all()

    def _cache_key(self, graph: GraphModule, mode: bool | None = None) -> tuple:
        info = graph.meta.get("ia3fx", {})
        if mode is None:
            mode = self.training if self._retraceable else None
        return (mode, _ANY if info.get("any_signature") else info.get("signature"))

    def _graph_for(self, args: tuple, kwargs: dict, train: bool | None = None) -> GraphModule:
        """The whole-model graph for calls like this one, in the current mode or ``train``
        (captured, from the base model, if new)."""
        if not self._retraceable:
            return self._graphs[self._graph_key][0]
        mode = self.training if train is None else train
        keys = ((mode, input_signature(args, kwargs)), (mode, _ANY))
        graph = self._cached_graph(keys, args, kwargs)
        if graph is not None:
            return graph
        # the gate before the lock, in the order block captures take them: a capture is an export,
        # and no other thread may run a model meanwhile
        with GATE.exclusive(), CAPTURE_LOCK:
            graph = self._cached_graph(keys, args, kwargs)
            if graph is None:
                graph = trace(self.model, (args, kwargs) if (args or kwargs) else None, train=mode, dynamic=self._dynamic)
                self._install(graph)
                self._graphs.setdefault(self._cache_key(graph, mode), []).append(graph)
            return graph

    def _cached_graph(self, keys: Sequence[tuple], args: tuple, kwargs: dict) -> GraphModule | None:
        for key in keys:
            for graph in self._graphs.get(key, ()):
                if accepts(graph, args, kwargs):
                    return graph
        return None

    def _flat_graphs(self) -> list[GraphModule]:
        return [g for graphs in self._graphs.values() for g in graphs]

    @property
    def graph_module(self) -> GraphModule:
        """The whole adapted model as one graph: the first one captured (for a transformers model
        with blocks, traced from the base model with the example inputs on first use)."""
        if self._graph_key is None:  # in the mode the model was adapted in, as it would have been traced
            try:
                graph = self._graph_for(*normalize_inputs(self._example_inputs_or_default()), train=self._first_mode)
            except TraceError as e:
                if self._example_inputs is not None:
                    raise
                raise with_defaults_hint(e, self.model) from e
            self._graph_key = self._cache_key(graph, self._first_mode)
        return realize(self._graphs[self._graph_key][0])

    def _example_inputs_or_default(self) -> Any:
        if self._example_inputs is not None:
            return self._example_inputs
        return default_inputs(self.model)

    @property
    def graph_modules(self) -> list[GraphModule]:
        """Every whole-model graph captured so far (one per input signature and mode)."""
        if self._graph_key is None:
            self.graph_module  # noqa: B018 - captures the first one
        return [realize(g) for g in self._flat_graphs()]

    @property
    def call_sites(self) -> list[CallSite]:
        """The call sites of :attr:`graph_module`, as the active adapter scales them."""
        return self._selections[self.active_adapter].annotate(self.graph_module.meta["ia3fx"]["raw_sites"])

    def merged_graph_module(self, example_inputs: Any = None) -> GraphModule:
        """A copy of :attr:`graph_module` with the active adapters folded in: the base graph's ops only.

        With ``example_inputs``, the copy is of the graph for inputs like these in the current
        train/eval mode (captured first if new) instead.
        """
        src = self.graph_module if example_inputs is None else self._graph_for(*normalize_inputs(example_inputs))
        graph = GraphModule(src, _copy_graph(src), type(src).__name__)
        copied = dict(graph.named_modules())
        for path, module in src.named_modules():  # the copy registers every buffer as persistent
            if module._non_persistent_buffers_set and path in copied:
                copied[path]._non_persistent_buffers_set.update(module._non_persistent_buffers_set)
        graph.meta.update({k: v for k, v in src.meta.items() if k != "ia3fx"})
        graph.meta["ia3fx"] = dict(src.meta["ia3fx"])
        for slot in graph.meta["ia3fx"]["slots"]:  # bind fresh detached values
            set_tensor(graph, slot_attr(*slot), get_attr_path(src, slot_attr(*slot)).detach().clone())
        fold_scales(graph)
        _swap_in_saved_copies(graph)
        return graph
