"""Bad input that used to change or lose something: now a clear error, and nothing changed.

Adapter names that are paths, an IA3Model used after ``merge_and_unload()`` / ``unload()``
(outputs scaled twice), and offline-merge outputs that would have replaced the working directory
or a directory of the user's.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import custom_model, saved_base_and_adapter, snapshot, tiny_llama, token_inputs

import ia3fx
from ia3fx.cli import main
from ia3fx.offline import CheckpointError, merge_checkpoint

BAD_NAMES = ["/abs/path", "a/b", "a\\b", "..", "", "a.b", "train", 5]


def _state(model: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _flags(model: torch.nn.Module) -> dict:
    return {k: p.requires_grad for k, p in model.named_parameters()}


# --- adapter names ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_adapter_name_changes_nothing(name):
    model = tiny_llama()
    state, flags = _state(model), _flags(model)
    with pytest.raises(ValueError, match="cannot be an adapter name"):
        ia3fx.get_ia3_model(model, ia3fx.IA3Config(), adapter_name=name)
    assert _flags(model) == flags and all(flags.values())  # nothing frozen
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all("forward" not in vars(m) for m in model.modules())  # no runner, no dispatcher left


@pytest.mark.parametrize("name", ["/abs/path", "a/b", "..", "../up"], ids=repr)
def test_path_like_names_are_refused_by_add_and_load(name, tmp_path):
    ia3 = ia3fx.get_ia3_model(tiny_llama(), ia3fx.IA3Config())
    ia3.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="cannot be an adapter name.*path separator"):
        ia3.add_adapter(name, ia3fx.IA3Config())
    with pytest.raises(ValueError, match="cannot be an adapter name"):
        ia3.load_adapter(tmp_path / "adapter", adapter_name=name)
    assert list(ia3.ia3_l) == ["default"]
    # nothing was written outside the save directory either
    ia3.save_pretrained(tmp_path / "again")
    assert sorted(os.listdir(tmp_path)) == ["adapter", "again"]


# --- after merge_and_unload() / unload() -----------------------------------------------------------
def _adapted(kind: str):
    if kind == "blocks":
        ia3 = ia3fx.get_ia3_model(tiny_llama(), ia3fx.IA3Config())
        inputs = token_inputs("llama")
    else:  # a plain module: the whole-model graph
        model = custom_model("MLP")
        inputs = {"X": torch.randn(3, 10)}
        ia3 = ia3fx.get_ia3_model(model, ia3fx.IA3Config(target_modules=["lin0"], feedforward_modules=[]),
                                  example_inputs=inputs)
    with torch.no_grad():
        for v in ia3.ia3_l.parameters():
            v.copy_(torch.rand_like(v) + 0.5)
    ia3.eval()
    return ia3, inputs


def _out(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("kind", ["blocks", "whole-graph"])
@pytest.mark.parametrize("how", ["merge_and_unload", "unload"])
def test_an_unloaded_ia3model_refuses_further_use(kind, how):
    ia3, inputs = _adapted(kind)
    adapted = _out(ia3, inputs)
    with ia3.disable_adapter():
        base = _out(ia3, inputs)
    returned = getattr(ia3, how)()
    expected = adapted if how == "merge_and_unload" else base
    assert torch.allclose(_out(returned, inputs), expected, atol=1e-6)
    for call in (
        lambda: ia3(**inputs),
        ia3.unmerge_adapter,
        ia3.merge_adapter,
        lambda: ia3.set_adapter("default"),
        lambda: ia3.add_adapter("other", ia3fx.IA3Config()),
        ia3.merge_and_unload,
        ia3.unload,
    ):
        with pytest.raises(RuntimeError, match=f"was unloaded by {how}"):
            call()
    if kind == "blocks":
        with pytest.raises(RuntimeError, match="was unloaded"):
            ia3.generate(input_ids=inputs["input_ids"][:1], max_new_tokens=2)
    # the returned model still computes what it computed: scaled once (or not at all)
    assert torch.allclose(_out(returned, inputs), expected, atol=1e-6)


# --- offline merge outputs -------------------------------------------------------------------------
@pytest.fixture()
def checkpoint(tmp_path):
    return saved_base_and_adapter(tmp_path)


def test_merge_refuses_an_empty_output_and_the_working_directory(checkpoint, tmp_path, monkeypatch, capsys):
    base, adapter = checkpoint
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for out in ("", ".", str(work)):
        with pytest.raises(CheckpointError, match="output directory"):
            merge_checkpoint(base, adapter, out, force=True, progress=False)
    code = main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", "", "--force"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("ia3fx merge: error: ") and len(err.strip().splitlines()) == 1
    assert snapshot(work) == {"notes.txt": b"mine"}


def test_merge_replaces_only_an_earlier_merge_or_an_empty_directory(checkpoint, tmp_path):
    base, adapter = checkpoint
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(CheckpointError, match="not the output of an earlier merge"):
        merge_checkpoint(base, adapter, mine, force=True, progress=False)
    assert snapshot(mine) == {"thesis.tex": b"years of work"}
    empty = tmp_path / "empty"
    empty.mkdir()
    merge_checkpoint(base, adapter, empty, force=True, progress=False)
    first = snapshot(empty)
    assert "model.safetensors" in first
    merge_checkpoint(base, adapter, empty, force=True, progress=False)  # an earlier merge: replaced
    assert snapshot(empty) == first
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep")
    with pytest.raises(CheckpointError, match="not the output of an earlier merge"):
        merge_checkpoint(base, adapter, a_file, force=True, progress=False)
    assert a_file.read_text() == "keep"


# --- IA3Config fields: checked at construction, the field named -------------------------------------
BAD_CONFIGS = [
    (dict(modules_to_save="lm_head"), TypeError, r"modules_to_save must be a list of module names, got the string 'lm_head'"),
    (dict(target_modules=["k_proj", 5]), TypeError, r"target_modules must hold module names \(strings\); 5 is a int"),
    (dict(target_modules={"k_proj": 1}), TypeError, r"target_modules must be a list of module names or one regex"),
    (dict(feedforward_modules=3), TypeError, r"feedforward_modules must be a list"),
    (dict(exclude_modules=["a", None]), TypeError, r"exclude_modules must hold module names"),
    (dict(modules_to_save=["classifier", 1.5]), TypeError, r"modules_to_save must hold module names"),
    (dict(init_ia3_weights="no"), TypeError, r"init_ia3_weights must be True or False, got str 'no'"),
    (dict(inference_mode="false"), TypeError, r"inference_mode must be True or False, got str 'false'"),
    (dict(fan_in_fan_out=1), TypeError, r"fan_in_fan_out must be True or False, got int 1"),
    (dict(revision=3), TypeError, r"revision must be a string or None"),
    (dict(base_model_name_or_path=["m"]), TypeError, r"base_model_name_or_path must be a string or None"),
    (dict(auto_mapping="x"), TypeError, r"auto_mapping must be a dict or None"),
    (dict(target_modules="(k_proj"), ValueError, r"target_modules='\(k_proj' is not a valid regular expression"),
    (dict(target_modules=["k_proj"], exclude_modules="[a-"), ValueError, r"exclude_modules='\[a-' is not a valid regular"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_CONFIGS, ids=[repr(c[0]) for c in BAD_CONFIGS])
def test_config_fields_are_checked_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        ia3fx.IA3Config(**kwargs)


def test_a_config_file_with_a_wrong_type_is_an_adapter_load_error(tmp_path):
    import json

    ia3fx.IA3Config().save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["modules_to_save"] = "lm_head"
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    model = tiny_llama()
    state = _state(model)
    with pytest.raises(ia3fx.AdapterLoadError, match="modules_to_save must be a list of module names"):
        ia3fx.IA3Model.from_pretrained(model, tmp_path)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_tuples_of_names_read_as_lists():
    config = ia3fx.IA3Config(target_modules=("k_proj", "down_proj"), feedforward_modules=("down_proj",))
    assert config.target_modules == {"k_proj", "down_proj"} and config.feedforward_modules == {"down_proj"}


# --- adapter files: vectors that cannot be, configs that are not IA3 --------------------------------
def test_integer_vectors_are_refused_and_nan_vectors_warned(tmp_path):
    ia3 = ia3fx.get_ia3_model(tiny_llama(), ia3fx.IA3Config())
    state = ia3.adapter_state_dict()
    key = next(iter(state))
    before = {k: v.clone() for k, v in ia3.adapter_state_dict().items()}
    for dtype in (torch.int64, torch.bool):
        bad = {**state, key: state[key].to(dtype)}
        with pytest.raises(ia3fx.AdapterLoadError, match=f"is a {dtype} tensor: .* floating point. Nothing was loaded"):
            ia3.load_adapter_state_dict(bad)
        assert all(torch.equal(v, before[k]) for k, v in ia3.adapter_state_dict().items())
    nan = {**state, key: torch.full_like(state[key], float("nan"))}
    with pytest.warns(UserWarning, match="hold NaN or infinite values"):
        ia3.load_adapter_state_dict(nan)  # PEFT loads them too
    with pytest.raises(ValueError):
        ia3.merge_adapter(safe_merge=True)
    assert ia3.merged_adapters == []


def test_unknown_config_keys_warn_when_read(tmp_path):
    import json

    ia3 = ia3fx.get_ia3_model(tiny_llama(), ia3fx.IA3Config())
    ia3.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["lora_alpha"] = 16
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"Unexpected keys in the IA3 config were ignored: \['lora_alpha'\]"):
        ia3fx.IA3Model.from_pretrained(tiny_llama(), tmp_path)


def test_offline_merge_refuses_a_config_without_peft_type(checkpoint, tmp_path):
    import json

    base, adapter = checkpoint
    data = json.loads((adapter / "adapter_config.json").read_text())
    del data["peft_type"]
    (adapter / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="has no 'peft_type'"):
        merge_checkpoint(base, adapter, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_config_save_on_a_full_disk_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    ia3fx.IA3Config(target_modules=["k_proj"], feedforward_modules=[]).save_pretrained(tmp_path)
    before = snapshot(tmp_path)
    real_open = open

    class FullDisk:
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr("builtins.open", lambda path, mode="r", *a, **k: FullDisk(path, mode, *a, **k)
                        if str(path).endswith(".tmp") else real_open(path, mode, *a, **k))
    with pytest.raises(OSError, match="No space left"):
        ia3fx.IA3Config().save_pretrained(tmp_path)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), "0.5", None, True], ids=repr)
def test_add_weighted_adapter_refuses_weights_that_are_not_finite_numbers(weight):
    ia3 = ia3fx.get_ia3_model(tiny_llama(), ia3fx.IA3Config())
    with pytest.raises(ValueError, match="weights must be finite numbers"):
        ia3.add_weighted_adapter(["default"], [weight], "w")
    assert list(ia3.ia3_l) == ["default"]
    with pytest.raises(ValueError, match="path separator"):
        ia3.add_weighted_adapter(["default"], [0.5], "a/b")
    ia3.add_weighted_adapter(["default"], [torch.tensor(0.5)], "w")  # a 0-d tensor is a number
    assert torch.allclose(ia3.ia3_l["w"][next(iter(ia3.ia3_l["w"].keys()))], torch.tensor(0.5))


# --- what a config selects ---------------------------------------------------------------------
def test_a_layer_both_targeted_and_saved_is_refused_as_peft_does():
    """DistilBERT: ``classifier`` suffix-matches ``pre_classifier`` (PEFT's wrapping rule), which is
    also a target; merging would fold its vector into the original and then swap in the copy."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    model = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, hidden_dim=64))
    kwargs = {"task_type": "SEQ_CLS", "target_modules": ["q_lin", "lin2", "pre_classifier"], "feedforward_modules": ["lin2"]}
    import peft

    with pytest.raises(TypeError):
        peft.get_peft_model(copy.deepcopy(model), peft.IA3Config(**kwargs))
    flags = _flags(model)
    with pytest.raises(TypeError, match=r"'pre_classifier' is both targeted .* modules_to_save"):
        ia3fx.get_ia3_model(model, ia3fx.IA3Config(**kwargs))
    assert _flags(model) == flags
    with pytest.raises(TypeError, match="pre_classifier"):
        ia3fx.plan(model, ia3fx.IA3Config(**kwargs))
    kwargs["target_modules"] = ["q_lin", "lin2"]  # without the overlap: adapted, and the head saved
    ia3 = ia3fx.get_ia3_model(model, ia3fx.IA3Config(**kwargs))
    assert ia3._selections["default"].modules_to_save == ["pre_classifier", "classifier"]


@pytest.mark.parametrize(
    "kwargs, phrase",
    [
        ({"target_modules": ["k_proj", "v_projj"], "feedforward_modules": []}, "target_modules entry 'v_projj'"),
        ({"target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj", "up_proj"]}, None),
        ({"target_modules": ["k_proj", "down_proj"], "feedforward_modules": r".*\.mlp\.up_proj"}, "matches no targeted layer"),
        ({"target_modules": ["k_proj"], "feedforward_modules": [], "modules_to_save": ["lm_haed"]}, "modules_to_save entry 'lm_haed'"),
    ],
)
def test_an_entry_that_selects_nothing_is_warned(kwargs, phrase, recwarn):
    if phrase is None:  # an IA3Config check already refuses feedforward names that are no targets
        with pytest.raises(ValueError, match="subset"):
            ia3fx.IA3Config(**kwargs)
        return
    ia3fx.get_ia3_model(tiny_llama(), ia3fx.IA3Config(**kwargs))
    messages = [str(w.message) for w in recwarn]
    assert any(phrase in m and "matches no" in m for m in messages), messages


def test_defaults_that_match_warn_nothing(recwarn):
    ia3fx.get_ia3_model(tiny_llama(), ia3fx.IA3Config(task_type="CAUSAL_LM"))
    assert not [w for w in recwarn if "matches no" in str(w.message)]


# --- threads -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["whole-graph", "blocks"])
def test_merging_in_one_thread_while_another_runs_forwards(kind):
    """Each forward sees the adapter either merged or not, never half: its output is the adapted
    model's either way (to fp32 rounding of the folded weights), and nothing raises."""
    import threading

    if kind == "blocks":
        model = tiny_llama()
        model.config.use_cache = False
        ia3 = ia3fx.get_ia3_model(model, ia3fx.IA3Config(init_ia3_weights=False))
        inputs = token_inputs("llama")
        call = lambda: ia3(**inputs).logits  # noqa: E731
    else:
        ia3 = ia3fx.get_ia3_model(custom_model("MLP"), ia3fx.IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"], init_ia3_weights=False))
        x = torch.randn(9, 10)
        call = lambda: ia3(x)  # noqa: E731
    ia3.eval()
    with torch.no_grad():
        reference = call()
    errors: list[BaseException] = []
    outputs: list[torch.Tensor] = []
    stop = threading.Event()

    def forwards() -> None:
        try:
            while not stop.is_set():
                with torch.no_grad():
                    outputs.append(call())
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def merges() -> None:
        try:
            for _ in range(15):
                ia3.merge_adapter()
                ia3.unmerge_adapter()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            stop.set()

    threads = [threading.Thread(target=forwards), threading.Thread(target=merges)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, repr(errors[0])
    assert outputs
    for out in outputs:
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    assert ia3.merged_adapters == []


@pytest.mark.parametrize("content", [b"[1, 2]", b'"IA3"', b"\xff\xfe not utf-8"], ids=["list", "string", "bytes"])
def test_a_config_file_that_is_no_json_object_is_a_clear_error(tmp_path, content):
    (tmp_path / "adapter_config.json").write_bytes(content)
    with pytest.raises(ValueError, match="adapter_config.json (holds a JSON|is not valid JSON)"):
        ia3fx.IA3Config.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="JSON object of IA3Config fields, got a list"):
        ia3fx.IA3Config.from_dict([1, 2])


def test_a_failed_drawing_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    ia3 = ia3fx.get_ia3_model(custom_model("MLP"), ia3fx.IA3Config(target_modules=["lin0"], feedforward_modules=[]))
    out = tmp_path / "graph.dot"
    out.write_text("my old drawing")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space"):
        ia3fx.draw(ia3, str(out))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["graph.dot"] and out.read_text() == "my old drawing"
    ia3fx.draw(ia3, str(out))
    assert "digraph" in out.read_text() and os.listdir(tmp_path) == ["graph.dot"]
