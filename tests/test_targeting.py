"""Which layers a config selects, and how: PEFT's rules, checked against PEFT itself."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import MLP, tiny_bert_seq_cls, tiny_gpt2, tiny_llama, tiny_t5
from peft import IA3Config as PeftIA3Config
from peft import get_peft_model
from torch import nn

import ia3fx
from ia3fx.targeting import select_targets


def peft_targets(model: nn.Module, **kwargs) -> dict[str, bool]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(copy.deepcopy(model), PeftIA3Config(**kwargs))
    out = {}
    for name, module in pm.base_model.model.named_modules():
        if hasattr(module, "ia3_l") and hasattr(module, "is_feedforward"):
            out[name] = bool(module.is_feedforward)
    return out


def ia3fx_targets(model: nn.Module, **kwargs) -> dict[str, bool]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = ia3fx.plan(model, ia3fx.IA3Config(**kwargs))
    return {name: t.feedforward for name, t in p.targets.items()}


CASES = [
    ("llama-defaults", tiny_llama, {}),
    ("llama-all-linear", tiny_llama, {"target_modules": "all-linear", "feedforward_modules": ["down_proj"]}),
    ("llama-regex", tiny_llama, {"target_modules": r".*\.(q|v)_proj", "feedforward_modules": []}),
    ("llama-span", tiny_llama, {"target_modules": ["layers.0.self_attn.q_proj", "down_proj"], "feedforward_modules": ["down_proj"]}),
    ("llama-exclude", tiny_llama, {"target_modules": ["q_proj", "v_proj"], "feedforward_modules": [], "exclude_modules": ["model.layers.1.self_attn.q_proj"]}),
    ("llama-exclude-regex", tiny_llama, {"target_modules": "all-linear", "feedforward_modules": [], "exclude_modules": r".*layers\.0\..*"}),
    ("gpt2-defaults", tiny_gpt2, {}),
    ("gpt2-all-linear", tiny_gpt2, {"target_modules": "all-linear", "feedforward_modules": "mlp.c_proj|.*mlp\\.c_proj"}),
    ("bert-defaults-seqcls", tiny_bert_seq_cls, {"task_type": "SEQ_CLS"}),
    ("bert-all-linear-seqcls", tiny_bert_seq_cls, {"task_type": "SEQ_CLS", "target_modules": "all-linear", "feedforward_modules": []}),
    ("t5-ff-wo-wi", tiny_t5, {"target_modules": ["k", "v", "wo", "wi"], "feedforward_modules": ["wo", "wi"]}),
    ("t5-defaults", tiny_t5, {}),
    ("mlp-str", lambda: MLP(), {"target_modules": "lin0", "feedforward_modules": []}),
    ("mlp-list-ff", lambda: MLP(), {"target_modules": ["lin0", "lin1"], "feedforward_modules": ["lin0"]}),
    ("mlp-save", lambda: MLP(), {"target_modules": ["lin0", "lin1"], "feedforward_modules": [], "modules_to_save": ["lin1"]}),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_selection_equals_peft(case):
    _, factory, kwargs = case
    model = factory()
    assert ia3fx_targets(model, **kwargs) == peft_targets(model, **kwargs)


def test_all_linear_llama_keeps_lm_head_out():
    targets = ia3fx_targets(tiny_llama(), target_modules="all-linear", feedforward_modules=[])
    names = {n.rsplit(".", 1)[-1] for n in targets}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert "lm_head" not in targets


def test_list_entries_are_dot_bounded_strings_fullmatch():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin0, self.xlin0, self.lin = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(self.xlin0(self.lin0(x)))

    assert set(ia3fx_targets(M(), target_modules=["lin0"], feedforward_modules=[])) == {"lin0"}
    assert set(ia3fx_targets(M(), target_modules="lin", feedforward_modules=[])) == {"lin"}
    # PEFT's feedforward quirk: a list entry is a plain suffix, so "lin0" also marks xlin0
    with pytest.warns(UserWarning, match="plain suffix"):
        p = ia3fx.plan(M(), ia3fx.IA3Config(target_modules=["lin0", "xlin0"], feedforward_modules=["lin0"]))
    assert p.targets["xlin0"].feedforward and p.targets["lin0"].feedforward


def test_modules_to_save_guard_is_dot_bounded():
    model = MLP()
    p = ia3fx.plan(model, ia3fx.IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=[], modules_to_save=["lin1"]))
    assert set(p.targets) == {"lin0"}
    assert p.modules_to_save == ["lin1"]
    assert "modules_to_save" in p.skipped["lin1"]


def test_call_sites_kinds_and_names():
    gm = ia3fx.trace(tiny_gpt2(), {"input_ids": torch.randint(0, 128, (2, 5))})
    sites = ia3fx.find_call_sites(gm)
    kinds = [s.kind for s in sites]
    assert kinds.count("conv1d") == 8 and kinds.count("linear") == 1
    c_attn = next(s for s in sites if s.name == "transformer.h.0.attn.c_attn")
    assert (c_attn.in_features, c_attn.out_features) == (32, 96)
    lm = next(s for s in sites if s.kind == "linear")
    assert lm.name == "lm_head"


def test_functional_linear_named_by_parameter_and_shared_vector_for_repeated_calls():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 6)
            self.w_out = nn.Parameter(torch.randn(3, 6))

        def forward(self, x):
            return nn.functional.linear(self.proj(self.proj(x)), self.w_out)

    model = M()
    sites = ia3fx.find_call_sites(ia3fx.trace(model, (torch.randn(2, 6),)))
    assert [(s.name, s.kind, s.call_index) for s in sites] == [
        ("proj", "linear", 0), ("proj", "linear", 1), ("w_out", "functional_linear", 0)
    ]
    ia3 = ia3fx.get_ia3_model(model, ia3fx.IA3Config(target_modules=["proj", "w_out"], feedforward_modules=[]),
                              example_inputs=(torch.randn(2, 6),))
    assert set(ia3.targets) == {"proj", "w_out"}
    assert ia3.get_nb_trainable_parameters()[0] == 6 + 3  # one vector for both calls of proj
    muls = [n for n in ia3.graph_module.graph.nodes if n.meta.get("ia3fx", {}).get("role") == "scale"]
    assert len(muls) == 3


def test_find_call_sites_with_config_annotates():
    model = tiny_llama()
    gm = ia3fx.trace(model, {"input_ids": torch.randint(0, 128, (2, 5))})
    sites = ia3fx.find_call_sites(gm, ia3fx.IA3Config(), model=model)
    scaled = {s.name.rsplit(".", 1)[-1]: s.scale for s in sites if s.targeted}
    assert scaled == {"k_proj": "output", "v_proj": "output", "down_proj": "input"}
    assert sum(s.targeted for s in sites) == 6 and len(sites) == 15


def test_select_targets_without_model_uses_graph_names():
    gm = ia3fx.trace(tiny_llama(), {"input_ids": torch.randint(0, 128, (2, 5))})
    sites = ia3fx.find_call_sites(gm)
    sel = select_targets(ia3fx.IA3Config(target_modules=["k_proj"], feedforward_modules=[]), sites)
    assert set(sel.targets) == {"model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj"}
    assert sel.skipped["lm_head"] == "not matched by target_modules"


def test_a_default_target_that_matches_nothing_is_warned_and_peft_adapts_the_same():
    """Mixtral's default ``w2`` names a Linear that transformers 5 fused into a 3-d expert tensor:
    both libraries adapt k_proj and v_proj only; ia3fx says so."""
    import transformers as T

    config = T.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
                             num_experts_per_tok=1)
    torch.manual_seed(0)
    model = T.MixtralForCausalLM(config)
    with pytest.warns(UserWarning, match=r"default target_modules .* include 'w2', which matches no layer.*\['k_proj', 'v_proj'\]"):
        ia3 = ia3fx.get_ia3_model(copy.deepcopy(model), ia3fx.IA3Config())
    assert {t.rsplit(".", 1)[-1] for t in ia3.targets} == {"k_proj", "v_proj"}
    assert set(ia3.targets) == set(peft_targets(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model whose defaults all match: no such warning
        ia3fx.get_ia3_model(tiny_llama(), ia3fx.IA3Config())
