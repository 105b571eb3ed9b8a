"""Built-in tiny models: transformers configs that ship with ia3fx, built with random weights.

They let the demo, the CLI and the docs run with no download and no hub.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported when a model is built: the CLI's parser needs only the names
    from torch import nn

__all__ = ["PRESETS", "DEFAULT_PRESET", "preset_config", "build_preset", "model_from_config"]

DEFAULT_PRESET = "tiny-llama"
PRESETS = ("tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-t5")


def preset_config(name: str):  # -> transformers.PretrainedConfig
    from transformers import AutoConfig

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    data = json.loads(resources.files(__package__).joinpath(f"{name}.json").read_text())
    model_type = data.pop("model_type")
    return AutoConfig.for_model(model_type, **data)


def model_from_config(config, seed: int = 0) -> nn.Module:
    """The class named in ``config.architectures`` (else a causal LM), random weights, eval mode."""
    import torch
    import transformers

    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    torch.manual_seed(seed)
    if cls is None:
        model = transformers.AutoModelForCausalLM.from_config(config)
    else:
        model = cls(config)
    return model.eval()


def build_preset(name: str = DEFAULT_PRESET, seed: int = 0) -> nn.Module:
    """A tiny transformers model with seeded random weights, in eval mode."""
    return model_from_config(preset_config(name), seed)
