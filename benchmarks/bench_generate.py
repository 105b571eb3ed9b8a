"""Figure (g): greedy ``generate`` decode speed of an ia3fx-adapted model vs the base model and PEFT's IA3.

The Llama-shaped model of figures (a) and (b) (4 layers, hidden 512, intermediate 1376, 8 heads,
vocab 1000, random fp32 weights, CPU, eval) generates greedily from a batch of 1 x 16 prompt
tokens, exactly 64 new tokens (``max_new_tokens = min_new_tokens = 64``, so every call decodes the
same number of tokens) **with the KV cache** (``use_cache=True``: ``llama_config`` turns the cache
off for the forward figures). Contenders, each called as users call it:

* ``base``: ``LlamaForCausalLM.generate`` of the plain model;
* ``peft``: ``PeftModelForCausalLM.generate`` (``peft.get_peft_model(copy, IA3Config(task_type=
  "CAUSAL_LM"))``), default IA3 targets (``k_proj``, ``v_proj``, ``down_proj``);
* ``ia3fx``: ``IA3Model.generate`` (``ia3fx.get_ia3_model(model, IA3Config(task_type="CAUSAL_LM"))``),
  the same targets. With a cache the decoder layers run their own forward and the adapted layers
  are scaled by forward hooks (PEFT's arithmetic), so this measures the hooks' and the block
  runner's per-step overhead.

Both adapters get the same random vectors (PEFT's state dict loaded into ia3fx), and the script
checks before timing that ia3fx generates PEFT's tokens, and that they differ from the base
model's. The figure is decode throughput, new tokens per second of one ``generate`` call (prompt
prefill included): ``ia3fx / base`` and ``ia3fx / peft`` are ratios of tokens/s, so **> 1 means
ia3fx is faster** (with equal token counts, the inverse ratio of the times). No target is set.

    python benchmarks/bench_generate.py            # 15 rounds, best of 3 calls, results/generate.json
    python benchmarks/bench_generate.py --quick    # 2 layers, hidden 256, 32 new tokens, 3 rounds
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys

import torch
from _common import alternate, command, llama_config, machine, ratio, table, time_rows, write_json

import ia3fx

CONTENDERS = ("base", "peft", "ia3fx")
PAIRS = [("ia3fx", "base"), ("ia3fx", "peft"), ("peft", "base")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="2 layers, hidden 256, 1 x 16 prompt, 32 new tokens, 3 rounds"
    )
    p.add_argument("--rounds", type=int, default=None, help="default 15 (3 with --quick)")
    p.add_argument("--reps", type=int, default=3, help="calls per contender per round; the best counts")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens per row")
    p.add_argument("--new-tokens", type=int, default=64, help="max_new_tokens = min_new_tokens")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 0 keeps torch's default")
    p.add_argument("--name", default="generate", help="results/<name>.json")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.intermediate, args.new_tokens = 2, 256, 688, 32
        args.rounds, args.reps = args.rounds or 3, 2
        if args.name == "generate":
            args.name = "generate_quick"
    args.rounds = args.rounds or 15
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def build(args: argparse.Namespace) -> tuple[dict[str, torch.nn.Module], dict[str, torch.Tensor]]:
    import peft
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = llama_config(args.layers, args.hidden, args.intermediate, args.heads, args.vocab)
    base = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, args.vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(task_type="CAUSAL_LM")).eval()
    adapted = ia3fx.get_ia3_model(copy.deepcopy(base), ia3fx.IA3Config(task_type="CAUSAL_LM")).eval()
    with torch.no_grad():  # the same random vectors on both sides (as bench_forward.py)
        gen = torch.Generator().manual_seed(2)
        for name, p in peft_model.named_parameters():
            if "ia3_l" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    adapted.load_adapter_state_dict(peft.get_peft_model_state_dict(peft_model))
    return {"base": base, "peft": peft_model, "ia3fx": adapted}, inputs


def generate_kwargs(args: argparse.Namespace) -> dict[str, object]:
    return dict(
        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, num_beams=1,
        use_cache=True, pad_token_id=0,
    )


def check(models: dict, inputs: dict, kwargs: dict, args: argparse.Namespace) -> dict[str, object]:
    """ia3fx generates PEFT's tokens (not the base model's), all of them, through the cache path."""
    adapted = models["ia3fx"]
    before = {name: runs["eager"] for name, runs in adapted.block_runs().items()}
    with torch.no_grad():
        out = {name: m.generate(**inputs, **kwargs) for name, m in models.items()}
    expected = (args.batch, args.prompt + args.new_tokens)
    for name, tokens in out.items():
        if tuple(tokens.shape) != expected:
            raise AssertionError(f"{name} generated {tuple(tokens.shape)}, expected {expected}")
    if not torch.equal(out["ia3fx"], out["peft"]):
        raise AssertionError("ia3fx and PEFT generate different tokens with the same vectors")
    runs = adapted.block_runs()
    if any(runs[n]["eager"] != before[n] + args.new_tokens for n in runs):  # prefill + new - 1 steps
        raise AssertionError(f"ia3fx's blocks did not all run the cache (hook) path: {runs}")
    new = out["ia3fx"][:, args.prompt:]
    differ = int((new != out["base"][:, args.prompt:]).sum())
    return {"new_tokens_differing_from_base": differ, "of": new.numel()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine()
    models, inputs = build(args)
    kwargs = generate_kwargs(args)
    checked = check(models, inputs, kwargs, args)
    calls = {name: (lambda m=models[name]: m.generate(**inputs, **kwargs)) for name in CONTENDERS}
    with torch.no_grad():
        for fn in calls.values():  # warm-up
            fn()
            fn()
        wall, cpu = alternate(calls, args.rounds, args.reps)

    new_tokens = args.batch * args.new_tokens
    tps = {
        clock: {name: [new_tokens / t for t in times[name]] for name in CONTENDERS}
        for clock, times in (("cpu", cpu), ("wall", wall))
    }
    ratios = [ratio(tps[clock], num, den, clock) for num, den in PAIRS for clock in ("cpu", "wall")]
    for r in ratios:
        r["ratio"] = f"tokens/s {r['ratio']}"

    model = (
        f"LlamaForCausalLM {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
        f"{args.heads} heads, vocab {args.vocab}, fp32, CPU, eval; greedy generate, batch {args.batch} x "
        f"prompt {args.prompt}, {args.new_tokens} new tokens (min = max), use_cache=True"
    )
    print(model)
    print(table(time_rows(wall, cpu)))
    rows = [("contender", "tokens/s cpu (median)", "tokens/s wall (median)")]
    for name in CONTENDERS:
        cpu_tps, wall_tps = statistics.median(tps["cpu"][name]), statistics.median(tps["wall"][name])
        rows.append((name, f"{cpu_tps:.1f}", f"{wall_tps:.1f}"))
    print(table(rows))
    for r in ratios:
        name = f"{r['ratio']} ({r['clock']})"
        faster = str(r["ratio"]).split()[1]
        spread = f"(q1 {r['q1']:.3f}, q3 {r['q3']:.3f})"
        print(f"{name:<34} median {r['median']:.3f}  {spread}   > 1: {faster} faster")
    print(
        f"ia3fx generates PEFT's tokens; {checked['new_tokens_differing_from_base']} of {checked['of']} "
        "new tokens differ from the base model's"
    )
    path = write_json(
        args.name,
        {
            "figure": "greedy generate decode throughput (KV cache), adapted vs base and vs PEFT IA3",
            "command": command(),
            "model": model,
            "method": f"{args.rounds} rounds; within a round the contenders take turns call by call, the "
            f"order reversing every turn, best of {args.reps} calls each; a call is one generate; "
            "tokens/s = new tokens / seconds of the call; ratios are medians of per-round tokens/s "
            "ratios (> 1: the numerator is faster), on CPU time (primary, 1 intra-op thread) and wall clock",
            "threads": torch.get_num_threads(),
            "targets": {},
            "ratios": ratios,
            "tokens_per_second_median": {
                clock: {n: round(statistics.median(v), 2) for n, v in per.items()}
                for clock, per in tps.items()
            },
            "seconds_wall": {k: [round(t, 5) for t in v] for k, v in wall.items()},
            "seconds_cpu": {k: [round(t, 5) for t in v] for k, v in cpu.items()},
            "generate_kwargs": kwargs,
            "check": {"ia3fx_tokens_equal_peft": True, **checked},
            "machine": info,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
