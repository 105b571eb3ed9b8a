"""``IA3Config``: PEFT's IA3 configuration, field for field, and its ``adapter_config.json`` schema.

Users bring PEFT configs and files; the same names, defaults and validation mean a config written
for PEFT means the same thing here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from .atomic_files import temp_path
from .errors import shorten

__all__ = [
    "IA3Config",
    "TARGET_MODULES_MAPPING",
    "FEEDFORWARD_MODULES_MAPPING",
    "CONFIG_NAME",
]

CONFIG_NAME = "adapter_config.json"

# PEFT's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING (peft/utils/constants.py).
TARGET_MODULES_MAPPING: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "RefinedWebModel": ["query_key_value", "dense_4h_to_h"],
    "RefinedWeb": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}

# PEFT's TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.
FEEDFORWARD_MODULES_MAPPING: dict[str, list[str]] = {
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"],
    "opt": ["fc2"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"],
    "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"],
    "llama": ["down_proj"],
    "llama4": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "bert": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "deberta": ["output.dense"],
    "RefinedWebModel": ["dense_4h_to_h"],
    "RefinedWeb": ["dense_4h_to_h"],
    "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}

TASK_TYPES = (
    "SEQ_CLS",
    "SEQ_2_SEQ_LM",
    "CAUSAL_LM",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
)

# PeftModelFor* add these heads to modules_to_save (peft_model.py).
TASK_MODULES_TO_SAVE = {
    "SEQ_CLS": ["classifier", "score"],
    "TOKEN_CLS": ["classifier", "score"],
    "QUESTION_ANS": ["qa_outputs"],
}

Patterns = list[str] | set[str] | str | None


def _as_set(value: Any) -> Any:
    return set(value) if isinstance(value, (list, tuple)) else value


def _shown(value: Any) -> str:
    return shorten(repr(value))


def _check_patterns(name: str, value: Any) -> None:
    """``None``, a regex string (compiled here, not after a trace), or a collection of names."""
    if value is None:
        return
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"{name}={_shown(value)} is not a valid regular expression: {e}") from e
        return
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise TypeError(
            f"{name} must be a list of module names or one regex string, got {type(value).__name__} {_shown(value)}"
        )
    bad = [v for v in value if not isinstance(v, str)]
    if bad:
        raise TypeError(f"{name} must hold module names (strings); {_shown(bad[0])} is a {type(bad[0]).__name__}")


def _check_field_types(config: Any) -> None:
    """PEFT's types, field by field, named in the error: a string where a flag or a list belongs
    would otherwise be read silently (``"no"`` is true, ``"lm_head"`` is five one-letter names)."""
    for name in ("target_modules", "exclude_modules", "feedforward_modules"):
        _check_patterns(name, getattr(config, name))
    saved = config.modules_to_save
    if isinstance(saved, str):
        raise TypeError(f"modules_to_save must be a list of module names, got the string {_shown(saved)}: "
                        f"write [{_shown(saved)}]")
    if saved is not None:
        _check_patterns("modules_to_save", saved)
    for name in ("fan_in_fan_out", "init_ia3_weights", "inference_mode"):
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {type(value).__name__} {_shown(value)}")
    for name in ("base_model_name_or_path", "revision", "peft_version"):
        value = getattr(config, name)
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name} must be a string or None, got {type(value).__name__} {_shown(value)}")
    if config.auto_mapping is not None and not isinstance(config.auto_mapping, dict):
        raise TypeError(f"auto_mapping must be a dict or None, got {type(config.auto_mapping).__name__}")


@dataclass
class IA3Config:
    """The (IA)³ adapter configuration, with PEFT's fields, defaults and checks.

    ``target_modules`` and ``feedforward_modules`` are lists (exact name or ``.``-bounded suffix),
    regex strings (``re.fullmatch``) or ``"all-linear"``; ``None`` takes PEFT's default for the
    model's ``model_type``. Feedforward modules get their *input* scaled, the others their output.
    """

    target_modules: Patterns = field(
        default=None,
        metadata={"help": "Module names (exact or .-suffix), a full-match regex, or 'all-linear'."},
    )
    exclude_modules: Patterns = field(
        default=None, metadata={"help": "Module names or a regex never to adapt; wins over targets."}
    )
    feedforward_modules: Patterns = field(
        default=None,
        metadata={"help": "Targets whose input (not output) is scaled; PEFT's plain-suffix rule."},
    )
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "Kept for PEFT files; the layout is read off each layer."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter."}
    )
    init_ia3_weights: bool = field(
        default=True, metadata={"help": "Ones (identity) if True, N(0, 1) draws if False."}
    )
    task_type: str | None = field(default=None, metadata={"help": "PEFT TaskType name."})
    inference_mode: bool = field(default=False, metadata={"help": "Freeze the vectors."})
    base_model_name_or_path: str | None = None
    revision: str | None = None
    auto_mapping: dict | None = None
    peft_version: str | None = None
    peft_type: str = "IA3"

    def __post_init__(self) -> None:
        self.peft_type = "IA3"
        _check_field_types(self)
        if self.task_type is not None:
            self.task_type = str(getattr(self.task_type, "value", self.task_type))
            if self.task_type not in TASK_TYPES:
                raise ValueError(
                    f"task_type {_shown(self.task_type)} is not a PEFT TaskType; use one of {TASK_TYPES}"
                )
        self.target_modules = _as_set(self.target_modules)
        self.exclude_modules = _as_set(self.exclude_modules)
        self.feedforward_modules = _as_set(self.feedforward_modules)
        if isinstance(self.feedforward_modules, set) and isinstance(self.target_modules, set):
            if not self.feedforward_modules.issubset(self.target_modules):
                raise ValueError("`feedforward_modules` should be a subset of `target_modules`")
        if self.modules_to_save is not None and isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        if not self.init_ia3_weights:
            warnings.warn(
                "init_ia3_weights=False draws the (IA)³ vectors from N(0, 1): the adapted model no "
                "longer starts as the base model. This is meant for tests.",
                stacklevel=3,
            )

    # --- PEFT's adapter_config.json -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The config as PEFT writes it: sets become (sorted) lists, all 13 keys present."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, set):
                value = sorted(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IA3Config:
        """Build from a PEFT config dict; unknown keys are dropped with a warning, as PEFT does."""
        if not isinstance(data, dict):
            raise TypeError(
                f"an IA3 config is a JSON object of IA3Config fields, got a {type(data).__name__}: {_shown(data)}"
            )
        peft_type = data.get("peft_type", "IA3")
        if str(peft_type) != "IA3":
            raise ValueError(
                f"this adapter config has peft_type={peft_type!r}; ia3fx only reads IA3 adapters"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            warnings.warn(f"Unexpected keys in the IA3 config were ignored: {unknown}", stacklevel=2)
        kwargs = {k: v for k, v in data.items() if k in names}
        ff, targets = kwargs.get("feedforward_modules"), kwargs.get("target_modules")
        lexical_mismatch = (
            isinstance(ff, list) and isinstance(targets, list) and not set(ff).issubset(targets)
        )
        if lexical_mismatch:
            # PEFT writes such files itself (all-linear targets saved as full names beside a suffix
            # feedforward list) and then cannot reload them; the names still mean something, so
            # read them, and let matching decide.
            kwargs["feedforward_modules"] = None
        with warnings.catch_warnings():
            # a saved config with init_ia3_weights=False describes how it was made, not a new draw
            warnings.simplefilter("ignore", UserWarning)
            config = cls(**kwargs)
        if lexical_mismatch:
            config.feedforward_modules = set(ff)
        return config

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``adapter_config.json`` (atomically: a temporary of ia3fx's pattern, then rename)."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        tmp = temp_path(save_directory, CONFIG_NAME)  # a kill leaves it to the next save's cleanup
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(self.to_json_string())
            os.replace(tmp, path)
        except BaseException:  # a full disk, Ctrl-C: the previous file stays, no temporary is left
            if os.path.lexists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> IA3Config:
        """Read ``adapter_config.json`` from a directory or a file path."""
        file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else str(path)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no {CONFIG_NAME} at {path}: this is not an adapter directory")
        with open(file, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{file} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"{file} holds a JSON {type(data).__name__}, not an object of IA3Config fields")
        return cls.from_dict(data)

    def copy(self) -> IA3Config:
        """A deep copy that skips ``__post_init__`` (resolved configs may not pass PEFT's lexical check)."""
        return copy.deepcopy(self)
