"""What switching adapters costs: ``IA3Model.set_adapter`` per call site vs PEFT's per layer.

A Llama-shaped model (32 layers by default, small hidden size, on CPU) gets two (IA)³ adapters with
PEFT's default targets (k_proj, v_proj, down_proj: 3 call sites per layer). Each switch alternates
between them; the figure is the median time of one ``set_adapter`` call divided by the number of
scaled call sites (ia3fx) or of IA3 layers (PEFT; same count here). Switching must never capture a
new graph: the script checks that ``len(model.graph_modules)`` is unchanged and that
``torch.export.export`` is not called while switching.

    python benchmarks/bench_switch.py            # 32 layers, results/switch.json
    python benchmarks/bench_switch.py --quick    # 8 layers, fewer repeats (CI smoke)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch

import ia3fx

HERE = os.path.dirname(os.path.abspath(__file__))


def llama(layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


@contextlib.contextmanager
def no_export():
    """Any call of torch.export.export while switching is a failure."""
    real = torch.export.export

    def refuse(*args, **kwargs):
        raise AssertionError("torch.export.export was called while switching adapters")

    torch.export.export = refuse
    try:
        yield
    finally:
        torch.export.export = real


def time_switches(switch, names, reps: int, rounds: int) -> tuple[list[float], list[float]]:
    """Median seconds per switch, one figure per round: wall clock, and this process's CPU time
    (which a busy machine inflates much less)."""
    wall, cpu = [], []
    for _ in range(rounds):
        walls, cpus = [], []
        for i in range(reps):
            name = names[i % len(names)]
            c0, t0 = time.process_time(), time.perf_counter()
            switch(name)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        wall.append(statistics.median(walls))
        cpu.append(statistics.median(cpus))
    return wall, cpu


def scaled_call_sites(model: ia3fx.IA3Model) -> int:
    """Scale nodes over every captured graph: what one switch has to rebind."""
    return sum(
        1
        for gm in model.graph_modules
        for node in gm.graph.nodes
        if (node.meta.get("ia3fx") or {}).get("role") == "scale"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; 8 with --quick)")
    parser.add_argument("--reps", type=int, default=None, help="switches per round (default 200; 40 with --quick)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small and fast: 8 layers, 40 switches per round")
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT comparison")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "switch.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny tensors: threads only add synchronisation
    layers = args.layers or (8 if args.quick else 32)
    reps = args.reps or (40 if args.quick else 200)
    rounds = 3 if args.quick and args.rounds == 5 else args.rounds

    base = llama(layers)
    peft_base = copy.deepcopy(base)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))

    t0 = time.perf_counter()
    model = ia3fx.get_ia3_model(base, ia3fx.IA3Config(), example_inputs={"input_ids": ids})
    trace_s = time.perf_counter() - t0
    model.add_adapter("other", ia3fx.IA3Config())
    with torch.no_grad():
        model.ia3_l["other"]["model__layers__0__self_attn__k_proj"].mul_(2.0)
    sites = scaled_call_sites(model)
    graphs = len(model.graph_modules)
    names = ["other", "default"]

    with torch.no_grad():
        before = model(input_ids=ids).logits
    with no_export():
        rounds_s, cpu_s = time_switches(model.set_adapter, names, reps, rounds)
        multi_s, _ = time_switches(lambda _: model.set_adapter(names), names, reps, rounds)
    assert len(model.graph_modules) == graphs, "switching captured a new graph"
    model.set_adapter("other")
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert len(model.graph_modules) == graphs, "a call after switching captured a new graph"
    assert not torch.equal(before, after), "switching adapters did not change the outputs"

    per_call = min(rounds_s)
    result = {
        "model": f"LlamaForCausalLM, {layers} layers, hidden 64, CPU",
        "config": "IA3Config() defaults: k_proj, v_proj, down_proj",
        "layers": layers,
        "scaled_call_sites": sites,
        "graphs": graphs,
        "trace_seconds": round(trace_s, 2),
        "ia3fx_set_adapter_us": round(per_call * 1e6, 1),
        "ia3fx_us_per_call_site": round(per_call * 1e6 / sites, 3),
        "ia3fx_set_adapter_cpu_us": round(min(cpu_s) * 1e6, 1),
        "ia3fx_cpu_us_per_call_site": round(min(cpu_s) * 1e6 / sites, 3),
        "ia3fx_set_two_adapters_us": round(min(multi_s) * 1e6, 1),
        "ia3fx_rounds_us": [round(r * 1e6, 1) for r in rounds_s],
        "new_graphs_while_switching": 0,
        "export_calls_while_switching": 0,
        "reps_per_round": reps,
        "rounds": rounds,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    line = (
        f"ia3fx  set_adapter: {per_call * 1e6:9.1f} us per switch, {per_call * 1e6 / sites:7.3f} us per call site "
        f"({sites} sites); CPU time {min(cpu_s) * 1e6 / sites:.3f} us per call site"
    )

    if not args.no_peft:
        import peft

        pm = peft.get_peft_model(peft_base, peft.IA3Config())
        pm.add_adapter("other", peft.IA3Config())
        n_layers = sum(1 for m in pm.modules() if isinstance(m, peft.tuners.ia3.IA3Layer))
        peft_s, peft_cpu_s = time_switches(pm.base_model.set_adapter, names, reps, rounds)
        peft_call = min(peft_s)
        result.update(
            peft=peft.__version__,
            peft_set_adapter_us=round(peft_call * 1e6, 1),
            peft_us_per_layer=round(peft_call * 1e6 / n_layers, 3),
            peft_cpu_us_per_layer=round(min(peft_cpu_s) * 1e6 / n_layers, 3),
            peft_ia3_layers=n_layers,
            ia3fx_over_peft=round(per_call / peft_call, 3),
            ia3fx_over_peft_cpu=round(min(cpu_s) / min(peft_cpu_s), 3),
        )
        line += (
            f"\nPEFT   set_adapter: {peft_call * 1e6:9.1f} us per switch, {peft_call * 1e6 / n_layers:7.3f} us per layer "
            f"({n_layers} layers); CPU time {min(peft_cpu_s) * 1e6 / n_layers:.3f} us per layer"
            f"\nratio ia3fx/PEFT: {per_call / peft_call:.2f} (wall), {min(cpu_s) / min(peft_cpu_s):.2f} (CPU)"
        )

    print(line)
    print(f"no new graph and no torch.export call while switching ({graphs} graph(s) captured before)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
