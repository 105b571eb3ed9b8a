"""Graph analysis: the adapted graph as a networkx ``DiGraph``, and a report of what an adapter does.

``to_networkx`` turns any captured ``GraphModule`` into a DAG whose edges run from a node to its
users, with what each node is (op, target, owning module, IA3 role, shape, dtype) as attributes,
so standard graph algorithms answer questions such as "which vector feeds this scale":
``nx.ancestors(g, "mul_tensor")``.

``report`` says what a config selects in a model and why the rest was skipped, how many vectors
and parameters each block gets, and which tied or shared weights matter for merging.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch import nn
from torch.fx import GraphModule, Node

from .config import IA3Config
from .sites import CallSite, find_call_sites
from .targeting import Target

__all__ = ["to_networkx", "report", "Report", "BlockSummary", "TiedWeights", "node_module", "module_classes"]

IA3_KEY = "ia3fx"
_NO_MODULE = "_empty_nn_module_stack"  # export's marker for nodes outside every module
_SAVED_PREFIX = "modules_to_save."
_VECTOR_PREFIX = "ia3_l."


# --- what a node is ------------------------------------------------------------------------------
def node_module(node: Node) -> str:
    """The module path a node belongs to (``""`` for the root).

    The innermost ``nn_module_stack`` entry; for a ``get_attr`` without one (export lists
    parameters at the top of the graph) the path of the module that holds the attribute.
    """
    if node.op == "call_module" and node.target == "_guards_fn":
        return ""  # export's input guards: part of no module, whatever stack they were given
    stack = node.meta.get("nn_module_stack")
    if stack:
        fqn = list(stack.values())[-1][0]
        return "" if fqn.startswith(_NO_MODULE) else fqn
    info = node.meta.get(IA3_KEY)
    if info and info.get("layer"):
        return info["layer"]
    if node.op == "get_attr":
        target = node.target
        if target.startswith(_SAVED_PREFIX):
            target = target[len(_SAVED_PREFIX):]
        return target.rpartition(".")[0]
    return ""


def _class_name(cls: Any) -> str:
    if isinstance(cls, str):
        return cls
    return f"{cls.__module__}.{cls.__qualname__}"


def module_classes(gm: GraphModule) -> dict[str, str]:
    """Module path -> class (as ``nn_module_stack`` records it), for every module the graph saw."""
    out: dict[str, str] = {}
    for node in gm.graph.nodes:
        for fqn, cls in (node.meta.get("nn_module_stack") or {}).values():
            if fqn not in out and not fqn.startswith(_NO_MODULE):
                out[fqn] = _class_name(cls)
    return out


def target_name(node: Node) -> str:
    """``aten.linear.default`` for an op, the dotted attribute path for ``get_attr``/``call_module``."""
    target = node.target
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    try:
        return torch.fx.node._get_qualified_name(target)
    except Exception:  # noqa: BLE001 - some callables have no importable name
        return getattr(target, "__name__", repr(target))


def _dim(d: Any) -> int | str:
    return int(d) if isinstance(d, int) else str(d)


def value_info(node: Node) -> tuple[Any, str | None]:
    """``(shape, dtype)`` from ``node.meta["val"]`` where it knows them, else ``(None, None)``.

    A shape is a tuple of ints, with symbolic sizes as strings (``"s70"``); a node with several
    tensor outputs gets a tuple of shapes and its first output's dtype.
    """
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    if isinstance(val, torch.Tensor) or hasattr(val, "shape") and hasattr(val, "dtype"):
        return tuple(_dim(d) for d in val.shape), str(val.dtype).removeprefix("torch.")
    if isinstance(val, (list, tuple)) and val and all(isinstance(v, torch.Tensor) for v in val):
        return tuple(tuple(_dim(d) for d in v.shape) for v in val), str(val[0].dtype).removeprefix("torch.")
    if isinstance(val, (torch.SymInt, int)) and not isinstance(val, bool):
        return (), "int"
    return None, None


def graph_of(model: Any, caller: str = "this function") -> GraphModule:
    """The graph to look at: an IA3Model's first graph, an ExportedProgram's module, or the GraphModule."""
    from .model import IA3Model

    if isinstance(model, IA3Model):
        return model.graph_module
    if isinstance(model, torch.export.ExportedProgram):
        return model.module()
    if isinstance(model, GraphModule):
        return model
    raise TypeError(
        f"{caller} takes an IA3Model, a GraphModule or an ExportedProgram, got {type(model).__name__}; "
        "trace a plain model first with ia3fx.trace(model, example_inputs)"
    )


def to_networkx(graph_module: Any) -> nx.DiGraph:
    """The graph as a ``networkx.DiGraph``: one node per FX node (keyed by its name), edges node -> users.

    Node attributes: ``op``, ``target`` (``aten.linear.default``, or the attribute path),
    ``module`` (owning module path, ``""`` for the root), ``module_type``, ``role``
    (``"vector" | "scale" | "cast"`` for ia3fx's nodes, else ``None``), ``layer`` and ``scale``
    (``"input" | "output"``) for ia3fx's nodes, ``call_site`` (the layer name when the node is a
    linear-like call site, else ``None``), ``shape`` and ``dtype`` where ``meta["val"]`` knows
    them. Accepts an ``IA3Model`` (its :attr:`~ia3fx.IA3Model.graph_module`) too.
    """
    gm = graph_of(graph_module, "to_networkx()")
    classes = module_classes(gm)
    sites = {s.node: s for s in find_call_sites(gm)}
    g = nx.DiGraph(name=type(gm).__name__)
    for node in gm.graph.nodes:
        info = node.meta.get(IA3_KEY) or {}
        module = node_module(node)
        shape, dtype = value_info(node)
        site = sites.get(node.name)
        g.add_node(
            node.name,
            op=node.op,
            target=target_name(node),
            module=module,
            module_type=classes.get(module),
            role=info.get("role"),
            layer=info.get("layer") or (site.name if site else None),
            scale=info.get("scale"),
            call_site=site.name if site else None,
            shape=shape,
            dtype=dtype,
        )
    for node in gm.graph.nodes:
        for user in node.users:
            g.add_edge(node.name, user.name)
    return g


# --- report --------------------------------------------------------------------------------------
_NUMBERED = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def block_of(layer: str) -> str:
    """``model.layers.3`` for ``model.layers.3.mlp.down_proj``; else the layer's parent (or itself)."""
    m = _NUMBERED.match(layer)
    if m:
        return m.group(1)
    parent = layer.rpartition(".")[0]
    return parent or layer


@dataclass
class BlockSummary:
    """The vectors one block (a numbered repeat such as ``model.layers.3``, or a top-level module) gets."""

    name: str
    layers: dict[str, Target]

    @property
    def vectors(self) -> int:
        return len(self.layers)

    @property
    def parameters(self) -> int:
        return sum(t.size for t in self.layers.values())

    def shape_key(self) -> tuple:
        """What two blocks must share to be listed as repeats of each other."""
        n = len(self.name) + 1
        return tuple((name[n:], t.feedforward, t.size) for name, t in self.layers.items())


@dataclass
class TiedWeights:
    """Parameter names that are one tensor, and what that means for merging."""

    names: list[str]
    shape: tuple[int, ...]
    targeted: list[str]  # adapted layers whose weight this is

    @property
    def merge_safe(self) -> bool:
        return not self.targeted

    @property
    def note(self) -> str:
        if not self.targeted:
            return "no adapted layer uses it as its weight: merging leaves it alone"
        others = [n for n in self.names if not any(n == f"{t}.weight" or n == t for t in self.targeted)]
        return (
            f"merging the vector of {', '.join(self.targeted)} would also scale {', '.join(others) or 'its alias'}: "
            "merge is refused (SharedWeightError) unless the weights are untied or that layer is excluded"
        )


@dataclass
class Report:
    """What a config does to a model: call sites, matches, skips and why, sizes, ties."""

    model: str
    model_type: str | None
    adapter: str | None
    config: IA3Config
    call_sites: list[CallSite]
    targets: dict[str, Target]
    skipped: dict[str, str]
    modules_to_save: list[str] = field(default_factory=list)
    blocks: list[BlockSummary] = field(default_factory=list)
    tied: list[TiedWeights] = field(default_factory=list)
    shared_layers: dict[str, int] = field(default_factory=dict)  # layer -> call sites, when > 1
    base_parameters: int = 0
    # adapter -> layer -> the vector's statistics (ia3fx.viz_stats.vector_stats; None on meta), for
    # every adapter of an IA3Model: what Report.plot draws. Empty for a report made from a config.
    vectors: dict[str, dict[str, dict[str, float] | None]] = field(default_factory=dict)

    def plot(self, path: str | os.PathLike | None = None, adapters: Sequence[str] | None = None) -> Any:
        """How far each adapter's vectors moved from ones, per block and site kind (mean ``|v - 1|``
        and its spread), adapters side by side; writes ``path`` (.png, .svg, .pdf) if given and returns
        the matplotlib ``Figure``. Needs matplotlib (``pip install 'ia3fx[plot]'``); see :mod:`ia3fx.viz_plot`."""
        from .viz_plot import plot_report

        return plot_report(self, path, adapters)

    @property
    def num_call_sites(self) -> int:
        return len(self.call_sites)

    @property
    def num_scaled_call_sites(self) -> int:
        return sum(s.targeted for s in self.call_sites)

    @property
    def num_vectors(self) -> int:
        return len(self.targets)

    @property
    def num_parameters(self) -> int:
        return sum(t.size for t in self.targets.values())

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready)."""
        return {
            "model": self.model,
            "model_type": self.model_type,
            "adapter": self.adapter,
            "call_sites": self.num_call_sites,
            "scaled_call_sites": self.num_scaled_call_sites,
            "vectors": self.num_vectors,
            "parameters": self.num_parameters,
            "base_parameters": self.base_parameters,
            "targets": {
                n: {"kind": t.kind, "scale": "input" if t.feedforward else "output", "size": t.size}
                for n, t in self.targets.items()
            },
            "skipped": dict(self.skipped),
            "modules_to_save": list(self.modules_to_save),
            "blocks": [{"name": b.name, "vectors": b.vectors, "parameters": b.parameters} for b in self.blocks],
            "tied": [
                {"names": t.names, "shape": list(t.shape), "targeted": t.targeted, "merge_safe": t.merge_safe}
                for t in self.tied
            ],
            "shared_layers": dict(self.shared_layers),
            **({"vectors": self.vectors} if self.vectors else {}),  # an IA3Model's adapters: their statistics
        }

    def _block_lines(self) -> list[str]:
        lines: list[str] = []
        i = 0
        while i < len(self.blocks):
            b = self.blocks[i]
            j = i + 1
            while j < len(self.blocks) and self.blocks[j].shape_key() == b.shape_key() and _next_index(
                self.blocks[j - 1].name, self.blocks[j].name
            ):
                j += 1
            n = len(b.name) + 1
            detail = ", ".join(
                f"{name[n:] or name} ({'in' if t.feedforward else 'out'} {t.size})" for name, t in b.layers.items()
            )
            if j - i > 1:
                label = f"{b.name} .. {self.blocks[j - 1].name.rpartition('.')[2]} (x{j - i}, each)"
                total = f"; together {b.parameters * (j - i):,d}"
            else:
                label, total = b.name, ""
            vectors = f"{b.vectors} vector{'s' if b.vectors != 1 else ''}"
            lines.append(f"  {label}: {vectors}, {b.parameters:,d} parameters{total}: {detail}")
            i = j
        return lines

    def text(self) -> str:
        """A plain-text rendering, for terminals and logs."""
        head = f"{self.model}" + (f" (model_type {self.model_type})" if self.model_type else "")
        lines = [f"ia3fx report: {head}" + (f", adapter {self.adapter!r}" if self.adapter else "")]
        frac = f" ({100 * self.num_parameters / self.base_parameters:.4f}% of {self.base_parameters:,d})" if self.base_parameters else ""
        lines.append(
            f"call sites: {self.num_call_sites} found, {self.num_scaled_call_sites} scaled; "
            f"layers: {len(self.targets)} matched, {len(self.skipped)} skipped"
        )
        lines.append(f"vectors: {self.num_vectors}, parameters: {self.num_parameters:,d}{frac}")
        lines.append(
            f"config: target_modules={_fmt(self.config.target_modules)}, "
            f"feedforward_modules={_fmt(self.config.feedforward_modules)}"
            + (f", exclude_modules={_fmt(self.config.exclude_modules)}" if self.config.exclude_modules else "")
        )
        lines.append("")
        lines.append("per block:")
        lines.extend(self._block_lines() or ["  (none)"])
        lines.append("")
        lines.append("skipped layers (why):")
        if self.skipped:
            by_reason: dict[str, list[str]] = {}
            for name, why in self.skipped.items():
                by_reason.setdefault(why, []).append(name)
            for why, names in by_reason.items():
                shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
                lines.append(f"  {why}: {shown}")
        else:
            lines.append("  (none)")
        if self.modules_to_save:
            lines.append("")
            lines.append(f"modules_to_save (trained in full): {', '.join(self.modules_to_save)}")
        lines.append("")
        lines.append("tied or shared weights (matter for merging):")
        if not self.tied and not self.shared_layers:
            lines.append("  (none)")
        for t in self.tied:
            lines.append(f"  tied {' = '.join(t.names)} {list(t.shape)}: {t.note}")
        for layer, n in self.shared_layers.items():
            lines.append(f"  layer {layer} is called {n} times: its {n} call sites share one vector")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()


def _fmt(value: Any) -> str:
    if isinstance(value, (set, frozenset)):
        return str(sorted(value))
    return repr(value)


def _next_index(a: str, b: str) -> bool:
    pa, _, ia = a.rpartition(".")
    pb, _, ib = b.rpartition(".")
    return pa == pb and ia.isdigit() and ib.isdigit() and int(ib) == int(ia) + 1


def _blocks(targets: dict[str, Target]) -> list[BlockSummary]:
    out: dict[str, BlockSummary] = {}
    for name, t in targets.items():
        b = block_of(name)
        out.setdefault(b, BlockSummary(b, {})).layers[name] = t
    return list(out.values())


def _tied(model: nn.Module | None, targets: dict[str, Target]) -> list[TiedWeights]:
    if model is None:
        return []
    groups: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append((name, p))
    out = []
    for entries in groups.values():
        if len(entries) < 2:
            continue
        names = [n for n, _ in entries]
        targeted = [t for t in targets if f"{t}.weight" in names or t in names]
        out.append(TiedWeights(names, tuple(entries[0][1].shape), targeted))
    return out


def _explain_skips(skipped: dict[str, str], original: IA3Config, model: nn.Module | None, cfg: IA3Config) -> dict[str, str]:
    """Sharpen "not matched": name PEFT's all-linear head exclusion where it applies."""
    if not (isinstance(original.target_modules, str) and original.target_modules.lower() == "all-linear"):
        return dict(skipped)
    from .targeting import _output_layer_names

    heads = _output_layer_names(model, cfg)
    return {
        n: ("output layer: PEFT's all-linear leaves it out" if n in heads else why) for n, why in skipped.items()
    }


def report(model: Any, config: IA3Config | None = None, example_inputs: Any = None) -> Report:
    """What ``config`` does to ``model``: call sites found, matched and skipped (and why), vectors and
    parameters per block, and the tied or shared weights that matter for merging.

    ``model`` is an :class:`~ia3fx.IA3Model` (its active adapter; or ``config`` evaluated on its
    graph, nothing changed), or an ``nn.Module`` / ``GraphModule`` / ``ExportedProgram`` with a
    config (default: PEFT's defaults for the model type), which is traced but not changed.
    """
    from .capture import trace
    from .model import IA3Model
    from .targeting import select_targets

    adapter = None
    if isinstance(model, IA3Model):
        base = model._layer_model
        graph_model = model.get_base_model()
        if config is None:
            adapter = model.active_adapter
            selection = model._selections[adapter]
            original = model.peft_config[adapter]
        else:
            selection = select_targets(config, model._sites0, model=base)
            original = config
        sites = selection.annotate(model.graph_module.meta["ia3fx"]["raw_sites"])
    else:
        original = config if config is not None else IA3Config()
        if not isinstance(original, IA3Config):
            raise TypeError(f"config must be an ia3fx.IA3Config, got {type(original).__name__}")
        retraceable = isinstance(model, nn.Module) and not isinstance(model, GraphModule)
        graph = trace(model, example_inputs, train=model.training if retraceable else None)
        raw = find_call_sites(graph)
        base = model if retraceable else None
        graph_model = model if isinstance(model, nn.Module) else graph
        selection = select_targets(original, raw, model=base)
        sites = selection.annotate(raw)
    counts: dict[str, int] = {}
    for s in sites:
        counts[s.name] = counts.get(s.name, 0) + 1
    params = {id(p): p.numel() for p in graph_model.parameters()} if isinstance(graph_model, nn.Module) else {}
    cfg_obj = getattr(graph_model, "config", None)
    return Report(
        model=type(graph_model).__name__,
        model_type=getattr(cfg_obj, "model_type", None),
        adapter=adapter,
        config=selection.config,
        call_sites=sites,
        targets=dict(selection.targets),
        skipped=_explain_skips(selection.skipped, original, base, selection.config),
        modules_to_save=list(selection.modules_to_save),
        blocks=_blocks(selection.targets),
        tied=_tied(graph_model if isinstance(graph_model, nn.Module) else None, selection.targets),
        shared_layers={n: c for n, c in counts.items() if c > 1 and n in selection.targets},
        base_parameters=sum(params.values()),
        vectors=_vector_stats(model) if isinstance(model, IA3Model) and config is None else {},
    )


def _vector_stats(model: Any) -> dict[str, dict[str, dict[str, float] | None]]:
    """Every adapter's vectors, summarised (the active one first)."""
    from .viz_stats import vector_stats

    names = [model.active_adapter] + [a for a in model.peft_config if a != model.active_adapter]
    return {a: {layer: vector_stats(model.get_vector(layer, a)) for layer in model._selections[a].targets}
            for a in names}


def scale_nodes(gm: GraphModule) -> list[Node]:
    """ia3fx's scale nodes in ``gm``, in graph order."""
    return [n for n in gm.graph.nodes if (n.meta.get(IA3_KEY) or {}).get("role") == "scale"]


def ia3_nodes(gm: GraphModule, roles: Sequence[str] = ("vector", "scale", "cast")) -> list[Node]:
    return [n for n in gm.graph.nodes if (n.meta.get(IA3_KEY) or {}).get("role") in roles]
