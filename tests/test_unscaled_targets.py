"""No targeted layer may end up with a vector that scales nothing.

``x @ w.T`` (Falcon's ``FalconLinear``, hand-written layers) is a linear call site; a layer computed
by anything still not recognised is an error naming it, before the model is touched.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import logits, peft_and_ia3
from torch import nn

import ia3fx
from ia3fx.errors import UnscaledTargetError


class TransposedLinear(nn.Linear):
    """As transformers' FalconLinear: ``input @ self.weight.T`` (+ bias)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class MatmulLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight.t()) + self.bias


class MmLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = torch.mm(x.reshape(-1, x.shape[-1]), self.weight.transpose(0, 1))
        return flat.reshape(*x.shape[:-1], -1)


class EinsumLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bsi,oi->bso", x, self.weight)


class HandWritten(nn.Module):
    """Linear layers written with matmul in three spellings, and one computed by an op that is no linear."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.up = TransposedLinear(8, 16, bias=bias)
        self.mid = MatmulLinear(16, 16)
        self.down = MmLinear(16, 8, bias=False)
        self.odd = EinsumLinear(8, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.odd(self.down(self.mid(torch.relu(self.up(x)))))


def _hand_written(bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return HandWritten(bias).eval()


X = torch.randn(2, 5, 8)
KW = {"target_modules": ["up", "mid", "down"], "feedforward_modules": ["down"]}


@pytest.mark.parametrize("bias", [True, False])
def test_matmul_with_a_transposed_weight_is_a_call_site_equal_to_peft(bias):
    pm, ia3 = peft_and_ia3(_hand_written(bias), KW, example_inputs=(X,))
    sites = {s.name: s for s in ia3.call_sites if s.targeted}
    assert set(sites) == {"up", "mid", "down"}
    assert sites["up"].bias == ("up.bias" if bias else None)  # the bias add is part of the layer
    assert sites["mid"].output is not None  # the output scale goes after "+ self.mid.bias"
    with torch.no_grad():
        base = pm.get_base_model()
        with pm.disable_adapter():
            unadapted = base(X)
        out, ref = ia3(X), pm(X)
    assert (out - unadapted).abs().max() > 1e-2  # the adapter does something
    assert torch.equal(out, ref)
    # gradients of the vectors equal PEFT's
    ia3.train(), pm.train()
    ia3(X).square().sum().backward()
    pm(X).square().sum().backward()
    ours = {n.split(".")[-1]: p.grad for n, p in ia3.named_parameters() if p.requires_grad}
    theirs = {n.split(".")[-3]: p.grad.reshape(-1) for n, p in pm.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k].reshape(-1), theirs[k], rtol=1e-5, atol=1e-6)


def test_matmul_sites_merge_and_fold_exactly():
    _, ia3 = peft_and_ia3(_hand_written(), KW, example_inputs=(X,))
    with torch.no_grad():
        adapted = ia3(X)
        merged_graph = ia3.merged_graph_module()
        assert not [n for n in merged_graph.graph.nodes if n.meta.get("ia3fx")]
        torch.testing.assert_close(merged_graph(X), adapted, rtol=1e-6, atol=1e-6)
        merged = ia3.merge_and_unload()
        torch.testing.assert_close(merged(X), adapted, rtol=1e-6, atol=1e-6)


def test_a_target_computed_by_an_unrecognised_op_is_refused_and_nothing_changes():
    model = _hand_written()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(UnscaledTargetError, match=r"odd runs .*einsum"):
        ia3fx.get_ia3_model(model, ia3fx.IA3Config(target_modules=["up", "odd"], feedforward_modules=[]), (X,))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert "forward" not in vars(model)
    with pytest.raises(UnscaledTargetError, match="exclude_modules"):
        ia3fx.plan(model, ia3fx.IA3Config(target_modules=["odd"], feedforward_modules=[]), (X,))


def test_a_bare_parameter_is_a_layer_when_a_recognised_op_reads_it():
    # a bare parameter read through mm with its transpose *is* a site (PEFT, which wraps modules,
    # cannot scale it at all); through einsum it is not
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 8))
            self.v = nn.Parameter(torch.randn(4, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.mm(x, self.w.T) + torch.einsum("bi,oi->bo", x, self.v)

    x = torch.randn(3, 8)
    model = Functional()
    ia3 = ia3fx.get_ia3_model(model, ia3fx.IA3Config(target_modules=["w"], feedforward_modules=[]), (x,))
    assert [s.name for s in ia3.call_sites if s.targeted] == ["w"]
    vec = ia3.get_vector("w")
    with torch.no_grad():
        vec.copy_(torch.tensor([0.5, 2.0, -1.0, 3.0]))
        expected = torch.mm(x, model.w.T) * vec + torch.einsum("bi,oi->bo", x, model.v)
        torch.testing.assert_close(ia3(x), expected)
    # ``v`` is no module and no call site: not a layer at all, so the entry matches nothing
    with pytest.warns(UserWarning, match=r"target_modules entry 'v' matches no layer"):
        ia3fx.get_ia3_model(Functional(), ia3fx.IA3Config(target_modules=["w", "v"], feedforward_modules=[]), (x,))


def test_adding_an_adapter_that_targets_an_unrecognised_layer_changes_nothing():
    ia3 = ia3fx.get_ia3_model(_hand_written(), ia3fx.IA3Config(**KW), (X,))
    with pytest.raises(UnscaledTargetError, match="odd"):
        ia3.add_adapter("other", ia3fx.IA3Config(target_modules=["odd"], feedforward_modules=[]))
    assert list(ia3.ia3_l) == ["default"]
    assert list(ia3.peft_config) == ["default"]


def test_a_target_that_the_traced_call_never_runs_is_warned():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x)

    with pytest.warns(UserWarning, match=r"not run by the traced call \(b\)"):
        ia3fx.get_ia3_model(Branchy(), ia3fx.IA3Config(target_modules=["a", "b"], feedforward_modules=[]), (torch.randn(2, 4),))


def test_falcon_layers_are_scaled_in_every_path():
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    config = FalconConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=False, bias=True
    )
    kw = {"target_modules": ["query_key_value", "dense", "dense_4h_to_h"], "feedforward_modules": ["dense_4h_to_h"]}
    pm, ia3 = peft_and_ia3(FalconForCausalLM(config).eval(), kw)
    ids = torch.randint(1, 64, (2, 6))
    with torch.no_grad():
        ref = logits(pm(input_ids=ids))
        with pm.disable_adapter():
            base = logits(pm(input_ids=ids))
        assert (ref - base).abs().max() > 1e-2
        assert torch.equal(logits(ia3(input_ids=ids)), ref)  # block graphs
        assert sum(r["graph"] for r in ia3.block_runs().values()) == 2
        whole = ia3.graph_module  # the graph export and drawing use: every layer scaled
        scaled = {s.name for s in ia3.call_sites if s.targeted}
        assert len(scaled) == 2 * 3
        torch.testing.assert_close(logits(whole(input_ids=ids)), ref, rtol=1e-6, atol=1e-6)
        merged = ia3.merged_graph_module()
        torch.testing.assert_close(logits(merged(input_ids=ids)), ref, rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_model = copy.deepcopy(ia3).merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(logits(merged_model(input_ids=ids)), ref, rtol=1e-5, atol=1e-5)
