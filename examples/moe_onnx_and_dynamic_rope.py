"""Two architectures that used to stop an export: a mixture of experts to ONNX, and a Llama with
dynamic NTK RoPE traced whole. Tiny random models, CPU, no download (about 20 s).

    python examples/moe_onnx_and_dynamic_rope.py
"""

from __future__ import annotations

import os
import tempfile
import warnings

import numpy as np
import onnxruntime as ort
import torch
import transformers as T

import ia3fx

SIZES = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 4, "num_key_value_heads": 2, "use_cache": False}


def randomize(ia3: ia3fx.IA3Model) -> None:
    """A trained-looking adapter: vectors away from ones, so that it changes the outputs."""
    with torch.no_grad():
        for p in ia3.ia3_l.parameters():
            p.uniform_(0.5, 1.5)


def mixtral_to_onnx(out_dir: str) -> None:
    torch.manual_seed(0)
    model = T.MixtralForCausalLM(T.MixtralConfig(**SIZES, num_local_experts=4, num_experts_per_tok=2)).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ia3 = ia3fx.get_ia3_model(model, ia3fx.IA3Config())  # PEFT's defaults for mixtral
    print("warned:", next(str(w.message) for w in caught if "default target_modules" in str(w.message))[:90], "...")
    print("adapted:", sorted({name.rsplit(".", 1)[-1] for name in ia3.targets}))  # k_proj, v_proj
    randomize(ia3)
    # the fused experts run transformers' grouped matmul op, which ia3fx translates to ONNX
    path = ia3fx.export(ia3, os.path.join(out_dir, "mixtral.onnx"), "onnx")
    ids = torch.randint(3, 64, (2, 9))
    with torch.no_grad():
        expected = ia3(input_ids=ids).logits.numpy()
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": ids.numpy()})[0]
    print(f"mixtral ONNX vs eager: max |diff| = {np.abs(got - expected).max():.1e}")
    assert np.allclose(got, expected, atol=1e-4)


def dynamic_rope_graph() -> None:
    torch.manual_seed(0)
    config = T.LlamaConfig(**{**SIZES, "max_position_embeddings": 16},
                           rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    ia3 = ia3fx.get_ia3_model(T.LlamaForCausalLM(config).eval(), ia3fx.IA3Config())
    randomize(ia3)
    graph = ia3.graph_module  # the whole model in one graph: the length check became a `where`
    for length in (8, 40):  # below and above the original 16 positions
        ids = torch.randint(3, 64, (2, length))
        with torch.no_grad():
            diff = (graph(input_ids=ids).logits - ia3(input_ids=ids).logits).abs().max()
        print(f"dynamic RoPE, {length} tokens: whole graph vs model max |diff| = {diff:.1e}")
        assert diff < 1e-5


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        mixtral_to_onnx(tmp)
    dynamic_rope_graph()
