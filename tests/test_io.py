"""PEFT-format adapter files: interop with PEFT in both directions, the configs written, loading
errors that leave the model unchanged, ``.bin`` files through ``weights_only`` only, atomic saves.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import warnings

import peft
import pytest
import torch
from conftest import (
    custom_input,
    custom_model,
    logits,
    randomize_peft,
    tiny_bert_seq_cls,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
    token_inputs,
)
from safetensors.torch import load_file, save_file

import ia3fx
import ia3fx.io as ia3io
from ia3fx import AdapterLoadError, IA3Config, IA3Model

ATOL = 1e-5
CONFIG_KEYS = {
    "auto_mapping",
    "base_model_name_or_path",
    "exclude_modules",
    "fan_in_fan_out",
    "feedforward_modules",
    "inference_mode",
    "init_ia3_weights",
    "modules_to_save",
    "peft_type",
    "peft_version",
    "revision",
    "target_modules",
    "task_type",
}

# family -> (factory, config kwargs of the first adapter, of a second adapter with its own targets)
FAMILIES = {
    "llama": (tiny_llama, {}, {"target_modules": ["q_proj", "o_proj"], "feedforward_modules": []}),
    "gpt2": (tiny_gpt2, {}, {"target_modules": ["c_attn"], "feedforward_modules": []}),
    "bert": (
        tiny_bert_seq_cls,
        {"task_type": "SEQ_CLS"},
        {"target_modules": ["query", "value"], "feedforward_modules": [], "task_type": "SEQ_CLS"},
    ),
    "t5": (tiny_t5, {}, {"target_modules": ["q", "o"], "feedforward_modules": []}),
}


def randomize_ia3(model: IA3Model, adapter: str, seed: int = 7) -> None:
    """Non-trivial state for one ia3fx adapter: vectors ~ N(1, 0.3), head copies perturbed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.ia3_l[adapter].parameters():
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
        for p in model.modules_to_save[adapter].parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))


def run(model, inputs):
    with torch.no_grad():
        return logits(model(**inputs) if isinstance(inputs, dict) else model(inputs))


def files_of(directory) -> dict[str, bytes]:
    return {n: (directory / n).read_bytes() for n in sorted(os.listdir(directory)) if (directory / n).is_file()}


def read_config(directory) -> dict:
    return json.loads((directory / "adapter_config.json").read_text())


# --- interop with PEFT, both directions --------------------------------------------------------
def test_from_pretrained_with_a_static_trace(tmp_path):
    """``dynamic=False`` reaches the trace: every size fixed, and another shape is traced again."""
    make, kwargs, _ = FAMILIES["llama"]
    base, inputs = make(), token_inputs("llama")
    base.config.use_cache = False  # plain forward calls run the block graphs
    pm = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**kwargs)).eval()
    randomize_peft(pm, seed=3)
    pm.save_pretrained(tmp_path)
    model = IA3Model.from_pretrained(copy.deepcopy(base), tmp_path, example_inputs=inputs, dynamic=False)
    vals = [n.meta["val"] for n in model.graph_module.graph.nodes if n.op == "placeholder"]
    assert all(isinstance(d, int) for v in vals for d in v.shape)
    other = token_inputs("llama", batch=3, seq=5, seed=4)
    for batch in (inputs, other):
        assert torch.allclose(run(model, batch), run(pm, batch), atol=ATOL)
    assert len(model.block_graphs) == 2  # the model's blocks: one capture per shape


@pytest.mark.parametrize("family", list(FAMILIES))
def test_peft_saved_adapters_load_in_ia3fx(tmp_path, family):
    """PEFT writes ``default`` and ``other`` (in ``other/``); ia3fx reads both, same logits."""
    make, kwargs, other_kwargs = FAMILIES[family]
    base, inputs = make(), token_inputs(family)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**kwargs)).eval()
    pm.add_adapter("other", peft.IA3Config(**other_kwargs))
    randomize_peft(pm, seed=1)
    pm.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    expected_default = run(pm, inputs)
    pm.set_adapter("other")
    expected_other = run(pm, inputs)

    model = IA3Model.from_pretrained(copy.deepcopy(base), tmp_path, example_inputs=inputs)
    assert not model.training
    assert torch.allclose(run(model, inputs), expected_default, atol=ATOL)
    model.load_adapter(tmp_path / "other", "other")
    assert model.active_adapters == ["default"]
    model.set_adapter("other")
    assert torch.allclose(run(model, inputs), expected_other, atol=ATOL)
    assert not torch.allclose(expected_default, expected_other, atol=1e-3)  # the adapters do differ


@pytest.mark.parametrize("family", list(FAMILIES))
def test_ia3fx_saved_adapters_load_in_peft(tmp_path, family):
    """ia3fx writes ``default`` and ``other``; ``PeftModel.from_pretrained``/``load_adapter`` read
    them and give the same logits; the files match PEFT's own in keys, shapes and dtypes."""
    make, kwargs, other_kwargs = FAMILIES[family]
    base, inputs = make(), token_inputs(family)
    model = ia3fx.get_ia3_model(copy.deepcopy(base), IA3Config(**kwargs), example_inputs=inputs)
    model.add_adapter("other", IA3Config(**other_kwargs))
    randomize_ia3(model, "default", seed=1)
    randomize_ia3(model, "other", seed=2)
    ours_default = run(model, inputs)
    model.set_adapter("other")
    ours_other = run(model, inputs)
    model.save_pretrained(tmp_path)

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.allclose(run(pm, inputs), ours_default, atol=ATOL)
    pm.load_adapter(tmp_path / "other", adapter_name="other")
    pm.set_adapter("other")
    assert torch.allclose(run(pm, inputs), ours_other, atol=ATOL)

    # the same tensors under the same names, shapes and dtypes as PEFT writes for these configs
    ref = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**kwargs))
    ref.add_adapter("other", peft.IA3Config(**other_kwargs))
    ref.save_pretrained(tmp_path / "peft")
    for sub in ("", "other"):
        theirs = load_file(tmp_path / "peft" / sub / "adapter_model.safetensors")
        mine = load_file(tmp_path / sub / "adapter_model.safetensors")
        assert {k: (v.shape, v.dtype) for k, v in mine.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
        config = read_config(tmp_path / sub)
        assert set(config) == CONFIG_KEYS
        peft_config = read_config(tmp_path / "peft" / sub)
        for key in ("target_modules", "feedforward_modules", "modules_to_save"):
            assert set(config[key] or []) == set(peft_config[key] or []), key
        for key in ("inference_mode", "peft_type", "task_type", "auto_mapping"):
            assert config[key] == peft_config[key], key
        if sub == "":
            # PEFT saves the flag of the last layer it *newly* wrapped: a second adapter on layers
            # already wrapped keeps its own value. It is ignored on load (set per layer type).
            assert config["fan_in_fan_out"] == peft_config["fan_in_fan_out"]


def test_non_default_first_adapter_goes_to_its_subdirectory(tmp_path):
    base, inputs = tiny_llama(), token_inputs("llama")
    model = ia3fx.get_ia3_model(copy.deepcopy(base), IA3Config(), example_inputs=inputs, adapter_name="mine")
    randomize_ia3(model, "mine")
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["mine"]
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mine", adapter_name="mine")
    assert torch.allclose(run(pm, inputs), run(model, inputs), atol=ATOL)
    again = IA3Model.from_pretrained(copy.deepcopy(base), tmp_path / "mine", adapter_name="mine", example_inputs=inputs)
    assert again.active_adapters == ["mine"]
    assert torch.allclose(run(again, inputs), run(model, inputs), atol=ATOL)


def test_save_pretrained_selects_adapters(tmp_path):
    model = ia3fx.get_ia3_model(custom_model("MLP"), IA3Config(target_modules=["lin0"], feedforward_modules=[]))
    model.add_adapter("b", IA3Config(target_modules=["lin1"], feedforward_modules=["lin1"]))
    model.add_adapter("c", IA3Config(target_modules=["lin1"], feedforward_modules=[]))
    model.save_pretrained(tmp_path / "all")
    assert sorted(os.listdir(tmp_path / "all")) == ["adapter_config.json", "adapter_model.safetensors", "b", "c"]
    model.save_pretrained(tmp_path / "some", selected_adapters=["b"])
    assert sorted(os.listdir(tmp_path / "some")) == ["b"]
    model.save_pretrained(tmp_path / "one", adapter_name="c")
    assert sorted(os.listdir(tmp_path / "one")) == ["c"]
    assert load_file(tmp_path / "one" / "c" / "adapter_model.safetensors")["base_model.model.lin1.ia3_l"].shape == (2, 1)
    assert load_file(tmp_path / "all" / "b" / "adapter_model.safetensors")["base_model.model.lin1.ia3_l"].shape == (1, 20)
    with pytest.raises(ValueError, match="unknown adapter"):
        model.save_pretrained(tmp_path / "x", selected_adapters=["nope"])
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="should be a directory"):
        model.save_pretrained(tmp_path / "file")


def test_randomised_init_and_fp32_vectors_on_a_bf16_base(tmp_path):
    """``init_ia3_weights=False`` vectors round-trip; on a bf16 base they are saved in fp32 (as PEFT);
    a loaded config keeps ``init_ia3_weights: false`` and loading draws nothing from the RNG."""
    base, inputs = tiny_llama().to(torch.bfloat16), token_inputs("llama")
    with pytest.warns(UserWarning, match="N\\(0, 1\\)"):
        config = IA3Config(init_ia3_weights=False)
    model = ia3fx.get_ia3_model(copy.deepcopy(base), config, example_inputs=inputs)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert not all(torch.equal(t, torch.ones_like(t)) for t in tensors.values())
    assert read_config(tmp_path)["init_ia3_weights"] is False

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.equal(run(pm, inputs), run(model, inputs))  # bit-identical on bf16
    state = torch.random.get_rng_state()
    again = IA3Model.from_pretrained(copy.deepcopy(base), tmp_path, example_inputs=inputs)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert again.peft_config["default"].init_ia3_weights is False
    assert torch.equal(run(again, inputs), run(model, inputs))


# --- the configs written -----------------------------------------------------------------------
def test_all_linear_is_written_as_two_full_name_lists(tmp_path):
    """PEFT saves ``all-linear`` as full names beside a suffix feedforward list and cannot reload
    its own file (§6.1); ia3fx reads that file, and writes both lists as full names, which PEFT
    reloads."""
    base, inputs = tiny_llama(), token_inputs("llama")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(target_modules="all-linear")).eval()
    randomize_peft(pm)
    pm.save_pretrained(tmp_path / "peft")
    with pytest.raises(ValueError, match="subset"):
        peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")

    model = IA3Model.from_pretrained(copy.deepcopy(base), tmp_path / "peft", example_inputs=inputs)
    assert torch.allclose(run(model, inputs), run(pm, inputs), atol=ATOL)
    assert len(model.targets) == 14
    model.save_pretrained(tmp_path / "ours")
    config = read_config(tmp_path / "ours")
    assert set(config["target_modules"]) == set(model.targets)
    assert "lm_head" not in config["target_modules"]
    assert set(config["feedforward_modules"]) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert torch.allclose(run(again, inputs), run(pm, inputs), atol=ATOL)


def test_default_mapping_is_written_as_peft_writes_it(tmp_path):
    model = ia3fx.get_ia3_model(tiny_llama(), IA3Config(), example_inputs=token_inputs("llama"))
    model.save_pretrained(tmp_path)
    config = read_config(tmp_path)
    assert sorted(config["target_modules"]) == ["down_proj", "k_proj", "v_proj"]
    assert config["feedforward_modules"] == ["down_proj"]
    assert config["fan_in_fan_out"] is False and config["inference_mode"] is True
    assert config["auto_mapping"] == {
        "base_model_class": "LlamaForCausalLM",
        "parent_library": "transformers.models.llama.modeling_llama",
    }


def test_explicit_targets_with_default_feedforward_reload_in_peft(tmp_path):
    """Targets ``["q_proj", "v_proj"]`` with ff ``None`` resolve ff to ``{"down_proj"}``, which PEFT
    saves unchecked and cannot reload (§6.2); ia3fx writes full-name lists, ff empty."""
    base, inputs = tiny_llama(), token_inputs("llama")
    model = ia3fx.get_ia3_model(copy.deepcopy(base), IA3Config(target_modules=["q_proj", "v_proj"]), example_inputs=inputs)
    randomize_ia3(model, "default")
    model.save_pretrained(tmp_path)
    config = read_config(tmp_path)
    assert config["feedforward_modules"] == []
    assert len(config["target_modules"]) == 4
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.allclose(run(pm, inputs), run(model, inputs), atol=ATOL)


def test_regex_configs_are_kept():
    t5_targets = r".*\.(SelfAttention|EncDecAttention)\.(k|v)|.*\.DenseReluDense\.w[io]"
    t5_ff = r".*\.DenseReluDense\.w[io]"
    model = ia3fx.get_ia3_model(
        tiny_t5(), IA3Config(target_modules=t5_targets, feedforward_modules=t5_ff), example_inputs=token_inputs("t5")
    )
    config = model._config_to_save("default")
    assert (config.target_modules, config.feedforward_modules) == (t5_targets, t5_ff)


def test_regex_fallback_when_full_names_are_ambiguous():
    """PEFT's ff rule is a plain ``endswith``: ff ``["a.lin"]`` would also mark ``xa.lin``. When the
    full-name lists would not select the same placements, ia3fx writes escaped-name regexes."""

    class Inner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.xa = Inner(), Inner()

        def forward(self, x):
            return self.xa(self.a(x))

    config = IA3Config(target_modules=r"(x?a)\.lin", feedforward_modules=r"a\.lin")
    model = ia3fx.get_ia3_model(Net(), config)
    assert {n: t.feedforward for n, t in model.targets.items()} == {"a.lin": True, "xa.lin": False}
    model.peft_config["default"].target_modules = {"a.lin", "xa.lin"}  # force past candidate 1
    model.peft_config["default"].feedforward_modules = {"lin"}
    written = model._config_to_save("default")
    assert written.target_modules == r"(?:a\.lin|xa\.lin)"
    assert written.feedforward_modules == r"(?:a\.lin)"


# --- loading: .bin, errors, nothing changed -----------------------------------------------------
def test_bin_adapter_loads_through_weights_only(tmp_path, monkeypatch):
    base, inputs = tiny_gpt2(), token_inputs("gpt2")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config()).eval()
    randomize_peft(pm)
    pm.save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.bin"]
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    model = IA3Model.from_pretrained(copy.deepcopy(base), tmp_path, example_inputs=inputs)
    assert calls == [True]
    assert torch.allclose(run(model, inputs), run(pm, inputs), atol=ATOL)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_a_pickle_that_is_not_plain_tensors_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        IA3Config(target_modules=["lin0"], feedforward_modules=[]).to_json_string()
    )
    with open(adapter / "adapter_model.bin", "wb") as f:
        pickle.dump({"base_model.model.lin0.ia3_l": _Payload()}, f)
    model = custom_model("MLP")
    with pytest.raises(AdapterLoadError, match="weights_only=True"):
        IA3Model.from_pretrained(model, adapter)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
    torch.save([torch.ones(1)], adapter / "adapter_model.bin")  # plain tensors, but not a mapping
    with pytest.raises(AdapterLoadError, match="not a mapping"):
        IA3Model.from_pretrained(model, adapter)


@pytest.fixture
def mlp_adapter(tmp_path):
    """An MLP adapter directory written by PEFT (lin0 output-scaled, lin1 a modules_to_save copy)."""
    kwargs = dict(target_modules=["lin0"], feedforward_modules=[], modules_to_save=["lin1"])
    pm = peft.get_peft_model(custom_model("MLP"), peft.IA3Config(**kwargs)).eval()
    randomize_peft(pm)
    pm.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", run(pm, custom_input())


def _snapshot(model: torch.nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [p.requires_grad for p in model.parameters()],
        model.training,
        [n for n, _ in model.named_modules()],
    )


def _assert_unchanged(model, snap):
    state, grads, training, names = snap
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert [p.requires_grad for p in model.parameters()] == grads
    assert model.training == training
    assert [n for n, _ in model.named_modules()] == names


def _edit_weights(directory, edit):
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_from_pretrained_reads_a_peft_mlp_with_modules_to_save(mlp_adapter):
    directory, expected = mlp_adapter
    model = IA3Model.from_pretrained(custom_model("MLP"), directory)
    assert torch.allclose(run(model, custom_input()), expected, atol=ATOL)
    assert set(model.adapter_state_dict()) == set(load_file(directory / "adapter_model.safetensors"))


@pytest.mark.parametrize(
    "defect,message",
    [
        (lambda t: t.pop("base_model.model.lin0.ia3_l"), r"missing keys \['base_model.model.lin0.ia3_l'\]"),
        (lambda t: t.update({"base_model.model.lin9.ia3_l": torch.ones(3, 1)}), "unexpected keys.*lin9"),
        (
            lambda t: t.update({"base_model.model.lin0.ia3_l": torch.ones(20)}),
            r"mis-shaped.*lin0.ia3_l: got \(20,\), expected \(20, 1\)",
        ),
        (
            lambda t: t.update({"base_model.model.lin0.ia3_l": torch.ones(1, 20)}),
            r"got \(1, 20\), expected \(20, 1\)",
        ),
        (
            lambda t: t.update({k.removeprefix("base_model.model."): t.pop(k) for k in list(t)}),
            "keys must start with 'base_model.model.'",
        ),
    ],
    ids=["missing", "extra", "flat", "transposed", "no-prefix"],
)
def test_defective_tensors_are_errors_and_change_nothing(mlp_adapter, defect, message):
    directory, _ = mlp_adapter
    _edit_weights(directory, defect)
    model = custom_model("MLP")
    snap = _snapshot(model)
    with pytest.raises(AdapterLoadError, match=message) as info:
        IA3Model.from_pretrained(model, directory)
    assert str(directory) in str(info.value)
    _assert_unchanged(model, snap)

    # load_adapter on an existing model: an error, and no half-added adapter
    host = ia3fx.get_ia3_model(custom_model("MLP"), IA3Config(target_modules=["lin1"], feedforward_modules=[]))
    before = (host.graph_module.code, list(host.ia3_l), dict(host.peft_config), _snapshot(host))
    with pytest.raises(AdapterLoadError, match=message):
        host.load_adapter(directory, "other")
    assert (host.graph_module.code, list(host.ia3_l), dict(host.peft_config)) == before[:3]
    _assert_unchanged(host, before[3])


def test_directories_that_are_not_ia3_adapters(tmp_path, mlp_adapter):
    model = custom_model("MLP")
    snap = _snapshot(model)
    with pytest.raises(AdapterLoadError, match="not an adapter directory"):
        IA3Model.from_pretrained(model, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterLoadError, match="has no adapter_config.json"):
        IA3Model.from_pretrained(model, tmp_path / "empty")
    # adapters saved under a parent directory: the error says where they are
    parent = tmp_path / "parent"
    parent.mkdir()
    os.rename(mlp_adapter[0], parent / "other")
    with pytest.raises(AdapterLoadError, match=r"subdirectories \['other'\].*parent.other"):
        IA3Model.from_pretrained(model, parent)
    # another PEFT type, as PEFT writes it
    lora = peft.get_peft_model(custom_model("MLP"), peft.LoraConfig(target_modules=["lin0"]))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(AdapterLoadError, match="LORA adapter"):
        IA3Model.from_pretrained(model, tmp_path / "lora")
    # a config without weights, broken JSON, no peft_type, a broken safetensors file
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "adapter_config.json").write_text(IA3Config(target_modules=["lin0"]).to_json_string())
    with pytest.raises(AdapterLoadError, match="no adapter_model.safetensors or adapter_model.bin"):
        IA3Model.from_pretrained(model, tmp_path / "noweights")
    (tmp_path / "noweights" / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterLoadError, match="not a readable JSON"):
        IA3Model.from_pretrained(model, tmp_path / "noweights")
    (tmp_path / "noweights" / "adapter_config.json").write_text('{"target_modules": ["lin0"]}')
    with pytest.raises(AdapterLoadError, match="no 'peft_type'"):
        IA3Model.from_pretrained(model, tmp_path / "noweights")
    (tmp_path / "noweights" / "adapter_config.json").write_text(IA3Config(target_modules=["lin0"]).to_json_string())
    (tmp_path / "noweights" / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(AdapterLoadError, match="not a readable safetensors"):
        IA3Model.from_pretrained(model, tmp_path / "noweights")
    # a config that matches nothing in this model
    (tmp_path / "noweights" / "adapter_config.json").write_text(
        IA3Config(target_modules=["nope"], feedforward_modules=[]).to_json_string()
    )
    save_file({"base_model.model.nope.ia3_l": torch.ones(2, 1)}, tmp_path / "noweights" / "adapter_model.safetensors")
    with pytest.raises(AdapterLoadError, match="not found in the base model"):
        IA3Model.from_pretrained(model, tmp_path / "noweights")
    _assert_unchanged(model, snap)


def test_load_adapter_is_trainable_and_name_clash(mlp_adapter):
    directory, expected = mlp_adapter
    host = ia3fx.get_ia3_model(custom_model("MLP"), IA3Config(target_modules=["lin1"], feedforward_modules=[]))
    host.train()
    host.load_adapter(directory, "frozen")
    assert not host.training  # PEFT: .eval() unless is_trainable
    assert not any(p.requires_grad for p in host.ia3_l["frozen"].parameters())
    host.set_adapter("frozen")
    assert torch.allclose(run(host, custom_input()), expected, atol=ATOL)
    assert not any(p.requires_grad for p in host.ia3_l["frozen"].parameters())  # inference_mode sticks

    host.train()
    host.load_adapter(directory, "trainable", is_trainable=True)
    assert host.training
    host.set_adapter("trainable")
    assert all(p.requires_grad for p in host.ia3_l["trainable"].parameters())
    assert all(p.requires_grad for p in host.modules_to_save["trainable"].parameters())
    with pytest.raises(ValueError, match="already exists"):
        host.load_adapter(directory, "trainable")

    trained = IA3Model.from_pretrained(custom_model("MLP"), directory, is_trainable=True)
    assert all(p.requires_grad for p in trained.ia3_l["default"].parameters())
    frozen = IA3Model.from_pretrained(custom_model("MLP"), directory)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_weighted_adapter_with_modules_to_save_round_trips(tmp_path):
    """As PEFT, a weighted adapter gets its own copy of the (original) modules_to_save, so its
    files hold the head and reload in ia3fx and PEFT."""
    base, inputs = tiny_bert_seq_cls(), token_inputs("bert")
    model = ia3fx.get_ia3_model(copy.deepcopy(base), IA3Config(task_type="SEQ_CLS"), example_inputs=inputs)
    randomize_ia3(model, "default")
    model.add_weighted_adapter(["default"], [0.5], "blend")
    model.set_adapter("blend")
    ours = run(model, inputs)
    model.save_pretrained(tmp_path, selected_adapters=["blend"])
    assert "base_model.model.classifier.weight" in load_file(tmp_path / "blend" / "adapter_model.safetensors")
    again = IA3Model.from_pretrained(copy.deepcopy(base), tmp_path / "blend", "blend", example_inputs=inputs)
    assert torch.allclose(run(again, inputs), ours, atol=ATOL)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "blend", adapter_name="blend")
    assert torch.allclose(run(pm, inputs), ours, atol=ATOL)


# --- atomic saves ------------------------------------------------------------------------------
@pytest.fixture
def saved_twice(tmp_path):
    """A model saved once, then changed: a second save must replace all files or none."""
    model = ia3fx.get_ia3_model(custom_model("MLP"), IA3Config(target_modules=["lin0"], feedforward_modules=[]))
    model.save_pretrained(tmp_path)
    before = files_of(tmp_path)
    randomize_ia3(model, "default")
    model.peft_config["default"].modules_to_save = None
    return model, tmp_path, before


def _failing_once(at: int, real):
    """``real``, except that call number ``at`` (0-based) raises."""
    count = {"n": 0}

    def fake(*args, **kwargs):
        count["n"] += 1
        if count["n"] == at + 1:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    return fake


def test_a_failure_while_writing_leaves_the_previous_files(saved_twice, monkeypatch):
    model, directory, before = saved_twice

    def half_write(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ia3io, "save_file", half_write)
    with pytest.raises(OSError, match="simulated"):
        model.save_pretrained(directory)
    assert files_of(directory) == before
    assert sorted(os.listdir(directory)) == sorted(before)  # no temporary file left


@pytest.mark.parametrize("fail_after", [0, 1])
def test_a_failure_while_renaming_restores_the_previous_files(saved_twice, monkeypatch, fail_after):
    """The second rename failing (after the weights were already replaced) puts the old weights back."""
    model, directory, before = saved_twice
    monkeypatch.setattr(ia3io.os, "replace", _failing_once(fail_after, os.replace))
    with pytest.raises(OSError, match="simulated"):
        model.save_pretrained(directory)
    monkeypatch.undo()
    assert files_of(directory) == before
    assert sorted(os.listdir(directory)) == sorted(before)


def test_an_interrupt_leaves_the_previous_files(saved_twice, monkeypatch):
    """Interrupted once the new weights are written to their temporary file."""
    model, directory, before = saved_twice

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(ia3io, "fsync_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(directory)
    monkeypatch.undo()
    assert files_of(directory) == before
    model.save_pretrained(directory)  # and a later save succeeds
    assert files_of(directory) != before
    assert sorted(os.listdir(directory)) == sorted(before)


def test_read_adapter_files_public_helper(tmp_path):
    model = ia3fx.get_ia3_model(custom_model("MLP"), IA3Config(target_modules=["lin0"], feedforward_modules=[]))
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reading a file ia3fx wrote warns about nothing
        config, tensors = ia3io.read_adapter_files(tmp_path)
    assert config.target_modules == {"lin0"} and config.inference_mode is True
    assert list(tensors) == ["base_model.model.lin0.ia3_l"]


def test_saved_files_get_the_usual_permissions(tmp_path):
    """Temporary files are created like ``open`` does (0o666 minus the umask), not 0o600."""
    (tmp_path / "plain").write_text("")
    expected = (tmp_path / "plain").stat().st_mode & 0o777
    model = ia3fx.get_ia3_model(custom_model("MLP"), IA3Config(target_modules=["lin0"], feedforward_modules=[]))
    model.save_pretrained(tmp_path / "out")
    model.save_pretrained(tmp_path / "out")  # replacing keeps them too
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == expected
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # a mode set by the user stays
        os.chmod(tmp_path / "out" / name, 0o640)
    model.save_pretrained(tmp_path / "out")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o640
