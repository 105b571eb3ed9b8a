"""The offline merge's plan from the model built on PyTorch's meta device: where names do not tell.

``with torch.device("meta"): cls(config)`` (``cls`` from ``config.architectures``, else the Auto
class of the adapter's ``task_type``) gives module types and shapes without allocating weights;
:func:`ia3fx.targeting.select_targets` then applies PEFT's matching to it. Used when
:func:`ia3fx.offline_plan.layers_from_names` cannot settle the plan (conv layers, regex or default
targets, tied weights, ...): it imports torch and transformers, a few seconds of start-up.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from .config import IA3Config
from .offline_format import CheckpointError
from .offline_plan import Layers, LayerSpec

__all__ = ["layers_from_model"]

_TASK_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "FEATURE_EXTRACTION": "AutoModel",
}


def meta_model(base_dir: str, task_type: str | None) -> Any:
    """The base model's architecture on the meta device: module types and shapes, no weights."""
    if not os.path.isfile(os.path.join(base_dir, "config.json")):
        raise CheckpointError(f"{base_dir} has no config.json: it is not a transformers model directory")
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # config remarks are for whoever runs the model, not here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _build_on_meta(transformers, base_dir, task_type)
    finally:
        transformers.logging.set_verbosity(verbosity)


def _build_on_meta(transformers: Any, base_dir: str, task_type: str | None) -> Any:
    import torch

    try:
        hf_config = transformers.AutoConfig.from_pretrained(base_dir)
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"cannot read {os.path.join(base_dir, 'config.json')}: {str(e).splitlines()[0]}") from e
    arch = (getattr(hf_config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with torch.device("meta"):
        if cls is not None:
            return cls(hf_config)
        auto = getattr(transformers, _TASK_AUTO_CLASSES.get(task_type or "", "AutoModel"))
        try:
            return auto.from_config(hf_config)
        except ValueError as e:
            raise CheckpointError(
                f"cannot build the architecture {arch or hf_config.model_type!r} of {base_dir} "
                f"from transformers: {str(e).splitlines()[0]}"
            ) from e


def layers_from_model(base_dir: str, config: IA3Config) -> Layers:
    """:class:`~ia3fx.offline_plan.Layers` from the meta model and PEFT's matching on it."""
    from .sites import CONV_KINDS
    from .targeting import select_targets

    model = meta_model(base_dir, config.task_type)
    selection = select_targets(config, [], model=model)
    targets = {}
    for name, t in selection.targets.items():
        module = model.get_submodule(name)
        groups = int(getattr(module, "groups", 1)) if t.kind in CONV_KINDS else 1
        has_bias = getattr(module, "bias", None) is not None
        targets[name] = LayerSpec(t.kind, t.feedforward, groups, tuple(module.weight.shape), has_bias, t.peft_shape)
    prefix = getattr(model, "base_model_prefix", "") or ""
    return Layers(targets, list(selection.modules_to_save), prefix, type(model).__name__, False)
