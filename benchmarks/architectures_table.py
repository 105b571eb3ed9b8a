"""Write ``docs/architectures.md``: the coverage table of ``tests/test_architectures.py``, with
the time ia3fx takes to apply and trace each architecture against PEFT's injection.

    python benchmarks/architectures_table.py            # every row, writes docs/architectures.md
    python benchmarks/architectures_table.py llama t5   # some rows, printed only
    python benchmarks/architectures_table.py --update modernbert   # rerun rows in the docs page

Per architecture: ``ROUNDS`` rounds of PEFT's ``get_peft_model`` and ia3fx's ``get_ia3_model`` +
whole-graph trace on fresh copies, the order reversed each round; the ratio quoted is the median
of the per-round ratios. Then each column of the test table is run once (pass, or the error).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from arch_cases import ARCHS, BY_NAME, build  # noqa: E402
from arch_checks import adapt, check_eval, check_grads, check_merge, check_onnx, check_targets  # noqa: E402

import ia3fx  # noqa: E402
from ia3fx.default_inputs import default_inputs  # noqa: E402

ROUNDS = 3
COLUMNS = {"eval": check_eval, "grads": check_grads, "merge": check_merge, "onnx": check_onnx}


def _first_output(model, inputs) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model(**inputs)
    return time.perf_counter() - start


def _time_peft(model, kwargs, inputs) -> dict[str, float]:
    start = time.perf_counter()
    pm = peft.get_peft_model(model, peft.IA3Config(**copy.deepcopy(kwargs)))
    return {"inject": time.perf_counter() - start, "peft_first": _first_output(pm, inputs)}


def _time_ia3fx(model, kwargs, inputs) -> dict[str, float]:
    start = time.perf_counter()
    ia3 = ia3fx.get_ia3_model(model, ia3fx.IA3Config(**copy.deepcopy(kwargs)))
    applied = time.perf_counter() - start
    first = _first_output(ia3, inputs)  # captures and rewrites the block graphs
    start = time.perf_counter()
    ia3.graph_module  # noqa: B018
    return {"apply": applied, "first": first, "trace": time.perf_counter() - start}


def timings(arch) -> dict[str, float]:
    """Median seconds of each step, and the median per-round ratios to PEFT's: time to the first
    output (apply + first forward), and the whole-graph trace against PEFT's injection."""
    samples: dict[str, list[float]] = {}
    for round_ in range(ROUNDS):
        models = {"peft": build(arch), "ia3fx": build(arch)}
        _, inputs = default_inputs(models["peft"])
        got: dict[str, float] = {}
        for who in (["peft", "ia3fx"] if round_ % 2 == 0 else ["ia3fx", "peft"]):
            timer = _time_peft if who == "peft" else _time_ia3fx
            got.update(timer(models[who], arch.ia3, inputs))
        got["ratio_first"] = (got["apply"] + got["first"]) / (got["inject"] + got["peft_first"])
        got["ratio_trace"] = got["trace"] / got["inject"]
        for key, value in got.items():
            samples.setdefault(key, []).append(value)
    return {key: statistics.median(values) for key, values in samples.items()}


def row(arch) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {"name": arch.name, "class": type(build(arch)).__name__, **timings(arch)}
        adapted = adapt(arch)
        try:
            out["trainable"] = check_targets(adapted)
            out["targets"] = "pass"
        except Exception as e:  # noqa: BLE001  (the table reports it)
            out["trainable"], out["targets"] = None, _failure(e)
        for column, check in COLUMNS.items():
            try:
                check(adapted)
                out[column] = "pass"
            except Exception as e:  # noqa: BLE001
                out[column] = _failure(e)
    return out


def _failure(e: Exception) -> str:
    return f"fails: {type(e).__name__}: {str(e).splitlines()[0][:80]}"


HEADER = """# Architectures

Every architecture below is adapted with PEFT's defaults for its model type where PEFT has
them (else with the layers a PEFT user names: attention-type key/value or query/value projections
and the feedforward output projection), without example inputs, on a tiny random config, and
compared with PEFT holding the same random vectors. The columns are the tests of
`tests/test_architectures.py`, which CI runs:

- **targets**: the same layers adapted the same way, the same trainable count as PEFT;
- **eval**: outputs equal PEFT's (1e-5, relative to the outputs' magnitude), through the model
  and its whole-model graph, and differ from the base model's;
- **grads**: every vector's gradient equals PEFT's;
- **merge**: the merged graph computes the unmerged outputs;
- **onnx**: the merged ONNX export runs in onnxruntime and gives the eager outputs.

Times (seconds unless marked): PEFT's `get_peft_model` (injection); ia3fx's `get_ia3_model`
(matching and installing); the first forward of each (ia3fx captures and rewrites the block graphs
there, once per distinct layer); the ratio of the time to the first output, ia3fx's over PEFT's
(apply + first forward); and the whole-model trace (`ia3.graph_module`, what export and drawing
use, on the default inputs) with its ratio to PEFT's injection. Ratios are medians of {rounds}
rounds run in alternating order. Capturing graphs with `torch.export` costs seconds where
wrapping modules costs milliseconds: the price of having a graph, paid once per model.

To check one architecture yourself, the way each row is checked:

```python
import copy

import peft
import torch
import transformers as T

import ia3fx

torch.manual_seed(0)
model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=64)).eval()
ia3 = ia3fx.get_ia3_model(copy.deepcopy(model), ia3fx.IA3Config())  # PEFT's defaults for gpt2
pm = peft.get_peft_model(model, peft.IA3Config())
for name, p in pm.named_parameters():
    if ".ia3_l." in name:
        torch.nn.init.uniform_(p, 0.5, 1.5)  # a non-trivial adapter
ia3.load_adapter_state_dict(peft.get_peft_model_state_dict(pm))
ids = torch.randint(0, 64, (2, 8))
with torch.no_grad():
    assert torch.allclose(ia3(input_ids=ids).logits, pm(input_ids=ids).logits, atol=1e-5)
```

Notes on rows:
- Where ia3fx's apply takes seconds and the whole-graph trace 0 (`deberta`, `deberta-v2`,
  `distilbert`, `electra`, `pegasus`, `wav2vec2`), the model lists no `_no_split_modules`: no blocks to
  capture one by one, so `get_ia3_model` traces the whole model at once and later calls reuse it
  ([how-it-runs.md](how-it-runs.md)).
- `mixtral`: PEFT's default targets include `w2`, which matches no layer in transformers 5 (the
  experts are fused 3-d tensors); both libraries adapt `k_proj` and `v_proj` only, and ia3fx
  warns. Mixtral, Qwen3-MoE and Llama 4 export to ONNX through a translation of transformers'
  grouped expert matmul; Llama 4's complex rotary embedding is rewritten on real pairs.
- `llama4`: PEFT's `llama4` defaults are for the multimodal model; the text model
  (`llama4_text`) has none, so its targets are named.
- `llama+dynamic-rope`: dynamic NTK RoPE with 4 original positions, so the default inputs take
  the grown-frequency branch, which the whole graph computes as a `where`
  ([how it runs](how-it-runs.md)).

Generated by `python benchmarks/architectures_table.py` on {machine}: torch {torch},
transformers {transformers}, peft {peft}; load average {load} at the start (times are only as
steady as the machine; the ratios compare rounds run side by side).

| architecture | class | trainable | PEFT inject (ms) | ia3fx apply (ms) | first forward, PEFT / ia3fx | to first output | whole-graph trace | trace / inject | targets | eval | grads | merge | onnx |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def markdown(rows: list[dict]) -> str:
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    text = HEADER.format(rounds=ROUNDS, machine=machine, load=f"{os.getloadavg()[0]:.1f}", torch=torch.__version__,
                         transformers=transformers.__version__, peft=peft.__version__)
    text += "".join(_line(r) + "\n" for r in rows)
    return text + _summary([all(r[c] == "pass" for c in ("targets", *COLUMNS)) for r in rows])


def _summary(passed: list[bool]) -> str:
    return f"\n{sum(passed)} of {len(passed)} architectures pass every column.\n"


def updated(page: str, rows: list[dict]) -> str:
    """``page`` (a table this script wrote) with the lines of ``rows`` replaced, in place."""
    lines = page.splitlines()
    new = {f"| `{r['name']}` |": _line(r) for r in rows}
    for i, line in enumerate(lines):
        for start, replacement in new.items():
            if line.startswith(start):
                lines[i] = replacement
    missing = [s for s in new if not any(line == new[s] for line in lines)]
    if missing:
        raise SystemExit(f"rows not in the page: {', '.join(missing)}; run without --update")
    table = [line for line in lines if line.startswith("| `")]
    passed = [line.endswith(" | pass | pass | pass | pass | pass |") for line in table]
    body = [line for line in lines if not line.endswith("pass every column.")]
    while body and not body[-1]:
        body.pop()
    return "\n".join(body) + "\n" + _summary(passed)


def _line(r: dict) -> str:
    cells = [f"`{r['name']}`", r["class"], str(r["trainable"]), f"{1000 * r['inject']:.1f}",
             f"{1000 * r['apply']:.1f}", f"{r['peft_first']:.3f} / {r['first']:.2f}",
             f"{r['ratio_first']:.0f}x", f"{r['trace']:.2f}", f"{r['ratio_trace']:.0f}x"]
    cells += [r[c] for c in ("targets", "eval", "grads", "merge", "onnx")]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="rows to run (default: all, and write the docs page)")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "architectures.md"))
    parser.add_argument("--update", action="store_true", help="rerun the named rows and replace them in --out")
    args = parser.parse_args(argv)
    archs = [BY_NAME[n] for n in args.names] if args.names else ARCHS
    rows = []
    for arch in archs:
        start = time.perf_counter()
        rows.append(row(arch))
        r = rows[-1]
        status = ", ".join(f"{c}={r[c]}" for c in ("targets", *COLUMNS))
        print(f"{arch.name}: {status} ({time.perf_counter() - start:.0f} s)", flush=True)
    if args.update:
        with open(args.out) as f:
            page = updated(f.read(), rows)
        with open(args.out, "w") as f:
            f.write(page)
        print(f"updated {', '.join(args.names)} in {args.out}")
    elif args.names:
        print(markdown(rows))
    else:
        with open(args.out, "w") as f:
            f.write(markdown(rows))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
