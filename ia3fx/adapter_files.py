"""Adapter state dicts in PEFT's layout and PEFT-format adapter directories: save, load,
``from_pretrained``, ``load_adapter``, and the copy transformers' Trainer reads back.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.fx import GraphModule

from .adapter_store import PEFT_PREFIX, _key
from .blocks import GATE
from .config import IA3Config
from .errors import AdapterLoadError, NoMatchingModuleError
from .targeting import Selection, select_targets

if TYPE_CHECKING:
    from .model import IA3Model


def _full(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, as a plain tensor: a DTensor (FSDP2's sharded parameters) is gathered from
    every rank, a collective that every rank must take part in."""
    t = t.detach()
    full = getattr(t, "full_tensor", None)  # torch.distributed.tensor.DTensor
    return full() if callable(full) else t


def _is_sharded(*modules: nn.Module) -> bool:
    return any(callable(getattr(p, "full_tensor", None)) for m in modules for p in m.parameters())


class AdapterFilesMixin:
    """PEFT-layout state dicts and adapter directories, both ways."""

    def _expected_state(self, adapter: str) -> dict[str, tuple[torch.Tensor, tuple[int, ...]]]:
        selection = self._selections[adapter]
        out: dict[str, tuple[torch.Tensor, tuple[int, ...]]] = {}
        store = self.ia3_l[adapter]
        for name, target in selection.targets.items():
            out[f"{PEFT_PREFIX}{name}.ia3_l"] = (store[_key(name)], target.peft_shape)
        for module, clone in self._saved_modules(adapter).items():
            for k, t in clone.state_dict(keep_vars=True).items():
                out[f"{PEFT_PREFIX}{module}.{k}"] = (t, tuple(t.shape))
        return out

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors keyed and shaped as in PEFT's ``adapter_model.safetensors``.

        Under FSDP2 the vectors are sharded DTensors: they are gathered into full tensors, so every
        rank must call this (each gets the whole state)."""
        adapter = adapter_name or self.active_adapter
        return {k: _full(t).reshape(shape).clone() for k, (t, shape) in self._expected_state(adapter).items()}

    def _expected_shapes(self, selection: Selection) -> dict[str, tuple[int, ...]]:
        """The keys and shapes of an adapter's PEFT state dict, from its selection alone."""
        out = {f"{PEFT_PREFIX}{name}.ia3_l": t.peft_shape for name, t in selection.targets.items()}
        for module in selection.modules_to_save:
            for k, t in self.model.get_submodule(module).state_dict().items():
                out[f"{PEFT_PREFIX}{module}.{k}"] = tuple(t.shape)
        return out

    @staticmethod
    def _fit_state_dict(
        expected: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, torch.Tensor], adapter: str
    ) -> dict[str, torch.Tensor]:
        """``state_dict`` keyed as ``expected`` (PEFT's in-memory suffixes accepted), or an error
        listing every missing, unexpected and mis-shaped tensor."""
        given: dict[str, torch.Tensor] = {}
        for k, v in state_dict.items():
            for suffix in (f".ia3_l.{adapter}", ".ia3_l.default"):
                if k.endswith(suffix):
                    k = k[: -len(suffix)] + ".ia3_l"
                    break
            for segment in (f".modules_to_save.{adapter}.", ".modules_to_save.default."):
                k = k.replace(segment, ".")
            if not isinstance(v, torch.Tensor):
                raise AdapterLoadError(f"state dict entry {k!r} is a {type(v).__name__}, not a tensor. Nothing was loaded.")
            if k.endswith(".ia3_l") and not (v.is_floating_point() or v.is_complex()):
                raise AdapterLoadError(
                    f"state dict entry {k!r} is a {v.dtype} tensor: (IA)³ vectors are floating point. Nothing was loaded."
                )
            given[k] = v
        missing = sorted(set(expected) - set(given))
        unexpected = sorted(set(given) - set(expected))
        bad = [
            f"{k}: got {tuple(given[k].shape)}, expected {expected[k]}"
            for k in sorted(set(given) & set(expected))
            if tuple(given[k].shape) != tuple(expected[k])
        ]
        problems = []
        if missing:
            problems.append(f"missing keys {missing[:10]}" + (" ..." if len(missing) > 10 else ""))
        if unexpected:
            problems.append(f"unexpected keys {unexpected[:10]}" + (" ..." if len(unexpected) > 10 else ""))
        if bad:
            problems.append(f"mis-shaped tensors {bad[:10]}" + (" ..." if len(bad) > 10 else ""))
        if problems:
            hint = ""
            if unexpected and not any(k.startswith(PEFT_PREFIX) for k in given):
                hint = f" (keys must start with {PEFT_PREFIX!r}, as in PEFT's adapter files)"
            raise AdapterLoadError(
                f"state dict does not fit adapter {adapter!r}: " + "; ".join(problems) + hint
                + ". Nothing was loaded."
            )
        return given

    def load_adapter_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], adapter_name: str | None = None
    ) -> None:
        """Set the adapter from a PEFT-layout state dict; all-or-nothing, with a precise error."""
        adapter = adapter_name or self.active_adapter
        if adapter not in self.ia3_l:
            raise AdapterLoadError(f"no adapter named {adapter!r}; adapters: {list(self.ia3_l)}")
        expected = self._expected_state(adapter)
        given = self._fit_state_dict({k: shape for k, (_, shape) in expected.items()}, state_dict, adapter)
        bad = [k for k, v in given.items() if k.endswith(".ia3_l") and not bool(torch.isfinite(v).all())]
        if bad:  # PEFT loads them; merge_adapter(safe_merge=True) and the offline merge's checks refuse
            warnings.warn(
                f"adapter {adapter!r}: {len(bad)} vector(s) hold NaN or infinite values (first {bad[0]!r}); "
                "outputs through them are NaN/inf, and safe_merge refuses to merge them",
                stacklevel=2,
            )
        with GATE.exclusive(), torch.no_grad():  # forwards in other threads see old or new vectors
            for k, (t, _) in expected.items():
                t.copy_(given[k].reshape(t.shape))
            if self._product_slots:
                self._rebind_all()

    def _config_to_save(self, adapter: str) -> IA3Config:
        """The adapter's config as PEFT can reload it, selecting the same layers (see ``io.config_for_peft``)."""
        from .io import config_for_peft

        selection = self._selections[adapter]

        def reselect(cfg: IA3Config) -> tuple[dict[str, bool], list[str]] | None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    again = select_targets(cfg, self._sites0, model=self._layer_model)
            except ValueError:
                return None
            return {n: t.feedforward for n, t in again.targets.items()}, list(again.modules_to_save)

        config = config_for_peft(selection.config, selection.targets, list(selection.modules_to_save), reselect)
        config.inference_mode = True  # PEFT always saves true
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(self.model, "name_or_path", None) or None
        if config.task_type is None and self._retraceable:  # PEFT's hint for AutoPeftModel
            cls = type(self.model)
            config.auto_mapping = {"base_model_class": cls.__name__, "parent_library": cls.__module__}
        return config

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        adapter_name: str | None = None,
        *,
        selected_adapters: Sequence[str] | None = None,
        is_main_process: bool | None = None,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write adapters as PEFT does: ``adapter_config.json`` + ``adapter_model.safetensors``.

        Like PEFT's ``save_pretrained``, every adapter by default, or ``selected_adapters``, or the
        one ``adapter_name``. ``default`` goes into ``save_directory``, any other adapter into
        ``save_directory/<name>/``. Each adapter's files are replaced atomically: whatever happens, even a
        kill, ia3fx then reads one complete old or new version (a save killed during its renames is
        finished by the next ia3fx save or read of the directory; see :mod:`ia3fx.atomic_files`).

        Called as transformers' Trainer calls it (with ``is_main_process``), the directory also gets
        ``model.safetensors`` holding the same adapter tensors under this model's own state-dict
        names: that is the file Trainer's ``resume_from_checkpoint`` and ``load_best_model_at_end``
        read back (through :meth:`load_state_dict`). ``is_main_process=False`` writes nothing;
        ``state_dict`` and other keywords of transformers' ``save_pretrained`` are accepted and
        unused (the adapter's tensors come from the adapter).
        """
        from .io import adapter_directory, save_adapter_files

        # FSDP2: the tensors are gathered (every rank must call this) and rank 0 writes, unless told
        sharded = _is_sharded(self.ia3_l, self.modules_to_save)
        if is_main_process is False and not sharded:
            return
        trainer_copy = is_main_process is not None
        if is_main_process is None:
            is_main_process = not sharded or torch.distributed.get_rank() == 0

        if adapter_name is not None and selected_adapters is not None:
            raise ValueError("pass adapter_name or selected_adapters, not both")
        if adapter_name is not None:
            names = [adapter_name]
        elif selected_adapters is not None:
            names = [selected_adapters] if isinstance(selected_adapters, str) else list(selected_adapters)
        else:
            names = list(self.ia3_l)
        unknown = [n for n in names if n not in self.ia3_l]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; adapters: {list(self.ia3_l)}")
        for adapter in names:
            tensors = self.adapter_state_dict(adapter)
            extra = {"model.safetensors": self._own_adapter_state(adapter)} if trainer_copy else None
            if is_main_process:
                save_adapter_files(
                    adapter_directory(save_directory, adapter), self._config_to_save(adapter), tensors, extra
                )

    def _own_adapter_state(self, adapter: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors under this model's state-dict names."""
        prefixes = (f"ia3_l.{adapter}.", f"modules_to_save.{adapter}.")
        return {k: _full(v).clone() for k, v in self.state_dict().items() if k.startswith(prefixes)}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; a state dict of adapter tensors only (what Trainer's
        checkpoints hold) loads into the adapters and reports no base weights as missing."""
        adapter_only = bool(state_dict) and all(k.startswith(("ia3_l.", "modules_to_save.")) for k in state_dict)
        if not adapter_only:
            return nn.Module.load_state_dict(self, state_dict, strict=strict, assign=assign)
        result = nn.Module.load_state_dict(self, state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if k.startswith(("ia3_l.", "modules_to_save."))]
        adapters = {k.split(".")[1] for k in state_dict}
        missing = [k for k in missing if k.split(".")[1] in adapters]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"adapter state dict does not fit: missing {missing}, unexpected {result.unexpected_keys}")
        self._rebind_all()
        return type(result)(missing, result.unexpected_keys)

    @staticmethod
    def _config_for_loading(config: IA3Config, is_trainable: bool) -> tuple[IA3Config, bool]:
        config.inference_mode = not is_trainable
        init = config.init_ia3_weights
        config.init_ia3_weights = True  # the vectors are read from the file, not drawn (no RNG use)
        return config, init

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module | GraphModule | torch.export.ExportedProgram,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        example_inputs: Any = None,
        *,
        autocast_adapter_dtype: bool = True,
        dynamic: bool = True,
    ) -> IA3Model:
        """Adapt ``model`` with the PEFT IA3 adapter saved in directory ``model_id``.

        Reads what PEFT writes (safetensors, or ``adapter_model.bin`` through
        ``torch.load(weights_only=True)``), including configs PEFT cannot reload itself (``all-linear``
        with a feedforward list). A problem with the files or a mismatch with the model raises
        :class:`~ia3fx.AdapterLoadError` and leaves ``model`` as it was. ``.eval()`` unless
        ``is_trainable``, as PEFT. ``dynamic`` as in :func:`get_ia3_model`.
        """
        from .io import read_adapter_files

        config, tensors = read_adapter_files(model_id)
        config, init = cls._config_for_loading(config, is_trainable)
        params = list(model.parameters()) if isinstance(model, nn.Module) else []
        flags = [p.requires_grad for p in params]
        modes = [(m, m.training) for m in model.modules()] if isinstance(model, nn.Module) else []
        try:
            if not is_trainable and modes:
                model.eval()  # as PEFT (below); first, so that the graph captured is the eval one
            try:
                adapted = cls(
                    model, config, adapter_name, example_inputs, autocast_adapter_dtype=autocast_adapter_dtype, dynamic=dynamic
                )
                adapted.load_adapter_state_dict(tensors, adapter_name)
            except (AdapterLoadError, NoMatchingModuleError) as e:
                raise AdapterLoadError(f"cannot load the adapter in {os.fspath(model_id)}: {e}") from e
        except BaseException:
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)
            for m, mode in modes:
                m.training = mode
            raise
        adapted.peft_config[adapter_name].init_ia3_weights = init
        if not is_trainable:
            adapted.eval()
        return adapted

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False) -> None:
        """Add the PEFT IA3 adapter saved in directory ``model_id`` as ``adapter_name`` (inactive).

        Everything is checked (files, config, every tensor's key and shape) before the model is
        touched: on any error nothing was added. ``.eval()`` unless ``is_trainable``, as PEFT.
        Unlike PEFT, an existing ``adapter_name`` is an error rather than a reload into it.
        """
        self._check_loaded()
        from .io import read_adapter_files

        if adapter_name in self.ia3_l:
            raise ValueError(
                f"an adapter named {adapter_name!r} already exists; delete_adapter() it first, or load its "
                "tensors with load_adapter_state_dict()"
            )
        config, tensors = read_adapter_files(model_id)
        config, init = self._config_for_loading(config, is_trainable)
        where = os.fspath(model_id)
        try:
            selection = select_targets(config, self._sites0, model=self._layer_model)
            self._fit_state_dict(self._expected_shapes(selection), tensors, adapter_name)
        except (AdapterLoadError, NoMatchingModuleError) as e:
            raise AdapterLoadError(f"cannot load the adapter in {where}: {e}") from e
        try:
            self.add_adapter(adapter_name, config)
            self.load_adapter_state_dict(tensors, adapter_name)
        except BaseException:
            if adapter_name in self.ia3_l:
                self.delete_adapter(adapter_name)
            raise
        self.peft_config[adapter_name].init_ia3_weights = init
        if not is_trainable:
            self.eval()
