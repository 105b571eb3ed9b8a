"""``ia3fx.export``: pt2, ONNX and transformers-directory round trips, and the ``export`` command.

Each exported artefact is loaded back the way its users load it (``torch.export.load``,
onnxruntime, ``AutoModelFor*.from_pretrained``) and run at other batch sizes and lengths than the
capture's; the adapted model must come out of every export untouched.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import logits, tiny_llama, token_inputs
from test_merge import _assert_unchanged, _build, _out, _shared, _snapshot, conv_inputs

import ia3fx
from ia3fx.cli import main
from ia3fx.presets import build_preset

ATOL = 1e-5
ONNX_ATOL = 1e-4


def _inputs(name, batch, seq, **kw):
    if name == "convnet":
        return conv_inputs(batch, seed=batch)
    return token_inputs(name, batch=batch, seq=seq, seed=batch + seq, **kw)


SIZES = [(1, 3), (5, 17), (2, 7)]


def _no_leftovers(directory):
    """Nothing but finished outputs: no temporary names (``.<name>.partial-...``)."""
    return [p for p in os.listdir(directory) if p.startswith(".")]


# --- pt2 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "convnet"])
def test_pt2_round_trip(name, tmp_path):
    _, ia3_model, _, _ = _shared(name)
    snap = _snapshot(ia3_model)
    path = ia3fx.export(ia3_model, tmp_path / "model.pt2", "pt2")
    assert path == str(tmp_path / "model.pt2") and os.path.isfile(path)
    assert _no_leftovers(tmp_path) == []
    ep = torch.export.load(path)
    assert not any(k.startswith("ia3_l.") for k in ep.state_dict)  # merged: no vectors left
    loaded = ep.module()
    for batch, seq in SIZES:
        inputs = _inputs(name, batch, seq)
        torch.testing.assert_close(_out(loaded, inputs), _out(ia3_model, inputs), rtol=0, atol=ATOL)
    _assert_unchanged(ia3_model, snap)
    assert ia3_model.merged_adapters == []


def test_pt2_unmerged_keeps_the_vectors(tmp_path):
    _, ia3_model, _, inputs = _shared("llama")
    path = ia3fx.export(ia3_model, tmp_path / "adapted.pt2", "pt2", merged=False)
    ep = torch.export.load(path)
    vectors = sorted(k for k in ep.state_dict if k.startswith("ia3_l."))
    assert len(vectors) == len(ia3_model.targets)
    for layer in ia3_model.targets:
        key = next(k for k in vectors if k.startswith(f"ia3_l.{layer}."))
        assert torch.equal(ep.state_dict[key], ia3_model.get_vector(layer).detach())
    muls = sum(1 for n in ep.graph.nodes if n.target == torch.ops.aten.mul.Tensor)
    merged = torch.export.load(ia3fx.export(ia3_model, tmp_path / "merged.pt2", "pt2"))
    assert muls - sum(1 for n in merged.graph.nodes if n.target == torch.ops.aten.mul.Tensor) >= len(vectors)
    for batch, seq in SIZES:
        x = _inputs("llama", batch, seq)
        torch.testing.assert_close(_out(ep.module(), x), _out(ia3_model, x), rtol=0, atol=0)


def test_pt2_of_another_signature_and_of_a_training_model(tmp_path):
    """``example_inputs`` pick the graph (here with an attention mask); a model in train mode
    exports its eval graph (BERT has dropout) and is left in train mode."""
    _, ia3_model, _, _ = _shared("bert")
    example = token_inputs("bert", batch=2, seq=6, mask=True)
    ia3_model.train()
    try:
        path = ia3fx.export(ia3_model, tmp_path / "masked.pt2", "pt2", example_inputs=example)
        assert ia3_model.training and ia3_model.model.training
    finally:
        ia3_model.eval()
    loaded = torch.export.load(path).module()
    for batch, seq in SIZES:
        x = _inputs("bert", batch, seq, mask=True)
        torch.testing.assert_close(_out(loaded, x), _out(ia3_model, x), rtol=0, atol=ATOL)


def test_pt2_of_a_model_handed_in_as_an_exported_program(tmp_path):
    """A graph handed in has one mode and no module to retrace: it is exported as it is."""
    from test_merge import CONV_KWARGS, conv_net

    x = conv_inputs(2)
    ep_in = torch.export.export(conv_net(), (), x, dynamic_shapes={"x": {0: torch.export.Dim.AUTO}})
    ia3_model = ia3fx.get_ia3_model(ep_in, ia3fx.IA3Config(**CONV_KWARGS))
    with torch.no_grad():
        for p in ia3_model.ia3_l.parameters():
            p.copy_(torch.linspace(0.5, 1.5, p.numel()).reshape(p.shape))
    for merged in (True, False):
        path = ia3fx.export(ia3_model, tmp_path / f"conv-{merged}.pt2", "pt2", merged=merged)
        loaded = torch.export.load(path).module()
        for batch in (1, 5):
            xb = conv_inputs(batch, seed=batch)
            torch.testing.assert_close(_out(loaded, xb), _out(ia3_model, xb), rtol=0, atol=ATOL)


def test_a_static_capture_is_reported(tmp_path):
    """A capture with batch size 1 cannot be made dynamic again: export says so."""
    model = tiny_llama()
    ia3_model = ia3fx.get_ia3_model(model, ia3fx.IA3Config(), example_inputs=token_inputs("llama", batch=1, seq=6))
    with pytest.warns(UserWarning, match=r"fixed sizes .*input_ids dim 0 = 1"):
        ia3fx.export(ia3_model, tmp_path / "static.pt2", "pt2")


# --- ONNX ----------------------------------------------------------------------------------------
def _onnx_io(path):
    import onnx

    proto = onnx.load(path, load_external_data=False)

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    inits = {i.name for i in proto.graph.initializer}
    return {i.name: dims(i) for i in proto.graph.input if i.name not in inits}, {o.name: dims(o) for o in proto.graph.output}, inits


def _run_onnx(path, inputs):
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: inputs[n].numpy() for n in names})[0]


@pytest.mark.parametrize(
    "name, merged, mask",
    [("llama", True, False), ("gpt2", False, True), ("convnet", True, False)],
    ids=["llama-merged", "gpt2-unmerged-masked", "convnet-merged"],
)
def test_onnx_runs_other_sizes_in_onnxruntime(name, merged, mask, tmp_path):
    _, ia3_model, _, _ = _shared(name)
    snap = _snapshot(ia3_model)
    example = _inputs(name, 2, 6, mask=True) if mask else None
    path = ia3fx.export(ia3_model, tmp_path / "model.onnx", "onnx", merged=merged, example_inputs=example)
    assert _no_leftovers(tmp_path) == []
    inputs, outputs, inits = _onnx_io(path)
    if name == "convnet":
        assert inputs == {"x": ["batch", 3, 8, 8]}
        assert list(outputs.values()) == [["batch", 5]]
    else:
        expected = {"input_ids": ["batch", "sequence"]}
        if mask:
            expected["attention_mask"] = ["batch", "sequence"]
        assert inputs == expected  # symbolic: the dims were dynamic in the captured graph
        assert outputs == {"logits": ["batch", "sequence", 128]}
    assert any(i.startswith("ia3_l.") for i in inits) == (not merged)
    for batch, seq in SIZES:
        x = _inputs(name, batch, seq, mask=mask) if name != "convnet" else _inputs(name, batch, seq)
        want = _out(ia3_model, x).numpy()
        got = _run_onnx(path, x)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=ONNX_ATOL)
    _assert_unchanged(ia3_model, snap)


# --- transformers directory ----------------------------------------------------------------------
AUTO = {"llama": "AutoModelForCausalLM", "gpt2": "AutoModelForCausalLM", "bert": "AutoModelForSequenceClassification"}


def _load_dir(name, path):
    import transformers

    return getattr(transformers, AUTO[name]).from_pretrained(path).eval()


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_transformers_dir_is_the_merged_model(name, tmp_path):
    peft_model, ia3_model, base, _ = _build(name)
    snap = _snapshot(ia3_model)
    path = ia3fx.export(ia3_model, tmp_path / "merged", "transformers")
    assert {"config.json", "model.safetensors"} <= set(os.listdir(path))
    assert _no_leftovers(tmp_path) == []
    _assert_unchanged(ia3_model, snap)  # computed beside the live weights
    assert ia3_model.merged_adapters == []
    loaded = _load_dir(name, path)
    assert type(loaded) is type(base)
    # PEFT's merge_and_unload, bit for bit (bert: the trained classifier copy is in)
    peft_sd = peft_model.merge_and_unload().state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, peft_sd[k]), k
    if name == "gpt2":
        assert loaded.lm_head.weight is loaded.transformer.wte.weight  # the tie survives
    merged_graph = ia3_model.merged_graph_module()
    for batch, seq in SIZES:
        x = _inputs(name, batch, seq)
        torch.testing.assert_close(_out(loaded, x), _out(merged_graph, x), rtol=0, atol=1e-6)
        torch.testing.assert_close(_out(loaded, x), _out(ia3_model, x), rtol=0, atol=ATOL)


def test_transformers_dir_follows_the_model_state(tmp_path):
    """Merged in place: the weights are taken as they are (no second fold). Disabled: base weights."""
    _, ia3_model, base, inputs = _build("llama")
    adapted = _out(ia3_model, inputs)
    ia3_model.merge_adapter()
    snap = _snapshot(ia3_model)
    merged_dir = ia3fx.export(ia3_model, tmp_path / "merged", "transformers")
    _assert_unchanged(ia3_model, snap)
    torch.testing.assert_close(_out(_load_dir("llama", merged_dir), inputs), adapted, rtol=0, atol=ATOL)
    with ia3_model.disable_adapter():
        base_dir = ia3fx.export(ia3_model, tmp_path / "base", "transformers")
    loaded = _load_dir("llama", base_dir)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, base.state_dict()[k]), k


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_transformers_dir_carries_the_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    _, ia3_model, _, _ = _shared("llama")
    tokenizer = _tokenizer()
    given = ia3fx.export(ia3_model, tmp_path / "given", "transformers", tokenizer=tokenizer)
    assert "tokenizer.json" in os.listdir(given)
    assert AutoTokenizer.from_pretrained(given)("w3 w5")["input_ids"] == [3, 5]
    # without one, the tokenizer files of the directory the model came from are copied
    source = tmp_path / "source"
    tokenizer.save_pretrained(source)
    old = ia3_model.model.name_or_path
    ia3_model.model.name_or_path = str(source)
    try:
        copied = ia3fx.export(ia3_model, tmp_path / "copied", "transformers")
    finally:
        ia3_model.model.name_or_path = old
    assert AutoTokenizer.from_pretrained(copied)("w7")["input_ids"] == [7]
    assert "tokenizer.json" not in os.listdir(ia3fx.export(ia3_model, tmp_path / "none", "transformers"))


# --- writing -------------------------------------------------------------------------------------
def test_existing_outputs_are_refused_then_replaced_whole(tmp_path, monkeypatch):
    _, ia3_model, _, _ = _shared("convnet")
    file = tmp_path / "model.pt2"
    file.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ia3fx.export(ia3_model, file, "pt2")
    assert file.read_bytes() == b"precious"

    def broken_save(ep, f, *a, **k):  # f: the file object ia3fx hands torch's writer
        f.write(b"half")
        raise RuntimeError("disk full")

    with monkeypatch.context() as m:
        m.setattr(torch.export, "save", broken_save)
        with pytest.raises(RuntimeError, match="disk full"):
            ia3fx.export(ia3_model, file, "pt2", overwrite=True)
    assert file.read_bytes() == b"precious"  # the old file survives a failed replacement
    assert _no_leftovers(tmp_path) == []
    ia3fx.export(ia3_model, file, "pt2", overwrite=True)
    assert torch.export.load(file).module() is not None
    assert _no_leftovers(tmp_path) == []


def test_existing_directory_is_replaced_only_with_overwrite(tmp_path):
    _, ia3_model, _, _ = _shared("llama")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "marker").write_text("old")
    with pytest.raises(FileExistsError):
        ia3fx.export(ia3_model, out, "transformers")
    assert os.listdir(out) == ["marker"]
    ia3fx.export(ia3_model, out, "transformers", overwrite=True)
    assert "marker" not in os.listdir(out) and "config.json" in os.listdir(out)
    assert _no_leftovers(tmp_path) == []


def test_bad_requests(tmp_path):
    _, ia3_model, _, _ = _shared("convnet")
    with pytest.raises(ValueError, match="unknown export format"):
        ia3fx.export(ia3_model, tmp_path / "x", "tflite")
    with pytest.raises(ValueError, match="merged=True"):
        ia3fx.export(ia3_model, tmp_path / "x", "transformers", merged=False)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        ia3fx.export(ia3_model, tmp_path / "x", "transformers")
    with pytest.raises(TypeError, match="IA3Model"):
        ia3fx.export(ia3_model.model, tmp_path / "x", "pt2")
    assert os.listdir(tmp_path) == []


def test_symbolic_trace_needs_example_inputs(tmp_path):
    from conftest import custom_input, custom_model

    ia3_model = ia3fx.get_ia3_model(custom_model("MLP"), ia3fx.IA3Config(target_modules=["lin0"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="example_inputs"):
        ia3fx.export(ia3_model, tmp_path / "mlp.pt2", "pt2")
    x = custom_input().float()
    path = ia3fx.export(ia3_model, tmp_path / "mlp.pt2", "pt2", example_inputs=(x,))
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(path).module()(x), ia3_model(x), rtol=0, atol=ATOL)


# --- the command ---------------------------------------------------------------------------------
def _preset_with_adapter(tmp_path):
    """tiny-llama with a random adapter saved in PEFT format; returns (ia3_model, adapter dir)."""
    ia3_model = ia3fx.get_ia3_model(build_preset("tiny-llama"), ia3fx.IA3Config())
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ia3_model.ia3_l.parameters():
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
    adapter = tmp_path / "adapter"
    ia3_model.save_pretrained(adapter)
    return ia3_model, adapter


def test_cli_export_onnx_from_an_adapter_dir(tmp_path, capsys):
    ia3_model, adapter = _preset_with_adapter(tmp_path)
    out = tmp_path / "model.onnx"
    assert main(["export", "tiny-llama", "--format", "onnx", "--out", str(out), "--adapter", str(adapter)]) == 0
    assert "wrote" in capsys.readouterr().out
    for batch, seq in [(1, 4), (3, 11)]:
        x = token_inputs("llama", batch=batch, seq=seq)
        np.testing.assert_allclose(_run_onnx(str(out), x), _out(ia3_model, x).numpy(), rtol=0, atol=ONNX_ATOL)
    # an existing output is refused with a one-line reason, and kept
    before = out.read_bytes()
    assert main(["export", "tiny-llama", "--format", "onnx", "--out", str(out), "--adapter", str(adapter)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_cli_export_transformers_with_adapter_flags(tmp_path, capsys):
    out = tmp_path / "merged"
    args = ["export", "tiny-llama", "--format", "transformers", "--out", str(out),
            "--target-modules", "q_proj", "down_proj", "--feedforward-modules", "down_proj"]
    assert main(args) == 0
    assert "4 adapted layers" in capsys.readouterr().out
    loaded = _load_dir("llama", out)
    base = build_preset("tiny-llama")
    x = token_inputs("llama")
    # freshly initialised vectors are ones: the merged checkpoint computes the base model's outputs
    torch.testing.assert_close(logits(loaded(**x)), logits(base(**x)), rtol=0, atol=0)
    assert main(args + ["--force"]) == 0
    assert main(args[:6] + ["--adapter", str(tmp_path), "--target-modules", "q_proj"]) == 2
    assert "drop --target-modules" in capsys.readouterr().err
