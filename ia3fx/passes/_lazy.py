"""Deferred checks and code generation for a GraphModule that several passes edit in a row.

``GraphModule.recompile()`` regenerates and compiles the Python source of the whole graph, about
0.1 ms per node: for a 7B-shaped Llama (2,200 nodes) that is more than everything else the rewrite
does, and every pass recompiles. After ``defer_recompile(gm)``, ``gm.recompile()`` only marks the
code stale, and the first use that needs it (a call, ``gm.code``, ``str(gm)``, pickling, or
``realize(gm)``) generates it once. torch's ``_LazyGraphModule`` does the same; here it is done on
the instance, which works for any GraphModule: ``GraphModule.__new__`` gives every instance a
class of its own, so the overrides below touch no other graph.

``batched(gm)`` also holds back ``gm.graph.lint()`` (another 10-15 ms for such a graph, per pass):
the graph is linted once, right before its code is generated, so a graph is still checked before
it first runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch.fx import GraphModule

__all__ = ["batched", "defer_recompile", "realize", "is_stale"]

_FLAG = "_ia3fx_deferred"
_LINT = "_ia3fx_lint"  # set while a lint is owed
_STALE = ("forward", "code", "__str__", "__reduce__", "__reduce_package__")


@contextlib.contextmanager
def batched(gm: GraphModule) -> Iterator[GraphModule]:
    """Passes inside share one ``lint()`` and one code generation, both at first use."""
    graph = gm.graph
    defer_recompile(gm)
    graph.lint = _skip  # an instance attribute: shadows Graph.lint for this graph only
    try:
        yield gm
    finally:
        del graph.lint
    if _FLAG in vars(type(gm)):
        setattr(type(gm), _LINT, True)
    else:
        graph.lint()


def _skip() -> None:
    return None


def defer_recompile(gm: GraphModule) -> GraphModule:
    """From now until its first use, ``gm.recompile()`` is free and the code generation waits."""
    cls = type(gm)
    if cls.__qualname__.rpartition(".")[2] != "GraphModuleImpl" or _FLAG in vars(cls):
        return gm  # not a per-instance class (a hand-made subclass): leave it as it is
    setattr(cls, _FLAG, True)
    cls.recompile = _mark_stale
    return gm


def is_stale(gm: GraphModule) -> bool:
    """Whether ``gm``'s generated code lags behind its graph."""
    return vars(type(gm)).get("forward") is _lazy_forward


def realize(gm: GraphModule) -> GraphModule:
    """Generate the code now if it is stale, and end the deferral."""
    cls = type(gm)
    if _FLAG not in vars(cls):
        return gm
    stale, lint = is_stale(gm), vars(cls).get(_LINT, False)
    for name in (_FLAG, _LINT, "recompile", *_STALE):
        if name in vars(cls):
            delattr(cls, name)
    if lint:
        gm.graph.lint()
    if stale:
        gm.recompile()
    return gm


def _mark_stale(self: GraphModule) -> None:
    cls = type(self)
    cls.forward = _lazy_forward
    cls.code = property(_lazy_code)
    cls.__str__ = _lazy_str
    cls.__reduce__ = _lazy_reduce
    cls.__reduce_package__ = _lazy_reduce_package


def _lazy_forward(self: GraphModule, *args: Any, **kwargs: Any) -> Any:
    realize(self)
    return type(self).forward(self, *args, **kwargs)  # hooks already ran in this __call__


def _lazy_code(self: GraphModule) -> str:
    return realize(self).code


def _lazy_str(self: GraphModule) -> str:
    return str(realize(self))


def _lazy_reduce(self: GraphModule) -> Any:
    return realize(self).__reduce__()


def _lazy_reduce_package(self: GraphModule, exporter: Any) -> Any:
    return realize(self).__reduce_package__(exporter)
