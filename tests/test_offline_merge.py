"""Offline checkpoint merge (``ia3fx.offline.merge_checkpoint`` / ``ia3fx merge``).

The reference is PEFT: the same base weights and adapter, ``merge_and_unload()`` in memory; the
offline output must hold bit-identical tensors (``torch.equal``), load with transformers, and
give the same logits. Then every refusal: bad inputs, overlapping directories, failures midway.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import struct
import threading

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
from ia3fx import offline, offline_fold, offline_meta, offline_plan, offline_stream
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


@pytest.fixture
def model_plans(monkeypatch) -> list[str]:
    """Base directories the merge planned by building the model on the meta device (the slow path)."""
    calls: list[str] = []
    real = offline_meta.layers_from_model

    def spy(base_dir, config):
        calls.append(base_dir)
        return real(base_dir, config)

    monkeypatch.setattr(offline_meta, "layers_from_model", spy)
    return calls


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
def test_bit_identical_to_peft_merge_and_unload(tmp_path, family, dtype, shard, model_plans):
    base, adapter, merged = make_checkpoint(tmp_path, family, dtype, shard)
    if shard:
        assert len([f for f in os.listdir(base) if f.endswith(".safetensors")]) > 1
    report = merge_checkpoint(base, adapter, tmp_path / "out", progress=False)
    assert_bit_identical(tmp_path / "out", merged, base)
    assert model_plans == []  # planned from names (GPT-2: Conv1D), no model built
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
    """Weights are folded a few rows at a time, and bf16 blocks a few values at a time within a
    block (in cache); tiny blocks and slices (smaller than a row, and with a short last one) must not change a bit."""
    monkeypatch.setattr(offline_stream, "FOLD_CHUNK_BYTES", 100)
    monkeypatch.setattr(offline_fold, "BF16_PASS_ELEMENTS", 7)
    monkeypatch.setattr(offline_stream, "COPY_CHUNK_BYTES", 1000)
    base, adapter, merged = make_checkpoint(tmp_path, family, torch.bfloat16, "20KB")
    merge_checkpoint(base, adapter, tmp_path / "out", progress=False)
    assert_bit_identical(tmp_path / "out", merged, base)


def test_buffered_copy_when_the_kernel_cannot(tmp_path, monkeypatch):
    monkeypatch.setattr(offline_stream, "BUFFER_BYTES", 4096)
    monkeypatch.setattr(offline_stream, "USE_COPY_FILE_RANGE", False)
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

    monkeypatch.setattr(offline_stream, "FOLD_CHUNK_BYTES", 64)
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
    threads = set()

    def callback(done, total):
        seen.append((done, total))
        threads.add(threading.current_thread())

    merge_checkpoint(base, adapter, tmp_path / "out", progress=callback)
    total = sum(os.path.getsize(base / f) for f in os.listdir(base))
    assert seen and seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert threads == {threading.main_thread()}  # never from the copying thread

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


def test_checkpoint_that_does_not_fit_its_config(tmp_path, model_plans):
    """Planned from names, vectors are checked against the checkpoint's own weights (what is
    merged); planned from the model (here: targets as a regex), also against config.json."""
    base, adapter, _ = make_checkpoint(tmp_path, "llama")
    config = json.loads((base / "config.json").read_text())
    config["intermediate_size"] = 256
    (base / "config.json").write_text(json.dumps(config))
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.mlp.down_proj.ia3_l"
    tensors[key] = torch.ones(1, 256)  # fits config.json, not the checkpoint's (64, 128) weight
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=rf"{key}' has shape \[1, 256\], the layer needs \[1, 128\]"):
        merge_checkpoint(base, adapter, tmp_path / "out", progress=False)
    assert model_plans == []
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    adapter_config["target_modules"] = r".*\.(k_proj|v_proj|down_proj)"
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight' has shape \[64, 128\].*\[64, 256\]"):
        merge_checkpoint(base, adapter, tmp_path / "out", progress=False)
    assert model_plans == [str(base)]
    assert not (tmp_path / "out").exists()


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

    real_fold = offline_fold.fold_block
    monkeypatch.setattr(offline_fold, "fold_block", failing_fold)
    threads = torch.get_num_threads()
    with pytest.raises(KeyboardInterrupt):
        merge_checkpoint(base, adapter, out, force=True, progress=False)
    assert len(calls) == 3
    assert torch.get_num_threads() == threads  # the merge leaves torch's settings alone
    assert not [t for t in threading.enumerate() if t.name == "ia3fx-merge-copy"]  # the copy was stopped
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
    real = offline_stream.read_exact

    def spy(fd, n, offset, buf=None):
        sizes.append(len(buf) if buf is not None else n)
        return real(fd, n, offset, buf)

    monkeypatch.setattr(offline_stream, "read_exact", spy)
    monkeypatch.setattr(offline_stream, "FOLD_CHUNK_BYTES", 256 * 1024)
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


# --- the fast path: names instead of the model, numpy instead of torch, the kernel copying ------
def test_merge_command_imports_neither_torch_nor_transformers(tmp_path):
    """``ia3fx merge`` on a Llama checkpoint runs in an interpreter that never imports them."""
    import subprocess
    import sys

    base, adapter, merged = make_checkpoint(tmp_path, "llama", torch.bfloat16, "20KB")
    code = (
        "import json, sys\nfrom ia3fx.cli import main\n"
        f"rc = main(['merge', '--base', {str(base)!r}, '--adapter', {str(adapter)!r}, '--out', {str(tmp_path / 'out')!r}])\n"
        "print(json.dumps([rc, sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft'))]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rc, heavy = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (rc, heavy) == (0, []), proc.stderr
    assert_bit_identical(tmp_path / "out", merged, base)


def test_targets_the_names_cannot_settle_are_planned_with_the_model(tmp_path, model_plans):
    """A regex target (it could match modules the checkpoint holds no tensor of): the meta model."""
    base, _, _ = make_checkpoint(tmp_path, "llama")
    kwargs = {"target_modules": r".*\.(k_proj|down_proj)", "feedforward_modules": r".*\.down_proj"}
    _, adapter, merged = make_checkpoint(tmp_path / "regex", "llama", peft_kwargs=kwargs)
    merge_checkpoint(tmp_path / "regex" / "base", adapter, tmp_path / "out", progress=False)
    assert_bit_identical(tmp_path / "out", merged, tmp_path / "regex" / "base")
    assert model_plans == [str(tmp_path / "regex" / "base")]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_names_and_model_give_the_same_layers(tmp_path, family):
    """The plan from names equals the meta model's: kinds (GPT-2's Conv1D from CONV1D_LAYERS),
    placements, shapes, biases, modules_to_save."""
    kwargs = {"gpt2": {"target_modules": ["c_attn", "c_proj", "c_fc"], "feedforward_modules": ["c_fc"]}}.get(family)
    base, adapter, _ = make_checkpoint(tmp_path, family, peft_kwargs=kwargs)
    config = offline._read_adapter(str(adapter)).config
    tensors = read_safetensors_header(base / "model.safetensors").tensors
    with pytest.warns() if family == "bert" else contextlib.nullcontext():  # PEFT saves classifier and score
        by_names = offline_plan.layers_from_names(str(base), config, tensors)
    by_model = offline_meta.layers_from_model(str(base), config)
    assert by_names.targets == by_model.targets and by_names.modules_to_save == by_model.modules_to_save
    kinds = {t.kind for t in by_names.targets.values()}
    assert kinds == ({"conv1d"} if family == "gpt2" else {"linear"})


def test_conv1d_table_matches_transformers():
    """CONV1D_LAYERS names exactly the Conv1D modules transformers builds for those architectures,
    and no nn.Linear of theirs has such a name."""
    from transformers import AutoConfig, AutoModel
    from transformers.pytorch_utils import Conv1D

    small = {"n_embd": 16, "n_layer": 1, "n_head": 2, "hidden_size": 16, "num_hidden_layers": 1,
             "num_attention_heads": 2, "add_cross_attention": True}
    for model_type, names in offline_plan.CONV1D_LAYERS.items():
        with torch.device("meta"):
            model = AutoModel.from_config(AutoConfig.for_model(model_type, **small))
        conv1d = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, Conv1D)}
        linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        assert conv1d == names and not (linear & names), model_type


def test_kernel_clone_path_writes_only_the_planned_ranges(tmp_path, monkeypatch):
    """Where the filesystem clones files (FICLONE), only the planned tensors are written over the
    clone; here the clone is emulated by a full in-kernel copy, so the same code path runs."""
    base, adapter, merged = make_checkpoint(tmp_path, "gpt2", torch.bfloat16, "20KB")
    probe = tmp_path / "probe"
    probe.write_bytes(b"x" * 10)
    src, dst = os.open(probe, os.O_RDONLY), os.open(tmp_path / "probe-copy", os.O_WRONLY | os.O_CREAT)
    try:
        cloned = offline_stream.clone_file(src, dst)  # True on btrfs/XFS, False on ext4/tmpfs: never an error
    finally:
        os.close(src), os.close(dst)
    assert cloned == ((tmp_path / "probe-copy").read_bytes() == b"x" * 10)
    clones = []

    def full_copy(src_fd, dst_fd):
        size = os.fstat(src_fd).st_size
        done = 0
        while done < size:
            done += os.copy_file_range(src_fd, dst_fd, size - done, done, done)
        clones.append(size)
        return True

    monkeypatch.setattr(offline_stream, "clone_file", full_copy)
    seen = []
    merge_checkpoint(base, adapter, tmp_path / "out", progress=lambda done, total: seen.append((done, total)))
    assert len(clones) == len([f for f in os.listdir(base) if f.endswith(".safetensors")]) > 1
    assert_bit_identical(tmp_path / "out", merged, base)
    assert seen[-1][0] == seen[-1][1]


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32", "F64"])
def test_numpy_fold_equals_torch_bit_for_bit(dtype):
    """offline_fold's conversions and products against torch's (the arithmetic of PEFT and ia3fx.scaling),
    on random values and the edge cases: ties, subnormals, overflow to inf, inf, NaN."""
    from ia3fx.scaling import fold_weight

    tdtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}[dtype]
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g, dtype=torch.float64).mul(torch.logspace(-8, 8, 96, dtype=torch.float64))
    w[0, :6] = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1e-42], dtype=torch.float64)
    w = w.to(tdtype)
    vdtype = torch.float64 if dtype == "F64" else torch.float32
    v = (1 + torch.randn(96, generator=g)).to(vdtype)
    v[:3] = torch.tensor([3e38, 1e-39, -2.0])
    raw = w.contiguous().view(torch.uint8).numpy().tobytes()
    for feedforward in (False, True):
        vec = v if feedforward else v[:64]
        want = fold_weight(w, vec, "linear", feedforward)
        scale = offline_fold.weight_scale("linear", feedforward, vec.numpy(), tuple(w.shape))
        got = offline_fold.fold_block(raw, dtype, dtype, tuple(w.shape), scale)
        want_bits = want.view(torch.uint8).numpy()
        assert got.tobytes() == want_bits.tobytes(), (dtype, feedforward)
    wide = torch.randn(4096, generator=g, dtype=torch.float64) * 1e3
    for other in ("BF16", "F16", "F32"):  # narrowing an adapter's copy to the base's dtype (fp64 via fp32, as torch)
        t = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[other]
        assert offline_fold.encode(wide.numpy(), other).tobytes() == wide.to(t).view(torch.uint8).numpy().tobytes()


def test_a_failed_range_copy_fails_the_merge_and_leaves_no_output(tmp_path, monkeypatch):
    """An error of the kernel's copy midway (here EIO on the fourth range) reaches the caller, and the
    merge leaves nothing behind."""
    import errno

    base, adapter, _ = make_checkpoint(tmp_path, "llama", shard="20KB")
    real = os.copy_file_range
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 4:
            raise OSError(errno.EIO, "Input/output error")
        return real(*args)

    monkeypatch.setattr(os, "copy_file_range", failing)
    with pytest.raises(OSError, match="Input/output error"):
        merge_checkpoint(base, adapter, tmp_path / "out", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["adapter", "base"]


@pytest.mark.parametrize("dtype", ["F64", "F32", "F16", "BF16"])
def test_nonfinite_check_on_bytes_equals_numpys(dtype):
    """The plan checks vectors for NaN/inf on their exponent bits, without numpy: every 16-bit
    pattern one by one, and for fp32/fp64 the patterns around inf and NaN plus random ones, alone
    and hidden in a finite vector."""
    import numpy as np

    wide = {"F64": np.uint64, "F32": np.uint32, "F16": np.uint16, "BF16": np.uint16}[dtype]
    if wide is np.uint16:
        patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    else:
        bits = 64 if dtype == "F64" else 32
        mant = 52 if dtype == "F64" else 23
        inf = ((1 << (bits - mant - 1)) - 1) << mant
        near = [inf - 1, inf, inf + 1, inf | ((1 << mant) - 1), inf >> 1, 0, 1, (1 << mant) - 1]
        near += [p | (1 << (bits - 1)) for p in near]
        rng = np.random.default_rng(0)
        patterns = np.concatenate([np.array(near, dtype=wide), rng.integers(0, 1 << (bits - 1), 2000, dtype=np.uint64,
                                                                             endpoint=True).astype(wide)])
    values = offline_fold.decode(patterns.tobytes(), dtype)
    want = ~np.isfinite(values)
    got = [offline_plan.has_nonfinite(p.tobytes(), dtype) for p in patterns]
    assert got == want.tolist() and want.any() and not want.all()
    finite = patterns[~want][:500]
    assert not offline_plan.has_nonfinite(finite.tobytes(), dtype)
    for bad in patterns[want][:20]:
        hidden = finite.copy()
        hidden[123] = bad
        assert offline_plan.has_nonfinite(hidden.tobytes(), dtype)


def test_the_plan_is_checked_and_copying_started_before_numpy_is_imported(tmp_path):
    """numpy's import (a fifth of a second) overlaps with the kernel's copy: the plan, its checks
    (vectors' NaN/inf included) and the start of the copying need no numpy."""
    import subprocess
    import sys

    base, adapter, merged = make_checkpoint(tmp_path, "llama", torch.bfloat16, "20KB")
    code = (
        "import json, sys\nfrom ia3fx import offline, offline_stream\nseen = []\nreal = offline.start_copying\n"
        "def spy(jobs):\n    seen.append('numpy' in sys.modules)\n    return real(jobs)\n"
        "offline.start_copying = spy\n"
        f"offline.merge_checkpoint({str(base)!r}, {str(adapter)!r}, {str(tmp_path / 'out')!r}, progress=False)\n"
        "print(json.dumps([seen, 'numpy' in sys.modules]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [[False], True]
    assert_bit_identical(tmp_path / "out", merged, base)


def test_a_failed_fold_stops_a_copy_still_running(tmp_path, monkeypatch):
    """The copying thread is still at work (each of its chunks slowed down) when a fold fails: the
    thread is stopped within a chunk, the error reaches the caller, and nothing is left behind."""
    import time

    base, adapter, _ = make_checkpoint(tmp_path, "llama", shard="20KB")
    monkeypatch.setattr(offline_stream, "COPY_CHUNK_BYTES", 512)
    real_copy = os.copy_file_range
    copied = []

    def slow_copy(*args):
        copied.append(threading.current_thread().name)
        time.sleep(0.01)
        return real_copy(*args)

    def failing_fold(*args, **kwargs):
        deadline = time.monotonic() + 30  # fail once the copy is under way (it starts in its own thread)
        while not copied and time.monotonic() < deadline:
            time.sleep(0.005)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "copy_file_range", slow_copy)
    monkeypatch.setattr(offline_fold, "fold_block", failing_fold)
    with pytest.raises(OSError, match="No space left"):
        merge_checkpoint(base, adapter, tmp_path / "out", progress=False)
    assert not [t for t in threading.enumerate() if t.name == "ia3fx-merge-copy"]
    assert sorted(os.listdir(tmp_path)) == ["adapter", "base"]
    total = sum(os.path.getsize(base / f) for f in os.listdir(base) if f.endswith(".safetensors"))
    assert copied and set(copied) == {"ia3fx-merge-copy"} and len(copied) < total // 512  # stopped early
