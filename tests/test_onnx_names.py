"""ONNX export names the adapter's nodes: ia3/<layer>/<input|output> multiplies, vectors as named initializers."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import ia3fx
from ia3fx.export import export
from ia3fx.onnx_names import adapter_nodes, name_adapter_nodes_in


class Twice(nn.Module):
    """lin0 output-scaled; lin1 input-scaled and called twice (two multiplies read its vector)."""

    def __init__(self):
        super().__init__()
        self.lin0, self.lin1, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.lin0(x))
        return self.head(self.lin1(torch.relu(self.lin1(h))))


CONFIG = dict(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"])
X = (torch.randn(2, 8, generator=torch.Generator().manual_seed(0)),)


def _export(tmp_path, trained: bool):
    torch.manual_seed(0)
    ia3 = ia3fx.get_ia3_model(Twice(), ia3fx.IA3Config(**CONFIG), example_inputs=X)
    if trained:
        with torch.no_grad():
            for p in ia3.parameters():
                if p.requires_grad:
                    p.copy_(1 + 0.3 * torch.randn(p.shape))
    ia3.eval()
    path = export(ia3, tmp_path / f"m{int(trained)}.onnx", "onnx", merged=False)
    return ia3, onnx.load(path), path


WANT = {"ia3/lin0/output": ("lin0", "output"), "ia3/lin1/input": ("lin1", "input"),
        "ia3/lin1/input/1": ("lin1", "input")}


def test_scale_multiplies_are_named_after_their_layer_even_when_the_optimiser_merged_the_vectors(tmp_path):
    _, model, _ = _export(tmp_path, trained=False)
    # fresh vectors are all ones: lin0's output vector and lin1's input vector (both 16) became one
    # initializer; the names still follow what each multiply scales
    assert len([i for i in model.graph.initializer if i.name.startswith("ia3_l.")]) == 1
    named = adapter_nodes(model)
    assert {n: (v["layer"], v["placement"]) for n, v in named.items()} == WANT
    assert all(v["role"] == "scale" for v in named.values())
    assert {n.name: n.op_type for n in model.graph.node if n.name in WANT} == dict.fromkeys(WANT, "Mul")


def test_vectors_are_named_initializers_and_the_model_computes_the_adapted_model(tmp_path):
    import onnxruntime as ort

    ia3, model, path = _export(tmp_path, trained=True)
    onnx.checker.check_model(model)
    nodes = {n.name: n for n in model.graph.node}
    inits = {i.name: i for i in model.graph.initializer}
    assert {n: (v["layer"], v["placement"]) for n, v in adapter_nodes(model).items()} == WANT
    for name, (layer, placement) in WANT.items():
        vector = inits[f"ia3_l.{layer}.{placement}"]  # a named initializer the multiply reads
        assert vector.name in nodes[name].input and layer in vector.doc_string
        np.testing.assert_allclose(numpy_helper.to_array(vector), ia3.get_vector(layer).detach().numpy(), rtol=1e-6)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: X[0].numpy()})[0]
    with torch.no_grad():
        want = ia3(*X).numpy()
        with ia3.disable_adapter():
            base = ia3(*X).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(got - base).max() > 1e-2  # the vectors are not ones: the named nodes do something


def test_a_model_without_vectors_is_left_as_it_was(tmp_path):
    """A merged export holds no vector initializers: nothing is renamed and the file is not rewritten."""
    from ia3fx.onnx_names import name_adapter_nodes

    w = numpy_helper.from_array(np.ones(4, np.float32), "model.fc.weight")
    graph = helper.make_graph([helper.make_node("Mul", ["x", "model.fc.weight"], ["y"], name="node_mul")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [w])
    path = tmp_path / "merged.onnx"
    onnx.save(helper.make_model(graph), path)
    before = path.read_bytes()
    assert name_adapter_nodes(path) == 0
    assert path.read_bytes() == before and adapter_nodes(onnx.load(path)) == {}


def test_a_layer_called_twice_and_a_cast_vector():
    """Two multiplies read one vector (a shared layer); a generation export's ia3.<layer> name, through a Cast."""
    vec = numpy_helper.from_array(np.full(4, 1.5, np.float32), "ia3.enc.fc.output")
    nodes = [
        helper.make_node("Cast", ["ia3.enc.fc.output"], ["v16"], name="node_cast", to=TensorProto.FLOAT16),
        helper.make_node("Mul", ["x", "v16"], ["y1"], name="node_mul"),
        helper.make_node("Mul", ["y1", "v16"], ["y2"], name="node_mul_1"),
        helper.make_node("Mul", ["y2", "y2"], ["y"], name="node_mul_2"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [4])], [vec])
    model = helper.make_model(graph)
    assert name_adapter_nodes_in(model) == 2
    assert [n.name for n in model.graph.node] == ["ia3/enc.fc/output/cast", "ia3/enc.fc/output",
                                                  "ia3/enc.fc/output/1", "node_mul_2"]
    onnx.checker.check_model(model)
