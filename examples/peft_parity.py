"""The same (IA)³ adapter in PEFT and in ia3fx gives the same outputs.

    python examples/peft_parity.py

For each model: adapt one copy with ia3fx and another with ``peft.get_peft_model`` (same config),
give the ia3fx adapter random vectors (and a perturbed classifier copy for ``SEQ_CLS``), move them
into PEFT with ``peft.set_peft_model_state_dict(peft_model, ia3.adapter_state_dict())``, and
compare the outputs. Cases: tiny Llama (nn.Linear), tiny GPT-2 (transformers Conv1D), tiny BERT
for sequence classification (``modules_to_save``: the classifier), and a plain module with a
Conv2d (traced with ``torch.fx.symbolic_trace``). Exits non-zero if any max abs difference is
>= 1e-5 or the parameter counts differ.
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


def compare(name: str, base: nn.Module, config_kwargs: dict, inputs: dict, example_inputs=None) -> bool:
    ia3 = ia3fx.get_ia3_model(
        copy.deepcopy(base), ia3fx.IA3Config(**config_kwargs), example_inputs=example_inputs
    )
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**config_kwargs)).eval()
    randomize(ia3, seed=1)

    state = ia3.adapter_state_dict()  # PEFT's keys and shapes: base_model.model.<module>.ia3_l
    peft.set_peft_model_state_dict(peft_model, state)
    moved = peft.get_peft_model_state_dict(peft_model)
    same_state = set(moved) == set(state) and all(torch.equal(moved[k], state[k]) for k in state)
    same_counts = ia3.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()

    with torch.no_grad():
        ours, theirs, plain = (output(m(**inputs)) for m in (ia3, peft_model, base))
    diff = (ours - theirs).abs().max().item()
    effect = (theirs - plain).abs().max().item()
    trainable, total = ia3.get_nb_trainable_parameters()
    print(
        f"{name:<22} tensors {len(state):>2}  trainable {trainable:>6,d}/{total:,d}  "
        f"adapter effect {effect:.3f}  max |ia3fx - PEFT| = {diff:.2e}"
    )
    ok = same_state and same_counts and diff < ATOL and effect > 1e-3
    if not ok:
        print(f"  mismatch: state {same_state}, parameter counts {same_counts}")
    return ok


def main() -> int:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (3, 11), generator=g)
    torch.manual_seed(0)
    results = [
        compare("tiny-llama defaults", build_preset("tiny-llama"), {}, {"input_ids": ids}),
        compare("tiny-gpt2 defaults", build_preset("tiny-gpt2"), {}, {"input_ids": ids}),
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
