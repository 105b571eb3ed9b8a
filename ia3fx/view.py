"""Open the adapted graph in the viewers people browse models with: Model Explorer and Netron.

``ia3fx.view(model)`` writes the adapted graph as Model Explorer's graph JSON (every FX node, grouped
by module path, so Model Explorer's own hierarchy collapses a 7B graph into its layers) with node-data
overlays: the role of each of ia3fx's nodes and call sites, and per scale node its vector's mean,
min, max and mean ``|v - 1|``. ``base=True`` adds the base graph (the adapted one without ia3fx's
nodes) for a side-by-side view. Then it starts Model Explorer (the optional extra ``ia3fx[view]``,
``ai-edge-model-explorer``) on those files, unless ``browser=False``: then it only writes them and
says how to open them.

The graph JSON is written here rather than by Model Explorer's PyTorch adapter: that adapter
(0.1.34) rejects the dynamic-shape programs ia3fx captures (``Unsupported output type: <class
'torch.SymInt'>``). :func:`view_netron` opens an exported ``.onnx`` in Netron (same extra), whose
scale nodes :mod:`ia3fx.onnx_names` named ``ia3/<layer>/<input|output>``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any

from torch.fx import GraphModule, Node

from .analysis import IA3_KEY, graph_of, node_module, value_info
from .sites import find_call_sites
from .viz import COLORS, _model_name, _opname, _write_file
from .viz_stats import graph_vectors, vector_stats

__all__ = ["view", "view_netron", "write_model_explorer_files", "open_model_explorer", "ViewFiles", "OVERLAYS",
           "OVERLAY_NAMES"]

# overlay file suffix -> the statistic it shows (the role overlay holds strings)
OVERLAYS = {"role": None, "mean": "mean", "min": "min", "max": "max", "abs-dev": "mean_abs_dev"}
# the name Model Explorer shows for each overlay (its default, the file name, is cut to "LlamaForCausal...")
OVERLAY_NAMES = {"role": "ia3fx role", "mean": "vector mean", "min": "vector min", "max": "vector max",
                 "abs-dev": "mean |v-1|"}
_ROLE = {"output": "attention-type scale (output)", "input": "feedforward scale (input)"}


@dataclass
class ViewFiles:
    """What :func:`write_model_explorer_files` wrote: the graph JSON files and the overlay files."""

    directory: str
    graphs: list[str]
    overlays: dict[str, str] = field(default_factory=dict)

    def how_to_open(self) -> str:
        return (
            f"Model Explorer files in {self.directory}: open them with `python -m ia3fx.view {self.directory}` "
            "(pip install 'ia3fx[view]'; it starts Model Explorer with the graphs and overlays loaded), or in a "
            "running Model Explorer 'Select from your computer' the graph .json files, then 'Add per-node data' "
            f"for the overlays ({', '.join(os.path.basename(p) for p in self.overlays.values())})"
        )

    @classmethod
    def find(cls, directory: str | os.PathLike) -> ViewFiles:
        """The files :func:`write_model_explorer_files` wrote to ``directory``."""
        directory = os.fspath(directory)
        names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
        graphs = [os.path.join(directory, n) for n in names if n.endswith((".adapted.json", ".base.json"))]
        graphs.sort(key=lambda p: not p.endswith(".adapted.json"))
        found = {m.group(1): os.path.join(directory, n) for n in names
                 if (m := re.search(r"\.overlay-([\w-]+)\.json$", n))}
        order = list(OVERLAYS)  # as written: role first, then the statistics
        overlays = dict(sorted(found.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
        if not graphs:
            raise FileNotFoundError(f"{directory!r} holds no Model Explorer graph written by ia3fx (*.adapted.json): "
                                    "write one with ia3fx view MODEL --no-browser --out DIR")
        return cls(directory, graphs, overlays)


def _namespace(module: str) -> str:
    return "/".join(module.split(".")) if module else ""


def _shape_text(node: Node) -> str:
    shape, dtype = value_info(node)
    if shape is None:
        return ""
    dims = ",".join(str(d) for d in shape) if isinstance(shape, tuple) else str(shape)
    return f"{dtype or ''}[{dims}]"


def _graph_json(gm: GraphModule, graph_id: str, keep_ia3: bool) -> dict[str, Any]:
    """One Model Explorer graph: a node per FX node (without ia3fx's nodes unless ``keep_ia3``)."""
    sites = {s.node: s for s in find_call_sites(gm)}
    dropped: dict[str, str] = {}  # an ia3fx node left out -> the node whose value it passes on
    nodes = []
    for node in gm.graph.nodes:
        info = node.meta.get(IA3_KEY) or {}
        if info and not keep_ia3:
            data = [a for a in node.all_input_nodes if not (a.meta.get(IA3_KEY) or {}).get("role") == "vector"]
            dropped[node.name] = data[0].name if data else ""
            continue
        attrs = [{"key": "target", "value": str(node.target)}, {"key": "op", "value": node.op}]
        label = _opname(node)
        style = None
        if info:
            attrs += [{"key": "ia3fx.role", "value": info.get("role", "")},
                      {"key": "ia3fx.layer", "value": info.get("layer", "")},
                      {"key": "ia3fx.placement", "value": info.get("scale", "")}]
            if info.get("role") == "scale":
                label = f"ia3 scale ({info.get('scale')})"
                color = COLORS.get(info.get("scale"), "#888888")
                style = {"backgroundColor": COLORS.get(f"{info.get('scale')}_vector", "#ffffff"),
                         "borderColor": color, "hoveredBorderColor": color}
            elif info.get("role") == "vector":
                label = "ia3_l vector"
        elif node.name in sites:
            s = sites[node.name]
            attrs.append({"key": "call_site", "value": f"{s.name}: {s.kind} {s.in_features}->{s.out_features}"})
        inputs = []
        for i, a in enumerate(node.all_input_nodes):
            src = a.name
            while src in dropped:
                src = dropped[src]
            if src:
                inputs.append({"sourceNodeId": src, "sourceNodeOutputId": "0", "targetNodeInputId": str(i)})
        shape = _shape_text(node)
        entry: dict[str, Any] = {
            "id": node.name, "label": label, "namespace": _namespace(node_module(node)), "attrs": attrs,
            "incomingEdges": inputs,
            "outputsMetadata": [{"id": "0", "attrs": [{"key": "tensor_shape", "value": shape}]}] if shape else [],
        }
        if style:
            entry["style"] = style
        nodes.append(entry)
    return {"id": graph_id, "nodes": nodes}


def _overlays(gm: GraphModule, graph_id: str) -> dict[str, dict[str, Any]]:
    """Model Explorer node data per overlay: ``{graph id: {"results": {node: {"value": v}}}}``, the JSON
    its ``ModelNodeData.to_json_string`` writes (the ``graphsData`` field is not a key in the file: under
    it, Model Explorer finds no graph and shows nothing)."""
    stats = {key: vector_stats(t) for key, t in graph_vectors(gm).items()}
    sites = {s.node for s in find_call_sites(gm)}
    results: dict[str, dict[str, Any]] = {name: {} for name in OVERLAYS}
    for node in gm.graph.nodes:
        info = node.meta.get(IA3_KEY) or {}
        role = info.get("role")
        if role == "scale":
            results["role"][node.name] = {"value": _ROLE.get(info.get("scale"), "scale")}
            s = stats.get((info.get("layer"), info.get("scale")))
            for name, key in OVERLAYS.items():
                if key is not None and s is not None:
                    results[name][node.name] = {"value": round(s[key], 6)}
        elif role in ("vector", "cast"):
            results["role"][node.name] = {"value": f"ia3 {role} ({info.get('scale')})"}
        elif node.name in sites:
            results["role"][node.name] = {"value": "call site"}
    gradient = [{"stop": 0, "bgColor": "#ffffff"}, {"stop": 1, "bgColor": COLORS["output"]}]
    return {
        name: {graph_id: {"results": r, **({"gradient": gradient} if OVERLAYS[name] else {})}}
        for name, r in results.items()
    }


def write_model_explorer_files(model_or_graph: Any, directory: str | os.PathLike, *, base: bool = False) -> ViewFiles:
    """Write ``<name>.adapted.json`` (and ``<name>.base.json`` with ``base``) and one overlay file per
    statistic (``<name>.overlay-role.json``, ``-mean``, ``-min``, ``-max``, ``-abs-dev``) to ``directory``."""
    gm = graph_of(model_or_graph, "view()")
    name = _model_name(model_or_graph, gm)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    adapted_id = f"{name} (adapted)"
    files = ViewFiles(directory, [])
    todo = [("adapted", adapted_id, True)] + ([("base", f"{name} (base)", False)] if base else [])
    for suffix, graph_id, keep in todo:
        path = os.path.join(directory, f"{name}.{suffix}.json")
        collection = {"label": graph_id, "graphs": [_graph_json(gm, graph_id, keep)]}
        _write_file(path, json.dumps(collection).encode("utf-8"))
        files.graphs.append(path)
    for overlay, data in _overlays(gm, adapted_id).items():
        path = os.path.join(directory, f"{name}.overlay-{overlay}.json")
        _write_file(path, json.dumps(data).encode("utf-8"))
        files.overlays[overlay] = path
    return files


def _extra(module: str, what: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{what} is an optional extra: pip install 'ia3fx[view]' (or pip install {what.split()[0].lower()}); "
            "browser=False (--no-browser) writes the files without it"
        ) from e


def view(model_or_graph: Any, directory: str | os.PathLike | None = None, *, base: bool = False,
         browser: bool = True, port: int = 8080) -> ViewFiles:
    """Write the Model Explorer files (to ``directory``, or a new temporary one) and, with ``browser``,
    open Model Explorer on them (it serves until interrupted). Returns what was written."""
    if browser:
        me = _extra("model_explorer", "ai-edge-model-explorer (Model Explorer)")  # before any work
    files = write_model_explorer_files(model_or_graph, directory or tempfile.mkdtemp(prefix="ia3fx-view-"),
                                       base=base)
    if browser:
        open_model_explorer(files, port=port, module=me)
    return files


def open_model_explorer(files: ViewFiles, *, port: int = 8080, module: Any = None) -> None:
    """Start Model Explorer on written files, graphs and overlays loaded (serves until interrupted)."""
    me = module or _extra("model_explorer", "ai-edge-model-explorer (Model Explorer)")
    config = me.config()
    names, panes = [], []
    for path in files.graphs:
        # a .json path would go to Model Explorer's TF.js adapter: the graphs are handed over as
        # already converted, the way its own add_model_from_pytorch does (graphs://<name>/<index>)
        with open(path, encoding="utf-8") as f:
            collection = json.load(f)
        names.append(re.sub(r"[^0-9A-Za-z_.-]+", "_", collection["label"]).strip("_"))
        config.graphs_list.append(json.dumps({"graphs": collection["graphs"]}))
        config.model_sources.append({"url": f"graphs://{names[-1]}/{len(config.graphs_list) - 1}"})
        # the pane that shows it (a graphs:// model's collection label is the name in its address)
        panes.append({"deepestExpandedGroupNodeIds": [], "selectedNodeId": "",
                      "selectedGraphId": collection["graphs"][0]["id"], "selectedCollectionLabel": names[-1],
                      "widthFraction": 1 / len(files.graphs), "selected": not panes})
    for overlay, path in files.overlays.items():
        with open(path, encoding="utf-8") as f:
            config.add_node_data(OVERLAY_NAMES.get(overlay, overlay), f.read(), model_name=names[0])
    if len(panes) == 2:  # adapted and base: side by side
        _open_in_panes(config, panes)
    me.visualize_from_config(config, port=port)


def _open_in_panes(config: Any, panes: list[dict[str, Any]]) -> None:
    """Add Model Explorer's UI state (``uiState.paneStates``: which graph each pane shows) to the page
    address the config makes; its Python API has no setting for it, its page reads it from the address."""
    from urllib.parse import quote, unquote

    plain = config.to_url_param_value

    def with_panes() -> str:
        data = json.loads(unquote(plain()))
        data["uiState"] = {"paneStates": panes}
        return quote(json.dumps(data))

    config.to_url_param_value = with_panes


def view_netron(path: str | os.PathLike, *, browser: bool = True, port: int = 8081) -> str:
    """Open an exported ``.onnx`` in Netron (its scale nodes named ``ia3/<layer>/<input|output>``); with
    ``browser=False``, return how to open it instead."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r}: no such file; export one with ia3fx export MODEL --format onnx --unmerged")
    how = (f"open it with `netron {path}` (pip install 'ia3fx[view]'), or drop the file on a Netron window; "
           "the adapter's nodes are named ia3/<layer>/<input|output>")
    if not browser:
        return how
    netron = _extra("netron", "netron (Netron)")
    netron.start(path, address=("localhost", port), browse=True)
    netron.wait()  # serves until interrupted
    return how


if __name__ == "__main__":  # python -m ia3fx.view DIR [PORT]: Model Explorer on files written before
    import sys

    open_model_explorer(ViewFiles.find(sys.argv[1]), port=int(sys.argv[2]) if len(sys.argv) > 2 else 8080)
