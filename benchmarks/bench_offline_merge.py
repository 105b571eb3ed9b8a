"""``ia3fx merge`` end to end vs ``cp -r`` vs PEFT (load + merge_and_unload + save_pretrained).

Builds synthetic sharded Llama checkpoints, fp32 and bf16 (random weights, written shard by shard
with a streaming safetensors writer, so building one needs one tensor of memory), and a random IA3
adapter with PEFT's default Llama targets (k_proj, v_proj, down_proj: 3 of the 7 linear layers of
each block), then runs, for several rounds, in an order that alternates and reverses each round,
each command as one shell line whose time counts until the data is on disk:

* ``cp -r BASE OUT && sync``                               (the floor: the same bytes, in the kernel)
* ``ia3fx merge --base BASE --adapter ADAPTER --out OUT && sync``   (the console script: process
  start and imports included)
* ``python -c '<PEFT: from_pretrained + PeftModel.from_pretrained + merge_and_unload + save_pretrained>' && sync``

Each runs under ``/usr/bin/time -v`` (peak RSS of the largest process; wall time measured here),
page cache warm (every input is read once before the first round). Ratios are medians of the
per-round ratios against ``cp -r`` of the same round, reported with their quartiles, each round's
ratio and the 1-minute load average as each round starts (the machine may be shared). The first round also checks that the
offline output equals PEFT's, tensor for tensor.

    python benchmarks/bench_offline_merge.py --rounds 5   # ~1.25 GB fp32 and ~0.63 GB bf16 checkpoints
    python benchmarks/bench_offline_merge.py --quick      # ~220 MB checkpoints, 2 rounds

Results: a table on stdout and ``benchmarks/results/offline_merge.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "offline_merge.json")

FULL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4, num_attention_heads=16,
            num_key_value_heads=4, vocab_size=32000)
QUICK = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=16000)
BUDGET_MB = 300  # allowed peak RSS above the largest tensor


# --- synthetic checkpoint ------------------------------------------------------------------------
def write_checkpoint(base: str, dims: dict, dtype_name: str, shard_bytes: int, seed: int = 0) -> dict:
    """A Llama checkpoint with random weights, shard by shard; returns sizes."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    st_dtype = {"fp32": "F32", "bf16": "BF16"}[dtype_name]
    config = LlamaConfig(**dims, max_position_embeddings=4096, tie_word_embeddings=False,
                         dtype={"fp32": "float32", "bf16": "bfloat16"}[dtype_name])
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    entries = [(k, tuple(v.shape)) for k, v in meta.state_dict().items()]
    item = torch.empty((), dtype=dtype).element_size()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in entries:
        n = item
        for d in shape:
            n *= d
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    os.makedirs(base)
    g = torch.Generator().manual_seed(seed)
    weight_map, total, largest = {}, 0, 0
    for i, group in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in group:
            n = item
            for d in shape:
                n *= d
            header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = fname
            largest = max(largest, n)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(base, fname), "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name, shape in group:
                t = torch.ones(shape, dtype=dtype) if name.endswith("norm.weight") else (
                    torch.randn(shape, generator=g).mul_(0.02).to(dtype))
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                del t
        total += offset
    with open(os.path.join(base, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    config.save_pretrained(base)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(base)
    with open(os.path.join(base, "tokenizer.json"), "w") as f:
        json.dump({"version": "1.0", "model": {"type": "BPE", "vocab": {f"t{i}": i for i in range(2000)}}}, f)
    return {"total_bytes": total, "largest_tensor_bytes": largest, "shards": len(shards), "tensors": len(entries)}


def write_adapter(adapter: str, base: str, seed: int = 1) -> int:
    """PEFT's default Llama IA3 adapter (k_proj, v_proj, down_proj), vectors ~ N(1, 0.1)."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    from ia3fx import IA3Config
    from ia3fx.io import save_adapter_files
    from ia3fx.targeting import select_targets

    with torch.device("meta"):
        meta = LlamaForCausalLM(AutoConfig.from_pretrained(base))
    config = IA3Config()
    selection = select_targets(config, [], model=meta)
    g = torch.Generator().manual_seed(seed)
    tensors = {
        f"base_model.model.{name}.ia3_l": 1.0 + 0.1 * torch.randn(t.peft_shape, generator=g)
        for name, t in selection.targets.items()
    }
    saved = selection.config.copy()
    saved.inference_mode = True
    save_adapter_files(adapter, saved, tensors)
    return len(tensors)


# --- commands --------------------------------------------------------------------------------------
PEFT_CODE = """
import sys, warnings
warnings.simplefilter("ignore")
import peft, torch
from transformers import AutoModelForCausalLM
base, adapter, out = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
with torch.no_grad():
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
merged.save_pretrained(out)
"""


def ia3fx_command() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m ia3fx``."""
    script = os.path.join(os.path.dirname(sys.executable), "ia3fx")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "ia3fx"]


def commands(base: str, adapter: str, with_peft: bool) -> dict:
    """Method name -> (output directory -> shell line ending in ``&& sync``)."""
    q = shlex.quote
    ia3 = " ".join(q(c) for c in ia3fx_command())
    out = {
        "cp -r": lambda o: f"cp -r {q(base)} {q(o)} && sync",
        "ia3fx merge": lambda o: f"{ia3} merge --base {q(base)} --adapter {q(adapter)} --out {q(o)} && sync",
    }
    if with_peft:
        out["peft merge_and_unload"] = (
            lambda o: f"{q(sys.executable)} -c {q(PEFT_CODE)} {q(base)} {q(adapter)} {q(o)} && sync")
    return out


def timed(line: str) -> dict:
    """Run ``line`` in sh under /usr/bin/time -v: wall seconds (measured here), peak RSS in MB."""
    have_time = os.path.exists("/usr/bin/time")
    full = (["/usr/bin/time", "-v"] if have_time else []) + ["sh", "-c", line]
    t0 = time.perf_counter()
    proc = subprocess.run(full, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{line} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return {"wall_s": wall, "peak_rss_mb": int(m.group(1)) / 1024 if m else None}


def warm(directory: str) -> None:
    """Read every file once, so that every method starts from a warm page cache."""
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                while f.read(64 << 20):
                    pass


def compare_outputs(a: str, b: str) -> tuple[int, int]:
    """(tensors compared, tensors that differ) between two checkpoint directories, one tensor at a time."""
    import torch
    from safetensors import safe_open

    def where(d):
        loc = {}
        for f in sorted(os.listdir(d)):
            if f.endswith(".safetensors"):
                with safe_open(os.path.join(d, f), "pt") as h:
                    for k in h.keys():
                        loc[k] = os.path.join(d, f)
        return loc

    la, lb = where(a), where(b)
    if set(la) != set(lb):
        raise AssertionError(f"different tensor names: {sorted(set(la) ^ set(lb))[:5]}")
    bad = 0
    for k in sorted(la):
        with safe_open(la[k], "pt") as ha, safe_open(lb[k], "pt") as hb:
            bad += not torch.equal(ha.get_tensor(k), hb.get_tensor(k))
    return len(la), bad


def quartiles(values: list[float]) -> list[float]:
    """First quartile, median, third quartile (``statistics.quantiles``' inclusive method)."""
    if len(values) < 2:
        return [values[0]] * 3 if values else []
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return [q1, q2, q3]


# --- driver --------------------------------------------------------------------------------------
def bench_dtype(work: str, dims: dict, dtype: str, rounds: int, with_peft: bool, shard_bytes: int) -> dict:
    base, adapter = os.path.join(work, f"base-{dtype}"), os.path.join(work, f"adapter-{dtype}")
    for d in (base, adapter):
        if os.path.isdir(d):
            shutil.rmtree(d)
    t0 = time.perf_counter()
    info = write_checkpoint(base, dims, dtype, shard_bytes=shard_bytes)
    n_vectors = write_adapter(adapter, base)
    largest_mb = info["largest_tensor_bytes"] / 2**20
    print(f"\n{dtype}: {info['total_bytes'] / 2**30:.2f} GiB, {info['shards']} shards, {info['tensors']} tensors, "
          f"largest {largest_mb:.0f} MiB; adapter: {n_vectors} vectors (built in {time.perf_counter() - t0:.1f} s)",
          flush=True)
    methods = commands(base, adapter, with_peft)
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    order = list(methods)
    identical = None
    loads: list[float] = []  # the 1-minute load average as each round starts (the machine is shared)
    warm(base), warm(adapter)
    for r in range(rounds):
        loads.append(os.getloadavg()[0])
        seq = order if r % 2 == 0 else order[::-1]
        for name in seq:
            out = os.path.join(work, "out-" + re.sub(r"\W+", "-", name))
            if os.path.exists(out):
                shutil.rmtree(out)
            res = timed(methods[name](out))
            runs[name].append(res)
            print(f"  round {r + 1} {name:22s} wall {res['wall_s']:7.2f} s"
                  + (f"  peak RSS {res['peak_rss_mb']:7.0f} MB" if res.get("peak_rss_mb") else ""), flush=True)
        if r == 0 and with_peft:
            n, bad = compare_outputs(os.path.join(work, "out-ia3fx-merge"), os.path.join(work, "out-peft-merge_and_unload"))
            identical = {"tensors": n, "different": bad}
            print(f"  ia3fx merge vs PEFT output: {n} tensors, {bad} different", flush=True)
        for name in methods:
            out = os.path.join(work, "out-" + re.sub(r"\W+", "-", name))
            if os.path.exists(out):
                shutil.rmtree(out)
    shutil.rmtree(base), shutil.rmtree(adapter)

    def per_round(a: str, b: str) -> list[float]:
        return [x["wall_s"] / y["wall_s"] for x, y in zip(runs[a], runs[b], strict=True)]

    def ratio(a: str, b: str) -> float:
        return statistics.median(per_round(a, b))

    summary = {name: {"wall_s_median": statistics.median(x["wall_s"] for x in runs[name]),
                      "peak_rss_mb_median": statistics.median(x["peak_rss_mb"] or 0 for x in runs[name])}
               for name in methods}
    summary["ia3fx_vs_cp"] = ratio("ia3fx merge", "cp -r")
    summary["ia3fx_vs_cp_per_round"] = per_round("ia3fx merge", "cp -r")
    summary["ia3fx_vs_cp_quartiles"] = quartiles(summary["ia3fx_vs_cp_per_round"])
    summary["loadavg_1min_per_round"] = loads
    if with_peft:
        summary["peft_vs_cp"] = ratio("peft merge_and_unload", "cp -r")
        summary["peft_vs_ia3fx"] = ratio("peft merge_and_unload", "ia3fx merge")
    peak = summary["ia3fx merge"]["peak_rss_mb_median"]
    summary.update({"largest_tensor_mb": largest_mb, "budget_mb": largest_mb + BUDGET_MB,
                    "within_budget": bool(peak and peak <= largest_mb + BUDGET_MB)})
    return {"checkpoint": {**info, "dims": dims, "dtype": dtype, "adapter_vectors": n_vectors},
            "runs": runs, "summary": summary, "ia3fx_equals_peft": identical}


def report(dtype: str, res: dict, rounds: int) -> None:
    s = res["summary"]
    print(f"\n{dtype}: {'method':22s} {'wall s':>8s} {'peak RSS MB':>12s}   (medians of {rounds} rounds)")
    for name in res["runs"]:
        print(f"{'':{len(dtype) + 2}s}{name:22s} {s[name]['wall_s_median']:8.2f} {s[name]['peak_rss_mb_median']:12.0f}")
    q1, _, q3 = s["ia3fx_vs_cp_quartiles"]
    print(f"  ia3fx merge / cp -r:           {s['ia3fx_vs_cp']:.2f}x   (quartiles {q1:.2f}-{q3:.2f}; target <= 1.5x; "
          "both until synced)")
    print(f"  per round: {', '.join(f'{x:.2f}' for x in s['ia3fx_vs_cp_per_round'])}; load average (1 min) at "
          f"each round's start: {', '.join(f'{x:.1f}' for x in s['loadavg_1min_per_round'])}")
    if "peft_vs_ia3fx" in s:
        print(f"  PEFT / ia3fx merge:            {s['peft_vs_ia3fx']:.2f}x   (PEFT / cp -r: {s['peft_vs_cp']:.2f}x)")
    peak = s["ia3fx merge"]["peak_rss_mb_median"]
    print(f"  ia3fx merge peak RSS {peak:.0f} MB; budget largest tensor {s['largest_tensor_mb']:.0f} MB + "
          f"{BUDGET_MB} MB = {s['budget_mb']:.0f} MB: {'OK' if s['within_budget'] else 'OVER'}")
    if res["ia3fx_equals_peft"]:
        print(f"  output vs PEFT: {res['ia3fx_equals_peft']['tensors']} tensors, "
              f"{res['ia3fx_equals_peft']['different']} different")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~220 MB checkpoints, 2 rounds")
    parser.add_argument("--rounds", type=int, help="rounds (default 5, quick 2)")
    parser.add_argument("--dtype", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--workdir", help="where to build (default: a temporary directory, removed after)")
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT baseline")
    parser.add_argument("--out", default=RESULTS, help="JSON results file")
    args = parser.parse_args()

    load_at_start = os.getloadavg()
    dims = QUICK if args.quick else FULL
    rounds = args.rounds or (2 if args.quick else 5)
    work = args.workdir or tempfile.mkdtemp(prefix="ia3fx-bench-")
    os.makedirs(work, exist_ok=True)
    results = {}
    try:
        for dtype in args.dtype:
            results[dtype] = bench_dtype(work, dims, dtype, rounds, not args.no_peft,
                                         (100 if args.quick else 400) << 20)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    for dtype, res in results.items():
        report(dtype, res, rounds)
    result = {
        "command": "python benchmarks/bench_offline_merge.py" + (" --quick" if args.quick else "")
                   + (f" --rounds {args.rounds}" if args.rounds else "")
                   + (f" --dtype {' '.join(args.dtype)}" if args.dtype != ["fp32", "bf16"] else "")
                   + (" --no-peft" if args.no_peft else ""),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "loadavg_at_start": load_at_start, "loadavg_at_end": os.getloadavg()},
        "rounds": rounds,
        "results": results,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwritten {os.path.relpath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
