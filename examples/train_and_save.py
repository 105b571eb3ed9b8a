"""Train (IA)³ vectors on a tiny random Llama, save them in PEFT's format, and load them back.

    python examples/train_and_save.py

1. adapt the built-in ``tiny-llama`` preset (random weights, no download) with PEFT's Llama
   defaults (``k_proj``, ``v_proj`` scaled on their output, ``down_proj`` on its input); its
   decoder layers are captured as one shared block graph with fixed sizes (``dynamic=False``),
   since every training batch has the same shape;
2. train only the vectors for a few dozen steps on a synthetic task (token sequences that count
   up modulo 16) and check that the loss goes down;
3. ``save_pretrained`` to a temporary directory (``adapter_config.json`` +
   ``adapter_model.safetensors``), load that directory with ``peft.PeftModel.from_pretrained``
   and compare logits, then reload it with ``ia3fx.IA3Model.from_pretrained`` and compare again.

Exits non-zero if the loss does not go down or a reloaded model disagrees.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import warnings

import torch

import ia3fx
from ia3fx.presets import build_preset

STEPS = 30
LR = 0.2
ATOL = 1e-5

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecation notices


def counting_batches(steps: int, batch: int = 8, seq: int = 24, cycle: int = 16, seed: int = 0):
    """Sequences ``s, s+1, s+2, ... (mod cycle)``: easy to predict, unknown to a random model."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, cycle, (batch, 1), generator=g)
        yield (start + torch.arange(seq)) % cycle


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def main() -> int:
    torch.manual_seed(0)
    base = build_preset("tiny-llama")  # LlamaForCausalLM, random weights, eval mode
    model = copy.deepcopy(base).train()  # keep `base` untouched for the reload checks

    # The model is adapted in place; its decoder layers are captured as a graph at the first call
    # (in that call's mode: train here), one capture shared by both layers. Every training batch is
    # 8 x 24 tokens, so the capture can fix those sizes (dynamic=False): it is several times faster
    # than one with a dynamic batch and length, and a batch of another shape would simply be
    # captured again. example_inputs is what the whole-model graph (drawing, repr, export) is
    # traced with, on first use.
    ids = next(counting_batches(1))
    ia3 = ia3fx.get_ia3_model(
        model, ia3fx.IA3Config(), example_inputs={"input_ids": ids, "labels": ids}, dynamic=False
    )
    print(ia3)
    ia3.print_trainable_parameters()

    params = [p for p in ia3.parameters() if p.requires_grad]  # the vectors only
    opt = torch.optim.AdamW(params, lr=LR)
    losses = []
    for step, ids in enumerate(counting_batches(STEPS, seed=1)):
        loss = ia3(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % 10 == 0 or step == STEPS - 1:
            print(f"step {step:2d}  loss {loss.item():.4f}")
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    went_down = last < first - 0.05
    print(f"loss (mean of 5 steps) {first:.4f} -> {last:.4f}: {'went down' if went_down else 'did NOT go down'}")
    one_graph = len(ia3.block_graphs) == 1 and ia3.block_graphs[0].training
    print(
        f"block graphs captured while training: {len(ia3.block_graphs)} "
        "(shared by both decoder layers; every batch has the captured shape)"
    )

    ia3.eval()
    probe = next(counting_batches(1, batch=2, seq=10, seed=2))
    with torch.no_grad():
        ours = ia3(input_ids=probe).logits
        plain = base(input_ids=probe).logits
    print(f"trained adapter changes the logits by up to {max_diff(ours, plain):.3f}")

    ok = went_down and one_graph
    with tempfile.TemporaryDirectory() as out:
        ia3.save_pretrained(out)
        print(f"saved: {sorted(os.listdir(out))}")

        # 1) PEFT reads the files as its own
        try:
            import peft

            peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), out)
            with torch.no_grad():
                theirs = peft_model(input_ids=probe).logits
        except Exception as e:  # noqa: BLE001 - report any PEFT failure and carry on with ia3fx
            print(f"PEFT could not load the adapter ({type(e).__name__}: {e}); checking the ia3fx reload only")
        else:
            d = max_diff(ours, theirs)
            print(f"PEFT reload: max |logits diff| = {d:.2e}")
            ok &= d < ATOL

        # 2) and so does ia3fx
        again = ia3fx.IA3Model.from_pretrained(copy.deepcopy(base), out)
        with torch.no_grad():
            d = max_diff(ours, again(input_ids=probe).logits)
        print(f"ia3fx reload: max |logits diff| = {d:.2e}")
        ok &= d < ATOL

    print("OK: trained, saved and reloaded" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
