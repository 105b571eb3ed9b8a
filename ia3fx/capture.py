"""Capture a model as a GraphModule whose linear calls carry their owning module's path.

transformers 5 models cannot be symbolically traced, so they go through non-strict
``torch.export``; plain modules without example inputs take ``torch.fx.symbolic_trace`` with
linear and conv layers traced through, so that every site is a function call on a parameter and
no container of the user's model is ever shared with the graph.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.export import Dim
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from .default_inputs import default_inputs, with_defaults_hint
from .errors import TraceError, shorten
from .traceable_rope import traceable_dynamic_rope

__all__ = ["trace", "normalize_inputs", "input_signature", "accepts"]

META_KEY = "ia3fx"  # GraphModule.meta[META_KEY]: how the graph was captured


def is_transformers_model(model: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a runtime dependency
        return False
    return isinstance(model, PreTrainedModel)


def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """``dict`` → keyword inputs, ``tuple``/``list`` → positional, a lone tensor → one positional."""
    if example_inputs is None:
        return (), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        if len(example_inputs) == 2 and isinstance(example_inputs[1], Mapping) and isinstance(
            example_inputs[0], (tuple, list)
        ):
            return tuple(example_inputs[0]), dict(example_inputs[1])
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def input_signature(args: tuple, kwargs: dict) -> tuple:
    """What a graph is specialised on besides shapes: structure, dtypes, ranks, constants."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    parts = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            parts.append(("T", leaf.dtype, leaf.dim(), leaf.device.type))
        else:
            parts.append(("C", repr(leaf)))
    return (str(spec), tuple(parts))


def _leaf_shapes(args: tuple, kwargs: dict) -> list[tuple[int, ...] | None]:
    leaves, _ = pytree.tree_flatten((args, kwargs))
    return [tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in leaves]


def accepts(gm: GraphModule, args: tuple, kwargs: dict) -> bool:
    """Whether ``gm`` was captured for calls shaped like this one (static dims must agree)."""
    info = gm.meta.get(META_KEY, {})
    if info.get("any_signature"):
        return True
    static = info.get("static_shapes")
    if static is None:
        return True
    shapes = _leaf_shapes(args, kwargs)
    if len(shapes) != len(static):
        return False
    for got, want in zip(shapes, static):
        if want is None:
            continue
        if got is None or len(got) != len(want):
            return False
        if any(w is not None and g != w for g, w in zip(got, want)):
            return False
    return True


@contextlib.contextmanager
def _caches_disabled(model: nn.Module) -> Iterator[None]:
    """``use_cache=False`` on every config in the model (T5 keeps a copy per stack), restored after."""
    saved = []
    seen: set[int] = set()
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is None or id(cfg) in seen or not hasattr(cfg, "use_cache"):
            continue
        seen.add(id(cfg))
        saved.append((cfg, cfg.use_cache))
        cfg.use_cache = False
    try:
        yield
    finally:
        for cfg, value in saved:
            cfg.use_cache = value


@contextlib.contextmanager
def _training_mode(model: nn.Module, train: bool | None) -> Iterator[None]:
    if train is None:
        yield
        return
    states = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        yield
    finally:
        for m, state in states:
            m.training = state


def _dim_spec(x: Any, token_dims: bool) -> Any:
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return None
    spec = {0: Dim.AUTO}
    if token_dims and x.dim() in (2, 3):
        spec[1] = Dim.AUTO  # (batch, seq[, hidden]): ids, masks, labels, embeddings
    return spec


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict, token_dims: bool) -> dict | None:
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError:
        return None
    return {
        name: pytree.tree_map(lambda x: _dim_spec(x, token_dims), value)
        for name, value in bound.arguments.items()
    }


def _static_shapes(gm: GraphModule, args: tuple, kwargs: dict) -> list | None:
    """Per input leaf: the sizes the trace fixed (``None`` where a dim stayed dynamic)."""
    shapes = _leaf_shapes(args, kwargs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    tensor_vals = [n.meta.get("val") for n in placeholders]
    tensor_vals = [v for v in tensor_vals if isinstance(v, torch.Tensor)]
    if len(tensor_vals) != sum(s is not None for s in shapes):
        return None
    it = iter(tensor_vals)
    out: list = []
    for s in shapes:
        if s is None:
            out.append(None)
            continue
        val = next(it)
        out.append(tuple(d if isinstance(d, int) else None for d in val.shape))
    return out


def describe_inputs(args: tuple, kwargs: dict, limit: int = 8) -> str:
    """``input_ids: int64[2, 5], attention_mask: float32[3, 2]``: concrete sizes, for messages."""
    leaves, _ = pytree.tree_flatten_with_path((args, kwargs))
    parts = []
    for path, leaf in leaves[:limit]:
        name = pytree.keystr(path[1:]).lstrip(".").strip("[]'\"") if path[0].idx == 1 else f"args{pytree.keystr(path[1:])}"
        if isinstance(leaf, torch.Tensor):
            parts.append(f"{name}: {str(leaf.dtype).removeprefix('torch.')}[{', '.join(map(str, leaf.shape))}]")
        else:
            parts.append(f"{name}: {shorten(repr(leaf), 40)}")
    if len(leaves) > limit:
        parts.append(f"... ({len(leaves) - limit} more)")
    return ", ".join(parts) or "none"


def _unknown_keywords(model: nn.Module, kwargs: dict) -> list[str]:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return []
    named = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return [k for k in kwargs if k not in named]


def _explain(
    exc: BaseException, model: nn.Module, how: str, args: tuple = (), kwargs: dict | None = None
) -> TraceError:
    kwargs = kwargs or {}
    name = type(model).__name__
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    head = "\n".join(shorten(ln, 300) for ln in lines[:12])
    if how != "symbolic_trace":  # concrete sizes: the trace's message may name symbolic ones (s70)
        head += f"\ninputs: {describe_inputs(args, kwargs)}"
        unknown = _unknown_keywords(model, kwargs)
        if unknown:
            head += f"\nkeyword arguments that {name}.forward does not name: {', '.join(map(repr, unknown))}"
    hint = (
        "Make the failing construct traceable (no Python control flow on tensor values, no "
        "data-dependent shapes), or pass example_inputs that avoid that branch, or trace it yourself "
        "and pass the GraphModule / ExportedProgram to ia3fx."
    )
    if how == "symbolic_trace":
        hint = (
            "torch.fx.symbolic_trace cannot follow this model; pass example_inputs so that ia3fx uses "
            "torch.export instead, or hand ia3fx an ExportedProgram."
        )
    return TraceError(f"could not trace {name} with {how}: {type(exc).__name__}: {head}\n{hint}")


class _ThroughLayers(torch.fx.Tracer):
    """Traces into Linear/Conv layers so their calls are F.linear/F.conv on get_attr weights."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)):
            return False
        return super().is_leaf_module(m, qualname)


def _symbolic_trace(model: nn.Module) -> GraphModule:
    tracer = _ThroughLayers()
    try:
        graph = tracer.trace(model)
    except Exception as e:  # noqa: BLE001 - any failure of tracing is reported the same way
        raise _explain(e, model, "symbolic_trace") from e
    gm = GraphModule(tracer.root, graph, type(model).__name__)
    gm.meta[META_KEY] = {"how": "symbolic_trace", "any_signature": True}
    return gm


def _export(model: nn.Module, args: tuple, kwargs: dict, token_dims: bool, dynamic: bool) -> GraphModule:
    dynamic_shapes = _dynamic_shapes(model, args, kwargs, token_dims) if dynamic else None
    try:
        ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic_shapes)
    except Exception as e:  # noqa: BLE001
        raise _explain(e, model, "torch.export (non-strict)", args, kwargs) from e
    gm = ep.module()
    gm.meta[META_KEY] = {
        "how": "export",
        "static_shapes": _static_shapes(gm, args, kwargs),
        "signature": input_signature(args, kwargs),
    }
    return gm


def trace(
    model: nn.Module | GraphModule | torch.export.ExportedProgram,
    example_inputs: Any = None,
    *,
    train: bool | None = None,
    dynamic: bool = True,
) -> GraphModule:
    """Capture ``model`` as a GraphModule (aten level for export, torch level for symbolic_trace).

    ``train`` traces in that mode and restores the model's own flags afterwards (a train and an
    eval graph differ: dropout is baked in). With ``dynamic`` (the default) the batch dimension of
    every input, and the sequence dimension of token-shaped inputs of transformers models, are
    dynamic where the model allows. ``dynamic=False`` fixes every size to the example's: torch.export
    then skips its symbolic shape reasoning and traces 2-3x faster (a 7B-shaped Llama on the meta
    device: about 7 s instead of 18 s), which is all a dry run like :func:`ia3fx.plan` needs.
    """
    if isinstance(model, torch.export.ExportedProgram):
        gm = model.module()
        gm.meta[META_KEY] = {"how": "exported_program", "any_signature": True}
        return gm
    if isinstance(model, GraphModule):
        gm = GraphModule(model, _copy_graph(model), type(model).__name__)
        gm.meta.update(model.meta)
        gm.meta.setdefault(META_KEY, {"how": "graph_module", "any_signature": True})
        return gm
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace() takes an nn.Module, GraphModule or ExportedProgram, got {type(model)}")
    from .blocks import bypassed

    is_hf = is_transformers_model(model)
    args, kwargs = normalize_inputs(example_inputs)
    defaulted = example_inputs is None and is_hf
    if defaulted:
        args, kwargs = default_inputs(model)
    # a model adapted in place by ia3fx traces as its base computation
    with _training_mode(model, train), bypassed():
        if not args and not kwargs:
            return _symbolic_trace(model)
        with _caches_disabled(model) if is_hf else contextlib.nullcontext(), traceable_dynamic_rope(model):
            try:
                return _export(model, args, kwargs, token_dims=is_hf, dynamic=dynamic)
            except TraceError as e:
                if not defaulted:
                    raise
                raise with_defaults_hint(e, model) from e


def _copy_graph(gm: GraphModule) -> torch.fx.Graph:
    """A copy of ``gm``'s graph, so that passes never edit a graph the user handed in."""
    graph = torch.fx.Graph(owning_module=None, tracer_cls=gm.graph._tracer_cls)
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    graph._codegen = gm.graph._codegen
    return graph
