"""``IA3Model.generate`` against PEFT's ``generate`` on tiny Llama, GPT-2, T5 and BART.

Both models get the same non-trivial vectors: ``peft_and_ia3`` (conftest) draws them in PEFT
(``randomize_peft``) and loads PEFT's state dict into ia3fx; here they are then spread far from
ones (``exp(3 (v - 1))``: about 0.1 to 15) the same way on both sides, and the base models get a
larger init than the factories' default, so that the adapter changes the generated tokens. Every
comparison with PEFT is paired with a check that the base model alone generates something else,
so no test can pass on an adapter that silently does nothing.

Cases: greedy (with and without a KV cache), beam search, sampling under one seed, stopping on an
eos token, a left-padded batch with an attention mask, a streamer, a ``GenerationConfig`` object,
several active adapters; the model's state after ``generate``; ``generate`` in one thread while
another runs forwards of the same model.
"""

from __future__ import annotations

import copy
import threading
import warnings

import peft
import pytest
import torch
from conftest import VOCAB, peft_and_ia3, randomize_peft, tiny_bart, tiny_gpt2, tiny_llama, tiny_t5
from transformers import GenerationConfig
from transformers.generation import BaseStreamer

import ia3fx

PAD = 0
NEW = 8  # max_new_tokens


# family -> (factory, overrides, PEFT task type). No eos token by default (a test sets one), a pad
# token, no dropout, and a livelier init than the factories' (tiny random models with a 0.02 init
# repeat one token whatever the adapter).
NO_EOS = dict(eos_token_id=None, pad_token_id=PAD)
GPT2_NO_DROP = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
BART_NOT_FORCED = dict(forced_eos_token_id=None, forced_bos_token_id=None)
FAMILIES = {
    "llama": (tiny_llama, dict(initializer_range=0.2, **NO_EOS), "CAUSAL_LM"),
    "gpt2": (tiny_gpt2, dict(initializer_range=0.2, bos_token_id=1, **NO_EOS, **GPT2_NO_DROP), "CAUSAL_LM"),
    "t5": (tiny_t5, dict(dropout_rate=0.0, **NO_EOS), "SEQ_2_SEQ_LM"),  # its own init is lively enough
    "bart": (tiny_bart, dict(init_std=0.2, **BART_NOT_FORCED, **NO_EOS), "SEQ_2_SEQ_LM"),
}
ALL = list(FAMILIES)
SEQ2SEQ = {"t5", "bart"}
# a second adapter: other layers besides some of the default's (which then multiply), each layer
# with the same feedforward placement as in the default adapter (PEFT fixes it per layer)
SECOND = {
    "llama": dict(target_modules=["k_proj", "o_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "gpt2": dict(  # Conv1D layers: fan_in_fan_out, as PEFT would set it (with a warning)
        target_modules=["c_attn", "attn.c_proj", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
        fan_in_fan_out=True,
    ),
    "t5": dict(target_modules=["q", "v", "wo"], feedforward_modules=["wo"]),
    "bart": dict(target_modules=["k_proj", "v_proj", "fc2"], feedforward_modules=["fc2"]),
}


# --- helpers -----------------------------------------------------------------------------------
def _spread(pm, ia3, adapters=("default",)) -> None:
    """Vectors far from ones, the same on both sides: PEFT's ``v`` becomes ``exp(3 (v - 1))``."""
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".ia3_l." in name:
                p.copy_(torch.exp(3.0 * (p - 1.0)))
    for adapter in adapters:
        ia3.load_adapter_state_dict(peft.get_peft_model_state_dict(pm, adapter_name=adapter), adapter)


def _build(family: str):
    """(peft_model, ia3_model, base): the same random weights and vectors; ``base`` is unadapted."""
    factory, overrides, task = FAMILIES[family]
    model = factory(**overrides)
    base = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm, ia3 = peft_and_ia3(model, {"task_type": task})
    _spread(pm, ia3)
    pm.eval()
    ia3.eval()
    logs = torch.cat([p.detach().log().flatten() for p in ia3.ia3_l["default"].parameters()])
    assert logs.abs().mean() > 0.5 and logs.max() > 1.5 and logs.min() < -1.5  # far from ones
    return pm, ia3, base


_PAIRS: dict[str, tuple] = {}


def _pair(family: str):
    """The shared (peft_model, ia3_model, base) of a family; tests that change a model build their own."""
    if family not in _PAIRS:
        _PAIRS[family] = _build(family)
    return _PAIRS[family]


def _prompt(batch: int = 1, seq: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)  # no pad / bos / start ids


def _left_padded() -> dict[str, torch.Tensor]:
    """Two prompts, of 6 and 4 tokens, left-padded, with their attention mask."""
    ids = _prompt(batch=2, seq=6, seed=2)
    mask = torch.ones_like(ids)
    ids[1, :2] = PAD
    mask[1, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _new_tokens(family: str, out: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """The generated part: after the prompt (decoder-only), after the start token (seq2seq)."""
    return out[:, 1:] if family in SEQ2SEQ else out[:, prompt_len:]


def _gen(model, inputs: dict, seed: int | None = None, **kwargs) -> torch.Tensor:
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(**inputs, **kwargs)


def _eager_calls(ia3) -> int:
    return sum(r["eager"] for r in ia3.block_runs().values())


def _graph_calls(ia3) -> int:
    return sum(r["graph"] for r in ia3.block_runs().values())


def _assert_matches_peft_not_base(family, pm, ia3, base, inputs, seed=None, **kwargs) -> torch.Tensor:
    """ia3fx's tokens equal PEFT's, and differ from the base model's: returns ia3fx's."""
    eager = _eager_calls(ia3)
    a = _gen(ia3, inputs, seed, **kwargs)
    b = _gen(pm, inputs, seed, **kwargs)
    c = _gen(base, inputs, seed, **kwargs)
    assert a.shape == b.shape and torch.equal(a, b), (a.tolist(), b.tolist())
    assert a.shape != c.shape or not torch.equal(a, c), f"the adapter changed nothing: {a.tolist()}"
    if kwargs.get("use_cache", True):  # with a KV cache the blocks ran their own forward, hooks scaling
        assert _eager_calls(ia3) > eager
    return a


# --- decoding strategies -----------------------------------------------------------------------
@pytest.mark.parametrize("family", ALL)
def test_greedy_matches_peft(family):
    pm, ia3, base = _pair(family)
    inputs = {"input_ids": _prompt()}
    out = _assert_matches_peft_not_base(family, pm, ia3, base, inputs, max_new_tokens=NEW, do_sample=False)
    assert _new_tokens(family, out, 6).shape == (1, NEW)  # no eos: every requested token
    assert ((out >= 0) & (out < VOCAB)).all()
    kwargs = dict(max_new_tokens=NEW, do_sample=False)
    with ia3.disable_adapter():  # off: the base model's tokens; on again after
        assert torch.equal(_gen(ia3, inputs, **kwargs), _gen(base, inputs, **kwargs))
    assert torch.equal(_gen(ia3, inputs, **kwargs), out)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_without_cache_runs_graphs_and_matches_peft(family):
    """``use_cache=False``: every step is a full forward through the block graphs (one dynamic
    capture serves the growing length)."""
    pm, ia3, base = _pair(family)
    graph = _graph_calls(ia3)
    out = _assert_matches_peft_not_base(
        family, pm, ia3, base, {"input_ids": _prompt()}, max_new_tokens=NEW, do_sample=False, use_cache=False
    )
    assert out.shape == (1, 6 + NEW)
    assert _graph_calls(ia3) == graph + NEW * len(ia3.block_runs())  # every step, every block


@pytest.mark.parametrize("family", ALL)
def test_beam_search_matches_peft(family):
    pm, ia3, base = _pair(family)
    inputs = {"input_ids": _prompt()}
    kwargs = dict(max_new_tokens=NEW, num_beams=3, num_return_sequences=3, do_sample=False)
    out = _assert_matches_peft_not_base(family, pm, ia3, base, inputs, **kwargs)
    assert out.shape[0] == 3 and len({tuple(row) for row in out.tolist()}) == 3  # three hypotheses
    # the beams' scores too, bit for bit
    a = _gen(ia3, inputs, return_dict_in_generate=True, output_scores=True, **kwargs)
    b = _gen(pm, inputs, return_dict_in_generate=True, output_scores=True, **kwargs)
    assert torch.equal(a.sequences, out) and torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.sequences_scores, b.sequences_scores)
    assert len(a.scores) == len(b.scores) == NEW
    for x, y in zip(a.scores, b.scores):
        assert torch.equal(x, y)


@pytest.mark.parametrize("family", ALL)
def test_sampling_under_one_seed_matches_peft(family):
    pm, ia3, base = _pair(family)
    kwargs = dict(max_new_tokens=NEW, do_sample=True, top_k=0, top_p=1.0, temperature=1.0)
    out = _assert_matches_peft_not_base(family, pm, ia3, base, {"input_ids": _prompt()}, seed=7, **kwargs)
    # the seed matters (the sampler really samples), and the same seed gives the same tokens again
    again = _gen(ia3, {"input_ids": _prompt()}, seed=7, **kwargs)
    others = [_gen(ia3, {"input_ids": _prompt()}, seed=s, **kwargs) for s in (8, 9)]
    assert torch.equal(out, again)
    assert any(not torch.equal(out, o) for o in others)


@pytest.mark.parametrize("family", ALL)
def test_eos_stops_generation_as_in_peft(family):
    pm, ia3, base = _pair(family)
    inputs = {"input_ids": _prompt()}
    free = _new_tokens(family, _gen(ia3, inputs, max_new_tokens=NEW, do_sample=False), 6)[0].tolist()
    eos = free[NEW // 2]  # a token the adapted model generates
    stop = free.index(eos)  # ... first at this step
    out = _assert_matches_peft_not_base(
        family, pm, ia3, base, inputs, max_new_tokens=NEW, do_sample=False, eos_token_id=eos
    )
    new = _new_tokens(family, out, 6)[0].tolist()
    assert new == free[: stop + 1] and len(new) < NEW  # stopped right after the eos token


@pytest.mark.parametrize("family", ALL)
def test_left_padded_batch_with_attention_mask_matches_peft(family):
    pm, ia3, base = _pair(family)
    inputs = _left_padded()
    out = _assert_matches_peft_not_base(
        family, pm, ia3, base, inputs, max_new_tokens=NEW, do_sample=False, pad_token_id=PAD
    )
    assert out.shape[0] == 2 and _new_tokens(family, out, 6).shape == (2, NEW)
    if family not in SEQ2SEQ:
        assert torch.equal(out[:, :6], inputs["input_ids"])  # the prompts, padding kept
    # the two rows are generated for their own prompts (the mask is used): not the same tokens
    new = _new_tokens(family, out, 6)
    assert not torch.equal(new[0], new[1])


class Collect(BaseStreamer):
    """Every tensor ``generate`` streams: first the prompt (decoder-only) or the start token
    (seq2seq), then each new token."""

    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        assert not self.ended
        self.chunks.append(value.detach().clone().reshape(-1))

    def end(self) -> None:
        self.ended = True

    def tokens(self) -> torch.Tensor:
        return torch.cat(self.chunks)


@pytest.mark.parametrize("family", ALL)
def test_streamer_sees_the_returned_tokens(family):
    pm, ia3, base = _pair(family)
    inputs = {"input_ids": _prompt()}
    kwargs = dict(max_new_tokens=NEW, do_sample=False)
    ours, theirs, plain = Collect(), Collect(), Collect()
    a = _gen(ia3, inputs, streamer=ours, **kwargs)
    b = _gen(pm, inputs, streamer=theirs, **kwargs)
    c = _gen(base, inputs, streamer=plain, **kwargs)
    assert ours.ended and theirs.ended
    assert len(ours.chunks) == 1 + NEW
    assert torch.equal(ours.tokens(), a[0])  # streamed == returned
    assert torch.equal(theirs.tokens(), b[0])
    assert torch.equal(a, b) and torch.equal(ours.tokens(), theirs.tokens())
    assert not torch.equal(ours.tokens(), plain.tokens()) and torch.equal(plain.tokens(), c[0])
    # streaming changes nothing
    assert torch.equal(a, _gen(ia3, inputs, **kwargs))


@pytest.mark.parametrize("family", ALL)
def test_generation_config_object_matches_peft(family):
    pm, ia3, base = _pair(family)
    config = GenerationConfig(
        max_new_tokens=5, do_sample=False, num_beams=2, pad_token_id=PAD, eos_token_id=None,
        decoder_start_token_id=getattr(base.config, "decoder_start_token_id", None), use_cache=True,
    )
    snapshot = config.to_dict()
    inputs = _left_padded()
    out = _assert_matches_peft_not_base(family, pm, ia3, base, inputs, generation_config=config)
    assert _new_tokens(family, out, 6).shape == (2, 5)  # the config's max_new_tokens, not the default
    # the config is honoured, not replaced by the model's: beam search here, not greedy
    assert torch.equal(out, _gen(ia3, inputs, max_new_tokens=5, num_beams=2, do_sample=False))
    assert config.to_dict() == snapshot  # the caller's object is unchanged


# --- several active adapters -------------------------------------------------------------------
@pytest.mark.parametrize("family", ALL)
def test_several_active_adapters_match_peft(family):
    pm, ia3, base = _build(family)
    task = FAMILIES[family][2]
    inputs = _left_padded()
    kwargs = dict(max_new_tokens=NEW, do_sample=False)
    only_default = _gen(ia3, inputs, **kwargs)
    pm.add_adapter("other", peft.IA3Config(task_type=task, **SECOND[family]))
    ia3.add_adapter("other", ia3fx.IA3Config(task_type=task, **SECOND[family]))
    randomize_peft(pm, seed=11)  # new random vectors for both adapters, copied into ia3fx
    _spread(pm, ia3, ("default", "other"))
    ia3.set_adapter(["default", "other"])
    pm.base_model.set_adapter(["default", "other"])
    assert ia3.active_adapters == ["default", "other"] == pm.active_adapters
    both = _assert_matches_peft_not_base(family, pm, ia3, base, inputs, **kwargs)
    # each adapter alone gives other tokens than both together (both really apply)
    for name in ("default", "other"):
        ia3.set_adapter(name)
        pm.base_model.set_adapter(name)
        alone = _assert_matches_peft_not_base(family, pm, ia3, base, inputs, **kwargs)
        assert not torch.equal(alone, both), name
    # the first draw of "default" (before randomize_peft) generated something else too
    assert not torch.equal(only_default, both)


# --- state after generate ----------------------------------------------------------------------
def _state(ia3) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in ia3.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in ia3.named_buffers()},
        "requires_grad": {n: p.requires_grad for n, p in ia3.named_parameters()},
        "grads": {n: p.grad for n, p in ia3.named_parameters() if p.grad is not None},
        "training": {n: m.training for n, m in ia3.named_modules()},
        "merged": ia3.merged_adapters,
        "active": ia3.active_adapters,
        "data_ptrs": {n: p.data_ptr() for n, p in ia3.named_parameters()},
    }


def _assert_state(before: dict, after: dict) -> None:
    for kind in ("params", "buffers"):
        assert before[kind].keys() == after[kind].keys(), kind
        for n in before[kind]:
            assert torch.equal(before[kind][n], after[kind][n]), (kind, n)
    for kind in ("requires_grad", "training", "merged", "active", "data_ptrs"):
        assert before[kind] == after[kind], kind
    assert not after["grads"]


@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize("mode", ["eval", "train", "merged"])
def test_generate_leaves_the_model_as_it_was(family, mode):
    pm, ia3, base = _build(family)
    # a mixed state, so that "unchanged" means something: one vector frozen by hand
    frozen_name, frozen = next(iter(ia3.ia3_l["default"].named_parameters()))
    frozen.requires_grad_(False)
    if mode == "train":
        ia3.train()
        pm.train()
    elif mode == "merged":
        ia3.merge_adapter()
        pm.merge_adapter()
        assert ia3.merged_adapters == ["default"]
    trainable = {n for n, p in ia3.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("model.") for n in trainable)  # vectors only, one not
    before = _state(ia3)
    inputs = {"input_ids": _prompt()}
    for kwargs in (dict(do_sample=False), dict(num_beams=3), dict(do_sample=True)):
        a = _gen(ia3, inputs, seed=3, max_new_tokens=NEW, use_cache=True, **kwargs)
        _assert_state(before, _state(ia3))
        b = _gen(pm, inputs, seed=3, max_new_tokens=NEW, use_cache=True, **kwargs)
        assert torch.equal(a, b), (kwargs, a.tolist(), b.tolist())  # merged: both fold W * l alike
    assert ia3.training == (mode == "train")
    assert not ia3.get_vector(frozen_name.replace("__", ".")).requires_grad
    if mode == "merged":  # still merged, and the exact unmerge still gives the base weights back
        ia3.unmerge_adapter()
        for n, p in base.named_parameters():
            assert torch.equal(ia3.model.get_parameter(n), p), n


# --- threads -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "t5"])
def test_generate_while_another_thread_runs_forwards(family):
    """A fresh model (its first captures happen while both threads run): one thread generates,
    the other runs forwards (through the block graphs, and with a KV cache through hooks); each
    gets what it gets alone, and what PEFT gives."""
    pm, ia3, _ = _build(family)
    gen_inputs = _left_padded()
    # the same structure as the generate call's (a mask): T5's encoder captures serve both threads
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, :1] = 0
    fwd_inputs = {"input_ids": _prompt(batch=2, seq=5, seed=9), "attention_mask": mask}
    if family in SEQ2SEQ:
        fwd_inputs["decoder_input_ids"] = _prompt(batch=2, seq=3, seed=10)
    gen_kwargs = dict(max_new_tokens=NEW, do_sample=False)
    # each thread goes on until both have done their share (and stops if the other fails), so the
    # two overlap after the first captures too, not only while one of them waits for a capture
    need = {"gen": 3, "fwd": 6}
    results: dict[str, list] = {"gen": [], "graph": [], "cache": []}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def go_on(mine: int, share: int) -> bool:
        done = len(results["gen"]) >= need["gen"] and len(results["cache"]) >= need["fwd"]
        return not errors and (mine < share or not done) and mine < 10 * share

    def generating() -> None:
        try:
            barrier.wait(timeout=60)
            while go_on(len(results["gen"]), need["gen"]):
                results["gen"].append(_gen(ia3, gen_inputs, **gen_kwargs))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def forwarding() -> None:
        try:
            barrier.wait(timeout=60)
            with torch.no_grad():
                while go_on(len(results["cache"]), need["fwd"]):
                    results["graph"].append(ia3(**fwd_inputs, use_cache=False).logits)
                    results["cache"].append(ia3(**fwd_inputs, use_cache=True).logits)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=generating), threading.Thread(target=forwarding)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, repr(errors[0])
    assert len(results["gen"]) >= need["gen"]
    assert len(results["graph"]) == len(results["cache"]) >= need["fwd"]

    # alone, on the same model, and PEFT
    alone_gen = _gen(ia3, gen_inputs, **gen_kwargs)
    with torch.no_grad():
        alone_graph = ia3(**fwd_inputs, use_cache=False).logits
        alone_cache = ia3(**fwd_inputs, use_cache=True).logits
        peft_graph = pm(**fwd_inputs, use_cache=False).logits
    assert torch.equal(alone_gen, _gen(pm, gen_inputs, **gen_kwargs))
    torch.testing.assert_close(alone_graph, peft_graph, rtol=1e-5, atol=1e-5)
    for out in results["gen"]:
        assert torch.equal(out, alone_gen)
    for out in results["graph"]:
        assert torch.equal(out, alone_graph)
    for out in results["cache"]:
        assert torch.equal(out, alone_cache)
    assert _graph_calls(ia3) > 0 and _eager_calls(ia3) > 0
