"""Several (IA)³ adapters on one model: switch, combine, blend, disable, merge, save, reload.

Runs on CPU in well under a minute (a tiny Llama built from a config, no download):

    python examples/multiple_adapters.py

1. one traced graph, two adapters (``default``: k/v/down_proj; ``style``: q/o_proj);
2. switching adapters rebinds vectors: no new trace, microseconds per call site;
3. both active at once (their vectors multiply where they share a layer, as in PEFT);
4. a weighted blend (PEFT's ``add_weighted_adapter`` math);
5. ``disable_adapter()`` gives the base model; merging a chosen set folds it into the weights;
6. ``save_pretrained`` writes PEFT's layout (``default`` at the top, others in subdirectories),
   ``IA3Model.from_pretrained`` / ``load_adapter`` read it back, and so does PEFT if installed.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import ia3fx
from ia3fx import IA3Config, IA3Model

torch.set_num_threads(1)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
    )
    return LlamaForCausalLM(config).eval()


def pretend_trained(model: IA3Model, adapter: str, seed: int) -> None:
    """Stand-in for training: vectors around 1 (a real run would use an optimizer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.ia3_l[adapter].parameters():
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def main() -> int:
    t_start = time.perf_counter()
    base = tiny_llama()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    base_out = logits(base, ids)
    ok = True

    def check(name: str, cond: bool) -> None:
        nonlocal ok
        ok &= bool(cond)
        print(f"  [{'ok' if cond else 'FAILED'}] {name}")

    # 1. one trace, two adapters
    model = ia3fx.get_ia3_model(copy.deepcopy(base), IA3Config(), example_inputs={"input_ids": ids})
    model.add_adapter("style", IA3Config(target_modules=["q_proj", "o_proj"], feedforward_modules=[]))
    pretend_trained(model, "default", seed=1)
    pretend_trained(model, "style", seed=2)
    print(model)
    graphs = len(model.graph_modules)

    # 2. switching
    out_default = logits(model, ids)
    model.set_adapter("style")
    out_style = logits(model, ids)
    t0 = time.perf_counter()
    for i in range(100):
        model.set_adapter("default" if i % 2 else "style")
    per_switch = (time.perf_counter() - t0) / 100
    print(f"switching: {per_switch * 1e6:.0f} us per set_adapter, {len(model.targets)} layers")
    check("the two adapters give different outputs", not torch.allclose(out_default, out_style, atol=1e-3))
    check("switching captured no new graph", len(model.graph_modules) == graphs)

    # 3. both active
    model.set_adapter(["default", "style"])
    out_both = logits(model, ids)
    check("both active differ from either alone", not torch.allclose(out_both, out_default, atol=1e-3))

    # 4. a weighted blend: 0.7 * default + 0.3 * style, a layer missing in one adapter counting 0
    model.add_weighted_adapter(["default", "style"], [0.7, 0.3], "blend")
    model.set_adapter("blend")
    out_blend = logits(model, ids)
    check("the blend is a fourth model", not torch.allclose(out_blend, out_both, atol=1e-3))

    # 5. disable and merge
    with model.disable_adapter():
        check("disable_adapter() gives the base model", torch.allclose(logits(model, ids), base_out, atol=1e-6))
    model.set_adapter(["default", "style"])
    model.merge_adapter(["default", "style"])
    check("merged == both active", torch.allclose(logits(model, ids), out_both, atol=1e-5))
    model.unmerge_adapter()
    check("unmerge is exact", torch.equal(logits(model, ids), out_both))

    # 6. files in PEFT's layout, read back by ia3fx (and by PEFT)
    with tempfile.TemporaryDirectory() as out:
        model.save_pretrained(out)
        tree = sorted(
            os.path.relpath(os.path.join(d, f), out) for d, _, files in os.walk(out) for f in files
        )
        print("saved:", *tree, sep="\n  ")
        again = IA3Model.from_pretrained(copy.deepcopy(base), out, example_inputs={"input_ids": ids})
        again.load_adapter(os.path.join(out, "style"), "style")
        check("reloaded default", torch.allclose(logits(again, ids), out_default, atol=1e-5))
        again.set_adapter(["default", "style"])
        check("reloaded [default, style]", torch.allclose(logits(again, ids), out_both, atol=1e-5))
        try:
            import peft
        except ImportError:
            print("  (peft not installed: skipping the PEFT reload)")
        else:
            pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), out)
            pm.load_adapter(os.path.join(out, "style"), adapter_name="style")
            pm.load_adapter(os.path.join(out, "blend"), adapter_name="blend")
            check("PEFT reads default", torch.allclose(logits(pm, ids), out_default, atol=1e-5))
            pm.base_model.set_adapter(["default", "style"])
            check("PEFT reads [default, style]", torch.allclose(logits(pm, ids), out_both, atol=1e-5))
            pm.set_adapter("blend")
            check("PEFT reads the blend", torch.allclose(logits(pm, ids), out_blend, atol=1e-5))

    print(f"{'OK' if ok else 'FAILED'} in {time.perf_counter() - t_start:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
