"""``IA3Model``: a base model, its (IA)³ vectors, and the rewritten graphs that run them.

The vectors live once, in ``self.ia3_l``; every captured graph (one per input signature and
train/eval mode, since dropout is baked into a trace) reads the same parameters, and the base
weights stay the user's own parameter objects. Nothing here edits the user's modules: graphs get
fresh containers, and ``modules_to_save`` copies are separate modules.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from .capture import accepts, input_signature, trace
from .config import IA3Config
from .errors import AdapterLoadError
from .passes import insert_scales, redirect_modules_to_save
from .sites import CallSite, find_call_sites, get_attr_path
from .targeting import Selection, Target, select_targets

__all__ = ["IA3Model", "get_ia3_model", "plan", "Plan", "PEFT_PREFIX"]

PEFT_PREFIX = "base_model.model."
_ANY = "*"


def _key(name: str) -> str:
    """ParameterDict/ModuleDict keys cannot hold dots."""
    return name.replace(".", "__")


def _vector_dtype(weight: torch.Tensor, autocast: bool) -> torch.dtype:
    if autocast and weight.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return weight.dtype if weight.is_floating_point() else torch.float32


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
    ) -> None:
        super().__init__()
        if not isinstance(config, IA3Config):
            raise TypeError(f"config must be an ia3fx.IA3Config, got {type(config).__name__}")
        retraceable = isinstance(model, nn.Module) and not isinstance(model, GraphModule)
        graph = trace(model, example_inputs, train=model.training if retraceable else None)
        if isinstance(model, torch.export.ExportedProgram):
            model = model.module()
        self.model = model
        if retraceable:
            self.training = model.training  # the adapted model starts in the base model's mode
        self._retraceable = retraceable
        self._autocast = autocast_adapter_dtype
        self._graphs: dict[tuple, list[GraphModule]] = {}
        self.peft_config: dict[str, IA3Config] = {}
        self._selections: dict[str, Selection] = {}
        self.ia3_l = nn.ModuleDict()
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter = adapter_name

        sites = find_call_sites(graph)
        selection = select_targets(config, sites, model=model if retraceable else None)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._add_vectors(adapter_name, selection, graph)
        self._install(graph, sites)
        self._graph_key = self._cache_key(graph)
        self._graphs[self._graph_key] = [graph]

    # --- vectors -------------------------------------------------------------------------------
    def _weight_of(self, name: str, graph: GraphModule | None = None) -> torch.Tensor:
        try:
            return self.model.get_submodule(name).weight
        except AttributeError:
            pass
        for path in (name, f"{name}.weight"):
            for root in (self.model, graph):
                if root is None:
                    continue
                try:
                    return get_attr_path(root, path)
                except AttributeError:
                    continue
        raise KeyError(f"cannot find the weight of layer {name!r}")

    def _add_vectors(self, adapter: str, selection: Selection, graph: GraphModule | None) -> None:
        cfg = selection.config
        vectors = nn.ParameterDict()
        for name, target in selection.targets.items():
            w = self._weight_of(name, graph)
            dtype = _vector_dtype(w, self._autocast)
            if cfg.init_ia3_weights:
                data = torch.ones(target.shape, dtype=dtype, device=w.device)
            else:
                data = torch.randn(target.shape, dtype=dtype, device=w.device)
            vectors[_key(name)] = nn.Parameter(data, requires_grad=not cfg.inference_mode)
        saved = nn.ModuleDict()
        for module in selection.modules_to_save:
            if not self._retraceable:
                break
            clone = copy.deepcopy(self.model.get_submodule(module))
            for p in clone.parameters():
                p.requires_grad_(not cfg.inference_mode)
            saved[_key(module)] = clone
        self.ia3_l[adapter] = vectors
        self.modules_to_save[adapter] = saved
        self.peft_config[adapter] = cfg
        self._selections[adapter] = selection

    @property
    def targets(self) -> dict[str, Target]:
        """The active adapter's targeted layers, by name."""
        return self._selections[self.active_adapter].targets

    def get_vector(self, name: str, adapter_name: str | None = None) -> nn.Parameter:
        """The vector of layer ``name`` (in-graph shape: ``(n,)`` for linear, ``(C, 1, 1)`` for conv)."""
        adapter = adapter_name or self.active_adapter
        return self.ia3_l[adapter][_key(name)]

    def _vectors(self, adapter: str) -> dict[str, torch.Tensor]:
        store = self.ia3_l[adapter]
        return {name: store[_key(name)] for name in self._selections[adapter].targets}

    def _saved_modules(self, adapter: str) -> dict[str, nn.Module]:
        store = self.modules_to_save[adapter]
        return {m: store[_key(m)] for m in self._selections[adapter].modules_to_save if _key(m) in store}

    # --- graphs --------------------------------------------------------------------------------
    def _install(self, graph: GraphModule, sites: list[CallSite] | None = None) -> list[CallSite]:
        adapter = self.active_adapter
        sites = self._selections[adapter].annotate(sites if sites is not None else find_call_sites(graph))
        insert_scales(graph, sites, self._vectors(adapter))
        redirect_modules_to_save(graph, self._saved_modules(adapter))
        graph.meta.setdefault("ia3fx", {})["call_sites"] = sites
        return sites

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
        graph = trace(self.model, (args, kwargs) if (args or kwargs) else None, train=mode)
        self._install(graph)
        self._graphs.setdefault(self._cache_key(graph), []).append(graph)
        return graph

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._graph_for(args, kwargs)(*args, **kwargs)

    @property
    def graph_module(self) -> GraphModule:
        """The first captured graph, rewritten (the one ``get_ia3_model`` traced)."""
        return self._graphs[self._graph_key][0]

    @property
    def graph_modules(self) -> list[GraphModule]:
        """Every graph captured so far (one per input signature and mode)."""
        return [g for graphs in self._graphs.values() for g in graphs]

    @property
    def call_sites(self) -> list[CallSite]:
        """The call sites of :attr:`graph_module`, each saying whether and how it is scaled."""
        return list(self.graph_module.meta["ia3fx"]["call_sites"])

    def _apply(self, fn: Callable, recurse: bool = True) -> IA3Model:  # type: ignore[override]
        # graphs are not submodules (their names would shadow the model's), but hold buffers
        super()._apply(fn, recurse)
        for graph in self.graph_modules:
            graph._apply(fn, recurse)
        return self

    def get_base_model(self) -> nn.Module:
        return self.model

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

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

    def load_adapter_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], adapter_name: str | None = None
    ) -> None:
        """Set the adapter from a PEFT-layout state dict; all-or-nothing, with a precise error."""
        adapter = adapter_name or self.active_adapter
        if adapter not in self.ia3_l:
            raise AdapterLoadError(f"no adapter named {adapter!r}; adapters: {list(self.ia3_l)}")
        expected = self._expected_state(adapter)
        given: dict[str, torch.Tensor] = {}
        for k, v in state_dict.items():
            for suffix in (f".ia3_l.{adapter}", ".ia3_l.default"):
                if k.endswith(suffix):
                    k = k[: -len(suffix)] + ".ia3_l"
                    break
            given[k] = v
        missing = sorted(set(expected) - set(given))
        unexpected = sorted(set(given) - set(expected))
        bad = [
            f"{k}: got {tuple(given[k].shape)}, expected {expected[k][1]}"
            for k in sorted(set(given) & set(expected))
            if tuple(given[k].shape) != expected[k][1]
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
        with torch.no_grad():
            for k, (t, _) in expected.items():
                t.copy_(given[k].reshape(t.shape))

    def save_pretrained(self, save_directory: str, adapter_name: str | None = None) -> None:
        """Write the adapter as PEFT does (``adapter_config.json``, ``adapter_model.safetensors``)."""
        from .io import save_adapter_files

        adapter = adapter_name or self.active_adapter
        config = self.peft_config[adapter].copy()
        config.inference_mode = True  # PEFT always saves true
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(self.model, "name_or_path", None) or None
        save_adapter_files(save_directory, config, self.adapter_state_dict(adapter))

    def __repr__(self) -> str:
        n = sum(1 for s in self.call_sites if s.targeted)
        return (
            f"IA3Model(adapter={self.active_adapter!r}, layers={len(self.targets)}, "
            f"scaled call sites={n}, model={type(self.model).__name__})"
        )


def get_ia3_model(
    model: nn.Module | GraphModule | torch.export.ExportedProgram,
    config: IA3Config,
    example_inputs: Any = None,
    adapter_name: str = "default",
    *,
    autocast_adapter_dtype: bool = True,
) -> IA3Model:
    """Trace ``model``, pick its call sites with PEFT's rules, and insert the (IA)³ scales.

    Base parameters are frozen; only the vectors (and ``modules_to_save`` copies) train.
    """
    return IA3Model(
        model, config, adapter_name, example_inputs, autocast_adapter_dtype=autocast_adapter_dtype
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
    """Which call sites ``config`` would scale in ``model`` and how; the model is not changed."""
    retraceable = isinstance(model, nn.Module) and not isinstance(model, GraphModule)
    graph = trace(model, example_inputs, train=model.training if retraceable else None)
    sites = find_call_sites(graph)
    selection = select_targets(config, sites, model=model if retraceable else None)
    return Plan(selection.config, selection.annotate(sites), selection.targets, selection.skipped, selection.modules_to_save)

