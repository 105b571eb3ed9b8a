"""Bad inputs fail early with a message that says what is wrong (and, where PEFT has one, with
PEFT's message); warnings for the configurations PEFT accepts but that are likely mistakes."""

from __future__ import annotations

import re
import warnings

import peft
import pytest
import torch
from conftest import MLP, custom_input, custom_model
from torch import nn

import ia3fx
from ia3fx import AdapterLoadError, IA3Config, NoMatchingModuleError, TraceError

SUBSET_MESSAGE = "`feedforward_modules` should be a subset of `target_modules`"


class Wrapped(nn.Module):
    """A container (``mlp``) holding linear layers: naming the container is a mistake."""

    def __init__(self):
        super().__init__()
        self.mlp = MLP()

    def forward(self, X):
        return self.mlp(X)


class GateUp(nn.Module):
    """A fused ``gate_up_proj`` next to ``down_proj``, as in Phi-3 style MLPs."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Linear(10, 40)
        self.down_proj = nn.Linear(20, 10)

    def forward(self, X):
        gate, up = self.gate_up_proj(X).chunk(2, dim=-1)
        return self.down_proj(torch.relu(gate) * up)


class Branchy(nn.Module):
    """Python control flow on a tensor value: neither symbolic_trace nor export can capture it."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 10)
        self.lin1 = nn.Linear(10, 2)

    def forward(self, X):
        h = self.lin0(X)
        if h.sum() > 0:
            h = h * 2
        return self.lin1(h)


def _mlp_model(config):
    """An adapted MLP (symbolic_trace path: cheap)."""
    return ia3fx.get_ia3_model(custom_model("MLP"), config)


# --- config validation -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "targets, ff",
    [
        (["lin0"], ["lin1"]),
        (["lin0"], ["lin0", "lin1"]),
        # PEFT's check is lexical: the same module under two spellings still fails
        (["model.layers.0.mlp.down_proj"], ["down_proj"]),
    ],
)
def test_feedforward_not_subset_of_targets(targets, ff):
    with pytest.raises(ValueError, match=f"^{re.escape(SUBSET_MESSAGE)}$"):
        IA3Config(target_modules=targets, feedforward_modules=ff)
    # the very message PEFT raises
    with pytest.raises(ValueError) as peft_error:
        peft.IA3Config(target_modules=targets, feedforward_modules=ff)
    assert str(peft_error.value) == SUBSET_MESSAGE


@pytest.mark.parametrize(
    "targets, ff",
    [(["lin0"], []), (["lin0", "lin1"], ["lin1"]), ("lin0", ["lin1"]), (["lin0"], "lin1")],
)
def test_feedforward_subset_check_passes_where_peft_passes(targets, ff):
    IA3Config(target_modules=targets, feedforward_modules=ff)
    peft.IA3Config(target_modules=targets, feedforward_modules=ff)


def test_config_must_be_ia3fx_config():
    with pytest.raises(TypeError, match="IA3Config"):
        ia3fx.get_ia3_model(custom_model("MLP"), peft.IA3Config(target_modules=["lin0"], feedforward_modules=[]))


# --- defaults ----------------------------------------------------------------------------------
def test_plain_module_needs_target_modules():
    with pytest.raises(ValueError, match=re.escape("Please specify `target_modules` in `peft_config`")) as e:
        _mlp_model(IA3Config(feedforward_modules=[]))
    assert "custom" in str(e.value)


def test_plain_module_needs_feedforward_modules():
    """PEFT's rule: a custom model must say ``feedforward_modules=[]`` explicitly."""
    with pytest.raises(ValueError, match=re.escape("Please specify `feedforward_modules` in `peft_config`")):
        _mlp_model(IA3Config(target_modules=["lin0"]))
    with pytest.raises(ValueError, match=re.escape("Please specify `feedforward_modules` in `peft_config`")):
        _mlp_model(IA3Config(target_modules="all-linear"))


@pytest.fixture(scope="module")
def unknown_type_model():
    """A transformers model whose model_type has no IA3 default in PEFT's mapping."""
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = Phi3ForCausalLM(cfg).eval()
    assert model.config.model_type not in ia3fx.config.TARGET_MODULES_MAPPING
    return model


def test_unknown_model_type_needs_target_modules(unknown_type_model):
    with pytest.raises(ValueError, match=re.escape("Please specify `target_modules` in `peft_config`")) as e:
        ia3fx.plan(unknown_type_model, IA3Config())
    assert "phi3" in str(e.value)
    # PEFT agrees that there is no default
    with pytest.raises(ValueError, match=re.escape("Please specify `target_modules` in `peft_config`")):
        peft.get_peft_model(unknown_type_model, peft.IA3Config())


def test_unknown_model_type_needs_feedforward_modules(unknown_type_model):
    with pytest.raises(ValueError, match=re.escape("Please specify `feedforward_modules` in `peft_config`")):
        ia3fx.plan(unknown_type_model, IA3Config(target_modules=["qkv_proj"]))
    # with both given it works
    p = ia3fx.plan(unknown_type_model, IA3Config(target_modules=["qkv_proj", "down_proj"], feedforward_modules=["down_proj"]))
    assert sorted(p.targets) == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.qkv_proj"]
    assert p.targets["model.layers.0.mlp.down_proj"].feedforward


# --- nothing to adapt --------------------------------------------------------------------------
def test_nothing_matched_lists_the_linear_layers():
    with pytest.raises(NoMatchingModuleError) as e:
        _mlp_model(IA3Config(target_modules=["lin9", "proj"], feedforward_modules=[]))
    msg = str(e.value)
    assert "not found in the base model" in msg
    assert "lin9" in msg and "proj" in msg  # what was asked for
    assert "lin0" in msg and "lin1" in msg  # what exists
    assert "relu" not in msg  # only linear-like layers are listed
    assert isinstance(e.value, ValueError)  # code catching PEFT's ValueError keeps working


def test_nothing_matched_regex():
    with pytest.raises(NoMatchingModuleError, match="not found in the base model") as e:
        _mlp_model(IA3Config(target_modules="lin", feedforward_modules=[]))  # fullmatch: "lin" != "lin0"
    assert "lin0" in str(e.value)


def test_empty_target_list():
    with pytest.raises(NoMatchingModuleError, match="No `target_modules` passed"):
        _mlp_model(IA3Config(target_modules=[], feedforward_modules=[]))


def test_all_matches_excluded():
    config = dict(target_modules=["lin0", "lin1"], exclude_modules=["lin0", "lin1"], feedforward_modules=[])
    with pytest.raises(NoMatchingModuleError, match="All modules were excluded"):
        _mlp_model(IA3Config(**config))
    # PEFT refuses too (its wording counts non-linear modules as "unmatched": "No modules were targeted")
    with pytest.raises(ValueError, match="No modules were targeted|All modules were excluded"):
        peft.get_peft_model(custom_model("MLP"), peft.IA3Config(**config))
    with pytest.raises(NoMatchingModuleError, match="All modules were excluded"):
        _mlp_model(IA3Config(target_modules="lin.", exclude_modules="lin.", feedforward_modules=[]))


def test_container_module_matched_is_not_supported():
    with pytest.raises(ValueError, match="not supported") as e:
        ia3fx.get_ia3_model(Wrapped(), IA3Config(target_modules=["mlp"], feedforward_modules=[]))
    msg = str(e.value)
    assert "'mlp'" in msg and "MLP" in msg  # the module and its type
    assert "Linear" in msg  # what would be supported
    # PEFT refuses the same config
    with pytest.raises(ValueError, match="is not supported"):
        peft.get_peft_model(Wrapped(), peft.IA3Config(target_modules=["mlp"], feedforward_modules=[]))


def test_embedding_matched_is_not_supported():
    model = custom_model("EmbConv1D")
    with pytest.raises(ValueError, match="not supported") as e:
        ia3fx.get_ia3_model(model, IA3Config(target_modules=["emb"], feedforward_modules=[]), (custom_input(),))
    assert "'emb'" in str(e.value) and "Embedding" in str(e.value)


# --- adapter state dicts -----------------------------------------------------------------------
@pytest.fixture
def adapted_mlp():
    model = _mlp_model(IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"]))
    with torch.no_grad():
        for i, p in enumerate(model.ia3_l.parameters()):
            p.fill_(0.5 + i)
    return model


def _snapshot(model):
    return {k: v.clone() for k, v in model.adapter_state_dict().items()}


def _assert_unchanged(model, before):
    after = model.adapter_state_dict()
    assert set(after) == set(before)
    for k in before:
        assert torch.equal(after[k], before[k]), k


def test_adapter_state_dict_layout(adapted_mlp):
    sd = adapted_mlp.adapter_state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "base_model.model.lin0.ia3_l": (20, 1),  # output scale: (out, 1)
        "base_model.model.lin1.ia3_l": (1, 20),  # input scale: (1, in)
    }


def test_load_missing_key(adapted_mlp):
    before = _snapshot(adapted_mlp)
    sd = {k: torch.full_like(v, 3.0) for k, v in before.items()}
    del sd["base_model.model.lin1.ia3_l"]
    with pytest.raises(AdapterLoadError, match="missing") as e:
        adapted_mlp.load_adapter_state_dict(sd)
    assert "base_model.model.lin1.ia3_l" in str(e.value)
    _assert_unchanged(adapted_mlp, before)  # lin0 was not loaded either: all or nothing


def test_load_unexpected_key(adapted_mlp):
    before = _snapshot(adapted_mlp)
    sd = {k: torch.full_like(v, 3.0) for k, v in before.items()}
    sd["base_model.model.lin2.ia3_l"] = torch.ones(2, 1)
    with pytest.raises(AdapterLoadError, match="unexpected") as e:
        adapted_mlp.load_adapter_state_dict(sd)
    assert "base_model.model.lin2.ia3_l" in str(e.value)
    _assert_unchanged(adapted_mlp, before)


@pytest.mark.parametrize("shape", [(1, 20), (20,), (20, 2)])
def test_load_misshaped_key(adapted_mlp, shape):
    before = _snapshot(adapted_mlp)
    sd = {k: torch.full_like(v, 3.0) for k, v in before.items()}
    sd["base_model.model.lin0.ia3_l"] = torch.full(shape, 3.0)  # lin0 wants (20, 1)
    with pytest.raises(AdapterLoadError) as e:
        adapted_mlp.load_adapter_state_dict(sd)
    msg = str(e.value)
    assert "base_model.model.lin0.ia3_l" in msg
    assert str(shape) in msg and "(20, 1)" in msg
    _assert_unchanged(adapted_mlp, before)


def test_load_without_peft_prefix(adapted_mlp):
    """PEFT silently keeps ones for such a file; here it is an error that says why."""
    before = _snapshot(adapted_mlp)
    sd = {k[len("base_model.model.") :]: torch.full_like(v, 3.0) for k, v in before.items()}
    with pytest.raises(AdapterLoadError, match=re.escape("base_model.model.")):
        adapted_mlp.load_adapter_state_dict(sd)
    _assert_unchanged(adapted_mlp, before)


def test_load_good_state_dict(adapted_mlp):
    before = _snapshot(adapted_mlp)
    sd = {k: torch.full_like(v, 3.0) for k, v in before.items()}
    adapted_mlp.load_adapter_state_dict(sd)
    assert all(torch.equal(v, torch.full_like(v, 3.0)) for v in adapted_mlp.adapter_state_dict().values())
    # the in-graph vectors follow (no copy was loaded)
    assert torch.equal(adapted_mlp.get_vector("lin0"), torch.full((20,), 3.0))


# --- tracing -----------------------------------------------------------------------------------
def test_untraceable_model_export():
    model = Branchy()
    with pytest.raises(TraceError) as e:
        ia3fx.get_ia3_model(
            model, IA3Config(target_modules=["lin0"], feedforward_modules=[]), example_inputs=(torch.randn(3, 10),)
        )
    msg = str(e.value)
    assert "Branchy" in msg
    assert "torch.export" in msg
    assert "data-dependent" in msg
    assert "h.sum() > 0" in msg  # the offending line
    assert "control flow" in msg  # the way out
    assert e.value.__cause__ is not None


def test_untraceable_model_symbolic_trace():
    with pytest.raises(TraceError) as e:
        ia3fx.get_ia3_model(Branchy(), IA3Config(target_modules=["lin0"], feedforward_modules=[]))
    msg = str(e.value)
    assert "Branchy" in msg and "symbolic_trace" in msg
    assert "control flow" in msg
    assert "example_inputs" in msg  # the way out: export instead


def test_trace_rejects_other_objects():
    with pytest.raises(TypeError, match="nn.Module"):
        ia3fx.trace(lambda x: x)


# --- warnings ----------------------------------------------------------------------------------
def test_init_ia3_weights_false_warns_and_draws_random_vectors():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="init_ia3_weights=False"):
        config = IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"], init_ia3_weights=False)
    model = _mlp_model(config)
    vectors = [model.get_vector("lin0"), model.get_vector("lin1")]
    for v in vectors:
        assert not torch.allclose(v, torch.ones_like(v))
    flat = torch.cat([v.detach().flatten() for v in vectors])
    assert (flat < 0).any()  # N(0, 1), as PEFT draws: negatives included
    assert 0.5 < flat.std() < 1.5
    x = custom_input()
    with torch.no_grad():
        assert not torch.allclose(model(x), custom_model("MLP")(x))


def test_init_ia3_weights_true_is_identity():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = _mlp_model(IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"]))
    x = custom_input()
    with torch.no_grad():
        torch.testing.assert_close(model(x), custom_model("MLP")(x), rtol=0, atol=0)


def test_unused_exclude_modules_warns():
    with pytest.warns(UserWarning, match="no modules were excluded") as record:
        model = _mlp_model(IA3Config(target_modules=["lin0"], exclude_modules=["lin7"], feedforward_modules=[]))
    assert any("lin7" in str(w.message) for w in record)
    assert set(model.targets) == {"lin0"}


def test_used_exclude_modules_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = _mlp_model(
            IA3Config(target_modules=["lin0", "lin1"], exclude_modules=["lin1"], feedforward_modules=[])
        )
    assert set(model.targets) == {"lin0"}


def test_feedforward_plain_suffix_quirk_warns():
    """PEFT marks ``gate_up_proj`` feedforward for ff ``["up_proj"]`` (``endswith``, no dot):
    ia3fx keeps the rule, so a PEFT file means the same, and says so."""
    x = torch.randn(3, 10)
    config = dict(target_modules=r".*_proj", feedforward_modules=["up_proj"])
    with pytest.warns(UserWarning, match="plain") as record:
        model = ia3fx.get_ia3_model(GateUp(), IA3Config(**config))
    msg = " ".join(str(w.message) for w in record)
    assert "'up_proj'" in msg and "'gate_up_proj'" in msg
    assert model.targets["gate_up_proj"].feedforward
    assert not model.targets["down_proj"].feedforward
    # the same placement as PEFT
    peft_model = peft.get_peft_model(GateUp(), peft.IA3Config(**config))
    assert peft_model.base_model.model.gate_up_proj.is_feedforward
    assert not peft_model.base_model.model.down_proj.is_feedforward
    assert model(x).shape == (3, 10)


def test_feedforward_exact_name_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = ia3fx.get_ia3_model(
            GateUp(), IA3Config(target_modules=["gate_up_proj", "down_proj"], feedforward_modules=["down_proj"])
        )
    assert model.targets["down_proj"].feedforward and not model.targets["gate_up_proj"].feedforward
