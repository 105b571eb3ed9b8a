"""Name the adapter's nodes in an exported ONNX model, so Netron (and any ONNX tool) shows them.

``torch.onnx.export`` names nodes after their op (``node_mul_61``); nothing says which multiply
is an (IA)³ scale. After an ``ia3fx.export(..., "onnx", merged=False)`` each scale multiply is
renamed ``ia3/<layer>/<input|output>`` (``/1``, ``/2``... for a layer called more than once) and
carries metadata (``ia3fx.role = scale``, ``ia3fx.layer``, ``ia3fx.placement``); a cast of the
vector on its way there is ``ia3/<layer>/<placement>/cast``. The vectors are initializers already
named by the export (``ia3_l.<layer>.<placement>``, or ``ia3.<layer>.<placement>`` in a program
for generation; ``swap-adapter`` finds them by those names, so they are not renamed); each gets a
``doc_string`` saying what it is. A merged export holds no scale nodes: nothing is renamed.

Which layer a multiply scales is read from what the exporter recorded on it (the FX node it came
from, ``%p_ia3_l_<layer>_<placement>``, and its module scopes), not only from the initializer it
reads: the ONNX optimiser merges equal initializers, so the vectors of a fresh adapter (all ones,
same size) become one, read by several layers' multiplies.
"""

from __future__ import annotations

import ast
import os
import re
from typing import Any

__all__ = ["name_adapter_nodes", "name_adapter_nodes_in", "adapter_nodes", "VECTOR_NAME"]

# ia3_l.<layer>.<placement> (plain export) or ia3.<layer>.<placement> (export for generation)
VECTOR_NAME = re.compile(r"^(?:ia3_l|ia3)\.(?P<layer>.+)\.(?P<placement>input|output)$")
_PASS_THROUGH = {"Cast", "CastLike", "Identity", "Reshape", "Unsqueeze", "Expand"}
# the exporter's record of the FX node: "... args = (%linear, %p_ia3_l_model_layers_0_k_proj_output) ..."
_FX_VECTOR = re.compile(r"%(?:p_|b_|c_)?(?:ia3_l|ia3)_(?P<flat>\w+?)_(?P<placement>input|output)\b")
ROLE_KEY, LAYER_KEY, PLACEMENT_KEY = "ia3fx.role", "ia3fx.layer", "ia3fx.placement"


def _set_meta(node: Any, values: dict[str, str]) -> None:
    kept = [p for p in node.metadata_props if p.key not in values]
    del node.metadata_props[:]
    node.metadata_props.extend(kept)
    for key, value in values.items():
        entry = node.metadata_props.add()
        entry.key, entry.value = key, value


def name_adapter_nodes_in(model: Any) -> int:
    """Rename the scale multiplies of ``model`` (an ``onnx.ModelProto``, changed in place); return how many."""
    graph = model.graph
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    taken = {n.name for n in graph.node}
    renamed = 0

    def unique(base: str) -> str:
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}/{k}"
        taken.add(name)
        return name

    scales: dict[int, tuple[Any, str, str]] = {}  # id(node) -> (node, layer, placement)
    for init in graph.initializer:
        m = VECTOR_NAME.match(init.name)
        if not m:
            continue
        layer, placement = m.group("layer"), m.group("placement")
        scale = "attention-type: output" if placement == "output" else "feedforward: input"
        init.doc_string = f"ia3fx: the (IA)3 vector of {layer} ({scale} scaled)"
        frontier, seen = [init.name], set()
        while frontier:  # the vector's value, through casts and reshapes, to the multiplies that use it
            value = frontier.pop()
            for node in consumers.get(value, ()):
                if id(node) in seen:
                    continue
                seen.add(id(node))
                if node.op_type == "Mul":
                    scales[id(node)] = (node, *_recorded(node, layer, placement))
                elif node.op_type in _PASS_THROUGH:
                    taken.discard(node.name)
                    node.name = unique(f"ia3/{layer}/{placement}/{node.op_type.lower()}")
                    _set_meta(node, {ROLE_KEY: "vector_" + node.op_type.lower(), LAYER_KEY: layer,
                                     PLACEMENT_KEY: placement})
                    frontier.extend(node.output)
    for node, layer, placement in scales.values():
        taken.discard(node.name)
        node.name = unique(f"ia3/{layer}/{placement}")
        _set_meta(node, {ROLE_KEY: "scale", LAYER_KEY: layer, PLACEMENT_KEY: placement})
        renamed += 1
    return renamed


def _recorded(node: Any, layer: str, placement: str) -> tuple[str, str]:
    """The layer and placement the exporter recorded for this multiply; else those of the vector it reads."""
    meta = {p.key: p.value for p in node.metadata_props}
    m = _FX_VECTOR.search(meta.get("pkg.torch.onnx.fx_node", ""))
    if not m:
        return layer, placement
    try:
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
    except (ValueError, SyntaxError):
        scopes = []
    flat = m.group("flat")
    for scope in reversed(scopes if isinstance(scopes, list) else []):
        if isinstance(scope, str) and scope.replace(".", "_") == flat:
            return scope, m.group("placement")
    return layer, placement


def name_adapter_nodes(path: str | os.PathLike) -> int:
    """Rename the scale multiplies of the ONNX file at ``path`` in place; return how many were named.

    Only the graph's description is rewritten: weights stored as external data stay where they are.
    """
    import onnx

    path = os.fspath(path)
    model = onnx.load(path, load_external_data=False)
    count = name_adapter_nodes_in(model)
    if count:
        onnx.save(model, path)
    return count


def adapter_nodes(model: Any) -> dict[str, dict[str, str]]:
    """``node name -> {role, layer, placement}`` for the nodes :func:`name_adapter_nodes_in` named."""
    out = {}
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        if ROLE_KEY in meta:
            out[node.name] = {"role": meta[ROLE_KEY], "layer": meta[LAYER_KEY], "placement": meta[PLACEMENT_KEY]}
    return out
