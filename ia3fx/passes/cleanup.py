"""``cleanup_graph``: drop what tracing adds to a graph that eager PyTorch never runs.

Under ``torch.export`` transformers cannot ask whether a call needs an attention mask, so it
always builds one: for a decoder a ``(batch, 1, seq, seq)`` boolean causal mask made of
``arange``/``index``/``le``/``and`` nodes, for an encoder called without ``attention_mask`` an
all-true one, handed to ``scaled_dot_product_attention``. Eagerly it passes ``attn_mask=None``
(with ``is_causal=True`` for a decoder) instead, which skips building the mask and lets the fused
attention kernel skip the blocks above the diagonal. This pass gives the traced graph that eager
call back and removes the nodes left dead.

A mask is dropped (``is_causal=True``, or no mask) only when all of these hold:

* it is a boolean tensor computed from input *shapes* alone: no input values (so an
  ``attention_mask`` or ``position_ids`` input keeps its mask), no parameters or buffers, no
  random ops;
* its numeric constants are small (``|c| <= 64``), so no sliding-window or chunk size hides in it
  beyond the sizes tried below;
* replayed on CPU at several sizes (lengths 2, 3, 5 and 127, batch sizes 2, 5 and 9, within the
  ranges the trace allows) it is exactly the lower-triangular causal pattern, or all true;
* for ``is_causal``: query and key have the same (symbolic) length, where sdpa's top-left
  alignment and transformers' bottom-right one agree.

Dead nodes are removed, including ``_assert_tensor_metadata`` checks whose tensor has no other
use. Checks on live tensors stay: they catch a dtype or device the graph was not traced for.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_aggregate

__all__ = ["CleanupResult", "cleanup_graph"]

aten = torch.ops.aten

_SDPA = aten.scaled_dot_product_attention.default
_ASSERT = aten._assert_tensor_metadata.default
_SHAPE_OPS = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int}
_MAX_CONSTANT = 64  # larger constants could be a window or chunk size that small sizes never reach
_SENTINELS = {torch.iinfo(torch.int64).max, torch.iinfo(torch.int64).min}  # "to the end" slices
_SMALL = (2, 5)  # sizes tried for all dynamic dims at once
# then for the mask's length dims, the others at 2: past any window or chunk of at most
# _MAX_CONSTANT, and small enough (2 x 127 x 127 < 32768) that no replayed op goes multi-threaded
_LARGE = (127,)
_MIDDLE = (9, 3)  # a batch-like dim alone, with the length dims at 3
_MAX_ELEMENTS = 1 << 22  # a mask larger than this at the sizes tried is not replayed
_CPU = torch.device("cpu")


@dataclass
class CleanupResult:
    """What ``cleanup_graph`` did."""

    causal: list[str] = field(default_factory=list)  # attention nodes now called with is_causal=True
    unmasked: list[str] = field(default_factory=list)  # attention nodes whose all-true mask was dropped
    kept_masks: dict[str, str] = field(default_factory=dict)  # attention node -> why its mask stays
    removed: int = 0  # nodes erased

    @property
    def modified(self) -> bool:
        return bool(self.causal or self.unmasked or self.removed)


def cleanup_graph(gm: GraphModule) -> tuple[GraphModule, CleanupResult]:
    """Give attention its eager call back (``is_causal=True`` or no mask) and remove dead nodes."""
    graph = gm.graph
    result = CleanupResult()
    verdicts: dict[Node, tuple[str | None, str]] = {}  # mask node -> (pattern, why not)
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not _SDPA:
            continue
        mask, is_causal = _sdpa_arg(node, 3, "attn_mask"), _sdpa_arg(node, 5, "is_causal", False)
        if not isinstance(mask, Node) or is_causal:
            continue
        if mask not in verdicts:
            verdicts[mask] = _classify(mask)
        pattern, reason = verdicts[mask]
        if pattern == "causal":
            reason = _lengths_differ(node) or ""
        if reason:
            result.kept_masks[node.name] = reason
            continue
        kwargs = {
            "dropout_p": _sdpa_arg(node, 4, "dropout_p", 0.0),
            "is_causal": pattern == "causal",
            **{key: node.kwargs[key] for key in ("scale", "enable_gqa") if key in node.kwargs},
        }
        node.args, node.kwargs = tuple(node.args[:3]), kwargs
        (result.causal if pattern == "causal" else result.unmasked).append(node.name)
    result.removed = _remove_dead(graph)
    if result.modified:
        graph.lint()
        gm.recompile()
    return gm, result


# --- which mask is it? ---------------------------------------------------------------------------
def _sdpa_arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, Node) else None


def _same_size(a: Any, b: Any) -> bool:
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return a.node.expr == b.node.expr
    return isinstance(a, int) and isinstance(b, int) and a == b


def _lengths_differ(sdpa: Node) -> str | None:
    q, k = (_val(n) for n in sdpa.args[:2])
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
        return "query/key have no traced shape"
    if not _same_size(q.shape[-2], k.shape[-2]):
        return "query and key lengths may differ"
    return None


def _classify(mask: Node) -> tuple[str | None, str]:
    """``("causal" | "full", "")`` if every replay of the mask shows that pattern, else ``(None, why)``."""
    val = _val(mask)
    if not isinstance(val, torch.Tensor) or val.dtype != torch.bool:
        return None, "not a boolean mask"
    sub, inputs, reason = _shape_only_subgraph(mask)
    if reason:
        return None, reason
    for node in sub:
        for c in _constants((node.args, node.kwargs)):
            if abs(c) > _MAX_CONSTANT and c not in _SENTINELS:
                return None, f"mask uses the constant {c} (a window or chunk size?)"
    patterns = {"causal", "full"}
    tried = 0
    for assignment in _assignments(inputs, mask):
        try:
            value = _evaluate(sub, inputs, mask, assignment)
        except Exception as e:  # noqa: BLE001 - a mask we cannot replay is kept as it is
            return None, f"mask could not be evaluated ({type(e).__name__}: {e})"
        patterns &= _patterns(value, mask, assignment)
        if not patterns:
            return None, "mask is neither the causal pattern nor all true"
        tried += 1
    if not tried:
        return None, "mask could not be evaluated at any size"
    return ("full" if "full" in patterns else "causal"), ""


def _shape_only_subgraph(mask: Node) -> tuple[list[Node], list[Node], str | None]:
    """The nodes ``mask`` is computed from, and the inputs whose sizes (only) they read."""
    seen: set[Node] = set()
    inputs: set[Node] = set()
    stack = [mask]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            return [], [], "mask depends on input values"
        if node.op != "call_function":
            return [], [], f"mask depends on a {node.op} node ({node.name})"
        target = node.target
        if isinstance(target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in target.tags:
            return [], [], "mask is random"
        if target in _SHAPE_OPS:
            source = node.args[0]
            if not isinstance(source, Node) or source.op != "placeholder":
                return [], [], "mask depends on the size of an intermediate"
            inputs.add(source)
            continue
        stack.extend(node.all_input_nodes)
    order = {n: i for i, n in enumerate(mask.graph.nodes)}
    sub = sorted((n for n in seen if n.op == "call_function"), key=order.__getitem__)
    return sub, sorted(inputs, key=order.__getitem__), None


def _constants(args: Any) -> Iterable[int | float]:
    if isinstance(args, bool):
        return
    if isinstance(args, (int, float)):
        yield args
    elif isinstance(args, (list, tuple)):
        for a in args:
            yield from _constants(a)
    elif isinstance(args, dict):
        for a in args.values():
            yield from _constants(a)


def _symbols(values: Iterable[Any]) -> list[Any]:
    syms: dict[str, Any] = {}
    for val in values:
        if not isinstance(val, torch.Tensor):
            continue
        for d in val.shape:
            if isinstance(d, torch.SymInt):
                for s in d.node.expr.free_symbols:
                    syms.setdefault(str(s), s)
    return [syms[k] for k in sorted(syms)]


def _range(sym: Any, val: torch.Tensor) -> tuple[int, int]:
    lo, hi = 1, 1 << 30
    env = getattr(next(d for d in val.shape if isinstance(d, torch.SymInt)).node, "shape_env", None)
    bounds = env.var_to_range.get(sym) if env is not None else None
    if bounds is not None:
        lo = max(lo, _finite(bounds.lower, lo))
        hi = min(hi, _finite(bounds.upper, hi))
    return lo, hi


def _finite(bound: Any, default: int) -> int:
    return int(bound) if isinstance(bound, int) or getattr(bound, "is_Integer", False) else default


def _assignments(inputs: list[Node], mask: Node) -> Iterable[dict[Any, int]]:
    """Sizes to replay the mask at: every dim small, then the mask's own (length) dims large,
    then each other (batch-like) dim alone at a middle size."""
    vals = [_val(n) for n in inputs]
    syms = _symbols(vals)
    if not syms:
        yield {}
        return
    anchor = next(v for v in vals if any(isinstance(d, torch.SymInt) for d in v.shape))
    ranges = dict(zip(syms, (_range(s, anchor) for s in syms), strict=True))
    lengths = {s for d in _val(mask).shape[-2:] if isinstance(d, torch.SymInt) for s in d.node.expr.free_symbols}
    picks = [dict.fromkeys(syms, p) for p in _SMALL]
    picks += [{s: (p if s in lengths else _SMALL[0]) for s in syms} for p in _LARGE if lengths]
    picks += [{s: _MIDDLE[0] if s is other else _MIDDLE[1] for s in syms} for other in syms if other not in lengths]
    seen = set()
    for pick in picks:
        assignment = {s: min(max(p, ranges[s][0]), ranges[s][1]) for s, p in pick.items()}
        key = tuple(assignment.values())
        if key not in seen:
            seen.add(key)
            yield assignment


def _concrete(size: Any, assignment: dict[Any, int]) -> int:
    if isinstance(size, torch.SymInt):
        return int(size.node.expr.xreplace(assignment))
    return int(size)


def _evaluate(sub: list[Node], inputs: list[Node], mask: Node, assignment: dict[Any, int]) -> torch.Tensor:
    """Replay the mask's nodes on CPU, with inputs of the given sizes (their values are never read)."""
    env: dict[Node, Any] = {}
    for node in inputs:
        val = _val(node)
        shape = [_concrete(d, assignment) for d in val.shape]
        env[node] = torch.empty(shape, dtype=val.dtype)
    out_val = _val(mask)
    if out_val is not None and _numel(out_val, assignment) > _MAX_ELEMENTS:
        raise MemoryError("mask too large to replay")

    def load(a: Any) -> Any:
        if isinstance(a, Node):
            return env[a]
        if isinstance(a, torch.device):
            return _CPU
        return a

    for node in sub:
        args = map_aggregate(node.args, load)
        kwargs = map_aggregate(node.kwargs, load)
        env[node] = node.target(*args, **kwargs)
    return env[mask]


def _numel(val: torch.Tensor, assignment: dict[Any, int]) -> int:
    n = 1
    for d in val.shape:
        n *= _concrete(d, assignment)
    return n


def _patterns(value: Any, mask: Node, assignment: dict[Any, int]) -> set[str]:
    """Which of "causal" (for every attention call using the mask) and "full" ``value`` shows."""
    if not isinstance(value, torch.Tensor) or value.dtype != torch.bool or value.dim() < 2:
        return set()
    found = {"full"} if bool(value.all()) else set()
    users = [u for u in mask.users if u.op == "call_function" and u.target is _SDPA]
    lengths = set()  # (query, key) lengths: one check each, however many layers share the mask
    for sdpa in users:
        q, k = _val(sdpa.args[0]), _val(sdpa.args[1])
        lengths.add((_concrete(q.shape[-2], assignment), _concrete(k.shape[-2], assignment)))
    for lq, lk in lengths:
        if tuple(value.shape[-2:]) != (lq, lk):
            return found
        causal = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None]  # (tril() goes multi-threaded)
        if not torch.equal(value, causal.expand(value.shape)):
            return found
    return found | ({"causal"} if users else set())


# --- dead code ---------------------------------------------------------------------------------
def _remove_dead(graph: torch.fx.Graph) -> int:
    """Erase unused pure nodes, and metadata checks on tensors nothing else uses."""
    removed = 0
    for node in reversed(list(graph.nodes)):
        if node.op in ("placeholder", "output", "call_module") or node.users:
            continue
        if node.op == "call_function" and node.target is _ASSERT:
            subject = node.args[0] if node.args else None
            if isinstance(subject, Node) and all(
                u.op == "call_function" and u.target is _ASSERT for u in subject.users
            ):
                graph.erase_node(node)
                removed += 1
            continue
        if node.op == "get_attr" or (node.op == "call_function" and _pure(node)):
            graph.erase_node(node)
            removed += 1
    return removed


def _pure(node: Node) -> bool:
    # aten ops say whether they mutate or draw random numbers; Python-level calls (a symbolic
    # trace's ``torch.relu_``, ``x.add_``) do not, so they are never removed
    if isinstance(node.target, torch._ops.OpOverload):
        return not node.is_impure()
    return node.target is operator.getitem
