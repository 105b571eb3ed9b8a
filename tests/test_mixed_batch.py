"""Several adapters in one batch: ``ia3(**batch, adapter_names=[...])`` and ``generate(..., adapter_names=)``.

The rule everywhere: each row's output (and each adapter's gradient) equals running that row's group
alone with its adapter active, on every path a call can take (block graphs, the hooks of a KV cache,
whole-model graphs, checkpointing), with adapters of different target sets.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from conftest import VOCAB, tiny_bert_seq_cls, tiny_gpt2, tiny_llama, tiny_t5
from torch import nn

import ia3fx
from ia3fx.mixed import BASE, RowMismatchError

# per family: the base model (no dropout) and two adapters' targets (attention-type and feedforward
# sites in each, different sets)
FAMILIES = {
    "llama": (lambda: tiny_llama(), ({"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
                                    {"target_modules": ["q_proj", "up_proj"], "feedforward_modules": ["up_proj"]})),
    "gpt2": (lambda: tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
             ({"target_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"]},
              {"target_modules": ["c_attn", "c_fc"], "feedforward_modules": ["c_fc"]})),
    "bert": (lambda: tiny_bert_seq_cls(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
             ({"target_modules": ["key", "value", "output.dense"], "feedforward_modules": ["output.dense"]},
              {"target_modules": ["query", "intermediate.dense"], "feedforward_modules": ["intermediate.dense"]})),
    "t5": (lambda: tiny_t5(dropout_rate=0.0),
           ({"target_modules": ["k", "v", "wo"], "feedforward_modules": ["wo"]},
            {"target_modules": ["q", "wi"], "feedforward_modules": ["wi"]})),
}
NAMES = ["b", "a", BASE, "b", "a"]


def _spread(ia3, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ia3.ia3_l.parameters():
            p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))


def _adapted(family: str, active: str = "a"):
    build, (cfg_a, cfg_b) = FAMILIES[family]
    ia3 = ia3fx.get_ia3_model(build(), ia3fx.IA3Config(**cfg_a), adapter_name="a")
    ia3.add_adapter("b", ia3fx.IA3Config(**cfg_b))
    ia3.add_adapter("c", ia3fx.IA3Config(**cfg_a))  # active in some tests, in no batch
    _spread(ia3)
    ia3.set_adapter(active)
    return ia3


def _inputs(family: str, batch: int = len(NAMES), seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {"input_ids": torch.randint(1, VOCAB, (batch, 7), generator=g)}
    if family == "t5":
        out["decoder_input_ids"] = torch.randint(1, VOCAB, (batch, 5), generator=g)
    if family in ("llama", "gpt2", "t5"):
        out["use_cache"] = False  # the block graphs (a cache sends blocks down the hook path)
    return out


def _rows(inputs: dict, rows: list[int]) -> dict:
    return {k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _out(result) -> torch.Tensor:
    return result.logits if hasattr(result, "logits") else result


def _per_group(ia3, inputs: dict, names: list[str], fn, trainable: list[str] | None = None) -> None:
    """``fn(rows, output)`` for each group of rows run alone with its adapter (or none)."""
    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name]
        if name == BASE:
            with ia3.disable_adapter():
                fn(rows, ia3(**_rows(inputs, rows)))
        else:
            ia3.set_adapter(name)
            if trainable:
                ia3.set_requires_grad(trainable)
            fn(rows, ia3(**_rows(inputs, rows)))


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    scale = want.abs().max().item() + 1.0
    diff = (got - want).abs().max().item()
    assert diff <= 1e-6 * scale, f"{what}: max |diff| {diff:.3g}"


def _expected(ia3, inputs: dict, names: list[str]) -> torch.Tensor:
    active = list(ia3.active_adapters)
    parts: dict[int, torch.Tensor] = {}

    def keep(rows, out):
        for j, i in enumerate(rows):
            parts[i] = _out(out)[j]

    with torch.no_grad():
        _per_group(ia3, inputs, names, keep)
    ia3.set_adapter(active)
    return torch.stack([parts[i] for i in range(len(names))])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_row_equals_its_adapter_alone(family):
    ia3 = _adapted(family, active="c")  # the active adapter is in no row: it must not leak in
    inputs = _inputs(family)
    with torch.no_grad():
        mixed = _out(ia3(**inputs, adapter_names=NAMES))
    want = _expected(ia3, inputs, NAMES)
    _assert_close(mixed, want, family)
    assert (want[0] - want[1]).abs().max() > 1e-3  # the adapters (and the base) differ: the test can fail
    runs = ia3.block_runs()
    assert sum(r["graph"] for r in runs.values()) > 0 and sum(r["eager"] for r in runs.values()) == 0
    assert ia3.active_adapters == ["c"]  # the call changed no state


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_with_a_kv_cache_the_hooks_choose_per_row(family):
    ia3 = _adapted(family)
    inputs = {**_inputs(family), "use_cache": True}
    with torch.no_grad():
        mixed = _out(ia3(**inputs, adapter_names=NAMES))
    _assert_close(mixed, _expected(ia3, inputs, NAMES), family)
    assert sum(r["eager"] for r in ia3.block_runs().values()) > 0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_train_mode_each_adapter_gets_the_gradient_of_its_rows(family):
    ia3 = _adapted(family)
    ia3.train()
    ia3.set_requires_grad(["a", "b"])
    inputs = _inputs(family)

    def loss_of(out) -> torch.Tensor:
        return _out(out).float().pow(2).mean(dim=tuple(range(1, _out(out).dim()))).sum()

    loss_of(ia3(**inputs, adapter_names=NAMES)).backward()
    mixed = {n: p.grad.clone() for n, p in ia3.named_parameters() if p.grad is not None}
    ia3.zero_grad(set_to_none=True)

    def backward(rows, out):
        if out is not None and _out(out).requires_grad:
            loss_of(out).backward()

    _per_group(ia3, inputs, NAMES, backward, trainable=["a", "b"])
    want = {n: p.grad for n, p in ia3.named_parameters() if p.grad is not None}
    assert set(mixed) == set(want) and any(".a." in n for n in want) and any(".b." in n for n in want)
    assert not any(".c." in n for n in mixed)  # an adapter in no row gets no gradient
    for name, grad in want.items():
        _assert_close(mixed[name], grad, name)


def test_a_frozen_adapter_in_a_training_batch_is_warned_about():
    ia3 = _adapted("llama")
    ia3.train()  # only the active adapter "a" trains
    with pytest.warns(UserWarning, match=r"\['b'\] are frozen.*set_requires_grad"):
        ia3(**_inputs("llama"), adapter_names=NAMES)


def test_gradient_checkpointing_recomputes_with_the_rows_of_its_call():
    ia3 = _adapted("llama")
    ia3.train()
    ia3.set_requires_grad(["a", "b"])
    inputs = _inputs("llama")
    ia3(**inputs, adapter_names=NAMES).logits.pow(2).mean().backward()
    want = {n: p.grad.clone() for n, p in ia3.named_parameters() if p.grad is not None}
    ia3.zero_grad(set_to_none=True)
    ia3.gradient_checkpointing_enable({"use_reentrant": False})
    ia3(**inputs, adapter_names=NAMES).logits.pow(2).mean().backward()  # recomputed in backward
    got = {n: p.grad for n, p in ia3.named_parameters() if p.grad is not None}
    assert set(got) == set(want)
    for name in want:
        _assert_close(got[name], want[name], name)


@pytest.mark.parametrize("kwargs", [{}, {"num_beams": 2}, {"num_beams": 2, "num_return_sequences": 2}])
def test_generate_gives_each_prompt_its_adapter(kwargs):
    ia3 = _adapted("llama", active="c")
    prompts = _inputs("llama", batch=3)["input_ids"]
    names = ["a", BASE, "b"]
    out = ia3.generate(prompts, adapter_names=names, max_new_tokens=6, do_sample=False, **kwargs)
    per = out.shape[0] // 3
    for i, name in enumerate(names):
        if name == BASE:
            with ia3.disable_adapter():
                alone = ia3.generate(prompts[i : i + 1], max_new_tokens=6, do_sample=False, **kwargs)
        else:
            ia3.set_adapter(name)
            alone = ia3.generate(prompts[i : i + 1], max_new_tokens=6, do_sample=False, **kwargs)
        assert torch.equal(out[i * per : (i + 1) * per], alone), name
    ia3.set_adapter("a")
    assert not torch.equal(out[:per], ia3.generate(prompts[1:2], max_new_tokens=6, do_sample=False, **kwargs))


def test_mixed_rows_equal_peft_running_each_adapter():
    base = tiny_llama()
    _, (cfg_a, cfg_b) = FAMILIES["llama"]
    ia3 = ia3fx.get_ia3_model(copy.deepcopy(base), ia3fx.IA3Config(**cfg_a), adapter_name="a")
    ia3.add_adapter("b", ia3fx.IA3Config(**cfg_b))
    _spread(ia3)
    pm = peft.get_peft_model(base, peft.IA3Config(**cfg_a), adapter_name="a")
    pm.add_adapter("b", peft.IA3Config(**cfg_b))
    for adapter in ("a", "b"):
        for name in ia3._selections[adapter].targets:
            module = pm.base_model.model.get_submodule(name)
            with torch.no_grad():
                module.ia3_l[adapter].copy_(ia3.get_vector(name, adapter).reshape(module.ia3_l[adapter].shape))
    pm.eval()
    inputs = _inputs("llama")
    with torch.no_grad():
        mixed = ia3(**inputs, adapter_names=NAMES).logits
        for i, name in enumerate(NAMES):
            if name == BASE:
                with pm.disable_adapter():
                    want = pm(**_rows(inputs, [i])).logits
            else:
                pm.set_adapter(name)
                want = pm(**_rows(inputs, [i])).logits
            _assert_close(mixed[i : i + 1], want, f"row {i} ({name})")


class TwoLayer(nn.Module):
    """No transformers blocks: one whole-model graph runs it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_a_whole_model_graph_takes_rows_too():
    torch.manual_seed(0)
    ia3 = ia3fx.get_ia3_model(
        TwoLayer().eval(), ia3fx.IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"]),
        example_inputs=(torch.randn(3, 6),), adapter_name="a",
    )
    ia3.add_adapter("b", ia3fx.IA3Config(target_modules=["fc1"], feedforward_modules=[]))
    _spread(ia3)
    assert not ia3._blocks_mode
    x = {"x": torch.randn(len(NAMES), 6)}
    _assert_close(ia3(**x, adapter_names=NAMES), _expected(ia3, x, NAMES), "whole graph")


class Transposed(nn.Module):
    """A layer that runs on (T, B, n): its leading dim is not the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.transpose(0, 1)).transpose(0, 1)


def test_a_layer_that_mixes_rows_is_refused():
    ia3 = ia3fx.get_ia3_model(Transposed(), ia3fx.IA3Config(target_modules=["proj"], feedforward_modules=[]),
                              example_inputs=(torch.randn(2, 3, 4),), adapter_name="a")
    with pytest.raises(RowMismatchError, match="leading dim"):
        ia3(torch.randn(2, 3, 4), adapter_names=["a", BASE])


# --- refused calls change nothing -----------------------------------------------------------------
def _state(ia3) -> tuple:
    return (list(ia3.active_adapters), {n: p.detach().clone() for n, p in ia3.ia3_l.named_parameters()},
            {n: p.requires_grad for n, p in ia3.ia3_l.named_parameters()})


def _unchanged(before: tuple, ia3) -> None:
    after = _state(ia3)
    assert after[0] == before[0] and after[2] == before[2]
    assert all(torch.equal(before[1][n], t) for n, t in after[1].items())


@pytest.mark.parametrize(
    ("names", "error", "match"),
    [
        (["a", "nope", BASE, "b", "zz"], ValueError, r"unknown adapter name\(s\) \['nope', 'zz'\].*adapters: \['a', 'b', 'c'\]"),
        (["a", "b"], ValueError, "2 names for a batch of 5 rows"),
        ("a", TypeError, "one adapter name per row"),
    ],
)
def test_bad_adapter_names_are_refused(names, error, match):
    ia3 = _adapted("llama")
    before = _state(ia3)
    with pytest.raises(error, match=match):
        ia3(**_inputs("llama"), adapter_names=names)
    with pytest.raises(error, match=match):
        ia3.generate(_inputs("llama")["input_ids"], adapter_names=names, max_new_tokens=2)
    _unchanged(before, ia3)


def test_a_merged_model_refuses_adapter_names():
    ia3 = _adapted("llama")
    ia3.merge_adapter()
    before = _state(ia3)
    with pytest.raises(ValueError, match=r"merged into the weights.*unmerge_adapter\(\)"):
        ia3(**_inputs("llama"), adapter_names=NAMES)
    _unchanged(before, ia3)
    ia3.unmerge_adapter()
    ia3(**_inputs("llama"), adapter_names=NAMES)


def test_disabled_adapters_refuse_adapter_names():
    ia3 = _adapted("llama")
    with ia3.disable_adapter(), pytest.raises(ValueError, match="disable_adapter"):
        ia3(**_inputs("llama"), adapter_names=NAMES)


def test_an_adapter_with_modules_to_save_cannot_share_a_batch():
    ia3 = ia3fx.get_ia3_model(tiny_bert_seq_cls(), ia3fx.IA3Config(modules_to_save=["classifier"]), adapter_name="a")
    ia3.add_adapter("b", ia3fx.IA3Config())
    with pytest.raises(ValueError, match=r"\['a'\] train copies of whole modules \(modules_to_save\)"):
        ia3(**_inputs("bert"), adapter_names=NAMES)
    # rows of adapters without copies run the original module, whatever adapter is active
    names = ["b", BASE, "b", BASE, "b"]
    with torch.no_grad():
        mixed = ia3(**_inputs("bert"), adapter_names=names).logits
    ia3.set_adapter("b")
    with torch.no_grad():
        want_b = ia3(**_inputs("bert")).logits
    _assert_close(mixed[[0, 2, 4]], want_b[[0, 2, 4]], "rows of b")


def test_set_requires_grad_as_peft():
    ia3 = _adapted("llama")
    assert not any(p.requires_grad for p in ia3.ia3_l["b"].parameters())
    ia3.set_requires_grad("b")
    assert all(p.requires_grad for p in ia3.ia3_l["b"].parameters())
    ia3.set_requires_grad(["a", "b"], requires_grad=False)
    assert not any(p.requires_grad for p in ia3.ia3_l.parameters())
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['x'\]"):
        ia3.set_requires_grad(["x"])


def test_peft_ignores_adapter_names_for_ia3_and_ia3fx_does_not():
    """Why this exists: PEFT's IA3 accepts adapter_names and runs the active adapter on every row."""
    base = tiny_llama()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(), adapter_name="a")
    pm.add_adapter("b", peft.IA3Config())
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".ia3_l.b" in name:
                p.fill_(2.0)
    pm.eval()
    inputs = _inputs("llama", batch=2)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        out = pm(**inputs, adapter_names=["a", "b"]).logits  # (docs/mixed-batches.md says so)
        alone = pm(**inputs).logits
    assert torch.equal(out, alone)  # row 1 did not get adapter b
    ia3 = ia3fx.get_ia3_model(base, ia3fx.IA3Config(), adapter_name="a")
    ia3.add_adapter("b", ia3fx.IA3Config())
    with torch.no_grad():
        for p in ia3.ia3_l["b"].parameters():
            p.fill_(2.0)
        ours = ia3(**inputs, adapter_names=["a", "b"]).logits
    assert torch.equal(ours[0], alone[0]) and not torch.allclose(ours[1], alone[1])


class Routed(nn.Module):
    """A layer on the rows a mask selects (as an MoE expert on its routed tokens)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = (x[:, 0] > 0).nonzero().squeeze(1)
        return torch.zeros_like(x).index_add(0, idx, self.proj(x[idx]))


def test_a_layer_on_data_dependent_rows_is_refused():
    ia3 = ia3fx.get_ia3_model(Routed().eval(), ia3fx.IA3Config(target_modules=["proj"], feedforward_modules=[]),
                              example_inputs=(torch.randn(6, 4),), adapter_name="a")
    x = torch.randn(4, 4)
    x[:, 0] = torch.tensor([1.0, 2.0, 1.0, 3.0])  # every row selected: the sizes agree, the rows are still data-dependent
    with pytest.raises(RowMismatchError, match="data-dependent selection of rows"):
        ia3(x, adapter_names=["a", "a", BASE, "a"])
    assert ia3(x).shape == (4, 4)
