"""Block graphs installed in a transformers model: the runners put in place of its blocks'
``forward``, the table of live vectors they read, the cache of captures shared by identical
blocks, the scale hooks for layers that run as modules, and checkpointing (see ``blocks.py``).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .adapter_store import Slot, _key, _slot
from .blocks import CAPTURE_LOCK, GATE, BlockGraph, BlockRunner, bypassing, capture, fingerprint
from .errors import TraceError
from .mixed import current_rows


class SavedModuleDispatch:
    """The ``forward`` of a ``modules_to_save`` original: the active adapter's copy, or itself."""

    def __init__(self, owner: Any, name: str, original: nn.Module) -> None:
        self.owner, self.name, self.original = owner, name, original

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        original = self.original
        # a mixed batch has no modules_to_save adapter: its rows run the original
        chosen = original if bypassing() or current_rows() is not None else self.owner._saved_value(self.name)
        if chosen is original:
            return type(original).forward(original, *args, **kwargs)
        return chosen(*args, **kwargs)


class BlockInstallMixin:
    """Runners in place of the blocks' forward, the live vector table and the capture cache."""

    def block_runs(self) -> dict[str, dict[str, int]]:
        """Per installed block, how many calls ran its graph and how many its own forward (scaled
        by hooks: a KV cache, inner hooks, tracing): which path the model took."""
        return {name: {"graph": r.graph_calls, "eager": r.eager_calls} for name, r in self._runners.items()}

    def _forget_block_graphs(self) -> None:
        """Drop every capture (after the set of adapted layers changed): the next calls recapture."""
        with CAPTURE_LOCK:
            self._block_cache.clear()
            self._failed_groups.clear()

    @property
    def block_graphs(self) -> list[BlockGraph]:
        """Every block graph captured so far (shared by identical blocks; one per kind of call)."""
        return [g for graphs in self._block_cache.values() for g in graphs]

    def _dispatch_saved(self) -> None:
        """A ``modules_to_save`` module of the base model runs the active adapter's trained copy
        (the original when adapters are off), as PEFT's ``ModulesToSaveWrapper``."""
        for module in self._all_saved():
            original = self.model.get_submodule(module)
            if "forward" not in vars(original):
                original.forward = SavedModuleDispatch(self, module, original)
                self._dispatched.append(original)

    def _install_blocks(self, blocks: dict[str, nn.Module]) -> None:
        """Put a runner in place of each block's forward; identical blocks share a group."""
        groups: dict[tuple, int] = {}
        for name, block in blocks.items():
            group = groups.setdefault(fingerprint(block), len(groups))
            runner = BlockRunner(self, name, block, group)
            block.forward = runner.as_forward()
            self._runners[name] = runner
        self._hook_targets()

    def _hook_targets(self) -> None:
        """A scale hook on every adapted layer, for when it runs as a module (outside a graph)."""
        for adapter in self.ia3_l:
            for name, target in self._selections[adapter].targets.items():
                slot = _slot(target)
                if slot in self._hooked:
                    continue
                self._scale_hooks.install(name, self.model.get_submodule(name), target.feedforward)
                self._hooked.add(slot)

    def _uninstall_blocks(self) -> None:
        """The model as it was: its blocks' own forward, no hooks of ours."""
        for runner in self._runners.values():
            runner.block.__dict__.pop("forward", None)
        for original in self._dispatched:
            original.__dict__.pop("forward", None)
        self._dispatched.clear()
        self._runners.clear()
        self._scale_hooks.remove()
        self._hooked.clear()
        self._block_cache.clear()
        self._blocks_mode = False

    def _refresh_live(self) -> None:
        """Which vectors each slot applies now, and which blocks have anything to apply.

        The table holds ``(adapter, key)`` pairs, not parameters: :meth:`_live_value` reads
        ``self.ia3_l[adapter][key]`` at call time, so that a wrapper that swaps the registered
        parameters (FSDP2 unshards the root group's vectors for each forward) is honoured.
        """
        table: dict[Slot, list[tuple[str, str]]] = {}
        if not self._disabled:
            for adapter in self._active:
                merged = adapter in self._merged
                for name, target in self._selections[adapter].targets.items():
                    if merged and (adapter, name) not in self._kept:  # folded into the weights
                        continue
                    table.setdefault(_slot(target), []).append((adapter, _key(name)))
        self._live = table
        self._ones = {}
        names = {layer for layer, _ in table}
        self._live_blocks = {b for b in self._runners if any(n.startswith(b + ".") for n in names)}

    def _live_value(self, layer: str, placement: str) -> torch.Tensor | None:
        refs = self._live.get((layer, placement))
        if not refs:
            return None
        stores = self._modules["ia3_l"]._modules  # the registered parameters, read now: FSDP2
        out = None  # swaps in the unsharded ones for each forward
        for adapter, key in refs:
            vec = stores[adapter]._parameters[key]
            out = vec if out is None else out * vec  # several active adapters multiply, as in PEFT
        return out

    def _block_is_live(self, name: str) -> bool:
        return name in self._live_blocks

    def _slot_input(self, layer: str, placement: str, block: nn.Module, relative: str) -> torch.Tensor:
        value = self._live_value(layer, placement)
        if value is not None:
            return value
        return self._slot_ones(layer, placement, relative)

    def _slot_ones(self, layer: str, placement: str, relative: str) -> torch.Tensor:
        """Ones of a slot's shape (kept): what a slot reads when nothing scales it."""
        ones = self._ones.get((layer, placement))
        if ones is None:
            template = self._all_slots().get((layer, placement))
            if template is None:  # a layer of this group that no adapter targets in this block
                template = self._group_template(relative, placement)
            ones = self._ones[(layer, placement)] = torch.ones_like(template, requires_grad=False)
        return ones

    def _group_template(self, relative: str, placement: str) -> torch.Tensor:
        for slot, vec in self._all_slots().items():
            if slot[1] == placement and slot[0].endswith("." + relative):
                return vec.detach()
        raise KeyError(f"no vector for {relative!r} ({placement})")

    def _group_slots(self, group: Any) -> tuple[dict[Slot, torch.Tensor], dict[str, bool]]:
        """Block-relative slots (with a template vector) and targets of every block in ``group``."""
        slots: dict[Slot, torch.Tensor] = {}
        targets: dict[str, bool] = {}
        all_slots = self._all_slots()
        for name, runner in self._runners.items():
            if runner.group != group:
                continue
            prefix = name + "."
            for (layer, placement), vec in all_slots.items():
                if layer.startswith(prefix):
                    rel = layer[len(prefix):]
                    slots.setdefault((rel, placement), vec.detach())
                    targets[rel] = targets.get(rel, False) or placement == "input"
        return slots, targets

    def _block_graph(
        self, runner: BlockRunner, key: tuple, args: tuple, kwargs: dict, tensors: list[torch.Tensor]
    ) -> BlockGraph | None:
        """The graph for this call (captured once per key and size class), or ``None`` when the
        block must run its own forward (it could not be captured, or a layer would go unscaled)."""
        for graph in self._block_cache.get(key, ()):
            if graph.accepts(tensors):
                return graph
        with GATE.exclusive(), CAPTURE_LOCK:
            for graph in self._block_cache.get(key, ()):
                if graph.accepts(tensors):
                    return graph
            if runner.group in self._failed_groups:
                return None
            slots, targets = self._group_slots(runner.group)
            try:
                graph = capture(runner.block, args, kwargs, slots, targets, cast=bool(key[-1]), dynamic=self._dynamic)
            except TraceError as e:
                self._fail(runner, f"it could not be captured as a graph ({e})")
                return None
            missing = sorted(set(targets) - graph.scaled)
            if missing:
                self._fail(
                    runner,
                    f"its layers {missing} are adapted but are not linear call sites in its graph (they compute "
                    "something other than aten.linear / addmm / conv on their weight)",
                )
                return None
            self._block_cache.setdefault(key, []).append(graph)
            return graph

    def _fail(self, runner: BlockRunner, why: str) -> None:
        self._failed_groups[runner.group] = why
        warnings.warn(
            f"ia3fx: {type(runner.block).__name__} blocks run their own forward with the adapter applied by "
            f"forward hooks (exactly as PEFT computes it) because {why}.",
            stacklevel=4,
        )

    def _inputs_require_grads(self) -> None:
        """Reentrant checkpointing needs a block input that requires grad (PEFT does the same)."""
        enable = getattr(self.model, "enable_input_require_grads", None)
        if enable is not None and getattr(self.model, "_require_grads_hook", None) is None:
            enable()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """The base model's checkpointing, per block; the block graphs run inside each checkpoint.

        As PEFT, the input embeddings' output is made to require grad, which reentrant
        checkpointing needs when the base weights are frozen.
        """
        enable = getattr(self.model, "activation_checkpointing_enable", None)
        if enable is not None:  # transformers >= 5.2x
            enable(activation_checkpointing_kwargs, **kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs)
        self._inputs_require_grads()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """transformers' older name of :meth:`activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        disable = getattr(self.model, "activation_checkpointing_disable", None)
        (disable or self.model.gradient_checkpointing_disable)()

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()
