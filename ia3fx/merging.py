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
from .quantized_merge import (
    KeptScale,
    QuantizedMergeReport,
    fold_quantized,
    get_data,
    is_quantized_weight,
    set_data,
)
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

    def _merge_plan(
        self,
        names: Sequence[str],
        safe_merge: bool,
        report: QuantizedMergeReport | None = None,
        requantize: bool = False,
    ) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """Every new weight and bias tensor, computed before anything is assigned.

        A quantized weight folds only where that adds no new rounding (``quantized_merge.py``);
        a vector that does not fold is listed in ``report.kept`` (and stays a multiply), or, without
        a ``report`` (a caller that cannot keep one), refused with an error naming it.
        """
        new: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
        for adapter in names:
            store = self.ia3_l[adapter]
            for name, target in self._selections[adapter].targets.items():
                w_path, weight, _, bias = self._layer_params(target)
                self._check_unshared(target, w_path, weight)
                vec = store[_key(name)].detach()
                if is_quantized_weight(weight):
                    self._plan_quantized(new, adapter, target, weight, bias, vec, safe_merge, report, requantize)
                    continue
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

    def _plan_quantized(
        self, new: dict, adapter: str, target: Target, weight: nn.Parameter, bias: nn.Parameter | None,
        vec: torch.Tensor, safe_merge: bool, report: QuantizedMergeReport | None, requantize: bool,
    ) -> None:
        if safe_merge and not torch.isfinite(vec).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
        w_now = new.get(id(weight), (weight, weight))[1]
        b_now = None if bias is None else new.get(id(bias), (bias, bias.detach()))[1]
        fold = fold_quantized(w_now, b_now, vec, target.feedforward, requantize=requantize)
        if fold.how == "kept":
            if report is None:
                raise ValueError(
                    f"the vector of {target.name!r} cannot be folded into its quantized weight without new "
                    f"rounding ({fold.why}): merge with merge_adapter()/merge_and_unload(), which keep it as a "
                    "multiply (or requantize=True), or export the merged graph (format='pt2')"
                )
            report.kept[target.name] = fold.why
            return
        new[id(weight)] = (weight, fold.weight)
        if bias is not None and fold.bias is not None and fold.bias is not b_now:
            new[id(bias)] = (bias, fold.bias)
        if report is not None:
            (report.requantized if fold.how == "requantized" else report.folded).append(target.name)

    def merge_adapter(
        self,
        adapter_names: Sequence[str] | None = None,
        safe_merge: bool = False,
        *,
        requantize: bool = False,
        _measure: bool = True,
    ) -> None:
        """Fold adapters into the base weights in place; the originals are kept for an exact unmerge.

        All new weights are computed (and, with ``safe_merge``, checked for NaN/inf) before any is
        assigned: a failure leaves every weight as it was. On a quantized base a vector folds where
        that adds no new rounding, and otherwise stays applied as a multiply, or with
        ``requantize=True`` is folded by quantizing again; :attr:`merge_report` says which.
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
        report = QuantizedMergeReport()
        updates = self._merge_plan(names, safe_merge, report, requantize)
        before = self._outputs_for_report() if report.requantized and _measure else None
        with GATE.exclusive(), torch.no_grad():  # forwards in other threads see all weights or none
            for param, data in updates:
                self._originals.setdefault(id(param), (param, get_data(param)))
                set_data(param, data)
            self._merged.extend(names)
            self._kept.update((a, layer) for a in names for layer in report.kept if layer in self._selections[a].targets)
            self._rebind_all()
        if before is not None:
            report.requantize_error = float((self._outputs_for_report() - before).abs().max())
        if report.folded or report.kept or report.requantized:
            self.merge_report = report
            if report.kept:
                warnings.warn(
                    f"{len(report.kept)} vector(s) could not be folded into their quantized weights without new "
                    f"rounding and stay applied as a multiply: {', '.join(report.kept)} (requantize=True folds "
                    "them by quantizing again; see merge_report)",
                    stacklevel=2,
                )

    def _outputs_for_report(self, model: nn.Module | None = None) -> torch.Tensor:
        """The output of ``model`` (this adapted model) on the example (or default) inputs: what
        a requantized merge is compared against. Not inside ``GATE.exclusive()``: it runs a forward."""
        from .capture import normalize_inputs

        args, kwargs = normalize_inputs(self._example_inputs_or_default())
        with torch.no_grad():
            out = (model or self)(*args, **kwargs)
        out = out.logits if hasattr(out, "logits") else out
        return (out[0] if isinstance(out, (tuple, list)) else out).detach().float()

    def _swap_originals(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        swapped = []
        for param, original in self._originals.values():
            swapped.append((param, get_data(param)))
            set_data(param, original)
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
            self._kept.clear()
            self._rebind_all()

    @property
    def merged_adapters(self) -> list[str]:
        return list(self._merged)

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Sequence[str] | None = None,
        *,
        requantize: bool = False,
    ) -> nn.Module:
        """Merge, then return the user's model class with merged weights and trained head copies.

        On a quantized base, vectors that do not fold exactly (see :meth:`merge_adapter`) stay on
        their layers as forward (pre-)hooks holding a copy of the vector, listed in
        :attr:`merge_report`; ``requantize=True`` folds them by quantizing again instead.
        """
        self._check_loaded()
        if not self._retraceable:
            raise ValueError("merge_and_unload needs the original nn.Module; for a graph use merged_graph_module()")
        before = self._outputs_for_report() if requantize else None  # forwards run outside the gate
        with GATE.exclusive():
            self.merge_adapter(adapter_names, safe_merge=safe_merge, requantize=requantize, _measure=False)
            kept = self._kept_vectors()
            for module, clone in self._saved_modules(self.active_adapter).items():
                parent, _, child = module.rpartition(".")
                setattr(self.model.get_submodule(parent) if parent else self.model, child, clone)
            self._originals.clear()
            if self._blocks_mode:
                self._uninstall_blocks()
            for (layer, placement), vector in kept.items():
                KeptScale(vector, placement).install(self.model.get_submodule(layer))
            self._kept.clear()
            self._unloaded_by = "merge_and_unload"
        report = self.merge_report
        if before is not None and report is not None and report.requantized:
            report.requantize_error = float((self._outputs_for_report(self.model) - before).abs().max())
        return self.model

    def _kept_vectors(self) -> dict[tuple[str, str], torch.Tensor]:
        """Per kept slot, the product of the merged adapters' vectors that stayed a multiply."""
        out: dict[tuple[str, str], torch.Tensor] = {}
        for adapter, layer in sorted(self._kept):
            target = self._selections[adapter].targets[layer]
            slot = (layer, "input" if target.feedforward else "output")
            vec = self.ia3_l[adapter][_key(layer)].detach()
            out[slot] = vec if slot not in out else out[slot] * vec
        return out

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
