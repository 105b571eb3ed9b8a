"""``IA3Model``: a base model and its (IA)³ adapters, composed from parts with one job each.

| part | file |
|---|---|
| the adapters: vectors, configs, active/disabled, PEFT's adapter API | ``adapter_store.py`` |
| block graphs installed in a transformers model (how it runs) | ``block_install.py``, ``blocks.py`` |
| whole-model graphs (plain modules' forward; drawing, export, merged graphs) | ``whole_graph.py`` |
| merge and exact unmerge | ``merging.py`` |
| PEFT-layout state dicts and adapter files | ``adapter_files.py`` |

A transformers model with ``_no_split_modules`` blocks is adapted in place: it keeps its class,
forward and modules, and each block holding an adapted layer runs a captured, rewritten graph of
itself (``blocks.py``). Anything else runs one whole-model graph. The vectors live once, in
``self.ia3_l[adapter]``; the base weights stay the user's own parameter objects.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from .adapter_files import AdapterFilesMixin
from .adapter_store import PEFT_PREFIX, AdapterStoreMixin, Slot, check_adapter_name
from .block_install import BlockInstallMixin
from .blocks import (
    GATE,
    BlockGraph,
    BlockRunner,
    ScaleHooks,
    find_blocks,
)
from .capture import is_transformers_model, trace
from .config import IA3Config
from .merging import MergeMixin
from .mixed import choosing
from .mixed_batch import MixedBatchMixin
from .sites import CallSite, check_targets_scaled, find_call_sites
from .targeting import Selection, Target, select_targets
from .whole_graph import WholeGraphMixin

__all__ = ["IA3Model", "get_ia3_model", "plan", "Plan", "PEFT_PREFIX"]



class IA3Model(
    AdapterStoreMixin, WholeGraphMixin, BlockInstallMixin, MergeMixin, MixedBatchMixin, AdapterFilesMixin, nn.Module
):
    """A model adapted with (IA)³ by graph rewriting; PEFT's IA3 model API where it means the same.

    Call it like the base model. ``.train()``/``.eval()`` switch to the graph captured in that
    mode; a call with another set of inputs is captured once and cached. ``adapter_names=[...]``
    (one adapter name per row, ``"__base__"`` for none) runs each row with its own adapter.
    """

    def __new__(cls, model: Any = None, *args: Any, **kwargs: Any) -> IA3Model:
        # an adapted transformers model is an instance of its model's class too (see ``typed_class``)
        if cls is IA3Model and is_transformers_model(model):
            cls = typed_class(type(model))
        return super().__new__(cls)

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
        nn.Module.__init__(self)  # not super(): a typed class's next base is the model's own class
        if not isinstance(config, IA3Config):
            raise TypeError(f"config must be an ia3fx.IA3Config, got {type(config).__name__}")
        check_adapter_name(adapter_name)  # before anything of the model is touched
        retraceable = isinstance(model, nn.Module) and not isinstance(model, GraphModule)
        selection = None
        blocks: dict[str, nn.Module] = {}
        if retraceable and is_transformers_model(model):
            selection = select_targets(config, [], model=model)
            blocks = find_blocks(model, set(selection.targets))
        graph = None
        if not blocks:
            graph = trace(model, example_inputs, train=model.training if retraceable else None, dynamic=dynamic)
        if isinstance(model, torch.export.ExportedProgram):
            model = model.module()
        self.model = model
        self._example_inputs = example_inputs
        self._first_mode = model.training if retraceable else None
        self._blocks_mode = bool(blocks)
        self._runners: dict[str, BlockRunner] = {}
        self._block_cache: dict[tuple, list[BlockGraph]] = {}
        self._failed_groups: dict[Any, str] = {}
        self._scale_hooks = ScaleHooks(self._live_value)
        self._hooked: set[Slot] = set()
        self._live: dict[Slot, list[tuple[str, str]]] = {}  # (adapter, vector key) per slot
        self._live_blocks: set[str] = set()
        self._ones: dict[Slot, torch.Tensor] = {}
        self._dispatched: list[nn.Module] = []
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
        self._kept: set[tuple[str, str]] = set()  # (adapter, layer) merged, quantized, kept as a multiply
        self.merge_report = None  # what the last merge into a quantized base folded, kept (quantized_merge)
        self._product_slots: list[Slot] = []
        self._unloaded_by: str | None = None  # merge_and_unload / unload: the model was handed back

        if graph is None:
            self._sites0: list[CallSite] = []
        else:
            self._sites0 = find_call_sites(graph)
            selection = select_targets(config, self._sites0, model=self._layer_model)
        self._add_adapter_state(adapter_name, selection, graph)  # validates before anything changes
        if graph is not None:
            self._install(graph, self._sites0)
            self._graph_key = self._cache_key(graph)
            self._graphs[self._graph_key] = [graph]
        for p in self.model.parameters():  # the first change to the user's model
            p.requires_grad_(False)
        if graph is None:
            self._graph_key = None
            self._install_blocks(blocks)
            self._dispatch_saved()
        self._update_trainable()
        self._refresh_live()
        if self._blocks_mode and any(getattr(m, "gradient_checkpointing", False) for m in blocks.values()):
            self._inputs_require_grads()  # checkpointing was enabled before adapting

    @property
    def _layer_model(self) -> nn.Module | None:
        return self.model if self._retraceable else None

    # --- adapter state -------------------------------------------------------------------------
    # --- what the graphs read ------------------------------------------------------------------
    # --- graphs --------------------------------------------------------------------------------
    def _check_loaded(self) -> None:
        """After ``merge_and_unload()`` / ``unload()`` the model belongs to the caller again: a
        forward here would scale a merged model twice, an unmerge would find nothing to restore."""
        if self._unloaded_by is not None:
            raise RuntimeError(
                f"this IA3Model was unloaded by {self._unloaded_by}(): use the model it returned; to adapt it "
                "again, call ia3fx.get_ia3_model on that model"
            )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        names = kwargs.pop("adapter_names", None)
        if names is not None:  # one adapter per row (mixed.py): the same paths, reading the row choice
            with GATE.running():
                rows = self._row_choice(names, args, kwargs)
                with choosing(rows):
                    return self._forward(args, kwargs, per_row=True)
        return self._forward(args, kwargs)

    def _forward(self, args: tuple, kwargs: dict, per_row: bool = False) -> Any:
        # no other thread's capture, merge or rebinding runs during the call (see blocks._Gate);
        # the unload check is inside, so that a call waiting for an unload sees it
        if self._blocks_mode:
            # in training nothing reads a KV cache, and a cache sends every block down the eager path
            if self.training and "use_cache" not in kwargs and self._takes("use_cache"):
                kwargs["use_cache"] = False
            with GATE.running():
                self._check_loaded()
                return self.model(*args, **kwargs)
        with GATE.running():
            self._check_loaded()
            graph = self._graph_for(args, kwargs)
            if per_row:
                return self._per_row_graph(graph)(*args, **kwargs)
            if self._product_slots:  # a fresh product each call, so gradients reach every adapter
                self._bind(graph, self._product_slots)
            return graph(*args, **kwargs)

    def _takes(self, name: str) -> bool:
        try:
            params = inspect.signature(self.model.forward).parameters
        except (TypeError, ValueError):
            return False
        return name in params

    # --- block graphs --------------------------------------------------------------------------
    @property
    def base_model(self) -> nn.Module:
        """The base model's backbone (transformers' ``base_model``), adapted in place like PEFT's."""
        return getattr(self.model, "base_model", self.model)

    def _apply(self, fn: Callable, recurse: bool = True) -> IA3Model:  # type: ignore[override]
        # graphs are not submodules (their names would shadow the model's), but hold buffers
        nn.Module._apply(self, fn, recurse)
        for graph in self._flat_graphs():
            graph._apply(fn, recurse)
        for graphs in self._block_cache.values():
            for block_graph in graphs:
                block_graph.gm._apply(fn, recurse)
        for param, original in list(self._originals.values()):
            self._originals[id(param)] = (param, fn(original))
        self._rebind_all()
        return self

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's ``generate`` with the adapter applied.

        With a KV cache the blocks run their own forward and the adapted layers are scaled by hooks,
        exactly as PEFT computes them. A graph captured from an ``nn.Module`` without transformers
        blocks, a GraphModule or an ExportedProgram has no cache: there it is refused.
        ``adapter_names=[...]`` gives each prompt (row) its own adapter, beams and returned
        sequences included.
        """
        names = kwargs.pop("adapter_names", None)
        if self._blocks_mode:
            with GATE.running():
                self._check_loaded()
                if names is None:
                    return self.model.generate(*args, **kwargs)
                rows = self._row_choice(names, args, kwargs)
                with choosing(rows):
                    return self.model.generate(*args, **kwargs)
        self._check_loaded()
        raise NotImplementedError(
            "IA3Model.generate would silently run the base model without the adapter. Use "
            "model.merge_and_unload().generate(...) (or merge_adapter() and then "
            "model.get_base_model().generate(...), unmerge_adapter() after)."
        )

    def get_base_model(self) -> nn.Module:
        """The base model, adapted in place (its blocks run the adapted graphs), as PEFT's."""
        return self.model

    def _get_name(self) -> str:
        return "IA3Model"

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # --- several adapters ----------------------------------------------------------------------
    # --- merging -------------------------------------------------------------------------------
    # --- PEFT's counting -----------------------------------------------------------------------
    # --- state dicts in PEFT's layout ----------------------------------------------------------
    def __repr__(self) -> str:
        return (  # cheap: no trace (call sites are in ``ia3.call_sites``)
            f"IA3Model(adapters={list(self.ia3_l)}, active={self._active}, layers={len(self.targets)}, "
            f"merged={self._merged}, model={type(self.model).__name__})"
        )


@functools.cache
def typed_class(base: type) -> type:
    """``IA3Model`` that is also a ``base`` (a transformers model class), as tools expect.

    transformers' Trainer saves only what it recognises as a model (``PreTrainedModel``, or PEFT's
    class), finds ``label_names`` in the *class's* ``forward`` signature, and keeps the dataset
    columns that ``forward`` names. An instance of this class passes those checks: ``IA3Model``'s
    methods come first in its MRO (``save_pretrained`` writes adapter files), ``forward`` carries
    the base class's signature, and attributes the wrapper lacks resolve on the base model.
    """
    original = base.forward

    @functools.wraps(original)
    def forward(self: IA3Model, *args: Any, **kwargs: Any) -> Any:
        return IA3Model.forward(self, *args, **kwargs)

    namespace = {"forward": forward, "__module__": __name__, "__doc__": IA3Model.__doc__}
    return type(f"IA3Model[{base.__name__}]", (IA3Model, base), namespace)


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
    check_targets_scaled(graph, sites, selection.targets)
    return Plan(selection.config, selection.annotate(sites), selection.targets, selection.skipped, selection.modules_to_save)
