"""The interactive graph page (``ia3fx.draw(model, "graph.html")``) in headless Firefox.

Firefox's headless mode takes a screenshot but has no ``--dump-dom``: the checks read pixels. The
page draws (the legend's colours, the scale nodes, the fill of a folded block), and the page's own
click handler, run from the URL (``#click=<block>``), expands the fold: its fill is gone after.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from conftest import move_vectors, tiny_llama

import ia3fx

FIREFOX = shutil.which("firefox-esr") or shutil.which("firefox")
pytestmark = [
    pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot binary is not installed (it lays out the page)"),
    pytest.mark.skipif(FIREFOX is None, reason="firefox is not installed (.ci/setup installs firefox-esr)"),
]
ORANGE, BLUE, FOLD_FILL = (0xE8, 0x74, 0x3B), (0x3B, 0x7D, 0xDD), (0xFF, 0xF6, 0xD9)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    path = tmp_path_factory.mktemp("html") / "graph.html"
    ia3fx.draw(move_vectors(ia3fx.get_ia3_model(tiny_llama(), ia3fx.IA3Config()), 0.2), path)
    return path


def _screenshot(url: str, out) -> np.ndarray:
    from PIL import Image

    profile = out.parent / f"{out.stem}-profile"  # a fresh profile: no first-run state shared between runs
    profile.mkdir()
    cmd = [FIREFOX, "--headless", "--no-remote", "--profile", str(profile), "--window-size=1280,900",
           "--screenshot", str(out), url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and out.exists(), proc.stderr[-2000:]
    return np.asarray(Image.open(out).convert("RGB")).astype(int)


def _count(region: np.ndarray, rgb: tuple[int, int, int]) -> int:
    return int((np.abs(region - np.array(rgb)).max(axis=-1) <= 6).sum())


def test_firefox_draws_the_page_and_a_scripted_click_expands_the_fold(page, tmp_path):
    folded = _screenshot(page.as_uri(), tmp_path / "folded.png")
    assert folded.shape == (900, 1280, 3)
    assert len(np.unique(folded.reshape(-1, 3), axis=0)) > 50  # not a blank page
    legend, drawing = folded[700:, 1000:], folded[40:, :1000]
    assert _count(legend, ORANGE) > 50 and _count(legend, BLUE) > 50
    assert _count(drawing, ORANGE) > 50 and _count(drawing, BLUE) > 50  # the scale nodes themselves
    assert _count(drawing, FOLD_FILL) > 20_000  # the two layers, drawn once as a fold

    expanded = _screenshot(page.as_uri() + "#click=model.layers.0", tmp_path / "expanded.png")
    assert _count(expanded[40:, :1000], FOLD_FILL) < 1_000  # no fold left: both layers drawn in full
    assert _count(expanded[700:, 1000:], ORANGE) > 50  # the legend stays
    assert (np.abs(expanded[:40] - folded[:40]).max(axis=-1) > 30).sum() > 200  # the status line changed
