"""Adapted without example inputs, vision, audio, multimodal and encoder-decoder models trace their
whole graph on inputs built from their config (issue 14's first item), and equal PEFT on them."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as T
from conftest import peft_and_ia3

import ia3fx
from ia3fx.default_inputs import default_inputs
from ia3fx.errors import TraceError

ATTN = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64}
SEQ2SEQ = {
    "d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "vocab_size": 64,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1,
}
CASES = {
    "vit": (lambda: T.ViTForImageClassification(T.ViTConfig(**ATTN, image_size=32, patch_size=8)),
            ["q_proj", "v_proj", "fc2"], ["fc2"], {"pixel_values"}),
    "swin": (lambda: T.SwinForImageClassification(T.SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[2, 2], image_size=32, patch_size=4, window_size=4)),
             ["q_proj", "v_proj", "fc2"], ["fc2"], {"pixel_values"}),
    "clip": (lambda: T.CLIPModel(T.CLIPConfig(
                text_config={**ATTN, "vocab_size": 64, "bos_token_id": 1, "eos_token_id": 2},
                vision_config={**ATTN, "image_size": 32, "patch_size": 8}, projection_dim=16)),
             ["q_proj", "v_proj"], [], {"input_ids", "pixel_values"}),
    "whisper": (lambda: T.WhisperForConditionalGeneration(T.WhisperConfig(
                    **SEQ2SEQ, num_mel_bins=16, max_source_positions=32, max_target_positions=32)),
                ["q_proj", "v_proj", "fc2"], ["fc2"], {"input_features", "decoder_input_ids"}),
    "wav2vec2": (lambda: T.Wav2Vec2ForCTC(T.Wav2Vec2Config(
                     **ATTN, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
                     num_conv_pos_embedding_groups=2, vocab_size=32)),
                 ["q_proj", "v_proj", "output_dense"], ["output_dense"], {"input_values"}),
    "pegasus": (lambda: T.PegasusForConditionalGeneration(T.PegasusConfig(**SEQ2SEQ, max_position_embeddings=64)),
                ["q_proj", "v_proj", "fc2"], ["fc2"], {"input_ids", "decoder_input_ids"}),
}


def _first_tensor(out):
    for key in ("logits", "logits_per_image"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    return out[0]


@pytest.mark.parametrize("name", list(CASES))
def test_adapted_without_example_inputs_the_whole_graph_traces_and_equals_peft(name):
    build, targets, feedforward, keys = CASES[name]
    torch.manual_seed(0)
    model = build().eval()
    _, inputs = default_inputs(model)
    assert set(inputs) == keys
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm, ia3 = peft_and_ia3(model, {"target_modules": targets, "feedforward_modules": feedforward})
        graph = ia3.graph_module  # traced on the default inputs
    assert sum(s.targeted for s in ia3.call_sites) > 0
    with torch.no_grad():
        ours = _first_tensor(graph(**inputs))
        theirs = _first_tensor(pm(**inputs))
        with pm.disable_adapter():
            base = _first_tensor(pm(**inputs))
    assert (theirs - base).abs().max() > 1e-4  # the adapter does something on these inputs
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_a_failed_trace_on_default_inputs_says_so_and_how_to_pass_others():
    model = T.ViTForImageClassification(T.ViTConfig(**ATTN, image_size=32, patch_size=8)).eval()
    model.config.image_size = 48  # the inputs built from the config no longer fit the embeddings
    ia3 = ia3fx.get_ia3_model(model, ia3fx.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    with pytest.raises(TraceError, match=r"(?s)inputs: pixel_values: float32\[2, 3, 48, 48\].*default inputs.*example_inputs"):
        ia3.graph_module  # noqa: B018
