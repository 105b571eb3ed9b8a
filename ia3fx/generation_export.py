"""Programs that generate: an adapted causal LM exported with its KV cache.

A program exported without a cache re-reads the whole prefix for every new token. Here the
adapted model is exported in the two forms deployments use:

* :func:`static_cache_program`: transformers' ExecuTorch form
  (``transformers.integrations.executorch.TorchExportableModuleWithStaticCache``): ``input_ids``
  (one token per call) and ``cache_position`` in, logits out, the cache held as buffers
  ``key_cache_<i>`` / ``value_cache_<i>`` that the program updates in place.
* :func:`past_key_values_program`: the decoder with past key values in Optimum's naming, for ONNX:
  ``input_ids``, ``attention_mask``, ``position_ids`` and ``past_key_values.<i>.key|value`` in,
  ``logits`` and ``present.<i>.key|value`` out; batch, sequence and past length dynamic (an empty
  past for the first step). transformers' own ``OnnxExporter.export_for_generation`` writes
  separate prefill/decode components whose cache inputs carry pytree names, which a decode loop
  written for Optimum's single decoder does not find; this wrapper is the model's own forward
  over a ``DynamicCache`` built from the inputs.

Unmerged, the vector of every adapted site is a buffer of the exported module named
``ia3.<layer>.<input|output>`` (a pt2 buffer, an ONNX initializer), so
:func:`ia3fx.swap_adapter` can replace it in the artifact. The scale is applied by the same hooks
that apply it in generation (PEFT's arithmetic), reading these buffers while export traces.
Merged, the program is the base model's with the folded weights in place of the originals.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .adapter_store import PEFT_PREFIX, Slot
from .blocks import CAPTURE_LOCK, GATE, _quiet_export
from .capture import _training_mode

__all__ = ["EXPORTED_VECTORS", "VectorTable", "static_cache_program", "past_key_values_program", "vector_manifest"]

EXPORTED_VECTORS = "ia3"  # the exported module's attribute holding the vectors


class VectorTable(nn.Module):
    """The vector applied at each adapted site, as a buffer at ``<layer>.<placement>``.

    A nested module, because buffer names cannot hold dots; the exported names then spell the
    layer's path. Read through :meth:`value` at call time: non-strict export swaps the module's
    tensors for fake ones while it traces.
    """

    def __init__(self, vectors: dict[Slot, torch.Tensor]) -> None:
        super().__init__()
        self.slots = list(vectors)
        for (layer, placement), vec in vectors.items():
            parent: nn.Module = self
            for part in layer.split("."):
                child = parent._modules.get(part)
                if child is None:
                    child = nn.Module()
                    parent.add_module(part, child)
                parent = child
            parent.register_buffer(placement, vec.detach().clone().contiguous())
        self._known = set(self.slots)

    def value(self, layer: str, placement: str) -> torch.Tensor | None:
        if (layer, placement) not in self._known:
            return None
        return self.get_submodule(layer).get_buffer(placement)


def _effective_vectors(ia3: Any) -> dict[Slot, torch.Tensor]:
    """What each adapted site multiplies by now: the active, unmerged adapters' product."""
    out = {}
    for layer, placement in ia3._live:
        value = ia3._live_value(layer, placement)
        if value is not None:
            out[(layer, placement)] = value.detach().clone()
    return out


def vector_manifest(ia3: Any, table: VectorTable) -> dict[str, dict[str, Any]]:
    """Per exported vector: its layer, placement and the key and shape it has in a PEFT file."""
    targets = ia3.targets
    out = {}
    for layer, placement in table.slots:
        vec = table.value(layer, placement)
        out[f"{EXPORTED_VECTORS}.{layer}.{placement}"] = {
            "layer": layer,
            "placement": placement,
            "peft_key": f"{PEFT_PREFIX}{layer}.ia3_l",
            "peft_shape": list(targets[layer].peft_shape) if layer in targets else list(vec.shape),
            "shape": list(vec.shape),
            "dtype": str(vec.dtype).removeprefix("torch."),
        }
    return out


@contextlib.contextmanager
def _traced_with(ia3: Any, table: VectorTable | None) -> Iterator[None]:
    """While exporting: the scale hooks read ``table`` (none with a merged export), and the
    ``modules_to_save`` originals run themselves (their trained copies are put into the
    exported weights afterwards, under the original's names). Other threads wait meanwhile."""
    hooks = ia3._scale_hooks
    saved_value = hooks.value
    dispatched = [(m, m.__dict__.pop("forward")) for m in ia3._dispatched if "forward" in m.__dict__]
    hooks.value = table.value if table is not None else (lambda layer, placement: None)
    try:
        yield
    finally:
        hooks.value = saved_value
        for module, forward in dispatched:
            module.forward = forward


def _substitute(ep: torch.export.ExportedProgram, state: dict[str, torch.Tensor], prefix: str) -> None:
    """Put ``state`` (base-model keys) into the program's weights, under ``prefix``."""
    held = ep.state_dict
    for key, value in state.items():
        name = prefix + key
        old = held.get(name)
        if old is None or old is value:
            continue
        new = value.detach().to(dtype=old.dtype, device=old.device).contiguous()
        held[name] = nn.Parameter(new, requires_grad=False) if isinstance(old, nn.Parameter) else new


def _weights_to_put(ia3: Any, merged: bool) -> dict[str, torch.Tensor]:
    from .export import merged_state_dict, saved_copies_state

    return merged_state_dict(ia3) if merged else saved_copies_state(ia3)


def _check_generative(ia3: Any) -> nn.Module:
    base = ia3.model
    if not ia3._blocks_mode or not hasattr(base, "generate"):
        raise TypeError(
            f"for_generation=True exports a transformers causal LM with its KV cache; this IA3Model is built on "
            f"a {type(base).__name__}: export it with for_generation=False"
        )
    if getattr(base.config, "is_encoder_decoder", False):
        raise NotImplementedError(
            f"for_generation=True exports decoder-only causal LMs; {type(base).__name__} is an encoder-decoder. "
            "Export it with for_generation=False (no cache), or generate with IA3Model.generate"
        )
    return base


def _exporting(ia3: Any, merged: bool, adapters: list[str] | None = None) -> tuple[VectorTable | None, contextlib.ExitStack]:
    if adapters:  # one row per adapter, picked by the program's adapter_index (table_export.py)
        from .table_export import RowTable, adapter_table

        table: VectorTable | None = RowTable(adapter_table(ia3, adapters))
    else:
        table = None if merged else VectorTable(_effective_vectors(ia3))
    stack = contextlib.ExitStack()
    stack.enter_context(GATE.exclusive())
    stack.enter_context(CAPTURE_LOCK)
    stack.enter_context(_training_mode(ia3, False))
    stack.enter_context(torch.no_grad())
    stack.enter_context(_traced_with(ia3, table))
    stack.enter_context(_quiet_export())
    return table, stack


def static_cache_program(
    ia3: Any, *, merged: bool, batch_size: int = 1, max_cache_len: int | None = None, adapters: list[str] | None = None
) -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    """The ExecuTorch form with a static cache of ``max_cache_len`` positions (default: the model's
    ``max_position_embeddings``, at most 2048), and what :func:`ia3fx.swap_adapter` needs to know."""
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    base = _check_generative(ia3)
    if max_cache_len is None:
        max_cache_len = min(int(getattr(base.config.get_text_config(), "max_position_embeddings", 2048) or 2048), 2048)
    generation_config = copy.deepcopy(base.generation_config)
    generation_config.use_cache = True
    generation_config.cache_implementation = "static"
    generation_config.cache_config = {"batch_size": batch_size, "max_cache_len": max_cache_len}
    table, stack = _exporting(ia3, merged, adapters)
    device = next(base.parameters()).device
    inputs = {
        "input_ids": torch.zeros((batch_size, 1), dtype=torch.long, device=device),
        "cache_position": torch.zeros(1, dtype=torch.long, device=device),
    }
    if adapters:
        inputs["adapter_index"] = torch.zeros(batch_size, dtype=torch.long, device=device)
    with stack:  # other threads wait: they would see the static generation config
        saved, base.generation_config = base.generation_config, generation_config
        try:
            module = TorchExportableModuleWithStaticCache(base, batch_size=batch_size, max_cache_len=max_cache_len)
        finally:
            base.generation_config = saved
        _attach(module, table, adapters)
        ep = torch.export.export(module, (), inputs, strict=False)
    _substitute(ep, _weights_to_put(ia3, merged), "model.")
    meta = _metadata(ia3, table, merged, "static_cache", adapters, batch_size=batch_size, max_cache_len=max_cache_len)
    return ep, meta


class DecoderWithPast(nn.Module):
    """The model's forward over a ``DynamicCache`` built from flat past tensors; the new cache out."""

    def __init__(self, model: nn.Module, num_layers: int, position_ids: bool) -> None:
        super().__init__()
        self.model = model
        self.num_layers = num_layers
        self.takes_position_ids = position_ids

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, past: tuple
    ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)]
        cache = DynamicCache(ddp_cache_data=pairs, config=self.model.config)
        extra = {"position_ids": position_ids} if self.takes_position_ids else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                         use_cache=True, **extra)
        present: list[torch.Tensor] = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Optimum's input and output names for a decoder with past key values."""
    kv = [f"{i}.{k}" for i in range(num_layers) for k in ("key", "value")]
    return (["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{n}" for n in kv],
            ["logits"] + [f"present.{n}" for n in kv])


def _attach(module: nn.Module, table: VectorTable | None, adapters: list[str] | None) -> None:
    """The vectors onto the module to export; a table with the ``adapter_index`` input that reads it."""
    if adapters:
        from .table_export import take_adapter_index

        take_adapter_index(module, table)
    elif table is not None:
        setattr(module, EXPORTED_VECTORS, table)


def past_key_values_program(
    ia3: Any, *, merged: bool, adapters: list[str] | None = None
) -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    """The decoder with past key values (for ONNX), batch/sequence/past dims dynamic."""
    from transformers.configuration_utils import get_head_shapes

    base = _check_generative(ia3)
    text = base.config.get_text_config(decoder=True)
    num_layers = int(text.num_hidden_layers)
    heads, head_dim = get_head_shapes(text)
    if isinstance(heads, list) or isinstance(head_dim, list):
        raise NotImplementedError(
            f"{type(base).__name__} has per-layer head shapes; the past-key-values export takes one shape for all layers"
        )
    module = DecoderWithPast(base, num_layers, ia3._takes("position_ids"))
    table, stack = _exporting(ia3, merged, adapters)
    _attach(module, table, adapters)
    param = next(base.parameters())
    batch, seq, past_len = 2, 3, 4  # >= 2 each: no size specialised in the program
    ids = torch.ones((batch, seq), dtype=torch.long, device=param.device)
    mask = torch.ones((batch, past_len + seq), dtype=torch.long, device=param.device)
    positions = torch.arange(past_len, past_len + seq, device=param.device).expand(batch, seq)
    past = tuple(torch.zeros((batch, heads, past_len, head_dim), dtype=param.dtype, device=param.device)
                 for _ in range(2 * num_layers))
    auto = torch.export.Dim.AUTO
    dynamic: dict[str, Any] = {"input_ids": {0: auto, 1: auto}, "attention_mask": {0: auto, 1: auto},
                               "position_ids": {0: auto, 1: auto}, "past": tuple({0: auto, 2: auto} for _ in past)}
    extra = {}
    if adapters:
        extra["adapter_index"] = torch.zeros(batch, dtype=torch.long, device=param.device)
        dynamic["adapter_index"] = {0: auto}
    with stack:
        ep = torch.export.export(module, (ids, mask, positions, past), extra, dynamic_shapes=dynamic, strict=False)
    _substitute(ep, _weights_to_put(ia3, merged), "model.")
    meta = _metadata(ia3, table, merged, "past_key_values", adapters, num_layers=num_layers, num_kv_heads=heads,
                     head_dim=head_dim)
    return ep, meta


def onnx_axis_names(program: Any, num_layers: int) -> dict[str, str]:
    """Optimum's dim names: batch_size, sequence_length, past_sequence_length, total length."""
    names: dict[str, str] = {}
    wanted = {"input_ids": {0: "batch_size", 1: "sequence_length"},
              "position_ids": {0: "batch_size", 1: "sequence_length"},
              "attention_mask": {0: "batch_size", 1: "past_sequence_length + sequence_length"}}
    for value in program.model.graph.inputs:
        dims = wanted.get(value.name) or ({0: "batch_size", 2: "past_sequence_length"}
                                           if value.name.startswith("past_key_values.") else {})
        for i, dim in enumerate(value.shape or ()):
            sym = getattr(dim, "value", None)
            if isinstance(sym, str) and i in dims and sym not in names:
                names[sym] = dims[i]
    return names


def _metadata(
    ia3: Any, table: VectorTable | None, merged: bool, form: str, adapters: list[str] | None = None, **extra: Any
) -> dict[str, Any]:
    if adapters:
        from .table_export import table_manifest

        vectors = table_manifest(ia3, table, adapters)
        extra["table"] = True
    else:
        vectors = {} if table is None else vector_manifest(ia3, table)
    return {
        "ia3fx_export": 1,
        "form": form,
        "merged": merged,
        "adapters": list(adapters) if adapters else [a for a in ia3.active_adapters if not ia3._disabled],
        "model_type": getattr(ia3.model.config, "model_type", None),
        "vectors": vectors,
        # trained copies in the program's weights: another adapter cannot be swapped in
        "modules_to_save": [] if merged else sorted(ia3._all_saved()),
        **extra,
    }

