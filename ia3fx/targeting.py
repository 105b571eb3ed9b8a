"""PEFT's rules for which layers get a vector, and whether it scales their input or output.

Everything here decides on layer *names* (module paths, or parameter paths for bare ``F.linear``
calls), never on graph placeholders, so tied weights cannot confuse it.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from torch import nn

from .config import (
    FEEDFORWARD_MODULES_MAPPING,
    TARGET_MODULES_MAPPING,
    TASK_MODULES_TO_SAVE,
    IA3Config,
)
from .errors import NoMatchingModuleError, shorten
from .name_rules import _excluded, _feedforward, _guarded, _matches, _modules_to_save
from .sites import CONV_KINDS, CallSite, vector_shape

__all__ = ["Layer", "Target", "Selection", "select_targets", "resolve_config", "model_layers"]

SEQ_CLS_HEAD_NAMES = ("score", "classifier")
_SUPPORTED = "only torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d, transformers Conv1D and F.linear/F.conv calls on a parameter are supported"


@dataclass(frozen=True)
class Layer:
    """Something a pattern can name: an adaptable layer, or (``kind=None``) any other module."""

    name: str
    kind: str | None
    in_features: int = 0
    out_features: int = 0
    module_type: str = ""
    groups: int = 1


@dataclass(frozen=True)
class Target:
    """A layer that gets a vector: its size and shape follow from the placement."""

    name: str
    kind: str
    feedforward: bool
    in_features: int
    out_features: int
    groups: int = 1

    @property
    def size(self) -> int:
        return self.in_features if self.feedforward else self.out_features

    @property
    def shape(self) -> tuple[int, ...]:
        return vector_shape(self.kind, self.size)

    @property
    def peft_shape(self) -> tuple[int, ...]:
        """The shape PEFT stores: ``(out, 1)``/``(1, in)`` for linear, ``(1, C, 1, 1[, 1])`` for conv."""
        spatial = CONV_KINDS.get(self.kind)
        if spatial:
            return (1, self.size) + (1,) * spatial
        return (1, self.size) if self.feedforward else (self.size, 1)


@dataclass
class Selection:
    """What a config selects: targets, modules to save, and why every other layer was skipped."""

    config: IA3Config  # resolved: concrete targets and feedforward modules
    targets: dict[str, Target]
    skipped: dict[str, str] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)

    def annotate(self, sites: Sequence[CallSite]) -> list[CallSite]:
        out = []
        for site in sites:
            t = self.targets.get(site.name)
            out.append(
                dataclasses.replace(site, targeted=t is not None, feedforward=bool(t and t.feedforward))
            )
        return out


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def _is_conv1d_type(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return _is_conv1d(module)
    return isinstance(module, Conv1D)


def _module_layer(name: str, module: nn.Module) -> Layer:
    cls = type(module)
    module_type = f"{cls.__module__}.{cls.__qualname__}"
    if isinstance(module, nn.Linear):
        return Layer(name, "linear", module.in_features, module.out_features, module_type)
    if _is_conv1d_type(module):
        w = module.weight
        return Layer(name, "conv1d", int(w.shape[0]), int(w.shape[1]), module_type)
    if isinstance(module, (nn.Conv2d, nn.Conv3d)):
        kind = "conv2d" if isinstance(module, nn.Conv2d) else "conv3d"
        return Layer(name, kind, module.in_channels, module.out_channels, module_type, module.groups)
    return Layer(name, None, module_type=module_type)


def model_layers(model: nn.Module | None, sites: Iterable[CallSite]) -> list[Layer]:
    """Every module of ``model`` (root excluded), then the bare functional layers of the graph."""
    layers: list[Layer] = []
    seen: set[str] = set()
    if model is not None:
        for name, module in model.named_modules():
            if name:
                layers.append(_module_layer(name, module))
                seen.add(name)
    for site in sites:
        if site.name not in seen:
            seen.add(site.name)
            layers.append(
                Layer(site.name, site.kind, site.in_features, site.out_features, site.module_type, site.groups)
            )
    return layers


def _model_type(model: nn.Module | None) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def _output_layer_names(model: nn.Module | None, config: IA3Config) -> set[str]:
    """PEFT's all-linear exclusion: the output embedding of a PreTrainedModel, else a SEQ_CLS head."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return set()
    if not isinstance(model, PreTrainedModel):
        return set()
    head = model.get_output_embeddings()
    if head is None and config.task_type == "SEQ_CLS":
        head = next((getattr(model, n) for n in SEQ_CLS_HEAD_NAMES if getattr(model, n, None) is not None), None)
    if head is None:
        return set()
    return {name for name, module in model.named_modules() if module is head}


def resolve_config(config: IA3Config, model: nn.Module | None = None, layers: Sequence[Layer] = ()) -> IA3Config:
    """Fill what PEFT fills: default targets for the model type, ``all-linear``, task heads."""
    cfg = config.copy()
    extra = TASK_MODULES_TO_SAVE.get(cfg.task_type or "")
    if extra:
        cfg.modules_to_save = list(cfg.modules_to_save or []) + [m for m in extra if m not in (cfg.modules_to_save or [])]
    model_type = _model_type(model)
    if cfg.target_modules is None:
        if model_type not in TARGET_MODULES_MAPPING:
            raise ValueError(
                "Please specify `target_modules` in `peft_config`: there is no default for "
                f"model_type={model_type or 'custom'!r} (defaults exist for {sorted(TARGET_MODULES_MAPPING)})"
            )
        cfg.target_modules = set(TARGET_MODULES_MAPPING[model_type])
    if cfg.feedforward_modules is None:
        if model_type not in FEEDFORWARD_MODULES_MAPPING:
            raise ValueError(
                "Please specify `feedforward_modules` in `peft_config` (use [] when no layer is "
                f"feedforward): there is no default for model_type={model_type or 'custom'!r}"
            )
        cfg.feedforward_modules = set(FEEDFORWARD_MODULES_MAPPING[model_type])
    if isinstance(cfg.target_modules, str) and cfg.target_modules.lower() == "all-linear":
        heads = _output_layer_names(model, cfg)
        cfg.target_modules = {
            ly.name for ly in layers if ly.kind in ("linear", "conv1d") and ly.name not in heads
        }
    return cfg


def select_targets(
    config: IA3Config,
    sites: Sequence[CallSite],
    *,
    model: nn.Module | None = None,
) -> Selection:
    """Apply PEFT's matching to the layers of ``model`` (or, without it, of the graph)."""
    layers = model_layers(model, sites)
    cfg = resolve_config(config, model, layers)
    if isinstance(cfg.target_modules, (set, list)) and not cfg.target_modules:
        raise NoMatchingModuleError(
            "No `target_modules` passed: nothing to adapt. Name the layers to adapt, a regex, or 'all-linear'."
        )
    targets: dict[str, Target] = {}
    skipped: dict[str, str] = {}
    n_excluded = 0
    for layer in layers:
        if _excluded(layer.name, cfg.exclude_modules):
            n_excluded += 1
            if layer.kind:
                skipped[layer.name] = "excluded by exclude_modules"
            continue
        if _guarded(layer.name, cfg.modules_to_save):
            if layer.kind:
                skipped[layer.name] = "inside modules_to_save (trained in full instead)"
            continue
        if not _matches(layer.name, cfg.target_modules):
            if layer.kind:
                skipped[layer.name] = "not matched by target_modules"
            continue
        if layer.kind is None:
            raise ValueError(
                f"Target module {layer.name!r} ({layer.module_type}) is not supported: {_SUPPORTED}. "
                "Name the linear layers inside it instead."
            )
        ff = _feedforward(layer.name, cfg.feedforward_modules)
        targets[layer.name] = Target(
            layer.name, layer.kind, ff, layer.in_features, layer.out_features, layer.groups
        )
    if cfg.exclude_modules and not n_excluded:
        warnings.warn(
            f"You have passed exclude_modules={_short(cfg.exclude_modules, 200)} but no modules were excluded. "
            "Please check that exclude_modules was set correctly.",
            stacklevel=3,
        )
    if not targets:
        adaptable = [ly.name for ly in layers if ly.kind]
        listing = ", ".join(adaptable[:20]) + (", ..." if len(adaptable) > 20 else "")
        if n_excluded and not any(r == "not matched by target_modules" for r in skipped.values()):
            lead = "All modules were excluded. This is likely unintended."
        elif n_excluded:
            lead = "No modules were targeted for adaptation."
        else:
            lead = f"Target modules {_short(cfg.target_modules, 200)} not found in the base model."
        raise NoMatchingModuleError(
            f"{lead} Please check the target modules and try again. "
            f"Linear-like layers in this model ({len(adaptable)}): [{listing}]"
        )
    names = [n for n, _ in model.named_modules(remove_duplicate=False)] if model is not None else _graph_module_names(sites)
    saved = _modules_to_save(names, cfg.modules_to_save)
    _refuse_saved_targets(targets, saved, cfg)
    _warn_unmatched(config, layers, targets, names)
    _warn_unmatched_defaults(config, cfg, layers)
    return Selection(cfg, targets, skipped, saved)


def _refuse_saved_targets(targets: dict[str, Target], saved: Sequence[str], cfg: IA3Config) -> None:
    """A layer both adapted and trained in full as a ``modules_to_save`` copy (PEFT's plain suffix
    rule: ``classifier`` picks DistilBERT's ``pre_classifier``) would lose its vector when merged:
    the merge folds it into the original, which the unfolded copy then replaces. PEFT refuses this
    too (a TypeError on wrapping its IA3 layer); so do we, before anything changes."""
    both = [t for t in targets for m in saved if t == m or t.startswith(m + ".")]
    if both:
        raise TypeError(
            f"{both[0]!r} is both targeted (target_modules={_short(cfg.target_modules)}) and selected by "
            f"modules_to_save={_short(cfg.modules_to_save)} (a suffix match, PEFT's rule); a layer can be adapted or "
            "trained in full, not both. Exclude it from target_modules, or name the module to save by its full path."
        )


def _short(value: object, limit: int = 80) -> str:
    return shorten(repr(sorted(value) if isinstance(value, set) else value), limit)


def _warn_unmatched(config: IA3Config, layers: Sequence[Layer], targets: dict[str, Target], names: Sequence[str]) -> None:
    """Warn about each entry the user gave (not a default) that selects nothing: a typo there
    would otherwise adapt silently less than intended."""
    unmatched: list[tuple[str, str]] = []
    tm, ff = config.target_modules, config.feedforward_modules
    missing_targets: set[str] = set()
    if isinstance(tm, (set, list)):
        layer_names = [ly.name for ly in layers]
        missing_targets = {e for e in tm if not any(_matches(n, [e]) for n in layer_names)}
        unmatched += [(f"target_modules entry {e!r}", "layer") for e in sorted(missing_targets)]
    if isinstance(ff, str):
        if not any(re.fullmatch(ff, t) for t in targets):
            unmatched.append((f"feedforward_modules regex {ff!r}", "targeted layer"))
    elif ff:  # PEFT's rule: a plain suffix of a target's name
        unmatched += [
            (f"feedforward_modules entry {e!r}", "targeted layer")
            for e in sorted(ff)
            if e not in missing_targets and not any(t.endswith(e) for t in targets)
        ]
    for m in config.modules_to_save or ():
        if not _modules_to_save(names, [m]):
            unmatched.append((f"modules_to_save entry {m!r}", "module"))
    for what, among in unmatched:
        warnings.warn(f"{what} matches no {among} of this model; check its spelling", stacklevel=4)


def _warn_unmatched_defaults(config: IA3Config, cfg: IA3Config, layers: Sequence[Layer]) -> None:
    """PEFT's default targets for a model type can name layers that this version of transformers
    no longer has (Mixtral's ``w2``: its experts are fused 3-d tensors in transformers 5, not
    Linear layers). Both libraries then adapt fewer layers than the mapping promises; say so."""
    if config.target_modules is not None or not isinstance(cfg.target_modules, (list, set)):
        return
    layer_names = [ly.name for ly in layers]
    missing = sorted(e for e in cfg.target_modules if not any(_matches(n, [e]) for n in layer_names))
    if missing:
        kept = sorted(set(cfg.target_modules) - set(missing))
        warnings.warn(
            f"the default target_modules for this model type include {', '.join(map(repr, missing))}, which "
            f"matches no layer of this model (PEFT adapts the same); only {kept} are adapted. Name target_modules "
            "to choose the layers yourself.",
            stacklevel=4,
        )


def _graph_module_names(sites: Sequence[CallSite]) -> list[str]:
    names: list[str] = []
    for site in sites:
        parts = site.module.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix not in names:
                names.append(prefix)
    return names
