"""Example inputs for a transformers model that was adapted without any: what tracing its whole
graph (``ia3.graph_module``, export, drawing) runs on.

transformers' generic ``dummy_inputs`` is a batch of ``input_ids`` for every model, which a vision
or audio model cannot take (ViT wants ``pixel_values``, Whisper ``input_features``, wav2vec2
``input_values``) and which an encoder-decoder needs ``decoder_input_ids`` beside (Pegasus rejects
its own). So the inputs are built here from the model's config and its ``main_input_name``: the
right tensor per modality, sized from the config, for every tower the forward takes (CLIP: text
and image).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .errors import TraceError

__all__ = ["default_inputs", "with_defaults_hint"]

BATCH = 2
TOKENS = 8
DECODER_TOKENS = 4
AUDIO_FRAMES = 8  # wav2vec2-like: feature frames after the conv stack


def _forward_params(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _sub(config: Any, name: str) -> Any:
    """A composite model's sub-config (``text_config``, ``vision_config``), or the config itself."""
    sub = getattr(config, name, None)
    return sub if sub is not None else config


def _tokens(config: Any, length: int, batch: int = BATCH) -> torch.Tensor:
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab < 2:
        raise TraceError(f"cannot build default token inputs: the config has vocab_size={vocab}")
    low = min(3, vocab - 1)  # clear of the usual special ids (pad/bos/eos), where the vocabulary allows
    return torch.randint(low, vocab, (batch, length), generator=torch.Generator().manual_seed(0))


def _pixels(config: Any) -> torch.Tensor:
    size = getattr(config, "image_size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    channels = int(getattr(config, "num_channels", 3))
    return torch.randn(BATCH, channels, int(height), int(width), generator=torch.Generator().manual_seed(0))


def _mel_features(config: Any) -> torch.Tensor:
    # Whisper checks the length: exactly twice the encoder's positions (its convs halve it)
    length = 2 * int(config.max_source_positions)
    return torch.randn(BATCH, int(config.num_mel_bins), length, generator=torch.Generator().manual_seed(0))


def _waveform(config: Any) -> torch.Tensor:
    length = AUDIO_FRAMES
    for kernel, stride in reversed(list(zip(config.conv_kernel, config.conv_stride))):
        length = (length - 1) * int(stride) + int(kernel)  # the input length a conv layer needs
    return torch.randn(BATCH, length, generator=torch.Generator().manual_seed(0))


def _built(model: nn.Module) -> dict[str, torch.Tensor] | None:
    config = model.config
    params = _forward_params(model)
    main = getattr(model, "main_input_name", "input_ids")
    inputs: dict[str, torch.Tensor] = {}
    has_vision = getattr(config, "vision_config", None) is not None
    if main == "pixel_values" or (has_vision and "pixel_values" in params):
        inputs["pixel_values"] = _pixels(_sub(config, "vision_config"))
    if main == "input_features":
        if not hasattr(config, "num_mel_bins") or not hasattr(config, "max_source_positions"):
            return None
        inputs["input_features"] = _mel_features(config)
    if main == "input_values":
        if not hasattr(config, "conv_kernel"):
            return None
        inputs["input_values"] = _waveform(config)
    if main == "input_ids" or (has_vision and "input_ids" in params):
        inputs["input_ids"] = _tokens(_sub(config, "text_config"), TOKENS)
    if not inputs:
        return None
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        inputs["decoder_input_ids"] = _tokens(_sub(config, "text_config"), DECODER_TOKENS)
    return inputs


def with_defaults_hint(error: TraceError, model: nn.Module) -> TraceError:
    """``error`` of a trace on these default inputs, saying so and how to pass others."""
    return TraceError(
        f"{error}\nThe inputs above are ia3fx's default inputs for {type(model).__name__} (built from its config); "
        "pass example_inputs=... (a dict of the model's real inputs) to trace with others."
    )


def default_inputs(model: nn.Module) -> tuple[tuple, dict]:
    """Keyword inputs for ``model``, on CPU (a meta model traces with CPU inputs too).

    A text model takes transformers' own ``dummy_inputs`` (an encoder-decoder whose dummies lack
    them gets ``decoder_input_ids`` too); a model whose main input is not ``input_ids``, or that
    has a vision tower, gets inputs built from its config (see the module docstring).
    """
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", "input_ids")
    if config is not None and (main != "input_ids" or getattr(config, "vision_config", None) is not None):
        built = _built(model)
        if built is not None:
            return (), built
    dummy = getattr(model, "dummy_inputs", None)
    if not isinstance(dummy, Mapping) or not dummy:
        raise TraceError(
            f"{type(model).__name__} has no dummy_inputs; pass example_inputs, e.g. "
            "{'input_ids': torch.randint(0, vocab_size, (2, 16))}"
        )
    inputs = dict(dummy)
    wants_decoder = getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in _forward_params(model)
    if wants_decoder and not {"decoder_input_ids", "decoder_inputs_embeds"} & set(inputs):
        batch = next(iter(inputs.values())).shape[0]  # Pegasus' dummies: input_ids only
        inputs["decoder_input_ids"] = _tokens(config, DECODER_TOKENS, batch)
    return (), inputs
