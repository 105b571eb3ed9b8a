"""Merging: the fold pass (merged graph), merge_adapter/unmerge_adapter in place, merge_and_unload,
unload, safe_merge, disable_adapter on a merged model, and shared/tied weights.

Every merged weight is compared bit for bit with PEFT's ``merge_and_unload`` for the same vectors;
every merged output with the adapted (unmerged) one.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections import Counter

import peft
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    custom_input,
    custom_model,
    logits,
    peft_and_ia3,
    tiny_bert_seq_cls,
    tiny_gpt2,
    tiny_llama,
    token_inputs,
)
from torch import nn
from transformers import PreTrainedModel

import ia3fx
from ia3fx.passes import SharedWeightError, cleanup_graph

ATOL = 1e-5


class ConvNet(nn.Module):
    """Plain, grouped and depthwise convolutions and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 16, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.point = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.grouped(x))
        x = self.depthwise(x)
        x = F.relu(self.point(x))
        return self.head(x.mean(dim=(2, 3)))


def conv_net():
    torch.manual_seed(0)
    return ConvNet().eval()


def conv_inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, 3, 8, 8, generator=g)}


CONV_KWARGS = {
    "target_modules": ["stem", "grouped", "depthwise", "point", "head"],
    "feedforward_modules": ["grouped", "point", "head"],  # ff on a grouped conv: per-group input scale
}

# (name, factory, inputs(batch, seq, seed), PEFT/ia3fx config kwargs, trace with the inputs?)
CASES = {
    "llama": (tiny_llama, lambda **k: token_inputs("llama", **k), {}, False),
    "gpt2": (tiny_gpt2, lambda **k: token_inputs("gpt2", **k), {}, False),
    "bert": (tiny_bert_seq_cls, lambda **k: token_inputs("bert", **k), {"task_type": "SEQ_CLS"}, False),
    "convnet": (conv_net, lambda batch=2, seq=None, seed=1: conv_inputs(batch, seed), CONV_KWARGS, True),
    "conv3d": (
        lambda: custom_model("Conv3d"),
        lambda batch=None, seq=None, seed=None: {"X": custom_input()},
        {"target_modules": ["conv3d", "lin0"], "feedforward_modules": ["conv3d"]},
        True,
    ),
}
MAIN = ["llama", "gpt2", "bert", "convnet"]


def _build(name, dtype=None):
    """(peft_model, ia3_model, base, inputs): two copies of one model with the same random adapter."""
    factory, inputs_fn, kwargs, traced_with_inputs = CASES[name]
    model = factory()
    if dtype is not None:
        model = model.to(dtype)
    base = copy.deepcopy(model)
    inputs = inputs_fn()
    if dtype is not None:
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    example = inputs if traced_with_inputs else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out notices
        peft_model, ia3_model = peft_and_ia3(model, kwargs, example_inputs=example)
    return peft_model, ia3_model, base, inputs


@functools.cache
def _shared(name):
    """For the tests that leave the model as they found it (checked at their end)."""
    return _build(name)


def _out(model, inputs):
    with torch.no_grad():
        return logits(model(**inputs))


def _ops(gm) -> Counter:
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def _snapshot(ia3_model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(parameter object, a copy of its value) for every base tensor."""
    return {k: (v, v.detach().clone()) for k, v in ia3_model.model.state_dict(keep_vars=True).items()}


def _assert_unchanged(ia3_model, snapshot):
    now = ia3_model.model.state_dict(keep_vars=True)
    assert set(now) == set(snapshot)
    for k, (obj, value) in snapshot.items():
        assert now[k] is obj, k
        assert torch.equal(now[k].detach(), value), k


def _peft_merged_state(peft_model):
    return {k: v.detach() for k, v in peft_model.merge_and_unload().state_dict().items()}


def _saved_keys(ia3_model) -> set[str]:
    """State-dict keys of the modules_to_save modules (PEFT swaps in the copy; merge_adapter does not)."""
    mods = ia3_model._selections[ia3_model.active_adapter].modules_to_save
    return {k for k in ia3_model.model.state_dict() if any(k.startswith(m + ".") for m in mods)}


def _targeted_weight_keys(ia3_model) -> list[str]:
    sd = ia3_model.model.state_dict()
    return [f"{t}.weight" for t in ia3_model.targets if f"{t}.weight" in sd]


# --- the merged graph (fold_scales) --------------------------------------------------------------
@pytest.mark.parametrize("name", [*MAIN, "conv3d"])
def test_merged_graph_has_base_ops_and_adapted_outputs(name):
    peft_model, ia3_model, base, inputs = _shared(name)
    snap = _snapshot(ia3_model)
    adapted = _out(ia3_model, inputs)
    merged = ia3_model.merged_graph_module()
    _, _, _, traced_with_inputs = CASES[name]
    # the graph IA3Model starts from: the base model's capture, cleaned up as IA3Model does
    base_graph, _ = cleanup_graph(ia3fx.trace(base, inputs if traced_with_inputs else None))

    # exactly the base graph's operations; the adapted graph has one mul (or mul + cast) per site
    assert _ops(merged) == _ops(base_graph)
    adapted_graph = ia3_model.graph_module
    scale_nodes = [n for n in adapted_graph.graph.nodes if n.op == "call_function" and n.meta.get("ia3fx")]
    assert len(scale_nodes) >= len(ia3_model.targets)
    assert _ops(adapted_graph) - Counter(str(n.target) for n in scale_nodes) == _ops(base_graph)
    assert not any(n.meta.get("ia3fx") for n in merged.graph.nodes)
    assert not hasattr(merged, "ia3_l")
    # it reads the base model's tensors by their names, the trained copies (bert's classifier)
    # in place of the originals (the base capture also holds tensors it no longer reads, as a tied
    # embedding's alias)
    reads = {n.target for n in merged.graph.nodes if n.op == "get_attr"}
    assert reads == {n.target for n in base_graph.graph.nodes if n.op == "get_attr" and n.users}
    assert set(merged.state_dict()) <= set(base_graph.state_dict())
    assert not any(k.startswith(("ia3_l.", "modules_to_save.")) for k in merged.state_dict())

    got = _out(merged, inputs)
    torch.testing.assert_close(got, adapted, rtol=0, atol=ATOL)
    assert (got - _out(base, inputs)).abs().max() > 100 * ATOL  # the adapter matters
    # folded weights are PEFT's merged weights, bit for bit
    merged_sd = merged.state_dict()
    peft_sd = _peft_merged_state(copy.deepcopy(peft_model))
    for k in _targeted_weight_keys(ia3_model) + sorted(_saved_keys(ia3_model)):
        assert torch.equal(merged_sd[k], peft_sd[k]), k
    _assert_unchanged(ia3_model, snap)  # the adapted model was not touched
    torch.testing.assert_close(_out(ia3_model, inputs), adapted, rtol=0, atol=0)


def test_merged_graph_module_of_another_signature():
    """``example_inputs`` picks (or captures) the graph to merge: here one with an attention mask."""
    _, ia3_model, base, _ = _shared("llama")
    inputs = token_inputs("llama", batch=3, seq=9, mask=True)
    merged = ia3_model.merged_graph_module(inputs)
    placeholders = [n.name for n in merged.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["input_ids", "attention_mask"]
    torch.testing.assert_close(_out(merged, inputs), _out(ia3_model, inputs), rtol=0, atol=ATOL)


# --- merge_adapter / unmerge_adapter in place ----------------------------------------------------
@pytest.mark.parametrize("name", [*MAIN, "conv3d"])
def test_merge_adapter_matches_peft_and_unmerge_restores(name):
    peft_model, ia3_model, base, inputs = _build(name)
    snap = _snapshot(ia3_model)
    adapted = _out(ia3_model, inputs)
    peft_merged = peft_model.merge_and_unload()
    peft_sd = peft_merged.state_dict()

    ia3_model.merge_adapter()
    assert ia3_model.merged_adapters == ["default"]
    merged = _out(ia3_model, inputs)
    torch.testing.assert_close(merged, adapted, rtol=0, atol=ATOL)
    torch.testing.assert_close(merged, _out(peft_merged, inputs), rtol=0, atol=ATOL)
    sd = ia3_model.model.state_dict()
    skip = _saved_keys(ia3_model)  # in place, the wrappers stay: the original head is untouched
    for k in sd:
        if k not in skip:
            assert torch.equal(sd[k], peft_sd[k]), k
    assert any(not torch.equal(sd[k], snap[k][1]) for k in _targeted_weight_keys(ia3_model))

    with pytest.warns(UserWarning, match="already merged"):
        ia3_model.merge_adapter()
    torch.testing.assert_close(_out(ia3_model, inputs), merged, rtol=0, atol=0)

    ia3_model.unmerge_adapter()
    _assert_unchanged(ia3_model, snap)  # bit for bit, same parameter objects
    assert ia3_model.merged_adapters == []
    torch.testing.assert_close(_out(ia3_model, inputs), adapted, rtol=0, atol=0)
    with pytest.warns(UserWarning, match="Already unmerged"):
        ia3_model.unmerge_adapter()


def _with_zero_entries(ia3_model, seed=7):
    """Random vectors with one exact zero each: PEFT's divide-by-(l + 1e-8) unmerge destroys these."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ia3_model.ia3_l.parameters():
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            p.view(-1)[0] = 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", MAIN)
def test_unmerge_is_exact(name, dtype):
    """Bit for bit in every dtype, with a zero in every vector (PEFT divides by ``l + 1e-8``: it
    drifts in half precision and cannot recover a zeroed row)."""
    peft_model, ia3_model, _, inputs = _build(name, dtype)
    _with_zero_entries(ia3_model)
    peft.set_peft_model_state_dict(peft_model, ia3_model.adapter_state_dict())
    snap = _snapshot(ia3_model)
    adapted = _out(ia3_model, inputs)
    ia3_model.merge_adapter()
    sd = ia3_model.model.state_dict()
    # the merge is PEFT's, bit for bit: fp32 vectors on a half base, the product rounded once
    peft_sd = peft_model.merge_and_unload().state_dict()
    for k in sd:
        if k not in _saved_keys(ia3_model):
            assert sd[k].dtype == dtype and torch.equal(sd[k], peft_sd[k]), k
    changed = [k for k in _targeted_weight_keys(ia3_model) if not torch.equal(sd[k], snap[k][1])]
    assert changed
    # the zero entry zeroed a whole row/column/channel of some weight
    assert any(bool((sd[k].flatten(1) == 0).all(dim=1).any() or (sd[k].flatten(1) == 0).all(dim=0).any()) for k in changed)
    tol = ATOL if dtype == torch.float32 else 0.05
    torch.testing.assert_close(_out(ia3_model, inputs).float(), adapted.float(), rtol=0, atol=tol)
    ia3_model.unmerge_adapter()
    _assert_unchanged(ia3_model, snap)
    torch.testing.assert_close(_out(ia3_model, inputs), adapted, rtol=0, atol=0)


def test_several_adapters_merge_as_their_product():
    _, ia3_model, _, inputs = _build("llama")
    ia3_model.add_adapter("other", ia3fx.IA3Config(target_modules=["v_proj", "o_proj"], feedforward_modules=[]))
    with torch.no_grad():
        for p in ia3_model.ia3_l["other"].parameters():
            p.copy_(torch.linspace(0.5, 1.5, p.numel()).reshape(p.shape))
    ia3_model.set_adapter(["default", "other"])
    snap = _snapshot(ia3_model)
    both = _out(ia3_model, inputs)
    torch.testing.assert_close(_out(ia3_model.merged_graph_module(), inputs), both, rtol=0, atol=ATOL)
    ia3_model.merge_adapter()
    torch.testing.assert_close(_out(ia3_model, inputs), both, rtol=0, atol=ATOL)
    ia3_model.unmerge_adapter()
    _assert_unchanged(ia3_model, snap)
    # one adapter merged, the other still applied by the graph
    ia3_model.merge_adapter(["other"])
    torch.testing.assert_close(_out(ia3_model, inputs), both, rtol=0, atol=ATOL)
    ia3_model.unmerge_adapter()
    _assert_unchanged(ia3_model, snap)


# --- safe_merge ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "bert", "convnet"])
def test_safe_merge_failure_leaves_every_weight(name):
    _, ia3_model, _, inputs = _build(name)
    last = list(ia3_model.targets)[-1]  # the last layer: every other weight is computed before it
    snap = _snapshot(ia3_model)
    model_class = type(ia3_model.model)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with torch.no_grad():
            ia3_model.get_vector(last).view(-1)[1] = bad
        with pytest.raises(ValueError, match="NaNs detected in the merged"):
            ia3_model.merge_adapter(safe_merge=True)
        _assert_unchanged(ia3_model, snap)
        assert ia3_model.merged_adapters == []
        with pytest.raises(ValueError, match="NaNs detected in the merged"):
            ia3_model.merge_and_unload(safe_merge=True)
        _assert_unchanged(ia3_model, snap)  # and no modules_to_save copy was swapped in
        assert type(ia3_model.model) is model_class and ia3_model.merged_adapters == []
    # the model merges once the vector is repaired
    with torch.no_grad():
        ia3_model.get_vector(last).view(-1)[1] = 1.0
    ia3_model.merge_adapter(safe_merge=True)
    assert ia3_model.merged_adapters == ["default"]


# --- disable_adapter on a merged model -----------------------------------------------------------
@pytest.mark.parametrize("name", MAIN)
def test_disable_adapter_inside_a_merged_model(name):
    _, ia3_model, base, inputs = _build(name)
    base_out = _out(base, inputs)
    ia3_model.merge_adapter()
    merged_snap = _snapshot(ia3_model)
    merged_out = _out(ia3_model, inputs)
    assert (merged_out - base_out).abs().max() > 100 * ATOL
    with ia3_model.disable_adapter():
        torch.testing.assert_close(_out(ia3_model, inputs), base_out, rtol=0, atol=1e-6)
    # on exit the model is merged again, with the very same merged weights (PEFT unmerges here)
    assert ia3_model.merged_adapters == ["default"]
    _assert_unchanged(ia3_model, merged_snap)
    torch.testing.assert_close(_out(ia3_model, inputs), merged_out, rtol=0, atol=0)
    # an exception inside the block restores the merged state too
    with pytest.raises(RuntimeError, match="inside"):
        with ia3_model.disable_adapter():
            raise RuntimeError("inside")
    _assert_unchanged(ia3_model, merged_snap)


def test_unmerge_inside_disable_adapter_stays_unmerged():
    """Leaving the block must not bring back merged weights the block unmerged."""
    _, ia3_model, _, inputs = _build("convnet")
    snap = _snapshot(ia3_model)
    adapted = _out(ia3_model, inputs)
    ia3_model.merge_adapter()
    with ia3_model.disable_adapter():
        ia3_model.unmerge_adapter()
    assert ia3_model.merged_adapters == []
    _assert_unchanged(ia3_model, snap)
    torch.testing.assert_close(_out(ia3_model, inputs), adapted, rtol=0, atol=0)


def test_merge_inside_disable_adapter_of_a_merged_model_is_refused():
    """The block sets the merged weights aside; a merge inside could not keep both merges."""
    _, ia3_model, base, inputs = _build("llama")
    ia3_model.add_adapter("other", ia3fx.IA3Config(target_modules=["v_proj"], feedforward_modules=[]))
    ia3_model.merge_adapter(["default"])
    merged_snap = _snapshot(ia3_model)
    merged_out = _out(ia3_model, inputs)
    with ia3_model.disable_adapter():
        with pytest.raises(ValueError, match=r"cannot merge \['other'\] inside disable_adapter"):
            ia3_model.merge_adapter(["other"])
        torch.testing.assert_close(_out(ia3_model, inputs), _out(base, inputs), rtol=0, atol=1e-6)
    assert ia3_model.merged_adapters == ["default"]
    _assert_unchanged(ia3_model, merged_snap)
    torch.testing.assert_close(_out(ia3_model, inputs), merged_out, rtol=0, atol=0)
    ia3_model.merge_adapter(["other"])  # after the block it merges on top
    assert ia3_model.merged_adapters == ["default", "other"]


# --- merge_and_unload / unload -------------------------------------------------------------------
@pytest.mark.parametrize("name", MAIN)
def test_merge_and_unload_matches_peft(name):
    peft_model, ia3_model, base, inputs = _build(name)
    adapted = _out(ia3_model, inputs)
    peft_merged = peft_model.merge_and_unload()
    out = ia3_model.merge_and_unload()
    assert type(out) is type(base)
    assert not any(isinstance(m, ia3fx.IA3Model) for m in out.modules())
    assert set(out.state_dict()) == set(base.state_dict())
    peft_sd = peft_merged.state_dict()
    for k, v in out.state_dict().items():  # modules_to_save copies included
        assert torch.equal(v, peft_sd[k]), k
    torch.testing.assert_close(_out(out, inputs), adapted, rtol=0, atol=ATOL)
    torch.testing.assert_close(_out(out, inputs), _out(peft_merged, inputs), rtol=0, atol=ATOL)


def test_merge_and_unload_bert_swaps_in_the_trained_classifier():
    _, ia3_model, base, inputs = _build("bert")
    copy_module = ia3_model.modules_to_save["default"]["classifier"]
    out = ia3_model.merge_and_unload()
    assert out.classifier is copy_module
    assert not torch.equal(out.classifier.weight, base.classifier.weight)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_merge_and_unload_generates_and_saves(name, tmp_path):
    peft_model, ia3_model, _, _ = _build(name)
    ids = token_inputs(name, batch=2, seq=5)["input_ids"]
    ia3_model.model.config.use_cache = peft_model.get_base_model().config.use_cache = True  # generate with a cache
    ia3_model.graph_module  # noqa: B018 - tracing turns the cache off, for a while only
    out = ia3_model.merge_and_unload()
    assert isinstance(out, PreTrainedModel) and out.config.use_cache
    assert not any("forward" in vars(m) for m in out.modules())  # the model's own forward everywhere
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in out.modules())  # no hooks of ours
    peft_merged = peft_model.merge_and_unload()
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        got = out.generate(ids, **kwargs)
        want = peft_merged.generate(ids, **kwargs)
    assert got.shape == (2, 11)
    assert torch.equal(got, want)
    out.save_pretrained(tmp_path)
    reloaded = type(out).from_pretrained(tmp_path).eval()
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, out.state_dict()[k]), k
    torch.testing.assert_close(_out(reloaded, {"input_ids": ids}), _out(out, {"input_ids": ids}), rtol=0, atol=0)


@pytest.mark.parametrize("name", MAIN)
def test_unload_returns_the_model_unchanged(name):
    _, ia3_model, base, inputs = _build(name)
    snap = _snapshot(ia3_model)
    ia3_model.merge_adapter()
    out = ia3_model.unload()
    assert out is ia3_model.model and type(out) is type(base)
    _assert_unchanged(ia3_model, snap)
    for k, v in out.state_dict().items():
        assert torch.equal(v, base.state_dict()[k]), k
    torch.testing.assert_close(_out(out, inputs), _out(base, inputs), rtol=0, atol=0)


# --- shared and tied weights ---------------------------------------------------------------------
def _gpt2_with_lm_head():
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    config = ia3fx.IA3Config(target_modules=["c_attn", "mlp.c_proj", "lm_head"], feedforward_modules=["mlp.c_proj"])
    ia3_model = ia3fx.get_ia3_model(model, config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ia3_model.ia3_l.parameters():
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
    return ia3_model


def test_tied_lm_head_is_refused_and_nothing_changes(tmp_path):
    ia3_model = _gpt2_with_lm_head()
    inputs = token_inputs("gpt2")
    snap = _snapshot(ia3_model)
    adapted = _out(ia3_model, inputs)
    calls = {
        "merge_adapter": ia3_model.merge_adapter,
        "merged_graph_module": ia3_model.merged_graph_module,
        "merge_and_unload": ia3_model.merge_and_unload,
        "export": lambda: ia3fx.export(ia3_model, tmp_path / "out", "transformers"),
    }
    for what, call in calls.items():
        with pytest.raises(SharedWeightError) as info:
            call()
        message = str(info.value)
        assert "lm_head" in message and "transformer.wte" in message, (what, message)
        _assert_unchanged(ia3_model, snap)
        assert ia3_model.merged_adapters == []
        assert ia3_model.model.lm_head.weight is ia3_model.model.transformer.wte.weight
        torch.testing.assert_close(_out(ia3_model, inputs), adapted, rtol=0, atol=0)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary left behind


def test_tied_embedding_is_not_scaled_when_lm_head_is_not_targeted():
    """GPT-2's defaults do not target lm_head: merging leaves the tied embedding alone."""
    _, ia3_model, base, inputs = _build("gpt2")
    ia3_model.merge_adapter()
    assert torch.equal(ia3_model.model.transformer.wte.weight, base.transformer.wte.weight)
    assert ia3_model.model.lm_head.weight is ia3_model.model.transformer.wte.weight


class SharedWeights(nn.Module):
    """``b`` reuses ``a``'s weight; ``c`` is called twice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.c = nn.Linear(8, 8)

    def forward(self, x):
        return self.c(torch.relu(self.c(self.b(torch.relu(self.a(x))))))


def _shared_weights_model(targets, ff=()):
    torch.manual_seed(0)
    model = SharedWeights().eval()
    ia3_model = ia3fx.get_ia3_model(
        model, ia3fx.IA3Config(target_modules=list(targets), feedforward_modules=list(ff)), example_inputs=(torch.randn(4, 8),)
    )
    with torch.no_grad():
        for p in ia3_model.ia3_l.parameters():
            p.copy_(torch.linspace(0.5, 1.5, p.numel()))
    return ia3_model


@pytest.mark.parametrize("targets", [["a"], ["a", "b"]], ids=["one-user-targeted", "both-users-targeted"])
def test_weight_shared_by_two_layers_is_refused(targets):
    ia3_model = _shared_weights_model(targets)
    x = {"x": torch.randn(3, 8)}
    snap = _snapshot(ia3_model)
    adapted = _out(ia3_model, x)
    for call in (ia3_model.merge_adapter, ia3_model.merged_graph_module):
        with pytest.raises(SharedWeightError) as info:
            call()
        message = str(info.value)  # names the layer and the other user of its weight
        assert "vector of 'a'" in message
        assert "'b.weight'" in message or "module b," in message, message
        _assert_unchanged(ia3_model, snap)
        torch.testing.assert_close(_out(ia3_model, x), adapted, rtol=0, atol=0)


@pytest.mark.parametrize("ff", [[], ["c"]], ids=["output", "input"])
def test_module_called_twice_folds_once(ff):
    """Two call sites of one targeted module share its vector, as PEFT's wrapper scales every call."""
    ia3_model = _shared_weights_model(["c"], ff)
    x = {"x": torch.randn(3, 8)}
    assert [s.name for s in ia3_model.call_sites if s.targeted] == ["c", "c"]
    snap = _snapshot(ia3_model)
    adapted = _out(ia3_model, x)
    merged = ia3_model.merged_graph_module()
    torch.testing.assert_close(_out(merged, x), adapted, rtol=0, atol=ATOL)
    ia3_model.merge_adapter()
    torch.testing.assert_close(_out(ia3_model, x), adapted, rtol=0, atol=ATOL)
    ia3_model.unmerge_adapter()
    _assert_unchanged(ia3_model, snap)


def test_peft_merges_the_same_conv_weights():
    """The grouped conv's input scale expands per group: checked against PEFT for each conv kind."""
    peft_model, ia3_model, _, _ = _build("convnet")
    assert ia3_model.model.grouped.groups == 4 and ia3_model.model.depthwise.groups == 16
    merged = ia3_model.merged_graph_module().state_dict()
    peft_sd = _peft_merged_state(peft_model)
    for layer in ("stem", "grouped", "depthwise", "point"):
        assert torch.equal(merged[f"{layer}.weight"], peft_sd[f"{layer}.weight"]), layer
    # attention-type convs scale their bias, feedforward ones do not
    base = ia3_model.model
    assert not torch.equal(merged["stem.bias"], base.stem.bias)
    assert torch.equal(merged["grouped.bias"], base.grouped.bias)
    assert torch.equal(merged["point.bias"], base.point.bias)
