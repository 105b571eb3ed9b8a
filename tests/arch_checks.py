"""The checks of the coverage table, one function per column, shared by
``tests/test_architectures.py`` (which asserts them) and ``benchmarks/architectures_table.py``
(which times them and writes ``docs/architectures.md``).

Each check compares with PEFT on the same base weights and the same non-trivial vectors, and first
makes sure the adapter changes the output (a silent no-op would otherwise pass).
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
import warnings
from dataclasses import dataclass

import numpy as np
import peft
import torch
from arch_cases import Arch, build
from conftest import randomize_peft

import ia3fx
from ia3fx.default_inputs import default_inputs

ATOL = 1e-5
RTOL = 1e-5


def first_tensor(out) -> torch.Tensor:
    """The output a user reads: ``logits`` (or CLIP's ``logits_per_image``), else the first tensor."""
    for key in ("logits", "logits_per_image"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    return out[0]


def assert_close(got: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    """Close relative to the magnitude of the values: fp32 rounding grows with the logits' size."""
    scale = max(1.0, float(expected.abs().max()))
    err = float((got - expected).abs().max())
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert err <= ATOL + rtol * scale, f"{what}: max abs diff {err:.3g} at magnitude {scale:.3g}"


@dataclass
class Adapted:
    """PEFT and ia3fx on two copies of one base, holding the same random adapter."""

    arch: Arch
    base: torch.nn.Module
    peft_model: peft.PeftModel
    ia3: ia3fx.IA3Model
    inputs: dict
    peft_seconds: float  # get_peft_model
    ia3_seconds: float  # get_ia3_model (matching, block captures, rewrite)
    trace_seconds: float  # the whole-model graph traced on the default inputs (ia3.graph_module)


def adapt(arch: Arch) -> Adapted:
    """Both libraries applied to the tiny model; ia3fx without example inputs (its defaults)."""
    model = build(arch)
    base = copy.deepcopy(model)
    ours = copy.deepcopy(model)
    _, inputs = default_inputs(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        pm = peft.get_peft_model(model, peft.IA3Config(**copy.deepcopy(arch.ia3)))
        peft_seconds = time.perf_counter() - start
        pm.eval()
        randomize_peft(pm)
        start = time.perf_counter()
        ia3 = ia3fx.get_ia3_model(ours, ia3fx.IA3Config(**copy.deepcopy(arch.ia3)))
        ia3_seconds = time.perf_counter() - start
        ia3.graph_module  # noqa: B018  (the whole graph, traced on the default inputs)
        trace_seconds = time.perf_counter() - start - ia3_seconds
    ia3.load_adapter_state_dict(peft.get_peft_model_state_dict(pm))
    return Adapted(arch, base, pm, ia3, inputs, peft_seconds, ia3_seconds, trace_seconds)


def check_targets(a: Adapted) -> int:
    """The same layers adapted, the same way, the same trainable count. Returns that count."""
    peft_layers = {
        n[: -len(".ia3_l.default")]: tuple(p.shape)
        for n, p in a.peft_model.base_model.model.named_parameters()
        if n.endswith(".ia3_l.default")
    }
    assert peft_layers, "PEFT adapted nothing"
    assert set(a.ia3.targets) == set(peft_layers)
    for layer, target in a.ia3.targets.items():
        assert target.peft_shape == peft_layers[layer], layer
    trainable = a.ia3.get_nb_trainable_parameters()
    assert trainable == a.peft_model.get_nb_trainable_parameters()
    return trainable[0]


def check_eval(a: Adapted) -> None:
    """Eval outputs equal PEFT's, through the model and through its whole graph; not the base's."""
    with torch.no_grad():
        expected = first_tensor(a.peft_model(**a.inputs))
        plain = first_tensor(a.base(**a.inputs))
        effect = float((expected - plain).abs().max())
        # well above the tolerance of the comparisons below (ModernBERT's small init: effect 4e-4)
        assert effect > 20 * (ATOL + RTOL * max(1.0, float(expected.abs().max()))), f"the adapter barely changes the output ({effect:.2g})"
        assert_close(first_tensor(a.ia3(**a.inputs)), expected, "eval forward")
        assert_close(first_tensor(a.ia3.graph_module(**a.inputs)), expected, "whole graph")


def _backward(model, inputs, weights_seed: int = 7) -> None:
    model.zero_grad(set_to_none=True)
    out = first_tensor(model(**inputs))
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(weights_seed))
    (out * w).sum().backward()


def check_grads(a: Adapted) -> None:
    """Every vector's gradient equals PEFT's (eval mode: no dropout), and none is zero."""
    _backward(a.peft_model, a.inputs)
    _backward(a.ia3, a.inputs)
    modules = dict(a.peft_model.base_model.model.named_modules())
    for layer in a.ia3.targets:
        expected = modules[layer].ia3_l["default"].grad
        assert expected is not None and float(expected.abs().max()) > 0, f"{layer}: PEFT's vector got no gradient"
        got = a.ia3.get_vector(layer).grad
        assert got is not None, f"{layer}: no gradient"
        assert_close(got.reshape(expected.shape), expected, f"{layer} vector gradient", rtol=1e-4)


def check_merge(a: Adapted) -> None:
    """The merged graph (weights folded) computes the unmerged outputs, within fp32 rounding."""
    with torch.no_grad():
        expected = first_tensor(a.ia3(**a.inputs))
        merged = first_tensor(a.ia3.merged_graph_module()(**a.inputs))
    assert_close(merged, expected, "merged graph", rtol=a.arch.merge_rtol)


def check_onnx(a: Adapted) -> float:
    """The merged ONNX export runs in onnxruntime and gives the eager outputs. Returns seconds."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        path = ia3fx.export(a.ia3, os.path.join(tmp, "model.onnx"), "onnx")
        seconds = time.perf_counter() - start
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        feed = {k: v.numpy() for k, v in a.inputs.items() if k in names}
        assert set(feed) == set(names), f"ONNX inputs {names}, default inputs {sorted(a.inputs)}"
        got = session.run(None, feed)[0]
    with torch.no_grad():
        expected = first_tensor(a.ia3(**a.inputs)).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(expected).max())))
    return seconds
