"""The architectures of the coverage table (issue 14): a tiny random config per model type people
adapt, with the IA3Config a PEFT user would write for it.

Every model type in PEFT's IA3 default mapping that transformers still ships is applied with the
defaults (no ``target_modules``); the others name their attention-type and feedforward layers as
PEFT requires. ``tests/test_architectures.py`` runs each through parity with PEFT, gradients,
merge and ONNX; ``benchmarks/architectures_table.py`` writes ``docs/architectures.md`` from the
same list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import transformers as T

SMALL = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64}
DECODER = {**SMALL, "vocab_size": 64, "max_position_embeddings": 64, "pad_token_id": 0, "bos_token_id": 1,
           "eos_token_id": 2}
SEQ2SEQ = {
    "d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "vocab_size": 64,
    "max_position_embeddings": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    "decoder_start_token_id": 1,
}
T5_SIZES = {"vocab_size": 64, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 4,
            "decoder_start_token_id": 0}


@dataclass(frozen=True)
class Arch:
    """One row of the table: how to build the model, and the IA3Config keywords for it."""

    name: str  # transformers' model_type (the row's id), and a variant after "+"
    build: Any  # () -> nn.Module, random weights
    ia3: dict = field(default_factory=dict)  # IA3Config keywords ({}: PEFT's defaults for the type)
    onnx: str | None = None  # why the ONNX column is not run (an upstream limit), or None
    merge_rtol: float = 1e-5  # merged vs unmerged logits, relative to the logits' magnitude


def _llama_like(config_cls, model_cls, **extra):
    return lambda: model_cls(config_cls(**{**DECODER, "num_key_value_heads": 2, **extra}))


def _bert_like(config_cls, model_cls, **extra):
    return lambda: model_cls(config_cls(**{**SMALL, "vocab_size": 64, "max_position_embeddings": 64, **extra}))


ATTN_FF = {"target_modules": ["q_proj", "v_proj", "fc2"], "feedforward_modules": ["fc2"]}
LLAMA_T = {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}

ARCHS: list[Arch] = [
    # --- PEFT's default mapping, applied with the defaults ----------------------------------------
    Arch("t5", lambda: T.T5ForConditionalGeneration(T.T5Config(**T5_SIZES))),
    Arch("mt5", lambda: T.MT5ForConditionalGeneration(T.MT5Config(**T5_SIZES, feed_forward_proj="gated-gelu"))),
    Arch("gpt2", lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2))),
    Arch("bloom", lambda: T.BloomForCausalLM(T.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=4))),
    Arch("roberta", _bert_like(T.RobertaConfig, T.RobertaForMaskedLM, pad_token_id=1)),
    Arch("opt", lambda: T.OPTForCausalLM(T.OPTConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, ffn_dim=64,
        max_position_embeddings=64, word_embed_proj_dim=32))),
    Arch("gptj", lambda: T.GPTJForCausalLM(T.GPTJConfig(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=64, rotary_dim=4))),
    Arch("gpt_neox", lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**DECODER))),
    Arch("gpt_neo", lambda: T.GPTNeoForCausalLM(T.GPTNeoConfig(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=64,
        attention_types=[[["global", "local"], 1]], window_size=8))),
    Arch("bart", lambda: T.BartForConditionalGeneration(T.BartConfig(**SEQ2SEQ))),
    Arch("gpt_bigcode", lambda: T.GPTBigCodeForCausalLM(T.GPTBigCodeConfig(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=64))),
    Arch("llama", _llama_like(T.LlamaConfig, T.LlamaForCausalLM)),
    # dynamic NTK RoPE, 4 original positions: the default inputs (8 tokens) take the grown branch
    Arch("llama+dynamic-rope", _llama_like(T.LlamaConfig, T.LlamaForCausalLM, max_position_embeddings=4, rope_parameters={
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})),
    Arch("llama4", _llama_like(T.Llama4TextConfig, T.Llama4ForCausalLM, head_dim=8, intermediate_size_mlp=64,
                                num_local_experts=2, num_experts_per_tok=1, interleave_moe_layer_step=2,
                                no_rope_layers=[1, 0], num_hidden_layers=2),
        {"target_modules": ["q_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}),
    Arch("mistral", _llama_like(T.MistralConfig, T.MistralForCausalLM)),
    Arch("mixtral", _llama_like(T.MixtralConfig, T.MixtralForCausalLM, num_local_experts=2, num_experts_per_tok=1)),
    Arch("bert", _bert_like(T.BertConfig, T.BertForMaskedLM)),
    Arch("deberta-v2", _bert_like(T.DebertaV2Config, T.DebertaV2ForMaskedLM)),
    Arch("deberta", _bert_like(T.DebertaConfig, T.DebertaForMaskedLM)),
    Arch("falcon", lambda: T.FalconForCausalLM(T.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4))),
    Arch("phi", _llama_like(T.PhiConfig, T.PhiForCausalLM)),
    Arch("gemma", _llama_like(T.GemmaConfig, T.GemmaForCausalLM, head_dim=8)),
    Arch("gemma2", _llama_like(T.Gemma2Config, T.Gemma2ForCausalLM, head_dim=8, num_hidden_layers=2)),
    Arch("gemma3_text", _llama_like(T.Gemma3TextConfig, T.Gemma3ForCausalLM, head_dim=8, num_hidden_layers=2,
                                          sliding_window_pattern=2)),
    Arch("qwen2", _llama_like(T.Qwen2Config, T.Qwen2ForCausalLM)),
    Arch("qwen3", _llama_like(T.Qwen3Config, T.Qwen3ForCausalLM, head_dim=8)),
    # --- more that people adapt: PEFT needs their targets named ---------------------------------
    Arch("qwen3_moe", _llama_like(T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM, head_dim=8, num_experts=2,
                           num_experts_per_tok=1, moe_intermediate_size=32), LLAMA_T),
    Arch("phi3", _llama_like(T.Phi3Config, T.Phi3ForCausalLM), {"target_modules": ["qkv_proj", "down_proj"], "feedforward_modules": ["down_proj"]}),
    Arch("modernbert", lambda: T.ModernBertForMaskedLM(T.ModernBertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
        initializer_range=0.2)),  # its default init (0.02) leaves the outputs, and the adapter's effect, tiny
        {"target_modules": ["Wqkv", "mlp.Wo"], "feedforward_modules": ["mlp.Wo"]}),
    Arch("distilbert", lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(
        vocab_size=64, dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_position_embeddings=64)),
        {"task_type": "SEQ_CLS", "target_modules": ["k_lin", "v_lin", "lin2"], "feedforward_modules": ["lin2"]}),
    Arch("electra", _bert_like(T.ElectraConfig, T.ElectraForMaskedLM, embedding_size=32),
         {"target_modules": ["key", "value", "output.dense"], "feedforward_modules": ["output.dense"]}),
    Arch("xlm-roberta", _bert_like(T.XLMRobertaConfig, T.XLMRobertaForMaskedLM, pad_token_id=1),
         {"target_modules": ["key", "value", "output.dense"], "feedforward_modules": ["output.dense"]}),
    Arch("mbart", lambda: T.MBartForConditionalGeneration(T.MBartConfig(**SEQ2SEQ)), ATTN_FF),
    Arch("pegasus", lambda: T.PegasusForConditionalGeneration(T.PegasusConfig(**SEQ2SEQ)), ATTN_FF),
    Arch("vit", lambda: T.ViTForImageClassification(T.ViTConfig(**SMALL, image_size=32, patch_size=8)), ATTN_FF),
    Arch("swin", lambda: T.SwinForImageClassification(T.SwinConfig(
        embed_dim=16, depths=[1, 1], num_heads=[2, 2], image_size=32, patch_size=4, window_size=4)), ATTN_FF),
    Arch("clip", lambda: T.CLIPModel(T.CLIPConfig(
        text_config={**SMALL, "vocab_size": 64, "bos_token_id": 1, "eos_token_id": 2},
        vision_config={**SMALL, "image_size": 32, "patch_size": 8}, projection_dim=16)), ATTN_FF),
    Arch("whisper", lambda: T.WhisperForConditionalGeneration(T.WhisperConfig(
        **{k: v for k, v in SEQ2SEQ.items() if k != "max_position_embeddings"}, num_mel_bins=16,
        max_source_positions=32, max_target_positions=32)), ATTN_FF),
    Arch("wav2vec2", lambda: T.Wav2Vec2ForCTC(T.Wav2Vec2Config(
        **SMALL, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2, vocab_size=32)),
        {"target_modules": ["k_proj", "v_proj", "feed_forward.output_dense"], "feedforward_modules": ["feed_forward.output_dense"]}),
    Arch("starcoder2", _llama_like(T.Starcoder2Config, T.Starcoder2ForCausalLM),
         {"target_modules": ["k_proj", "v_proj", "c_proj"], "feedforward_modules": ["c_proj"]}),
    Arch("olmo2", _llama_like(T.Olmo2Config, T.Olmo2ForCausalLM), LLAMA_T),
    Arch("granite", _llama_like(T.GraniteConfig, T.GraniteForCausalLM), LLAMA_T),
    Arch("smollm3", _llama_like(T.SmolLM3Config, T.SmolLM3ForCausalLM), LLAMA_T),
]

BY_NAME = {a.name: a for a in ARCHS}


def build(arch: Arch, seed: int = 0):
    """The tiny model in eval mode, seeded, without a KV cache in plain calls (as Trainer runs it)."""
    torch.manual_seed(seed)
    model = arch.build().eval()
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    return model
