"""Mixed batches: one eval forward with ``adapter_names=[...]`` (each row its own adapter) vs one adapter.

A Llama-shaped model (4 layers, hidden 512, intermediate 1376, 8 heads, vocab 1000, random
weights, fp32, CPU) runs a batch of 32 x 128 tokens under ``torch.no_grad()`` with
``use_cache=False`` (the block graphs run; the script checks ``block_runs()``). ia3fx holds 16
adapters with PEFT's default Llama targets (``IA3Config()``: k_proj, v_proj, down_proj) and
random vectors (uniform in [0.5, 1.5], a different draw per adapter); PEFT holds the same 16
adapters with the same vectors (copied through ia3fx's PEFT-layout state dict). Contenders:

* ``ia3fx single``: ``set_adapter("task0")`` once, then ``ia3(input_ids=ids)``: the 32 rows, one adapter;
* ``ia3fx mixed k=K`` (K = 1, 4, 16): ``ia3(input_ids=ids, adapter_names=names)``, row ``r`` taking
  adapter ``task{r % K}`` (32 / K rows each, interleaved): one forward, a gather of the stacked vectors;
* ``peft single``: ``set_adapter("task0")`` (untimed) and PEFT's forward of the 32 rows;
* ``peft loop k=K`` (K = 4, 16): what PEFT can do, since its IA3 ignores ``adapter_names``: per
  adapter, ``set_adapter`` and a forward of that adapter's rows, the logits put back in row order.

Figures (ratios of times, lower is faster): ``mixed k=K / ia3fx single`` (target <= 1.05 for every
K: a mixed batch costs what a single-adapter batch costs); ``peft loop k=K / mixed k=K`` (how much
faster than PEFT a mixed batch serves K adapters) next to its ceiling ``peft loop k=K / ia3fx
single`` (and ``/ peft single``): what a free mixed batch would score.

Before timing: every mixed call's rows equal running each adapter's rows alone with that adapter
active (max |difference| < 1e-5), PEFT's per-group loop gives ia3fx's logits (< 1e-4, as
bench_forward.py), the mixed calls ran the block graphs (``block_runs()``: graph calls, no eager).
Memory: the bytes each mixed call allocates beyond a single-adapter call (``torch.profiler``
with ``profile_memory``, per op), against the formula from the vector sizes.

    python benchmarks/bench_mixed.py            # 15 rounds, results/mixed.json (~10 minutes)
    python benchmarks/bench_mixed.py --quick    # 2 layers, hidden 256, 8 x 64, K = 1, 4, 8 (< 2 minutes)
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections import defaultdict

import torch
from _common import alternate, llama_config, machine, model_title, parse_model_args, report

import ia3fx

MIXED_TARGET = 1.05


def _extra(p: argparse.ArgumentParser) -> None:
    p.set_defaults(batch=32)
    p.add_argument("--ks", default=None, help="adapters per mixed batch, comma-separated (default 1,4,16; 1,4,8 with --quick)")


def groups(k: int, batch: int) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Row r takes adapter task{r % k}: the names per row, and each adapter's row indices."""
    names = [f"task{r % k}" for r in range(batch)]
    return names, {f"task{i}": torch.arange(i, batch, k) for i in range(k)}


def build(args: argparse.Namespace, n_adapters: int):
    import peft
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = llama_config(args.layers, args.hidden, args.intermediate, args.heads, args.vocab)
    base = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(), adapter_name="task0").eval()
    ia3 = ia3fx.get_ia3_model(base, ia3fx.IA3Config(), example_inputs={"input_ids": ids}, adapter_name="task0")
    names = [f"task{i}" for i in range(n_adapters)]
    for name in names[1:]:
        ia3.add_adapter(name, ia3fx.IA3Config())
        peft_model.add_adapter(name, peft.IA3Config())
    ia3.eval()
    peft_model.eval()
    with torch.no_grad():  # every adapter its own non-trivial vectors, the same on both sides
        for i, name in enumerate(names):
            gen = torch.Generator().manual_seed(100 + i)
            for p in ia3.ia3_l[name].parameters():
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            peft.set_peft_model_state_dict(peft_model, ia3.adapter_state_dict(name), adapter_name=name)
    for name in names:  # PEFT holds what ia3fx holds
        theirs = peft.get_peft_model_state_dict(peft_model, adapter_name=name)
        ours = ia3.adapter_state_dict(name)
        assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in ours), name
    ia3.set_adapter("task0")
    peft_model.set_adapter("task0")
    return ia3, peft_model, ids


def check(ia3, peft_model, ids: torch.Tensor, ks: list[int]) -> dict[str, object]:
    """The mixed rows equal each group run alone; PEFT's loop equals ia3fx; the graphs ran."""
    out: dict[str, object] = {}
    batch = ids.shape[0]
    with torch.no_grad():
        for k in ks:
            names, rows = groups(k, batch)
            before = ia3.block_runs()
            mixed = ia3(input_ids=ids, adapter_names=names, use_cache=False).logits
            after = ia3.block_runs()
            for block, runs in after.items():
                graph = runs["graph"] - before[block]["graph"]
                eager = runs["eager"] - before[block]["eager"]
                if graph != 1 or eager != 0:
                    raise AssertionError(f"mixed k={k}: block {block} ran {graph} graph and {eager} eager calls")
            alone = torch.empty_like(mixed)
            for name, idx in rows.items():
                ia3.set_adapter(name)
                alone[idx] = ia3(input_ids=ids[idx], use_cache=False).logits
            ia3.set_adapter("task0")
            diff_alone = (mixed - alone).abs().max().item()
            if diff_alone >= 1e-5:
                raise AssertionError(f"mixed k={k}: rows differ from their group run alone by {diff_alone}")
            looped = peft_loop(peft_model, ids, rows)
            diff_peft = (mixed - looped).abs().max().item()
            if diff_peft >= 1e-4:
                raise AssertionError(f"mixed k={k}: PEFT's per-group loop differs from ia3fx by {diff_peft}")
            single = ia3(input_ids=ids, use_cache=False).logits
            diff_single = (mixed - single).abs().max().item()  # k > 1: the adapters really differ
            if k > 1 and diff_single < 1e-3:
                raise AssertionError(f"mixed k={k} equals the single-adapter batch: the adapters do not differ")
            out[f"k={k}"] = {
                "max_abs_diff_mixed_vs_groups_alone": diff_alone,
                "max_abs_diff_mixed_vs_peft_loop": diff_peft,
                "max_abs_diff_mixed_vs_all_rows_task0": diff_single,
            }
            print(f"k={k}: |mixed - groups alone| {diff_alone:.2e}, |mixed - PEFT loop| {diff_peft:.2e}, "
                  f"|mixed - all rows task0| {diff_single:.2e}; block graphs ran, no eager call")
    return out


def peft_loop(peft_model, ids: torch.Tensor, rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """PEFT without per-row adapters: per adapter, set_adapter and a forward of its rows."""
    parts, order = [], []
    for name, idx in rows.items():
        peft_model.set_adapter(name)
        parts.append(peft_model(input_ids=ids[idx], use_cache=False).logits)
        order.append(idx)
    logits = torch.cat(parts)
    out = torch.empty_like(logits)
    out[torch.cat(order)] = logits
    return out


def memory(ia3, ids: torch.Tensor, ks: list[int]) -> dict[str, object]:
    """Bytes a mixed call allocates beyond a single-adapter call, per op, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    def allocated(**kw) -> dict[str, int]:
        """Bytes each op allocated itself (less what it freed itself), summed per op name. The
        profiler files a tensor's allocation under the op that made it; frees outside any op are
        ``[memory]`` events, left out."""
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            ia3(input_ids=ids, use_cache=False, **kw)
        ops: dict[str, int] = defaultdict(int)
        for e in prof.events():
            if e.name != "[memory]" and e.self_cpu_memory_usage:
                ops[e.name] += e.self_cpu_memory_usage
        return dict(ops)

    vec = {p.numel() for p in ia3.ia3_l["task0"].parameters()}
    entries = sum(p.numel() for p in ia3.ia3_l["task0"].parameters())
    slots = sum(1 for _ in ia3.ia3_l["task0"].parameters())
    esize = next(ia3.ia3_l["task0"].parameters()).element_size()
    batch = ids.shape[0]
    single_ops = allocated()
    single_total = sum(single_ops.values())
    out: dict[str, object] = {
        "slots": slots, "vector_entries_per_adapter": entries, "vector_sizes": sorted(vec),
        "batch": batch, "element_bytes": esize,
        "single_allocated_bytes": single_total,
    }
    print(f"memory: {slots} slots, {entries} vector entries per adapter ({entries * esize} bytes)")
    print(f"  single-adapter call: {single_total} bytes allocated by its ops")
    for k in ks:
        names, _ = groups(k, batch)
        ops = allocated(adapter_names=names)
        extra_ops = {n: ops.get(n, 0) - single_ops.get(n, 0) for n in {*ops, *single_ops}}
        extra_ops = {n: b for n, b in sorted(extra_ops.items()) if b}
        formula = {
            "tables (k+1) x entries (aten::stack)": (k + 1) * entries * esize,
            "gathered batch x entries (aten::index_select)": batch * entries * esize,
            "ones, entries (aten::ones_like)": entries * esize,
            "row index, batch int64 (aten::tensor)": batch * 8,
        }
        out[f"k={k}"] = {
            "allocated_bytes": sum(ops.values()), "extra_allocated_bytes": sum(extra_ops.values()),
            "extra_bytes_per_op": extra_ops, "formula_bytes": formula,
            "formula_total_bytes": sum(formula.values()),
        }
        print(f"  mixed k={k}: +{sum(extra_ops.values())} bytes allocated, per op {extra_ops}; formula "
              f"{sum(formula.values())}: " + ", ".join(f"{n} {b}" for n, b in formula.items()))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_model_args(__doc__.splitlines()[0], "mixed", rounds=15, reps=2, argv=argv, extra=_extra)
    if args.quick and args.batch == 32:
        args.batch = 8
    ks = [int(x) for x in (args.ks or ("1,4,8" if args.quick else "1,4,16")).split(",")]
    if any(k < 1 or k > args.batch for k in ks):
        raise SystemExit(f"--ks must lie in 1..batch ({args.batch})")
    info = machine()
    ia3, peft_model, ids = build(args, max(ks))
    with torch.no_grad():  # warm-up: each block's capture and its per-row copy
        ia3(input_ids=ids, use_cache=False)
        ia3(input_ids=ids, adapter_names=groups(1, args.batch)[0], use_cache=False)
    correctness = check(ia3, peft_model, ids, ks)
    mem = memory(ia3, ids, ks)

    calls: dict[str, object] = {"ia3fx single": lambda: ia3(input_ids=ids, use_cache=False)}
    for k in ks:
        names, _ = groups(k, args.batch)
        calls[f"mixed k={k}"] = lambda names=names: ia3(input_ids=ids, adapter_names=names, use_cache=False)
    calls["peft single"] = (
        lambda: peft_model.set_adapter("task0"), lambda _: peft_model(input_ids=ids, use_cache=False), lambda _: None,
    )
    loops = [k for k in ks if k > 1]
    for k in loops:
        rows = groups(k, args.batch)[1]
        calls[f"peft loop k={k}"] = lambda rows=rows: peft_loop(peft_model, ids, rows)
    steps = {n: c if isinstance(c, tuple) else (lambda: None, lambda _, c=c: c(), lambda _: None) for n, c in calls.items()}
    with torch.no_grad():
        for prepare, run, _ in steps.values():
            run(prepare())
        before = ia3.block_runs()
        wall, cpu = alternate(calls, args.rounds, args.reps)
        after = ia3.block_runs()
    eager = sum(after[b]["eager"] - before[b]["eager"] for b in after)
    if eager:
        raise AssertionError(f"{eager} eager block calls while timing: the graph path did not run")

    pairs = [(f"mixed k={k}", "ia3fx single") for k in ks]
    pairs += [("ia3fx single", "peft single")]
    for k in loops:
        pairs += [(f"peft loop k={k}", f"mixed k={k}"), (f"peft loop k={k}", "ia3fx single"),
                  (f"peft loop k={k}", "peft single")]
    targets = {f"mixed k={k} / ia3fx single": MIXED_TARGET for k in ks}
    model = model_title(args, f"no_grad, eval, use_cache=False; {max(ks)} adapters, mixed over k = {ks}")
    path = report(
        args, "mixed batch (adapter_names) vs single-adapter batch; vs PEFT's per-adapter loop", model, wall, cpu,
        pairs, targets, info, ks=ks, correctness=correctness, memory=mem,
        graph_calls_while_timing=sum(after[b]["graph"] - before[b]["graph"] for b in after),
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
