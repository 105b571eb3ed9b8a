"""The same (IA)³ adapter in PEFT and in ia3fx gives the same outputs.

    python examples/peft_parity.py

For each model: adapt one copy with ia3fx and another with ``peft.get_peft_model`` (same config),
give the ia3fx adapter random vectors (and a perturbed classifier copy for ``SEQ_CLS``), move them
into PEFT with ``peft.set_peft_model_state_dict(peft_model, ia3.adapter_state_dict())``, and
compare the outputs. Cases: tiny Llama (nn.Linear), tiny GPT-2 (transformers Conv1D), tiny BERT
for sequence classification (``modules_to_save``: the classifier), and a plain module with a
Conv2d (traced with ``torch.fx.symbolic_trace``).

The transformers models are adapted in place and run their decoder/encoder layers as captured
block graphs; the plain module runs one whole-model graph. Each way an adapted model can run is
compared: for the causal LMs, a call with ``use_cache=False`` runs the block graphs, and a call
with the default ``use_cache=True`` (a KV cache) runs each block's own forward with the adapted
layers scaled by hooks. The script prints which way each call went. Exits non-zero if any max abs
difference is >= 1e-5, a call did not take the way it should, or the parameter counts differ.
"""

from __future__ import annotations

import copy
import sys
import warnings

import peft
import torch
from torch import nn

import ia3fx
from ia3fx.presets import build_preset

ATOL = 1e-5

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecation notices
warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")  # PEFT's note on GPT-2's Conv1D


class ConvNet(nn.Module):
    """A plain module: PEFT needs feedforward_modules given explicitly for it (no model_type)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return self.out(torch.relu(self.fc(h)))


def randomize(ia3: ia3fx.IA3Model, seed: int) -> None:
    """Everything trainable (vectors, modules_to_save copies) moves away from its initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ia3.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def way(ia3: ia3fx.IA3Model, call) -> tuple[torch.Tensor, str]:
    """Run ``call()`` and say how it ran (``ia3.block_runs()``: per block, calls that ran its graph
    and calls that ran its own forward with hooks), or that a whole-model graph ran."""
    before = ia3.block_runs()
    with torch.no_grad():
        out = output(call())
    if not before:
        return out, "whole-model graph"
    after = ia3.block_runs()
    graph = sum(after[b]["graph"] - before[b]["graph"] for b in before)
    eager = sum(after[b]["eager"] - before[b]["eager"] for b in before)
    if graph == len(before) and eager == 0:
        return out, "block graphs"
    if eager == len(before) and graph == 0:
        return out, "blocks + hooks"
    return out, f"mixed ({graph} graph, {eager} eager)"


def compare(name: str, base: nn.Module, config_kwargs: dict, inputs: dict, cache: bool = False) -> bool:
    """``cache``: the model builds a KV cache in eval mode by default (a causal LM)."""
    ia3 = ia3fx.get_ia3_model(copy.deepcopy(base), ia3fx.IA3Config(**config_kwargs))
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**config_kwargs)).eval()
    randomize(ia3, seed=1)

    state = ia3.adapter_state_dict()  # PEFT's keys and shapes: base_model.model.<module>.ia3_l
    peft.set_peft_model_state_dict(peft_model, state)
    moved = peft.get_peft_model_state_dict(peft_model)
    same_state = set(moved) == set(state) and all(torch.equal(moved[k], state[k]) for k in state)
    same_counts = ia3.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()

    with torch.no_grad():
        theirs, plain = (output(m(**inputs)) for m in (peft_model, base))
    effect = (theirs - plain).abs().max().item()
    trainable, total = ia3.get_nb_trainable_parameters()
    print(f"{name:<22} tensors {len(state):>2}  trainable {trainable:>6,d}/{total:,d}  adapter effect {effect:.3f}")

    # every way this model runs a call, and the way each must take
    if cache:
        calls = {
            "use_cache=False": ("block graphs", lambda: ia3(**inputs, use_cache=False)),
            "default (KV cache)": ("blocks + hooks", lambda: ia3(**inputs)),
        }
    elif ia3.block_runs():
        calls = {"default": ("block graphs", lambda: ia3(**inputs))}
    else:
        calls = {"default": ("whole-model graph", lambda: ia3(**inputs))}
    ok = same_state and same_counts and effect > 1e-3
    for label, (expected, call) in calls.items():
        ours, went = way(ia3, call)
        diff = (ours - theirs).abs().max().item()
        print(f"  {label:<19} ran {went:<18} max |ia3fx - PEFT| = {diff:.2e}")
        ok &= diff < ATOL and went == expected
        if went != expected:
            print(f"  expected it to run {expected}")
    if not (same_state and same_counts):
        print(f"  mismatch: state {same_state}, parameter counts {same_counts}")
    return ok


def main() -> int:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (3, 11), generator=g)
    torch.manual_seed(0)
    results = [
        compare("tiny-llama defaults", build_preset("tiny-llama"), {}, {"input_ids": ids}, cache=True),
        compare("tiny-gpt2 defaults", build_preset("tiny-gpt2"), {}, {"input_ids": ids}, cache=True),
        compare("tiny-bert SEQ_CLS", build_preset("tiny-bert"), {"task_type": "SEQ_CLS"}, {"input_ids": ids}),
        compare(
            "ConvNet conv ff + fc",
            ConvNet().eval(),
            {"target_modules": ["conv", "fc"], "feedforward_modules": ["conv"]},
            {"x": torch.randn(2, 3, 8, 8, generator=g)},
        ),
    ]
    if all(results):
        print(f"OK: ia3fx matches PEFT within {ATOL:g} on {len(results)} models")
        return 0
    print("FAILED")
    return 1


if __name__ == "__main__":
    sys.exit(main())
