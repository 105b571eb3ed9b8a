"""The adapter store: every adapter's vectors, configs and ``modules_to_save`` copies, which are
active, disabled or merged, and PEFT's adapter API on top (add, set, delete, disable, weighted).

Vectors live once, in ``self.ia3_l[adapter]``; the graphs and hooks only read them. A *slot* is a
``(layer, placement)`` pair; several active adapters multiply, as in PEFT.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.fx import GraphModule

from .blocks import GATE
from .config import IA3Config
from .quantized_merge import same_data, set_data
from .sites import get_attr_path
from .targeting import Selection, Target, select_targets

PEFT_PREFIX = "base_model.model."
Slot = tuple[str, str]


def check_adapter_name(name: object, store: nn.Module | None = None) -> None:
    """Refuse a name that cannot key the adapter's ModuleDicts or would name a path.

    Names become attributes (``"half"``, ``"train"``, ``"a.b"`` cannot be used) and directories of
    ``save_pretrained`` (``"/abs"``, ``"a/b"``, ``".."`` would write outside the save directory)."""
    probe = store if store is not None else nn.ModuleDict()
    if not isinstance(name, str) or not name:
        raise ValueError(f"{name!r} cannot be an adapter name: it must be a non-empty string")
    shown = repr(name) if len(name) <= 60 else repr(name[:57] + "...")
    if name in (".", "..") or any(sep in name for sep in ("/", "\\", os.sep, os.altsep or "/")):
        raise ValueError(
            f"{shown} cannot be an adapter name: it is or holds a path separator or '..', and save_pretrained "
            "writes each adapter to a directory of its name"
        )
    if "." in name or (name not in probe and hasattr(probe, name)):
        raise ValueError(
            f"{shown} cannot be an adapter name: it must be a string without '.' that is not an attribute of "
            "torch.nn.Module (such as 'half', 'float', 'train', 'to')"
        )


def _key(name: str) -> str:
    """ParameterDict/ModuleDict keys cannot hold dots."""
    return name.replace(".", "__")


def _vector_dtype(weight: torch.Tensor, autocast: bool) -> torch.dtype:
    if autocast and weight.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return weight.dtype if weight.is_floating_point() else torch.float32


def _slot(target: Target) -> Slot:
    return (target.name, "input" if target.feedforward else "output")


class AdapterStoreMixin:
    """Vectors, configs and trained copies per adapter, and which of them apply."""

    def _weight_of(self, name: str, graph: GraphModule | None = None) -> torch.Tensor:
        try:
            return self.model.get_submodule(name).weight
        except AttributeError:
            pass
        for path in (name, f"{name}.weight"):
            for root in (self.model, graph or self.graph_module):
                try:
                    return get_attr_path(root, path)
                except AttributeError:
                    continue
        raise KeyError(f"cannot find the weight of layer {name!r}")

    def _add_adapter_state(self, adapter: str, selection: Selection, graph: GraphModule | None = None) -> None:
        check_adapter_name(adapter, self.ia3_l)
        self._check_scaled(selection.targets, graph)
        cfg = selection.config
        vectors = nn.ParameterDict()
        for name, target in selection.targets.items():
            w = self._weight_of(name, graph)
            dtype = _vector_dtype(w, self._autocast)
            if cfg.init_ia3_weights:
                data = torch.ones(target.shape, dtype=dtype, device=w.device)
            else:
                data = torch.randn(target.shape, dtype=dtype, device=w.device)
            vectors[_key(name)] = nn.Parameter(data, requires_grad=False)
        saved = nn.ModuleDict()
        # a GraphModule / ExportedProgram keeps each module as a container (or leaf layer): copy that
        for module in selection.modules_to_save:
            clone = saved[_key(module)] = copy.deepcopy(self.model.get_submodule(module))
            clone.__dict__.pop("forward", None)  # not our dispatcher: the copy runs its own code
        self.ia3_l[adapter] = vectors
        self.modules_to_save[adapter] = saved
        self.peft_config[adapter] = cfg
        self._selections[adapter] = selection

    def _slots(self, adapter: str) -> dict[Slot, nn.Parameter]:
        store = self.ia3_l[adapter]
        return {_slot(t): store[_key(name)] for name, t in self._selections[adapter].targets.items()}

    def _all_slots(self) -> dict[Slot, nn.Parameter]:
        out: dict[Slot, nn.Parameter] = {}
        for adapter in self.ia3_l:
            for slot, vec in self._slots(adapter).items():
                out.setdefault(slot, vec)
        return out

    def _saved_modules(self, adapter: str) -> dict[str, nn.Module]:
        store = self.modules_to_save[adapter]
        return {m: store[_key(m)] for m in self._selections[adapter].modules_to_save if _key(m) in store}

    def _all_saved(self) -> dict[str, nn.Module]:
        out: dict[str, nn.Module] = {}
        for adapter in self.modules_to_save:
            for m, clone in self._saved_modules(adapter).items():
                out.setdefault(m, clone)
        return out

    @property
    def targets(self) -> dict[str, Target]:
        """The active adapter's targeted layers, by name."""
        return self._selections[self.active_adapter].targets

    def get_vector(self, name: str, adapter_name: str | None = None) -> nn.Parameter:
        """The vector of layer ``name`` (in-graph shape: ``(n,)`` for linear, ``(C, 1, 1)`` for conv)."""
        return self.ia3_l[adapter_name or self.active_adapter][_key(name)]

    def _live_slots(self) -> list[dict[Slot, nn.Parameter]]:
        """The slot maps of the adapters the graphs apply: active, not merged (folded), not disabled."""
        if self._disabled:
            return []
        live = [self._slots(a) for a in self._active if a not in self._merged]
        if self._kept:  # merged into a quantized base, but not folded: still a multiply in the graphs
            kept = [{s: p for s, p in self._slots(a).items() if (a, s[0]) in self._kept} for a in self._merged]
            live.extend(k for k in kept if k)
        return live

    def _update_trainable(self) -> None:
        for adapter in self.ia3_l:
            on = adapter in self._active and not self._disabled and not self.peft_config[adapter].inference_mode
            for p in self.ia3_l[adapter].parameters():
                p.requires_grad_(on)
            for p in self.modules_to_save[adapter].parameters():
                p.requires_grad_(on)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str:
        return self._active[0] if self._active else next(iter(self.ia3_l))

    def add_adapter(self, adapter_name: str, config: IA3Config) -> None:
        """Add an adapter, inactive and frozen as in PEFT; existing graphs gain its slots."""
        self._check_loaded()
        if not isinstance(config, IA3Config):
            raise ValueError(f"add_adapter takes an ia3fx.IA3Config (peft_type IA3), got {type(config).__name__}")
        if adapter_name in self.ia3_l:
            raise ValueError(f"an adapter named {adapter_name!r} already exists; delete it first or pick another name")
        selection = select_targets(config, self._sites0, model=self._layer_model)
        self._add_adapter_state(adapter_name, selection)
        self._extend_graphs()
        self._update_trainable()

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Make these adapters active (several multiply); the others are frozen."""
        self._check_loaded()
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.ia3_l]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; adapters: {list(self.ia3_l)}")
        owners: dict[str, str] = {}
        for n in names:
            for m in self._saved_modules(n):
                if m in owners:
                    raise ValueError(
                        f"adapters {owners[m]!r} and {n!r} both train a copy of {m!r} (modules_to_save); "
                        "only one of them can be active at a time"
                    )
                owners[m] = n
        with GATE.exclusive():  # a forward in another thread runs before or after the switch
            if self._merged:
                warnings.warn("Adapters were merged; unmerging them before switching.", stacklevel=2)
                self.unmerge_adapter()
            self._active = names
            self._update_trainable()
            self._rebind_all()

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_loaded()
        if adapter_name not in self.ia3_l:
            raise ValueError(f"no adapter named {adapter_name!r}; adapters: {list(self.ia3_l)}")
        if adapter_name in self._merged:
            raise ValueError(f"adapter {adapter_name!r} is merged; call unmerge_adapter() before deleting it")
        del self.ia3_l[adapter_name]
        del self.modules_to_save[adapter_name]
        del self.peft_config[adapter_name]
        del self._selections[adapter_name]
        self._active = [a for a in self._active if a != adapter_name]
        if not self._active and len(self.ia3_l):
            self._active = [next(iter(self.ia3_l))]
        self._update_trainable()
        self._rebind_all()
        if self._blocks_mode:
            self._forget_block_graphs()  # their slots may name layers no adapter has any more

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside, outputs equal the base model's; on exit every state is as it was (merged too)."""
        self._check_loaded()
        was_disabled = self._disabled
        # requires_grad of every adapter tensor comes back exactly as it was (a vector the user froze
        # by hand stays frozen), where PEFT re-derives it from the active adapters on exit
        grads = [(p, p.requires_grad) for p in (*self.ia3_l.parameters(), *self.modules_to_save.parameters())]
        with GATE.exclusive():
            swapped = self._swap_originals() if self._merged else []
            self._disabled = True
            self._update_trainable()
            self._rebind_all()
        try:
            yield
        finally:
            with GATE.exclusive():
                for param, data in swapped:  # the merged weights come back, unless unmerged in the block
                    kept = self._originals.get(id(param))
                    if kept is not None and same_data(param, kept[1]):
                        set_data(param, data)  # (a quantized weight's inner tensors: quantized_merge.py)
                self._disabled = was_disabled
                for param, flag in grads:
                    param.requires_grad_(flag)
                self._rebind_all()

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str) -> None:
        """A new adapter whose vectors are ``Σ wᵢ·lᵢ`` (PEFT's math: a missing layer counts as 0)."""
        self._check_loaded()
        if adapter_name in self.ia3_l:
            raise ValueError(f"an adapter named {adapter_name!r} already exists (PEFT would silently do nothing)")
        if len(adapters) != len(weights) or not adapters:
            raise ValueError("add_weighted_adapter needs as many weights as adapters, at least one")
        for w in weights:
            try:
                finite = not isinstance(w, (bool, str)) and math.isfinite(float(w))
            except (TypeError, ValueError):
                finite = False
            if not finite:
                raise ValueError(f"add_weighted_adapter weights must be finite numbers; got {w!r}")
        unknown = [a for a in adapters if a not in self.ia3_l]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; adapters: {list(self.ia3_l)}")
        saved = [m for a in adapters for m in self._selections[a].modules_to_save]
        if len(saved) != len(set(saved)):
            raise ValueError(
                "Cannot add weighted adapters targeting the same module with modules_to_save: "
                f"{sorted(m for m in set(saved) if saved.count(m) > 1)}"
            )
        targets: dict[str, Target] = {}
        for a in adapters:
            for name, t in self._selections[a].targets.items():
                if name in targets and targets[name].feedforward != t.feedforward:
                    raise ValueError(
                        f"layer {name!r} scales its input in one adapter and its output in another; "
                        "their vectors cannot be summed"
                    )
                targets.setdefault(name, t)
        cfg = self._combined_config([self.peft_config[a] for a in adapters])
        # as PEFT: the new adapter trains its own copies of the first adapter's modules_to_save,
        # made from the original modules (so that its files hold them and reload)
        selection = Selection(cfg, targets, {}, list(self._selections[adapters[0]].modules_to_save))
        self._add_adapter_state(adapter_name, selection)
        with torch.no_grad():
            for name in targets:
                total = self.ia3_l[adapter_name][_key(name)]
                total.zero_()
                for a, w in zip(adapters, weights, strict=True):
                    if _key(name) in self.ia3_l[a]:
                        total.add_(self.ia3_l[a][_key(name)].to(total.dtype), alpha=w)
        self._extend_graphs()
        self._update_trainable()

    @staticmethod
    def _combined_config(configs: list[IA3Config]) -> IA3Config:
        cfg = configs[0].copy()
        for field_name in ("target_modules", "feedforward_modules"):
            values = [getattr(c, field_name) for c in configs]
            if all(isinstance(v, str) for v in values):
                setattr(cfg, field_name, "|".join(f"({v})" for v in values))
            elif all(isinstance(v, (set, list)) for v in values):
                setattr(cfg, field_name, set().union(*values))
            else:
                raise ValueError(f"all adapters must give {field_name} as regex strings, or all as lists")
        return cfg

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` over ``named_parameters()``, as PEFT counts them."""
        trainable = total = 0
        for _, param in self.named_parameters():
            total += param.numel()
            if param.requires_grad:
                trainable += param.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        t, a = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}")
