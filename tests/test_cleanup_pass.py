"""``cleanup_graph``: the traced graph gets eager attention back (``is_causal=True`` or no mask)
and loses its dead nodes, with outputs (and gradients) bit-identical to the graph before.

Every test compares two traces of the same model, one cleaned: the outputs must be *equal*, not
close, for the traced shape and others, with and without ``attention_mask``, in eval and train.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, tiny_gpt2, tiny_llama, token_inputs
from torch import nn
from torch.export import Dim

import ia3fx
from ia3fx.passes import CleanupResult, cleanup_graph
from ia3fx.passes._lazy import is_stale

SDPA = torch.ops.aten.scaled_dot_product_attention.default
FAMILIES = {"llama": tiny_llama, "gpt2": tiny_gpt2}
SHAPES = [(2, 7), (3, 16), (1, 33), (4, 2)]  # (batch, seq): the traced one and others


def sdpa_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is SDPA]


def mask_of(node):
    return node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")


def logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


def two_traces(model, inputs, train=False):
    before = ia3fx.trace(model, inputs, train=train)
    after = ia3fx.trace(model, inputs, train=train)
    _, result = cleanup_graph(after)
    return before, after, result


def call(gm, inputs, seed=0):
    torch.manual_seed(seed)  # dropout (GPT-2 in train mode) draws the same numbers on both sides
    return logits(gm(**inputs))


def inputs_like(family, batch, seq, mask):
    out = token_inputs(family, batch=batch, seq=seq, seed=batch * 100 + seq, mask=mask)
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_causal_mask_becomes_is_causal_with_identical_outputs(family, train):
    model = FAMILIES[family]()
    before, after, result = two_traces(model, token_inputs(family), train=train)
    attn = sdpa_nodes(after)
    assert attn and result.causal == [n.name for n in attn]
    for node in attn:
        assert mask_of(node) is None and node.kwargs["is_causal"] is True
    for node, old in zip(attn, sdpa_nodes(before), strict=True):  # dropout and scale are kept
        assert node.kwargs["dropout_p"] == (old.args[4] if len(old.args) > 4 else old.kwargs.get("dropout_p", 0.0))
        assert node.kwargs.get("scale") == old.kwargs.get("scale")
    assert result.removed > 20 and len(after.graph.nodes) == len(before.graph.nodes) - result.removed
    for batch, seq in SHAPES:
        x = inputs_like(family, batch, seq, mask=False)
        with torch.no_grad():
            assert torch.equal(call(before, x), call(after, x)), (batch, seq)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_train_mode_gradients_are_identical(family):
    model = FAMILIES[family]()
    before, after, _ = two_traces(model, token_inputs(family), train=True)
    for p in before.parameters():  # both graphs read the model's own parameters
        p.requires_grad_(True)
    x = inputs_like(family, 3, 11, mask=False)
    grads = []
    for gm in (before, after):
        for p in gm.parameters():
            p.grad = None
        call(gm, x).pow(2).mean().backward()
        grads.append({k: p.grad.clone() for k, p in gm.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        assert torch.equal(grads[0][k], grads[1][k]), k


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_attention_mask_input_keeps_its_mask(family, train):
    model = FAMILIES[family]()
    before, after, result = two_traces(model, token_inputs(family, mask=True), train=train)
    assert not result.causal and not result.unmasked
    assert set(result.kept_masks) == {n.name for n in sdpa_nodes(after)}
    assert all("input values" in why for why in result.kept_masks.values())
    assert all(mask_of(n) is not None for n in sdpa_nodes(after))
    for batch, seq in SHAPES[:3]:
        x = inputs_like(family, batch, seq, mask=True)
        with torch.no_grad():
            assert torch.equal(call(before, x), call(after, x)), (batch, seq)


def test_second_cleanup_changes_nothing():
    model = tiny_llama()
    _, after, first = two_traces(model, token_inputs("llama"))
    code = after.code
    _, second = cleanup_graph(after)
    assert first.modified and not second.modified
    assert second == CleanupResult()
    assert after.code == code


def test_dead_nodes_and_their_metadata_checks_are_gone():
    model = tiny_llama()
    _, after, _ = two_traces(model, token_inputs("llama"))
    for node in after.graph.nodes:
        if node.op in ("placeholder", "output", "call_module"):
            continue
        if node.target is torch.ops.aten._assert_tensor_metadata.default:
            subject = node.args[0]  # a check stays only on a tensor something else uses
            assert any(u.target is not node.target for u in subject.users), node.name
            continue
        assert node.users, f"dead node {node.name} left"


def test_sliding_window_mask_is_kept():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
    )
    model = MistralForCausalLM(cfg).eval()
    before, after, result = two_traces(model, token_inputs("llama", seq=16))
    assert not result.causal and set(result.kept_masks) == {n.name for n in sdpa_nodes(after)}
    x = token_inputs("llama", batch=2, seq=20)
    with torch.no_grad():
        assert torch.equal(call(before, x), call(after, x))
        assert torch.allclose(call(after, x), model(**x).logits, atol=1e-5)


def test_encoder_all_true_mask_is_dropped():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    model = BertModel(cfg).eval()
    before, after, result = two_traces(model, token_inputs("bert"))
    assert result.unmasked == [n.name for n in sdpa_nodes(after)] and not result.causal
    assert all(mask_of(n) is None and n.kwargs["is_causal"] is False for n in sdpa_nodes(after))
    for batch, seq in SHAPES[:3]:
        x = inputs_like("bert", batch, seq, mask=False)
        with torch.no_grad():
            assert torch.equal(before(**x).last_hidden_state, after(**x).last_hidden_state)


def test_meta_device_graph_is_cleaned_too():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).eval()
    gm = ia3fx.trace(model, token_inputs("llama"))
    _, result = cleanup_graph(gm)
    assert result.causal == [n.name for n in sdpa_nodes(gm)] and len(result.causal) == 2


# --- masks built by hand -----------------------------------------------------------------------
class MaskedAttention(nn.Module):
    """Self-attention over ``x`` (batch, seq, 8) with a mask computed by ``mask_fn(i, j)``."""

    def __init__(self, mask_fn):
        super().__init__()
        self.mask_fn = mask_fn
        self.register_buffer("tri", torch.ones(64, 64, dtype=torch.bool).tril())

    def forward(self, x):
        q = x.unsqueeze(1)
        i = torch.arange(x.shape[1], device=x.device)
        mask = self.mask_fn(self, x, i[:, None], i[None, :])
        return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)


CASES = {
    "causal": (lambda m, x, i, j: j <= i, "causal"),
    "causal-tril": (lambda m, x, i, j: torch.ones(i.shape[0], j.shape[1], dtype=torch.bool).tril(), "causal"),
    "all-true": (lambda m, x, i, j: (i >= 0) & (j >= 0), "unmasked"),
    "anti-causal": (lambda m, x, i, j: j >= i, "neither the causal pattern"),
    "window-4": (lambda m, x, i, j: (j <= i) & (i - j < 4), "neither the causal pattern"),
    "window-100": (lambda m, x, i, j: (j <= i) & (i - j < 100), "constant 100"),
    "from-buffer": (lambda m, x, i, j: m.tri[: i.shape[0], : j.shape[1]], "get_attr"),
    "from-values": (lambda m, x, i, j: (x[:, :, :1] > -10).unsqueeze(1) & (j <= i), "input values"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hand_built_masks(case):
    fn, expect = CASES[case]
    model = MaskedAttention(fn)
    x = torch.randn(2, 12, 8, generator=torch.Generator().manual_seed(0))
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},))
    before, after = ep.module(), ep.module()
    _, result = cleanup_graph(after)
    if expect == "causal":
        assert len(result.causal) == 1
    elif expect == "unmasked":
        assert len(result.unmasked) == 1
    else:
        (why,) = result.kept_masks.values()
        assert expect in why, why
    for shape in [(2, 12), (3, 5), (1, 40)]:
        y = torch.randn(*shape, 8, generator=torch.Generator().manual_seed(1))
        assert torch.equal(before(y), after(y)), shape
        assert torch.equal(after(y), model(y)), shape


# --- inside get_ia3_model ----------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_adapted_graph_is_cleaned_and_matches_the_base_model(family):
    base = FAMILIES[family]()
    model = ia3fx.get_ia3_model(copy.deepcopy(base), ia3fx.IA3Config(), example_inputs=token_inputs(family))
    attn = sdpa_nodes(model.graph_module)
    assert attn and all(n.kwargs.get("is_causal") is True and mask_of(n) is None for n in attn)
    with torch.no_grad():
        for batch, seq in SHAPES[:3]:
            for mask in (False, True):
                x = inputs_like(family, batch, seq, mask=mask)
                assert torch.allclose(logits(model(**x)), base(**x).logits, atol=1e-5), (batch, seq, mask)


def test_code_generation_waits_for_the_first_call():
    model = ia3fx.get_ia3_model(tiny_llama(), ia3fx.IA3Config(), example_inputs=token_inputs("llama"))
    model.eval()
    graph = model._graph_for((), token_inputs("llama"))  # the whole-model graph: traced and rewritten
    assert is_stale(graph)  # cleanup, insert_scales, ...: one code generation, not one per pass
    x = token_inputs("llama", batch=3, seq=5)
    with torch.no_grad():
        out = logits(graph(**x))
    assert not is_stale(graph)
    assert "is_causal = True" in graph.code and "ia3_l" in graph.code
    with torch.no_grad():  # the model itself runs its block graphs: the same numbers
        assert torch.equal(logits(model(**x, use_cache=False)), out)
