"""ia3fx.view / ia3fx view: Model Explorer graph JSON and overlays that match the vectors; Netron for ONNX."""

from __future__ import annotations

import json
import sys
from urllib.parse import unquote

import pytest
from conftest import move_vectors

import ia3fx
from ia3fx.cli import main
from ia3fx.presets import build_preset
from ia3fx.view import (
    OVERLAY_NAMES,
    OVERLAYS,
    ViewFiles,
    open_model_explorer,
    view,
    view_netron,
    write_model_explorer_files,
)
from ia3fx.viz_stats import vector_stats


@pytest.fixture(scope="module")
def adapted():
    return move_vectors(ia3fx.get_ia3_model(build_preset("tiny-llama"), ia3fx.IA3Config()), 0.25, seed=1)


@pytest.fixture(scope="module")
def files(adapted, tmp_path_factory):
    return write_model_explorer_files(adapted, tmp_path_factory.mktemp("me"), base=True)


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def test_graph_json_holds_every_node_grouped_by_module(adapted, files):
    adapted_file, base_file = files.graphs
    collection = _load(adapted_file)
    assert collection["label"] == "LlamaForCausalLM (adapted)"
    graph = collection["graphs"][0]
    ids = [n["id"] for n in graph["nodes"]]
    assert len(ids) == len(set(ids)) == len(adapted.graph_module.graph.nodes)
    for n in graph["nodes"]:
        assert all(e["sourceNodeId"] in ids for e in n["incomingEdges"])
    scales = {n["id"]: n for n in graph["nodes"] if {"key": "ia3fx.role", "value": "scale"} in n["attrs"]}
    assert len(scales) == len(adapted.targets) == 6
    for n in scales.values():
        layer = next(a["value"] for a in n["attrs"] if a["key"] == "ia3fx.layer")
        assert n["namespace"] == layer.replace(".", "/")  # Model Explorer's groups: the module hierarchy
        assert n["label"].startswith("ia3 scale (") and n["style"]["borderColor"]


def test_base_graph_is_the_adapted_one_without_ia3fx_nodes(adapted, files):
    base = _load(files.graphs[1])["graphs"][0]
    adapted_graph = _load(files.graphs[0])["graphs"][0]
    tagged = {n.name for n in adapted.graph_module.graph.nodes if n.meta.get("ia3fx")}
    assert {n["id"] for n in base["nodes"]} == {n["id"] for n in adapted_graph["nodes"]} - tagged
    ids = {n["id"] for n in base["nodes"]}
    assert all(e["sourceNodeId"] in ids for n in base["nodes"] for e in n["incomingEdges"])
    # what read a scale node reads its input (the call site's output) instead
    for node in adapted.graph_module.graph.nodes:
        if (node.meta.get("ia3fx") or {}).get("role") == "scale" and node.meta["ia3fx"]["scale"] == "output":
            user = next(iter(node.users))
            src = {e["sourceNodeId"] for n in base["nodes"] if n["id"] == user.name for e in n["incomingEdges"]}
            assert node.name not in src and node.args[0].name in src


def test_overlays_match_the_vectors(adapted, files):
    assert set(files.overlays) == set(OVERLAYS)
    graph_id = "LlamaForCausalLM (adapted)"
    assert [g["id"] for g in _load(files.graphs[0])["graphs"]] == [graph_id]
    # keyed by the graph id: under any other key (a "graphsData" wrapper) Model Explorer finds no graph
    assert all(list(_load(p)) == [graph_id] for p in files.overlays.values())
    data = {k: _load(p)[graph_id]["results"] for k, p in files.overlays.items()}
    scales = [n for n in adapted.graph_module.graph.nodes if (n.meta.get("ia3fx") or {}).get("role") == "scale"]
    for node in scales:
        info = node.meta["ia3fx"]
        want = vector_stats(adapted.get_vector(info["layer"]))
        assert want["mean_abs_dev"] > 0.1  # moved from ones
        for overlay, key in OVERLAYS.items():
            if key is not None:
                assert data[overlay][node.name]["value"] == pytest.approx(want[key], abs=1e-5)
        role = data["role"][node.name]["value"]
        assert role == ("attention-type scale (output)" if info["scale"] == "output" else "feedforward scale (input)")
    sites = {s.node for s in adapted.call_sites}
    assert {n for n, v in data["role"].items() if v["value"] == "call site"} == sites


def test_overlays_are_what_model_explorers_own_node_data_classes_write(files):
    builder = pytest.importorskip("model_explorer.node_data_builder", reason="the view extra (.ci/setup installs it)")
    for path in files.overlays.values():
        ours = _load(path)
        theirs = builder.ModelNodeData(graphsData={
            graph: builder.GraphNodeData(
                results={node: builder.NodeDataResult(**r) for node, r in data["results"].items()},
                gradient=[builder.GradientItem(**g) for g in data["gradient"]] if "gradient" in data else None)
            for graph, data in ours.items()})
        written = json.loads(theirs.to_json_string())  # theirs adds its defaults (thresholds: [], ...)
        assert list(written) == list(ours)
        assert all({k: written[g][k] for k in data} == data for g, data in ours.items())


def test_model_explorer_gets_the_graphs_and_named_overlays_for_that_model(files, monkeypatch):
    me = pytest.importorskip("model_explorer", reason="the view extra (.ci/setup installs it)")
    served = {}
    monkeypatch.setattr(me, "visualize_from_config", lambda config, port: served.update(config=config, port=port))
    open_model_explorer(files, port=18080, module=me)
    config = served["config"]
    assert served["port"] == 18080
    assert [s["url"] for s in config.model_sources] == ["graphs://LlamaForCausalLM_adapted/0",
                                                        "graphs://LlamaForCausalLM_base/1"]
    assert [json.loads(config.get_model_explorer_graphs(i))["graphs"] for i in (0, 1)] == [
        _load(p)["graphs"] for p in files.graphs]
    # shown under readable names (not the file names), on the adapted graph, with the files' contents
    assert config.node_data_sources == [f"node_data://{OVERLAY_NAMES[k]}/{i}" for i, k in enumerate(OVERLAYS)]
    assert config.node_data_target_models == ["LlamaForCausalLM_adapted"] * len(OVERLAYS)
    assert [json.loads(config.get_node_data(i)) for i in range(len(OVERLAYS))] == [
        _load(files.overlays[k]) for k in OVERLAYS]
    assert ViewFiles.find(files.directory).overlays == files.overlays  # found again in the order written
    # the page's address opens adapted and base side by side (the browser test: examples/viewer_screenshots.py)
    state = json.loads(unquote(config.to_url_param_value()))
    assert state["models"] == config.model_sources and state["nodeData"] == config.node_data_sources
    assert [(p["selectedCollectionLabel"], p["selectedGraphId"], p["widthFraction"], p["selected"])
            for p in state["uiState"]["paneStates"]] == [
        ("LlamaForCausalLM_adapted", "LlamaForCausalLM (adapted)", 0.5, True),
        ("LlamaForCausalLM_base", "LlamaForCausalLM (base)", 0.5, False)]


def test_model_explorer_without_base_opens_one_pane(adapted, tmp_path, monkeypatch):
    me = pytest.importorskip("model_explorer", reason="the view extra (.ci/setup installs it)")
    served = {}
    monkeypatch.setattr(me, "visualize_from_config", lambda config, port: served.update(config=config))
    open_model_explorer(write_model_explorer_files(adapted, tmp_path), module=me)
    state = json.loads(unquote(served["config"].to_url_param_value()))
    assert state["models"] == [{"url": "graphs://LlamaForCausalLM_adapted/0"}] and "uiState" not in state


def test_missing_extra_is_a_clear_error_before_anything_is_written(adapted, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "model_explorer", None)
    with pytest.raises(ImportError, match=r"pip install 'ia3fx\[view\]'.*browser=False"):
        view(adapted, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert main(["view", "tiny-llama", "--out", str(tmp_path / "cli")]) == 2
    assert not (tmp_path / "cli").exists()


def test_cli_no_browser_writes_the_files_and_says_how_to_open_them(tmp_path, capsys):
    out = tmp_path / "me"
    assert main(["view", "tiny-llama", "--no-browser", "--base", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 2 graph(s) and 5 overlays" in printed and f"python -m ia3fx.view {out}" in printed
    found = ViewFiles.find(out)
    assert [p.rsplit("/", 1)[1] for p in found.graphs] == ["LlamaForCausalLM.adapted.json", "LlamaForCausalLM.base.json"]
    assert set(found.overlays) == set(OVERLAYS)
    with pytest.raises(FileNotFoundError, match="holds no Model Explorer graph"):
        ViewFiles.find(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["LlamaForCausalLM.adapted.json", "LlamaForCausalLM.base.json"]
        + [f"LlamaForCausalLM.overlay-{k}.json" for k in OVERLAYS]
    )


def test_netron_no_browser_says_how_to_open(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"\x08\x07")  # opened by Netron, not read here
    assert "netron " in view_netron(model, browser=False)
    assert main(["view", "--netron", str(model), "--no-browser"]) == 0
    assert f"open it with `netron {model}`" in capsys.readouterr().out
    assert main(["view", "--netron", str(tmp_path / "missing.onnx"), "--no-browser"]) == 2
    assert "no such file" in capsys.readouterr().err
