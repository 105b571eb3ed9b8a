"""transformers' Trainer and TRL's SFTTrainer on an adapted tiny Llama, each run next to PEFT doing
the same (same data, seed and starting vectors): losses, gradient norms, eval losses, trained vectors,
checkpoints, resuming, best-model loading; and every public way of calling the model applies the
adapter exactly as PEFT does."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import datasets
import peft
import pytest
import torch
from conftest import VOCAB, randomize_peft, tiny_llama, token_inputs
from safetensors.torch import load_file
from transformers import PreTrainedModel, Trainer, TrainingArguments

import ia3fx

ATOL = 1e-6  # fp32 on CPU: every comparison with PEFT below is in fact bit-exact
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

# what every Trainer run shares: TrainingArguments defaults apart from sizes, steps and logging
# (remove_unused_columns stays True; the datasets carry a column the model does not take)
TRAIN_ARGS = dict(
    per_device_train_batch_size=4,
    per_device_eval_batch_size=4,
    gradient_accumulation_steps=2,
    learning_rate=0.3,  # large: the vectors move well away from where they start
    logging_steps=1,
    eval_strategy="steps",
    eval_steps=2,
    save_steps=2,
    use_cpu=True,
    report_to=[],
    disable_tqdm=True,
)


# --- helpers -----------------------------------------------------------------------------------
def _lm_dataset(n: int, seed: int, tokens: tuple[int, int] = (3, VOCAB)) -> datasets.Dataset:
    """Causal-LM rows of different lengths, right-padded to 12 (labels -100 there), so that the
    micro-batches of an accumulated step hold different numbers of tokens (``num_items_in_batch``
    matters), plus a string column that ``remove_unused_columns`` must drop. Token ids are drawn
    from ``range(*tokens)``."""
    g = torch.Generator().manual_seed(seed)
    rows: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "extra": []}
    for i in range(n):
        length = int(torch.randint(4, 13, (1,), generator=g))
        ids = torch.randint(*tokens, (length,), generator=g).tolist()
        pad = 12 - length
        rows["input_ids"].append(ids + [1] * pad)
        rows["attention_mask"].append([1] * length + [0] * pad)
        rows["labels"].append(ids + [-100] * pad)
        rows["extra"].append(f"row {i}")
    return datasets.Dataset.from_dict(rows)


def _initial_vectors() -> dict[str, torch.Tensor]:
    """Non-trivial starting vectors (~N(1, 0.3)) in PEFT's layout, the same for every run."""
    pm = peft.get_peft_model(tiny_llama(), peft.IA3Config())
    randomize_peft(pm)
    return {k: v.clone() for k, v in peft.get_peft_model_state_dict(pm).items()}


INITIAL = _initial_vectors()


def _adapted(kind: str):
    """A fresh tiny Llama adapted by ia3fx or by PEFT, both holding ``INITIAL``."""
    if kind == "ia3":
        model = ia3fx.get_ia3_model(tiny_llama(), ia3fx.IA3Config())
        model.load_adapter_state_dict(INITIAL)
    else:
        model = peft.get_peft_model(tiny_llama(), peft.IA3Config())
        peft.set_peft_model_state_dict(model, INITIAL)
    assert _close(_vectors(model), INITIAL)
    return model


def _vectors(model) -> dict[str, torch.Tensor]:
    if isinstance(model, ia3fx.IA3Model):
        return model.adapter_state_dict()
    return {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model).items()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = ATOL) -> bool:
    return _max_diff(a, b) <= atol


def _history(trainer, key: str) -> list[tuple[int, float]]:
    return [(h["step"], h[key]) for h in trainer.state.log_history if key in h]


def _assert_same_history(a, b, key: str, atol: float = ATOL) -> None:
    ha, hb = _history(a, key), _history(b, key)
    assert [s for s, _ in ha] == [s for s, _ in hb], key
    assert ha, key
    for (step, x), (_, y) in zip(ha, hb):
        assert abs(x - y) <= atol, f"{key} at step {step}: {x} vs {y}"


def _counters(model: ia3fx.IA3Model) -> dict[str, tuple[int, int]]:
    return {name: (r.graph_calls, r.eager_calls) for name, r in model._runners.items()}


def _logits(model, batch: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


@dataclass
class Run:
    trainer: Trainer
    model: object
    out: str


def _train(kind: str, out, resume: str | None = None, disjoint_eval: bool = False, **overrides) -> Run:
    """``disjoint_eval``: train on token ids below 64, evaluate on ids from 64 up, so that the eval
    loss rises as training goes on (the best checkpoint is the first)."""
    model = _adapted(kind)
    args = TrainingArguments(output_dir=str(out), **{**TRAIN_ARGS, "max_steps": 4, **overrides})
    train_tokens, eval_tokens = ((3, 64), (64, VOCAB)) if disjoint_eval else ((3, VOCAB), (3, VOCAB))
    trainer = Trainer(
        model=model, args=args,
        train_dataset=_lm_dataset(24, 1, train_tokens), eval_dataset=_lm_dataset(8, 2, eval_tokens),
    )
    trainer.train(resume_from_checkpoint=resume)
    return Run(trainer, model, str(out))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    """One 4-step run (accumulating 2 micro-batches per step, eval and checkpoint every 2 steps) by
    each library."""
    root = tmp_path_factory.mktemp("trainer")
    return {kind: _train(kind, root / kind) for kind in ("peft", "ia3")}


# --- 1. Trainer with default arguments ---------------------------------------------------------
def test_trainer_defaults_train_like_peft(runs):
    ia3, ref = runs["ia3"], runs["peft"]
    model, trainer = ia3.model, ia3.trainer
    assert isinstance(model, PreTrainedModel) and isinstance(model, ia3fx.IA3Model)
    assert trainer.model is model  # not wrapped
    assert trainer.label_names == ["labels"] == ref.trainer.label_names
    # num_items_in_batch reaches the model's loss, as it does through PEFT
    assert trainer.model_accepts_loss_kwargs and ref.trainer.model_accepts_loss_kwargs

    # the unused column was dropped, the model's inputs kept
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}

    # every optimizer step (2 accumulated micro-batches) and every eval, as PEFT's
    assert [s for s, _ in _history(trainer, "loss")] == [1, 2, 3, 4]
    assert [s for s, _ in _history(trainer, "eval_loss")] == [2, 4]
    for key in ("loss", "grad_norm", "eval_loss"):
        _assert_same_history(trainer, ref.trainer, key)
    assert all(g > 0 for _, g in _history(trainer, "grad_norm"))

    trained = _vectors(model)
    assert _close(trained, _vectors(ref.model))
    assert _max_diff(trained, INITIAL) > 0.1  # the vectors did train

    # training ran the block graphs (never the blocks' own forward), and left the base weights alone
    assert all(graph > 0 and eager == 0 for graph, eager in _counters(model).values()), _counters(model)
    base = tiny_llama().state_dict()
    own = model.model.state_dict()
    assert own.keys() == base.keys()
    assert all(torch.equal(own[k], base[k]) for k in base)


# --- 2. saved model and checkpoints ------------------------------------------------------------
def _load_both(directory) -> tuple[torch.Tensor, torch.Tensor]:
    batch = token_inputs("llama", batch=2, seq=9, seed=4, mask=True)
    ours = ia3fx.IA3Model.from_pretrained(tiny_llama(), directory)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), directory)
    return _logits(ours, batch), _logits(theirs, batch)


def test_save_model_and_checkpoints_load_in_ia3fx_and_peft(runs, tmp_path):
    ia3, ref = runs["ia3"], runs["peft"]
    batch = token_inputs("llama", batch=2, seq=9, seed=4, mask=True)
    trained = _logits(ia3.model, batch)
    torch.testing.assert_close(trained, _logits(ref.model, batch), rtol=0, atol=ATOL)

    final = tmp_path / "final"
    ia3.trainer.save_model(str(final))
    checkpoints = sorted(d for d in os.listdir(ia3.out) if d.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    assert sorted(d for d in os.listdir(ref.out) if d.startswith("checkpoint-")) == checkpoints

    dirs = {"final": str(final), **{c: os.path.join(ia3.out, c) for c in checkpoints}}
    for name, directory in dirs.items():
        for file in ADAPTER_FILES:
            assert os.path.isfile(os.path.join(directory, file)), (name, file)
        saved = load_file(os.path.join(directory, "adapter_model.safetensors"))
        assert saved.keys() == INITIAL.keys()
        # the resume file holds the same tensors under the model's own state-dict names
        own = load_file(os.path.join(directory, "model.safetensors"))
        assert own.keys() == {k for k, _ in ia3.model.named_parameters() if k.startswith("ia3_l.")}
        by_layer = {k.removeprefix("ia3_l.default.").replace("__", "."): v for k, v in own.items()}
        assert by_layer.keys() == {k.removeprefix("base_model.model.").removesuffix(".ia3_l") for k in saved}
        for k, v in saved.items():
            assert torch.equal(by_layer[k.removeprefix("base_model.model.").removesuffix(".ia3_l")], v.flatten()), k

        ours, theirs = _load_both(directory)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)
        if name in ("final", "checkpoint-4"):  # the end of training
            assert _close(saved, _vectors(ia3.model))
            torch.testing.assert_close(ours, trained, rtol=0, atol=ATOL)
        else:
            assert _max_diff(saved, _vectors(ia3.model)) > 1e-3  # not the final vectors
        if name != "final":  # PEFT's checkpoint of the same step holds the same vectors
            assert _close(saved, load_file(os.path.join(ref.out, name, "adapter_model.safetensors")))

    config = peft.PeftConfig.from_pretrained(str(final))
    assert isinstance(config, peft.IA3Config)
    assert set(config.target_modules) == set(ref.model.peft_config["default"].target_modules)


# --- 3. resuming, best model at the end --------------------------------------------------------
def test_resume_from_checkpoint_matches_peft(runs, tmp_path):
    resumed = {}
    for kind in ("peft", "ia3"):
        checkpoint = os.path.join(runs[kind].out, "checkpoint-2")
        checkpoint_vectors = load_file(os.path.join(checkpoint, "adapter_model.safetensors"))
        assert _max_diff(checkpoint_vectors, INITIAL) > 0.1  # resuming must load them to pass
        resumed[kind] = _train(kind, tmp_path / kind, resume=checkpoint)
        assert resumed[kind].trainer.state.global_step == 4

    # PEFT first: resuming from its checkpoint continues exactly as its uninterrupted run
    assert _close(_vectors(resumed["peft"].model), _vectors(runs["peft"].model))
    _assert_same_history(resumed["peft"].trainer, runs["peft"].trainer, "loss")
    # so does ia3fx, and it ends where PEFT's resumed run ends
    for other in (runs["ia3"], resumed["peft"]):
        assert _close(_vectors(resumed["ia3"].model), _vectors(other.model))
        for key in ("loss", "grad_norm", "eval_loss"):
            _assert_same_history(resumed["ia3"].trainer, other.trainer, key)


def test_load_best_model_at_end(tmp_path):
    best = {
        kind: _train(
            kind, tmp_path / kind, disjoint_eval=True,
            load_best_model_at_end=True, metric_for_best_model="eval_loss",
        )
        for kind in ("peft", "ia3")
    }
    ia3, ref = best["ia3"], best["peft"]
    _assert_same_history(ia3.trainer, ref.trainer, "eval_loss")
    chosen = ia3.trainer.state.best_model_checkpoint
    assert chosen is not None
    assert os.path.basename(chosen) == os.path.basename(ref.trainer.state.best_model_checkpoint)
    evals = dict(_history(ia3.trainer, "eval_loss"))
    assert os.path.basename(chosen) == f"checkpoint-{min(evals, key=evals.get)}"
    assert os.path.basename(chosen) != "checkpoint-4"  # the test only means something if it is not the last

    vectors = _vectors(ia3.model)
    assert _close(vectors, load_file(os.path.join(chosen, "adapter_model.safetensors")), atol=0)
    last = load_file(os.path.join(ia3.out, "checkpoint-4", "adapter_model.safetensors"))
    assert _max_diff(vectors, last) > 1e-3  # really loaded: the last step's vectors were replaced
    assert _close(vectors, _vectors(ref.model))
    # the graphs read the loaded vectors
    batch = token_inputs("llama", batch=2, seq=9, seed=4, mask=True)
    torch.testing.assert_close(_logits(ia3.model, batch), _logits(ref.model, batch), rtol=0, atol=ATOL)


# --- 4. TRL's SFTTrainer -----------------------------------------------------------------------
def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0", pad_token="t1", eos_token="t2")


def _text_dataset() -> datasets.Dataset:
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(6, 14, (16,), generator=g)
    texts = [" ".join(f"t{int(i)}" for i in torch.randint(3, VOCAB, (int(n),), generator=g)) for n in lengths]
    return datasets.Dataset.from_dict({"text": texts})


SFT_STEPS = 3


def _sft(kind: str, out):
    from trl import SFTConfig, SFTTrainer

    kwargs = dict(
        output_dir=str(out), max_steps=SFT_STEPS, per_device_train_batch_size=4, learning_rate=0.1,
        logging_steps=1, save_strategy="no", use_cpu=True, report_to=[], disable_tqdm=True,
    )
    args = SFTConfig(**kwargs)  # SFTConfig's defaults otherwise: bf16 autocast, gradient checkpointing
    common = dict(args=args, train_dataset=_text_dataset(), processing_class=_tokenizer())
    if kind == "ia3":
        model = _adapted("ia3")
        trainer = SFTTrainer(model=model, **common)
        assert trainer.model is model
    else:  # PEFT wraps the plain model itself, from a config
        trainer = SFTTrainer(model=tiny_llama(), peft_config=peft.IA3Config(), **common)
        peft.set_peft_model_state_dict(trainer.model, INITIAL)  # before train(): the optimizer is made there
        model = trainer.model
    assert _close(_vectors(model), INITIAL)
    trainer.train()
    return trainer, model


def test_sft_trainer_matches_peft(tmp_path):
    peft_a, peft_model_a = _sft("peft", tmp_path / "peft_a")
    peft_b, peft_model_b = _sft("peft", tmp_path / "peft_b")
    trainer, model = _sft("ia3", tmp_path / "ia3")
    assert trainer.args.gradient_checkpointing and trainer.args.bf16  # SFTConfig's defaults

    # PEFT against itself under this precision: how close two identical runs come (bit-exact on CPU,
    # as is ia3fx against PEFT, in bf16 autocast as in fp32)
    spread = max(
        _max_diff(_vectors(peft_model_a), _vectors(peft_model_b)),
        *(abs(x - y) for key in ("loss", "grad_norm")
          for (_, x), (_, y) in zip(_history(peft_a, key), _history(peft_b, key))),
    )
    tol = ATOL + spread

    grad_norms = _history(trainer, "grad_norm")
    assert [s for s, _ in grad_norms] == list(range(1, SFT_STEPS + 1))
    assert all(g > 0 for _, g in grad_norms), grad_norms
    for key in ("loss", "grad_norm"):
        _assert_same_history(trainer, peft_a, key, atol=tol)
    vectors = _vectors(model)
    assert _max_diff(vectors, INITIAL) > 0.05
    assert _max_diff(vectors, _vectors(peft_model_a)) <= tol

    # each block ran its graph inside a checkpoint: once forward, once recomputed in backward
    layers = model.model.model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert _counters(model) == {f"model.layers.{i}": (2 * SFT_STEPS, 0) for i in range(len(layers))}


# --- 5. no silent bypass -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def three_models():
    """(ia3fx, PEFT, untouched base copy) with the same non-trivial vectors; the copy of the base is
    made before ia3fx adapts the model in place."""
    model = tiny_llama()
    base = copy.deepcopy(model)
    ia3 = ia3fx.get_ia3_model(model, ia3fx.IA3Config())
    ia3.load_adapter_state_dict(INITIAL)
    pm = peft.get_peft_model(tiny_llama(), peft.IA3Config())
    peft.set_peft_model_state_dict(pm, INITIAL)
    assert ia3.get_base_model() is model  # adapted in place
    assert ia3.base_model is model.model and ia3.model.model is model.model
    return ia3, pm, base


def _layer_inputs(base, batch: dict) -> tuple[tuple, dict]:
    """What the base model's forward hands its first decoder layer."""
    seen: dict = {}
    handle = base.model.layers[0].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(args=args, kwargs=dict(kwargs)), with_kwargs=True
    )
    try:
        with torch.no_grad():
            base(**batch, use_cache=False)
    finally:
        handle.remove()
    return seen["args"], seen["kwargs"]


# how each path reaches the same thing in the ia3fx model, the PEFT model and the plain base model
PATHS = {
    "ia3(...)": (lambda m: m, lambda p: p, lambda b: b),
    "ia3.model(...)": (lambda m: m.model, lambda p: p.get_base_model(), lambda b: b),
    "ia3.get_base_model()(...)": (lambda m: m.get_base_model(), lambda p: p.get_base_model(), lambda b: b),
    "ia3.base_model(...)": (lambda m: m.base_model, lambda p: p.get_base_model().model, lambda b: b.model),
    "ia3.model.model(...)": (lambda m: m.model.model, lambda p: p.get_base_model().model, lambda b: b.model),
    "layers[0](...)": (
        lambda m: m.model.model.layers[0],
        lambda p: p.get_base_model().model.layers[0],
        lambda b: b.model.layers[0],
    ),
}
# (train mode, use_cache, which path the blocks must take: "graph", "eager" (their own forward, the
# adapted layers scaled by hooks) or "any")
MODES = {
    "eval": (False, False, "graph"),
    "eval-kv-cache": (False, True, "eager"),  # a cache sends the blocks down their own forward + hooks
    "train": (True, False, "graph"),
    # the model's own default (config.use_cache=True): IA3Model's forward turns the cache off in
    # training; called directly, the inner models build one, and their blocks then run eagerly
    "train-default": (True, None, "any"),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("path", list(PATHS))
def test_no_silent_bypass(three_models, path, mode):
    from transformers.cache_utils import DynamicCache

    ia3, pm, base = three_models
    train, use_cache, expect = MODES[mode]
    if path == "ia3(...)" and mode == "train-default":
        expect = "graph"  # IA3Model's forward: no cache in training
    for m in (ia3, pm, base):
        m.train(train)
    batch = token_inputs("llama", batch=2, seq=9, seed=4, mask=True)
    layer_call = path == "layers[0](...)"
    if layer_call:
        layer_args, layer_kwargs = _layer_inputs(base, batch)

    def call(module, root) -> torch.Tensor:
        with torch.no_grad():
            if layer_call:
                kwargs = dict(layer_kwargs)
                if use_cache:  # a fresh cache for each model
                    kwargs.update(use_cache=True, cache=DynamicCache(config=root.config))
                return module(*layer_args, **kwargs)
            kwargs = dict(batch) if use_cache is None else {**batch, "use_cache": use_cache}
            out = module(**kwargs)
            return out.logits if hasattr(out, "logits") else out.last_hidden_state

    get_ia3, get_peft, get_base = PATHS[path]
    before = _counters(ia3)
    ours = call(get_ia3(ia3), ia3.model)
    after = _counters(ia3)
    theirs = call(get_peft(pm), pm.get_base_model())
    plain = call(get_base(base), base)

    # the adapter was applied, the way this mode must apply it, on every block the call reached
    reached = ["model.layers.0"] if layer_call else list(after)
    for name in after:
        graph, eager = (after[name][i] - before[name][i] for i in (0, 1))
        if name not in reached:
            assert (graph, eager) == (0, 0), name
        else:
            want = {"graph": [(1, 0)], "eager": [(0, 1)], "any": [(1, 0), (0, 1)]}[expect]
            assert (graph, eager) in want, (name, graph, eager)
    assert (ours - plain).abs().max().item() > 1e-3  # the adapter changes the output...
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)  # ...exactly as PEFT's does


def test_generate_applies_the_adapter(three_models):
    ia3, pm, base = three_models
    for m in (ia3, pm, base):
        m.eval()
    ids = token_inputs("llama", batch=2, seq=6, seed=7)["input_ids"]
    kwargs = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    before = _counters(ia3)
    with torch.no_grad():
        ours = ia3.generate(input_ids=ids, **kwargs)
        theirs = pm.generate(input_ids=ids, **kwargs)
        plain = base.generate(input_ids=ids, **kwargs)
    after = _counters(ia3)
    assert all(after[n][1] - before[n][1] == 4 for n in after)  # each decoding step, scaled by hooks
    assert torch.equal(ours.sequences, theirs.sequences)
    for a, b, c in zip(ours.scores, theirs.scores, plain.scores):
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL)
        assert (a - c).abs().max().item() > 1e-3
