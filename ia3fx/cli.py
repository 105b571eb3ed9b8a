"""``ia3fx`` command line: plan and demo on a built-in preset or a local transformers model.

Every error is one line on stderr, ``ia3fx <command>: error: <reason>``, and a non-zero exit: 2 for
bad input or a failed read or write, 1 for an unexpected error (``IA3FX_DEBUG=1`` shows its
traceback), 130 when interrupted. Warnings are one line each too.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import traceback
import warnings
import zipfile
from collections.abc import Sequence
from subprocess import SubprocessError
from typing import Any

from safetensors import SafetensorError

from .config import CONFIG_NAME, IA3Config
from .errors import IA3Error, shorten
from .presets import DEFAULT_PRESET, PRESETS, build_preset, model_from_config


class _OnFirstUse:
    """A module imported on first attribute access: ``ia3fx merge`` runs without torch and
    transformers, the other subcommands import them when they use them."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        import importlib

        return getattr(importlib.import_module(self._name), attr)


torch = _OnFirstUse("torch")
nn = _OnFirstUse("torch.nn")

__all__ = ["main", "load_model", "config_from_args", "DEBUG_ENV"]

DEBUG_ENV = "IA3FX_DEBUG"  # set to 1: a traceback on stderr before the error line
LINE_CHARS = 500  # an error line is cut to this length (the debug traceback has all of it)


def _shown(value: Any) -> str:
    """A user-given string (a path, a name) as it is echoed in a message: quoted, cut to a readable length."""
    return repr(shorten(os.fspath(value) if isinstance(value, os.PathLike) else str(value)))


def load_model(spec: str) -> nn.Module:
    """A preset name, a transformers model directory, or a transformers config JSON file."""
    if spec in PRESETS:
        return build_preset(spec)
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise ValueError(f"model directory {_shown(spec)} has no config.json: pass a transformers model "
                             f"directory, its config.json, or a preset ({', '.join(PRESETS)})")
    elif not (os.path.isfile(spec) and spec.endswith(".json")):
        what = "it is a file not ending in .json" if os.path.exists(spec) else "no such file or directory"
        raise ValueError(f"model {_shown(spec)} is neither a preset ({', '.join(PRESETS)}), a transformers model "
                         f"directory, nor a config .json file ({what})")
    from transformers import AutoConfig

    if os.path.isdir(spec):
        config = AutoConfig.from_pretrained(spec)
        weights = [f for f in os.listdir(spec) if f.endswith((".safetensors", ".bin"))]
        if weights:
            import transformers

            arch = (config.architectures or ["AutoModelForCausalLM"])[0]
            cls = getattr(transformers, arch, transformers.AutoModelForCausalLM)
            return cls.from_pretrained(spec).eval()
        return model_from_config(config)
    return model_from_config(AutoConfig.from_pretrained(spec))


def _check_out(path: str, flag: str = "--out", *, directory: bool = False) -> None:
    """Refuse an output path that cannot be written before any work: a file where a directory of
    the path belongs, an existing file where ``directory`` is wanted, or a parent not writable.
    Missing directories are fine (the commands create them)."""
    if directory and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {_shown(path)} is a file; a directory is needed: choose another {flag}")
    parent = os.path.dirname(os.path.normpath(path)) or "."
    while not os.path.exists(parent):  # the nearest existing directory above, as the user wrote it
        parent = os.path.dirname(parent) or "."
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {_shown(path)}: {_shown(parent)} is a file, not a directory: choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {_shown(path)}: directory {_shown(parent)} is not writable: choose another {flag}")


def _add_adapter_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="adapter_config.json (PEFT format) to take the settings from")
    p.add_argument("--target-modules", nargs="+", help="names (exact or .-suffix), or one regex / all-linear")
    p.add_argument("--feedforward-modules", nargs="*", help="targets whose input is scaled (each also in --target-modules)")
    p.add_argument("--exclude-modules", nargs="+")
    p.add_argument("--modules-to-save", nargs="+")
    p.add_argument("--task-type", choices=["SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"])


def _patterns(values: list[str] | None) -> list[str] | str | None:
    if values is None:
        return None
    if len(values) == 1 and (values[0].lower() == "all-linear" or any(c in values[0] for c in "*()|[]\\^$")):
        return values[0]  # one regex, as PEFT reads a string
    return values


def _read_config(path: str) -> dict[str, Any]:
    """``--config``: an ``adapter_config.json`` file or a directory holding one, as a dict."""
    file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        where = f"directory {_shown(path)} has no {CONFIG_NAME}" if os.path.isdir(path) else f"{_shown(path)} not found"
        raise ValueError(f"--config: {where}: pass a PEFT {CONFIG_NAME} or the adapter directory holding it")
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--config {_shown(file)} is not valid JSON ({e}): pass a PEFT {CONFIG_NAME}") from e
    if not isinstance(data, dict):
        raise ValueError(f"--config {_shown(file)} holds a JSON {type(data).__name__}, not an object of "
                         f"IA3Config fields: pass a PEFT {CONFIG_NAME}")
    return data


def _check_feedforward(config: IA3Config, args: argparse.Namespace) -> None:
    """The API's rule for a config given here: ``IA3Config(target_modules=..., feedforward_modules=...)``
    raises when a feedforward name is not a target (``from_dict`` lets a saved file through)."""
    ff, targets = config.feedforward_modules, config.target_modules
    try:
        IA3Config(target_modules=targets, feedforward_modules=ff)
    except ValueError as e:
        if not (isinstance(ff, set) and isinstance(targets, set)):
            raise
        missing, names = shorten(" ".join(sorted(ff - targets))), shorten(" ".join(sorted(targets)))
        if args.feedforward_modules is None:  # the targets given as a flag, the feedforward names from --config
            raise ValueError(
                f"--target-modules ({names}) leaves out the feedforward modules of --config {_shown(args.config)} "
                f"({missing}): {e}; give --feedforward-modules too (with no name for none), or add them to "
                "--target-modules"
            ) from e
        source = "--target-modules" if args.target_modules is not None else f"the targets of --config {_shown(args.config)}"
        raise ValueError(
            f"--feedforward-modules {missing} not in {source} ({names}): {e}; add the name to --target-modules too, "
            "or leave it out of --feedforward-modules"
        ) from e


def config_from_args(args: argparse.Namespace) -> IA3Config:
    """PEFT-named flags override what ``--config`` says; nothing given means PEFT's defaults.

    A ``--feedforward-modules`` name that is not in the targets raises, as ``IA3Config`` does."""
    base = _read_config(args.config) if args.config else {}
    for key in ("target_modules", "feedforward_modules", "exclude_modules"):
        value = getattr(args, key)
        if value is not None:
            base[key] = _patterns(value)
    if args.modules_to_save is not None:
        base["modules_to_save"] = args.modules_to_save
    if args.task_type is not None:
        base["task_type"] = args.task_type
    base.pop("peft_version", None)
    config = IA3Config.from_dict(base)
    if args.target_modules is not None or args.feedforward_modules is not None:
        _check_feedforward(config, args)
    return config


def cmd_plan(args: argparse.Namespace) -> int:
    from .model import plan

    config = config_from_args(args)  # the flags are checked before the model is built
    print(plan(load_model(args.model), config).table())
    return 0


def _demo_batches(vocab: int, steps: int, batch: int, seq: int) -> list[torch.Tensor]:
    """Token sequences counting up modulo a small cycle: easy to predict, unknown to a random model."""
    g = torch.Generator().manual_seed(0)
    cycle = min(vocab, 16)
    out = []
    for _ in range(steps):
        start = torch.randint(0, cycle, (batch, 1), generator=g)
        out.append((start + torch.arange(seq)) % cycle)
    return out


def cmd_demo(args: argparse.Namespace) -> int:
    """The pipeline on a built-in model: adapt, train, draw, generate, merge, export, check."""
    from .model import get_ia3_model

    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}: pass how many training steps to run (default 40)")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a positive number, got {args.lr}: try the default 0.05")
    _check_out(args.out, directory=True)
    torch.manual_seed(0)
    model = build_preset(args.preset)
    if not hasattr(model, "lm_head"):
        raise ValueError(f"the demo trains a causal LM; preset {args.preset!r} is not one (try tiny-llama or tiny-gpt2)")
    out = args.out
    os.makedirs(out, exist_ok=True)
    print(f"1. base model: preset {args.preset} ({type(model).__name__}, "
          f"{sum(p.numel() for p in model.parameters()):,d} parameters, random weights)")
    batches = _demo_batches(model.config.vocab_size, args.steps, batch=8, seq=32)
    t0 = time.perf_counter()
    ia3 = get_ia3_model(model, IA3Config())
    print(f"2. adapted in {time.perf_counter() - t0:.2f} s: {len(ia3.targets)} layers "
          f"({', '.join(sorted({n.rsplit('.', 1)[-1] for n in ia3.targets}))}); ", end="")
    ia3.print_trainable_parameters()
    losses = _demo_train(ia3, batches, args.lr)
    print(f"   loss {losses[0]:.4f} -> {losses[-1]:.4f} ({'down' if losses[-1] < losses[0] else 'NOT down'})")
    ia3.eval()
    ia3.save_pretrained(out)
    print(f"3. adapter (PEFT format): {os.path.join(out, 'adapter_config.json')}, adapter_model.safetensors")
    print(f"4. adapted graph: {_demo_draw(ia3, out)}")
    prompt = batches[0][:1, :8]
    greedy = dict(max_new_tokens=16, do_sample=False, attention_mask=torch.ones_like(prompt), pad_token_id=0)
    adapted = ia3.generate(prompt, **greedy)  # the mask: token 0 is a real token here, not padding
    with ia3.disable_adapter():
        base = ia3.generate(prompt, **greedy)
    print(f"5. generate, prompt {prompt[0].tolist()}:\n   adapted {adapted[0, 8:].tolist()}\n"
          f"   base    {base[0, 8:].tolist()}")
    same = _demo_export(ia3, out, prompt, adapted)
    ok = losses[-1] < losses[0] and same
    print("OK: adapted, trained, drawn, generated, merged and exported; the export generates the adapted "
          "model's tokens" if ok else "FAILED: see above")
    return 0 if ok else 1


def _demo_train(ia3: nn.Module, batches: list[torch.Tensor], lr: float) -> list[float]:
    ia3.train()
    opt = torch.optim.AdamW([p for p in ia3.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step, ids in enumerate(batches):
        loss = ia3(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % max(1, len(batches) // 4) == 0 or step == len(batches) - 1:
            print(f"   train step {step:3d}  loss {loss.item():.4f}")
    return losses


def _demo_draw(ia3: nn.Module, out: str) -> str:

    from .viz import draw

    path = os.path.join(out, "adapted-graph.svg" if shutil.which("dot") else "adapted-graph.dot")
    draw(ia3, path)
    return path + ("" if path.endswith(".svg") else " (Graphviz's dot is not installed: the DOT source)")


def _demo_export(ia3: nn.Module, out: str, prompt: torch.Tensor, adapted: torch.Tensor) -> bool:
    from transformers.utils import logging as hf_logging

    from .decode import greedy_pt2
    from .export import export

    hf_logging.disable_progress_bar()  # one line per step, not a bar for a single small shard
    merged_dir = export(ia3, os.path.join(out, "merged-checkpoint"), "transformers", overwrite=True)
    print(f"6. merged transformers checkpoint (adapter folded into the weights): {merged_dir}")
    t0 = time.perf_counter()
    path = export(ia3, os.path.join(out, "generate-merged.pt2"), "pt2", for_generation=True,
                  max_cache_len=adapted.shape[1], overwrite=True)
    print(f"7. exported for generation (pt2, static KV cache, merged) in {time.perf_counter() - t0:.1f} s: {path}")
    tokens = greedy_pt2(torch.export.load(path), prompt, adapted.shape[1] - prompt.shape[1])
    same = torch.equal(tokens, adapted)
    print(f"8. check: the exported program's greedy tokens {'equal' if same else 'DIFFER from'} the adapted "
          f"model's generate ({tokens.shape[1] - prompt.shape[1]} tokens)")
    return same


def cmd_merge(args: argparse.Namespace) -> int:
    from .offline import merge_checkpoint

    _check_out(args.out, directory=True)
    try:
        report = merge_checkpoint(args.base, args.adapter, args.out, force=args.force, safe=args.safe)
    except KeyboardInterrupt:
        print(f"ia3fx merge: interrupted; {args.out} was not written", file=sys.stderr)
        return 130
    print(report.summary())
    return 0


# --- apply / viz / report ---------------------------------------------------------------------------
class _Progress:
    """Named steps on a tqdm bar on stderr, shown only when stderr is a terminal."""

    def __init__(self, command: str, steps: Sequence[str]) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=len(steps), file=sys.stderr, disable=not sys.stderr.isatty(), leave=False,
            bar_format="{desc} [{n_fmt}/{total_fmt}, {elapsed}]",
        )
        self._command = command
        self._started = False

    def step(self, name: str) -> None:
        if self._started:
            self._bar.update(1)
        self._started = True
        self._bar.set_description_str(f"ia3fx {self._command}: {name}")

    def close(self) -> None:
        self._bar.close()


def _load_for_graph(args: argparse.Namespace) -> nn.Module:
    """The model; with ``--meta`` built from its config on the meta device (no weights read or allocated)."""
    if not getattr(args, "meta", False):
        return load_model(args.model)
    spec = args.model
    if os.path.isdir(spec):
        spec = os.path.join(spec, "config.json")  # weights are not needed to see the graph
        if not os.path.isfile(spec):
            raise ValueError(f"{args.model} has no config.json")
    with torch.device("meta"):
        return load_model(spec)


def cmd_apply(args: argparse.Namespace) -> int:
    from .model import get_ia3_model

    _check_out(args.out, directory=True)
    if os.path.isfile(os.path.join(args.out, CONFIG_NAME)) and not args.force:
        raise ValueError(f"{args.out} already holds an adapter; pass --force to replace it")
    config = config_from_args(args)
    if args.init_ia3_weights is not None:
        config.init_ia3_weights = args.init_ia3_weights
    torch.manual_seed(args.seed)
    progress = _Progress("apply", ["load model", "trace and rewrite", "save"])
    try:
        progress.step("load model")
        model = load_model(args.model)
        progress.step("trace and rewrite")
        ia3 = get_ia3_model(model, config)
        progress.step("save")
        ia3.save_pretrained(args.out)
    finally:
        progress.close()
    n = sum(t.size for t in ia3.targets.values())
    scaled = sum(s.targeted for s in ia3.call_sites)
    print(f"adapter saved in PEFT format to {args.out}/ (adapter_config.json, adapter_model.safetensors): "
          f"{len(ia3.targets)} vectors, {n:,d} parameters, {scaled} of {len(ia3.call_sites)} call sites scaled")
    return 0


def cmd_viz(args: argparse.Namespace) -> int:
    from .model import get_ia3_model
    from .viz import _BITMAP, _SOURCE, draw

    suffix = os.path.splitext(args.out)[1].lower()
    if suffix not in _SOURCE + tuple(_BITMAP) + (".html",):
        raise ValueError(f"cannot tell the format from --out {args.out!r}: use .svg, .png, .pdf, .dot or .html")
    _check_out(args.out)
    if os.path.isdir(args.out):
        raise ValueError(f"--out {_shown(args.out)} is a directory: pass a file path such as graph{suffix}")
    config = config_from_args(args)
    progress = _Progress("viz", ["load model", "trace and rewrite", f"draw {suffix}"])
    try:
        progress.step("load model")
        model = _load_for_graph(args)
        progress.step("trace and rewrite")
        ia3 = get_ia3_model(model, config)
        progress.step(f"draw {suffix}")
        t0 = time.perf_counter()
        graph = draw(ia3, args.out, view=args.view, expand=args.expand, legend=not args.no_legend)
        took = time.perf_counter() - t0
    finally:
        progress.close()
    title = graph.graph_attr.get("label", "").replace("\\n", "; ")
    print(f"wrote {args.out} in {took:.2f} s ({title})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .analysis import report

    adapters = args.adapter or []
    if args.plot is not None:
        _check_plot(args)
    if adapters and args.meta:
        raise ValueError("--adapter reads trained vectors into the model; --meta builds it without weights: drop --meta")
    flags = ("config", "target_modules", "feedforward_modules", "exclude_modules", "modules_to_save", "task_type")
    given = [f"--{f.replace('_', '-')}" for f in flags if getattr(args, f) is not None]
    if adapters and given:
        raise ValueError(f"--adapter takes its settings from {adapters[0]}; drop {', '.join(given)}")
    config = config_from_args(args) if not adapters else None
    progress = _Progress("report", ["load model", "trace and match"])
    try:
        progress.step("load model")
        model = _load_for_graph(args)
        progress.step("trace and match")
        result = report(_with_adapters(model, adapters) if adapters else model, config)
    finally:
        progress.close()
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.text())
    if args.plot is not None:
        result.plot(args.plot)
        print(f"wrote {args.plot}: mean |v-1| per block and site kind, adapters {', '.join(result.vectors)}",
              file=sys.stderr if args.json else sys.stdout)
    return 0


def _check_plot(args: argparse.Namespace) -> None:
    """``--plot``: a format matplotlib writes, trained vectors to draw, matplotlib installed; before any work."""
    from .viz_plot import _pyplot

    if os.path.splitext(args.plot)[1].lower() not in (".png", ".svg", ".pdf"):
        raise ValueError(f"cannot tell the format from --plot {_shown(args.plot)}: use .png, .svg or .pdf")
    if not args.adapter:
        raise ValueError("--plot draws how far trained vectors moved from ones: pass --adapter DIR (repeatable, "
                         "adapters side by side)")
    _check_out(args.plot, "--plot")
    try:
        _pyplot()
    except ImportError as e:  # the optional extra: bad set-up, one line and exit 2 as bad input
        raise ValueError(str(e)) from e


def _with_adapters(model: nn.Module, adapters: list[str]) -> nn.Module:
    """``model`` adapted with each adapter directory, named after it (the first one active)."""
    from .model import IA3Model

    names: list[str] = []
    for path in adapters:
        name = re.sub(r"[^0-9A-Za-z_-]+", "_", os.path.basename(os.path.normpath(path))) or "adapter"
        if hasattr(nn.Module, name):  # "train", "to": attributes cannot name an adapter
            name = f"adapter_{name}"
        names.append(name if name not in names else f"{name}_{len(names)}")
    ia3 = IA3Model.from_pretrained(model, adapters[0], adapter_name=names[0])
    for path, name in zip(adapters[1:], names[1:]):
        ia3.load_adapter(path, name)
    return ia3


def cmd_view(args: argparse.Namespace) -> int:
    """Model Explorer on the adapted graph (with overlays), or Netron on an exported .onnx (--netron)."""
    from .view import open_model_explorer, view, view_netron

    if args.netron:
        print(view_netron(args.model, browser=not args.no_browser))
        return 0
    if args.out is not None:
        _check_out(args.out, directory=True)
    flags = ("config", "target_modules", "feedforward_modules", "exclude_modules", "modules_to_save", "task_type")
    given = [f"--{f.replace('_', '-')}" for f in flags if getattr(args, f) is not None]
    if args.adapter and given:
        raise ValueError(f"--adapter takes its settings from {args.adapter}; drop {', '.join(given)}")
    if args.adapter and args.meta:
        raise ValueError("--adapter reads trained vectors into the model; --meta builds it without weights: drop --meta")
    if not args.no_browser:
        from .view import _extra

        try:
            _extra("model_explorer", "ai-edge-model-explorer (Model Explorer)")  # the extra, before any work
        except ImportError as e:
            raise ValueError(str(e)) from e
    config = None if args.adapter else config_from_args(args)
    model = _load_for_graph(args)
    if args.adapter:
        ia3 = _with_adapters(model, [args.adapter])
    else:
        from .model import get_ia3_model

        ia3 = get_ia3_model(model, config)
    t0 = time.perf_counter()
    files = view(ia3, args.out, base=args.base, browser=False)
    print(f"wrote {len(files.graphs)} graph(s) and {len(files.overlays)} overlays in {time.perf_counter() - t0:.2f} s")
    if args.no_browser:
        print(files.how_to_open())
        return 0
    print(f"starting Model Explorer on port {args.port} (Ctrl-C stops it); {files.how_to_open()}")
    open_model_explorer(files, port=args.port)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from .export import export
    from .io import read_adapter_files
    from .model import get_ia3_model

    if args.for_generation and args.format == "transformers":
        raise ValueError("--for-generation exports a program with a KV cache (pt2 or onnx); a transformers "
                         "checkpoint generates with its own generate: drop --for-generation")
    if not args.for_generation and (args.max_cache_len is not None or args.batch_size is not None):
        raise ValueError("--max-cache-len and --batch-size size the static cache of --for-generation --format pt2")
    if args.format == "onnx" and (args.max_cache_len is not None or args.batch_size is not None):
        raise ValueError("the ONNX export for generation takes any batch and past length: drop --max-cache-len/--batch-size")
    flags = ("config", "target_modules", "feedforward_modules", "exclude_modules", "modules_to_save", "task_type")
    given = [f"--{f.replace('_', '-')}" for f in flags if getattr(args, f) is not None]
    if args.adapter and given:
        raise ValueError(f"--adapter takes its settings from {args.adapter}; drop {', '.join(given)}")
    table = _named_dirs(args.adapters) if args.adapters else None
    if table is not None:
        if args.adapter or given:
            raise ValueError(f"--adapters takes its settings from the adapter directories; drop {', '.join(given) or '--adapter'}")
        if args.format == "transformers":
            raise ValueError("--adapters exports a table of adapters into a pt2 or onnx program: use --format pt2 or onnx")
    _check_out(args.out)
    if table is not None:
        config, tensors = read_adapter_files(table[0][1])
    elif args.adapter:
        config, tensors = read_adapter_files(args.adapter)
    else:
        config, tensors = config_from_args(args), None
    model = load_model(args.model)
    ia3 = get_ia3_model(model, config, adapter_name=table[0][0] if table else "default")
    if tensors is not None:
        ia3.load_adapter_state_dict(tensors)
    for name, directory in (table or [])[1:]:
        ia3.load_adapter(directory, adapter_name=name)
    stages = ["export the graph" + (" with its KV cache" if args.for_generation else ""),
              "write the pt2 archive" if args.format == "pt2" else "convert to ONNX"]
    progress = _Progress("export", stages)
    t0 = time.perf_counter()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' shard bar goes to stderr even when it is no terminal
    try:
        path = export(ia3, args.out, format=args.format, merged=None if table else not args.unmerged,
                      overwrite=args.force, for_generation=args.for_generation,
                      batch_size=1 if args.batch_size is None else args.batch_size, max_cache_len=args.max_cache_len,
                      progress=progress.step, adapters=[n for n, _ in table] if table else None)
    finally:
        progress.close()
        if bars:
            hf_logging.enable_progress_bar()
    how = "scale nodes kept" if args.unmerged else "merged"
    if table:
        how = f"a table of {len(table)} adapters (adapter_index 1..{len(table)}: {', '.join(n for n, _ in table)}; 0: base)"
    kind = ", for generation with a KV cache" if args.for_generation else ""
    print(f"wrote {path} ({args.format}{kind}, {how}, {len(ia3.targets)} adapted layers) in {time.perf_counter() - t0:.1f} s")
    return 0


def _named_dirs(items: list[str]) -> list[tuple[str, str]]:
    """``NAME=DIR`` or ``DIR`` (named after its last component), in order; names must be distinct."""
    out = []
    for item in items:
        name, sep, directory = item.partition("=")
        if not sep:
            name, directory = os.path.basename(os.path.normpath(item)), item
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"--adapters: {directory} is not an adapter directory")
        out.append((name, directory))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"--adapters names two adapters alike ({names}): name them, NAME=DIR")
    return out


def _check_program(exported: str) -> None:
    """A ``.pt2`` that is no zip archive is refused here, before torch logs a traceback reading it."""
    from .swap import program_file

    path = program_file(exported)
    if path.endswith(".pt2") and not zipfile.is_zipfile(path):
        raise ValueError(f"{_shown(path)} is not a .pt2 archive (truncated, or not written by torch.export): "
                         "export it again with ia3fx export --for-generation --unmerged")


def _protobuf_errors() -> tuple[type[BaseException], ...]:
    try:
        from google.protobuf.message import DecodeError
    except ImportError:  # no onnx installed: nothing of the kind can be raised
        return ()
    return (DecodeError,)


def cmd_swap_adapter(args: argparse.Namespace) -> int:
    from .swap import read_manifest, swap_adapter

    _check_out(args.out)
    _check_program(args.exported)
    try:
        path = swap_adapter(args.exported, args.adapter, args.out, overwrite=args.force, adapter_name=args.adapter_name)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{_shown(args.exported)} is not a readable .pt2 archive ({e}): is it truncated? "
                         "Export it again with ia3fx export --for-generation --unmerged") from e
    except _protobuf_errors() as e:  # onnx.load of a file that is no ONNX model
        raise ValueError(f"{_shown(args.exported)} is not a readable ONNX model ({e}): export it again with "
                         "ia3fx export --format onnx --for-generation --unmerged") from e
    manifest = read_manifest(path)
    n = len(manifest["vectors"])
    if manifest.get("table"):
        row = manifest["adapters"].index(args.adapter_name) + 1
        print(f"wrote {path}: {args.exported} with {args.adapter} as table row {row} ({args.adapter_name!r}; "
              f"adapters {manifest['adapters']})")
    else:
        print(f"wrote {path}: {args.exported} with the {n} vectors of {args.adapter}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as one line (``ia3fx demo: error: ...``), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {shorten(' '.join(message.split()), LINE_CHARS)}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ia3fx", description="(IA)³ adapters by graph rewriting")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="show which call sites a config would scale, as a table")
    p.add_argument("model", help=f"preset ({', '.join(PRESETS)}), transformers directory, or config .json")
    _add_adapter_flags(p)
    p.set_defaults(func=cmd_plan)
    d = sub.add_parser("demo", help="the whole pipeline on a built-in tiny model: adapt, train, draw, generate, merge, export")
    d.add_argument("--preset", default=DEFAULT_PRESET, choices=("tiny-llama", "tiny-gpt2"))
    d.add_argument("--steps", type=int, default=40)
    d.add_argument("--lr", type=float, default=0.05)
    d.add_argument("--out", default="ia3fx-demo-out",
                   help="directory for the adapter, the graph, the merged checkpoint and the export (its files are replaced)")
    d.set_defaults(func=cmd_demo)
    m = sub.add_parser("merge", help="merge a PEFT IA3 adapter into a safetensors checkpoint on disk, offline")
    m.add_argument("--base", required=True, help="transformers model directory (config.json + safetensors)")
    m.add_argument("--adapter", required=True, help="PEFT IA3 adapter directory")
    m.add_argument("--out", required=True, help="directory to write the merged checkpoint to")
    m.add_argument("--force", action="store_true", help="replace --out if it exists (once the new one is complete)")
    m.add_argument("--safe", action="store_true",
                   help="refuse an adapter whose vectors hold NaN or inf (PEFT's safe_merge); nothing is written")
    m.set_defaults(func=cmd_merge)
    model_help = f"preset ({', '.join(PRESETS)}), transformers directory, or config .json"
    meta_help = "build the model from its config on the meta device: no weights read or allocated (big models)"
    a = sub.add_parser("apply", help="save an initialised (IA)³ adapter for a model, in PEFT format")
    a.add_argument("model", help=model_help)
    _add_adapter_flags(a)
    a.add_argument("--out", required=True, help="directory for adapter_config.json and adapter_model.safetensors")
    a.add_argument("--init-ia3-weights", action=argparse.BooleanOptionalAction, default=None,
                   help="ones (PEFT's default) or, with --no-init-ia3-weights, random vectors")
    a.add_argument("--seed", type=int, default=0, help="seed for random vectors")
    a.add_argument("--force", action="store_true", help="replace an adapter already in --out")
    a.set_defaults(func=cmd_apply)
    v = sub.add_parser("viz", help="draw the adapted graph (SVG, PNG, PDF, or DOT source)")
    v.add_argument("model", help=model_help)
    _add_adapter_flags(v)
    v.add_argument("--out", required=True, help="graph.svg, graph.png, graph.pdf, graph.dot (no Graphviz needed) or "
                   "graph.html (interactive: pan, zoom, search, click a fold to expand it)")
    v.add_argument("--view", choices=["folded", "full", "diff"], default="folded",
                   help="folded: repeated blocks once, as × N (default); full: every node; diff: what the rewrite added")
    v.add_argument("--expand", action="append", metavar="PATH",
                   help="module to draw in full inside the folded view, e.g. model.layers.3 (repeatable)")
    v.add_argument("--no-legend", action="store_true")
    v.add_argument("--meta", action="store_true", help=meta_help)
    v.set_defaults(func=cmd_viz)
    r = sub.add_parser("report", help="call sites found, matched and skipped (why), sizes per block, tied weights")
    r.add_argument("model", help=model_help)
    _add_adapter_flags(r)
    r.add_argument("--json", action="store_true", help="print the report as JSON")
    r.add_argument("--adapter", action="append", metavar="DIR",
                   help="PEFT IA3 adapter directory to report on (repeatable: several adapters side by side in --plot)")
    r.add_argument("--plot", metavar="PATH", help="also draw how far the vectors moved from ones: out.png, .svg or .pdf "
                   "(needs matplotlib: pip install 'ia3fx[plot]')")
    r.add_argument("--meta", action="store_true", help=meta_help)
    r.set_defaults(func=cmd_report)
    x = sub.add_parser("export", help="export the adapted model: merged pt2, ONNX, or a transformers checkpoint")
    x.add_argument("model", help=f"preset ({', '.join(PRESETS)}), transformers directory, or config .json")
    x.add_argument("--format", choices=["pt2", "onnx", "transformers"], default="pt2")
    x.add_argument("--out", required=True, help="file (pt2, onnx) or directory (transformers) to write")
    x.add_argument("--adapter", help="PEFT IA3 adapter directory to export (instead of the adapter flags)")
    _add_adapter_flags(x)
    x.add_argument("--unmerged", action="store_true", help="keep the scale nodes, vectors as parameters (pt2, onnx)")
    x.add_argument("--force", "--overwrite", dest="force", action="store_true",
                   help="replace --out if it exists (once the new one is complete)")
    x.add_argument("--for-generation", action="store_true",
                   help="a program with a KV cache: pt2 with a static cache (ExecuTorch form), ONNX with past key values")
    x.add_argument("--max-cache-len", type=int, help="positions of the pt2 static cache (default: the model's, at most 2048)")
    x.add_argument("--batch-size", type=int, help="batch of the pt2 static cache (default 1)")
    x.add_argument("--adapters", nargs="+", metavar="[NAME=]DIR",
                   help="several PEFT IA3 adapter directories: one program that serves them all, by its adapter_index "
                        "input (1..N in this order, 0 the base)")
    x.set_defaults(func=cmd_export)
    e = sub.add_parser("view", help="open the adapted graph in Model Explorer (overlays: roles, vector statistics), "
                       "or an exported .onnx in Netron (--netron)")
    e.add_argument("model", help=model_help + "; with --netron, an exported .onnx file")
    _add_adapter_flags(e)
    e.add_argument("--adapter", help="PEFT IA3 adapter directory whose vectors to show (instead of the adapter flags)")
    e.add_argument("--base", action="store_true", help="also the base graph (without ia3fx's nodes), side by side")
    e.add_argument("--no-browser", action="store_true", help="write the files and print how to open them")
    e.add_argument("--out", help="directory for the Model Explorer files (default: a new temporary directory)")
    e.add_argument("--netron", action="store_true", help="MODEL is an exported .onnx: open it in Netron")
    e.add_argument("--port", type=int, default=8080, help="Model Explorer's port (default 8080)")
    e.add_argument("--meta", action="store_true", help=meta_help)
    e.set_defaults(func=cmd_view)
    w = sub.add_parser("swap-adapter", help="write an exported program (unmerged, for generation) with another adapter")
    w.add_argument("exported", help="a .pt2 or .onnx file from ia3fx export --for-generation --unmerged")
    w.add_argument("adapter", help="PEFT IA3 adapter directory with the same target modules")
    w.add_argument("--out", required=True, help="the file to write (same format)")
    w.add_argument("--force", action="store_true", help="replace --out if it exists (once the new one is complete)")
    w.add_argument("--adapter-name", help="for a program exported with --adapters: the table row to replace (a "
                   "listed name) or to add (a new name)")
    w.set_defaults(func=cmd_swap_adapter)
    return parser


# --- errors ------------------------------------------------------------------------------------------
# Bad input and failed reads or writes: the command's own checks (ValueError, IA3Error), the API's
# (TypeError for a wrong-typed config field, KeyError for an unknown name, RuntimeError and its torch
# subclasses, NotImplementedError), the filesystem (OSError), and the readers' own types.
_INPUT_ERRORS = (
    ValueError, OSError, RuntimeError, KeyError, TypeError, NotImplementedError, IA3Error,
    re.error, SafetensorError, zipfile.BadZipFile, SubprocessError,
)
_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
_OS_HINTS = {
    errno.ENOENT: "check the path",
    errno.EACCES: "choose a path you may write (or read)",
    errno.EPERM: "choose a path you may write (or read)",
    errno.EROFS: "choose another --out",
    errno.ENOTDIR: "a file stands where the path needs a directory",
    errno.EISDIR: "a directory stands where a file is needed",
    errno.EEXIST: "a file stands where a directory is needed, or --force is needed",
}


def _full_disk(strerror: str, path: str | None) -> str:
    where = f" writing {_shown(path)}" if path else ""
    return f"{strerror}{where}: the disk is full or a file size limit was reached; free some space or choose another --out"


def _reason(e: BaseException, args: argparse.Namespace) -> str:
    """The error's first line, with the file and what to do for the filesystem's and readers' errors."""
    out = getattr(args, "out", None)
    if isinstance(e, OSError) and e.errno is not None and e.strerror:
        if e.errno in _FULL:  # --out rather than the name of a temporary file inside it
            return _full_disk(e.strerror, out or e.filename)
        hint = _OS_HINTS.get(e.errno)
        name = f"{_shown(e.filename)}: " if e.filename else ""
        return f"{name}{e.strerror}" + (f": {hint}" if hint else "")
    text = str(e).strip()
    if isinstance(e, SafetensorError):
        m = re.search(r"\(os error (\d+)\)", text)
        if m and int(m.group(1)) in _FULL:
            return _full_disk(os.strerror(int(m.group(1))), out)
        return f"safetensors: {text.splitlines()[0] if text else type(e).__name__}"
    if isinstance(e, re.error):
        return f"invalid regular expression {_shown(e.pattern)}: {e.msg}"
    if isinstance(e, KeyError) and len(e.args) == 1:
        text = str(e.args[0])
    if not text:
        return type(e).__name__
    return text.splitlines()[0]


def _warn_line(command: str):
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = " ".join(str(message).split())
        print(f"ia3fx {command}: warning: {shorten(text, LINE_CHARS)}", file=sys.stderr)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    prefix = f"ia3fx {args.command}"
    if not debug:  # torchao, when installed, logs on import: one line per CUDA-only kernel it cannot
        # load on a CPU machine, and torch's pytree one per enum it registers (a deprecation)
        for noisy in ("torchao", "torch.utils._pytree"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*token_id.*")
            warnings.showwarning = _warn_line(args.command)
            return args.func(args)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except _INPUT_ERRORS as e:
        if debug:
            traceback.print_exc()
        print(f"{prefix}: error: {shorten(_reason(e, args), LINE_CHARS)}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: one line, and how to see where
        if debug:
            raise
        print(f"{prefix}: error: unexpected {type(e).__name__}: {shorten(_reason(e, args), LINE_CHARS)} "
              f"(a bug in ia3fx? rerun with {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
