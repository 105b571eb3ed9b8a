"""Block graphs: a model's repeated blocks captured as graphs, rewritten, and run in their place.

A transformers model keeps its own class, its Python ``forward`` (keyword arguments, masks, caches,
output recording) and its modules; only the ``forward`` of each block that holds an adapted layer
(a ``_no_split_modules`` class: a decoder or encoder layer) is replaced by a :class:`BlockRunner`.
On a call the runner finds, or captures once, the block's graph for inputs like these, and runs it
on *that* block's own parameters, read at call time, plus the adapter's vectors. So:

* FSDP2's per-layer hooks and transformers' per-layer gradient checkpointing see the block module
  being called, as with PEFT;
* identical blocks (same class, same configuration, same parameter shapes) share one capture: a
  32-layer Llama is traced once, not 32 times;
* a graph holds no tensors of its own (parameters and vectors come in as inputs), so it is never
  stale after ``.to()``, FSDP2's resharding or a merge, and two threads can run it at once.

Where a graph cannot give what the caller asked for (a KV cache passed in, hooks on modules inside
the block, output recording inside it, a block that cannot be captured), the block runs its own
``forward`` and each adapted layer is scaled by a forward hook of ours that computes exactly what
PEFT's wrapper computes: the adapter is never dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.export import Dim
from torch.fx import GraphModule
from torch.fx.graph import CodeGen
from torch.utils import _pytree as pytree

from .errors import TraceError
from .mixed import Rows, broadcast_rows, choosing, current_rows
from .passes import cleanup_graph, insert_scales, slot_attr
from .passes._graph import VECTOR_ROOT
from .sites import CallSite, find_call_sites

__all__ = [
    "BlockGraph", "BlockRunner", "ScaleHook", "ScaleHooks", "bypassed", "bypassing", "capture", "find_blocks",
    "fingerprint",
]

Slot = tuple[str, str]  # (layer name, "input" | "output")
_state = threading.local()  # .bypass: blocks run their own forward and hooks do nothing
CAPTURE_LOCK = threading.RLock()  # one capture at a time (graphs, once captured, run concurrently)


class _Gate:
    """Captures exclude running models: torch.export (non-strict) tracks module calls process-wide,
    so another thread's eager module calls during an export break it ("Unexpected key ...").
    ``running()`` is shared (taken by ``IA3Model.forward`` / ``generate``), ``exclusive()`` is the
    capture's (and a merge's, a rebinding's); a thread that needs it gives up its shared hold while
    it waits, so two threads that both need it cannot deadlock. A waiting ``exclusive()`` holds new
    calls back: a thread calling forward in a loop would otherwise starve it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer: int | None = None
        self._waiting = 0  # threads waiting in exclusive()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        depth = getattr(_state, "gate_depth", 0)
        if depth == 0:
            with self._cond:
                while self._writer is not None or self._waiting:
                    self._cond.wait()
                self._readers += 1
        _state.gate_depth = depth + 1
        try:
            yield
        finally:
            _state.gate_depth = depth
            if depth == 0:
                with self._cond:
                    self._readers -= 1
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        me = threading.get_ident()
        if self._writer == me:  # nested (a whole-model trace inside a capture's caller)
            yield
            return
        holding = getattr(_state, "gate_depth", 0) > 0
        with self._cond:
            if holding:
                self._readers -= 1
                self._cond.notify_all()
            self._waiting += 1
            try:
                while self._writer is not None or self._readers > 0:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._writer = me
        try:
            yield
        finally:
            with self._cond:
                self._writer = None
                if holding:
                    self._readers += 1
                self._cond.notify_all()


GATE = _Gate()
_IGNORED_ATTRS = {"training", "layer_idx", "gradient_checkpointing"}


def _bypass() -> bool:
    return getattr(_state, "bypass", False)


def bypassing() -> bool:
    """Whether this thread runs the base model as it was (inside :func:`bypassed`)."""
    return _bypass()


@contextlib.contextmanager
def bypassed() -> Iterator[None]:
    """In this thread, installed blocks run their own Python forward and no scale hook applies: the
    base model as it was, for tracing the whole-model graph or for ``disable_adapter``."""
    before = _bypass()
    _state.bypass = True
    try:
        yield
    finally:
        _state.bypass = before


def find_blocks(model: nn.Module, layers: set[str]) -> dict[str, nn.Module]:
    """The outermost modules of a ``_no_split_modules`` class that hold one of ``layers``, by path."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    if not classes:
        return {}
    blocks: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name or type(module).__name__ not in classes:
            continue
        if any(name == b or name.startswith(b + ".") for b in blocks):
            continue
        prefix = name + "."
        if any(layer.startswith(prefix) for layer in layers):
            blocks[name] = module
    return blocks


def _simple(value: Any) -> bool:
    if isinstance(value, (bool, int, float, str, type(None))):
        return True
    if isinstance(value, (tuple, list)):
        return all(_simple(v) for v in value)
    return False


def fingerprint(block: nn.Module) -> tuple:
    """What a block's code can branch on besides its inputs: classes, the plain attributes of every
    module inside (``layer_idx`` excepted: it only indexes caches), the attention implementation, and
    the shape, dtype and device of every tensor. Blocks with equal fingerprints share a capture."""
    parts: list[Any] = []
    for name, module in block.named_modules():
        attrs = tuple(
            sorted(
                (k, repr(v)) for k, v in vars(module).items()
                if not k.startswith("_") and k not in _IGNORED_ATTRS and _simple(v)
            )
        )
        config = getattr(module, "config", None)
        impl = getattr(config, "_attn_implementation", None) if config is not None else None
        parts.append((name, type(module), attrs, impl))
    for name, t in (*block.named_parameters(), *block.named_buffers()):
        parts.append((name, tuple(t.shape), t.dtype, t.device))
    return tuple(parts)


def _autocast_state(device_type: str) -> tuple:
    try:
        if torch.is_autocast_enabled(device_type):
            return (device_type, torch.get_autocast_dtype(device_type))
    except (RuntimeError, TypeError):  # pragma: no cover - device types without autocast
        pass
    return ()


def _dims(val: Any) -> tuple | None:
    if not isinstance(val, torch.Tensor):
        return None
    out = []
    for d in val.shape:
        expr = d if isinstance(d, int) else d.node.expr
        out.append(int(expr) if isinstance(expr, int) or expr.is_number else expr)
    return tuple(out)


@dataclass
class BlockGraph:
    """One capture of a block class for one kind of input, rewritten with the scales.

    ``gm`` is functional: its placeholders are the block's tensors (``tensors``: paths inside the
    block), the vectors (``slots``: block-relative layer names), then the tensor leaves of the call.
    """

    gm: GraphModule
    tensors: list[str]
    slots: list[Slot]
    in_spec: Any
    out_spec: Any
    constants: list[Any]  # the call's non-tensor leaves, baked into the graph
    dims: list[tuple | None]
    ranges: dict[Any, tuple[int, float]]
    sites: list[CallSite] = field(default_factory=list)
    scaled: set[str] = field(default_factory=set)  # block-relative layers with a scale node
    training: bool = False  # the mode it was captured in (dropout is baked in)

    _accepted: set[tuple] = field(default_factory=set, repr=False)  # shapes already checked
    _per_row: GraphModule | None = field(default=None, repr=False)

    def per_row(self) -> GraphModule:
        """The copy of ``gm`` that takes one vector per row in each slot (made at first use)."""
        if self._per_row is None:
            from .passes.per_row import scale_per_row

            self._per_row = scale_per_row(self.gm)[0]
        return self._per_row

    def accepts(self, tensors: list[torch.Tensor]) -> bool:
        """Whether these tensor leaves fit the sizes the capture allows (static sizes, equal symbols)."""
        shapes = tuple(t.shape for t in tensors)
        if shapes in self._accepted:
            return True
        ok = self._check(tensors)
        if ok and len(self._accepted) < 256:
            self._accepted.add(shapes)
        return ok

    def _check(self, tensors: list[torch.Tensor]) -> bool:
        seen: dict[Any, int] = {}
        for t, want in zip(tensors, self.dims, strict=True):
            if want is None or t.dim() != len(want):
                return False
            for got, w in zip(t.shape, want, strict=True):
                if isinstance(w, int):
                    if got != w:
                        return False
                elif w.is_Symbol:
                    if seen.setdefault(w, got) != got:
                        return False
                    lo, hi = self.ranges.get(w, (2, float("inf")))
                    if not lo <= got <= hi:
                        return False
                else:
                    try:
                        if int(w.subs(seen)) != got:
                            return False
                    except (TypeError, ValueError):
                        return False
        return True


def _flatten(args: tuple, kwargs: dict) -> tuple[list[Any], Any]:
    return pytree.tree_flatten((args, dict(sorted(kwargs.items()))))


_CONSTANT = (bool, int, float, str, type(None))


def _describe_call(args: tuple, kwargs: dict) -> tuple[tuple, list[torch.Tensor]] | None:
    """For calls made of tensors, tuples of tensors and plain constants (what transformers passes
    its layers): a hashable description and the tensor leaves in :func:`_flatten`'s order; else
    ``None`` (pytree then does it)."""
    tensors: list[torch.Tensor] = []
    parts: list[Any] = []
    for name, value in (*((None, a) for a in args), *sorted(kwargs.items())):
        if isinstance(value, torch.Tensor):
            tensors.append(value)
            parts.append((name, value.dtype, value.dim(), value.device))
        elif isinstance(value, _CONSTANT):
            parts.append((name, "c", type(value), value))
        elif type(value) in (tuple, list) and all(type(x) is torch.Tensor for x in value):
            tensors.extend(value)
            parts.append((name, type(value), tuple((x.dtype, x.dim(), x.device) for x in value)))
        else:
            return None
    return ("fast", tuple(parts)), tensors


# keywords transformers hands every layer through ``**kwargs`` that no layer code reads (the
# loss's token count, output flags recorded by hooks): kept out of the graph's key, or each new
# value would be a new capture
_PASS_THROUGH = ("num_items_in_batch", "output_hidden_states", "output_attentions", "return_dict")


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """torch.export logs a warning per size-1 dimension it fixes: expected here (a batch of one,
    the shared rotary tables), and the runner checks sizes before every call."""
    logger = logging.getLogger("torch._export.non_strict_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _hidden_from_caller() -> Iterator[None]:
    """Keep the caller's output collector and saved-tensor hooks out of a capture's trace
    (the innermost saved-tensor hooks win, so identity hooks shadow the caller's)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - older transformers
        _active_collector = None
    token = _active_collector.set(None) if _active_collector is not None else None
    try:
        with torch.autograd.graph.saved_tensors_hooks(_identity, _identity):
            yield
    finally:
        if _active_collector is not None:
            _active_collector.reset(token)


def _lift(gm: GraphModule, block: nn.Module, slot_paths: dict[str, Slot]) -> tuple[list[str], list[Slot]]:
    """Turn every ``get_attr`` of a block tensor or a vector into a leading placeholder, so that the
    graph reads what it is given and holds nothing. Constants the trace made stay attributes."""
    graph = gm.graph
    first = next(n for n in graph.nodes if n.op == "placeholder")
    tensors: list[str] = []
    slots: list[Slot] = []
    lifted: dict[str, torch.fx.Node] = {}
    order: list[str] = []
    for node in list(graph.nodes):
        if node.op != "get_attr":
            continue
        target = node.target
        if target not in slot_paths:
            try:
                block.get_parameter(target)
            except AttributeError:
                try:
                    block.get_buffer(target)
                except AttributeError:
                    continue
        if target not in lifted:
            order.append(target)
            with graph.inserting_before(first):
                ph = graph.placeholder(f"_t{len(order)}_" + target.replace(".", "_"))
            ph.meta = dict(node.meta)
            lifted[target] = ph
        node.replace_all_uses_with(lifted[target])
        graph.erase_node(node)
    # placeholders come in creation order: block tensors and vectors interleaved as first read
    for target in order:
        if target in slot_paths:
            slots.append(slot_paths[target])
        else:
            tensors.append(target)
    # put the vectors after the block tensors, keeping each group's order
    phs = [lifted[t] for t in order]
    by_kind = [lifted[t] for t in order if t not in slot_paths] + [lifted[t] for t in order if t in slot_paths]
    if phs != by_kind:
        anchor = first
        for ph in reversed(by_kind):
            anchor.prepend(ph)
            anchor = ph
    for target in order:  # the graph keeps no reference to the captured block's tensors
        owner, _, attr = target.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        mod._parameters.pop(attr, None)
        mod._buffers.pop(attr, None)
    return tensors, slots


_HOOK_DICTS = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
    "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
)


@contextlib.contextmanager
def _own_hooks_off(module: nn.Module) -> Iterator[None]:
    """The module's own forward (pre-)hooks do not fire: it is being called already, they ran."""
    saved = {name: getattr(module, name) for name in _HOOK_DICTS}
    for name in _HOOK_DICTS:
        setattr(module, name, OrderedDict())
    try:
        yield
    finally:
        for name, hooks in saved.items():
            setattr(module, name, hooks)


def capture(
    block: nn.Module,
    args: tuple,
    kwargs: dict,
    slots: dict[Slot, torch.Tensor],
    targets: dict[str, bool],
    *,
    cast: bool,
    dynamic: bool = True,
) -> BlockGraph:
    """Capture ``block`` (its class's own ``forward``) for calls like this one, and rewrite it.

    ``slots`` are the block-relative ``(layer, placement)`` pairs to scale, each with a template
    vector; ``targets`` maps block-relative layer names to whether they are feedforward. Every
    dimension of every tensor input is dynamic where the code allows (``Dim.AUTO``).
    """
    leaves, spec = _flatten(args, kwargs)
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    constants = [None if isinstance(x, torch.Tensor) else x for x in leaves]
    cls_forward = type(block).forward

    def flat_forward(*ts: torch.Tensor) -> Any:
        it = iter(ts)
        a, k = pytree.tree_unflatten([next(it) if isinstance(x, torch.Tensor) else x for x in leaves], spec)
        return cls_forward(block, *a, **k)

    shapes = (tuple({i: Dim.AUTO for i in range(t.dim())} if t.dim() else None for t in tensors),) if dynamic else None
    saved_ckpt = getattr(block, "gradient_checkpointing", None)
    before = _bypass()
    _state.capturing = flat_forward
    _state.bypass = True  # our scale hooks stay out of the trace: the graph gets its own scales
    try:
        if saved_ckpt:
            block.gradient_checkpointing = False  # checkpointing is the runner's, outside the graph
        # export calls the block as a module: its hooks ran already for the call being served and must
        # not run again (FSDP2's post-forward hook would reshard, freeing the parameters the graph reads)
        with warnings.catch_warnings(), _hidden_from_caller(), _quiet_export(), _own_hooks_off(block):
            warnings.simplefilter("ignore")
            ep = torch.export.export(block, tuple(tensors), {}, strict=False, dynamic_shapes=shapes)
    except Exception as e:  # noqa: BLE001 - reported as one kind of failure
        head = "\n".join(str(e).strip().splitlines()[:8])
        raise TraceError(f"could not capture {type(block).__name__} with torch.export: {type(e).__name__}: {head}") from e
    finally:
        _state.capturing = None
        _state.bypass = before
        if saved_ckpt:
            block.gradient_checkpointing = saved_ckpt
    gm = ep.module()
    gm._forward_pre_hooks.clear()  # export's input checks: the runner checks sizes itself
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    out_spec = graph._codegen.pytree_info.out_spec
    graph._codegen = CodeGen()
    dims = [_dims(n.meta.get("val")) for n in graph.nodes if n.op == "placeholder"]
    ranges = {}
    for sym, vr in ep.range_constraints.items():
        hi = vr.upper
        ranges[sym] = (int(vr.lower), float("inf") if str(hi) in ("int_oo", "oo") else int(hi))
    cleanup_graph(gm)
    raw = find_call_sites(gm)
    sites = [dataclasses.replace(s, targeted=s.name in targets, feedforward=targets.get(s.name, False)) for s in raw]
    _, result = insert_scales(gm, sites, dict(slots), cast=cast)
    scaled = {layer for (layer, _), names in result.inserted.items() if names}
    slot_paths = {slot_attr(*slot): slot for slot in slots}
    lifted_tensors, lifted_slots = _lift(gm, block, slot_paths)
    if hasattr(gm, VECTOR_ROOT):
        delattr(gm, VECTOR_ROOT)
    graph.lint()
    gm.recompile()
    return BlockGraph(
        gm, lifted_tensors, lifted_slots, spec, out_spec, constants, dims, ranges, sites, scaled, block.training
    )


class ScaleHook:
    """One forward hook (pre-hook for an input scale) on an adapted layer: PEFT's arithmetic with
    the live vector read at each call. An object, not a closure, so that a ``copy.deepcopy`` of the
    model gets hooks that read the copy's vectors."""

    def __init__(self, hooks: ScaleHooks, name: str, placement: str) -> None:
        self.hooks, self.name, self.placement = hooks, name, placement

    def __call__(self, module: nn.Module, inputs: tuple, *output: torch.Tensor) -> Any:
        # runs once per adapted layer per decode step: kept to the arithmetic (no needless casts)
        if getattr(_state, "bypass", False):
            return None
        rows = current_rows()
        if rows is not None:  # a mixed batch: one vector per row
            v = rows.value(self.name, self.placement)
            if v is not None and (output or inputs):
                v = broadcast_rows(v, output[0] if output else inputs[0])
        else:
            v = self.hooks.value(self.name, self.placement)
        if v is None:
            return None
        if output:
            out = output[0]
            y = out * v
            return y if y.dtype == out.dtype else y.to(out.dtype)
        if not inputs:
            return None
        x = inputs[0]
        if x.dtype == v.dtype:
            return (x * v, *inputs[1:])
        return ((x.to(v.dtype) * v).to(x.dtype), *inputs[1:])


class ScaleHooks:
    """The scale hooks of one adapted model: where they are, and how to remove them."""

    def __init__(self, value: Callable[[str, str], torch.Tensor | None]) -> None:
        self.value = value
        self._installed: list[tuple[nn.Module, int, bool]] = []  # (module, hook id, is pre-hook)

    def install(self, name: str, module: nn.Module, feedforward: bool) -> None:
        hook = ScaleHook(self, name, "input" if feedforward else "output")
        handle = module.register_forward_pre_hook(hook) if feedforward else module.register_forward_hook(hook)
        self._installed.append((module, handle.id, feedforward))

    def remove(self) -> None:
        for module, hook_id, pre in self._installed:
            (module._forward_pre_hooks if pre else module._forward_hooks).pop(hook_id, None)
        self._installed.clear()


def _collector_wants_inner_outputs() -> bool:
    """transformers records attentions (and the like) with hooks on modules inside the blocks."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - older transformers
        return False
    collected = _active_collector.get()
    return bool(collected) and any(k not in ("hidden_states", "_hidden_states_layers") for k in collected)


def _tracing(args: tuple, kwargs: dict) -> bool:
    """Whether this call is being traced (dynamo, or export's fake tensors). Not
    ``torch.compiler.is_compiling()``: that flag is process-wide while any export runs, so another
    thread's capture would send this thread's calls down the eager path."""
    if torch.compiler.is_dynamo_compiling():
        return True
    for value in (*args, *kwargs.values()):
        # a fake tensor, or any other tensor subclass (functional tensors of a trace)
        if isinstance(value, torch.Tensor) and type(value) is not torch.Tensor and not isinstance(value, nn.Parameter):
            return True
    return False


_CACHE_TYPES: tuple[type, ...] | None = None


def _is_cache(value: Any) -> bool:
    global _CACHE_TYPES
    if _CACHE_TYPES is None:
        try:
            from transformers.cache_utils import Cache
        except ImportError:  # pragma: no cover
            _CACHE_TYPES = ()
        else:
            _CACHE_TYPES = (Cache,)
    return bool(_CACHE_TYPES) and isinstance(value, _CACHE_TYPES)


class BlockRunner:
    """The ``forward`` installed on one block: the shared graph on this block's tensors, or the
    block's own forward (scaled by hooks) where a graph cannot serve the call."""

    def __init__(self, owner: Any, name: str, block: nn.Module, group: Any) -> None:
        self.owner = owner  # the IA3Model: live vectors, graph cache
        self.name = name
        self.block = block
        self.group = group
        self._readers: dict[int, list[Callable[[], torch.Tensor]]] = {}
        self.graph_calls = 0
        self.eager_calls = 0
        self._named: frozenset[str] | None = None
        self._first_param: tuple[nn.Module, str] | None = None
        self._inner = [m for m in block.modules() if m is not block]  # where hooks would be skipped

    def as_forward(self) -> Callable[..., Any]:
        """What to set as the block's ``forward``: a bound method (torch.export wants a function's
        code; ``copy.deepcopy`` of the model copies the runner with the block)."""
        return self.run

    def run(self, *args: Any, **kwargs: Any) -> Any:
        capturing = getattr(_state, "capturing", None)
        if capturing is not None:  # torch.export is tracing this block's own forward
            return capturing(*args, **kwargs)
        block = self.block
        rows = current_rows()
        if _bypass() or (rows is None and not self.owner._block_is_live(self.name)):
            return type(block).forward(block, *args, **kwargs)
        if _tracing(args, kwargs):  # torch.export / torch.compile of the adapted model: trace the
            self.eager_calls += 1  # block's own code, scaled by the hooks (plain, traceable ops)
            return type(block).forward(block, *args, **kwargs)
        checkpoint = (
            getattr(block, "gradient_checkpointing", False) and block.training and torch.is_grad_enabled()
        )
        if checkpoint:  # as transformers' GradientCheckpointingLayer: no cache inside a checkpoint
            if kwargs.get("use_cache"):
                kwargs["use_cache"] = False
            if not getattr(block, "_can_checkpoint_with_cache", False):
                for key in ("cache", "past_key_values", "past_key_value", "layer_past"):
                    if kwargs.get(key) is not None:
                        kwargs[key] = None
        if self._needs_eager(args, kwargs):
            self.eager_calls += 1
            return type(block).forward(block, *args, **kwargs)
        if checkpoint:
            # capture (if new) outside the checkpoint: its trace must not run under checkpoint's hooks
            if self._lookup(args, self._graph_kwargs(kwargs)) is None:
                self.eager_calls += 1
                return type(block).forward(block, *args, **kwargs)
            # the recomputation runs after the call: it gets the call's row choice from here
            return block._gradient_checkpointing_func(partial(self._run_graph_rows, rows, **kwargs), *args)
        return self._run_graph_rows(rows, *args, **kwargs)

    def _needs_eager(self, args: tuple, kwargs: dict) -> bool:
        for value in (*args, *kwargs.values()):
            if _is_cache(value):
                return True
        for module in self._inner:
            for registry in (module._forward_hooks, module._forward_pre_hooks):
                if registry and any(
                    not isinstance(h, ScaleHook) and getattr(h, "__name__", "") != "output_capturing_hook"
                    for h in registry.values()
                ):
                    return True
        return _collector_wants_inner_outputs()

    def _graph_kwargs(self, kwargs: dict) -> dict:
        named = self._named
        if named is None:
            import inspect

            try:
                params = inspect.signature(type(self.block).forward).parameters
            except (TypeError, ValueError):
                params = {}
            named = self._named = frozenset(params)
        if any(k in kwargs and k not in named for k in _PASS_THROUGH):
            kwargs = {k: v for k, v in kwargs.items() if k in named or k not in _PASS_THROUGH}
        return kwargs

    def _run_graph_rows(self, rows: Rows | None, *args: Any, **kwargs: Any) -> Any:
        kwargs = self._graph_kwargs(kwargs)
        found = self._lookup(args, kwargs)
        if found is None:
            self.eager_calls += 1
            with choosing(rows):
                return type(self.block).forward(self.block, *args, **kwargs)
        graph, tensors = found
        self.graph_calls += 1
        inputs = [read() for read in self._reader(graph)]
        if rows is None:
            for layer, placement in graph.slots:
                inputs.append(self.owner._slot_input(f"{self.name}.{layer}", placement, self.block, layer))
            out = graph.gm(*inputs, *tensors)
        else:  # one vector per row: the per-row copy of the graph (passes/per_row.py)
            for layer, placement in graph.slots:
                value = rows.compute(f"{self.name}.{layer}", placement)  # each slot is read once per call
                if value is None:
                    ones = self.owner._slot_ones(f"{self.name}.{layer}", placement, layer)
                    value = ones.unsqueeze(0).expand(rows.batch, *ones.shape)
                inputs.append(value)
            out = graph.per_row()(*inputs, *tensors)
        return pytree.tree_unflatten(list(out), graph.out_spec)

    def _lookup(self, args: tuple, kwargs: dict) -> tuple[BlockGraph, list[torch.Tensor]] | None:
        """The graph for this call and its tensor inputs, captured first if new; ``None`` where
        the block must run its own forward."""
        found = _describe_call(args, kwargs)  # the common case, without pytree: ~10x cheaper
        if found is None:
            leaves, spec = _flatten(args, kwargs)
            tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
            shape = (spec, tuple((x.dtype, x.dim(), x.device) if isinstance(x, torch.Tensor) else x for x in leaves))
        else:
            shape, tensors = found
        try:
            key = (self.group, shape, self._param_state(), self.block.training,
                   _autocast_state(tensors[0].device.type if tensors else "cpu"))
            hash(key)
        except TypeError:  # an input that cannot key a cache (an object): run the block itself
            return None
        graph = self.owner._block_graph(self, key, args, kwargs, tensors)
        return None if graph is None else (graph, tensors)

    def _param_state(self) -> tuple:
        """The dtype and device of the block's first parameter, read now (``.to()`` changes it)."""
        first = self._first_param
        if first is None:
            name = next((n for n, _ in self.block.named_parameters()), None)
            if name is None:
                return ()
            parent, _, attr = name.rpartition(".")
            first = self._first_param = (self.block.get_submodule(parent) if parent else self.block, attr)
        p = getattr(*first)
        return (p.dtype, p.device)

    def _reader(self, graph: BlockGraph) -> list[Callable[[], torch.Tensor]]:
        readers = self._readers.get(id(graph))
        if readers is None:
            readers = []
            for path in graph.tensors:
                parent, _, attr = path.rpartition(".")
                mod = self.block.get_submodule(parent) if parent else self.block
                readers.append(partial(getattr, mod, attr))
            self._readers = {id(graph): readers}
        return readers
