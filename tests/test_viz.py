"""ia3fx.draw: the DOT it writes (clusters, folds, colours, legend, diff node sets) and rendered files."""

from __future__ import annotations

import re
import shutil
import time

import pytest
import torch
from conftest import MLP, tiny_gpt2, tiny_llama
from torch import nn

import ia3fx
from ia3fx.viz import COLORS, graph_diff, to_dot

HAS_DOT = shutil.which("dot") is not None
needs_dot = pytest.mark.skipif(not HAS_DOT, reason="Graphviz's dot binary is not installed")

_NODE = re.compile(r'^\s*("(?:[^"\\]|\\.)*"|[\w.]+) \[(.*)\]\s*$')
_EDGE = re.compile(r'^\s*("(?:[^"\\]|\\.)*"|[\w.]+) -> ("(?:[^"\\]|\\.)*"|[\w.]+)(?: \[.*\])?\s*$')
_ATTR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^\s\]]+)')
_SUBGRAPH = re.compile(r'^\s*subgraph ("(?:[^"\\]|\\.)*"|\w+) \{\s*$')


def _unquote(s: str) -> str:
    return s[1:-1] if s.startswith('"') else s


def parse(source: str) -> tuple[dict[str, dict[str, str]], set[tuple[str, str]], dict[str, str]]:
    """(nodes id -> attrs, edges, clusters name -> label) of a DOT source written by ia3fx."""
    nodes: dict[str, dict[str, str]] = {}
    edges: set[tuple[str, str]] = set()
    clusters: dict[str, str] = {}
    lines = source.splitlines()
    for k, line in enumerate(lines):
        if m := _SUBGRAPH.match(line):
            attrs = dict((a, _unquote(v)) for a, v in _ATTR.findall(lines[k + 1]))
            clusters[_unquote(m.group(1))] = attrs.get("label", "")
        elif m := _EDGE.match(line):
            edges.add((_unquote(m.group(1)), _unquote(m.group(2))))
        elif m := _NODE.match(line):
            name = _unquote(m.group(1))
            if name not in ("graph", "node", "edge"):
                nodes[name] = {a: _unquote(v) for a, v in _ATTR.findall(m.group(2))}
    return nodes, edges, clusters


def tagged(gm, role=None) -> set[str]:
    return {
        n.name for n in gm.graph.nodes
        if n.meta.get("ia3fx") and (role is None or n.meta["ia3fx"]["role"] == role)
    }


@pytest.fixture(scope="module")
def llama4():
    """A 4-layer Llama: enough to fold, and to split a fold around an expanded layer."""
    model = tiny_llama(num_hidden_layers=4)
    return model, ia3fx.get_ia3_model(model, ia3fx.IA3Config())


@pytest.fixture(scope="module")
def base4(llama4):
    """The same model traced without any rewrite (same inputs, so the same node names)."""
    return ia3fx.trace(llama4[0])


# --- folded view -----------------------------------------------------------------------------------
def test_folded_view_one_cluster_per_block_and_identical_layers_fold(llama4):
    _, ia3 = llama4
    nodes, edges, clusters = parse(to_dot(ia3).source)
    # one representative block, labelled with its range and the repeat count
    assert clusters["cluster_model.layers.0"].startswith("model.layers.[0-3]  × 4")
    assert "LlamaDecoderLayer" in clusters["cluster_model.layers.0"]
    assert not any(c.startswith(f"cluster_model.layers.{i}") for i in (1, 2, 3) for c in clusters)
    # module hierarchy: clusters for the model, the attention and mlp modules inside the block
    assert {"cluster_model", "cluster_model.layers.0.self_attn", "cluster_model.layers.0.mlp"} <= set(clusters)
    # only the representative's scale nodes are drawn: 3 of the 12
    gm = ia3.graph_module
    scales = tagged(gm, "scale")
    assert len(scales) == 12
    drawn = scales & set(nodes)
    assert len(drawn) == 3
    # far fewer nodes than the graph, and no node of a folded layer
    assert len(nodes) < len(gm.graph.nodes) / 3
    assert "linear_7" not in nodes and "linear" in nodes  # q_proj of layer 1 vs layer 0
    # edges only between drawn nodes; the last layer's output reaches the final norm box
    assert all(u in nodes and v in nodes for u, v in edges)


def test_scale_nodes_coloured_by_role_and_call_sites_labelled(llama4):
    _, ia3 = llama4
    nodes, _, _ = parse(to_dot(ia3).source)
    by_role = {}
    for n in ia3.graph_module.graph.nodes:
        info = n.meta.get("ia3fx")
        if info and info["role"] == "scale" and n.name in nodes:
            by_role.setdefault(info["scale"], []).append(nodes[n.name])
    assert len(by_role["output"]) == 2 and len(by_role["input"]) == 1  # k/v_proj; down_proj
    for placement, attrs_list in by_role.items():
        for attrs in attrs_list:
            assert attrs["fillcolor"] == COLORS[placement]
            assert "filled" in attrs["style"]
    assert COLORS["output"] != COLORS["input"]
    # call sites: module path (the fold's range in place of the index), shapes, vector size
    down = next(a for a in nodes.values() if a.get("label", "").startswith("model.layers.[0-3].mlp.down_proj"))
    assert "linear 128→64" in down["label"] and "IA3 vector: input (128)" in down["label"]
    assert down["color"] == COLORS["input"]
    k = next(a for a in nodes.values() if a.get("label", "").startswith("model.layers.[0-3].self_attn.k_proj"))
    assert "IA3 vector: output (32)" in k["label"] and k["color"] == COLORS["output"]
    q = next(a for a in nodes.values() if a.get("label", "").startswith("model.layers.[0-3].self_attn.q_proj"))
    assert "IA3" not in q["label"]
    vectors = [a for name, a in nodes.items() if name.startswith("ia3_l_")]
    assert vectors and all(a["shape"] == "cylinder" for a in vectors)
    assert {a["fillcolor"] for a in vectors} == {COLORS["output_vector"], COLORS["input_vector"]}


def test_legend(llama4):
    _, ia3 = llama4
    nodes, _, clusters = parse(to_dot(ia3).source)
    assert clusters["cluster_legend"] == "legend"
    legend = {k: v for k, v in nodes.items() if k.startswith("legend_")}
    assert legend["legend_out"]["fillcolor"] == COLORS["output"]
    assert legend["legend_in"]["fillcolor"] == COLORS["input"]
    assert "attention-type" in legend["legend_out"]["label"] and "feedforward" in legend["legend_in"]["label"]
    assert "× N" in legend["legend_fold"]["label"]
    assert not any(k.startswith("legend_") for k in parse(to_dot(ia3, legend=False).source)[0])


def test_expand_takes_a_block_out_of_its_fold(llama4):
    _, ia3 = llama4
    gm = ia3.graph_module
    nodes, _, clusters = parse(to_dot(ia3, expand="model.layers.1").source)
    assert clusters["cluster_model.layers.2"].startswith("model.layers.[2-3]  × 2")
    assert "×" not in clusters["cluster_model.layers.1"] and "×" not in clusters["cluster_model.layers.0"]
    layer1 = {n.name for n in gm.graph.nodes if n.meta.get("nn_module_stack")
              and list(n.meta["nn_module_stack"].values())[-1][0].startswith("model.layers.1.")}
    assert layer1 and layer1 <= set(nodes)  # every node of the expanded block, nothing collapsed
    assert "model_layers_1_self_attn_q_proj_weight" in nodes  # its weight reads too
    assert "model_layers_2_self_attn_q_proj_weight" not in nodes
    # several paths; a path inside a block pins that block
    _, _, clusters = parse(to_dot(ia3, expand=["model.layers.0.mlp", "model.layers.3"]).source)
    assert clusters["cluster_model.layers.1"].startswith("model.layers.[1-2]  × 2")
    with pytest.raises(ValueError, match="model.layer.3"):
        to_dot(ia3, expand="model.layer.3")


def test_full_view_draws_every_node(llama4):
    _, ia3 = llama4
    gm = ia3.graph_module
    nodes, edges, clusters = parse(to_dot(ia3, view="full").source)
    assert {n.name for n in gm.graph.nodes} <= set(nodes)
    assert not any("×" in label for name, label in clusters.items())
    assert {"cluster_model.layers.0", "cluster_model.layers.3"} <= set(clusters)
    n_edges = sum(len(n.users) for n in gm.graph.nodes)
    assert len([e for e in edges if not e[0].startswith("legend_")]) == n_edges


def test_blocks_that_differ_are_not_folded_together(base4):
    base = base4
    cfg = ia3fx.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
        exclude_modules=["model.layers.2.self_attn.k_proj"],
    )
    ia3 = ia3fx.get_ia3_model(base, cfg)
    _, _, clusters = parse(to_dot(ia3).source)
    assert clusters["cluster_model.layers.0"].startswith("model.layers.[0-1]  × 2")
    assert "×" not in clusters["cluster_model.layers.2"] and "×" not in clusters["cluster_model.layers.3"]


# --- diff view -------------------------------------------------------------------------------------
def test_diff_marks_exactly_the_nodes_the_rewrite_added(llama4, base4):
    _, ia3 = llama4
    gm = ia3.graph_module
    added = tagged(gm)
    assert len(added) == 24  # 4 layers x 3 sites x (vector, scale)
    diff = graph_diff(ia3)
    assert set(diff.added) == added and not diff.removed and not diff.changed
    # against a real trace of the base model: the same set added; what the capture's own cleanup
    # dropped (e.g. a causal mask sdpa no longer needs) shows as removed, never an ia3fx node
    diff = graph_diff(ia3, base=base4)
    assert set(diff.added) == added and diff.changed == []
    names = {n.name for n in gm.graph.nodes}
    assert not set(diff.removed) & (added | names)
    assert set(diff.common) | set(diff.removed) == {n.name for n in base4.graph.nodes}
    for kwargs in ({}, {"base": base4}):
        g = to_dot(ia3, view="diff", **kwargs)
        nodes, _, _ = parse(g.source)
        marked = {k for k, a in nodes.items() if a.get("label", "").startswith("+ added") and not k.startswith("legend")}
        assert marked == added & set(nodes) and len(marked) == 6  # the representative's 3 vectors + 3 scales
        assert all(nodes[k]["color"] == COLORS["added"] for k in marked)
        assert "+24 added" in g.graph_attr["label"]
        unchanged = [a for k, a in nodes.items() if k in diff.common and not a.get("label", "").startswith("+")]
        assert unchanged and all(a.get("fontcolor") == COLORS["faded"] for a in unchanged)
    with pytest.raises(ValueError, match="diff"):
        to_dot(ia3, base=base4)


def test_diff_of_the_merged_graph_shows_no_ia3_node_remains(llama4, base4):
    _, ia3 = llama4
    merged = ia3.merged_graph_module()
    assert tagged(merged) == set()
    diff = graph_diff(merged)
    assert diff.added == [] and diff.removed == []
    diff = graph_diff(merged, base=base4)  # against the base model's own trace: nothing added
    assert diff.added == [] and diff.changed == []
    diff = graph_diff(merged, base=ia3)  # against the adapted graph: exactly its ia3 nodes went away
    assert set(diff.removed) == tagged(ia3.graph_module) and diff.added == []
    g = to_dot(merged, view="diff", base=ia3)
    nodes, _, _ = parse(g.source)
    removed = {k for k, a in nodes.items() if a.get("label", "").startswith("− removed") and not k.startswith("legend")}
    assert removed and {k.removeprefix("base__") for k in removed} <= tagged(ia3.graph_module)
    assert all(nodes[k]["color"] == COLORS["removed"] and "dashed" in nodes[k]["style"] for k in removed)
    nodes, _, _ = parse(to_dot(merged, view="diff").source)
    assert not any(a.get("label", "").startswith(("+ added", "− removed")) for k, a in nodes.items()
                   if not k.startswith("legend"))


# --- other models ----------------------------------------------------------------------------------
def test_gpt2_conv1d_sites_fold_and_colour():
    ia3 = ia3fx.get_ia3_model(tiny_gpt2(), ia3fx.IA3Config())
    nodes, _, clusters = parse(to_dot(ia3).source)
    assert clusters["cluster_transformer.h.0"].startswith("transformer.h.[0-1]  × 2")
    c_proj = next(a for a in nodes.values() if a.get("label", "").startswith("transformer.h.[0-1].mlp.c_proj"))
    assert "conv1d 128→32" in c_proj["label"] and "IA3 vector: input (128)" in c_proj["label"]
    c_attn = next(a for a in nodes.values() if a.get("label", "").startswith("transformer.h.[0-1].attn.c_attn"))
    assert "IA3 vector: output (96)" in c_attn["label"]
    assert "GPT2LMHeadModel" in to_dot(ia3).graph_attr["label"]


def test_symbolic_traced_module_and_graph_module_input():
    torch.manual_seed(0)
    ia3 = ia3fx.get_ia3_model(MLP(), ia3fx.IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"]))
    nodes, _, _ = parse(ia3fx.draw(ia3.graph_module).source)  # a bare GraphModule works too
    assert sum(a.get("fillcolor") == COLORS["input"] for k, a in nodes.items() if not k.startswith("legend")) == 1
    assert sum(a.get("fillcolor") == COLORS["output"] for k, a in nodes.items() if not k.startswith("legend")) == 1
    with pytest.raises(TypeError, match="trace"):
        to_dot(MLP())


class _Block(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class _Deep(nn.Module):
    def __init__(self, n: int = 32) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block() for _ in range(n))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_32_exported_blocks_fold_to_one_quickly(tmp_path):
    cfg = ia3fx.IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"])
    ia3 = ia3fx.get_ia3_model(_Deep(), cfg, example_inputs=(torch.randn(2, 16),))
    t0 = time.perf_counter()
    g = ia3fx.draw(ia3, tmp_path / ("deep.svg" if HAS_DOT else "deep.dot"))
    took = time.perf_counter() - t0
    _, _, clusters = parse(g.source)
    assert clusters["cluster_blocks.0"].startswith("blocks.[0-31]  × 32")
    assert took < 10, f"drawing took {took:.1f} s"


# --- files -----------------------------------------------------------------------------------------
def test_dot_file_needs_no_binary(llama4, tmp_path, monkeypatch):
    _, ia3 = llama4
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    out = tmp_path / "sub" / "graph.dot"
    g = ia3fx.draw(ia3, out)
    assert out.read_text() == g.source and out.read_text().startswith("digraph")
    with pytest.raises(RuntimeError, match="dot"):
        ia3fx.draw(ia3, tmp_path / "graph.svg")
    assert not (tmp_path / "graph.svg").exists()
    with pytest.raises(ValueError, match="format"):
        ia3fx.draw(ia3, tmp_path / "graph.txt")
    with pytest.raises(ValueError, match="view"):
        ia3fx.draw(ia3, out, view="tree")


@needs_dot
def test_rendered_svg_and_png(llama4, tmp_path):
    _, ia3 = llama4
    svg, png = tmp_path / "g.svg", tmp_path / "g.png"
    ia3fx.draw(ia3, svg)
    ia3fx.draw(ia3, png, view="diff")
    text = svg.read_text()
    assert "<svg" in text and "× 4" in text and COLORS["output"] in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
