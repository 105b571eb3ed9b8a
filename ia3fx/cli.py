"""``ia3fx`` command line: plan and demo on a built-in preset or a local transformers model.

Every command exits non-zero with a one-line reason on error.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from .config import IA3Config
from .presets import DEFAULT_PRESET, PRESETS, build_preset, model_from_config

__all__ = ["main", "load_model", "config_from_args"]


def load_model(spec: str) -> nn.Module:
    """A preset name, a transformers model directory, or a transformers config JSON file."""
    if spec in PRESETS:
        return build_preset(spec)
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
    if os.path.isfile(spec) and spec.endswith(".json"):
        return model_from_config(AutoConfig.from_pretrained(spec))
    raise ValueError(
        f"model {spec!r} is neither a preset ({', '.join(PRESETS)}), a directory, nor a config .json file"
    )


def _add_adapter_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="adapter_config.json (PEFT format) to take the settings from")
    p.add_argument("--target-modules", nargs="+", help="names (exact or .-suffix), or one regex / all-linear")
    p.add_argument("--feedforward-modules", nargs="*", help="targets whose input is scaled")
    p.add_argument("--exclude-modules", nargs="+")
    p.add_argument("--modules-to-save", nargs="+")
    p.add_argument("--task-type", choices=["SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"])


def _patterns(values: list[str] | None) -> list[str] | str | None:
    if values is None:
        return None
    if len(values) == 1 and (values[0].lower() == "all-linear" or any(c in values[0] for c in "*()|[]\\^$")):
        return values[0]  # one regex, as PEFT reads a string
    return values


def config_from_args(args: argparse.Namespace) -> IA3Config:
    """PEFT-named flags override what ``--config`` says; nothing given means PEFT's defaults."""
    base = IA3Config.from_pretrained(args.config).to_dict() if args.config else {}
    for key in ("target_modules", "feedforward_modules", "exclude_modules"):
        value = getattr(args, key)
        if value is not None:
            base[key] = _patterns(value)
    if args.modules_to_save is not None:
        base["modules_to_save"] = args.modules_to_save
    if args.task_type is not None:
        base["task_type"] = args.task_type
    base.pop("peft_version", None)
    return IA3Config.from_dict(base)


def cmd_plan(args: argparse.Namespace) -> int:
    from .model import plan

    model = load_model(args.model)
    print(plan(model, config_from_args(args)).table())
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
    from .model import get_ia3_model

    torch.manual_seed(0)
    model = build_preset(args.preset)
    if not hasattr(model, "lm_head"):
        raise ValueError(f"the demo trains a causal LM; preset {args.preset!r} is not one (try tiny-llama or tiny-gpt2)")
    config = IA3Config()
    print(f"base model: preset {args.preset} ({type(model).__name__}, "
          f"{sum(p.numel() for p in model.parameters()):,d} parameters, random weights)")
    batches = _demo_batches(model.config.vocab_size, args.steps, batch=8, seq=32)
    t0 = time.perf_counter()
    ia3 = get_ia3_model(model, config, example_inputs={"input_ids": batches[0], "labels": batches[0]})
    print(f"traced and rewritten in {time.perf_counter() - t0:.2f} s: "
          f"{sum(s.targeted for s in ia3.call_sites)} of {len(ia3.call_sites)} linear call sites scaled")
    ia3.print_trainable_parameters()
    ia3.train()
    opt = torch.optim.AdamW([p for p in ia3.parameters() if p.requires_grad], lr=args.lr)
    losses = []
    for step, ids in enumerate(batches):
        loss = ia3(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % max(1, len(batches) // 5) == 0 or step == len(batches) - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} ({'down' if losses[-1] < losses[0] else 'NOT down'})")
    ia3.eval()
    ia3.save_pretrained(args.out)
    print(f"adapter saved in PEFT format to {args.out}/ (adapter_config.json, adapter_model.safetensors)")
    return 0 if losses[-1] < losses[0] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ia3fx", description="(IA)³ adapters by graph rewriting")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="show which call sites a config would scale, as a table")
    p.add_argument("model", help=f"preset ({', '.join(PRESETS)}), transformers directory, or config .json")
    _add_adapter_flags(p)
    p.set_defaults(func=cmd_plan)
    d = sub.add_parser("demo", help="train (IA)³ vectors on a built-in tiny model and save the adapter")
    d.add_argument("--preset", default=DEFAULT_PRESET, choices=PRESETS)
    d.add_argument("--steps", type=int, default=40)
    d.add_argument("--lr", type=float, default=0.05)
    d.add_argument("--out", default="ia3fx-demo-out", help="directory for the adapter files")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*token_id.*")
            return args.func(args)
    except (ValueError, OSError, RuntimeError, KeyError) as e:
        print(f"ia3fx {args.command}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
