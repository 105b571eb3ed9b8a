"""Parity with PEFT itself: same base weights, same non-trivial vectors (and modules_to_save
copies), moved from PEFT into ia3fx through PEFT's own state dict; the logits and the parameter
counts must agree.
"""

from __future__ import annotations

import copy
import functools

import peft
import pytest
import torch
from conftest import (
    custom_input,
    custom_model,
    logits,
    peft_and_ia3,
    tiny_bert_seq_cls,
    tiny_gpt2,
    tiny_llama,
    tiny_opt,
    tiny_t5,
    token_inputs,
)

import ia3fx

ATOL = 1e-5

T5_TARGETS = r".*\.(SelfAttention|EncDecAttention)\.(k|v)|.*\.DenseReluDense\.w[io]"
T5_FF = r".*\.DenseReluDense\.w[io]"

# (name, factory, family for inputs, PEFT/ia3fx IA3Config kwargs)
TRANSFORMERS_CASES = [
    ("llama-defaults", tiny_llama, "llama", {}),
    ("gpt2-conv1d-defaults", tiny_gpt2, "gpt2", {}),
    ("bert-seq-cls", tiny_bert_seq_cls, "bert", {"task_type": "SEQ_CLS"}),
    ("opt-defaults", tiny_opt, "opt", {}),
    ("t5-regex", tiny_t5, "t5", {"target_modules": T5_TARGETS, "feedforward_modules": T5_FF}),
    ("llama-all-linear", tiny_llama, "llama", {"target_modules": "all-linear"}),
]

# PEFT's tests/test_custom_models.py IA3 rows (plus grouped convs), input arange(90).view(9, 10)
CUSTOM_CASES = [
    ("Vanilla MLP 1 IA3", "MLP", {"target_modules": "lin0", "feedforward_modules": []}),
    ("Vanilla MLP 2 IA3", "MLP", {"target_modules": "lin0", "feedforward_modules": "lin0"}),
    ("Vanilla MLP 3 IA3", "MLP", {"target_modules": ["lin0"], "feedforward_modules": []}),
    ("Vanilla MLP 4 IA3", "MLP", {"target_modules": ["lin0"], "feedforward_modules": ["lin0"]}),
    ("Vanilla MLP 5 IA3", "MLP", {"target_modules": ["lin1"], "feedforward_modules": []}),
    ("Vanilla MLP 6 IA3", "MLP", {"target_modules": ["lin1"], "feedforward_modules": ["lin1"]}),
    ("Vanilla MLP 7 IA3", "MLP", {"target_modules": ["lin0", "lin1"], "feedforward_modules": []}),
    (
        "Vanilla MLP 8 IA3",
        "MLP",
        {"target_modules": ["lin0", "lin1"], "feedforward_modules": ["lin0", "lin1"]},
    ),
    (
        "Vanilla MLP 9 IA3",
        "MLP",
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "feedforward_modules": ["lin0"]},
    ),
    ("transformers Conv1D 1 IA3", "EmbConv1D", {"target_modules": ["conv1d"], "feedforward_modules": ["conv1d"]}),
    (
        "transformers Conv1D 2 IA3",
        "EmbConv1D",
        {"target_modules": ["conv1d", "lin0"], "feedforward_modules": ["conv1d", "lin0"]},
    ),
    (
        "transformers Conv1D 3 IA3",
        "EmbConv1D",
        {"target_modules": ["conv1d"], "feedforward_modules": ["conv1d"], "modules_to_save": ["lin0"]},
    ),
    ("transformers Conv1D 4 IA3", "EmbConv1D", {"target_modules": ["conv1d"], "feedforward_modules": []}),
    ("Conv2d 1 IA3", "Conv2d", {"target_modules": ["conv2d"], "feedforward_modules": []}),
    ("Conv2d 2 IA3", "Conv2d", {"target_modules": ["conv2d"], "feedforward_modules": ["conv2d"]}),
    ("Conv2d 3 IA3", "Conv2d", {"target_modules": ["conv2d", "lin0"], "feedforward_modules": []}),
    ("Conv2d 4 IA3", "Conv2d", {"target_modules": ["conv2d", "lin0"], "feedforward_modules": ["conv2d"]}),
    (
        "Conv2d 5 IA3",
        "Conv2d",
        {"target_modules": ["conv2d", "lin0"], "feedforward_modules": ["conv2d", "lin0"]},
    ),
    ("Conv2d groups 1 IA3", "Conv2dGroups", {"target_modules": ["conv2d"], "feedforward_modules": []}),
    (
        "Conv2d groups 2 IA3",
        "Conv2dGroups",
        {"target_modules": ["conv2d", "lin0"], "feedforward_modules": ["conv2d"]},
    ),
    ("Conv3d 1 IA3", "Conv3d", {"target_modules": ["conv3d"], "feedforward_modules": []}),
    ("Conv3d 2 IA3", "Conv3d", {"target_modules": ["conv3d"], "feedforward_modules": ["conv3d"]}),
    ("Conv3d 3 IA3", "Conv3d", {"target_modules": ["conv3d", "lin0"], "feedforward_modules": []}),
    ("Conv3d 4 IA3", "Conv3d", {"target_modules": ["conv3d", "lin0"], "feedforward_modules": ["conv3d"]}),
    (
        "Conv3d 5 IA3",
        "Conv3d",
        {"target_modules": ["conv3d", "lin0"], "feedforward_modules": ["conv3d", "lin0"]},
    ),
]

# custom models whose forward symbolic_trace can follow (Conv3d branches on X.dim())
SYMBOLIC_OK = {"MLP", "EmbConv1D", "Conv2d", "Conv2dGroups"}
# another batch size for each custom model's input, where its forward allows one
OTHER_BATCH = {"MLP": (4, 10), "EmbConv1D": (4, 10), "Conv2d": (18, 10), "Conv3d": (18, 10)}


def _ids(cases):
    return [c[0] for c in cases]


def _assert_adapter_is_nontrivial(peft_model, ia3_model):
    """The vectors really are random (not ones), and PEFT and ia3fx hold the same ones."""
    import peft

    peft_sd = peft.get_peft_model_state_dict(peft_model)
    ours = ia3_model.adapter_state_dict()
    assert set(ours) == set(peft_sd)
    vector_keys = [k for k in ours if k.endswith(".ia3_l")]
    assert vector_keys
    for k, v in ours.items():
        assert v.shape == peft_sd[k].shape, k
        torch.testing.assert_close(v, peft_sd[k], rtol=0, atol=0)
    for k in vector_keys:
        assert not torch.allclose(ours[k], torch.ones_like(ours[k])), k


def _assert_same(peft_model, ia3_model, inputs, base=None):
    with torch.no_grad():
        expected = logits(peft_model(**inputs))
        got = logits(ia3_model(**inputs))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
    if base is not None:  # the adapter changes the output: the comparison is not vacuous
        with torch.no_grad():
            plain = logits(base(**inputs))
        assert (plain - expected).abs().max() > 10 * ATOL


# --- transformers families ---------------------------------------------------------------------
@functools.cache
def _adapted(name):
    """One (peft_model, ia3_model, base) per case, shared by the tests of this module (exports are
    the slow part). Tests that change the vectors change PEFT's the same way."""
    _, factory, family, kwargs = CASES_BY_NAME[name]
    model = factory()
    base = copy.deepcopy(model)
    # T5's dummy_inputs carry a decoder_attention_mask; trace the signature the tests call with
    example = token_inputs(family) if family == "t5" else None
    peft_model, ia3_model = peft_and_ia3(model, kwargs, example_inputs=example)
    return peft_model, ia3_model, base


CASES_BY_NAME = {c[0]: c for c in TRANSFORMERS_CASES}


@pytest.mark.parametrize("name, factory, family, kwargs", TRANSFORMERS_CASES, ids=_ids(TRANSFORMERS_CASES))
def test_transformers_parity(name, factory, family, kwargs):
    peft_model, ia3_model, base = _adapted(name)
    _assert_adapter_is_nontrivial(peft_model, ia3_model)

    # which layers are adapted, and how, is PEFT's choice
    peft_layers = {
        n[: -len(".ia3_l.default")]: p.shape
        for n, p in peft_model.base_model.model.named_parameters()
        if n.endswith(".ia3_l.default")
    }
    assert set(ia3_model.targets) == set(peft_layers)
    for layer, target in ia3_model.targets.items():
        assert target.peft_shape == tuple(peft_layers[layer]), layer

    assert ia3_model.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()
    _assert_same(peft_model, ia3_model, token_inputs(family), base=base)


OTHER_SHAPES_CASES = ["llama-defaults", "gpt2-conv1d-defaults", "bert-seq-cls", "t5-regex"]


@pytest.mark.parametrize("name", OTHER_SHAPES_CASES)
def test_transformers_parity_other_shapes(name):
    """Other batch sizes and sequence lengths than the trace's (the dummy inputs, or T5's example)."""
    peft_model, ia3_model, _ = _adapted(name)
    family = CASES_BY_NAME[name][2]
    for batch, seq in [(1, 4), (5, 13), (3, 2)]:
        _assert_same(peft_model, ia3_model, token_inputs(family, batch=batch, seq=seq, seed=batch + seq))


def test_static_trace_retraces_per_shape_and_matches_peft():
    """``dynamic=False``: every size is fixed, a call with other sizes is traced again (once per
    shape), and every graph reads the same vectors."""
    _, factory, family, kwargs = CASES_BY_NAME["llama-defaults"]
    model = factory()
    model.config.use_cache = False  # plain forward calls run the block graphs
    peft_model, dynamic_model = peft_and_ia3(copy.deepcopy(model), kwargs)
    static_model = ia3fx.get_ia3_model(model, ia3fx.IA3Config(**kwargs), token_inputs(family), dynamic=False)
    static_model.load_adapter_state_dict(peft.get_peft_model_state_dict(peft_model))
    graph = static_model.graph_module
    placeholders = [n.meta["val"] for n in graph.graph.nodes if n.op == "placeholder"]
    assert all(isinstance(d, int) for v in placeholders for d in v.shape)  # nothing symbolic
    for batch, seq in [(2, 7), (3, 5), (2, 7), (3, 5)]:
        _assert_same(peft_model, static_model, token_inputs(family, batch=batch, seq=seq, seed=seq))
    # the model runs its block graphs: (2, 7) captured first, (3, 5) once more; dynamic: once
    assert len(static_model.block_graphs) == 2
    for batch, seq in [(2, 7), (3, 5)]:
        _assert_same(peft_model, dynamic_model, token_inputs(family, batch=batch, seq=seq, seed=seq))
    assert len(dynamic_model.block_graphs) == 1


@pytest.mark.parametrize("name", ["llama-defaults", "gpt2-conv1d-defaults", "bert-seq-cls"])
def test_transformers_parity_attention_mask(name):
    """An ``attention_mask`` kwarg gives the blocks a mask tensor: one new block capture, reading
    the same vectors as the first."""
    peft_model, ia3_model, _ = _adapted(name)
    family = CASES_BY_NAME[name][2]
    _assert_same(peft_model, ia3_model, token_inputs(family, batch=2, seq=5, seed=1))
    n_graphs = len(ia3_model.block_graphs)
    for batch, seq in [(3, 9), (2, 12)]:
        _assert_same(peft_model, ia3_model, token_inputs(family, batch=batch, seq=seq, seed=seq, mask=True))
    assert len(ia3_model.block_graphs) == n_graphs + 1  # captured once for the mask, any size
    # every graph reads the one set of vectors: change them, both signatures follow
    with torch.no_grad():
        for p in ia3_model.ia3_l.parameters():
            p.mul_(1.1)
        for pname, p in peft_model.named_parameters():
            if ".ia3_l." in pname:
                p.mul_(1.1)
    _assert_same(peft_model, ia3_model, token_inputs(family, batch=2, seq=6, seed=3, mask=True))
    _assert_same(peft_model, ia3_model, token_inputs(family, batch=2, seq=6, seed=3))
    assert len(ia3_model.block_graphs) == n_graphs + 1


def test_all_linear_llama_does_not_target_lm_head():
    peft_model, ia3_model, _ = _adapted("llama-all-linear")
    assert "lm_head" not in ia3_model.targets
    suffixes = {name.rsplit(".", 1)[-1] for name in ia3_model.targets}
    assert suffixes == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(ia3_model.targets) == 14
    resolved = ia3_model.peft_config["default"].target_modules
    assert set(resolved) == set(peft_model.peft_config["default"].target_modules)
    # the lm_head call site exists in the graph and is not scaled
    assert [s.targeted for s in ia3_model.call_sites if s.name == "lm_head"] == [False]


def test_seq_cls_classifier_copy_is_used():
    """The randomised classifier copy (modules_to_save) drives the ia3fx output, not the original."""
    import peft

    peft_model, ia3_model, base = _adapted("bert-seq-cls")
    sd = peft.get_peft_model_state_dict(peft_model)
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(sd)
    torch.testing.assert_close(
        ia3_model.adapter_state_dict()["base_model.model.classifier.weight"],
        sd["base_model.model.classifier.weight"],
        rtol=0,
        atol=0,
    )
    # the user's classifier is untouched and frozen; the copy trains
    assert not ia3_model.model.classifier.weight.requires_grad
    torch.testing.assert_close(ia3_model.model.classifier.weight, base.classifier.weight, rtol=0, atol=0)
    assert not torch.equal(ia3_model.model.classifier.weight, sd["base_model.model.classifier.weight"])
    copies = [p for n, p in ia3_model.named_parameters() if "classifier" in n and p.requires_grad]
    assert len(copies) == 2


# --- PEFT's custom models ----------------------------------------------------------------------
@pytest.mark.parametrize("name, model_id, kwargs", CUSTOM_CASES, ids=_ids(CUSTOM_CASES))
def test_custom_parity(name, model_id, kwargs):
    x = custom_input()
    model = custom_model(model_id)
    base = copy.deepcopy(model)
    peft_model, ia3_model = peft_and_ia3(model, kwargs, example_inputs=(x,))
    _assert_adapter_is_nontrivial(peft_model, ia3_model)
    assert ia3_model.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()
    _assert_same(peft_model, ia3_model, {"X": x}, base=base)
    # positional calls too
    with torch.no_grad():
        torch.testing.assert_close(ia3_model(x), peft_model(x), rtol=0, atol=ATOL)
    if model_id in OTHER_BATCH:
        g = torch.Generator().manual_seed(0)
        shape = OTHER_BATCH[model_id]
        if model_id == "EmbConv1D":
            other = torch.randint(0, 100, shape, generator=g)
        else:
            other = torch.randn(shape, generator=g) * 10
        _assert_same(peft_model, ia3_model, {"X": other})


@pytest.mark.parametrize(
    "name, model_id, kwargs",
    [c for c in CUSTOM_CASES if c[1] in SYMBOLIC_OK],
    ids=_ids([c for c in CUSTOM_CASES if c[1] in SYMBOLIC_OK]),
)
def test_custom_parity_symbolic_trace(name, model_id, kwargs):
    """Without example inputs a plain module goes through torch.fx.symbolic_trace: same results."""
    x = custom_input()
    peft_model, ia3_model = peft_and_ia3(custom_model(model_id), kwargs, example_inputs=None)
    assert ia3_model.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()
    _assert_same(peft_model, ia3_model, {"X": x})
