"""ONNX export of what torch.onnx cannot translate by itself (issue 14): transformers' grouped
matmul of fused experts, complex-valued rotary embeddings, and a clear error for other ops.

The whole-architecture rows (Mixtral, Qwen3-MoE, Llama 4 through onnxruntime) are in
``test_architectures.py``; these are the pieces, on small graphs.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import ia3fx
from ia3fx.onnx_ops import UntranslatableOpError, check_translatable, translation_table
from ia3fx.passes.complex_to_real import complex_to_real

torch.library.define("ia3fx_test::twice", "(Tensor x) -> Tensor")


@torch.library.impl("ia3fx_test::twice", "CompositeExplicitAutograd")
def _twice(x):
    return x * 2


@torch.library.register_fake("ia3fx_test::twice")
def _twice_fake(x):
    return torch.empty_like(x)


class Experts(nn.Module):
    """Rows sorted by expert, one matmul per expert: transformers' fused-experts computation."""

    def __init__(self, op):
        super().__init__()
        self.op = op
        self.weight = nn.Parameter(torch.randn(3, 8, 8))
        self.lin = nn.Linear(8, 4)

    def forward(self, x, offs):
        return self.lin(self.op(x, self.weight, offs))


class Rotary(nn.Module):
    """Llama 4's rotary arithmetic: queries as complex numbers times polar(1, angle)."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 8)

    def forward(self, x):
        angle = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * torch.linspace(0.1, 1.0, 4)
        freqs = torch.polar(torch.ones_like(angle), angle)[None]  # (1, seq, 4)
        q = torch.view_as_complex(self.q(x).float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(q * freqs[:, :, :] * 1.0).flatten(2)


def _onnx_run(path, feed):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, [v.numpy() for v in feed])))[0]


def _adapted(model, example, targets):
    ia3 = ia3fx.get_ia3_model(model, ia3fx.IA3Config(target_modules=targets, feedforward_modules=[]), example)
    with torch.no_grad():
        for p in ia3.ia3_l.parameters():
            p.uniform_(0.5, 1.5)
    return ia3


def test_grouped_matmul_exports_to_onnx_and_equals_eager(tmp_path):
    import transformers.integrations.moe  # noqa: F401  (registers the op)

    op = torch.ops.transformers.grouped_mm_fallback
    torch.manual_seed(0)
    x, offs = torch.randn(7, 8), torch.tensor([2, 2, 7], dtype=torch.int32)  # an empty group too
    ia3 = _adapted(Experts(op), (x, offs), ["lin"])
    path = ia3fx.export(ia3, tmp_path / "experts.onnx", "onnx")
    with torch.no_grad():
        expected = ia3(x, offs)
        plain = Experts(op)
        plain.load_state_dict(ia3.model.state_dict())
        assert (expected - plain(x, offs)).abs().max() > 1e-3  # the adapter is in the result
    np.testing.assert_allclose(_onnx_run(path, (x, offs)), expected.numpy(), rtol=1e-5, atol=1e-5)
    assert set(translation_table()) >= {op.default}


def test_complex_rotary_exports_to_onnx_on_real_pairs(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    ia3 = _adapted(Rotary(), (x,), ["q"])
    path = ia3fx.export(ia3, tmp_path / "rotary.onnx", "onnx")
    with torch.no_grad():
        expected = ia3(x)
    np.testing.assert_allclose(_onnx_run(path, (x,)), expected.numpy(), rtol=1e-5, atol=1e-5)
    # another batch size through the same file: the rewrite kept the batch dim symbolic
    x2 = torch.randn(3, 5, 8)
    with torch.no_grad():
        np.testing.assert_allclose(_onnx_run(path, (x2,)), ia3(x2).numpy(), rtol=1e-5, atol=1e-5)


def test_the_rewrite_leaves_no_complex_value_and_computes_the_same():
    x = torch.randn(2, 5, 8)
    ep = torch.export.export(Rotary().eval(), (x,), strict=False)
    expected = ep.module()(x)
    _, record = complex_to_real(ep.graph_module)
    assert record.rewritten.get("polar.default") == 1 and record.rewritten.get("view_as_real.default") == 1
    vals = [n.meta.get("val") for n in ep.graph.nodes]
    assert not any(isinstance(v, torch.Tensor) and v.is_complex() for v in vals)
    torch.testing.assert_close(ep.module()(x), expected, rtol=1e-6, atol=1e-6)


class Conjugate(nn.Module):
    def forward(self, x):
        z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(torch.exp(z))


def test_a_complex_op_without_a_real_form_is_named_before_the_conversion():
    ep = torch.export.export(Conjugate(), (torch.randn(2, 4),), strict=False)
    with pytest.raises(UntranslatableOpError, match=r"exp.default on a complex tensor.*'pt2'"):
        complex_to_real(ep.graph_module)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.ops.ia3fx_test.twice(self.lin(x))


def test_a_custom_op_without_translation_is_a_clear_error_and_writes_nothing(tmp_path):
    x = torch.randn(2, 4)
    ia3 = _adapted(Twice(), (x,), ["lin"])
    with pytest.raises(UntranslatableOpError, match=r"ia3fx_test::twice \(x1\).*'pt2'"):
        ia3fx.export(ia3, tmp_path / "twice.onnx", "onnx")
    assert list(tmp_path.iterdir()) == []
    # the same program goes to pt2
    ep = torch.export.export(Twice(), (x,), strict=False)
    with pytest.raises(UntranslatableOpError):
        check_translatable(ep)
    assert ia3fx.export(ia3, tmp_path / "twice.pt2", "pt2")
