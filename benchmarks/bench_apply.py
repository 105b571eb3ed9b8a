"""Figure (c): what applying ia3fx costs, in time and memory, against PEFT's injection.

``get_ia3_model`` on a transformers model with ``_no_split_modules`` does not trace the model: it
picks the targets from the module tree (PEFT's rules), creates the vectors and puts a runner in
each decoder layer's ``forward``. The first call of a block captures it (``torch.export``
non-strict of one decoder layer, dynamic dims; identical layers share the capture) and rewrites
it; later calls with other keyword arguments reuse it. So this script measures, in one run, each
as a ratio against PEFT in the same run:

1. **7B-shaped Llama on the meta device** (32 layers, hidden 4096, intermediate 11008, 32 heads,
   vocab 32000; no weights allocated). ``ia3fx.get_ia3_model(model, IA3Config())`` vs
   ``peft.get_peft_model(model, peft.IA3Config())`` (target <= 8x), each on a fresh meta model
   built outside the timed region. On meta there is no eager forward, so the *first-call capture*
   is timed by calling the adapted model's decoder layer 0 directly with meta inputs of the shapes
   ``LlamaModel`` passes (hidden_states 2 x 16 x 4096, position_embeddings (cos, sin) 1 x 16 x 128,
   position_ids 1 x 16, attention_mask=None, cache=None, use_cache=False); PEFT's eager call of
   its layer 0 on the same inputs is timed beside it. After each capture the script checks that
   exactly one block graph exists, that layer 0 ran it, and that layer 1 then runs the same graph
   without a second capture (the time of that call is reported too).
2. **Tiny Llama on CPU** (2 layers, hidden 64, intermediate 172, 4 heads, vocab 1000):
   ``get_ia3_model`` vs ``get_peft_model`` (target <= 5x), and beside it (no target)
   "``get_ia3_model`` + first forward" vs "``get_peft_model`` + first forward" (eval, no_grad,
   2 x 16 ids): the first forward is where ia3fx's capture happens.
3. **A first call with new keyword arguments** on an already-called tiny model: after a warm
   ``m(input_ids=ids)`` (untimed), the first ``m(input_ids=ids, output_hidden_states=True)``,
   ``m(input_ids=ids, labels=ids)`` and ``m(input_ids=ids, return_dict=False)``, each on a fresh
   model, in eval (no_grad) and in train mode (grad on); target <= 0.3 s each, PEFT's same calls
   beside. The script checks that these calls add no capture.
4. **Peak memory**: the RSS high-water mark (``VmHWM``) of a fresh subprocess that imports, builds
   the meta 7B model, runs ``get_ia3_model`` and then calls layers 0 and 1 (the capture), read
   after each step; target < 1 GB after ``get_ia3_model`` and after the capture. A PEFT process
   doing the same (``get_peft_model``, then its eager layer calls) runs beside it.
5. **Captures after calling two layers** of the 32-layer model: must be 1 (checked in every round
   of item 1).

Before timing, the tiny model's logits, hidden states, loss and tuple output under ia3fx are
checked against PEFT's with the same random vectors (PEFT's state dict loaded into ia3fx).

Method: ``_common.alternate`` (every contender runs in every round, taking turns call by call in
an order that reverses at every turn; a round keeps each contender's best of ``reps`` calls; the
figure is the median of the per-round ratios), process CPU time with one torch thread (primary)
and wall clock beside. ``gc.collect()`` runs before each timed call, outside the timing. One
untimed warm-up of every contender comes first (a process's first export or first PEFT call pays
for imports and caches); its times are kept in the JSON as ``cold_first_in_process``. The default
run takes 5-9 minutes on a 2-core machine, most of it building and warming fresh models between
timed calls (every ia3fx contender of item 3 captures its block before the timed call).

    python benchmarks/bench_apply.py            # 32 layers, 7 rounds, best of 3: results/apply.json
    python benchmarks/bench_apply.py --quick    # 4 layers, 2 rounds, best of 1 (< 2 min): apply_quick.json
    python benchmarks/bench_apply.py --profile capture   # cProfile of one capture (or: apply, forward)
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import torch
from _common import (
    alternate,
    command,
    llama_config,
    machine,
    ratio_lines,
    ratios_both,
    table,
    time_rows,
    write_json,
)

import ia3fx

SEVEN_B = dict(hidden=4096, intermediate=11008, heads=32, vocab=32000)
TINY = dict(layers=2, hidden=64, intermediate=172, heads=4, vocab=1000)
BATCH, SEQ = 2, 16
INJECT_7B_TARGET = 8.0  # get_ia3_model / get_peft_model, meta 7B
INJECT_TINY_TARGET = 5.0  # get_ia3_model / get_peft_model, tiny CPU Llama
NEW_KWARGS_TARGET_S = 0.3  # a first call with new keyword arguments
PEAK_RSS_TARGET_MB = 1024
NEW_KWARGS = {
    "hidden_states": lambda ids: {"output_hidden_states": True},
    "labels": lambda ids: {"labels": ids},
    "tuple": lambda ids: {"return_dict": False},
}


# --- models ----------------------------------------------------------------------------------
def meta_llama(layers: int) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    cfg = llama_config(layers, **SEVEN_B)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return model.eval()


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(**TINY)).eval()


def tiny_ids() -> torch.Tensor:
    return torch.randint(0, TINY["vocab"], (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def layer_inputs() -> tuple[tuple, dict]:
    """What ``LlamaModel.forward`` hands each decoder layer, as meta tensors (no mask: SDPA's causal path)."""
    with torch.device("meta"):
        hidden = torch.empty(BATCH, SEQ, SEVEN_B["hidden"])
        head = SEVEN_B["hidden"] // SEVEN_B["heads"]
        cos, sin = torch.empty(1, SEQ, head), torch.empty(1, SEQ, head)
        position_ids = torch.arange(SEQ)[None]
    kwargs = dict(
        attention_mask=None, position_embeddings=(cos, sin), position_ids=position_ids, cache=None, use_cache=False
    )
    return (hidden,), kwargs


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of an ia3fx or PEFT wrapper around a LlamaForCausalLM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


def ia3fx_apply(model: torch.nn.Module) -> ia3fx.IA3Model:
    return ia3fx.get_ia3_model(model, ia3fx.IA3Config())


def peft_apply(model: torch.nn.Module):
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' FutureWarning on is_gradient_checkpointing
        return peft.get_peft_model(model, peft.IA3Config())


def collected(make: Callable[[], object]) -> Callable[[], object]:
    """A ``prepare`` step: build the object, then collect the previous call's cyclic garbage."""

    def prepare() -> object:
        obj = make()
        gc.collect()
        return obj

    return prepare


def drop(obj: object) -> None:
    return None


# --- 1. the meta 7B model ----------------------------------------------------------------------
class CaptureCheck:
    """After each timed layer-0 call: one block graph, run by layer 0; layer 1 runs it without a
    second capture (that call's time kept)."""

    def __init__(self) -> None:
        self.second_layer_cpu: list[float] = []
        self.second_layer_wall: list[float] = []
        self.captures: list[int] = []

    def __call__(self, adapted: ia3fx.IA3Model) -> None:
        args, kwargs = layer_inputs()
        layers = decoder_layers(adapted)
        if len(adapted.block_graphs) != 1 or adapted._runners["model.layers.0"].graph_calls != 1:
            raise AssertionError(
                f"layer 0 did not capture one graph and run it: {len(adapted.block_graphs)} graphs, "
                f"runner {vars(adapted._runners['model.layers.0'])}"
            )
        w0, c0 = time.perf_counter(), time.process_time()
        layers[1](*args, **kwargs)
        self.second_layer_wall.append(time.perf_counter() - w0)
        self.second_layer_cpu.append(time.process_time() - c0)
        runner = adapted._runners["model.layers.1"]
        self.captures.append(len(adapted.block_graphs))
        if len(adapted.block_graphs) != 1 or runner.graph_calls != 1 or runner.eager_calls:
            raise AssertionError(
                f"layer 1 did not share layer 0's capture: {len(adapted.block_graphs)} graphs, "
                f"graph calls {runner.graph_calls}, eager calls {runner.eager_calls}"
            )


def meta_contenders(layers: int, check: CaptureCheck) -> dict:
    args, kwargs = layer_inputs()

    def call_layer0(model: torch.nn.Module) -> object:
        return decoder_layers(model)[0](*args, **kwargs)

    return {
        "peft get_peft_model": (collected(lambda: meta_llama(layers)), peft_apply, drop),
        "ia3fx get_ia3_model": (collected(lambda: meta_llama(layers)), ia3fx_apply, drop),
        "ia3fx first call capture": (collected(lambda: ia3fx_apply(meta_llama(layers))), call_layer0, check),
        "peft layer call": (collected(lambda: peft_apply(meta_llama(layers))), call_layer0, drop),
    }


# --- 2. and 3. the tiny CPU model --------------------------------------------------------------
def tiny_contenders(ids: torch.Tensor) -> dict:
    def with_forward(apply: Callable) -> Callable:
        def run(model: torch.nn.Module) -> object:
            adapted = apply(model)
            with torch.no_grad():
                return adapted(input_ids=ids)

        return run

    return {
        "peft get_peft_model": (collected(tiny_llama), peft_apply, drop),
        "ia3fx get_ia3_model": (collected(tiny_llama), ia3fx_apply, drop),
        "peft + first forward": (collected(tiny_llama), with_forward(peft_apply), drop),
        "ia3fx + first forward": (collected(tiny_llama), with_forward(ia3fx_apply), drop),
    }


def no_new_capture(adapted: object) -> None:
    if isinstance(adapted, ia3fx.IA3Model) and len(adapted.block_graphs) != 1:
        raise AssertionError(f"a call with new keyword arguments captured again: {len(adapted.block_graphs)} graphs")


def kwargs_contenders(ids: torch.Tensor) -> dict:
    out = {}
    for mode in ("eval", "train"):
        for what, extra in NEW_KWARGS.items():
            kw = extra(ids)
            for side, apply in (("peft", peft_apply), ("ia3fx", ia3fx_apply)):

                def prepare(apply: Callable = apply, mode: str = mode) -> object:
                    adapted = apply(tiny_llama())
                    adapted.train(mode == "train")
                    with torch.set_grad_enabled(mode == "train"):
                        adapted(input_ids=ids)  # the warm call: ia3fx's capture happens here
                    gc.collect()
                    return adapted

                def run(adapted: object, mode: str = mode, kw: dict = kw) -> object:
                    with torch.set_grad_enabled(mode == "train"):
                        return adapted(input_ids=ids, **kw)

                out[f"{side} {what} ({mode})"] = (prepare, run, no_new_capture)
    return out


def check_tiny(ids: torch.Tensor) -> dict[str, float]:
    """ia3fx agrees with PEFT (same random vectors) on logits, hidden states, loss and tuple output,
    and the calls with new keyword arguments add no capture."""
    import peft

    peft_model = peft_apply(tiny_llama())
    with torch.no_grad():
        gen = torch.Generator().manual_seed(2)
        for name, p in peft_model.named_parameters():
            if "ia3_l" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    adapted = ia3fx_apply(tiny_llama())
    adapted.load_adapter_state_dict(peft.get_peft_model_state_dict(peft_model))
    diffs = {}
    with torch.no_grad():
        a, b = adapted(input_ids=ids), peft_model(input_ids=ids)
        diffs["logits"] = (a.logits - b.logits).abs().max().item()
        a, b = adapted(input_ids=ids, output_hidden_states=True), peft_model(input_ids=ids, output_hidden_states=True)
        diffs["hidden_states"] = max((x - y).abs().max().item() for x, y in zip(a.hidden_states, b.hidden_states))
        a, b = adapted(input_ids=ids, labels=ids), peft_model(input_ids=ids, labels=ids)
        diffs["loss"] = (a.loss - b.loss).abs().item()
        a, b = adapted(input_ids=ids, return_dict=False), peft_model(input_ids=ids, return_dict=False)
        diffs["tuple"] = (a[0] - b[0]).abs().max().item()
    bad = {k: v for k, v in diffs.items() if v > 1e-4}
    if bad:
        raise AssertionError(f"ia3fx and PEFT disagree: {bad}")
    if len(adapted.block_graphs) != 1:
        raise AssertionError(f"expected one capture after the eval calls, got {len(adapted.block_graphs)}")
    return diffs


# --- 4. memory ---------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """This process's RSS high-water mark. ``VmHWM`` where there is /proc: ``ru_maxrss`` of a fresh
    subprocess also counts the parent's RSS at fork time (Linux keeps the maximum across exec)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


CHILDREN = ("ia3fx", "peft")
STAGES = {
    "ia3fx": ("after imports", "after build", "after get_ia3_model", "after capture (layers 0 and 1)"),
    "peft": ("after imports", "after build", "after get_peft_model", "after layer 0 and 1 calls"),
}


def child(what: str, layers: int) -> None:
    """Run in a fresh process: the RSS high-water mark after each step (imports, build, apply, the
    first two layer calls). A high-water mark only grows, so each figure is that of a process that
    stopped there."""
    import peft  # noqa: F401 - both children import the same, so "after imports" compares

    stages = STAGES[what]
    marks = {stages[0]: peak_rss_mb()}
    model = meta_llama(layers)
    marks[stages[1]] = peak_rss_mb()
    model = ia3fx_apply(model) if what == "ia3fx" else peft_apply(model)
    marks[stages[2]] = peak_rss_mb()
    args, kwargs = layer_inputs()
    for layer in decoder_layers(model)[:2]:
        layer(*args, **kwargs)
    if what == "ia3fx":
        assert len(model.block_graphs) == 1, model.block_graphs
    marks[stages[3]] = peak_rss_mb()
    print(json.dumps({k: round(v, 1) for k, v in marks.items()}))


def measure_children(layers: int) -> dict[str, dict]:
    """Both children at once (a high-water mark is per process: they do not disturb each other's)."""
    procs = {
        what: subprocess.Popen(
            [sys.executable, __file__, "--child", what, "--layers", str(layers)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for what in CHILDREN
    }
    memory = {}
    for what, proc in procs.items():
        out, err = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"memory child {what!r} failed:\n{err[-2000:]}")
        memory[what] = json.loads(out.strip().splitlines()[-1])
    return memory


# --- profile -----------------------------------------------------------------------------------
def profile(what: str, layers: int, top: int = 25) -> None:
    """cProfile of one call (after an untimed warm-up of the same), by cumulative and by own time."""
    args, kwargs = layer_inputs()
    ids = tiny_ids()

    def step() -> Callable[[], object]:
        if what == "apply":
            model = meta_llama(layers)
            return lambda: ia3fx_apply(model)
        if what == "capture":
            adapted = ia3fx_apply(meta_llama(layers))
            return lambda: decoder_layers(adapted)[0](*args, **kwargs)
        model = tiny_llama()

        def forward() -> object:
            with torch.no_grad():
                return ia3fx_apply(model)(input_ids=ids)

        return forward

    step()()
    run = step()
    gc.collect()
    prof = cProfile.Profile()
    prof.enable()
    run()
    prof.disable()
    stats = pstats.Stats(prof).strip_dirs()
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)


# --- main --------------------------------------------------------------------------------------
def medians(cpu: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in cpu.items()}


def section(title: str, wall: dict, cpu: dict, pairs: list[tuple[str, str]], targets: dict) -> dict:
    ratios = ratios_both(wall, cpu, pairs)
    print(f"\n{title}")
    print(table(time_rows(wall, cpu)))
    print(ratio_lines(ratios, targets))
    return {
        "model": title,
        "targets": targets,
        "ratios": ratios,
        "seconds_wall": {k: [round(t, 5) for t in v] for k, v in wall.items()},
        "seconds_cpu": {k: [round(t, 5) for t in v] for k, v in cpu.items()},
    }


def warm_up(contenders: dict) -> dict[str, dict[str, float]]:
    """One untimed call of each contender (the first in this process); its times, for the record."""
    cold = {}
    for name, (prepare, run, cleanup) in contenders.items():
        obj = prepare()
        w0, c0 = time.perf_counter(), time.process_time()
        run(obj)
        cold[name] = {"cpu": round(time.process_time() - c0, 4), "wall": round(time.perf_counter() - w0, 4)}
        cleanup(obj)
    return cold


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 meta layers, 2 rounds, best of 1 (< 2 min)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of the meta model (default 32; 4 with --quick)")
    p.add_argument("--rounds", type=int, default=None, help="default 7 (2 with --quick)")
    p.add_argument("--reps", type=int, default=None, help="calls per contender per round, the best counts (default 3; 1 with --quick)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 0 keeps torch's default")
    p.add_argument("--profile", choices=["apply", "capture", "forward"], help="cProfile one call instead of benchmarking")
    p.add_argument("--child", choices=CHILDREN, help=argparse.SUPPRESS)
    p.add_argument("--name", default=None, help="results/<name>.json (default apply, apply_quick)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = args.layers or (4 if args.quick else 32)
    if layers < 2:
        p.error("--layers must be at least 2 (layer 1 checks that layer 0's capture is shared)")
    if args.child:
        child(args.child, layers)
        return 0
    if args.profile:
        profile(args.profile, layers)
        return 0
    rounds = args.rounds or (2 if args.quick else 7)
    reps = args.reps or (1 if args.quick else 3)
    name = args.name or ("apply_quick" if args.quick else "apply")
    t0 = time.perf_counter()
    info = machine()
    ids = tiny_ids()

    diffs = check_tiny(ids)
    check = CaptureCheck()
    meta, tiny, new_kwargs = meta_contenders(layers, check), tiny_contenders(ids), kwargs_contenders(ids)
    cold = {"meta": warm_up(meta), "tiny": warm_up(tiny)}
    del check.second_layer_cpu[:], check.second_layer_wall[:], check.captures[:]
    gc.collect()
    gc.freeze()  # what is alive now (modules, imports) stays out of the untimed gc.collect() calls

    print(f"meta {layers} layers, {rounds} rounds, best of {reps} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    meta_wall, meta_cpu = alternate(meta, rounds, reps)
    print(f"tiny ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    tiny_wall, tiny_cpu = alternate(tiny, rounds, reps)
    print(f"new keyword arguments ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    kw_wall, kw_cpu = alternate(new_kwargs, rounds, reps)
    captures = max(check.captures)  # item 5: after calling layers 0 and 1, in every round
    print(f"memory, fresh subprocesses ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    memory = measure_children(layers)
    print(f"done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    meta_title = (
        f"LlamaForCausalLM on meta, {layers} layers, hidden 4096, intermediate 11008, 32 heads, vocab 32000; "
        f"layer call: hidden_states {BATCH} x {SEQ} x 4096"
    )
    tiny_title = (
        f"LlamaForCausalLM {TINY['layers']} layers, hidden {TINY['hidden']}, intermediate {TINY['intermediate']}, "
        f"{TINY['heads']} heads, vocab {TINY['vocab']}, fp32, CPU; forward {BATCH} x {SEQ} ids, eval, no_grad"
    )
    kw_title = (
        f"first call with new keyword arguments after a warm m(input_ids=ids), tiny Llama, {BATCH} x {SEQ} ids "
        "(eval: no_grad; train: grad on)"
    )
    sections = {
        "inject_7b_meta": section(
            meta_title, meta_wall, meta_cpu,
            [("ia3fx get_ia3_model", "peft get_peft_model"), ("ia3fx first call capture", "peft get_peft_model"),
             ("ia3fx first call capture", "peft layer call")],
            {"ia3fx get_ia3_model / peft get_peft_model": INJECT_7B_TARGET},
        ),
        "inject_tiny_cpu": section(
            tiny_title, tiny_wall, tiny_cpu,
            [("ia3fx get_ia3_model", "peft get_peft_model"), ("ia3fx + first forward", "peft + first forward")],
            {"ia3fx get_ia3_model / peft get_peft_model": INJECT_TINY_TARGET},
        ),
        "new_kwargs_first_call": section(
            kw_title, kw_wall, kw_cpu,
            [(f"ia3fx {w} ({m})", f"peft {w} ({m})") for m in ("eval", "train") for w in NEW_KWARGS], {},
        ),
    }
    second = {
        "cpu_s_median": round(statistics.median(check.second_layer_cpu), 5),
        "wall_s_median": round(statistics.median(check.second_layer_wall), 5),
        "captures_after_each": sorted(set(check.captures)),
    }
    sections["inject_7b_meta"]["layer_1_after_layer_0 (shared capture)"] = second

    print(f"\nlayer 1 after layer 0's capture: {second['cpu_s_median'] * 1e3:.1f} ms cpu, no new capture")
    kw_med = medians(kw_cpu)
    worst = max(v for k, v in kw_med.items() if k.startswith("ia3fx"))
    print(f"slowest ia3fx first call with new keyword arguments: {worst * 1e3:.1f} ms cpu (median)   "
          f"target <= {NEW_KWARGS_TARGET_S:.1f} s: {'met' if worst <= NEW_KWARGS_TARGET_S else 'MISSED'}")
    print(f"captures after calling two of the {layers} layers (every round): {sorted(set(check.captures))}   must be 1: "
          f"{'met' if captures == 1 else 'MISSED'}")
    rows = [("fresh process: VmHWM (MB)", *STAGES["ia3fx"][:2], "after apply", "after 2 layer calls")]
    rows += [(k, *(f"{v:.0f}" for v in memory[k].values())) for k in CHILDREN]
    print("\n" + table(rows))
    for stage in STAGES["ia3fx"][2:]:
        peak = memory["ia3fx"][stage]
        print(f"peak RSS {stage}: {peak:.0f} MB   target < {PEAK_RSS_TARGET_MB} MB: "
              f"{'met' if peak < PEAK_RSS_TARGET_MB else 'MISSED'}")

    path = write_json(
        name,
        {
            "figure": "applying ia3fx (get_ia3_model, first-call capture, new keyword arguments, memory) vs PEFT",
            "command": command(),
            "method": f"{rounds} rounds per section; within a round the contenders take turns call by call, "
            f"the order reversing every turn, best of {reps} calls each, each call on a fresh model built "
            "outside the timing (gc.collect() before it); ratios are medians of per-round ratios, on CPU "
            "time (primary, 1 intra-op thread) and wall clock; one untimed warm-up of every contender first; "
            "peak RSS = VmHWM of a fresh subprocess",
            "threads": torch.get_num_threads(),
            "targets": {
                "inject_7b_meta: ia3fx get_ia3_model / peft get_peft_model": INJECT_7B_TARGET,
                "inject_tiny_cpu: ia3fx get_ia3_model / peft get_peft_model": INJECT_TINY_TARGET,
                "new_kwargs_first_call: seconds": NEW_KWARGS_TARGET_S,
                "peak_rss_mb": PEAK_RSS_TARGET_MB,
                "captures_after_two_layers": 1,
            },
            "check_max_abs_diff_vs_peft": diffs,
            **sections,
            "captures_after_two_layers": {"max over rounds": captures, "calls checked": len(check.captures)},
            "memory_mb": memory,
            "cold_first_in_process": cold,
            "machine": info,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
