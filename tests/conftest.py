"""Shared tiny models for the tests: transformers families built from configs, and the custom
``nn.Module``s of PEFT's ``tests/test_custom_models.py`` (IA3 rows), plus PEFT helpers.

Every factory seeds the RNG, so two calls build identical weights: one copy goes to PEFT, the other
to ia3fx.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

VOCAB = 128

# The models are tiny: intra-op threads only add synchronisation (and, on a busy 2-core machine,
# OpenMP spin-waits that make each op ~100x slower).
torch.set_num_threads(1)


# --- transformers families ---------------------------------------------------------------------
def tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**kwargs)).eval()


def tiny_gpt2(**overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    kwargs = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**kwargs)).eval()


def tiny_bart(**overrides):
    from transformers import BartConfig, BartForConditionalGeneration

    kwargs = dict(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=0,
        bos_token_id=1,
        decoder_start_token_id=2,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(**kwargs)).eval()


def tiny_bert_seq_cls(**overrides):
    from transformers import BertConfig, BertForSequenceClassification

    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**kwargs)).eval()


def tiny_opt(**overrides):
    from transformers import OPTConfig, OPTForCausalLM

    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(**kwargs)).eval()


def tiny_t5(**overrides):
    from transformers import T5Config, T5ForConditionalGeneration

    kwargs = dict(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(**kwargs)).eval()


def token_inputs(family: str, batch: int = 2, seq: int = 7, seed: int = 1, mask: bool = False) -> dict:
    """Keyword inputs for a tiny transformers model (T5 gets decoder ids of another length)."""
    g = torch.Generator().manual_seed(seed)
    out = {"input_ids": torch.randint(1, VOCAB, (batch, seq), generator=g)}
    if mask:
        attention_mask = torch.ones(batch, seq, dtype=torch.long)
        attention_mask[-1, -max(1, seq // 3) :] = 0  # right padding on the last row
        out["attention_mask"] = attention_mask
    if family == "t5":
        out["decoder_input_ids"] = torch.randint(1, VOCAB, (batch, max(1, seq - 2)), generator=g)
    return out


# --- PEFT's custom models (tests/test_custom_models.py) ----------------------------------------
class MLP(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = X.to(self.dtype)
        X = self.lin0(X)
        X = self.relu(X)
        X = self.drop(X)
        X = self.lin1(X)
        X = self.sm(X)
        return X


class ModelEmbConv1D(nn.Module):
    def __init__(self, emb_size=100):
        super().__init__()
        self.emb = nn.Embedding(emb_size, 5)
        self.conv1d = Conv1D(1, 5)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        X = self.emb(X)
        X = self.conv1d(X)
        X = self.relu(X)
        X = self.flat(X)
        X = self.lin0(X)
        X = self.sm(X)
        return X


class ModelConv2D(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.conv2d = nn.Conv2d(5, 10, 3, bias=bias)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = X.to(self.dtype)
        X = X.reshape(-1, 5, 3, 3)
        X = self.conv2d(X)
        X = self.relu(X)
        X = self.flat(X)
        X = self.lin0(X)
        X = self.sm(X)
        return X


class ModelConv2DGroups(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(90, 288)
        self.conv2d = nn.Conv2d(16, 16, 3, groups=8)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin1 = nn.Linear(16, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = X.to(self.dtype)
        X = X.flatten()
        X = self.lin0(X)
        X = X.reshape(2, 16, 3, 3)
        X = self.conv2d(X)
        X = self.relu(X)
        X = self.flat(X)
        X = self.lin1(X)
        X = self.sm(X)
        return X


class ModelConv3D(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv3d = nn.Conv3d(5, 10, 3)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = X.to(self.dtype)
        if X.dim() == 2:
            X = torch.stack([X] * 3, dim=-1)
        X = X.reshape(-1, 5, 3, 3, 3)
        X = self.conv3d(X)
        X = self.relu(X)
        X = self.flat(X)
        X = self.lin0(X)
        X = self.sm(X)
        return X


CUSTOM_MODELS = {
    "MLP": MLP,
    "EmbConv1D": ModelEmbConv1D,
    "Conv2d": ModelConv2D,
    "Conv2dGroups": ModelConv2DGroups,
    "Conv3d": ModelConv3D,
}


def custom_model(model_id: str) -> nn.Module:
    torch.manual_seed(0)
    return CUSTOM_MODELS[model_id]().eval()


def custom_input() -> torch.Tensor:
    """PEFT's ``prepare_inputs_for_testing``: ``arange(90).view(9, 10)`` (floats, or ids for EmbConv1D)."""
    return torch.arange(90).view(9, 10)


# --- PEFT helpers ------------------------------------------------------------------------------
def randomize_peft(peft_model, seed: int = 123) -> None:
    """Non-trivial adapter state: vectors ~ N(1, 0.3), modules_to_save copies perturbed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".ia3_l." in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif ".modules_to_save." in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g))


def move_vectors(ia3, spread: float, seed: int = 0):
    """``ia3``'s trainable vectors set to ``1 + spread * N(0, 1)``, as if trained; returns ``ia3``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ia3.parameters():
            if p.requires_grad:
                p.copy_(1 + spread * torch.randn(p.shape, generator=g))
    return ia3


def peft_and_ia3(model: nn.Module, peft_kwargs: dict, example_inputs=None, seed: int = 123):
    """(peft_model, ia3_model) built on two copies of ``model``, with the same random adapter."""
    import peft

    import ia3fx

    # as transformers' Trainer does: no KV cache in plain forward calls, so that the adapted model
    # runs its block graphs (with a cache, blocks run their own code scaled by hooks: test_dropin)
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", None):
        config.use_cache = False
    base_for_ia3 = copy.deepcopy(model)
    peft_model = peft.get_peft_model(model, peft.IA3Config(**copy.deepcopy(peft_kwargs)))
    peft_model.eval()
    randomize_peft(peft_model, seed)
    ia3_model = ia3fx.get_ia3_model(
        base_for_ia3, ia3fx.IA3Config(**copy.deepcopy(peft_kwargs)), example_inputs=example_inputs
    )
    ia3_model.load_adapter_state_dict(peft.get_peft_model_state_dict(peft_model))
    return peft_model, ia3_model


def logits(out):
    """The tensor a model call returns: ``.logits`` of a transformers output, else the output."""
    return out.logits if hasattr(out, "logits") else out


def snapshot(path) -> dict[str, bytes]:
    """Every file below ``path`` (relative path -> bytes): to assert that nothing was changed."""
    import os

    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = fh.read()
    return out


def saved_base_and_adapter(tmp_path):
    """A tiny Llama saved as a transformers checkpoint and a random PEFT IA3 adapter for it, on
    disk: what the offline merge reads (``(base_dir, adapter_dir)``)."""
    import peft

    model = tiny_llama()
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    model.save_pretrained(base)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.IA3Config())
    randomize_peft(pm)
    pm.save_pretrained(adapter)
    return base, adapter
