"""Greedy decoding: the adapted model's generate and the exported programs, in tokens per second.

A Llama-shaped model (4 layers, hidden 512, intermediate 1376, 8 heads, vocab 1000, random
weights, fp32, CPU, KV cache on) with PEFT's default Llama targets and the same random vectors on
every adapted side (PEFT's state dict loaded into ia3fx). One prompt of 16 tokens, batch 1,
exactly 64 new tokens (no eos token: ``eos_token_id=None`` everywhere), greedy. Contenders:

* ``base generate``: the eager transformers model's ``generate`` (no adapter);
* ``peft generate``: ``peft.get_peft_model(copy, IA3Config()).generate``;
* ``ia3fx generate``: ``IA3Model.generate`` (the blocks run their own forward with scale hooks);
* ``onnx unmerged`` / ``onnx merged``: ``ia3fx.export(..., format="onnx", for_generation=True)``
  run by ``ia3fx.decode.greedy_onnx`` on one onnxruntime CPU session (intra-op threads = torch's);
  the whole prompt in the first call, then one token per call with past key values;
* ``pt2 merged``: ``ia3fx.export(..., format="pt2", for_generation=True)`` (static cache of
  prompt + new = 80 positions), loaded with ``torch.export.load``, its ``.module()`` built once,
  run by ``ia3fx.decode.greedy_pt2``: one token per call, the prompt too (16 calls).

Before timing the script checks the tokens: PEFT's, ia3fx's, the unmerged ONNX program's and
every other adapted contender's must be the same sequence, and the base model's must differ (the
adapter changes the output). The merged programs compute with folded weights, which round
differently (about 1e-5); should a near-tie flip a token the script says so and still times them.

Method: ``_common.alternate`` (contenders take turns call by call, the order reversing at every
turn; a round keeps each one's best of ``reps`` calls; figures are medians of per-round ratios),
on this process's CPU time with one torch thread (primary) and on wall clock beside it. Ratios
are of times (lower is faster): every contender against ``base generate`` and against
``peft generate``, and merged ONNX against unmerged; tokens/s are 64 / the median time.

    python benchmarks/bench_export_generation.py            # 11 rounds, results/export_generation.json
    python benchmarks/bench_export_generation.py --quick    # 2 layers, hidden 256, 16 new tokens, 3 rounds
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
from _common import (
    alternate,
    command,
    llama_config,
    machine,
    randomize_peft_vectors,
    ratio_lines,
    ratios_both,
    table,
    write_json,
)

import ia3fx
from ia3fx.decode import greedy_onnx, greedy_pt2

BASE, PEFT = "base generate", "peft generate"
MUST_MATCH = ("ia3fx generate", "onnx unmerged")  # the same arithmetic as PEFT's; merged ones fold weights


def build(args: argparse.Namespace):
    import peft
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = llama_config(args.layers, args.hidden, args.intermediate, args.heads, args.vocab)
    cfg.use_cache = True  # llama_config turns the cache off (forward benchmarks); generation wants it
    base = LlamaForCausalLM(cfg).eval()
    base.generation_config.use_cache = True
    base.generation_config.eos_token_id = None  # every contender produces exactly args.new tokens
    base.generation_config.pad_token_id = 0
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config()).eval()
    randomize_peft_vectors(peft_model)
    adapted = ia3fx.get_ia3_model(copy.deepcopy(base), ia3fx.IA3Config())
    adapted.load_adapter_state_dict(peft.get_peft_model_state_dict(peft_model))
    return base, peft_model, adapted


def export_all(adapted, args: argparse.Namespace, directory: str) -> tuple[dict[str, str], dict[str, float]]:
    paths = {
        "onnx unmerged": os.path.join(directory, "unmerged.onnx"),
        "onnx merged": os.path.join(directory, "merged.onnx"),
        "pt2 merged": os.path.join(directory, "merged.pt2"),
    }
    took = {}
    for name, path in paths.items():
        fmt = "onnx" if path.endswith(".onnx") else "pt2"
        extra = {"max_cache_len": args.prompt + args.new} if fmt == "pt2" else {}
        t0 = time.perf_counter()
        ia3fx.export(adapted, path, format=fmt, for_generation=True, merged="unmerged" not in name, **extra)
        took[name] = round(time.perf_counter() - t0, 2)
        print(f"  exported {name} in {took[name]:.1f} s ({os.path.getsize(path) / 1e6:.1f} MB)", file=sys.stderr)
    return paths, took


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 layers, hidden 256, 16 new tokens, 3 rounds")
    p.add_argument("--rounds", type=int)
    p.add_argument("--reps", type=int, default=2, help="decodes per contender per round; the best counts")
    p.add_argument("--threads", type=int, default=1, help="torch (and onnxruntime) intra-op threads (default 1)")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    p.add_argument("--new", type=int, default=64, help="new tokens")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.layers, args.hidden, args.intermediate, args.heads, args.vocab = 4, 512, 1376, 8, 1000
    if args.quick:
        args.layers, args.hidden, args.intermediate, args.new = 2, 256, 688, 16
    rounds = args.rounds or (3 if args.quick else 11)
    warnings.filterwarnings("ignore")  # onnx exporter and transformers notices
    info = machine()

    import onnxruntime as ort

    print(f"building: Llama {args.layers} layers, hidden {args.hidden}", file=sys.stderr)
    base, peft_model, adapted = build(args)
    prompt = torch.randint(0, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory(prefix="ia3fx-bench-gen-") as directory:
        paths, export_seconds = export_all(adapted, args, directory)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        sessions = {name: ort.InferenceSession(paths[name], options, providers=["CPUExecutionProvider"])
                    for name in ("onnx unmerged", "onnx merged")}
        step = torch.export.load(paths["pt2 merged"]).module()  # once: its buffers are the cache

    kw = dict(max_new_tokens=args.new, do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=True)
    mask = torch.ones_like(prompt)
    contenders = {
        BASE: lambda: base.generate(input_ids=prompt, attention_mask=mask, **kw),
        PEFT: lambda: peft_model.generate(input_ids=prompt, attention_mask=mask, **kw),
        "ia3fx generate": lambda: adapted.generate(input_ids=prompt, attention_mask=mask, **kw),
        "onnx unmerged": lambda: greedy_onnx(sessions["onnx unmerged"], prompt, args.new),
        "onnx merged": lambda: greedy_onnx(sessions["onnx merged"], prompt, args.new),
        "pt2 merged": lambda: greedy_pt2(step, prompt, args.new),
    }

    # --- the tokens, before any timing ----------------------------------------------------------
    with torch.no_grad():
        tokens = {name: fn() for name, fn in contenders.items()}
    want = tokens[PEFT]
    if want.shape[1] != args.prompt + args.new:
        raise AssertionError(f"PEFT produced {want.shape[1] - args.prompt} new tokens, not {args.new}")
    checks: dict[str, object] = {}
    for name, got in tokens.items():
        if name in (BASE, PEFT):
            continue
        same = got.shape == want.shape and torch.equal(got, want)
        differ = int((got != want).sum()) if got.shape == want.shape else "length differs"
        checks[f"{name} tokens == peft generate"] = same if same else f"NO ({differ} positions differ)"
        if not same and name in MUST_MATCH:
            raise AssertionError(f"{name} generated other tokens than PEFT: {got.tolist()} vs {want.tolist()}")
        if not same:
            print(f"note: {name} differs from PEFT at {differ} positions (folded weights round differently)")
    if torch.equal(tokens[BASE], want):
        raise AssertionError("the base model generates the adapter's tokens: the vectors change nothing")
    checks["base generate tokens != peft generate"] = True

    with torch.no_grad():
        for fn in contenders.values():  # warm-up
            fn()
        print("decode:", file=sys.stderr)
        wall, cpu = alternate(contenders, rounds, args.reps)

    pairs = [(name, BASE) for name in contenders if name != BASE]
    pairs += [(name, PEFT) for name in contenders if name not in (BASE, PEFT)]
    pairs += [("onnx merged", "onnx unmerged")]  # what folding the vectors saves
    ratios = ratios_both(wall, cpu, pairs)
    rows = [("contender", "cpu ms (median)", "tokens/s (cpu)", "wall ms (median)", "tokens/s (wall)")]
    per_second = {}
    for name in contenders:
        c, w = statistics.median(cpu[name]), statistics.median(wall[name])
        per_second[name] = {"cpu": round(args.new / c, 1), "wall": round(args.new / w, 1)}
        rows.append((name, f"{c * 1e3:.1f}", f"{args.new / c:.0f}", f"{w * 1e3:.1f}", f"{args.new / w:.0f}"))
    model = (
        f"LlamaForCausalLM {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
        f"{args.heads} heads, vocab {args.vocab}, fp32, CPU; batch 1, prompt {args.prompt} tokens, "
        f"{args.new} new tokens (greedy, no eos); PEFT's default Llama targets (k_proj, v_proj, down_proj), "
        "random vectors"
    )
    print(model)
    print(table(rows))
    print()
    print(ratio_lines(ratios, {}))
    for name, verdict in checks.items():
        print(f"check: {name}: {verdict}")
    path = write_json(
        "export_generation_quick" if args.quick else "export_generation",
        {
            "figure": "greedy decode time per sequence (and tokens/s): generate (base, PEFT, ia3fx) and the "
            "programs exported for generation (ONNX past key values in onnxruntime, pt2 static cache)",
            "command": command(),
            "model": model,
            "method": (
                f"{rounds} rounds; within a round the contenders take turns call by call, the order reversing "
                f"every turn, best of {args.reps} decodes each; {args.threads} torch / onnxruntime intra-op "
                "thread(s); ratios are medians of per-round time ratios (lower is faster), on CPU time "
                "(primary) and wall clock; tokens/s = new tokens / median time"
            ),
            "contenders": {
                BASE: "LlamaForCausalLM.generate, no adapter",
                PEFT: "peft.get_peft_model(...).generate",
                "ia3fx generate": "IA3Model.generate",
                "onnx unmerged": "ia3fx.export(format='onnx', for_generation=True, merged=False) + ia3fx.decode.greedy_onnx",
                "onnx merged": "ia3fx.export(format='onnx', for_generation=True, merged=True) + ia3fx.decode.greedy_onnx",
                "pt2 merged": f"ia3fx.export(format='pt2', for_generation=True, max_cache_len={args.prompt + args.new}) "
                "+ ia3fx.decode.greedy_pt2 on one .module()",
            },
            "export_seconds": export_seconds,
            "checks": checks,
            "tokens_per_second": per_second,
            "ratios": ratios,
            "seconds_wall": {k: [round(t, 5) for t in v] for k, v in wall.items()},
            "seconds_cpu": {k: [round(t, 5) for t in v] for k, v in cpu.items()},
            "machine": info,
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
