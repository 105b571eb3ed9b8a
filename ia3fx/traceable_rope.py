"""Dynamic RoPE (``rope_type="dynamic"``) in a form torch.export can trace.

transformers' dynamic NTK rotary embedding decides in Python, per call, whether the sequence
(``max(position_ids) + 1``) outgrew the cached length, and if so recomputes and stores the
frequencies: control flow on a tensor's value, which ``torch.export`` refuses
(``GuardOnDataDependentSymNode``). Blocks mode never meets it (the rotary embedding runs outside
the captured decoder layers), but the whole-model graph does.

While a whole graph is captured, :func:`traceable_dynamic_rope` replaces the check by its value:
``where(seq_len > original_max, frequencies(seq_len), original_frequencies)``, both computed by
transformers' own function (it takes a tensor ``seq_len``). The graph then computes, for every
call, what a freshly loaded model computes for that call. Eager transformers keeps state between
calls (a longer sequence seen once keeps its frequencies for shorter ones above the original
length, until one below it resets them); for sequences that only grow, as in generation, the two
agree. Nothing of the model is written: the frequencies are passed to the rotary forward, not
stored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["traceable_dynamic_rope"]


def _is_dynamic(module: nn.Module) -> bool:
    rope_type = getattr(module, "rope_type", None)
    if isinstance(rope_type, dict):
        return any("dynamic" in str(t) for t in rope_type.values())
    return isinstance(rope_type, str) and "dynamic" in rope_type


class _WithFrequencies:
    """The rotary module as its undecorated forward sees it, with other frequencies."""

    def __init__(self, module: nn.Module, attribute: str, inv_freq: torch.Tensor) -> None:
        self._module = module
        self.__dict__[attribute] = inv_freq

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def _frequencies(module: nn.Module, position_ids: torch.Tensor, device: torch.device,
                 layer_type: str | None) -> tuple[str, torch.Tensor]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    prefix = "" if layer_type is None else f"{layer_type}_"
    rope_type = module.rope_type if layer_type is None else module.rope_type[layer_type]
    original = getattr(module, f"{prefix}original_inv_freq").to(device)
    kwargs = {} if layer_type is None else {"layer_type": layer_type}
    seq_len = torch.max(position_ids) + 1
    grown, _ = ROPE_INIT_FUNCTIONS[rope_type](module.config, device, seq_len=seq_len, **kwargs)
    return f"{prefix}inv_freq", torch.where(seq_len > module.original_max_seq_len, grown.to(original.dtype), original)


def _traceable_forward(module: nn.Module) -> Any:
    decorated = type(module).forward
    plain = getattr(decorated, "__wrapped__", None)
    if plain is None:
        return None

    def forward(x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None) -> Any:
        rope_type = module.rope_type if layer_type is None else module.rope_type[layer_type]
        kwargs = {} if layer_type is None else {"layer_type": layer_type}
        if "dynamic" not in str(rope_type):
            return decorated(module, x, position_ids, **kwargs)
        attribute, inv_freq = _frequencies(module, position_ids, x.device, layer_type)
        return plain(_WithFrequencies(module, attribute, inv_freq), x, position_ids, **kwargs)

    return forward


@contextlib.contextmanager
def traceable_dynamic_rope(model: nn.Module) -> Iterator[None]:
    """Within: every dynamic-RoPE module of ``model`` computes its frequencies without Python
    control flow on tensor values. The modules' own ``forward`` is back after."""
    patched = []
    for module in model.modules():
        if not _is_dynamic(module):
            continue
        forward = _traceable_forward(module)
        if forward is None:  # not transformers' decorated forward: leave it as it is
            continue
        patched.append((module, module.__dict__.get("forward")))
        module.forward = forward
    try:
        yield
    finally:
        for module, own in patched:
            del module.forward
            if own is not None:  # a forward the user had set on the instance
                module.forward = own
