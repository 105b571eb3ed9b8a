"""Offline checkpoint merge (``ia3fx.offline.merge_checkpoint`` / ``ia3fx merge``).

The reference is PEFT: the same base weights and adapter, ``merge_and_unload()`` in memory; the
offline output must hold bit-identical tensors (``torch.equal``), load with transformers, and
give the same logits. Then every refusal: bad inputs, overlapping directories, failures midway.
"""

from __future__ import annotations

import copy
import json
import os
import struct

import peft
import pytest
import torch
from conftest import (
    VOCAB,
    logits,
    peft_and_ia3,
    randomize_peft,
    snapshot,
    tiny_bert_seq_cls,
    tiny_gpt2,
    tiny_llama,
    token_inputs,
)
from safetensors.torch import load_file, save_file

import ia3fx
from ia3fx import offline
from ia3fx.cli import main
from ia3fx.offline import CheckpointError, merge_checkpoint, read_safetensors_header

FAMILIES = {
    "llama": (tiny_llama, {}),
    "gpt2": (tiny_gpt2, {}),  # transformers Conv1D, (in, out) weights, tied lm_head
    "bert": (tiny_bert_seq_cls, {"task_type": "SEQ_CLS"}),  # classifier in modules_to_save
}


def make_checkpoint(tmp_path, family="llama", dtype=torch.float32, shard=None, peft_kwargs=None, factory=None):
    """(base dir, adapter dir, PEFT's merged model) for a tiny model with a random adapter."""
    make, kwargs = FAMILIES[family]
    model = (factory or make)().to(dtype)
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    if shard:
        model.save_pretrained(base, max_shard_size=shard)
    else:
        model.save_pretrained(base)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.IA3Config(**(peft_kwargs if peft_kwargs is not None else kwargs)))
    pm.eval()
    randomize_peft(pm)
    pm.save_pretrained(adapter)
    return base, adapter, pm.merge_and_unload().eval()


def read_dir(path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def assert_bit_identical(out_dir, reference: torch.nn.Module, base_dir) -> None:
    got, base = read_dir(out_dir), read_dir(base_dir)
    ref = reference.state_dict()
    assert set(got) == set(base)
    changed = 0
    for k, t in got.items():
        assert t.dtype == base[k].dtype and t.shape == base[k].shape, k
        assert torch.equal(t, ref[k]), f"{k} differs from PEFT's merge_and_unload"
        changed += not torch.equal(t, base[k])
    assert changed > 0


# --- bit identity with PEFT ---------------------------------------------------------------------
@pytest.mark.parametrize("shard", [None, "20KB"], ids=["single", "sharded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_bit_identical_to_peft_merge_and_unload(tmp_path, family, dtype, shard):
    base, adapter, merged = make_checkpoint(tmp_path, family, dtype, shard)
    if shard:
        assert len([f for f in os.listdir(base) if f.endswith(".safetensors")]) > 1
    report = merge_checkpoint(base, adapter, tmp_path / "out", progress=False)
    assert_bit_identical(tmp_path / "out", merged, base)
    assert report.tensors_merged > 0 and report.files_written == len(os.listdir(base)) + 1
    if family == "bert":
        assert report.tensors_replaced == 2  # classifier.weight, classifier.bias
    # same file names plus the merge's record; shard headers and index byte for byte
    assert sorted(os.listdir(tmp_path / "out")) == sorted([*os.listdir(base), offline.MERGE_RECORD])
    record = json.loads((tmp_path / "out" / offline.MERGE_RECORD).read_text())
    assert record["base_dir"] == str(base) and record["adapter_dir"] == str(adapter)
    for name in os.listdir(base):
        if name.endswith(".safetensors"):
            a, b = read_safetensors_header(base / name), read_safetensors_header(tmp_path / "out" / name)
            assert (a.tensors.keys(), a.metadata, a.file_size) == (b.tensors.keys(), b.metadata, b.file_size)
            assert [(t.dtype, t.shape, t.begin, t.end) for t in a.tensors.values()] == [
                (t.dtype, t.shape, t.begin, t.end) for t in b.tensors.values()
            ]
        else:
            assert (base / name).read_bytes() == (tmp_path / "out" / name).read_bytes()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bit_identical_to_ia3fx_in_memory_merge(tmp_path, family):
    make, kwargs = FAMILIES[family]
    model = make()
    model.save_pretrained(tmp_path / "base")
    _, ia3_model = peft_and_ia3(model, kwargs, example_inputs=token_inputs(family))
    ia3_model.save_pretrained(tmp_path / "adapter")
    merged = ia3_model.merge_and_unload()
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progress=False)
    assert_bit_identical(tmp_path / "out", merged, tmp_path / "base")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_row_blocks_give_the_same_bits(tmp_path, family, monkeypatch):
    """Weights are folded a few rows at a time; tiny blocks must not change a bit."""
    monkeypatch.setattr(offline, "FOLD_CHUNK_BYTES", 100)
    monkeypatch.setattr(offline, "COPY_CHUNK_BYTES", 1000)
    base, adapter, merged = make_checkpoint(tmp_path, family, torch.bfloat16, "20KB")
    merge_checkpoint(base, adapter, tmp_path / "out", progress=False)
    assert_bit_identical(tmp_path / "out", merged, base)


def test_buffered_copy_when_the_kernel_cannot(tmp_path, monkeypatch):
    monkeypatch.setattr(offline, "BUFFER_BYTES", 4096)
    monkeypatch.setattr(offline, "USE_COPY_FILE_RANGE", False)
    base, adapter, merged = make_checkpoint(tmp_path, "llama", shard="20KB")
    merge_checkpoint(base, adapter, tmp_path / "out", progress=False)
    assert_bit_identical(tmp_path / "out", merged, base)


@pytest.mark.parametrize("ff", [[], ["dwconv"]], ids=["output", "input-grouped"])
def test_conv2d_with_groups(tmp_path, ff, monkeypatch):
    """ConvNext's depthwise ``dwconv`` (groups = channels): groups come from the meta model."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    def convnext():
        torch.manual_seed(0)
        config = ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3, image_size=32)
        model = ConvNextForImageClassification(config).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_()  # transformers zero-inits them: make the bias fold visible
        return model

    monkeypatch.setattr(offline, "FOLD_CHUNK_BYTES", 64)
    kwargs = {"target_modules": ["dwconv", "pwconv2", "patch_embeddings"], "feedforward_modules": ff}
    base, adapter, merged = make_checkpoint(tmp_path, "llama", peft_kwargs=kwargs, factory=convnext)
    merge_checkpoint(base, adapter, tmp_path / "out", progress=False)
    assert_bit_identical(tmp_path / "out", merged, base)


def test_pytorch_bin_adapter(tmp_path):
    base, _, merged = make_checkpoint(tmp_path, "gpt2")
    model = tiny_gpt2()
    pm = peft.get_peft_model(model, peft.IA3Config())
    randomize_peft(pm)
    pm.save_pretrained(tmp_path / "bin-adapter", safe_serialization=False)
    assert os.path.isfile(tmp_path / "bin-adapter" / "adapter_model.bin")
    merge_checkpoint(base, tmp_path / "bin-adapter", tmp_path / "out", progress=False)
    assert_bit_identical(tmp_path / "out", merged, base)


@pytest.mark.parametrize(
    "family,auto",
    [("llama", "AutoModelForCausalLM"), ("gpt2", "AutoModelForCausalLM"), ("bert", "AutoModelForSequenceClassification")],
)
def test_merged_directory_loads_and_matches_peft_logits(tmp_path, family, auto):
    import transformers

    base, adapter, merged = make_checkpoint(tmp_path, family, shard="20KB")
    merge_checkpoint(base, adapter, tmp_path / "out", progress=False)
    loaded = getattr(transformers, auto).from_pretrained(tmp_path / "out").eval()
    inputs = token_inputs(family, mask=True)
    with torch.no_grad():
        want, got = logits(merged(**inputs)), logits(loaded(**inputs))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# --- files ---------------------------------------------------------------------------------------
def test_other_files_are_copied_and_stale_weights_left_out(tmp_path):
    base, adapter, _ = make_checkpoint(tmp_path, "llama", shard="20KB")
    extras = {
        "tokenizer.json": b'{"version": "1.0"}',
        "tokenizer_config.json": b"{}",
        "special_tokens_map.json": b"{}",
        "README.md": "# model\n\u00e9".encode(),
        "assets/vocab.txt": b"a\nb\n",
    }
    for rel, data in extras.items():
        (base / rel).parent.mkdir(exist_ok=True)
        (base / rel).write_bytes(data)
    (base / "pytorch_model.bin").write_bytes(b"stale unmerged weights")
    (base / ".git").mkdir()
    (base / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    with pytest.warns(UserWarning, match="pytorch_model.bin is not copied"):
        report = merge_checkpoint(base, adapter, tmp_path / "out", progress=False)
    out = snapshot(tmp_path / "out")
    src = snapshot(base)
    for rel in [*extras, "config.json", "generation_config.json", "model.safetensors.index.json"]:
        assert out[rel] == src[rel], rel
    assert "pytorch_model.bin" not in out and ".git/HEAD" not in out
    assert report.skipped_files == [".git/", "pytorch_model.bin"]
    assert report.bytes_written == sum(len(v) for v in out.values())
    assert report.files_written == len(out)


def test_progress_callback_and_cli(tmp_path, capsys):
    base, adapter, merged = make_checkpoint(tmp_path, "llama")
    seen = []
    merge_checkpoint(base, adapter, tmp_path / "out", progress=lambda done, total: seen.append((done, total)))
    total = sum(os.path.getsize(base / f) for f in os.listdir(base))
    assert seen and seen[-1] == (total, total)

    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "cli")]) == 0
    assert "merged 6 layers" in capsys.readouterr().out
    assert_bit_identical(tmp_path / "cli", merged, base)
    assert ia3fx.merge_checkpoint is merge_checkpoint


def cli_error(capsys, *argv) -> str:
    capsys.readouterr()
    assert main(["merge", *map(str, argv)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ia3fx merge: error:"), err
    return err


# --- refusals -----------------------------------------------------------------------------------
def test_tied_weight_absent_from_the_checkpoint(tmp_path, capsys):
    """GPT-2's lm_head is tied to wte and not stored: merging a vector into it cannot be done."""
    base, adapter, _ = make_checkpoint(tmp_path, "gpt2", peft_kwargs={"target_modules": ["c_attn", "lm_head"], "feedforward_modules": []})
    with pytest.raises(CheckpointError, match=r"adapter tensor 'base_model\.model\.lm_head\..*'lm_head\.weight'.*not in the base.*tied"):
        merge_checkpoint(base, adapter, tmp_path / "out", progress=False)
    assert "lm_head" in cli_error(capsys, "--base", base, "--adapter", adapter, "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_vector_of_the_wrong_shape(tmp_path):
    base, adapter, _ = make_checkpoint(tmp_path, "llama")
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l"
    tensors[key] = tensors[key].reshape(1, -1)  # (32, 1) transposed
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{key}' has shape \[1, 32\], the layer needs \[32, 1\]"):
        merge_checkpoint(base, adapter, tmp_path / "out", progress=False)


def test_checkpoint_that_does_not_fit_its_config(tmp_path):
    base, adapter, _ = make_checkpoint(tmp_path, "llama")
    config = json.loads((base / "config.json").read_text())
    config["intermediate_size"] = 256
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight' has shape \[64, 128\].*\[64, 256\]"):
        merge_checkpoint(base, adapter, tmp_path / "out", progress=False)


def test_modules_to_save_tensor_of_the_wrong_shape(tmp_path):
    base, adapter, _ = make_checkpoint(tmp_path, "bert")
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors["base_model.model.classifier.bias"] = torch.zeros(5)
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"classifier\.bias' has shape \[5\], base tensor 'classifier\.bias' has \[3\]"):
        merge_checkpoint(base, adapter, tmp_path / "out", progress=False)


@pytest.mark.parametrize(
    "key,message",
    [
        ("model.layers.0.self_attn.k_proj.ia3_l", "does not start with 'base_model.model.'"),
        ("base_model.model.model.layers.0.self_attn.q_proj.ia3_l", "is not a layer that this adapter's config targets"),
        ("base_model.model.model.extra.weight", "neither an .*vector nor a tensor of the base checkpoint"),
        ("base_model.model.model.norm.weight", r"has shape \[64, 1\], base tensor 'model.norm.weight' has \[64\]"),
    ],
)
def test_adapter_keys_that_do_not_fit(tmp_path, key, message):
    base, adapter, _ = make_checkpoint(tmp_path, "llama")
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors[key] = torch.ones(64, 1)
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=message) as info:
        merge_checkpoint(base, adapter, tmp_path / "out", progress=False)
    assert key in str(info.value)


def test_not_an_adapter_and_not_ia3(tmp_path, capsys):
    base, adapter, _ = make_checkpoint(tmp_path, "llama")
    with pytest.raises(CheckpointError, match="not a PEFT adapter directory"):
        merge_checkpoint(base, base, tmp_path / "out", progress=False)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["peft_type"] = "LORA"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="peft_type='LORA'"):
        merge_checkpoint(base, adapter, tmp_path / "out", progress=False)
    assert "LORA" in cli_error(capsys, "--base", base, "--adapter", adapter, "--out", tmp_path / "out")
    with pytest.raises(CheckpointError, match="not a directory"):
        merge_checkpoint(base, tmp_path / "nowhere", tmp_path / "out", progress=False)


def test_base_without_weights_or_config(tmp_path):
    base, adapter, _ = make_checkpoint(tmp_path, "llama")
    os.rename(base / "model.safetensors", base / "weights.safetensors")
    with pytest.raises(CheckpointError, match="has no model.safetensors or model.safetensors.index.json"):
        merge_checkpoint(base, adapter, tmp_path / "out", progress=False)
    os.rename(base / "weights.safetensors", base / "model.safetensors")
    os.remove(base / "config.json")
    with pytest.raises(CheckpointError, match="has no config.json"):
        merge_checkpoint(base, adapter, tmp_path / "out", progress=False)


def _corrupt(path, how: str) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    if how == "truncated":
        path.write_bytes(data[: len(data) - 100])
    elif how == "tiny":
        path.write_bytes(data[:5])
    elif how == "header-length":
        path.write_bytes(struct.pack("<Q", len(data)) + data[8:])
    elif how == "json":
        path.write_bytes(data[:8] + b"{" * n + data[8 + n :])
    elif how == "offsets":
        header = json.loads(data[8 : 8 + n])
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"][1] += 10**6
        raw = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


@pytest.mark.parametrize(
    "how,message",
    [
        ("truncated", r"ends at byte \d+, past the end of the file"),
        ("tiny", "truncated safetensors file"),
        ("header-length", "truncated safetensors file"),
        ("json", "header is not valid JSON"),
        ("offsets", "past the end of the file"),
    ],
)
def test_damaged_shard_is_named(tmp_path, how, message):
    base, adapter, _ = make_checkpoint(tmp_path, "llama", shard="20KB")
    shard = sorted(f for f in os.listdir(base) if f.endswith(".safetensors"))[1]
    _corrupt(base / shard, how)
    with pytest.raises(CheckpointError, match=message) as info:
        merge_checkpoint(base, adapter, tmp_path / "out", progress=False)
    assert shard in str(info.value)
    assert not (tmp_path / "out").exists()


def test_index_naming_a_missing_tensor(tmp_path):
    base, adapter, _ = make_checkpoint(tmp_path, "llama", shard="20KB")
    index = json.loads((base / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.extra.weight"] = next(iter(index["weight_map"].values()))
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'model.extra.weight'"):
        merge_checkpoint(base, adapter, tmp_path / "out", progress=False)


@pytest.mark.parametrize("where", ["base", "base/sub", "adapter", "adapter/x/y", "."])
def test_never_writes_into_the_inputs(tmp_path, where, capsys):
    base, adapter, _ = make_checkpoint(tmp_path, "llama")
    before = snapshot(tmp_path)
    out = tmp_path / where
    with pytest.raises(CheckpointError, match="overlap"):
        merge_checkpoint(base, adapter, out, force=True, progress=False)
    assert "overlap" in cli_error(capsys, "--base", base, "--adapter", adapter, "--out", out, "--force")
    # through a symlink too
    os.symlink(base, tmp_path / "link")
    with pytest.raises(CheckpointError, match="overlap"):
        merge_checkpoint(base, adapter, tmp_path / "link" / "merged", progress=False)
    os.remove(tmp_path / "link")
    assert snapshot(tmp_path) == before


def test_existing_output_needs_force(tmp_path, capsys):
    base, adapter, merged = make_checkpoint(tmp_path, "llama")
    out = tmp_path / "out"
    merge_checkpoint(base, adapter, out, progress=False)  # an earlier merge's output
    (out / "old.txt").write_text("previous")
    with pytest.raises(FileExistsError, match="--force"):
        merge_checkpoint(base, adapter, out, progress=False)
    assert "already exists" in cli_error(capsys, "--base", base, "--adapter", adapter, "--out", out)
    assert (out / "old.txt").read_text() == "previous"
    merge_checkpoint(base, adapter, out, force=True, progress=False)
    assert not (out / "old.txt").exists()
    assert_bit_identical(out, merged, base)
    assert sorted(os.listdir(tmp_path)) == ["adapter", "base", "out"]  # no temporary leftovers


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "force-over-existing"])
def test_failure_midway_leaves_no_output(tmp_path, existing, monkeypatch):
    base, adapter, _ = make_checkpoint(tmp_path, "llama", shard="20KB")
    out = tmp_path / "out"
    if existing:  # an earlier merge's output, which --force may replace
        merge_checkpoint(base, adapter, out, progress=False)
        (out / "old.txt").write_text("previous")
        before = snapshot(out)
    calls = []

    def failing_fold(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the second shard or so
        return real_fold(*args, **kwargs)

    real_fold = offline.fold_weight
    monkeypatch.setattr(offline, "fold_weight", failing_fold)
    threads = torch.get_num_threads()
    with pytest.raises(KeyboardInterrupt):
        merge_checkpoint(base, adapter, out, force=True, progress=False)
    assert len(calls) == 3
    assert torch.get_num_threads() == threads  # the merge folds on one thread, then restores
    if existing:
        assert snapshot(out) == before
    else:
        assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["adapter", "base"] + (["out"] if existing else []))


def test_peak_memory_does_not_grow_with_the_checkpoint(tmp_path, monkeypatch):
    """Folding reads a bounded block of rows: the largest buffer is FOLD_CHUNK_BYTES, not a shard."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def wide_llama():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=4096, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2)
        return LlamaForCausalLM(config).eval()

    base, adapter, merged = make_checkpoint(tmp_path, "llama", factory=wide_llama)
    sizes = []
    real = offline._read_exact

    def spy(fd, n, offset, buf=None):
        sizes.append(len(buf) if buf is not None else n)
        return real(fd, n, offset, buf)

    monkeypatch.setattr(offline, "_read_exact", spy)
    monkeypatch.setattr(offline, "FOLD_CHUNK_BYTES", 256 * 1024)
    merge_checkpoint(base, adapter, tmp_path / "out", progress=False)
    assert_bit_identical(tmp_path / "out", merged, base)
    down_proj = 256 * 4096 * 4
    assert max(sizes) <= 256 * 1024 < down_proj


def test_base_layers_saved_in_the_adapter_are_loaded_then_folded(tmp_path):
    """PEFT saves targeted embedding-like layers (``lm_head.base_layer.weight``) and loads them back
    over the base: the merge folds the adapter's copy, as ``PeftModel.from_pretrained`` would."""
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    model.save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(model, peft.IA3Config(target_modules=["k_proj", "lm_head"], feedforward_modules=[]))
    randomize_peft(pm)
    with torch.no_grad():
        pm.base_model.model.lm_head.base_layer.weight.mul_(-2.0)  # e.g. a resized / retrained head
    pm.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.lm_head.base_layer.weight" in saved
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    reference = peft.PeftModel.from_pretrained(reloaded, tmp_path / "adapter").merge_and_unload()
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progress=False)
    assert_bit_identical(tmp_path / "out", reference, tmp_path / "base")
