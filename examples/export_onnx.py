"""Export an (IA)³-adapted model to ONNX, merged, and check it in onnxruntime against PyTorch.

    python examples/export_onnx.py [--out DIR]

The built-in tiny Llama (random weights, no download) gets an adapter with random vectors, then
``ia3fx.export(model, "model.onnx", format="onnx")`` folds the vectors into the weights and writes
an ONNX file whose batch and sequence dims are symbolic. onnxruntime runs it at other batch sizes
and lengths than the ones the model was captured with, and its logits are compared with the
adapted PyTorch model's. Exits non-zero if any max abs difference is >= 1e-4. Needs ``onnx``,
``onnxscript`` and ``onnxruntime``; takes well under a minute on a laptop CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import torch

import ia3fx
from ia3fx.presets import build_preset

ATOL = 1e-4

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecation notices


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="directory for model.onnx (default: a temporary one)")
    args = parser.parse_args()
    out_dir = args.out or tempfile.mkdtemp(prefix="ia3fx-onnx-")

    import onnx
    import onnxruntime as ort

    t0 = time.perf_counter()
    model = build_preset("tiny-llama")
    ia3 = ia3fx.get_ia3_model(model, ia3fx.IA3Config())  # PEFT's Llama defaults: k, v, down_proj
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for vector in ia3.ia3_l.parameters():  # stand-in for training
            vector.copy_(1.0 + 0.3 * torch.randn(vector.shape, generator=g))
    print(f"adapted {len(ia3.targets)} layers of {type(model).__name__} in {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    path = ia3fx.export(ia3, os.path.join(out_dir, "model.onnx"), format="onnx", overwrite=True)
    print(f"exported {path} ({os.path.getsize(path) / 1e6:.2f} MB) in {time.perf_counter() - t0:.1f} s")

    proto = onnx.load(path)
    weights = {i.name for i in proto.graph.initializer}
    for value in proto.graph.input:
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        print(f"  input  {value.name}: {dims}")
    for value in proto.graph.output:
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        print(f"  output {value.name}: {dims}")
    print(f"  {len(weights)} initializers, none of them an (IA)³ vector: {not any('ia3_l' in w for w in weights)}")

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    worst = 0.0
    vocab = model.config.vocab_size
    for batch, seq in [(1, 5), (3, 17), (8, 64)]:
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        with torch.no_grad():
            want = ia3(input_ids=ids).logits.numpy()
        got = session.run(None, {"input_ids": ids.numpy()})[0]
        diff = float(abs(got - want).max())
        worst = max(worst, diff)
        print(f"  batch {batch} x seq {seq:3d}: onnxruntime vs PyTorch max |diff| = {diff:.2e}")
    ok = worst < ATOL
    print("OK" if ok else f"MISMATCH: {worst:.2e} >= {ATOL}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
