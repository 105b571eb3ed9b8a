"""Dry runs: which call sites an ``IA3Config`` would scale, on tiny GPT-2 and T5, without adapting.

    python examples/plan_targets.py

``ia3fx.plan(model, config)`` traces the model, applies PEFT's matching rules and returns a
``Plan`` (a table, the targets, why every other layer was skipped); the model is not changed.
Shown here: PEFT's default targets, a ``re.fullmatch`` regex, ``"all-linear"`` with exclusions
(the output layer ``lm_head`` is never included), and PEFT's feedforward suffix quirk, which ia3fx
keeps and warns about. Each plan is checked; the script exits non-zero if one is not as stated.
"""

from __future__ import annotations

import sys
import warnings

import ia3fx
from ia3fx.presets import build_preset

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecation notices


def show(title: str, model, config: ia3fx.IA3Config) -> tuple[ia3fx.Plan, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        plan = ia3fx.plan(model, config)
    print(f"\n== {title}")
    print(plan.table())
    notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if notes:
        print(f"({len(notes)} warnings, first: {notes[0]})")
    return plan, notes


def main() -> int:
    failures: list[str] = []

    def check(cond: bool, what: str) -> None:
        if not cond:
            failures.append(what)

    gpt2 = build_preset("tiny-gpt2")  # GPT2LMHeadModel: transformers Conv1D layers, tied lm_head
    t5 = build_preset("tiny-t5")  # T5ForConditionalGeneration

    # 1. PEFT's defaults for model_type "gpt2": c_attn (output) and mlp.c_proj (input)
    plan, _ = show("GPT-2, PEFT defaults", gpt2, ia3fx.IA3Config())
    check({t.kind for t in plan.targets.values()} == {"conv1d"}, "GPT-2 layers are conv1d sites")
    check(plan.num_vectors == 4, "GPT-2 defaults: 4 vectors")
    check("transformer.h.0.attn.c_proj" not in plan.targets, "mlp.c_proj does not match attn.c_proj")

    # 2. A string is a regex that must match the whole name (re.fullmatch)
    plan, _ = show(
        "GPT-2, regex: first block only",
        gpt2,
        ia3fx.IA3Config(
            target_modules=r".*\.h\.0\.(attn\.c_attn|mlp\.c_fc)",
            feedforward_modules=r".*\.mlp\.c_fc",
        ),
    )
    check(set(plan.targets) == {"transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"}, "GPT-2 regex")
    check(plan.targets["transformer.h.0.mlp.c_fc"].feedforward, "c_fc is feedforward")

    # 3. all-linear: every Linear/Conv1D except the output layer; exclude_modules wins over it
    plan, _ = show(
        "GPT-2, all-linear, attention output projections excluded",
        gpt2,
        ia3fx.IA3Config(
            target_modules="all-linear", feedforward_modules=["mlp.c_proj"], exclude_modules=["attn.c_proj"]
        ),
    )
    check(plan.num_vectors == 6 and "lm_head" not in plan.targets, "GPT-2 all-linear: 6 vectors, no lm_head")
    check(plan.skipped.get("transformer.h.1.attn.c_proj") == "excluded by exclude_modules", "exclusion")

    # 4. T5 regex: self- and cross-attention k/v, and both feedforward matrices
    plan, _ = show(
        "T5, regex: attention k/v (output) and DenseReluDense wi/wo (input)",
        t5,
        ia3fx.IA3Config(
            target_modules=r".*\.(SelfAttention|EncDecAttention)\.[kv]|.*\.DenseReluDense\.w[io]",
            feedforward_modules=r".*\.DenseReluDense\.w[io]",
        ),
    )
    check(plan.num_vectors == 20, "T5 regex: 20 vectors")
    check(all(t.feedforward == (".w" in n) for n, t in plan.targets.items()), "T5 regex placement")

    # 5. all-linear on T5 with a feedforward *list*: PEFT matches feedforward list entries as a
    #    plain suffix (no dot boundary), so "o" also marks every "wo" as feedforward. ia3fx keeps
    #    PEFT's rule (a PEFT adapter means the same here) and warns where it decides by it.
    plan, notes = show(
        "T5, all-linear on the encoder, feedforward_modules=['o'] (PEFT's suffix quirk)",
        t5,
        ia3fx.IA3Config(target_modules="all-linear", feedforward_modules=["o"], exclude_modules=r"decoder\..*"),
    )
    check("lm_head" not in plan.targets, "T5 all-linear leaves lm_head out")
    check(plan.targets["encoder.block.0.layer.1.DenseReluDense.wo"].feedforward, "'o' marks 'wo' (quirk)")
    check(any("plain suffix" in n for n in notes), "the suffix quirk is warned about")

    print()
    if failures:
        print("FAILED: " + "; ".join(failures))
        return 1
    print("OK: all plans as expected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
