"""Greedy decode loops for the programs :func:`ia3fx.export` writes with ``for_generation=True``.

What a deployment runs around an exported program, kept short enough to copy: feed the prompt,
take the most likely token, feed it back with the cache, stop at ``max_new_tokens`` or when every
row has produced ``eos_token_id``. They give the tokens ``model.generate(do_sample=False)`` gives.

* :func:`greedy_pt2`: the static-cache program (``torch.export.load(path)``), one token per call.
  Its cache lives in the loaded program's buffers (shared by every ``ep.module()`` of it): one
  decode at a time per loaded program; load it once per concurrent decode. The module is built
  once per loop (building it costs far more than a decode step).
* :func:`greedy_onnx`: the decoder with past key values in onnxruntime, the whole prompt in the
  first call (with an empty past), left-padded batches through ``attention_mask``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

__all__ = ["greedy_pt2", "greedy_onnx"]


def _check_ids(input_ids: Any) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32) or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a (batch, length >= 1) integer tensor, got {tuple(ids.shape)} {ids.dtype}")
    return ids.long()


def _finish(tokens: torch.Tensor, done: torch.Tensor, next_tokens: torch.Tensor, eos: int | None, pad: int | None):
    if eos is not None:
        next_tokens = torch.where(done, torch.full_like(next_tokens, pad if pad is not None else eos), next_tokens)
        done = done | (next_tokens == eos)
    return torch.cat([tokens, next_tokens[:, None]], dim=1), done, next_tokens


def _check_index(adapter_index: Any, takes: bool | None, batch: int) -> torch.Tensor | None:
    """``adapter_index`` (a program exported with ``adapters=[...]``): one int per row."""
    if takes is False and adapter_index is not None:
        raise ValueError("this program has no adapter_index input (it was exported without adapters=[...]): drop adapter_index")
    if takes and adapter_index is None:
        raise ValueError("this program serves a table of adapters: pass adapter_index, one table row per prompt (0: base)")
    if adapter_index is None:
        return None
    index = torch.as_tensor(adapter_index).long().reshape(-1)
    if index.shape[0] != batch:
        raise ValueError(f"adapter_index has {index.shape[0]} entries for {batch} prompts: give one per prompt")
    return index


def greedy_pt2(
    program: Any,
    input_ids: Any,
    max_new_tokens: int,
    *,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    adapter_index: Any = None,
) -> torch.Tensor:
    """Greedy tokens from a static-cache pt2 program (a path, an ``ExportedProgram``, or its ``.module()``).

    The batch size is the exported one; prompts are not padded (the static form takes no mask).
    The prompt plus ``max_new_tokens`` must fit the exported cache. ``adapter_index`` (a program
    exported with ``adapters=[...]``): each prompt's row of the adapter table.
    """
    if isinstance(program, (str, os.PathLike)):  # a .pt2 file or an export directory
        from .swap import program_file

        program = torch.export.load(program_file(os.fspath(program)))
    takes = None
    if isinstance(program, torch.export.ExportedProgram):
        takes = "adapter_index" in program.graph_signature.user_inputs
    module = program.module() if isinstance(program, torch.export.ExportedProgram) else program
    ids = _check_ids(input_ids)
    index = _check_index(adapter_index, takes, ids.shape[0])
    extra = {} if index is None else {"adapter_index": index}
    cache_len = next((b.shape[2] for n, b in module.named_buffers() if n.startswith("key_cache")), None)
    if cache_len is not None and ids.shape[1] + max_new_tokens > cache_len:
        raise ValueError(
            f"the prompt ({ids.shape[1]} tokens) plus max_new_tokens={max_new_tokens} exceeds the program's cache of "
            f"{cache_len} positions; export with a larger max_cache_len"
        )
    device = next((b.device for b in module.buffers()), ids.device)
    ids = ids.to(device)
    extra = {k: v.to(device) for k, v in extra.items()}
    tokens, done = ids, torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    with torch.no_grad():
        for i in range(ids.shape[1]):
            logits = module(input_ids=ids[:, i : i + 1], cache_position=torch.tensor([i], device=device), **extra)
        for step in range(max_new_tokens):
            next_tokens = logits[:, -1].argmax(-1)
            tokens, done, next_tokens = _finish(tokens, done, next_tokens, eos_token_id, pad_token_id)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            position = torch.tensor([tokens.shape[1] - 1], device=device)
            logits = module(input_ids=next_tokens[:, None], cache_position=position, **extra)
    return tokens


def _session(program: Any) -> Any:
    if isinstance(program, (str, os.PathLike)):
        import onnxruntime

        from .swap import program_file

        return onnxruntime.InferenceSession(program_file(os.fspath(program)), providers=["CPUExecutionProvider"])
    return program


_ORT_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def greedy_onnx(
    program: Any,
    input_ids: Any,
    max_new_tokens: int,
    *,
    attention_mask: Any = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    adapter_index: Any = None,
) -> torch.Tensor:
    """Greedy tokens from the past-key-values ONNX decoder (a path or an onnxruntime session).

    ``attention_mask`` (zeros on the left for padding) gives positions as transformers' ``generate``
    computes them, so a left-padded batch decodes as it does there. ``adapter_index`` (a program
    exported with ``adapters=[...]``): each prompt's row of the adapter table.
    """
    session = _session(program)
    ids = _check_ids(input_ids)
    takes = any(i.name == "adapter_index" for i in session.get_inputs())
    index = _check_index(adapter_index, takes, ids.shape[0])
    extra = {} if index is None else {"adapter_index": index.numpy()}
    mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask).long()
    past_inputs = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    if not past_inputs:
        raise ValueError("this ONNX model has no past_key_values inputs: export it with for_generation=True")
    first = past_inputs[0]
    heads, head_dim = first.shape[1], first.shape[3]
    dtype = _ORT_FLOATS.get(first.type, np.float32)
    batch = ids.shape[0]
    past = {i.name: np.zeros((batch, heads, 0, head_dim), dtype=dtype) for i in past_inputs}
    names = [o.name for o in session.get_outputs()]
    tokens, done = ids, torch.zeros(batch, dtype=torch.bool)
    step_ids = ids
    for _ in range(max_new_tokens):
        positions = mask.cumsum(-1) - 1
        positions = positions.masked_fill(mask == 0, 1)[:, -step_ids.shape[1]:]
        feeds = {"input_ids": step_ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy(), **past, **extra}
        outputs = dict(zip(names, session.run(None, feeds)))
        next_tokens = torch.from_numpy(outputs["logits"][:, -1]).argmax(-1)
        tokens, done, next_tokens = _finish(tokens, done, next_tokens, eos_token_id, pad_token_id)
        if bool(done.all()):
            break
        past = {name: outputs[name.replace("past_key_values.", "present.")] for name in past}
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype)], dim=1)
        step_ids = next_tokens[:, None]
    return tokens
