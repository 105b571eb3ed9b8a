"""Merging adapters into the base weights in place, with an exact (bit for bit) unmerge, and the
way out: ``merge_and_unload`` and ``unload`` give back the user's model class.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from .adapter_store import _key
from .blocks import GATE
from .passes.fold import SharedWeightError
from .scaling import fold_bias, fold_weight
from .targeting import Target


class MergeMixin:
    """Fold adapters into the base weights, keep the originals, put them back exactly."""

    def _layer_params(self, target: Target) -> tuple[str, nn.Parameter, str | None, nn.Parameter | None]:
        name = target.name
        try:
            module = self.model.get_submodule(name)
            if isinstance(getattr(module, "weight", None), nn.Parameter):
                bias = module.bias if isinstance(getattr(module, "bias", None), nn.Parameter) else None
                return f"{name}.weight", module.weight, (f"{name}.bias" if bias is not None else None), bias
        except AttributeError:
            pass
        for path in (name, f"{name}.weight"):
            try:
                return path, self.model.get_parameter(path), None, None
            except AttributeError:
                continue
        raise KeyError(f"cannot find the weight of layer {name!r}")

    def _check_unshared(self, target: Target, path: str, param: nn.Parameter) -> None:
        aliases = [n for n, p in self.model.named_parameters(remove_duplicate=False) if p is param and n != path]
        if aliases:
            raise SharedWeightError(
                f"cannot merge the vector of {target.name!r}: its weight {path!r} is the same tensor as "
                f"{aliases[0]!r} (tied weights), which would be scaled too. Exclude {target.name!r}, or "
                "untie the weights (clone one of them) before merging."
            )

    def _merge_plan(self, names: Sequence[str], safe_merge: bool) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """Every new weight and bias tensor, computed before anything is assigned."""
        new: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
        for adapter in names:
            store = self.ia3_l[adapter]
            for name, target in self._selections[adapter].targets.items():
                w_path, weight, _, bias = self._layer_params(target)
                self._check_unshared(target, w_path, weight)
                vec = store[_key(name)].detach()
                w_now = new.get(id(weight), (weight, weight.detach()))[1]
                w_new = fold_weight(w_now, vec, target.kind, target.feedforward, target.groups)
                if safe_merge and not torch.isfinite(w_new).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
                new[id(weight)] = (weight, w_new)
                if bias is not None and not target.feedforward:
                    b_now = new.get(id(bias), (bias, bias.detach()))[1]
                    b_new = fold_bias(b_now, vec, target.kind, False, weight.dtype)
                    if safe_merge and not torch.isfinite(b_new).all():
                        raise ValueError(f"NaNs detected in the merged bias. The adapter {adapter} seems to be broken")
                    new[id(bias)] = (bias, b_new)
        return list(new.values())

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base weights in place; the originals are kept for an exact unmerge.

        All new weights are computed (and, with ``safe_merge``, checked for NaN/inf) before any is
        assigned: a failure leaves every weight as it was.
        """
        self._check_loaded()
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names must be a list of names, not the string {adapter_names!r}")
        names = list(adapter_names) if adapter_names is not None else list(self._active)
        unknown = [n for n in names if n not in self.ia3_l]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; adapters: {list(self.ia3_l)}")
        names = [n for n in names if n not in self._merged]
        if not names:
            warnings.warn("All adapters are already merged, nothing to do.", stacklevel=2)
            return
        if self._disabled and self._merged:
            # inside the block the weights are the originals, set aside from the merged ones that
            # come back on exit: a merge here could not be kept without losing the earlier one
            raise ValueError(
                f"cannot merge {names} inside disable_adapter() while {self._merged} are merged: merge "
                "them after the block, or unmerge_adapter() first"
            )
        updates = self._merge_plan(names, safe_merge)
        with GATE.exclusive(), torch.no_grad():  # forwards in other threads see all weights or none
            for param, data in updates:
                self._originals.setdefault(id(param), (param, param.data))
                param.data = data
            self._merged.extend(names)
            self._rebind_all()

    def _swap_originals(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        swapped = []
        for param, original in self._originals.values():
            swapped.append((param, param.data))
            param.data = original
        return swapped

    def unmerge_adapter(self) -> None:
        """Put the original weights back, bit for bit (no division, unlike PEFT)."""
        self._check_loaded()
        if not self._merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        with GATE.exclusive():
            self._swap_originals()
            self._originals.clear()
            self._merged.clear()
            self._rebind_all()

    @property
    def merged_adapters(self) -> list[str]:
        return list(self._merged)

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Sequence[str] | None = None
    ) -> nn.Module:
        """Merge, then return the user's model class with merged weights and trained head copies."""
        self._check_loaded()
        if not self._retraceable:
            raise ValueError("merge_and_unload needs the original nn.Module; for a graph use merged_graph_module()")
        with GATE.exclusive():
            self.merge_adapter(adapter_names, safe_merge=safe_merge)
            for module, clone in self._saved_modules(self.active_adapter).items():
                parent, _, child = module.rpartition(".")
                setattr(self.model.get_submodule(parent) if parent else self.model, child, clone)
            self._originals.clear()
            if self._blocks_mode:
                self._uninstall_blocks()
            self._unloaded_by = "merge_and_unload"
        return self.model

    def unload(self) -> nn.Module:
        """Return the base model as it was: unmerged, original modules, its own forward."""
        self._check_loaded()
        with GATE.exclusive():
            if self._merged:
                self.unmerge_adapter()
            if self._blocks_mode:
                self._uninstall_blocks()
            self._unloaded_by = "unload"
        return self.model
