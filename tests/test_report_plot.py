"""Report.plot / ia3fx report --plot: how far each adapter's vectors moved from ones, per block and site kind."""

from __future__ import annotations

import sys

import pytest
import torch

import ia3fx
from ia3fx.cli import main
from ia3fx.presets import build_preset
from ia3fx.viz_plot import movement_table

KINDS = ["self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"]


def _set(ia3, adapter: str, scale: float) -> dict[str, torch.Tensor]:
    """Vectors that moved by a known, per-layer amount: block i's vectors are 1 + scale * (i + 1) * noise."""
    g = torch.Generator().manual_seed(hash(adapter) % 1000)
    out = {}
    with torch.no_grad():
        for layer in ia3._selections[adapter].targets:
            v = ia3.get_vector(layer, adapter)
            block = int(layer.split(".")[2])
            v.copy_(1 + scale * (block + 1) * torch.randn(v.shape, generator=g))
            out[layer] = v.detach().clone()
    return out


@pytest.fixture(scope="module")
def two_adapters():
    ia3 = ia3fx.get_ia3_model(build_preset("tiny-llama"), ia3fx.IA3Config(), adapter_name="first")
    ia3.add_adapter("second", ia3fx.IA3Config())
    return ia3, {"first": _set(ia3, "first", 0.05), "second": _set(ia3, "second", 0.2)}


def test_table_holds_each_vectors_mean_and_spread_of_its_distance_from_ones(two_adapters):
    ia3, vectors = two_adapters
    report = ia3fx.report(ia3)
    table = movement_table(report)
    assert table.adapters == ["first", "second"]
    assert table.blocks == ["model.layers.0", "model.layers.1"]
    assert table.kinds == KINDS
    for adapter, layers in vectors.items():
        for layer, v in layers.items():
            block, kind = ".".join(layer.split(".")[:3]), ".".join(layer.split(".")[3:])
            col = table.blocks.index(block)
            dev = (v - 1).abs()
            assert table.mean[kind][adapter][col] == pytest.approx(dev.mean().item(), rel=1e-5)
            assert table.spread[kind][adapter][col] == pytest.approx(dev.std(correction=0).item(), rel=1e-5)
    # the second adapter moved 4x as far, and block 1 twice as far as block 0: the table shows it
    k = table.mean["mlp.down_proj"]
    assert k["second"][0] > 2 * k["first"][0] and k["first"][1] > 1.3 * k["first"][0]
    assert table.to_dict()["kinds"] == KINDS
    assert report.to_dict()["vectors"] == report.vectors  # in --json too
    assert movement_table(report, ["second"]).adapters == ["second"]
    with pytest.raises(ValueError, match="'third' is not in this report; it has first, second"):
        movement_table(report, ["third"])


def test_figure_draws_the_table(two_adapters, tmp_path):
    ia3, _ = two_adapters
    report = ia3fx.report(ia3)
    table = movement_table(report)
    path = tmp_path / "movement.svg"
    fig = report.plot(path)
    assert path.read_text().lstrip().startswith(("<?xml", "<svg"))
    axes = fig.axes
    assert [ax.get_title(loc="left") for ax in axes] == KINDS
    for ax, kind in zip(axes, KINDS):
        heights = sorted(round(p.get_height(), 6) for p in ax.patches)
        want = sorted(round(v, 6) for a in table.adapters for v in table.mean[kind][a])
        assert heights == want  # one bar per adapter and block, as tall as its mean |v - 1|
    assert [t.get_text() for t in axes[0].get_legend().get_texts()] == ["first", "second"]
    png = tmp_path / "movement.png"
    report.plot(png, adapters=["first"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_text_report_stays_the_default_and_config_reports_have_nothing_to_plot(two_adapters):
    ia3, _ = two_adapters
    report = ia3fx.report(ia3)
    assert "|v" not in report.text()  # the text is what it was
    what_if = ia3fx.report(ia3, ia3fx.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    assert what_if.vectors == {}
    with pytest.raises(ValueError, match="holds no vector values to plot"):
        what_if.plot()
    with pytest.raises(ValueError, match=r"use \.png, \.svg or \.pdf"):
        report.plot("out.bmp")


def test_missing_matplotlib_is_a_clear_error(two_adapters, monkeypatch):
    ia3, _ = two_adapters
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"pip install 'ia3fx\[plot\]'"):
        ia3fx.report(ia3).plot()


def test_cli_report_plot_with_two_adapters(two_adapters, tmp_path, capsys):
    ia3, _ = two_adapters
    ia3.save_pretrained(tmp_path, selected_adapters=["first", "second"])  # tmp_path/first/, tmp_path/second/
    first, second = tmp_path / "run-a", tmp_path / "run-b"
    (tmp_path / "first").rename(first)
    (tmp_path / "second").rename(second)
    out = tmp_path / "plot.png"
    assert main(["report", "tiny-llama", "--adapter", str(first), "--adapter", str(second), "--plot", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("ia3fx report: LlamaForCausalLM") and "adapter 'run-a'" in printed
    assert f"wrote {out}: mean |v-1| per block and site kind, adapters run-a, run-b" in printed
    assert out.read_bytes()[:4] == b"\x89PNG"
    # bad input: refused before any work, one line, exit 2
    assert main(["report", "tiny-llama", "--plot", str(tmp_path / "x.png")]) == 2
    assert "--plot draws how far trained vectors moved from ones: pass --adapter DIR" in capsys.readouterr().err
    assert main(["report", "tiny-llama", "--adapter", str(first), "--plot", str(tmp_path / "x.bmp")]) == 2
    assert "use .png, .svg or .pdf" in capsys.readouterr().err
    assert main(["report", "tiny-llama", "--adapter", str(first), "--target-modules", "q_proj"]) == 2
    assert "drop --target-modules" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.bmp").exists()
