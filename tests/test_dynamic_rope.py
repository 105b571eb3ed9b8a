"""Dynamic NTK RoPE (``rope_type="dynamic"``) in the whole-model graph (issue 14): transformers
decides in Python, on ``max(position_ids)``, whether to grow the frequencies; the traced graph
computes that choice as a ``where`` and equals a freshly loaded model at every length."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers as T
from conftest import peft_and_ia3

import ia3fx

ORIGINAL = 16  # max_position_embeddings: longer sequences take the grown frequencies


def _llama(rope_type: str = "dynamic") -> T.LlamaForCausalLM:
    rope = {"rope_type": rope_type, "rope_theta": 10000.0}
    if rope_type == "dynamic":
        rope["factor"] = 2.0
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=ORIGINAL,
                           rope_parameters=rope, use_cache=False)
    return T.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def adapted():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model, ia3 = peft_and_ia3(_llama(), {})
        graph = ia3.graph_module  # traced on the default inputs (8 tokens)
    return peft_model, ia3, graph


def _ids(length: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(length))


@pytest.mark.parametrize("length", [5, ORIGINAL, ORIGINAL + 1, 40])
def test_the_whole_graph_equals_a_fresh_peft_model_at_every_length(adapted, length):
    peft_model, _, graph = adapted
    fresh = copy.deepcopy(peft_model)  # eager dynamic RoPE keeps state between calls: start clean
    x = _ids(length)
    with torch.no_grad():
        expected = fresh(input_ids=x).logits
        with fresh.disable_adapter():
            assert (fresh(input_ids=x).logits - expected).abs().max() > 1e-3  # the adapter acts
        got = graph(input_ids=x).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_long_sequences_take_the_grown_frequencies():
    """Past the original length the dynamic model differs from plain RoPE, below it not: the
    graph's ``where`` picks the grown branch where transformers does."""
    graphs = {}
    for rope in ("dynamic", "default"):
        model = _llama(rope)
        graphs[rope] = ia3fx.get_ia3_model(model, ia3fx.IA3Config()).graph_module
    with torch.no_grad():
        short, long = _ids(8), _ids(40)
        torch.testing.assert_close(graphs["dynamic"](input_ids=short).logits, graphs["default"](input_ids=short).logits)
        assert (graphs["dynamic"](input_ids=long).logits - graphs["default"](input_ids=long).logits).abs().max() > 1e-4


def test_growing_sequences_equal_the_stateful_eager_model(adapted):
    """Generation only grows the sequence: there the stateful eager model and the graph agree."""
    peft_model, _, graph = adapted
    eager = copy.deepcopy(peft_model)
    with torch.no_grad():
        for length in (6, 20, 33, 47):
            x = _ids(length)
            torch.testing.assert_close(graph(input_ids=x).logits, eager(input_ids=x).logits, rtol=0, atol=1e-5)


def test_tracing_leaves_the_rotary_module_as_it_was(adapted):
    _, ia3, _ = adapted
    rotary = ia3.model.model.rotary_emb
    assert "forward" not in rotary.__dict__
    torch.testing.assert_close(rotary.inv_freq, rotary.original_inv_freq)


def test_a_pt2_export_runs_the_grown_branch(adapted, tmp_path):
    peft_model, ia3, _ = adapted
    path = ia3fx.export(ia3, tmp_path / "model.pt2", "pt2")
    program = torch.export.load(path).module()
    x = _ids(30)
    with torch.no_grad():
        expected = copy.deepcopy(peft_model)(input_ids=x).logits
        torch.testing.assert_close(program(input_ids=x).logits, expected, rtol=0, atol=1e-5)
