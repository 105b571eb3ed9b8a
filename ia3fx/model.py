"""``IA3Model``: a base model, its (IA)³ adapters, and the rewritten graphs that run them.

The vectors live once, in ``self.ia3_l[adapter]``; every captured graph (one per input signature
and train/eval mode, since dropout is baked into a trace) reads them through *slots*
(``gm.ia3_l.<layer>.<input|output>``). What a slot holds follows the adapter state: the active
adapter's parameter, the product of several active ones, or ones when adapters are disabled or
merged. So switching adapters rebinds attributes and never retraces. The base weights stay the
user's own parameter objects; merging replaces their data and keeps the originals, so unmerge is
exact.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from .capture import _copy_graph, accepts, input_signature, normalize_inputs, trace
from .config import IA3Config
from .errors import AdapterLoadError, NoMatchingModuleError
from .passes import cleanup_graph, fold_scales, insert_scales, redirect_modules_to_save, slot_attr
from .passes._graph import SAVED_ROOT, container, set_module, set_tensor
from .passes._lazy import batched, realize
from .passes.fold import SharedWeightError
from .scaling import fold_bias, fold_weight
from .sites import CallSite, find_call_sites, get_attr_path
from .targeting import Selection, Target, select_targets

__all__ = ["IA3Model", "get_ia3_model", "plan", "Plan", "PEFT_PREFIX"]

PEFT_PREFIX = "base_model.model."
_ANY = "*"
Slot = tuple[str, str]


def _key(name: str) -> str:
    """ParameterDict/ModuleDict keys cannot hold dots."""
    return name.replace(".", "__")


def _vector_dtype(weight: torch.Tensor, autocast: bool) -> torch.dtype:
    if autocast and weight.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return weight.dtype if weight.is_floating_point() else torch.float32


def _rebind_tensor(owner: nn.Module, attr: str, value: torch.Tensor) -> None:
    """``set_tensor`` for an attribute that already exists, without walking the path again."""
    if isinstance(value, nn.Parameter):
        owner._buffers.pop(attr, None)
        owner._parameters[attr] = value
    else:
        owner._parameters.pop(attr, None)
        owner._buffers[attr] = value
        owner._non_persistent_buffers_set.add(attr)


def _slot(target: Target) -> Slot:
    return (target.name, "input" if target.feedforward else "output")


class IA3Model(nn.Module):
    """A model adapted with (IA)³ by graph rewriting; PEFT's IA3 model API where it means the same.

    Call it like the base model. ``.train()``/``.eval()`` switch to the graph captured in that
    mode; a call with another set of inputs is captured once and cached.
    """

    def __init__(
        self,
        model: nn.Module | GraphModule | torch.export.ExportedProgram,
        config: IA3Config,
        adapter_name: str = "default",
        example_inputs: Any = None,
        *,
        autocast_adapter_dtype: bool = True,
        dynamic: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(config, IA3Config):
            raise TypeError(f"config must be an ia3fx.IA3Config, got {type(config).__name__}")
        retraceable = isinstance(model, nn.Module) and not isinstance(model, GraphModule)
        graph = trace(model, example_inputs, train=model.training if retraceable else None, dynamic=dynamic)
        if isinstance(model, torch.export.ExportedProgram):
            model = model.module()
        self.model = model
        if retraceable:
            self.training = model.training  # the adapted model starts in the base model's mode
        self._retraceable = retraceable
        self._dynamic = dynamic
        self._autocast = autocast_adapter_dtype
        self._graphs: dict[tuple, list[GraphModule]] = {}
        self.peft_config: dict[str, IA3Config] = {}
        self._selections: dict[str, Selection] = {}
        self.ia3_l = nn.ModuleDict()
        self.modules_to_save = nn.ModuleDict()
        self._active: list[str] = [adapter_name]
        self._disabled = False
        self._merged: list[str] = []
        self._originals: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
        self._product_slots: list[Slot] = []

        self._sites0 = find_call_sites(graph)
        selection = select_targets(config, self._sites0, model=self._layer_model)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._add_adapter_state(adapter_name, selection, graph)
        self._install(graph, self._sites0)
        self._graph_key = self._cache_key(graph)
        self._graphs[self._graph_key] = [graph]
        self._update_trainable()

    @property
    def _layer_model(self) -> nn.Module | None:
        return self.model if self._retraceable else None

    # --- adapter state -------------------------------------------------------------------------
    def _weight_of(self, name: str, graph: GraphModule | None = None) -> torch.Tensor:
        try:
            return self.model.get_submodule(name).weight
        except AttributeError:
            pass
        for path in (name, f"{name}.weight"):
            for root in (self.model, graph or self.graph_module):
                try:
                    return get_attr_path(root, path)
                except AttributeError:
                    continue
        raise KeyError(f"cannot find the weight of layer {name!r}")

    def _add_adapter_state(self, adapter: str, selection: Selection, graph: GraphModule | None = None) -> None:
        # names key ModuleDicts, so they become attributes: "half", "train", "a.b" cannot be used
        if not isinstance(adapter, str) or not adapter or "." in adapter or (
            adapter not in self.ia3_l and hasattr(self.ia3_l, adapter)
        ):
            raise ValueError(
                f"{adapter!r} cannot be an adapter name: it must be a non-empty string without '.' that is "
                "not an attribute of torch.nn.Module (such as 'half', 'float', 'train', 'to')"
            )
        cfg = selection.config
        vectors = nn.ParameterDict()
        for name, target in selection.targets.items():
            w = self._weight_of(name, graph)
            dtype = _vector_dtype(w, self._autocast)
            if cfg.init_ia3_weights:
                data = torch.ones(target.shape, dtype=dtype, device=w.device)
            else:
                data = torch.randn(target.shape, dtype=dtype, device=w.device)
            vectors[_key(name)] = nn.Parameter(data, requires_grad=False)
        saved = nn.ModuleDict()
        # a GraphModule / ExportedProgram keeps each module as a container (or leaf layer): copy that
        for module in selection.modules_to_save:
            saved[_key(module)] = copy.deepcopy(self.model.get_submodule(module))
        self.ia3_l[adapter] = vectors
        self.modules_to_save[adapter] = saved
        self.peft_config[adapter] = cfg
        self._selections[adapter] = selection

    def _slots(self, adapter: str) -> dict[Slot, nn.Parameter]:
        store = self.ia3_l[adapter]
        return {_slot(t): store[_key(name)] for name, t in self._selections[adapter].targets.items()}

    def _all_slots(self) -> dict[Slot, nn.Parameter]:
        out: dict[Slot, nn.Parameter] = {}
        for adapter in self.ia3_l:
            for slot, vec in self._slots(adapter).items():
                out.setdefault(slot, vec)
        return out

    def _saved_modules(self, adapter: str) -> dict[str, nn.Module]:
        store = self.modules_to_save[adapter]
        return {m: store[_key(m)] for m in self._selections[adapter].modules_to_save if _key(m) in store}

    def _all_saved(self) -> dict[str, nn.Module]:
        out: dict[str, nn.Module] = {}
        for adapter in self.modules_to_save:
            for m, clone in self._saved_modules(adapter).items():
                out.setdefault(m, clone)
        return out

    @property
    def targets(self) -> dict[str, Target]:
        """The active adapter's targeted layers, by name."""
        return self._selections[self.active_adapter].targets

    def get_vector(self, name: str, adapter_name: str | None = None) -> nn.Parameter:
        """The vector of layer ``name`` (in-graph shape: ``(n,)`` for linear, ``(C, 1, 1)`` for conv)."""
        return self.ia3_l[adapter_name or self.active_adapter][_key(name)]

    # --- what the graphs read ------------------------------------------------------------------
    def _live_slots(self) -> list[dict[Slot, nn.Parameter]]:
        """The slot maps of the adapters the graphs apply: active, not merged (folded), not disabled."""
        if self._disabled:
            return []
        return [self._slots(a) for a in self._active if a not in self._merged]

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
        # slot maps are built once per rebind, so that switching costs O(call sites), not O(n²)
        live = self._live_slots()
        counts: dict[Slot, int] = {}
        for slots in live:
            for slot in slots:
                counts[slot] = counts.get(slot, 0) + 1
        self._product_slots = [slot for slot, n in counts.items() if n > 1]
        templates = self._all_slots()
        for graph in self.graph_modules:
            self._bind(graph, live=live, templates=templates)

    def _install(self, graph: GraphModule, sites: list[CallSite] | None = None) -> None:
        """Insert every adapter's slots and modules_to_save redirects, then bind the state."""
        with batched(graph):  # one lint at the end, one code generation at the first call
            cleanup_graph(graph)
            raw = sites if sites is not None else find_call_sites(graph)
            slots = self._all_slots()
            insert_scales(graph, raw, slots)
            saved = self._all_saved()
            redirect_modules_to_save(graph, saved)
        info = graph.meta.setdefault("ia3fx", {})
        info.update(raw_sites=raw, slots=list(slots), saved=list(saved))
        self._bind(graph)

    def _extend_graphs(self) -> None:
        """After a new adapter: add its slots and redirects to every graph captured so far."""
        slots, saved = self._all_slots(), self._all_saved()
        for graph in self.graph_modules:
            info = graph.meta["ia3fx"]
            insert_scales(graph, info["raw_sites"], {s: v for s, v in slots.items() if s not in info["slots"]})
            redirect_modules_to_save(graph, {m: c for m, c in saved.items() if m not in info["saved"]})
            info.update(slots=list(slots), saved=list(saved))
        self._rebind_all()

    def _update_trainable(self) -> None:
        for adapter in self.ia3_l:
            on = adapter in self._active and not self._disabled and not self.peft_config[adapter].inference_mode
            for p in self.ia3_l[adapter].parameters():
                p.requires_grad_(on)
            for p in self.modules_to_save[adapter].parameters():
                p.requires_grad_(on)

    # --- graphs --------------------------------------------------------------------------------
    def _cache_key(self, graph: GraphModule) -> tuple:
        info = graph.meta.get("ia3fx", {})
        mode = self.training if self._retraceable else None
        return (mode, _ANY if info.get("any_signature") else info.get("signature"))

    def _graph_for(self, args: tuple, kwargs: dict) -> GraphModule:
        if not self._retraceable:
            return self._graphs[self._graph_key][0]
        mode = self.training
        for key in ((mode, input_signature(args, kwargs)), (mode, _ANY)):
            for graph in self._graphs.get(key, ()):
                if accepts(graph, args, kwargs):
                    return graph
        graph = trace(self.model, (args, kwargs) if (args or kwargs) else None, train=mode, dynamic=self._dynamic)
        self._install(graph)
        self._graphs.setdefault(self._cache_key(graph), []).append(graph)
        return graph

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        graph = self._graph_for(args, kwargs)
        if self._product_slots:  # a fresh product each call, so gradients reach every adapter
            self._bind(graph, self._product_slots)
        return graph(*args, **kwargs)

    @property
    def graph_module(self) -> GraphModule:
        """The first captured graph, rewritten (the one ``get_ia3_model`` traced)."""
        return realize(self._graphs[self._graph_key][0])

    @property
    def graph_modules(self) -> list[GraphModule]:
        """Every graph captured so far (one per input signature and mode)."""
        return [realize(g) for graphs in self._graphs.values() for g in graphs]

    @property
    def call_sites(self) -> list[CallSite]:
        """The call sites of :attr:`graph_module`, as the active adapter scales them."""
        return self._selections[self.active_adapter].annotate(self.graph_module.meta["ia3fx"]["raw_sites"])

    def _apply(self, fn: Callable, recurse: bool = True) -> IA3Model:  # type: ignore[override]
        # graphs are not submodules (their names would shadow the model's), but hold buffers
        super()._apply(fn, recurse)
        for graph in self.graph_modules:
            graph._apply(fn, recurse)
        for param, original in list(self._originals.values()):
            self._originals[id(param)] = (param, fn(original))
        self._rebind_all()
        return self

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Refused: the base model's ``generate`` would run without the adapter.

        Generation needs a KV cache, which the captured graphs do not have. Merge the adapter and
        generate with the merged model instead.
        """
        raise NotImplementedError(
            "IA3Model.generate would silently run the base model without the adapter. Use "
            "model.merge_and_unload().generate(...) (or merge_adapter() and then "
            "model.get_base_model().generate(...), unmerge_adapter() after)."
        )

    def get_base_model(self) -> nn.Module:
        return self.model

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # --- several adapters ----------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str:
        return self._active[0] if self._active else next(iter(self.ia3_l))

    def add_adapter(self, adapter_name: str, config: IA3Config) -> None:
        """Add an adapter, inactive and frozen as in PEFT; existing graphs gain its slots."""
        if not isinstance(config, IA3Config):
            raise ValueError(f"add_adapter takes an ia3fx.IA3Config (peft_type IA3), got {type(config).__name__}")
        if adapter_name in self.ia3_l:
            raise ValueError(f"an adapter named {adapter_name!r} already exists; delete it first or pick another name")
        selection = select_targets(config, self._sites0, model=self._layer_model)
        self._add_adapter_state(adapter_name, selection)
        self._extend_graphs()
        self._update_trainable()

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Make these adapters active (several multiply); the others are frozen."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.ia3_l]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; adapters: {list(self.ia3_l)}")
        owners: dict[str, str] = {}
        for n in names:
            for m in self._saved_modules(n):
                if m in owners:
                    raise ValueError(
                        f"adapters {owners[m]!r} and {n!r} both train a copy of {m!r} (modules_to_save); "
                        "only one of them can be active at a time"
                    )
                owners[m] = n
        if self._merged:
            warnings.warn("Adapters were merged; unmerging them before switching.", stacklevel=2)
            self.unmerge_adapter()
        self._active = names
        self._update_trainable()
        self._rebind_all()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.ia3_l:
            raise ValueError(f"no adapter named {adapter_name!r}; adapters: {list(self.ia3_l)}")
        if adapter_name in self._merged:
            raise ValueError(f"adapter {adapter_name!r} is merged; call unmerge_adapter() before deleting it")
        del self.ia3_l[adapter_name]
        del self.modules_to_save[adapter_name]
        del self.peft_config[adapter_name]
        del self._selections[adapter_name]
        self._active = [a for a in self._active if a != adapter_name]
        if not self._active and len(self.ia3_l):
            self._active = [next(iter(self.ia3_l))]
        self._update_trainable()
        self._rebind_all()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside, outputs equal the base model's; on exit every state is as it was (merged too)."""
        was_disabled = self._disabled
        # requires_grad of every adapter tensor comes back exactly as it was (a vector the user froze
        # by hand stays frozen), where PEFT re-derives it from the active adapters on exit
        grads = [(p, p.requires_grad) for p in (*self.ia3_l.parameters(), *self.modules_to_save.parameters())]
        swapped = self._swap_originals() if self._merged else []
        self._disabled = True
        self._update_trainable()
        self._rebind_all()
        try:
            yield
        finally:
            for param, data in swapped:  # the merged weights come back, unless unmerged in the block
                kept = self._originals.get(id(param))
                if kept is not None and param.data.data_ptr() == kept[1].data_ptr():
                    param.data = data
            self._disabled = was_disabled
            for param, flag in grads:
                param.requires_grad_(flag)
            self._rebind_all()

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str) -> None:
        """A new adapter whose vectors are ``Σ wᵢ·lᵢ`` (PEFT's math: a missing layer counts as 0)."""
        if adapter_name in self.ia3_l:
            raise ValueError(f"an adapter named {adapter_name!r} already exists (PEFT would silently do nothing)")
        if len(adapters) != len(weights) or not adapters:
            raise ValueError("add_weighted_adapter needs as many weights as adapters, at least one")
        unknown = [a for a in adapters if a not in self.ia3_l]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; adapters: {list(self.ia3_l)}")
        saved = [m for a in adapters for m in self._selections[a].modules_to_save]
        if len(saved) != len(set(saved)):
            raise ValueError(
                "Cannot add weighted adapters targeting the same module with modules_to_save: "
                f"{sorted(m for m in set(saved) if saved.count(m) > 1)}"
            )
        targets: dict[str, Target] = {}
        for a in adapters:
            for name, t in self._selections[a].targets.items():
                if name in targets and targets[name].feedforward != t.feedforward:
                    raise ValueError(
                        f"layer {name!r} scales its input in one adapter and its output in another; "
                        "their vectors cannot be summed"
                    )
                targets.setdefault(name, t)
        cfg = self._combined_config([self.peft_config[a] for a in adapters])
        # as PEFT: the new adapter trains its own copies of the first adapter's modules_to_save,
        # made from the original modules (so that its files hold them and reload)
        selection = Selection(cfg, targets, {}, list(self._selections[adapters[0]].modules_to_save))
        self._add_adapter_state(adapter_name, selection)
        with torch.no_grad():
            for name in targets:
                total = self.ia3_l[adapter_name][_key(name)]
                total.zero_()
                for a, w in zip(adapters, weights, strict=True):
                    if _key(name) in self.ia3_l[a]:
                        total.add_(self.ia3_l[a][_key(name)].to(total.dtype), alpha=w)
        self._extend_graphs()
        self._update_trainable()

    @staticmethod
    def _combined_config(configs: list[IA3Config]) -> IA3Config:
        cfg = configs[0].copy()
        for field_name in ("target_modules", "feedforward_modules"):
            values = [getattr(c, field_name) for c in configs]
            if all(isinstance(v, str) for v in values):
                setattr(cfg, field_name, "|".join(f"({v})" for v in values))
            elif all(isinstance(v, (set, list)) for v in values):
                setattr(cfg, field_name, set().union(*values))
            else:
                raise ValueError(f"all adapters must give {field_name} as regex strings, or all as lists")
        return cfg

    # --- merging -------------------------------------------------------------------------------
    def _layer_params(self, target: Target) -> tuple[str, nn.Parameter, str | None, nn.Parameter | None]:
        name = target.name
        try:
            module = self.model.get_submodule(name)
            if isinstance(getattr(module, "weight", None), nn.Parameter):
                bias = module.bias if isinstance(getattr(module, "bias", None), nn.Parameter) else None
                return f"{name}.weight", module.weight, (f"{name}.bias" if bias is not None else None), bias
        except AttributeError:
            pass
        for path in (name, f"{name}.weight"):
            try:
                return path, self.model.get_parameter(path), None, None
            except AttributeError:
                continue
        raise KeyError(f"cannot find the weight of layer {name!r}")

    def _check_unshared(self, target: Target, path: str, param: nn.Parameter) -> None:
        aliases = [n for n, p in self.model.named_parameters(remove_duplicate=False) if p is param and n != path]
        if aliases:
            raise SharedWeightError(
                f"cannot merge the vector of {target.name!r}: its weight {path!r} is the same tensor as "
                f"{aliases[0]!r} (tied weights), which would be scaled too. Exclude {target.name!r}, or "
                "untie the weights (clone one of them) before merging."
            )

    def _merge_plan(self, names: Sequence[str], safe_merge: bool) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """Every new weight and bias tensor, computed before anything is assigned."""
        new: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
        for adapter in names:
            store = self.ia3_l[adapter]
            for name, target in self._selections[adapter].targets.items():
                w_path, weight, _, bias = self._layer_params(target)
                self._check_unshared(target, w_path, weight)
                vec = store[_key(name)].detach()
                w_now = new.get(id(weight), (weight, weight.detach()))[1]
                w_new = fold_weight(w_now, vec, target.kind, target.feedforward, target.groups)
                if safe_merge and not torch.isfinite(w_new).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
                new[id(weight)] = (weight, w_new)
                if bias is not None and not target.feedforward:
                    b_now = new.get(id(bias), (bias, bias.detach()))[1]
                    b_new = fold_bias(b_now, vec, target.kind, False, weight.dtype)
                    if safe_merge and not torch.isfinite(b_new).all():
                        raise ValueError(f"NaNs detected in the merged bias. The adapter {adapter} seems to be broken")
                    new[id(bias)] = (bias, b_new)
        return list(new.values())

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base weights in place; the originals are kept for an exact unmerge.

        All new weights are computed (and, with ``safe_merge``, checked for NaN/inf) before any is
        assigned: a failure leaves every weight as it was.
        """
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names must be a list of names, not the string {adapter_names!r}")
        names = list(adapter_names) if adapter_names is not None else list(self._active)
        unknown = [n for n in names if n not in self.ia3_l]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; adapters: {list(self.ia3_l)}")
        names = [n for n in names if n not in self._merged]
        if not names:
            warnings.warn("All adapters are already merged, nothing to do.", stacklevel=2)
            return
        if self._disabled and self._merged:
            # inside the block the weights are the originals, set aside from the merged ones that
            # come back on exit: a merge here could not be kept without losing the earlier one
            raise ValueError(
                f"cannot merge {names} inside disable_adapter() while {self._merged} are merged: merge "
                "them after the block, or unmerge_adapter() first"
            )
        updates = self._merge_plan(names, safe_merge)
        with torch.no_grad():
            for param, data in updates:
                self._originals.setdefault(id(param), (param, param.data))
                param.data = data
        self._merged.extend(names)
        self._rebind_all()

    def _swap_originals(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        swapped = []
        for param, original in self._originals.values():
            swapped.append((param, param.data))
            param.data = original
        return swapped

    def unmerge_adapter(self) -> None:
        """Put the original weights back, bit for bit (no division, unlike PEFT)."""
        if not self._merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self._swap_originals()
        self._originals.clear()
        self._merged.clear()
        self._rebind_all()

    @property
    def merged_adapters(self) -> list[str]:
        return list(self._merged)

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Sequence[str] | None = None
    ) -> nn.Module:
        """Merge, then return the user's model class with merged weights and trained head copies."""
        if not self._retraceable:
            raise ValueError("merge_and_unload needs the original nn.Module; for a graph use merged_graph_module()")
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        for module, clone in self._saved_modules(self.active_adapter).items():
            parent, _, child = module.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, child, clone)
        self._originals.clear()
        return self.model

    def unload(self) -> nn.Module:
        """Return the base model as it was: unmerged, original modules."""
        if self._merged:
            self.unmerge_adapter()
        return self.model

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

    # --- PEFT's counting -----------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` over ``named_parameters()``, as PEFT counts them."""
        trainable = total = 0
        for _, param in self.named_parameters():
            total += param.numel()
            if param.requires_grad:
                trainable += param.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        t, a = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}")

    # --- state dicts in PEFT's layout ----------------------------------------------------------
    def _expected_state(self, adapter: str) -> dict[str, tuple[torch.Tensor, tuple[int, ...]]]:
        selection = self._selections[adapter]
        out: dict[str, tuple[torch.Tensor, tuple[int, ...]]] = {}
        store = self.ia3_l[adapter]
        for name, target in selection.targets.items():
            out[f"{PEFT_PREFIX}{name}.ia3_l"] = (store[_key(name)], target.peft_shape)
        for module, clone in self._saved_modules(adapter).items():
            for k, t in clone.state_dict(keep_vars=True).items():
                out[f"{PEFT_PREFIX}{module}.{k}"] = (t, tuple(t.shape))
        return out

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors keyed and shaped as in PEFT's ``adapter_model.safetensors``."""
        adapter = adapter_name or self.active_adapter
        return {
            k: t.detach().reshape(shape).clone()
            for k, (t, shape) in self._expected_state(adapter).items()
        }

    def _expected_shapes(self, selection: Selection) -> dict[str, tuple[int, ...]]:
        """The keys and shapes of an adapter's PEFT state dict, from its selection alone."""
        out = {f"{PEFT_PREFIX}{name}.ia3_l": t.peft_shape for name, t in selection.targets.items()}
        for module in selection.modules_to_save:
            for k, t in self.model.get_submodule(module).state_dict().items():
                out[f"{PEFT_PREFIX}{module}.{k}"] = tuple(t.shape)
        return out

    @staticmethod
    def _fit_state_dict(
        expected: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, torch.Tensor], adapter: str
    ) -> dict[str, torch.Tensor]:
        """``state_dict`` keyed as ``expected`` (PEFT's in-memory suffixes accepted), or an error
        listing every missing, unexpected and mis-shaped tensor."""
        given: dict[str, torch.Tensor] = {}
        for k, v in state_dict.items():
            for suffix in (f".ia3_l.{adapter}", ".ia3_l.default"):
                if k.endswith(suffix):
                    k = k[: -len(suffix)] + ".ia3_l"
                    break
            for segment in (f".modules_to_save.{adapter}.", ".modules_to_save.default."):
                k = k.replace(segment, ".")
            if not isinstance(v, torch.Tensor):
                raise AdapterLoadError(f"state dict entry {k!r} is a {type(v).__name__}, not a tensor. Nothing was loaded.")
            given[k] = v
        missing = sorted(set(expected) - set(given))
        unexpected = sorted(set(given) - set(expected))
        bad = [
            f"{k}: got {tuple(given[k].shape)}, expected {expected[k]}"
            for k in sorted(set(given) & set(expected))
            if tuple(given[k].shape) != tuple(expected[k])
        ]
        problems = []
        if missing:
            problems.append(f"missing keys {missing[:10]}" + (" ..." if len(missing) > 10 else ""))
        if unexpected:
            problems.append(f"unexpected keys {unexpected[:10]}" + (" ..." if len(unexpected) > 10 else ""))
        if bad:
            problems.append(f"mis-shaped tensors {bad[:10]}" + (" ..." if len(bad) > 10 else ""))
        if problems:
            hint = ""
            if unexpected and not any(k.startswith(PEFT_PREFIX) for k in given):
                hint = f" (keys must start with {PEFT_PREFIX!r}, as in PEFT's adapter files)"
            raise AdapterLoadError(
                f"state dict does not fit adapter {adapter!r}: " + "; ".join(problems) + hint
                + ". Nothing was loaded."
            )
        return given

    def load_adapter_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], adapter_name: str | None = None
    ) -> None:
        """Set the adapter from a PEFT-layout state dict; all-or-nothing, with a precise error."""
        adapter = adapter_name or self.active_adapter
        if adapter not in self.ia3_l:
            raise AdapterLoadError(f"no adapter named {adapter!r}; adapters: {list(self.ia3_l)}")
        expected = self._expected_state(adapter)
        given = self._fit_state_dict({k: shape for k, (_, shape) in expected.items()}, state_dict, adapter)
        with torch.no_grad():
            for k, (t, _) in expected.items():
                t.copy_(given[k].reshape(t.shape))
        if self._product_slots:
            self._rebind_all()

    def _config_to_save(self, adapter: str) -> IA3Config:
        """The adapter's config as PEFT can reload it, selecting the same layers (see ``io.config_for_peft``)."""
        from .io import config_for_peft

        selection = self._selections[adapter]

        def reselect(cfg: IA3Config) -> tuple[dict[str, bool], list[str]] | None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    again = select_targets(cfg, self._sites0, model=self._layer_model)
            except ValueError:
                return None
            return {n: t.feedforward for n, t in again.targets.items()}, list(again.modules_to_save)

        config = config_for_peft(selection.config, selection.targets, list(selection.modules_to_save), reselect)
        config.inference_mode = True  # PEFT always saves true
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(self.model, "name_or_path", None) or None
        if config.task_type is None and self._retraceable:  # PEFT's hint for AutoPeftModel
            cls = type(self.model)
            config.auto_mapping = {"base_model_class": cls.__name__, "parent_library": cls.__module__}
        return config

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        adapter_name: str | None = None,
        *,
        selected_adapters: Sequence[str] | None = None,
    ) -> None:
        """Write adapters as PEFT does: ``adapter_config.json`` + ``adapter_model.safetensors``.

        Like PEFT's ``save_pretrained``, every adapter by default, or ``selected_adapters``, or the
        one ``adapter_name``. ``default`` goes into ``save_directory``, any other adapter into
        ``save_directory/<name>/``. Each adapter's files are replaced atomically.
        """
        from .io import adapter_directory, save_adapter_files

        if adapter_name is not None and selected_adapters is not None:
            raise ValueError("pass adapter_name or selected_adapters, not both")
        if adapter_name is not None:
            names = [adapter_name]
        elif selected_adapters is not None:
            names = [selected_adapters] if isinstance(selected_adapters, str) else list(selected_adapters)
        else:
            names = list(self.ia3_l)
        unknown = [n for n in names if n not in self.ia3_l]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; adapters: {list(self.ia3_l)}")
        for adapter in names:
            save_adapter_files(
                adapter_directory(save_directory, adapter), self._config_to_save(adapter), self.adapter_state_dict(adapter)
            )

    @staticmethod
    def _config_for_loading(config: IA3Config, is_trainable: bool) -> tuple[IA3Config, bool]:
        config.inference_mode = not is_trainable
        init = config.init_ia3_weights
        config.init_ia3_weights = True  # the vectors are read from the file, not drawn (no RNG use)
        return config, init

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module | GraphModule | torch.export.ExportedProgram,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        example_inputs: Any = None,
        *,
        autocast_adapter_dtype: bool = True,
        dynamic: bool = True,
    ) -> IA3Model:
        """Adapt ``model`` with the PEFT IA3 adapter saved in directory ``model_id``.

        Reads what PEFT writes (safetensors, or ``adapter_model.bin`` through
        ``torch.load(weights_only=True)``), including configs PEFT cannot reload itself (``all-linear``
        with a feedforward list). A problem with the files or a mismatch with the model raises
        :class:`~ia3fx.AdapterLoadError` and leaves ``model`` as it was. ``.eval()`` unless
        ``is_trainable``, as PEFT. ``dynamic`` as in :func:`get_ia3_model`.
        """
        from .io import read_adapter_files

        config, tensors = read_adapter_files(model_id)
        config, init = cls._config_for_loading(config, is_trainable)
        params = list(model.parameters()) if isinstance(model, nn.Module) else []
        flags = [p.requires_grad for p in params]
        modes = [(m, m.training) for m in model.modules()] if isinstance(model, nn.Module) else []
        try:
            if not is_trainable and modes:
                model.eval()  # as PEFT (below); first, so that the graph captured is the eval one
            try:
                adapted = cls(
                    model, config, adapter_name, example_inputs, autocast_adapter_dtype=autocast_adapter_dtype, dynamic=dynamic
                )
                adapted.load_adapter_state_dict(tensors, adapter_name)
            except (AdapterLoadError, NoMatchingModuleError) as e:
                raise AdapterLoadError(f"cannot load the adapter in {os.fspath(model_id)}: {e}") from e
        except BaseException:
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)
            for m, mode in modes:
                m.training = mode
            raise
        adapted.peft_config[adapter_name].init_ia3_weights = init
        if not is_trainable:
            adapted.eval()
        return adapted

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False) -> None:
        """Add the PEFT IA3 adapter saved in directory ``model_id`` as ``adapter_name`` (inactive).

        Everything is checked (files, config, every tensor's key and shape) before the model is
        touched: on any error nothing was added. ``.eval()`` unless ``is_trainable``, as PEFT.
        Unlike PEFT, an existing ``adapter_name`` is an error rather than a reload into it.
        """
        from .io import read_adapter_files

        if adapter_name in self.ia3_l:
            raise ValueError(
                f"an adapter named {adapter_name!r} already exists; delete_adapter() it first, or load its "
                "tensors with load_adapter_state_dict()"
            )
        config, tensors = read_adapter_files(model_id)
        config, init = self._config_for_loading(config, is_trainable)
        where = os.fspath(model_id)
        try:
            selection = select_targets(config, self._sites0, model=self._layer_model)
            self._fit_state_dict(self._expected_shapes(selection), tensors, adapter_name)
        except (AdapterLoadError, NoMatchingModuleError) as e:
            raise AdapterLoadError(f"cannot load the adapter in {where}: {e}") from e
        try:
            self.add_adapter(adapter_name, config)
            self.load_adapter_state_dict(tensors, adapter_name)
        except BaseException:
            if adapter_name in self.ia3_l:
                self.delete_adapter(adapter_name)
            raise
        self.peft_config[adapter_name].init_ia3_weights = init
        if not is_trainable:
            self.eval()

    def __repr__(self) -> str:
        n = sum(1 for s in self.call_sites if s.targeted)
        return (
            f"IA3Model(adapters={list(self.ia3_l)}, active={self._active}, layers={len(self.targets)}, "
            f"scaled call sites={n}, merged={self._merged}, model={type(self.model).__name__})"
        )


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


def get_ia3_model(
    model: nn.Module | GraphModule | torch.export.ExportedProgram,
    config: IA3Config,
    example_inputs: Any = None,
    adapter_name: str = "default",
    *,
    autocast_adapter_dtype: bool = True,
    dynamic: bool = True,
) -> IA3Model:
    """Trace ``model``, pick its call sites with PEFT's rules, and insert the (IA)³ scales.

    Base parameters are frozen; only the vectors (and ``modules_to_save`` copies) train.
    ``dynamic=False`` traces with the example's sizes fixed, 2-3x faster on large models; a call
    with other sizes is then traced again (once per shape), so use it when shapes do not vary.
    """
    return IA3Model(
        model, config, adapter_name, example_inputs, autocast_adapter_dtype=autocast_adapter_dtype, dynamic=dynamic
    )


@dataclass
class Plan:
    """A dry run: what a config would scale, and how, without rewriting anything."""

    config: IA3Config
    call_sites: list[CallSite]
    targets: dict[str, Target]
    skipped: dict[str, str]
    modules_to_save: list[str]

    @property
    def num_vectors(self) -> int:
        return len(self.targets)

    @property
    def num_parameters(self) -> int:
        return sum(t.size for t in self.targets.values())

    def table(self) -> str:
        rows = [("layer", "kind", "scale", "size", "calls")]
        calls: dict[str, int] = {}
        for s in self.call_sites:
            calls[s.name] = calls.get(s.name, 0) + 1
        for name, t in self.targets.items():
            rows.append((name, t.kind, "input" if t.feedforward else "output", str(t.size), str(calls.get(name, 0))))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(
            f"{self.num_vectors} vectors, {self.num_parameters:,d} parameters; "
            f"{sum(1 for s in self.call_sites if s.targeted)} of {len(self.call_sites)} call sites scaled"
        )
        if self.modules_to_save:
            lines.append(f"modules_to_save (trained in full): {', '.join(self.modules_to_save)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def plan(model: nn.Module | GraphModule | torch.export.ExportedProgram, config: IA3Config, example_inputs: Any = None) -> Plan:
    """Which call sites ``config`` would scale in ``model`` and how; the model is not changed.

    The trace fixes the example's sizes (``dynamic=False``): which layers a config scales does not
    depend on them, and a static trace is 2-3x faster.
    """
    retraceable = isinstance(model, nn.Module) and not isinstance(model, GraphModule)
    graph = trace(model, example_inputs, train=model.training if retraceable else None, dynamic=False)
    sites = find_call_sites(graph)
    selection = select_targets(config, sites, model=model if retraceable else None)
    return Plan(selection.config, selection.annotate(sites), selection.targets, selection.skipped, selection.modules_to_save)
