"""Train (IA)³ vectors with transformers' ``Trainer``, save them, and load them back.

    python examples/train_with_trainer.py

1. adapt the built-in ``tiny-llama`` preset (random weights, no download) with PEFT's Llama
   defaults; the adapted model is an ``IA3Model`` *and* a ``LlamaForCausalLM``, so ``Trainer``
   treats it as a transformers model (label names, saving) with no extra arguments;
2. train only the vectors for 4 steps with default ``TrainingArguments`` (apart from sizes, the
   learning rate and ``use_cpu``), writing a checkpoint every 2 steps, and evaluate;
3. ``trainer.save_model(out)`` writes PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``
   (plus ``model.safetensors``, the same vectors under ``IA3Model``'s own names, for resuming);
   reload ``out`` with ``ia3fx.IA3Model.from_pretrained`` and, if PEFT is installed, with
   ``peft.PeftModel.from_pretrained``, and compare logits;
4. resume a second run from ``checkpoint-2``: it ends with the same vectors as the first.

Exits non-zero if the vectors did not move, a reloaded model disagrees, or the resumed run ends
elsewhere.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings

import torch
from transformers import PreTrainedModel, Trainer, TrainingArguments

import ia3fx
from ia3fx.presets import build_preset

ATOL = 1e-6
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecation notices


def rows(n: int, seq: int = 16, cycle: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Causal-LM rows counting up modulo ``cycle`` from a random start (labels = input_ids)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = (torch.randint(0, cycle, (1,), generator=g) + torch.arange(seq)) % cycle
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def train(out: str, resume: str | None = None) -> tuple[Trainer, ia3fx.IA3Model]:
    ia3 = ia3fx.get_ia3_model(build_preset("tiny-llama"), ia3fx.IA3Config())
    args = TrainingArguments(
        output_dir=out,
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=0.1,
        save_steps=2,  # checkpoint-2 and checkpoint-4
        logging_steps=1,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
    )
    trainer = Trainer(model=ia3, args=args, train_dataset=rows(16, seed=1), eval_dataset=rows(8, seed=2))
    trainer.train(resume_from_checkpoint=resume)
    return trainer, ia3


def vectors_diff(a: ia3fx.IA3Model, b: ia3fx.IA3Model) -> float:
    sa, sb = a.adapter_state_dict(), b.adapter_state_dict()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def main() -> int:
    torch.set_num_threads(1)  # tiny model: threads only add overhead
    probe = torch.stack([r["input_ids"] for r in rows(2, seq=10, seed=3)])
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run")
        trainer, ia3 = train(run)
        print(f"{type(ia3).__name__}: a PreTrainedModel? {isinstance(ia3, PreTrainedModel)}; "
              f"label_names {trainer.label_names}")
        losses = [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]
        print(f"training losses: {losses}")
        print(f"eval_loss: {trainer.evaluate()['eval_loss']:.4f}")
        start = ia3fx.get_ia3_model(build_preset("tiny-llama"), ia3fx.IA3Config())
        moved = vectors_diff(ia3, start)
        print(f"vectors moved by up to {moved:.3f}")
        ok = moved > 1e-3

        out = os.path.join(tmp, "final")
        trainer.save_model(out)
        print(f"saved: {sorted(os.listdir(out))}")
        print(f"checkpoints: {sorted(d for d in os.listdir(run) if d.startswith('checkpoint-'))}")
        ours = logits(ia3, probe)

        again = ia3fx.IA3Model.from_pretrained(build_preset("tiny-llama"), out)
        d = (ours - logits(again, probe)).abs().max().item()
        print(f"ia3fx reload: max |logits diff| = {d:.2e}")
        ok &= d <= ATOL
        try:
            import peft
        except ImportError:
            print("peft is not installed: skipping the PEFT reload")
        else:
            theirs = peft.PeftModel.from_pretrained(build_preset("tiny-llama"), out)
            d = (ours - logits(theirs, probe)).abs().max().item()
            print(f"PEFT reload: max |logits diff| = {d:.2e}")
            ok &= d <= ATOL

        _, resumed = train(os.path.join(tmp, "resumed"), resume=os.path.join(run, "checkpoint-2"))
        d = vectors_diff(resumed, ia3)
        print(f"resumed from checkpoint-2: max |vector diff| to the uninterrupted run = {d:.2e}")
        ok &= d <= ATOL

    print("OK: trained with Trainer, saved, reloaded and resumed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
