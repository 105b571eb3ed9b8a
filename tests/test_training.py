"""Training behaviour: what trains, what stays frozen, train/eval graphs, the ways a model can be
handed in (plain module with or without example inputs, GraphModule, ExportedProgram, meta
device), and shared vectors for a module called twice."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    MLP,
    custom_input,
    custom_model,
    peft_and_ia3,
    randomize_peft,
    tiny_gpt2,
    tiny_llama,
    token_inputs,
)
from torch import nn

import ia3fx
from ia3fx import IA3Config

MLP_SAVE = dict(target_modules=["lin0"], modules_to_save=["lin1"], feedforward_modules=["lin0"])  # PEFT's MLP 9
MLP_BOTH = dict(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"])


def _is_adapter_param(name: str) -> bool:
    return name.startswith("ia3_l.") or name.startswith("modules_to_save.")


def _base_snapshot(model: ia3fx.IA3Model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


# --- what trains -------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["symbolic_trace", "export"])
def test_only_vectors_and_saved_copies_train(how):
    example = (custom_input(),) if how == "export" else None
    model = ia3fx.get_ia3_model(custom_model("MLP"), IA3Config(**MLP_SAVE), example_inputs=example)
    assert model.graph_module.meta["ia3fx"]["how"] == how
    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable == {n for n in named if _is_adapter_param(n)}
    assert any(n.startswith("ia3_l.") for n in trainable)
    assert {n for n in trainable if n.startswith("modules_to_save.")}  # the lin1 copy: weight and bias
    assert all(not p.requires_grad for p in model.model.parameters())

    x = torch.randn(6, 10)
    loss = F.nll_loss(model(x), torch.tensor([0, 1, 0, 1, 1, 0]))
    loss.backward()
    for n, p in named.items():
        if n in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_only_vectors_train_llama():
    model = ia3fx.get_ia3_model(tiny_llama(), IA3Config())
    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable and trainable == {n for n in named if n.startswith("ia3_l.")}
    assert len(trainable) == 6
    out = model(**token_inputs("llama"))
    out.logits.float().logsumexp(-1).mean().backward()
    for n, p in named.items():
        if n in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_adam_lowers_loss_and_leaves_base_weights_alone():
    torch.manual_seed(0)
    model = ia3fx.get_ia3_model(custom_model("MLP"), IA3Config(**MLP_BOTH), example_inputs=(custom_input(),))
    base_before = _base_snapshot(model)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params
    opt = torch.optim.Adam(params, lr=0.1)
    x = torch.randn(32, 10)
    y = (x[:, 0] > 0).long()
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = F.nll_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    for k, v in model.model.state_dict().items():
        assert torch.equal(v, base_before[k]), k
    assert not torch.allclose(model.get_vector("lin0"), torch.ones(20))


def test_adam_trains_llama_vectors_only():
    model = ia3fx.get_ia3_model(tiny_llama(), IA3Config())
    base_before = _base_snapshot(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    batch = token_inputs("llama", batch=2, seq=12, seed=5)
    ids = batch["input_ids"]
    losses = []
    for _ in range(20):
        opt.zero_grad()
        logits = model(**batch).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for k, v in model.model.state_dict().items():
        assert torch.equal(v, base_before[k]), k
    assert len(model.graph_modules) == 1  # training calls reuse the one graph


def test_saved_copy_trains_original_does_not():
    model = ia3fx.get_ia3_model(custom_model("MLP"), IA3Config(**MLP_SAVE), example_inputs=(custom_input(),))
    original = model.model.lin1.weight.detach().clone()
    key = "base_model.model.lin1.weight"
    copy_before = model.adapter_state_dict()[key]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    x = torch.randn(8, 10)
    for _ in range(3):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    assert torch.equal(model.model.lin1.weight, original)
    assert not torch.equal(model.adapter_state_dict()[key], copy_before)


# --- train vs eval graphs ----------------------------------------------------------------------
def _graphs_run(model):
    """The graphs a model's forward runs: its block graphs, or its whole-model graphs."""
    return model.block_graphs if model._blocks_mode else model.graph_modules


def _assert_train_eval(peft_model, ia3_model, call):
    with torch.no_grad():
        ia3_model.eval()
        peft_model.eval()
        first = call(ia3_model)
        torch.testing.assert_close(call(ia3_model), first, rtol=0, atol=0)  # deterministic
        torch.testing.assert_close(first, call(peft_model), rtol=0, atol=1e-5)
        n_graphs = len(_graphs_run(ia3_model))

        ia3_model.train()
        assert ia3_model.training
        torch.manual_seed(0)
        a = call(ia3_model)
        b = call(ia3_model)
        assert not torch.allclose(a, b)  # dropout is on
        assert not torch.allclose(a, first)
        assert len(_graphs_run(ia3_model)) == n_graphs + 1  # a train graph next to the eval one

        ia3_model.eval()
        torch.testing.assert_close(call(ia3_model), first, rtol=0, atol=0)
        assert len(_graphs_run(ia3_model)) == n_graphs + 1  # the eval graph is cached
        ia3_model.train()
        call(ia3_model)
        assert len(_graphs_run(ia3_model)) == n_graphs + 1  # so is the train graph


@pytest.mark.parametrize("how", ["symbolic_trace", "export"])
def test_train_and_eval_use_different_graphs_mlp(how):
    x = custom_input()
    example = (x,) if how == "export" else None
    peft_model, ia3_model = peft_and_ia3(custom_model("MLP"), MLP_BOTH, example_inputs=example)
    _assert_train_eval(peft_model, ia3_model, lambda m: m(x))


def test_train_and_eval_use_different_graphs_gpt2():
    peft_model, ia3_model = peft_and_ia3(tiny_gpt2(), {})
    batch = token_inputs("gpt2")
    _assert_train_eval(peft_model, ia3_model, lambda m: m(**batch).logits)
    # one block graph per mode: the eval one has dropout off, the train one on
    train_graphs = [g.gm for g in ia3_model.block_graphs if g.training]
    eval_graphs = [g.gm for g in ia3_model.block_graphs if not g.training]
    assert len(train_graphs) == 1 and len(eval_graphs) == 1

    def dropout_flags(gm):
        return [n.args[2] for n in gm.graph.nodes if n.target is torch.ops.aten.dropout.default]

    assert dropout_flags(eval_graphs[0]) and not any(dropout_flags(eval_graphs[0]))
    assert dropout_flags(train_graphs[0]) and all(dropout_flags(train_graphs[0]))
    # the whole-model graph (for drawing and export) is the eval one
    assert dropout_flags(ia3_model.graph_module) and not any(dropout_flags(ia3_model.graph_module))


def test_model_in_train_mode_is_traced_in_train_mode():
    model = custom_model("MLP").train()
    adapted = ia3fx.get_ia3_model(model, IA3Config(**MLP_BOTH), example_inputs=(custom_input(),))
    assert adapted.training
    x = custom_input()
    torch.manual_seed(0)
    assert not torch.allclose(adapted(x), adapted(x))
    assert model.training  # the user's flags are restored after tracing
    assert all(m.training for m in model.modules())


# --- ways to hand a model in -------------------------------------------------------------------
@pytest.mark.parametrize("how", ["symbolic_trace", "export"])
def test_plain_module_with_and_without_example_inputs(how):
    x = custom_input()
    example = (x,) if how == "export" else None
    peft_model, ia3_model = peft_and_ia3(custom_model("MLP"), MLP_SAVE, example_inputs=example)
    assert ia3_model.graph_module.meta["ia3fx"]["how"] == how
    assert ia3_model.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()
    with torch.no_grad():
        torch.testing.assert_close(ia3_model(x), peft_model(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(ia3_model(X=x[:3]), peft_model(X=x[:3]), rtol=0, atol=1e-5)


def _graph_fingerprint(gm: torch.fx.GraphModule):
    return (
        gm.code,
        [(n.op, str(n.target), n.meta.get("ia3fx")) for n in gm.graph.nodes],
        {k: v.clone() for k, v in gm.state_dict().items()},
        sorted(name for name, _ in gm.named_modules()),
    )


def _assert_same_fingerprint(a, b):
    assert a[0] == b[0]
    assert a[1] == b[1]
    assert a[2].keys() == b[2].keys()
    assert all(torch.equal(a[2][k], b[2][k]) for k in a[2])
    assert a[3] == b[3]


def _peft_reference(kwargs):
    """PEFT on the MLP with random vectors, and its state dict."""
    peft_model = peft.get_peft_model(custom_model("MLP"), peft.IA3Config(**copy.deepcopy(kwargs))).eval()
    randomize_peft(peft_model)
    return peft_model, peft.get_peft_model_state_dict(peft_model)


@pytest.mark.parametrize("kind", ["export_graph_module", "symbolic_graph_module"])
def test_graph_module_input_is_not_mutated(kind):
    x = custom_input()
    base = custom_model("MLP")
    if kind == "export_graph_module":
        gm = torch.export.export(base, (x,)).module()
    else:
        gm = torch.fx.symbolic_trace(base)
    with torch.no_grad():
        base_out = gm(x)
    before = _graph_fingerprint(gm)

    peft_model, sd = _peft_reference(MLP_SAVE)
    adapted = ia3fx.get_ia3_model(gm, IA3Config(**MLP_SAVE))
    adapted.load_adapter_state_dict(sd)
    assert adapted.graph_module is not gm
    assert set(adapted.targets) == {"lin0"}
    assert adapted.targets["lin0"].feedforward
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), peft_model(x), rtol=0, atol=1e-5)

    _assert_same_fingerprint(_graph_fingerprint(gm), before)
    assert not hasattr(gm, "ia3_l") and not hasattr(gm, "modules_to_save")
    with torch.no_grad():
        torch.testing.assert_close(gm(x), base_out, rtol=0, atol=0)
    # training reaches the vector and the lin1 copy, not the user's graph's weights
    assert adapted.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()
    adapted(x).sum().backward()
    assert adapted.get_vector("lin0").grad is not None
    saved = [p for n, p in adapted.named_parameters() if n.startswith("modules_to_save.")]
    assert len(saved) == 2 and all(p.requires_grad and p.grad is not None for p in saved)
    assert all(p.grad is None for p in gm.parameters())


def test_exported_program_input_is_not_mutated():
    x = custom_input()
    ep = torch.export.export(custom_model("MLP"), (x,))
    with torch.no_grad():
        base_out = ep.module()(x)
    before = _graph_fingerprint(ep.graph_module)
    state_before = {k: v.clone() for k, v in ep.state_dict.items()}

    peft_model, sd = _peft_reference(MLP_BOTH)
    adapted = ia3fx.get_ia3_model(ep, IA3Config(**MLP_BOTH))
    adapted.load_adapter_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), peft_model(x), rtol=0, atol=1e-5)

    _assert_same_fingerprint(_graph_fingerprint(ep.graph_module), before)
    assert ep.state_dict.keys() == state_before.keys()
    assert all(torch.equal(ep.state_dict[k], v) for k, v in state_before.items())
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), base_out, rtol=0, atol=0)


def test_meta_device_model_can_be_planned_and_adapted():
    from transformers import LlamaForCausalLM

    cfg = tiny_llama().config
    with torch.device("meta"):
        meta_model = LlamaForCausalLM(cfg)
    assert all(p.is_meta for p in meta_model.parameters())

    p = ia3fx.plan(meta_model, IA3Config())
    assert sorted(p.targets) == sorted(
        f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")
    )
    assert p.num_parameters == 384

    adapted = ia3fx.get_ia3_model(meta_model, IA3Config())
    assert adapted.get_nb_trainable_parameters() == (384, 90816)  # as PEFT counts a real tiny Llama
    assert all(v.is_meta for v in adapted.ia3_l.parameters())
    sd = adapted.adapter_state_dict()
    assert sd["base_model.model.model.layers.0.self_attn.k_proj.ia3_l"].shape == (32, 1)
    assert sd["base_model.model.model.layers.0.mlp.down_proj.ia3_l"].shape == (1, 128)
    # same plan and shapes as on a real model
    real = peft.get_peft_model(tiny_llama(), peft.IA3Config())
    real_sd = peft.get_peft_model_state_dict(real)
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in real_sd.items()}
    assert real.get_nb_trainable_parameters() == (384, 90816)


# --- a module called twice ---------------------------------------------------------------------
class Twice(nn.Module):
    """One linear layer applied twice: PEFT wraps it once, so both calls share a vector."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(10, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, X):
        h = torch.relu(self.lin(X))
        h = self.lin(h)
        return self.head(h)


@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("how", ["symbolic_trace", "export"])
def test_module_called_twice_shares_one_vector(how, feedforward):
    x = torch.randn(5, 10)
    kwargs = dict(target_modules=["lin"], feedforward_modules=["lin"] if feedforward else [])
    torch.manual_seed(0)
    model = Twice()
    peft_model, ia3_model = peft_and_ia3(model, kwargs, example_inputs=(x,) if how == "export" else None)

    sites = [s for s in ia3_model.call_sites if s.name == "lin"]
    assert [s.call_index for s in sites] == [0, 1]
    assert all(s.targeted and s.feedforward == feedforward for s in sites)
    assert list(ia3_model.targets) == ["lin"]
    assert len(list(ia3_model.ia3_l.parameters())) == 1
    assert ia3_model.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()
    scale_nodes = [
        n for n in ia3_model.graph_module.graph.nodes if (n.meta.get("ia3fx") or {}).get("role") == "scale"
    ]
    assert len(scale_nodes) == 2

    with torch.no_grad():
        torch.testing.assert_close(ia3_model(x), peft_model(x), rtol=0, atol=1e-5)
    # the gradient of the one vector collects both calls, as PEFT's does
    ia3_model(x).sum().backward()
    peft_model(x).sum().backward()
    grad_peft = peft_model.base_model.model.lin.ia3_l["default"].grad
    torch.testing.assert_close(ia3_model.get_vector("lin").grad, grad_peft.flatten(), rtol=1e-4, atol=1e-5)


def test_mlp_factory_matches_peft_test_model():
    """The conftest MLP is PEFT's: same layers and sizes (a sanity check of the port)."""
    m = MLP()
    assert (m.lin0.in_features, m.lin0.out_features, m.lin1.in_features, m.lin1.out_features) == (10, 20, 20, 2)
    assert m.drop.p == 0.5
