"""Quantized bases: torchao int8 weight-only, int8 dynamic-activation int8-weight and int4 weight-only
(torchao's intx path, the one that runs on CPU), and bitsandbytes 8-bit and 4-bit.

Parity is against PEFT on the same quantized base, with random vectors (N(1, 0.3)); each case
also checks that the adapter changes the output. The merge rule is tested per site kind: an output
vector folds into the per-row scales (quantized data untouched), an input vector into torchao's
``act_pre_scale`` where the weight has one, and is kept as a multiply (or requantized) elsewhere.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from conftest import MLP, logits, peft_and_ia3, randomize_peft, tiny_gpt2, tiny_llama, token_inputs

import ia3fx
from ia3fx.export import merged_state_dict
from ia3fx.quantized_merge import QuantizedMergeReport

torchao = pytest.importorskip("torchao", reason="torchao is a test dependency: pip install 'torchao>=0.10'")
from torchao.quantization import (  # noqa: E402
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
    quantize_,
)
from torchao.quantization.granularity import PerGroup, PerTensor  # noqa: E402

INT4 = "int4"
CONFIGS = {
    "int8_weight_only": lambda: Int8WeightOnlyConfig(),
    "int8_dynamic": lambda: Int8DynamicActivationInt8WeightConfig(),
    INT4: lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
}
LLAMA = {}  # PEFT's defaults: k_proj, v_proj (output), down_proj (input)


def quantized(model, kind: str):
    quantize_(model, CONFIGS[kind]())
    return model


def _pair(kind: str, build=tiny_llama, peft_kwargs=None):
    base = quantized(build(), kind)
    pm, ia3 = peft_and_ia3(copy.deepcopy(base), dict(peft_kwargs or LLAMA))
    return base, pm, ia3


@pytest.mark.parametrize("kind", ["int8_weight_only", INT4])  # int8_dynamic: test_int8_dynamic_activations
def test_llama_call_sites_found_and_logits_equal_peft(kind):
    base, pm, ia3 = _pair(kind)
    weight = ia3.model.model.layers[0].self_attn.k_proj.weight
    assert type(weight).__module__.startswith("torchao"), type(weight)
    inputs = token_inputs("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to hooks: the block graphs have the sites
        out = logits(ia3(**inputs))
    assert all(r["graph"] > 0 and r["eager"] == 0 for r in ia3.block_runs().values()), ia3.block_runs()
    scaled = {s.name for g in ia3.block_graphs for s in g.sites if s.name in g.scaled}
    assert scaled == {"self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"}
    assert torch.equal(out, logits(pm(**inputs)))  # the same kernel on the same inputs
    assert (out - logits(base(**inputs))).abs().max() > 1e-2  # the adapter does something


def _qdata(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.qdata.clone() for n, m in model.named_modules() if hasattr(getattr(m, "weight", None), "qdata")}


def _grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad and "ia3_l" in name and p.grad is not None:
            layer = name.replace("base_model.model.", "").split(".ia3_l")[0].replace("__", ".")
            out[layer.replace("ia3_l.default.", "")] = p.grad.reshape(-1)
    return out


@pytest.mark.parametrize("kind", ["int8_weight_only", INT4])
def test_vector_gradients_equal_peft_and_a_step_trains(kind):
    _, pm, ia3 = _pair(kind)
    pm.train(), ia3.train()
    inputs = token_inputs("llama")
    for model in (pm, ia3):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
    ours, theirs = _grads(ia3), _grads(pm)
    assert len(ours) == len(theirs) == 6 and ours.keys() == theirs.keys()
    for layer, g in ours.items():
        assert g.abs().sum() > 0, layer
        torch.testing.assert_close(g, theirs[layer], rtol=1e-5, atol=1e-7)
    before = {n: p.detach().clone() for n, p in ia3.named_parameters() if p.requires_grad}
    torch.optim.SGD([p for p in ia3.parameters() if p.requires_grad], lr=0.1).step()
    assert all(not torch.equal(p, before[n]) for n, p in ia3.named_parameters() if p.requires_grad)


def test_gpt2_with_a_quantized_lm_head_equals_peft():
    # torchao quantizes nn.Linear only: GPT-2's Conv1D stay float, its (untied) lm_head is int8
    kwargs = dict(target_modules=["c_attn", "mlp.c_proj", "lm_head"], feedforward_modules=["mlp.c_proj"])
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    base = quantized(tiny_gpt2(tie_word_embeddings=False, **no_dropout), "int8_weight_only")
    base.config.use_cache = False
    pm = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**kwargs))
    randomize_peft(pm)
    ia3 = ia3fx.get_ia3_model(copy.deepcopy(base), ia3fx.IA3Config(**kwargs))
    # PEFT's state dict also carries lm_head's base weight ("embedding-like" name): the vectors only
    ia3.load_adapter_state_dict({k: v for k, v in peft.get_peft_model_state_dict(pm).items() if k.endswith("ia3_l")})
    assert type(ia3.model.lm_head.weight).__name__ == "Int8Tensor"
    inputs = token_inputs("gpt2")
    out = logits(ia3(**inputs))
    assert torch.equal(out, logits(pm(**inputs)))
    assert (out - logits(base(**inputs))).abs().max() > 1e-2
    ia3.train(), pm.train()
    for model in (pm, ia3):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
    g, ref = _grads(ia3), _grads(pm)
    assert g.keys() == ref.keys() and g["lm_head"].abs().sum() > 0
    for layer in g:
        torch.testing.assert_close(g[layer], ref[layer], rtol=1e-5, atol=1e-7)


# --- merging -------------------------------------------------------------------------------------
def test_merge_into_int8_weights_folds_both_kinds_exactly_and_unmerges():
    base, _, ia3 = _pair("int8_weight_only")
    inputs = token_inputs("llama")
    ref = logits(ia3(**inputs))
    layers = ia3.model.model.layers[0]
    scale0 = layers.self_attn.k_proj.weight.scale.clone()
    q0 = _qdata(ia3.model)
    ia3.merge_adapter()
    report = ia3.merge_report
    assert isinstance(report, QuantizedMergeReport) and len(report.folded) == 6 and not report.kept
    assert all(torch.equal(q, _qdata(ia3.model)[n]) for n, q in q0.items())  # no new quantization
    k_vec = ia3.get_vector("model.layers.0.self_attn.k_proj").detach().reshape(-1, 1)
    torch.testing.assert_close(layers.self_attn.k_proj.weight.scale, scale0 * k_vec, rtol=0, atol=0)
    down_vec = ia3.get_vector("model.layers.0.mlp.down_proj").detach().reshape(-1)
    assert torch.equal(layers.mlp.down_proj.weight.act_pre_scale, down_vec)  # the input scale, in the kernel
    merged = logits(ia3(**inputs))
    torch.testing.assert_close(merged, ref, rtol=0, atol=1e-5)  # fp32 rounding of scale products only
    with ia3.disable_adapter():  # the original quantized tensors, swapped in and out again
        assert torch.equal(logits(ia3(**inputs)), logits(base(**inputs)))
    assert torch.equal(logits(ia3(**inputs)), merged)
    ia3.unmerge_adapter()
    assert torch.equal(layers.self_attn.k_proj.weight.scale, scale0)
    assert layers.mlp.down_proj.weight.act_pre_scale is None
    assert torch.equal(logits(ia3(**inputs)), ref)
    plain = ia3.merge_and_unload()
    assert type(plain).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits(plain(**inputs)), ref, rtol=0, atol=1e-5)


def test_int8_dynamic_activations_equal_peft_stop_gradients_and_merge():
    base, pm, ia3 = _pair("int8_dynamic")
    inputs = token_inputs("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = logits(ia3(**inputs))
    assert all(r["graph"] > 0 and r["eager"] == 0 for r in ia3.block_runs().values()), ia3.block_runs()
    assert torch.equal(ref, logits(pm(**inputs)))
    plain = logits(base(**inputs))
    assert (ref - plain).abs().max() > 1e-2
    # the activations' dynamic quantization has no gradient: PEFT's loss has no grad_fn either
    for model in (pm, ia3):
        with pytest.raises(RuntimeError, match="does not require grad"):
            model(**inputs, labels=inputs["input_ids"]).loss.backward()
    # folding changes the layer outputs by float rounding, which the next layer's dynamic
    # activation quantization may round to the neighbouring int8 step: close, not bit-equal
    q0 = _qdata(ia3.model)
    merged = logits(ia3.merge_and_unload()(**inputs))
    assert len(ia3.merge_report.folded) == 6
    assert all(torch.equal(q, _qdata(ia3.model)[n]) for n, q in q0.items())
    assert (merged - ref).abs().max() < 0.05 * (ref - plain).abs().max()


def test_int4_output_vectors_fold_and_input_vectors_stay_a_multiply():
    _, _, ia3 = _pair(INT4)
    inputs = token_inputs("llama")
    ref = logits(ia3(**inputs))
    with pytest.warns(UserWarning, match="stay applied as a multiply"):
        ia3.merge_adapter()
    report = ia3.merge_report
    assert sorted(report.folded) == sorted(f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("k_proj", "v_proj"))
    assert sorted(report.kept) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert "per-row scales" in report.kept["model.layers.0.mlp.down_proj"] and "kept as a multiply (2)" in str(report)
    torch.testing.assert_close(logits(ia3(**inputs)), ref, rtol=0, atol=1e-5)
    plain = ia3.merge_and_unload()
    down = plain.model.layers[0].mlp.down_proj
    assert len(down._forward_pre_hooks) == 1  # the kept multiply, on the user's model
    torch.testing.assert_close(logits(plain(**inputs)), ref, rtol=0, atol=1e-5)


def test_requantize_folds_every_vector_and_reports_the_error():
    base, _, ia3 = _pair(INT4)
    inputs = token_inputs("llama")
    ref = logits(ia3(**inputs))
    effect = (ref - logits(base(**inputs))).abs().max()
    plain = ia3.merge_and_unload(requantize=True)
    report = ia3.merge_report
    assert len(report.requantized) == 2 and not report.kept and len(report.folded) == 4
    assert all(not m._forward_pre_hooks for m in plain.modules())
    err = report.requantize_error
    assert err is not None and 0 < err < 0.1 * effect
    assert (logits(plain(**inputs)) - ref).abs().max() < 0.1 * effect


@pytest.mark.parametrize(
    "config, expect",
    [
        (lambda: Int8WeightOnlyConfig(), {"lin0": "folded", "lin1": "folded"}),
        (lambda: Int8WeightOnlyConfig(granularity=PerTensor()), {"lin0": "kept", "lin1": "folded"}),
    ],
    ids=["per_row", "per_tensor"],
)
def test_merge_rule_per_site_kind_in_the_merged_graph_and_pt2(config, expect, tmp_path):
    torch.manual_seed(0)
    mlp = MLP(bias=True).eval()
    quantize_(mlp, config())
    x = torch.randn(9, 10)
    cfg = ia3fx.IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"])  # lin0 output, lin1 input
    plan = ia3fx.plan(mlp, cfg, example_inputs=(x,))  # the dry run finds the sites through the subclass
    assert [(s.name, s.kind, s.scale) for s in plan.call_sites] == [("lin0", "linear", "output"), ("lin1", "linear", "input")]
    ia3 = ia3fx.get_ia3_model(mlp, cfg, example_inputs=(x,))
    with torch.no_grad():
        for layer in ("lin0", "lin1"):
            v = ia3.get_vector(layer)
            v.copy_(1 + 0.3 * torch.randn(v.shape))
    ref = ia3(x)
    assert (ref - mlp(x)).abs().max() > 1e-3
    merged = ia3.merged_graph_module()
    scales = {n.meta["ia3fx"]["layer"] for n in merged.graph.nodes if n.meta.get("ia3fx", {}).get("role") == "scale"}
    assert scales == {layer for layer, how in expect.items() if how == "kept"}
    torch.testing.assert_close(merged(x), ref, rtol=0, atol=1e-6)
    for merged_flag in (False, True):
        path = tmp_path / f"m{merged_flag}.pt2"
        ia3fx.export(ia3, path, format="pt2", merged=merged_flag, example_inputs=(x,))
        torch.testing.assert_close(torch.export.load(path).module()(x), ref, rtol=0, atol=1e-6)


def test_a_fold_that_is_not_exact_is_refused_where_it_cannot_be_kept():
    # a merged transformers checkpoint has no place for a multiply: refused, naming the layer
    _, _, ia3 = _pair(INT4)
    with pytest.raises(ValueError, match="mlp.down_proj' cannot be folded into its quantized weight"):
        merged_state_dict(ia3)
    assert ia3.merged_adapters == []


def test_int4_weight_only_config_needs_a_gpu_kernel_here():
    # torchao's Int4WeightOnlyConfig packs for CUDA/XPU kernels (mslk, tinygemm); the CPU int4 path
    # is IntxWeightOnlyConfig(torch.int4), tested above
    try:
        quantize_(tiny_llama(), torchao.quantization.Int4WeightOnlyConfig(group_size=32))
    except (ImportError, RuntimeError, NotImplementedError, AssertionError) as e:
        pytest.skip(f"Int4WeightOnlyConfig does not run on this machine: {type(e).__name__}: {e}")
    pytest.fail("Int4WeightOnlyConfig now runs here: add it to CONFIGS")


# --- bitsandbytes --------------------------------------------------------------------------------
def _bnb_llama(tmp_path, bits: int):
    try:
        import bitsandbytes  # noqa: F401
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    except Exception as e:  # noqa: BLE001 - any import failure is a reason to skip
        pytest.skip(f"bitsandbytes does not import here: {type(e).__name__}: {e}")
    path = tmp_path / "llama"
    tiny_llama().save_pretrained(path)
    q = dict(load_in_8bit=True) if bits == 8 else dict(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, quantization_config=BitsAndBytesConfig(**q), dtype=torch.float32, device_map="cpu"
        ).eval()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"bitsandbytes {bits}-bit does not run on this machine: {type(e).__name__}: {e}")


@pytest.mark.parametrize("bits", [8, 4])
def test_bitsandbytes_equals_peft_and_merge_keeps_the_vectors(bits, tmp_path):
    base = _bnb_llama(tmp_path, bits)
    assert type(base.model.layers[0].self_attn.k_proj).__name__ == ("Linear8bitLt" if bits == 8 else "Linear4bit")
    inputs = token_inputs("llama")
    plain = logits(base(**inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bnb's cast notes; ia3fx's "run their own forward" note
        pm, ia3 = peft_and_ia3(copy.deepcopy(base), {})
        out = logits(ia3(**inputs))
    assert torch.equal(out, logits(pm(**inputs)))
    assert (out - plain).abs().max() > 1e-2
    with pytest.raises(ValueError, match="Cannot merge ia3 layers"):
        pm.merge_and_unload()  # PEFT refuses; ia3fx keeps the vectors as multiplies
    with pytest.warns(UserWarning, match="stay applied as a multiply"):
        merged = ia3.merge_and_unload()
    assert len(ia3.merge_report.kept) == 6 and not ia3.merge_report.folded
    assert torch.equal(logits(merged(**inputs)), out)
