"""IA3Config: PEFT's fields, defaults, validation and adapter_config.json schema."""

from __future__ import annotations

import json
import warnings

import pytest
from peft import IA3Config as PeftIA3Config

import ia3fx
from ia3fx.config import FEEDFORWARD_MODULES_MAPPING, TARGET_MODULES_MAPPING

PEFT_KEYS = {
    "auto_mapping", "base_model_name_or_path", "exclude_modules", "fan_in_fan_out",
    "feedforward_modules", "inference_mode", "init_ia3_weights", "modules_to_save", "peft_type",
    "peft_version", "revision", "target_modules", "task_type",
}


def test_defaults_match_peft():
    ours, theirs = ia3fx.IA3Config(), PeftIA3Config()
    for key in PEFT_KEYS - {"peft_version", "peft_type", "task_type"}:
        assert getattr(ours, key) == getattr(theirs, key), key
    assert ours.peft_type == "IA3"


def test_lists_become_sets_strings_stay():
    c = ia3fx.IA3Config(target_modules=["q", "v", "q"], feedforward_modules=["v"], exclude_modules=["k"])
    assert c.target_modules == {"q", "v"} and c.feedforward_modules == {"v"} and c.exclude_modules == {"k"}
    r = ia3fx.IA3Config(target_modules=r".*\.(q|v)", feedforward_modules=r".*\.v")
    assert r.target_modules == r".*\.(q|v)"


def test_feedforward_must_be_subset_with_peft_message():
    with pytest.raises(ValueError, match="`feedforward_modules` should be a subset of `target_modules`"):
        ia3fx.IA3Config(target_modules=["q"], feedforward_modules=["wo"])
    ia3fx.IA3Config(target_modules=["q"], feedforward_modules=[])  # empty always passes
    ia3fx.IA3Config(target_modules="q|wo", feedforward_modules=["wo"])  # regex skips the check


def test_peft_type_forced_and_task_type_checked():
    assert ia3fx.IA3Config(peft_type="LORA").peft_type == "IA3"
    with pytest.raises(ValueError, match="TaskType"):
        ia3fx.IA3Config(task_type="NOT_A_TASK")


def test_init_false_warns():
    with pytest.warns(UserWarning, match="N\\(0, 1\\)"):
        ia3fx.IA3Config(init_ia3_weights=False)


def test_json_round_trip_has_peft_schema(tmp_path):
    c = ia3fx.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM")
    c.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(data) == PEFT_KEYS
    assert data["peft_type"] == "IA3" and set(data["target_modules"]) == {"k_proj", "down_proj"}
    back = ia3fx.IA3Config.from_pretrained(tmp_path)
    assert back.target_modules == c.target_modules and back.feedforward_modules == c.feedforward_modules
    # PEFT reads ours
    peft_cfg = PeftIA3Config.from_pretrained(str(tmp_path))
    assert peft_cfg.target_modules == {"k_proj", "down_proj"}


def test_reads_peft_written_config(tmp_path):
    PeftIA3Config(target_modules=["q", "v"], feedforward_modules=[], modules_to_save=["head"]).save_pretrained(tmp_path)
    c = ia3fx.IA3Config.from_pretrained(tmp_path)
    assert c.target_modules == {"q", "v"} and c.feedforward_modules == set() and c.modules_to_save == ["head"]


def test_reads_config_peft_cannot_reload(tmp_path):
    data = {
        "peft_type": "IA3",
        "target_modules": ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.k_proj"],
        "feedforward_modules": ["down_proj"],
    }
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError):
        PeftIA3Config.from_pretrained(str(tmp_path))
    c = ia3fx.IA3Config.from_pretrained(tmp_path)
    assert c.feedforward_modules == {"down_proj"}


def test_unknown_keys_warn_other_type_refused(tmp_path):
    with pytest.warns(UserWarning, match="Unexpected keys"):
        ia3fx.IA3Config.from_dict({"peft_type": "IA3", "r": 8})
    with pytest.raises(ValueError, match="peft_type='LORA'"):
        ia3fx.IA3Config.from_dict({"peft_type": "LORA"})
    with pytest.raises(FileNotFoundError, match="not an adapter directory"):
        ia3fx.IA3Config.from_pretrained(tmp_path)


def test_default_mappings_equal_peft():
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as PEFT_FF,
    )
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as PEFT_T,
    )

    assert {k: set(v) for k, v in TARGET_MODULES_MAPPING.items()} == {k: set(v) for k, v in PEFT_T.items()}
    assert {k: set(v) for k, v in FEEDFORWARD_MODULES_MAPPING.items()} == {k: set(v) for k, v in PEFT_FF.items()}


def test_copy_is_deep_and_skips_validation():
    c = ia3fx.IA3Config(target_modules=["a", "b"], feedforward_modules=["b"])
    c.target_modules = {"x.a", "x.b"}  # a resolved config: no longer lexically a superset
    d = c.copy()
    d.target_modules.add("y")
    assert "y" not in c.target_modules
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c.copy()
