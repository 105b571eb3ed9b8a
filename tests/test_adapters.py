"""Several adapters on one model, compared with PEFT wherever PEFT has the same operation:
add/set/delete, several active adapters multiplying, disable_adapter, add_weighted_adapter,
merging a chosen set, requires_grad across switches (PEFT's TestRequiresGrad), and switching
without a new trace. Where ia3fx deliberately differs from PEFT, the test says so and pins both.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from conftest import custom_input, custom_model, logits, tiny_llama, token_inputs

import ia3fx
from ia3fx import AdapterLoadError, IA3Config

ATOL = 1e-5

# adapters on PEFT's MLP (lin0: Linear(10, 20), lin1: Linear(20, 2))
MLP_ADAPTERS = {
    "a": dict(target_modules=["lin0"], feedforward_modules=[]),  # lin0 output
    "b": dict(target_modules=["lin1"], feedforward_modules=["lin1"]),  # lin1 input
    "c": dict(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"]),  # shares both
}


def peft_state(pm, adapter: str) -> dict:
    return peft.get_peft_model_state_dict(pm, adapter_name=adapter)


def randomize_both(pm, model, adapters, seed=0):
    """Random vectors in PEFT, copied into ia3fx through PEFT's own state dict."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".ia3_l." in name:
                p.copy_(1.0 + 0.4 * torch.randn(p.shape, generator=g))
    for adapter in adapters:
        model.load_adapter_state_dict(peft_state(pm, adapter), adapter)


def mlp_pair(names=("a", "b", "c")):
    """The same MLP adapted by PEFT and by ia3fx with the same adapters and random vectors."""
    first, *rest = names
    pm = peft.get_peft_model(custom_model("MLP"), peft.IA3Config(**MLP_ADAPTERS[first])).eval()
    model = ia3fx.get_ia3_model(custom_model("MLP"), IA3Config(**MLP_ADAPTERS[first]), adapter_name=first)
    for name in rest:
        pm.add_adapter(name, peft.IA3Config(**MLP_ADAPTERS[name]))
        model.add_adapter(name, IA3Config(**MLP_ADAPTERS[name]))
    # PEFT's adapter "default" is ours "a": rename through the state dict
    pm_names = {first: "default", **{n: n for n in rest}}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".ia3_l." in name:
                p.copy_(1.0 + 0.4 * torch.randn(p.shape, generator=g))
    for ours, theirs in pm_names.items():
        model.load_adapter_state_dict(peft_state(pm, theirs), ours)
    return pm, model, pm_names


def out(model, x=None):
    with torch.no_grad():
        return logits(model(custom_input() if x is None else x))


def peft_set(pm, pm_names, names):
    pm.base_model.set_adapter([pm_names[n] for n in names])


# --- several active adapters -----------------------------------------------------------------------
@pytest.mark.parametrize("active", [["a"], ["b"], ["c"], ["a", "b"], ["a", "c"], ["b", "c"], ["a", "b", "c"]])
def test_active_adapters_multiply_as_in_peft(active):
    pm, model, names = mlp_pair()
    peft_set(pm, names, active)
    model.set_adapter(active)
    assert model.active_adapters == active
    torch.testing.assert_close(out(model), out(pm), rtol=0, atol=ATOL)


def test_active_adapters_differ_and_combine():
    """PEFT's TestMultipleActiveAdapters: a, b and [a, b] give three different outputs."""
    _, model, _ = mlp_pair()
    outs = {}
    for active in (["a"], ["b"], ["a", "b"]):
        model.set_adapter(active)
        outs[tuple(active)] = out(model)
    assert not torch.allclose(outs[("a",)], outs[("b",)])
    assert not torch.allclose(outs[("a",)], outs[("a", "b")])
    assert not torch.allclose(outs[("b",)], outs[("a", "b")])


def test_llama_two_active_adapters_match_peft():
    base, inputs = tiny_llama(), token_inputs("llama")
    other = dict(target_modules=["k_proj", "q_proj"], feedforward_modules=[])  # shares k_proj
    pm = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config()).eval()
    pm.add_adapter("other", peft.IA3Config(**other))
    model = ia3fx.get_ia3_model(copy.deepcopy(base), IA3Config(), example_inputs=inputs)
    model.add_adapter("other", IA3Config(**other))
    randomize_both(pm, model, ["default", "other"])
    for active in (["default"], ["other"], ["default", "other"]):
        pm.base_model.set_adapter(active)
        model.set_adapter(active)
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, pm(**inputs).logits, rtol=0, atol=ATOL)


def test_feedforward_is_per_adapter_per_call_site():
    """ia3fx keeps each adapter's own placement at a shared layer: ``a`` scales lin0's output and
    ``d`` its input. PEFT fixes ``is_feedforward`` per layer with the first adapter, so its ``d``
    becomes an *output* vector of shape (20, 1), and a PEFT file for ``d`` does not fit ia3fx's ``d``."""
    d = dict(target_modules=["lin0"], feedforward_modules=["lin0"])
    model = ia3fx.get_ia3_model(custom_model("MLP"), IA3Config(**MLP_ADAPTERS["a"]), adapter_name="a")
    model.add_adapter("d", IA3Config(**d))
    assert model.get_vector("lin0", "a").shape == (20,)
    assert model.get_vector("lin0", "d").shape == (10,)
    with torch.no_grad():
        model.get_vector("lin0", "a").copy_(torch.linspace(0.5, 1.5, 20))
        model.get_vector("lin0", "d").copy_(torch.linspace(2.0, 0.1, 10))
    model.set_adapter(["a", "d"])
    base = custom_model("MLP")
    x = custom_input().float()
    h = F.linear(x * model.get_vector("lin0", "d"), base.lin0.weight, base.lin0.bias) * model.get_vector("lin0", "a")
    expected = base.sm(base.lin1(base.relu(h)))
    torch.testing.assert_close(out(model), expected, rtol=0, atol=ATOL)
    state = model.adapter_state_dict("d")
    assert state["base_model.model.lin0.ia3_l"].shape == (1, 10)  # PEFT's shape for an input vector

    pm = peft.get_peft_model(custom_model("MLP"), peft.IA3Config(**MLP_ADAPTERS["a"]))
    pm.add_adapter("d", peft.IA3Config(**d))
    assert pm.base_model.model.lin0.is_feedforward is False
    assert pm.base_model.model.lin0.ia3_l["d"].shape == (20, 1)  # PEFT: an output vector after all
    with pytest.raises(AdapterLoadError, match=r"got \(20, 1\), expected \(1, 10\)"):
        model.load_adapter_state_dict(peft_state(pm, "d"), "d")


# --- add / set / delete ------------------------------------------------------------------------------
def test_add_set_delete():
    _, model, _ = mlp_pair(("a", "b"))
    only_a = out(model)
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("b", IA3Config(**MLP_ADAPTERS["b"]))
    with pytest.raises(ValueError, match="IA3Config"):
        model.add_adapter("x", peft.LoraConfig(target_modules=["lin0"]))
    with pytest.raises(ValueError, match="unknown adapter"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="no adapter named"):
        model.delete_adapter("nope")
    assert list(model.ia3_l) == ["a", "b"] and model.active_adapters == ["a"]
    assert not any(p.requires_grad for p in model.ia3_l["b"].parameters())  # new: inactive, frozen

    # deleting the only adapter of a slot (lin1.input) keeps the graph working, as the base there
    model.set_adapter(["a", "b"])
    model.delete_adapter("b")
    assert model.active_adapters == ["a"] and list(model.ia3_l) == ["a"]
    torch.testing.assert_close(out(model), only_a, rtol=0, atol=0)
    model.add_adapter("b", IA3Config(**MLP_ADAPTERS["b"]))  # the same slot again
    with torch.no_grad():
        model.get_vector("lin1", "b").fill_(2.0)
    model.set_adapter("b")
    base = custom_model("MLP")
    x = custom_input().float()
    expected = base.sm(base.lin1(2.0 * base.relu(base.lin0(x))))
    torch.testing.assert_close(out(model), expected, rtol=0, atol=ATOL)
    # deleting the active adapter activates another one, as PEFT
    model.delete_adapter("b")
    assert model.active_adapters == ["a"]
    torch.testing.assert_close(out(model), only_a, rtol=0, atol=0)
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        model.delete_adapter("a")


# --- disable_adapter ---------------------------------------------------------------------------------
def _state(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        model.active_adapters,
        model.merged_adapters,
        len(model.graph_modules),
        [g.code for g in model.graph_modules],
    )


def _assert_same_state(model, before):
    now = _state(model)
    assert now[0].keys() == before[0].keys()
    assert all(torch.equal(now[0][k], before[0][k]) for k in before[0])
    assert now[1:] == before[1:]


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("active", [["a"], ["a", "b"]])
def test_disable_adapter_is_the_base_and_mutates_nothing(merged, active):
    _, model, _ = mlp_pair(("a", "b"))
    model.set_adapter(active)
    with torch.no_grad():  # a vector the user froze by hand stays frozen
        model.ia3_l["a"]["lin0"].requires_grad_(False)
    if merged:
        model.merge_adapter()
    adapted = out(model)
    before = _state(model)
    base_out = out(custom_model("MLP"))
    with model.disable_adapter():
        assert torch.equal(out(model), base_out)
        assert not any(p.requires_grad for p in model.parameters())
    _assert_same_state(model, before)
    assert torch.equal(out(model), adapted)
    with pytest.raises(RuntimeError, match="inside"), model.disable_adapter():
        raise RuntimeError("inside")
    _assert_same_state(model, before)


def test_disable_adapter_peft_comes_out_unmerged():
    """The documented difference: PEFT's disable_adapter unmerges a merged model for good."""
    pm, model, _ = mlp_pair(("a",))
    pm.merge_adapter()
    model.merge_adapter()
    with pm.disable_adapter(), model.disable_adapter():
        torch.testing.assert_close(out(model), out(pm), rtol=0, atol=ATOL)
    assert pm.base_model.model.lin0.merged_adapters == []
    assert model.merged_adapters == ["a"]
    torch.testing.assert_close(out(model), out(pm), rtol=0, atol=ATOL)  # same outputs either way


# --- add_weighted_adapter -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "adapters,weights",
    [
        (["a", "c"], [0.7, 0.3]),  # shared lin0 and lin1 (c only): missing layers count 0
        (["a", "b"], [0.5, 0.5]),  # disjoint: every adapted activation halved, as PEFT
        (["c", "a", "b"], [1.0, -0.5, 2.0]),  # negative weights
        (["b"], [3.0]),
    ],
)
def test_weighted_adapter_matches_peft(adapters, weights):
    pm, model, names = mlp_pair()
    pm.add_weighted_adapter([names[a] for a in adapters], weights, "w")
    model.add_weighted_adapter(adapters, weights, "w")
    for layer, vec in pm.base_model.model.named_modules():
        if hasattr(vec, "ia3_l") and "w" in vec.ia3_l:
            ours = model.get_vector(layer, "w")
            torch.testing.assert_close(ours.reshape(-1), vec.ia3_l["w"].reshape(-1), rtol=0, atol=1e-6)
    assert set(model.adapter_state_dict("w")) == set(peft_state(pm, "w"))
    pm.set_adapter("w")
    model.set_adapter("w")
    torch.testing.assert_close(out(model), out(pm), rtol=0, atol=ATOL)


def test_weighted_adapter_errors():
    pm, model, names = mlp_pair()
    before = out(model)
    pm.add_weighted_adapter(["default"], [2.0], "b")  # PEFT: an existing name is a silent no-op
    with pytest.raises(ValueError, match="already exists"):
        model.add_weighted_adapter(["a"], [2.0], "b")
    with pytest.raises(ValueError, match="unknown adapter"):
        model.add_weighted_adapter(["a", "nope"], [1.0, 1.0], "w")
    with pytest.raises(ValueError, match="as many weights"):
        model.add_weighted_adapter(["a", "b"], [1.0], "w")
    model.add_adapter("e", IA3Config(target_modules=["lin1"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="scales its input in one adapter and its output in another"):
        model.add_weighted_adapter(["b", "e"], [1.0, 1.0], "w")
    model.add_adapter("r", IA3Config(target_modules="lin0", feedforward_modules=[]))
    with pytest.raises(ValueError, match="regex strings, or all as lists"):
        model.add_weighted_adapter(["a", "r"], [1.0, 1.0], "w")
    assert "w" not in model.ia3_l and torch.equal(out(model), before)


def test_weighted_adapters_sharing_modules_to_save_raise_as_peft():
    kwargs = dict(target_modules=["lin0"], feedforward_modules=[], modules_to_save=["lin1"])
    pm = peft.get_peft_model(custom_model("MLP"), peft.IA3Config(**kwargs))
    pm.add_adapter("other", peft.IA3Config(**kwargs))
    with pytest.raises(ValueError, match="same module with modules_to_save"):
        pm.add_weighted_adapter(["default", "other"], [0.5, 0.5], "w")
    model = ia3fx.get_ia3_model(custom_model("MLP"), IA3Config(**kwargs))
    model.add_adapter("other", IA3Config(**kwargs))
    with pytest.raises(ValueError, match="same module with modules_to_save"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "w")
    model.add_weighted_adapter(["default"], [0.5], "w")  # one owner: fine, as PEFT
    assert list(model.modules_to_save["w"]) == ["lin1"]


# --- merging a chosen set of adapters ---------------------------------------------------------------
@pytest.mark.parametrize(
    "active,merge",
    [
        (["a"], None),  # the active adapters
        (["a", "b"], None),
        (["a"], ["a", "b"]),  # named adapters merge even if inactive, as PEFT
        (["a"], ["b"]),  # a disjoint inactive one: the active one still applies elsewhere
        (["b"], ["a"]),
        (["a"], ["a", "c"]),  # a and c both at lin0: their product is merged
        (["a", "b", "c"], ["a", "b", "c"]),
    ],
)
def test_merge_chosen_adapters_matches_peft(active, merge):
    pm, model, names = mlp_pair()
    peft_set(pm, names, active)
    model.set_adapter(active)
    unmerged = out(model)
    pm.merge_adapter(None if merge is None else [names[m] for m in merge])
    model.merge_adapter(merge)
    assert model.merged_adapters == (active if merge is None else merge)
    torch.testing.assert_close(out(model), out(pm), rtol=0, atol=ATOL)
    for layer in ("lin0", "lin1"):
        theirs = getattr(pm.base_model.model, layer).base_layer.weight
        torch.testing.assert_close(getattr(model.model, layer).weight, theirs, rtol=0, atol=1e-6)
    model.unmerge_adapter()
    assert torch.equal(out(model), unmerged)  # exact: the originals come back


def test_merging_one_of_two_adapters_at_a_shared_layer_differs_from_peft():
    """Active ``a``, merge only ``c`` (both scale lin0's output). ia3fx folds ``c`` into the weights
    and keeps applying the active, unmerged ``a``: the output is that of ``[a, c]``. PEFT applies no
    adapter at all at a layer with something merged in it, so ``a`` is dropped at lin0 and its
    output is that of ``c`` alone."""
    pm, model, names = mlp_pair()
    model.set_adapter(["a", "c"])
    both = out(model)
    model.set_adapter(["c"])
    c_only = out(model)
    peft_set(pm, names, ["a"])
    model.set_adapter(["a"])
    pm.merge_adapter(["c"])
    model.merge_adapter(["c"])
    torch.testing.assert_close(out(model), both, rtol=0, atol=ATOL)
    torch.testing.assert_close(out(pm), c_only, rtol=0, atol=ATOL)
    assert not torch.allclose(both, c_only, atol=1e-3)


# --- requires_grad: PEFT's TestRequiresGrad (IA3 rows), checked against PEFT itself --------------
def _peft_grads(pm) -> set[str]:
    return {n for n, p in pm.named_parameters() if p.requires_grad}


def _ours_grads(model) -> set[str]:
    out = set()
    for adapter, store in model.ia3_l.items():
        for key, p in store.named_parameters():
            if p.requires_grad:
                out.add(f"base_model.model.{key.replace('__', '.')}.ia3_l.{adapter}")
    for adapter, store in model.modules_to_save.items():
        for key, p in store.named_parameters():
            if p.requires_grad:
                module, _, param = key.replace("__", ".").rpartition(".")
                out.add(f"base_model.model.{module}.modules_to_save.{adapter}.{param}")
    return out


REQUIRES_GRAD_CASES = {
    "ia3_different_targets": ("MLP", dict(target_modules=["lin0"], feedforward_modules=["lin0"]),
                              dict(target_modules=["lin1"], feedforward_modules=["lin1"])),
    "ia3_same_targets": ("MLP", dict(target_modules=["lin0"], feedforward_modules=["lin0"]),
                         dict(target_modules=["lin0"], feedforward_modules=["lin0"])),
    "ia3_conv1d": ("EmbConv1D", dict(target_modules=["conv1d"], feedforward_modules=[]),
                   dict(target_modules=["lin0"], feedforward_modules=["lin0"])),
    "ia3_conv2d": ("Conv2d", dict(target_modules=["conv2d"], feedforward_modules=["conv2d"]),
                   dict(target_modules=["lin0"], feedforward_modules=[])),
    "ia3_modules_to_save": ("MLP", dict(target_modules=["lin0"], feedforward_modules=[], modules_to_save=["lin1"]),
                            dict(target_modules=["lin0"], feedforward_modules=[], modules_to_save=["lin1"])),
}


@pytest.mark.parametrize("case", list(REQUIRES_GRAD_CASES))
def test_requires_grad_like_peft(case):
    model_id, config0, config1 = REQUIRES_GRAD_CASES[case]
    pm = peft.get_peft_model(custom_model(model_id), peft.IA3Config(**config0))
    pm.add_adapter("adapter1", peft.IA3Config(**config1))
    model = ia3fx.get_ia3_model(custom_model(model_id), IA3Config(**config0))
    model.add_adapter("adapter1", IA3Config(**config1))

    def check(expected_peft_names):
        assert _peft_grads(pm) == set(expected_peft_names)
        assert _ours_grads(model) == _peft_grads(pm)

    first = _peft_grads(pm)
    assert first and all(".default" in n for n in first)  # the active adapter "default" only
    check(first)
    pm.set_adapter("default")
    model.set_adapter("default")
    check(first)
    pm.set_adapter("adapter1")
    model.set_adapter("adapter1")
    second = _peft_grads(pm)
    assert second and all(".adapter1" in n for n in second)
    check(second)
    with pm.disable_adapter(), model.disable_adapter():
        check(set())
    check(second)
    if case == "ia3_modules_to_save":  # PEFT and ia3fx refuse two active copies of one module
        with pytest.raises(ValueError):
            pm.base_model.set_adapter(["default", "adapter1"])
        with pytest.raises(ValueError, match="modules_to_save"):
            model.set_adapter(["default", "adapter1"])
    else:
        pm.base_model.set_adapter(["default", "adapter1"])
        model.set_adapter(["default", "adapter1"])
        check(first | second)


def test_inference_mode_adapter_stays_frozen_unlike_peft():
    """PEFT's set_adapter makes the adapter trainable even when its config says inference_mode;
    ia3fx keeps such an adapter (e.g. loaded with is_trainable=False) frozen."""
    frozen = dict(target_modules=["lin1"], feedforward_modules=[], inference_mode=True)
    pm = peft.get_peft_model(custom_model("MLP"), peft.IA3Config(**MLP_ADAPTERS["a"]))
    pm.add_adapter("f", peft.IA3Config(**frozen))
    pm.set_adapter("f")
    assert pm.base_model.model.lin1.ia3_l["f"].requires_grad
    model = ia3fx.get_ia3_model(custom_model("MLP"), IA3Config(**MLP_ADAPTERS["a"]))
    model.add_adapter("f", IA3Config(**frozen))
    model.set_adapter("f")
    assert not model.get_vector("lin1", "f").requires_grad


# --- switching never retraces -----------------------------------------------------------------------
def test_switching_needs_no_new_trace(monkeypatch):
    base, inputs = tiny_llama(), token_inputs("llama")
    model = ia3fx.get_ia3_model(copy.deepcopy(base), IA3Config(), example_inputs=inputs)
    model.add_adapter("other", IA3Config(target_modules=["q_proj", "k_proj"], feedforward_modules=[]))
    with torch.no_grad():
        for p in model.ia3_l["other"].parameters():
            p.mul_(1.5)
    with torch.no_grad():
        outputs = {"default": model(**inputs).logits}
    graphs = len(model.graph_modules)
    codes = [g.code for g in model.graph_modules]

    def refuse(*args, **kwargs):
        raise AssertionError("torch.export.export called while switching adapters")

    monkeypatch.setattr(torch.export, "export", refuse)
    with torch.no_grad():
        for active in (["other"], ["default", "other"], ["default"], ["other"]):
            model.set_adapter(active)
            outputs[tuple(active)] = model(**inputs).logits
        with model.disable_adapter():
            disabled = model(**inputs).logits
        model.merge_adapter()
        merged = model(**inputs).logits
        model.unmerge_adapter()
    assert len(model.graph_modules) == graphs
    assert [g.code for g in model.graph_modules] == codes
    assert not torch.allclose(outputs[("other",)], outputs["default"])
    torch.testing.assert_close(outputs[("default",)], outputs["default"], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(disabled, base(**inputs).logits, rtol=0, atol=ATOL)
    torch.testing.assert_close(merged, outputs[("other",)], rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", ["half", "train", "a.b", ""])
def test_adapter_names_that_cannot_be_attributes_are_refused(name):
    _, model, _ = mlp_pair(("a", "b"))
    before = (list(model.ia3_l), [g.code for g in model.graph_modules], out(model))
    with pytest.raises(ValueError, match="cannot be an adapter name"):
        model.add_adapter(name, IA3Config(**MLP_ADAPTERS["c"]))
    with pytest.raises(ValueError, match="cannot be an adapter name"):
        model.add_weighted_adapter(["a", "b"], [0.5, 0.5], name)
    assert (list(model.ia3_l), [g.code for g in model.graph_modules]) == tuple(before[:2])
    assert torch.equal(out(model), before[2])
