"""ia3fx.to_networkx and ia3fx.report."""

from __future__ import annotations

import json

import networkx as nx
import pytest
import torch
from conftest import tiny_bert_seq_cls, tiny_gpt2, tiny_llama

import ia3fx
from ia3fx.passes import SharedWeightError


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama()
    return model, ia3fx.get_ia3_model(model, ia3fx.IA3Config())


@pytest.fixture(scope="module")
def gpt2():
    model = tiny_gpt2()
    return model, ia3fx.get_ia3_model(model, ia3fx.IA3Config())


# --- to_networkx -----------------------------------------------------------------------------------
def test_to_networkx_nodes_edges_and_attributes(llama):
    _, ia3 = llama
    gm = ia3.graph_module
    g = ia3fx.to_networkx(gm)
    assert isinstance(g, nx.DiGraph) and nx.is_directed_acyclic_graph(g)
    assert set(g.nodes) == {n.name for n in gm.graph.nodes}
    assert g.number_of_edges() == sum(len(n.users) for n in gm.graph.nodes)
    for n in gm.graph.nodes:
        assert set(g.successors(n.name)) == {u.name for u in n.users}
    # a linear call site: its module from nn_module_stack, shape and dtype from meta["val"]
    q = next(n for n in gm.graph.nodes if g.nodes[n.name]["call_site"] == "model.layers.0.self_attn.q_proj")
    a = g.nodes[q.name]
    assert a["op"] == "call_function" and a["target"] == "aten.linear.default"
    assert a["module"] == "model.layers.0.self_attn.q_proj" and a["module_type"].endswith("Linear")
    assert a["role"] is None and a["dtype"] == "float32"
    assert len(a["shape"]) == 3 and a["shape"][-1] == 64 and all(isinstance(d, (int, str)) for d in a["shape"])
    # weights read through get_attr belong to the module that holds them
    w = g.nodes["model_layers_0_self_attn_q_proj_weight"]
    assert w["op"] == "get_attr" and w["module"] == "model.layers.0.self_attn.q_proj" and w["shape"] == (64, 64)
    # an IA3Model is accepted as is
    assert set(ia3fx.to_networkx(ia3).nodes) == set(g.nodes)


def test_ancestors_of_a_scale_node_find_its_vector(llama):
    _, ia3 = llama
    g = ia3fx.to_networkx(ia3.graph_module)
    scales = [n for n, a in g.nodes(data=True) if a["role"] == "scale"]
    assert len(scales) == 6
    for s in scales:
        attrs = g.nodes[s]
        vectors = [
            v for v in nx.ancestors(g, s)
            if g.nodes[v]["role"] == "vector" and g.nodes[v]["layer"] == attrs["layer"]
        ]
        assert len(vectors) == 1
        v = g.nodes[vectors[0]]
        assert v["op"] == "get_attr" and v["target"] == f"ia3_l.{attrs['layer']}.{attrs['scale']}"
        assert v["scale"] == attrs["scale"] and attrs["module"] == attrs["layer"]
        # the scale feeds its call site (input scale) or takes it (output scale)
        site = [n for n in (nx.descendants(g, s) if attrs["scale"] == "input" else nx.ancestors(g, s))
                if g.nodes[n]["call_site"] == attrs["layer"]]
        assert site
    roles = {a["scale"] for a in (g.nodes[s] for s in scales)}
    assert roles == {"input", "output"}


# --- report ----------------------------------------------------------------------------------------
def test_report_llama_defaults(llama):
    _, ia3 = llama
    r = ia3fx.report(ia3)
    assert r.adapter == "default" and r.model == "LlamaForCausalLM" and r.model_type == "llama"
    assert r.num_call_sites == 15 and r.num_scaled_call_sites == 6
    assert r.num_vectors == 6 and r.num_parameters == 2 * (32 + 32 + 128)
    assert set(r.skipped) == {
        f"model.layers.{i}.{m}" for i in range(2)
        for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")
    } | {"lm_head"}
    assert set(r.skipped.values()) == {"not matched by target_modules"}
    assert [(b.name, b.vectors, b.parameters) for b in r.blocks] == [
        ("model.layers.0", 3, 192), ("model.layers.1", 3, 192),
    ]
    assert r.tied == [] and r.shared_layers == {}
    text = r.text()
    assert "15 found, 6 scaled" in text
    assert "model.layers.0 .. 1 (x2, each): 3 vectors, 192 parameters" in text
    assert "mlp.down_proj (in 128)" in text and "self_attn.k_proj (out 32)" in text
    assert "not matched by target_modules: model.layers.0.self_attn.q_proj" in text
    assert str(r) == text
    json.dumps(r.to_dict())


def test_report_skip_reasons(llama):
    model, ia3 = llama
    cfg = ia3fx.IA3Config(
        target_modules="all-linear", feedforward_modules=["down_proj"],
        exclude_modules=["model.layers.1.self_attn.k_proj"],
    )
    r = ia3fx.report(ia3, cfg)  # another config on the same graph: nothing retraced or changed
    assert r.adapter is None
    assert r.skipped == {
        "model.layers.1.self_attn.k_proj": "excluded by exclude_modules",
        "lm_head": "output layer: PEFT's all-linear leaves it out",
    }
    assert r.num_vectors == 13 and r.num_scaled_call_sites == 13
    assert "excluded by exclude_modules: model.layers.1.self_attn.k_proj" in r.text()
    assert ia3fx.report(ia3).num_vectors == 6  # the model's own adapter is untouched
    # a plain model and a config: traced, not rewritten
    r2 = ia3fx.report(model, cfg)
    assert r2.skipped == r.skipped and r2.num_parameters == r.num_parameters


def test_report_modules_to_save():
    r = ia3fx.report(tiny_bert_seq_cls(), ia3fx.IA3Config(task_type="SEQ_CLS"))
    assert r.skipped["classifier"] == "inside modules_to_save (trained in full instead)"
    assert r.modules_to_save == ["classifier"]
    assert "modules_to_save (trained in full): classifier" in r.text()


def test_report_gpt2_tied_lm_head(gpt2):
    model, ia3 = gpt2
    r = ia3fx.report(ia3)
    assert len(r.tied) == 1
    tie = r.tied[0]
    assert set(tie.names) == {"transformer.wte.weight", "lm_head.weight"}
    assert tie.shape == (128, 32) and tie.targeted == [] and tie.merge_safe
    assert "tied transformer.wte.weight = lm_head.weight [128, 32]" in r.text()
    assert "merging leaves it alone" in r.text()
    # adapting lm_head: the report says the merge will be refused, and it is
    cfg = ia3fx.IA3Config(target_modules=["c_attn", "lm_head"], feedforward_modules=[])
    r = ia3fx.report(ia3, cfg)
    tie = r.tied[0]
    assert tie.targeted == ["lm_head"] and not tie.merge_safe
    assert "would also scale transformer.wte.weight" in r.text() and "SharedWeightError" in r.text()
    ia3.add_adapter("head", cfg)
    with pytest.raises(SharedWeightError, match="lm_head"):
        ia3.merge_adapter(["head"])
    assert r.to_dict()["tied"][0]["merge_safe"] is False


def test_report_counts_shared_layers():
    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)
            self.out = torch.nn.Linear(8, 2)

        def forward(self, x):
            return self.out(self.lin(self.lin(x)))

    r = ia3fx.report(Twice(), ia3fx.IA3Config(target_modules=["lin"], feedforward_modules=[]))
    assert r.shared_layers == {"lin": 2} and r.num_scaled_call_sites == 2 and r.num_vectors == 1
    assert "layer lin is called 2 times" in r.text()
    with pytest.raises(TypeError):
        ia3fx.report(Twice(), {"target_modules": ["lin"]})
