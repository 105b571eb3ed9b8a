"""Offline checkpoint merge vs ``cp -r`` vs PEFT (load + merge_and_unload + save_pretrained).

Builds a synthetic sharded Llama checkpoint (random weights, written shard by shard with a
streaming safetensors writer, so building it needs one tensor of memory) and a random IA3 adapter
with PEFT's default Llama targets, then runs, for several rounds, in an order that alternates and
reverses each round:

* ``cp -r BASE OUT``                                    (the floor: same bytes, in the kernel)
* ``ia3fx.offline.merge_checkpoint(BASE, ADAPTER, OUT)`` (in a fresh interpreter)
* PEFT: ``AutoModelForCausalLM.from_pretrained`` + ``PeftModel.from_pretrained`` +
  ``merge_and_unload()`` + ``save_pretrained``            (in a fresh interpreter)

Each runs as a subprocess under ``/usr/bin/time -v`` (peak RSS; wall time from this process).
The ia3fx and PEFT runners also report their time after imports. Ratios are medians of per-round
ratios. The first round also checks that the offline output equals PEFT's, tensor for tensor.

    python benchmarks/bench_offline_merge.py            # ~1.25 GB fp32 checkpoint, 3 rounds
    python benchmarks/bench_offline_merge.py --quick    # ~220 MB, 2 rounds, < 2 min

Results: a table on stdout and ``benchmarks/results/offline_merge.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
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


# --- runners (fresh interpreters) -----------------------------------------------------------------
def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_offline(base: str, adapter: str, out: str) -> dict:
    t0 = time.perf_counter()
    import transformers  # noqa: F401  (the merge imports the modeling code; count it as import)
    from transformers import LlamaForCausalLM  # noqa: F401

    from ia3fx.offline import merge_checkpoint

    t1 = time.perf_counter()
    rss_after_imports = _rss_mb()
    report = merge_checkpoint(base, adapter, out, progress=False)
    t2 = time.perf_counter()
    return {"import_s": t1 - t0, "work_s": t2 - t1, "rss_after_imports_mb": rss_after_imports,
            "tensors_merged": report.tensors_merged, "bytes_written": report.bytes_written}


def run_peft(base: str, adapter: str, out: str) -> dict:
    t0 = time.perf_counter()
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    t1 = time.perf_counter()
    rss_after_imports = _rss_mb()
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    with torch.no_grad():
        merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out)
    t2 = time.perf_counter()
    return {"import_s": t1 - t0, "work_s": t2 - t1, "rss_after_imports_mb": rss_after_imports}


def timed(cmd: list[str]) -> dict:
    """Run under /usr/bin/time -v: wall seconds (measured here), peak RSS (MB), the runner's JSON."""
    have_time = os.path.exists("/usr/bin/time")
    full = (["/usr/bin/time", "-v"] if have_time else []) + cmd
    t0 = time.perf_counter()
    proc = subprocess.run(full, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = {"wall_s": wall}
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    out["peak_rss_mb"] = int(m.group(1)) / 1024 if m else None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if lines:
        out.update(json.loads(lines[-1]))
    return out


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


# --- driver --------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~220 MB checkpoint, 2 rounds (< 2 min)")
    parser.add_argument("--rounds", type=int, help="rounds (default 3, quick 2)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--workdir", help="where to build (default: a temporary directory, removed after)")
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT baseline")
    parser.add_argument("--out", default=RESULTS, help="JSON results file")
    parser.add_argument("--_run", choices=["offline", "peft"], help=argparse.SUPPRESS)
    parser.add_argument("--_args", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._run:
        import warnings

        warnings.simplefilter("ignore")
        fn = run_offline if args._run == "offline" else run_peft
        print(json.dumps(fn(*args._args)))
        return 0

    dims = QUICK if args.quick else FULL
    rounds = args.rounds or (2 if args.quick else 3)
    work = args.workdir or tempfile.mkdtemp(prefix="ia3fx-bench-")
    os.makedirs(work, exist_ok=True)
    base, adapter = os.path.join(work, "base"), os.path.join(work, "adapter")
    try:
        t0 = time.perf_counter()
        if os.path.isdir(base):
            shutil.rmtree(base)
        if os.path.isdir(adapter):
            shutil.rmtree(adapter)
        info = write_checkpoint(base, dims, args.dtype, shard_bytes=(100 if args.quick else 400) << 20)
        n_vectors = write_adapter(adapter, base)
        build_s = time.perf_counter() - t0
        largest_mb = info["largest_tensor_bytes"] / 2**20
        print(f"checkpoint: {info['total_bytes'] / 2**30:.2f} GiB {args.dtype}, {info['shards']} shards, "
              f"{info['tensors']} tensors, largest {largest_mb:.0f} MiB; adapter: {n_vectors} vectors "
              f"(built in {build_s:.1f} s, in {work})", flush=True)
        me = [sys.executable, os.path.abspath(__file__)]
        methods = {
            "cp -r": lambda out: ["cp", "-r", base, out],
            "ia3fx offline": lambda out: me + ["--_run", "offline", "--_args", base, adapter, out],
        }
        if not args.no_peft:
            methods["peft merge_and_unload"] = lambda out: me + ["--_run", "peft", "--_args", base, adapter, out]
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        order = list(methods)
        identical = None
        for r in range(rounds):
            seq = order if r % 2 == 0 else order[::-1]
            for name in seq:
                out = os.path.join(work, "out-" + re.sub(r"\W+", "-", name))
                if os.path.exists(out):
                    shutil.rmtree(out)
                res = timed(methods[name](out))
                runs[name].append(res)
                print(f"round {r + 1} {name:22s} wall {res['wall_s']:7.2f} s"
                      + (f"  work {res['work_s']:7.2f} s" if "work_s" in res else "")
                      + (f"  peak RSS {res['peak_rss_mb']:7.0f} MB" if res.get("peak_rss_mb") else ""), flush=True)
            if r == 0 and not args.no_peft:
                n, bad = compare_outputs(os.path.join(work, "out-ia3fx-offline"),
                                         os.path.join(work, "out-peft-merge_and_unload"))
                identical = {"tensors": n, "different": bad}
                print(f"offline vs PEFT output: {n} tensors, {bad} different", flush=True)
            for name in methods:
                out = os.path.join(work, "out-" + re.sub(r"\W+", "-", name))
                if os.path.exists(out):
                    shutil.rmtree(out)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    def med(name, key):
        vals = [x[key] for x in runs[name] if x.get(key) is not None]
        return statistics.median(vals) if vals else None

    def ratio(a, ka, b, kb):
        return statistics.median(x[ka] / y[kb] for x, y in zip(runs[a], runs[b], strict=True))

    off = "ia3fx offline"
    summary = {
        "offline_work_vs_cp": ratio(off, "work_s", "cp -r", "wall_s"),
        "offline_wall_vs_cp": ratio(off, "wall_s", "cp -r", "wall_s"),
    }
    if not args.no_peft:
        peft_name = "peft merge_and_unload"
        summary["peft_wall_vs_offline_wall"] = ratio(peft_name, "wall_s", off, "wall_s")
        summary["peft_work_vs_offline_work"] = ratio(peft_name, "work_s", off, "work_s")
        summary["peft_rss_vs_offline_rss"] = med(peft_name, "peak_rss_mb") / med(off, "peak_rss_mb")
    peak = med(off, "peak_rss_mb")
    baseline = med(off, "rss_after_imports_mb")
    budget = largest_mb + BUDGET_MB
    summary.update({
        "offline_peak_rss_mb": peak,
        "offline_rss_after_imports_mb": baseline,
        "offline_peak_above_imports_mb": peak - baseline if peak and baseline else None,
        "largest_tensor_mb": largest_mb,
        "budget_mb": budget,
        "within_budget": bool(peak and peak <= budget),
        "within_budget_above_imports": bool(peak and baseline and peak - baseline <= budget),
    })

    print()
    print(f"{'method':24s} {'wall s':>8s} {'work s':>8s} {'peak RSS MB':>12s}   (medians of {rounds} rounds)")
    for name in methods:
        w = med(name, "work_s")
        rss = med(name, "peak_rss_mb")
        w_text = f"{w:8.2f}" if w is not None else f"{'-':>8s}"
        rss_text = f"{rss:12.0f}" if rss else f"{'-':>12s}"
        print(f"{name:24s} {med(name, 'wall_s'):8.2f} {w_text} {rss_text}")
    print()
    print(f"offline (work) / cp -r:      {summary['offline_work_vs_cp']:.2f}x   (target <= 2x)")
    print(f"offline (wall) / cp -r:      {summary['offline_wall_vs_cp']:.2f}x   (includes interpreter start and imports)")
    if not args.no_peft:
        print(f"PEFT / offline, wall:        {summary['peft_wall_vs_offline_wall']:.2f}x")
        print(f"PEFT / offline, after imports: {summary['peft_work_vs_offline_work']:.2f}x")
        print(f"PEFT / offline, peak RSS:    {summary['peft_rss_vs_offline_rss']:.2f}x")
    print(f"offline peak RSS {peak:.0f} MB ({summary['offline_peak_above_imports_mb']:.0f} MB above the "
          f"{baseline:.0f} MB of the interpreter with torch + transformers); budget largest tensor "
          f"{largest_mb:.0f} MB + {BUDGET_MB} MB = {budget:.0f} MB: "
          f"{'OK' if summary['within_budget'] else 'OVER'} (absolute), "
          f"{'OK' if summary['within_budget_above_imports'] else 'OVER'} (above the interpreter)")

    result = {
        "command": "python benchmarks/bench_offline_merge.py" + (" --quick" if args.quick else "")
                   + (f" --rounds {args.rounds}" if args.rounds else "") + (f" --dtype {args.dtype}" if args.dtype != "fp32" else ""),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "checkpoint": {**info, "dims": dims, "dtype": args.dtype, "adapter_vectors": n_vectors},
        "rounds": rounds,
        "runs": runs,
        "summary": summary,
        "offline_equals_peft": identical,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwritten {os.path.relpath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
