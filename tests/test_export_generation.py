"""``ia3fx.export(..., for_generation=True)``, the greedy decode loops and ``ia3fx.swap_adapter``.

An adapted causal LM is exported with its KV cache (pt2: transformers' static-cache ExecuTorch
form; ONNX: the decoder with past key values in Optimum's naming), merged and unmerged, on tiny
Llama and GPT-2. The artifact is loaded back as a deployment loads it and decoded with
:mod:`ia3fx.decode`: the tokens must be PEFT's ``generate(do_sample=False)`` tokens for the same
vectors, and differ from the base model's (so an export that dropped the adapter would fail).
``swap_adapter`` then puts another adapter into an unmerged artifact, and refuses adapters that do
not fit, naming the problem, with nothing written.

ONNX conversions are slow (10-25 s each here): the artifacts are exported once per module
(``artifacts``), four in-process plus one by the command line. The command-line jobs are started
in the background when the module starts (``cli_jobs``), so that their interpreter start-ups
overlap the in-process tests.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import peft
import pytest
import torch
from conftest import VOCAB, custom_model, peft_and_ia3, tiny_gpt2, tiny_llama, tiny_t5
from safetensors.torch import load_file, save_file

import ia3fx
from ia3fx.decode import greedy_onnx, greedy_pt2
from ia3fx.presets import build_preset
from ia3fx.swap import read_manifest

NEW = 8  # max_new_tokens
PAD = 0
CACHE = 32  # max_cache_len of the pt2 programs
MANIFEST = "ia3fx.json"

# No eos token (every requested token is generated), a pad token, no dropout, and a livelier init
# than the factories' (a tiny model with a 0.02 init repeats one token whatever the adapter).
NO_EOS = dict(eos_token_id=None, pad_token_id=PAD)
FAMILIES = {
    "llama": (tiny_llama, dict(initializer_range=0.2, **NO_EOS)),
    "gpt2": (
        tiny_gpt2,
        dict(initializer_range=0.2, bos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **NO_EOS),
    ),
}


# --- helpers -----------------------------------------------------------------------------------
def _prompt(batch: int = 1, seq: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)  # no pad / bos / eos ids


def _left_padded() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts, of 6 and 4 tokens, left-padded, and their attention mask."""
    ids = _prompt(batch=2, seq=6, seed=2)
    mask = torch.ones_like(ids)
    ids[1, :2] = PAD
    mask[1, :2] = 0
    return ids, mask


def _uniform_vectors(named_parameters, seed: int) -> None:
    """Every (IA)³ vector uniform in [0, 2]: far from ones, some sites nearly switched off."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_parameters:
            if ".ia3_l." in name or name.startswith("ia3_l."):
                p.copy_(2.0 * torch.rand(p.shape, generator=g))


def _gen(model, ids, mask=None, **kwargs) -> torch.Tensor:
    extra = {} if mask is None else {"attention_mask": mask}
    with torch.no_grad():
        return model.generate(input_ids=ids, **extra, max_new_tokens=NEW, do_sample=False, **kwargs)


def _placement(target) -> str:
    return "input" if target.feedforward else "output"


def _expected_vectors(ia3) -> dict[str, torch.Tensor]:
    """The artifact's tensor name -> the model's vector, for every adapted layer."""
    return {f"ia3.{layer}.{_placement(t)}": ia3.get_vector(layer).detach() for layer, t in ia3.targets.items()}


def _no_leftovers(directory) -> list[str]:
    """Temporary names (``.<name>.partial-...``) left in ``directory``."""
    return [p for p in os.listdir(directory) if p.startswith(".")]


def _state(ia3) -> dict:
    """What an export must leave as it was: every tensor (object and value), requires_grad, the
    training flags, the configs export touches, the adapter bookkeeping."""
    base = ia3.model
    return {
        "base": {k: (v, v.detach().clone()) for k, v in base.state_dict(keep_vars=True).items()},
        "params": {k: (p, p.detach().clone(), p.requires_grad) for k, p in ia3.named_parameters()},
        "training": [(name, m.training) for name, m in ia3.named_modules()],
        "use_cache": base.config.use_cache,
        "generation_config": base.generation_config.to_dict(),
        "active": ia3.active_adapters,
        "merged": list(ia3.merged_adapters),
    }


def _assert_same_state(ia3, before: dict) -> None:
    now = _state(ia3)
    assert set(now["base"]) == set(before["base"])
    for k, (obj, value) in before["base"].items():
        assert now["base"][k][0] is obj, k
        assert torch.equal(now["base"][k][1], value), k
    assert set(now["params"]) == set(before["params"])
    for k, (obj, value, grad) in before["params"].items():
        assert now["params"][k][0] is obj, k
        assert torch.equal(now["params"][k][1], value), k
        assert now["params"][k][2] == grad, k
    for key in ("training", "use_cache", "generation_config", "active", "merged"):
        assert now[key] == before[key], key


def _forward(ia3) -> torch.Tensor:
    with torch.no_grad():
        return ia3(input_ids=_prompt(batch=2, seq=5, seed=3)).logits


def _export_unchanged(ia3, path, fmt, **kwargs) -> str:
    """``ia3fx.export``, checking that the model comes out of it exactly as it went in."""
    before, out_before = _state(ia3), _forward(ia3)
    written = ia3fx.export(ia3, path, fmt, for_generation=True, **kwargs)
    _assert_same_state(ia3, before)
    torch.testing.assert_close(_forward(ia3), out_before, rtol=0, atol=0)
    return written


def _onnx_io(path):
    import onnx

    proto = onnx.load(path)

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    inits = {i.name: i for i in proto.graph.initializer}
    inputs = [(i.name, dims(i)) for i in proto.graph.input if i.name not in inits]
    outputs = [(o.name, dims(o)) for o in proto.graph.output]
    meta = {p.key: p.value for p in proto.metadata_props}
    return inputs, outputs, inits, meta


def _session(path):
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _load_pt2(path) -> tuple[torch.export.ExportedProgram, dict]:
    extra = {MANIFEST: ""}
    ep = torch.export.load(path, extra_files=extra)
    return ep, json.loads(extra[MANIFEST])


# --- shared models and artifacts -----------------------------------------------------------------
class Pair:
    """A PEFT model and an ia3fx model with the same weights and vectors (uniform in [0, 2]), the
    unadapted base model, and the tokens each generates."""

    def __init__(self, family: str) -> None:
        factory, overrides = FAMILIES[family]
        self.family, self.factory, self.overrides = family, factory, overrides
        model = factory(**overrides)
        self.base = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.pm, self.ia3 = peft_and_ia3(model, {"task_type": "CAUSAL_LM"})
        _uniform_vectors(self.pm.named_parameters(), seed=7)
        self.ia3.load_adapter_state_dict(peft.get_peft_model_state_dict(self.pm))
        values = torch.cat([p.detach().flatten() for p in self.ia3.ia3_l["default"].parameters()])
        assert values.min() < 0.1 and values.max() > 1.9  # far from ones
        self.pm.eval()
        self.ia3.eval()
        self.prompt = _prompt()
        self.padded, self.mask = _left_padded()
        self.want = _gen(self.pm, self.prompt)
        self.base_tokens = _gen(self.base, self.prompt)
        self.want_padded = _gen(self.pm, self.padded, self.mask, pad_token_id=PAD)
        self.base_padded = _gen(self.base, self.padded, self.mask, pad_token_id=PAD)
        # ia3fx generates PEFT's tokens, and the adapter matters: a no-op export cannot pass
        assert torch.equal(_gen(self.ia3, self.prompt), self.want)
        assert self.want.shape == (1, 6 + NEW)
        assert not torch.equal(self.want, self.base_tokens), self.want.tolist()
        assert not torch.equal(self.want_padded, self.base_padded), self.want_padded.tolist()


class Artifacts:
    def __init__(self, directory) -> None:
        self.directory = directory
        self._pairs: dict[str, Pair] = {}
        self._paths: dict[tuple, str] = {}

    def pair(self, family: str) -> Pair:
        if family not in self._pairs:
            self._pairs[family] = Pair(family)
        return self._pairs[family]

    def get(self, family: str, fmt: str, merged: bool) -> str:
        """The model of ``family`` exported for generation (once per module)."""
        key = (family, fmt, merged)
        if key not in self._paths:
            ia3 = self.pair(family).ia3
            path = self.directory / f"{family}-{'merged' if merged else 'unmerged'}.{fmt}"
            kwargs = {"max_cache_len": CACHE} if fmt == "pt2" else {}
            self._paths[key] = _export_unchanged(ia3, path, fmt, merged=merged, **kwargs)
            assert _no_leftovers(self.directory) == []
        return self._paths[key]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Artifacts:
    return Artifacts(tmp_path_factory.mktemp("generation"))


# --- pt2 round trips -------------------------------------------------------------------------------
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_pt2_decodes_peft_tokens(family, merged, artifacts):
    pair = artifacts.pair(family)
    path = artifacts.get(family, "pt2", merged)
    ep, manifest = _load_pt2(path)
    assert manifest == read_manifest(path)
    assert manifest["form"] == "static_cache" and manifest["merged"] is merged
    assert manifest["batch_size"] == 1 and manifest["max_cache_len"] == CACHE

    module = ep.module()
    buffers = dict(module.named_buffers())
    cfg = pair.ia3.model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        for kind in ("key", "value"):
            assert buffers[f"{kind}_cache_{i}"].shape == (1, heads, CACHE, head_dim)

    held = {k: v for k, v in ep.state_dict.items() if k.startswith("ia3.")}
    if merged:
        assert held == {} and manifest["vectors"] == {}
        assert not any(name.startswith("ia3.") for name in buffers)
    else:
        expected = _expected_vectors(pair.ia3)
        assert set(held) == set(expected) == set(manifest["vectors"])
        for name, vec in expected.items():
            assert torch.equal(held[name].reshape(vec.shape), vec), name
            entry = manifest["vectors"][name]
            layer = name.removeprefix("ia3.").rsplit(".", 1)[0]
            assert entry["layer"] == layer and entry["placement"] == name.rsplit(".", 1)[1]
            assert entry["peft_key"] == f"base_model.model.{layer}.ia3_l"
            assert entry["peft_shape"] == list(pair.ia3.targets[layer].peft_shape)

    got = greedy_pt2(module, pair.prompt, NEW)
    assert torch.equal(got, pair.want), (got.tolist(), pair.want.tolist())
    assert not torch.equal(got, pair.base_tokens)
    # an ExportedProgram is taken as well (its module is built once per decode): the same tokens again
    assert torch.equal(greedy_pt2(ep, pair.prompt, NEW), pair.want)


def test_pt2_decode_refuses_more_than_the_cache(artifacts):
    path = artifacts.get("llama", "pt2", False)
    ep, _ = _load_pt2(path)
    with pytest.raises(ValueError, match=r"exceeds the program's cache of 32 positions"):
        greedy_pt2(ep, _prompt(seq=6), CACHE - 5)


# --- ONNX round trips -------------------------------------------------------------------------------
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_onnx_decodes_peft_tokens(family, merged, artifacts):
    from onnx import numpy_helper

    pair = artifacts.pair(family)
    path = artifacts.get(family, "onnx", merged)
    inputs, outputs, inits, meta = _onnx_io(path)

    cfg = pair.ia3.model.config
    layers = cfg.num_hidden_layers
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = [f"{i}.{k}" for i in range(layers) for k in ("key", "value")]
    assert [n for n, _ in inputs] == ["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{n}" for n in kv]
    assert [n for n, _ in outputs] == ["logits"] + [f"present.{n}" for n in kv]
    total = {"past_sequence_length + sequence_length", "sequence_length + past_sequence_length"}
    dims_in, dims_out = dict(inputs), dict(outputs)
    assert dims_in["input_ids"] == ["batch_size", "sequence_length"]
    assert dims_in["position_ids"] == ["batch_size", "sequence_length"]
    assert dims_in["attention_mask"][0] == "batch_size" and dims_in["attention_mask"][1] in total
    assert dims_out["logits"] == ["batch_size", "sequence_length", VOCAB]
    for n in kv:
        assert dims_in[f"past_key_values.{n}"] == ["batch_size", heads, "past_sequence_length", head_dim], n
        present = dims_out[f"present.{n}"]
        assert present[0] == "batch_size" and present[1] == heads and present[3] == head_dim, n
        assert present[2] in total, (n, present)

    manifest = json.loads(meta[MANIFEST])
    assert manifest == read_manifest(path)
    assert manifest["form"] == "past_key_values" and manifest["merged"] is merged
    vectors = {k: v for k, v in inits.items() if k.startswith("ia3.")}
    if merged:
        assert vectors == {} and manifest["vectors"] == {}
    else:
        expected = _expected_vectors(pair.ia3)
        assert set(vectors) == set(expected) == set(manifest["vectors"])
        for name, vec in expected.items():
            np.testing.assert_array_equal(numpy_helper.to_array(vectors[name]).reshape(vec.shape), vec.numpy())

    session = _session(path)
    got = greedy_onnx(session, pair.prompt, NEW)
    assert torch.equal(got, pair.want), (got.tolist(), pair.want.tolist())
    assert not torch.equal(got, pair.base_tokens)
    # a left-padded batch: the positions and the mask as generate computes them
    got = greedy_onnx(session, pair.padded, NEW, attention_mask=pair.mask, pad_token_id=PAD)
    assert torch.equal(got, pair.want_padded), (got.tolist(), pair.want_padded.tolist())
    assert not torch.equal(got, pair.base_padded)


# --- the model is left as it was -------------------------------------------------------------------
def test_export_leaves_the_model_as_it_was(tmp_path):
    """A model in train mode, with one vector frozen by hand, comes out of both pt2 exports with
    the same tensors, flags and outputs; the artifact still holds the eval program. (Every export
    of the shared artifacts, ONNX included, is checked the same way by ``_export_unchanged``.)"""
    factory, overrides = FAMILIES["llama"]
    ia3 = ia3fx.get_ia3_model(factory(**overrides), ia3fx.IA3Config(task_type="CAUSAL_LM"))
    _uniform_vectors(ia3.named_parameters(), seed=11)
    prompt = _prompt()
    tokens = _gen(ia3.eval(), prompt)
    frozen = ia3.get_vector("model.layers.1.self_attn.v_proj")
    frozen.requires_grad_(False)
    ia3.train()
    assert ia3.training and ia3.model.training
    before = _state(ia3)
    assert [k for k, (_, _, grad) in before["params"].items() if k.startswith("ia3_l.") and not grad] == [
        next(k for k, p in ia3.named_parameters() if p is frozen)
    ]
    with torch.no_grad():
        out_before = ia3(input_ids=prompt).logits
    paths = [
        ia3fx.export(ia3, tmp_path / f"{name}.pt2", "pt2", for_generation=True, merged=merged, max_cache_len=CACHE)
        for name, merged in (("merged", True), ("unmerged", False))
    ]
    _assert_same_state(ia3, before)
    assert ia3.training and ia3.model.training and not frozen.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(ia3(input_ids=prompt).logits, out_before, rtol=0, atol=0)
    ia3.eval()
    assert torch.equal(_gen(ia3, prompt), tokens)
    for path in paths:
        assert torch.equal(greedy_pt2(torch.export.load(path), prompt, NEW), tokens)
    assert _no_leftovers(tmp_path) == []


# --- swap_adapter ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter_b(artifacts, tmp_path_factory):
    """A second adapter of the same targets with other vectors, saved with ``save_pretrained``, and
    the tokens of the model with it active (on a model of its own: the shared one stays as it is)."""
    pair = artifacts.pair("llama")
    ia3 = ia3fx.get_ia3_model(pair.factory(**pair.overrides), ia3fx.IA3Config(task_type="CAUSAL_LM"))
    ia3.load_adapter_state_dict(pair.ia3.adapter_state_dict())
    ia3.eval()
    assert torch.equal(_gen(ia3, pair.prompt), pair.want)
    ia3.add_adapter("b", ia3fx.IA3Config(task_type="CAUSAL_LM"))
    _uniform_vectors([(f"ia3_l.{k}", p) for k, p in ia3.ia3_l["b"].named_parameters()], seed=99)
    directory = tmp_path_factory.mktemp("adapters")
    ia3.save_pretrained(directory, selected_adapters=["b"])
    ia3.set_adapter("b")
    assert set(ia3.targets) == set(pair.ia3.targets)
    tokens = _gen(ia3, pair.prompt)
    padded = _gen(ia3, pair.padded, pair.mask, pad_token_id=PAD)
    assert not torch.equal(tokens, pair.want) and not torch.equal(tokens, pair.base_tokens), tokens.tolist()
    return {"dir": directory / "b", "tokens": tokens, "padded": padded, "model": ia3}


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_swap_adapter_decodes_the_new_adapter(fmt, artifacts, adapter_b, tmp_path):
    pair = artifacts.pair("llama")
    src = artifacts.get("llama", fmt, False)
    before = open(src, "rb").read()
    out = tmp_path / f"swapped.{fmt}"
    written = ia3fx.swap_adapter(src, adapter_b["dir"], out)
    assert written == str(out) and os.path.isfile(out)
    assert open(src, "rb").read() == before  # the source artifact is not touched
    assert _no_leftovers(tmp_path) == []
    manifest = read_manifest(out)
    assert manifest["adapters"] == ["b"] and manifest["merged"] is False
    assert manifest["vectors"] == read_manifest(src)["vectors"]
    b_model = adapter_b["model"]
    expected = {f"ia3.{layer}.{_placement(t)}": b_model.get_vector(layer, "b").detach() for layer, t in b_model.targets.items()}
    if fmt == "pt2":
        ep, _ = _load_pt2(out)
        for name, vec in expected.items():
            assert torch.equal(ep.state_dict[name].reshape(vec.shape), vec), name
        got = greedy_pt2(ep, pair.prompt, NEW)
    else:
        from onnx import numpy_helper

        _, _, inits, _ = _onnx_io(out)
        for name, vec in expected.items():
            np.testing.assert_array_equal(numpy_helper.to_array(inits[name]).reshape(vec.shape), vec.numpy())
        session = _session(out)
        got = greedy_onnx(session, pair.prompt, NEW)
        padded = greedy_onnx(session, pair.padded, NEW, attention_mask=pair.mask, pad_token_id=PAD)
        assert torch.equal(padded, adapter_b["padded"]), (padded.tolist(), adapter_b["padded"].tolist())
    assert torch.equal(got, adapter_b["tokens"]), (got.tolist(), adapter_b["tokens"].tolist())
    # an existing output is replaced with overwrite=True
    ia3fx.swap_adapter(src, adapter_b["dir"], out, overwrite=True)
    assert read_manifest(out)["adapters"] == ["b"]
    assert _no_leftovers(tmp_path) == []


def _save_adapter(directory, config: ia3fx.IA3Config, **model_overrides) -> str:
    overrides = {**FAMILIES["llama"][1], **model_overrides}
    ia3 = ia3fx.get_ia3_model(tiny_llama(**overrides), config)
    ia3.save_pretrained(directory)
    return str(directory)


def _edited_adapter(source, directory, edit) -> str:
    shutil.copytree(source, directory)
    file = os.path.join(directory, "adapter_model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return str(directory)


K0 = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l"
DOWN0 = "base_model.model.model.layers.0.mlp.down_proj.ia3_l"
Q0 = "base_model.model.model.layers.0.self_attn.q_proj.ia3_l"


def _nan(tensors):
    tensors[K0][3, 0] = float("nan")


REFUSALS = {
    # case: (adapter builder, exception, pattern of the message)
    "missing-key": (
        lambda d, b: _save_adapter(d, ia3fx.IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=[])),
        ia3fx.AdapterLoadError, rf"has no '{DOWN0}' \(2 key\(s\) missing\).*same target modules",
    ),
    "extra-key": (
        lambda d, b: _save_adapter(d, ia3fx.IA3Config(target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                                                      feedforward_modules=["down_proj"])),
        ia3fx.AdapterLoadError, rf"holds '{Q0}' \(a vector the program does not have; 2 such key\(s\)\)",
    ),
    "wrong-shape": (  # saved from a model with another hidden size: the same keys, other shapes
        lambda d, b: _save_adapter(d, ia3fx.IA3Config(task_type="CAUSAL_LM"), hidden_size=32),
        ia3fx.AdapterLoadError, rf"'{K0}' has shape \(16, 1\), the program's vector takes \(32, 1\)",
    ),
    "nan": (
        lambda d, b: _edited_adapter(b, d, _nan),
        ia3fx.AdapterLoadError, rf"'{K0}' holds NaN or infinite values",
    ),
    "modules-to-save": (
        lambda d, b: _save_adapter(d, ia3fx.IA3Config(task_type="CAUSAL_LM", modules_to_save=["lm_head"])),
        ia3fx.AdapterLoadError, r"holds 'base_model.model.lm_head.weight' \(modules_to_save weights",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_swap_adapter_refuses_an_adapter_that_does_not_fit(fmt, case, artifacts, adapter_b, tmp_path):
    build, error, pattern = REFUSALS[case]
    adapter = build(tmp_path / "adapter", adapter_b["dir"])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / f"swapped.{fmt}"
    with pytest.raises(error, match=pattern):
        ia3fx.swap_adapter(artifacts.get("llama", fmt, False), adapter, out)
    assert os.listdir(out_dir) == []  # no output, no temporary left


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_swap_adapter_refuses_other_artifacts_and_outputs(fmt, artifacts, adapter_b, tmp_path):
    other = "onnx" if fmt == "pt2" else "pt2"
    src = artifacts.get("llama", fmt, False)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / f"swapped.{fmt}"

    # a merged artifact: nothing to swap
    with pytest.raises(ValueError, match=r"was exported merged: the adapter is folded into its weights.*--unmerged"):
        ia3fx.swap_adapter(artifacts.get("llama", fmt, True), adapter_b["dir"], out)
    # another format out
    with pytest.raises(ValueError, match=rf"would change the format: write a \.{fmt} file"):
        ia3fx.swap_adapter(src, adapter_b["dir"], out_dir / f"swapped.{other}")
    # an artifact exported without for_generation: no manifest
    if fmt == "pt2":
        from conftest import custom_input

        mlp = ia3fx.get_ia3_model(custom_model("MLP"), ia3fx.IA3Config(target_modules=["lin0"], feedforward_modules=[]))
        plain = ia3fx.export(mlp, tmp_path / "plain.pt2", "pt2", merged=False, example_inputs=(custom_input().float(),))
    else:  # the manifest taken out of an ONNX export (another conversion would cost ~15 s)
        import onnx

        proto = onnx.load(src)
        del proto.metadata_props[:]
        plain = str(tmp_path / "plain.onnx")
        onnx.save(proto, plain)
    with pytest.raises(ValueError, match=r"not written by ia3fx.export\(\.\.\., for_generation=True\): it has no ia3fx.json manifest"):
        ia3fx.swap_adapter(plain, adapter_b["dir"], out)
    with pytest.raises(ValueError, match=r"has no ia3fx.json manifest"):
        read_manifest(plain)
    assert os.listdir(out_dir) == []

    # an existing output without overwrite: refused, and left as it was
    out.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match=r"already exists; pass overwrite=True"):
        ia3fx.swap_adapter(src, adapter_b["dir"], out)
    assert out.read_bytes() == b"precious"
    assert os.listdir(out_dir) == [out.name]


def test_swap_adapter_refuses_a_program_with_modules_to_save(tmp_path):
    """Adapter A trains a copy of lm_head (modules_to_save), which the unmerged program holds as
    its lm_head weight: swapping in adapter B would keep A's lm_head, so it is refused."""
    factory, overrides = FAMILIES["llama"]
    a = ia3fx.get_ia3_model(factory(**overrides), ia3fx.IA3Config(task_type="CAUSAL_LM", modules_to_save=["lm_head"]))
    with torch.no_grad():
        for p in a.modules_to_save.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    src = ia3fx.export(a, tmp_path / "a.pt2", "pt2", for_generation=True, merged=False, max_cache_len=CACHE)
    assert ia3fx.swap.read_manifest(src)["modules_to_save"] == ["lm_head"]
    # the program runs A's trained lm_head copy
    assert torch.equal(greedy_pt2(torch.export.load(src), _prompt(), NEW), _gen(a.eval(), _prompt()))
    b = ia3fx.get_ia3_model(factory(**overrides), ia3fx.IA3Config(task_type="CAUSAL_LM"))
    _uniform_vectors(b.named_parameters(), seed=1)
    b.save_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match=r"trained copies of modules_to_save \['lm_head'\]"):
        ia3fx.swap_adapter(src, tmp_path / "b", tmp_path / "swapped.pt2")
    assert not (tmp_path / "swapped.pt2").exists()


def test_swap_adapter_refuses_a_program_whose_adapter_was_merged_in_place(tmp_path):
    factory, overrides = FAMILIES["llama"]
    a = ia3fx.get_ia3_model(factory(**overrides), ia3fx.IA3Config(task_type="CAUSAL_LM"))
    _uniform_vectors(a.named_parameters(), seed=2)
    a.save_pretrained(tmp_path / "a")
    expected = _gen(a.eval(), _prompt())
    a.merge_adapter()
    src = ia3fx.export(a, tmp_path / "m.pt2", "pt2", for_generation=True, merged=False, max_cache_len=CACHE)
    assert torch.equal(greedy_pt2(src, _prompt(), NEW), expected)  # the merged weights are in it
    with pytest.raises(ValueError, match="holds no vectors"):
        ia3fx.swap_adapter(src, tmp_path / "a", tmp_path / "swapped.pt2")


def test_export_directory_with_config_and_swap(tmp_path):
    """An output path without .pt2/.onnx is a deployment directory; swap-adapter and the decode
    loops take it as it is."""
    factory, overrides = FAMILIES["llama"]
    a = ia3fx.get_ia3_model(factory(**overrides), ia3fx.IA3Config(task_type="CAUSAL_LM"))
    a.add_adapter("other", ia3fx.IA3Config(task_type="CAUSAL_LM"))
    _uniform_vectors(a.named_parameters(), seed=3)
    a.save_pretrained(tmp_path / "adapters")
    a.eval()
    first = _gen(a, _prompt())
    a.set_adapter("other")
    second = _gen(a, _prompt())
    a.set_adapter("default")
    assert not torch.equal(first, second)
    out = ia3fx.export(a, tmp_path / "deploy", "pt2", for_generation=True, merged=False, max_cache_len=CACHE)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.pt2"]
    assert torch.equal(greedy_pt2(out, _prompt(), NEW), first)
    swapped = ia3fx.swap_adapter(out, tmp_path / "adapters" / "other", tmp_path / "deploy-other")
    assert sorted(os.listdir(swapped)) == ["config.json", "generation_config.json", "model.pt2"]
    assert torch.equal(greedy_pt2(swapped, _prompt(), NEW), second)
    assert torch.equal(greedy_pt2(out, _prompt(), NEW), first)  # the source is untouched
    with pytest.raises(ValueError, match="is an export directory"):
        ia3fx.swap_adapter(out, tmp_path / "adapters" / "other", tmp_path / "x.pt2")


# --- for_generation refused where there is no causal LM --------------------------------------------
@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_for_generation_refuses_an_encoder_decoder(fmt, tmp_path):
    ia3 = ia3fx.get_ia3_model(tiny_t5(), ia3fx.IA3Config(task_type="SEQ_2_SEQ_LM"))
    with pytest.raises(NotImplementedError, match=r"decoder-only causal LMs; T5ForConditionalGeneration is an encoder-decoder"):
        ia3fx.export(ia3, tmp_path / f"t5.{fmt}", fmt, for_generation=True)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_for_generation_refuses_a_plain_module(fmt, tmp_path):
    ia3 = ia3fx.get_ia3_model(custom_model("MLP"), ia3fx.IA3Config(target_modules=["lin0"], feedforward_modules=[]))
    with pytest.raises(TypeError, match=r"causal LM with its KV cache; this IA3Model is built on a MLP.*for_generation=False"):
        ia3fx.export(ia3, tmp_path / f"mlp.{fmt}", fmt, for_generation=True)
    assert os.listdir(tmp_path) == []


def test_for_generation_bad_arguments(artifacts, tmp_path):
    ia3 = artifacts.pair("llama").ia3
    with pytest.raises(ValueError, match=r"builds its own inputs.*drop example_inputs"):
        ia3fx.export(ia3, tmp_path / "x.pt2", "pt2", for_generation=True, example_inputs={"input_ids": _prompt()})
    with pytest.raises(ValueError, match=r"batch_size must be a positive int"):
        ia3fx.export(ia3, tmp_path / "x.pt2", "pt2", for_generation=True, batch_size=0)
    with pytest.raises(ValueError, match=r"max_cache_len must be an int >= 2"):
        ia3fx.export(ia3, tmp_path / "x.pt2", "pt2", for_generation=True, max_cache_len=1)
    assert os.listdir(tmp_path) == []


# --- the command line --------------------------------------------------------------------------------
class CliJobs:
    """``python -m ia3fx`` runs: started as soon as the module starts (each pays for importing
    torch and transformers), collected by the tests that need them."""

    def __init__(self, directory) -> None:
        self.directory = directory
        self._env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as conftest: no spin-waiting threads
        self._running: dict[str, subprocess.Popen] = {}
        self._done: dict[str, tuple[int, str, str]] = {}

    def start(self, name: str, *argv: str) -> None:
        self._running[name] = subprocess.Popen(
            [sys.executable, "-m", "ia3fx", *map(str, argv)], cwd=self.directory, env=self._env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    def result(self, name: str) -> tuple[int, str, str]:
        """(exit status, stdout, stderr) of the run ``name``, waiting for it."""
        if name not in self._done:
            proc = self._running.pop(name)
            out, err = proc.communicate(timeout=600)
            self._done[name] = (proc.returncode, out, err)
        return self._done[name]

    def close(self) -> None:
        for proc in self._running.values():
            proc.kill()
            proc.communicate()


def _wants_cli(request) -> bool:
    return any(item.module is request.module and "_cli_" in item.name for item in request.session.items)


@pytest.fixture(scope="module", autouse=True)
def cli_jobs(request, tmp_path_factory):
    """Starts the command-line exports (and the adapter for them) in the background when the
    module starts, if any command-line test was selected."""
    jobs = CliJobs(tmp_path_factory.mktemp("cli"))
    if _wants_cli(request):
        jobs.start("apply", "apply", "tiny-llama", "--no-init-ia3-weights", "--out", "adapter")
        jobs.start("onnx", "export", "tiny-llama", "--format", "onnx", "--for-generation", "--unmerged", "--out", "model.onnx")
        jobs.start("pt2", "export", "tiny-llama", "--format", "pt2", "--for-generation", "--unmerged",
                   "--max-cache-len", str(CACHE), "--batch-size", "2", "--out", "model.pt2")
        jobs.start("transformers", "export", "tiny-llama", "--format", "transformers", "--for-generation", "--out", "ckpt")
    yield jobs
    jobs.close()


def _ok(jobs: CliJobs, name: str) -> str:
    code, out, err = jobs.result(name)
    assert code == 0, err
    return out


def _one_error_line(jobs: CliJobs, name: str, command: str) -> str:
    code, out, err = jobs.result(name)
    assert code == 2, (code, out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"ia3fx {command}: error: "), lines[0]
    return lines[0]


def _preset_tokens(adapter_dir, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """What the preset generates with the adapter in ``adapter_dir``, and without it; its eos id."""
    base = build_preset("tiny-llama")
    eos = base.generation_config.eos_token_id
    mask = torch.ones_like(prompt)
    plain = _gen(base, prompt, mask, pad_token_id=eos)
    ia3 = ia3fx.IA3Model.from_pretrained(build_preset("tiny-llama"), adapter_dir).eval()
    return _gen(ia3, prompt, mask, pad_token_id=eos), plain, eos


def _one_step_logits_pt2(path) -> torch.Tensor:
    with torch.no_grad():
        return torch.export.load(path).module()(input_ids=torch.full((2, 1), 5), cache_position=torch.tensor([0]))


def _one_step_logits_onnx(path) -> np.ndarray:
    session = _session(path)
    past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in session.get_inputs()
            if i.name.startswith("past_key_values.")}
    feeds = {"input_ids": np.array([[5]]), "attention_mask": np.array([[1]]), "position_ids": np.array([[0]]), **past}
    return session.run(["logits"], feeds)[0]


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_cli_export_for_generation_and_swap_adapter(fmt, cli_jobs):
    """``ia3fx export tiny-llama --for-generation --unmerged`` (fresh vectors: ones), then
    ``ia3fx swap-adapter`` with the random adapter of ``ia3fx apply --no-init-ia3-weights``."""
    directory = cli_jobs.directory
    assert "adapter saved in PEFT format" in _ok(cli_jobs, "apply")
    out = _ok(cli_jobs, fmt)
    path = directory / f"model.{fmt}"
    assert out.startswith(f"wrote {path} ({fmt}, for generation with a KV cache, scale nodes kept, 6 adapted layers)"), out
    manifest = read_manifest(path)
    assert manifest["merged"] is False and len(manifest["vectors"]) == 6
    if fmt == "pt2":
        assert manifest["batch_size"] == 2 and manifest["max_cache_len"] == CACHE
        assert dict(torch.export.load(path).module().named_buffers())["key_cache_0"].shape == (2, 2, CACHE, 16)

    swapped = directory / f"swapped.{fmt}"
    name = f"swap-{fmt}"
    cli_jobs.start(name, "swap-adapter", path, "adapter", "--out", swapped)
    assert _ok(cli_jobs, name).strip() == f"wrote {swapped}: {path} with the 6 vectors of adapter"
    assert read_manifest(swapped)["adapters"] == ["adapter"]

    prompt = _prompt(batch=2 if fmt == "pt2" else 1)
    want, plain, eos = _preset_tokens(directory / "adapter", prompt)
    if fmt == "pt2":
        def decode(p):
            return greedy_pt2(torch.export.load(p), prompt, NEW, eos_token_id=eos, pad_token_id=eos)
        differ = not torch.equal(_one_step_logits_pt2(path), _one_step_logits_pt2(swapped))
    else:
        def decode(p):
            return greedy_onnx(p, prompt, NEW, eos_token_id=eos, pad_token_id=eos)
        differ = not np.array_equal(_one_step_logits_onnx(path), _one_step_logits_onnx(swapped))
    assert torch.equal(decode(path), plain)  # vectors of ones: the base model's tokens
    assert torch.equal(decode(swapped), want), (decode(swapped).tolist(), want.tolist())
    assert differ  # the swapped vectors are in use



def test_cli_error_lines(cli_jobs, artifacts):
    merged = artifacts.get("llama", "pt2", True)
    cli_jobs.start("swap-merged", "swap-adapter", merged, "adapter", "--out", "never.pt2")
    line = _one_error_line(cli_jobs, "transformers", "export")
    assert "--for-generation exports a program with a KV cache (pt2 or onnx)" in line and "drop --for-generation" in line
    assert not (cli_jobs.directory / "ckpt").exists()
    line = _one_error_line(cli_jobs, "swap-merged", "swap-adapter")
    assert f"{merged} was exported merged" in line and "--unmerged" in line
    assert not (cli_jobs.directory / "never.pt2").exists()
