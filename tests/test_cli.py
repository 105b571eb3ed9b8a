"""The ``ia3fx apply``, ``viz`` and ``report`` subcommands: outputs, exit codes, one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ia3fx.cli import main

HAS_DOT = shutil.which("dot") is not None


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str, command: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"ia3fx {command}: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def llama_config_json(tmp_path_factory):
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("cfg") / "config.json"
    LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"],
    ).to_json_file(path)
    return str(path)


@pytest.mark.parametrize("command", ["apply", "viz", "report"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: ia3fx {command}") and "--target-modules" in out and "--config" in out


def test_viz_writes_the_folded_graph(tmp_path, capsys):
    out = tmp_path / ("graph.svg" if HAS_DOT else "graph.dot")
    code, stdout, err = run(capsys, "viz", "tiny-llama", "--out", str(out))
    assert code == 0, err
    assert out.exists() and out.stat().st_size > 1000
    assert stdout.startswith(f"wrote {out}") and "folded view" in stdout and "× 2" in stdout
    assert "6 of 15 call sites scaled" in stdout


def test_viz_diff_expand_and_adapter_flags(tmp_path, capsys, llama_config_json):
    out = tmp_path / "diff.dot"
    code, stdout, err = run(
        capsys, "viz", llama_config_json, "--out", str(out), "--view", "diff", "--expand", "model.layers.2",
        "--target-modules", "q_proj", "down_proj", "--feedforward-modules", "down_proj", "--no-legend",
    )
    assert code == 0, err
    dot = out.read_text()
    assert "model.layers.[0-1]  × 2" in dot and "legend" not in dot
    assert "+ added" in dot and "diff: +12 added" in dot  # 3 layers x (q_proj, down_proj) x (vector, scale)
    assert '"cluster_model.layers.2"' in dot


def test_viz_meta_builds_no_weights(tmp_path, capsys, llama_config_json):
    out = tmp_path / "meta.dot"
    code, stdout, err = run(capsys, "viz", llama_config_json, "--meta", "--out", str(out))
    assert code == 0, err
    assert "model.layers.[0-2]  × 3" in out.read_text()


def test_viz_errors_are_one_line(tmp_path, capsys):
    code, _, err = run(capsys, "viz", "tiny-llama", "--out", str(tmp_path / "graph.txt"))
    assert code == 2 and "cannot tell the format" in one_error_line(err, "viz")
    code, _, err = run(capsys, "viz", "no-such-model", "--out", str(tmp_path / "g.dot"))
    assert code == 2 and "neither a preset" in one_error_line(err, "viz")
    code, _, err = run(capsys, "viz", "tiny-llama", "--config", str(tmp_path / "missing.json"), "--out",
                       str(tmp_path / "g.dot"))
    assert code == 2 and "adapter_config.json" in one_error_line(err, "viz")
    code, _, err = run(capsys, "viz", "tiny-gpt2", "--out", str(tmp_path / "g.dot"), "--expand", "transformer.h.9")
    assert code == 2 and "expand='transformer.h.9'" in one_error_line(err, "viz")
    code, _, err = run(capsys, "viz", "tiny-gpt2", "--out", str(tmp_path / "g.dot"), "--target-modules", "nope")
    assert code == 2 and "not found" in one_error_line(err, "viz")
    assert not list(tmp_path.glob("g.*"))


def test_viz_subprocess_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ia3fx", "viz", "tiny-llama", "--out", str(tmp_path / "g.bmp")],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"ia3fx viz: error: cannot tell the format from --out '{tmp_path / 'g.bmp'}': use .svg, .png, .pdf, .dot or .html"
    ]
    proc = subprocess.run([sys.executable, "-m", "ia3fx", "viz", "tiny-llama"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2 and "--out" in proc.stderr  # argparse: a required flag is missing


def test_apply_saves_a_peft_adapter(tmp_path, capsys):
    out = tmp_path / "adapter"
    code, stdout, err = run(capsys, "apply", "tiny-gpt2", "--out", str(out))
    assert code == 0, err
    assert "4 vectors, 896 parameters, 4 of 9 call sites scaled" in stdout
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and sorted(config["target_modules"]) == ["c_attn", "mlp.c_proj"]
    tensors = load_file(out / "adapter_model.safetensors")
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.ia3_l"].shape == (192, 1)
    assert tensors["base_model.model.transformer.h.1.mlp.c_proj.ia3_l"].shape == (1, 256)
    assert all(torch.equal(t, torch.ones_like(t)) for t in tensors.values())
    # an adapter already there is kept unless --force
    code, _, err = run(capsys, "apply", "tiny-gpt2", "--out", str(out), "--no-init-ia3-weights")
    assert code == 2 and "--force" in one_error_line(err, "apply")
    assert all(torch.equal(t, torch.ones_like(t)) for t in load_file(out / "adapter_model.safetensors").values())
    # --force, with random vectors and settings from the saved config plus a flag
    code, stdout, err = run(capsys, "apply", "tiny-gpt2", "--config", str(out / "adapter_config.json"),
                            "--exclude-modules", "transformer.h.1.attn.c_attn", "--out", str(out),
                            "--no-init-ia3-weights", "--force")
    assert code == 0, err
    tensors = load_file(out / "adapter_model.safetensors")
    assert len(tensors) == 3 and not any(torch.equal(t, torch.ones_like(t)) for t in tensors.values())
    assert json.loads((out / "adapter_config.json").read_text())["init_ia3_weights"] is False


def test_apply_reloads_with_peft(tmp_path, capsys):
    peft = pytest.importorskip("peft")
    from conftest import tiny_llama

    out = tmp_path / "adapter"
    code, _, err = run(capsys, "apply", "tiny-llama", "--out", str(out), "--no-init-ia3-weights")
    assert code == 0, err
    model = peft.PeftModel.from_pretrained(tiny_llama(), str(out))
    n = sum(p.numel() for name, p in model.named_parameters() if "ia3_l" in name)
    assert n == 2 * (32 + 32 + 128)


def test_report_text_and_json(capsys, llama_config_json):
    code, stdout, err = run(capsys, "report", "tiny-gpt2")
    assert code == 0, err
    assert "call sites: 9 found, 4 scaled" in stdout
    assert "not matched by target_modules: transformer.h.0.attn.c_proj" in stdout
    assert "tied transformer.wte.weight = lm_head.weight" in stdout
    code, stdout, err = run(capsys, "report", llama_config_json, "--meta", "--json", "--exclude-modules",
                            "model.layers.0.self_attn.k_proj")
    assert code == 0, err
    data = json.loads(stdout)
    assert data["vectors"] == 8 and data["call_sites"] == 22
    assert data["skipped"]["model.layers.0.self_attn.k_proj"] == "excluded by exclude_modules"
    assert [b["vectors"] for b in data["blocks"]] == [2, 3, 3]
    code, _, err = run(capsys, "report", "tiny-llama", "--target-modules", "nothing_here")
    assert code == 2 and "not found" in one_error_line(err, "report")


def test_demo_runs_the_whole_pipeline(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, _ = run(capsys, "demo", "--steps", "6", "--out", str(out))
    assert code == 0, stdout
    assert stdout.rstrip().splitlines()[-1].startswith("OK: adapted, trained, drawn, generated, merged and exported")
    assert "greedy tokens equal the adapted model's generate" in stdout
    for name in ("adapter_config.json", "adapter_model.safetensors", "merged-checkpoint/config.json",
                 "generate-merged.pt2", "adapted-graph.svg" if HAS_DOT else "adapted-graph.dot"):
        assert (out / name).is_file(), name
    # the adapter changed what the model generates, and the pt2 program generates the adapted tokens
    lines = stdout.splitlines()
    adapted = next(ln for ln in lines if ln.strip().startswith("adapted ["))
    base = next(ln for ln in lines if ln.strip().startswith("base    ["))
    assert adapted.split("[", 1)[1] != base.split("[", 1)[1]
    from ia3fx.decode import greedy_pt2

    tokens = greedy_pt2(torch.export.load(str(out / "generate-merged.pt2")), torch.tensor([[12, 13, 14, 15, 0, 1, 2, 3]]), 16)
    assert str(tokens[0, 8:].tolist()) in adapted


def test_demo_refuses_zero_steps(tmp_path, capsys):
    code, _, err = run(capsys, "demo", "--steps", "0", "--out", str(tmp_path / "d"))
    assert code == 2
    assert "--steps must be at least 1" in one_error_line(err, "demo")
    assert not (tmp_path / "d").exists()
