"""ia3fx.draw(model, "graph.html"): one self-contained page, its data, and how it renders in headless Chromium."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import pytest
import torch
from conftest import move_vectors, tiny_llama

import ia3fx
from ia3fx.cli import main
from ia3fx.viz_stats import vector_stats

HAS_DOT = shutil.which("dot") is not None
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(not HAS_DOT, reason="Graphviz's dot binary is not installed (it lays out the page)")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/setup installs it)")


def _data(page: str, element: str = "ia3fx-data") -> dict:
    m = re.search(rf'<script type="application/json" id="{element}">(.*?)</script>', page, re.S)
    assert m, f"no {element} in the page"
    return json.loads(m.group(1))


@pytest.fixture(scope="module")
def adapted():
    """A 4-layer Llama whose vectors moved away from ones (different per layer)."""
    return move_vectors(ia3fx.get_ia3_model(tiny_llama(num_hidden_layers=4), ia3fx.IA3Config()), 0.2)


@pytest.fixture(scope="module")
def page(adapted, tmp_path_factory):
    path = tmp_path_factory.mktemp("html") / "graph.html"
    ia3fx.draw(adapted, path)
    return path


def _chromium(*args: str, url: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,900",
           *args, url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_page_is_self_contained(page):
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    # nothing fetched: no URL of any kind, no external script, style, font or image
    for needle in ("http://", "https://", "src=", "<link", "@import", "url(", "//cdn"):
        assert needle not in text, needle
    assert "<svg" in text and "<script>" in text and "<style>" in text


def test_page_data_matches_the_vectors(adapted, page):
    data = _data(page.read_text(encoding="utf-8"))
    assert data["runs"] == [{"path": "model.layers.0", "parent": "model.layers", "lo": 0, "hi": 3, "size": 4,
                             "label": "model.layers.[0-3]"}]
    items = data["views"][""]["items"]
    scales = {i["layer"]: i for i in items.values() if i.get("role") == "scale"}
    assert set(scales) == {"model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
                           "model.layers.0.mlp.down_proj"}
    down = scales["model.layers.0.mlp.down_proj"]
    assert (down["scale"], down["size"]) == ("input", 128)
    k = scales["model.layers.0.self_attn.k_proj"]
    assert (k["scale"], k["size"]) == ("output", 32)
    # every folded layer's numbers, equal to the vector's own
    assert sorted(k["folded"]) == [f"model.layers.{i}.self_attn.k_proj" for i in range(4)]
    for layer, stats in k["folded"].items():
        want = vector_stats(adapted.get_vector(layer))
        assert stats == pytest.approx(want, abs=1e-5)
        assert stats["mean_abs_dev"] > 0.05  # the vectors moved: not a page of ones
    assert k["stats"] == k["folded"]["model.layers.0.self_attn.k_proj"]
    # the expanded drawing of the fold is in the page, with layer 0's weight reads drawn
    expanded = _data(page.read_text(encoding="utf-8"), "ia3fx-expanded")
    assert set(expanded) == {"model.layers.0"}
    assert "model.layers.0.self_attn.q_proj.weight" in html.unescape(expanded["model.layers.0"])
    assert "model.layers.0.self_attn.q_proj.weight" not in html.unescape(re.search(
        r'<div id="stage">(.*?)</div>', page.read_text(encoding="utf-8"), re.S).group(1))


def test_meta_model_page_says_no_values(tmp_path):
    with torch.device("meta"):
        model = tiny_llama()
    ia3 = ia3fx.get_ia3_model(model, ia3fx.IA3Config())
    path = tmp_path / "meta.html"
    ia3fx.draw(ia3, path)
    items = _data(path.read_text(encoding="utf-8"))["views"][""]["items"]
    scales = [i for i in items.values() if i.get("role") == "scale"]
    assert len(scales) == 3 and all(i["stats"] is None for i in scales)


def test_cli_writes_html(tmp_path, capsys):
    out = tmp_path / "g.html"
    assert main(["viz", "tiny-llama", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert "ia3fx-data" in out.read_text(encoding="utf-8")


@needs_chromium
def test_screenshot_shows_the_drawing_and_the_legend(page, tmp_path):
    import numpy as np
    from PIL import Image

    shot = tmp_path / "shot.png"
    _chromium(f"--screenshot={shot}", url=page.as_uri())
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape == (900, 1280, 3)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # not a blank page
    orange, blue = (0xE8, 0x74, 0x3B), (0x3B, 0x7D, 0xDD)
    legend = img[700:, 1000:]  # the legend sits in the bottom right corner
    drawing = img[40:, :1000]

    def count(region, rgb):
        return int((np.abs(region - np.array(rgb)).max(axis=-1) <= 6).sum())

    assert count(legend, orange) > 50 and count(legend, blue) > 50
    assert count(drawing, orange) > 50 and count(drawing, blue) > 50  # the scale nodes themselves


@needs_chromium
def test_click_on_a_fold_expands_it_and_search_finds_a_folded_layer(page):
    text = page.read_text(encoding="utf-8")
    folded = re.search(r'<div id="stage">(.*?)</div>', text, re.S).group(1)
    # one page load: a scripted click on the fold's frame (through the page's own click handler),
    # then a search for a layer that the remaining fold [1-3] stands for
    dom = _chromium("--virtual-time-budget=3000", "--dump-dom",
                    url=page.as_uri() + "#click=model.layers.0&search=model.layers.2.mlp.down_proj").stdout
    assert re.search(r'<body[^>]*data-view="model.layers.0"', dom) and 'data-ready="yes"' in dom
    # the click drew layer 0 in full: more nodes, its weight reads among them, the frame marked expanded
    nodes = lambda s: len(re.findall(r'<g id="node\d+" class="node', s))  # noqa: E731
    assert nodes(dom) > nodes(folded) + 10
    assert 'data-module="model.layers.0.self_attn.q_proj"' in dom
    assert re.search(r'class="cluster expanded"[^>]*data-path="model.layers.0"', dom)
    assert re.search(r'class="cluster fold"[^>]*data-path="model.layers.1"', dom)  # the run it split from
    status = re.search(r'<span id="status" role="status">(.*?)</span>', dom).group(1)
    assert "drawn as model.layers.1.mlp.down_proj" in status, status
    assert len(re.findall(r'class="node hit"', dom)) >= 3  # the call site, its scale and its vector
