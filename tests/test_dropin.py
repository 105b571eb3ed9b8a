"""The adapted transformers model as a drop-in for PEFT's: gradient checkpointing (and what it saves
for backward), dtype moves and autocast, the keyword arguments the base model takes, threads,
``generate``, and block graphs shared by identical layers.

Every test gives ia3fx random vectors (``init_ia3_weights=False``) and copies them into a PEFT model
built on an identical base (``set_peft_model_state_dict``), then compares the two.
"""

from __future__ import annotations

import copy
import threading
import warnings

import peft
import pytest
import torch
from conftest import VOCAB, tiny_bert_seq_cls, tiny_gpt2, tiny_llama, token_inputs
from transformers.cache_utils import Cache

import ia3fx

PEFT_TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}
NO_DROPOUT = {
    "llama": {},  # attention_dropout is 0 by default
    "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0),
}
FACTORY = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert_seq_cls}


# --- helpers -----------------------------------------------------------------------------------
def _ia3(base, family: str, sd: dict | None = None) -> ia3fx.IA3Model:
    """ia3fx on ``base`` with random vectors (or the adapter state ``sd``)."""
    task = "SEQ_CLS" if family == "bert" else None  # BERT: PEFT's classifier copy (modules_to_save)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # init_ia3_weights=False "is meant for tests"
        ia3 = ia3fx.get_ia3_model(base, ia3fx.IA3Config(init_ia3_weights=False, task_type=task))
    if sd is not None:
        ia3.load_adapter_state_dict(sd)
    return ia3


def _peft(base, family: str, sd: dict):
    pm = peft.get_peft_model(base, peft.IA3Config(task_type=PEFT_TASK[family]))
    result = peft.set_peft_model_state_dict(pm, sd)
    assert not result.unexpected_keys
    loaded = {k for k in pm.state_dict() if ".ia3_l." in k or ".modules_to_save." in k}
    assert loaded and not loaded & set(result.missing_keys)
    return pm


def _pair(family: str = "llama", **overrides):
    """(peft_model, ia3_model) on two identical tiny bases, with the same random vectors."""
    base = FACTORY[family](**overrides)
    ia3 = _ia3(copy.deepcopy(base), family)
    pm = _peft(base, family, ia3.adapter_state_dict())
    return pm, ia3


def _set_mode(train: bool, *models) -> None:
    for m in models:
        m.train(train)


def _calls(ia3) -> tuple[int, int]:
    return (
        sum(r.graph_calls for r in ia3._runners.values()),
        sum(r.eager_calls for r in ia3._runners.values()),
    )


def _captures(ia3) -> int:
    return sum(len(graphs) for graphs in ia3._block_cache.values())


def _assert_same(a, b, exact: bool = True, where: str = "output") -> None:
    """Equal outputs: tensors, tuples, ModelOutputs (same keys), KV caches (same keys and values)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.shape == b.shape and a.dtype == b.dtype, (where, a.shape, b.shape, a.dtype, b.dtype)
        if exact:
            assert torch.equal(a, b), (where, (a.float() - b.float()).abs().max().item())
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=where)
    elif isinstance(a, Cache):
        assert isinstance(b, Cache), where
        assert len(a.layers) == len(b.layers), where
        for i, (la, lb) in enumerate(zip(a.layers, b.layers)):
            _assert_same(la.keys, lb.keys, exact, f"{where}.layers[{i}].keys")
            _assert_same(la.values, lb.values, exact, f"{where}.layers[{i}].values")
    elif hasattr(a, "keys") and hasattr(a, "to_tuple"):  # ModelOutput
        assert list(a.keys()) == list(b.keys()), (where, list(a.keys()), list(b.keys()))
        for k in a.keys():
            _assert_same(a[k], b[k], exact, f"{where}.{k}")
    elif isinstance(a, (tuple, list)):
        assert isinstance(b, (tuple, list)) and len(a) == len(b), (where, type(b), len(a))
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, exact, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _ia3_grads(ia3) -> dict[str, torch.Tensor]:
    """Vector gradients keyed as PEFT's state dict (``base_model.model.<layer>.ia3_l``), flat."""
    return {
        f"base_model.model.{name.replace('__', '.')}.ia3_l": p.grad.flatten()
        for name, p in ia3.ia3_l["default"].named_parameters()
    }


def _peft_grads(pm) -> dict[str, torch.Tensor]:
    return {
        n.replace(".ia3_l.default", ".ia3_l"): p.grad.flatten()
        for n, p in pm.named_parameters()
        if ".ia3_l." in n
    }


def _loss_and_grads(model, inputs: dict, grads) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    return out.loss.detach(), grads(model)


# --- 1. gradient checkpointing -----------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt_reference():
    """Loss and vector gradients of one training step, without checkpointing: ia3fx and PEFT."""
    base = tiny_llama()
    ia3 = _ia3(copy.deepcopy(base), "llama")
    sd = ia3.adapter_state_dict()
    pm = _peft(copy.deepcopy(base), "llama", sd)
    inputs = token_inputs("llama", mask=True)
    loss, grads = _loss_and_grads(ia3, inputs, _ia3_grads)
    assert _calls(ia3)[0] > 0
    peft_loss, peft_grads = _loss_and_grads(pm, inputs, _peft_grads)
    assert torch.equal(loss, peft_loss)
    assert grads.keys() == peft_grads.keys() and len(grads) == 6
    for k in grads:
        torch.testing.assert_close(grads[k], peft_grads[k], rtol=1e-6, atol=1e-6, msg=k)
        assert grads[k].abs().sum() > 0, k
    return base, sd, inputs, loss, grads


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_matches_unchecked_run(ckpt_reference, use_reentrant, when):
    base, sd, inputs, ref_loss, ref_grads = ckpt_reference
    base = copy.deepcopy(base)
    ckpt_kwargs = {"use_reentrant": use_reentrant}
    if when == "before":
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        ia3 = _ia3(base, "llama", sd)
    else:
        ia3 = _ia3(base, "llama", sd)
        ia3.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    assert all(r.block.gradient_checkpointing for r in ia3._runners.values())
    loss, grads = _loss_and_grads(ia3, inputs, _ia3_grads)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-6, atol=1e-6, msg=k)
    for name, runner in ia3._runners.items():
        # the graph ran inside the checkpoint: once forward, once more when backward recomputed it
        assert (runner.graph_calls, runner.eager_calls) == (2, 0), name
    # a second step reuses the capture
    n = _captures(ia3)
    _loss_and_grads(ia3, inputs, _ia3_grads)
    assert _captures(ia3) == n
    assert all(r.graph_calls == 4 for r in ia3._runners.values())


def _saved_activation_bytes(model, inputs: dict) -> tuple[int, torch.Tensor]:
    """Bytes autograd keeps for backward during one training forward, and the loss.

    The measure: a ``saved_tensors_hooks`` pack hook sees every tensor autograd saves while the
    forward runs. Each distinct storage is counted once, at its full ``untyped_storage().nbytes()``
    (views of one buffer are one allocation); storages of parameters and buffers are left out
    (they exist with or without autograd). Inside a non-reentrant checkpoint, ``checkpoint``'s own
    (innermost) hooks take over and keep nothing, so those tensors are rightly not counted; a
    reentrant checkpoint runs the block under ``no_grad`` and saves only its inputs, which are
    counted. The hook keeps a reference to each tensor so that no storage address is reused while
    counting.
    """
    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    sizes: dict[int, int] = {}
    held: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            sizes[storage.data_ptr()] = storage.nbytes()
        held.append(t)
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    return sum(sizes.values()), out.loss.detach()


def test_gradient_checkpointing_saves_no_more_than_peft():
    config = dict(hidden_size=256, num_hidden_layers=4, intermediate_size=512, max_position_embeddings=256)
    base = tiny_llama(**config)
    inputs = token_inputs("llama", batch=2, seq=128)

    ia3 = _ia3(copy.deepcopy(base), "llama")
    sd = ia3.adapter_state_dict()
    plain_bytes, _ = _saved_activation_bytes(_ia3(copy.deepcopy(base), "llama", sd), inputs)
    ia3.train()
    ia3(**inputs, labels=inputs["input_ids"]).loss.backward()  # captures (outside the hooks: see below)
    peft_base = copy.deepcopy(base)
    peft_base.enable_input_require_grads()  # what reentrant checkpointing needs with frozen weights
    pm = _peft(peft_base, "llama", sd)

    for use_reentrant in (True, False):
        ckpt = {"use_reentrant": use_reentrant}
        ia3.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)
        pm.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)
        graph_before = _calls(ia3)
        ia3_bytes, ia3_loss = _saved_activation_bytes(ia3, inputs)
        peft_bytes, peft_loss = _saved_activation_bytes(pm, inputs)
        print(
            f"\nsaved for backward (use_reentrant={use_reentrant}): ia3fx+ckpt {ia3_bytes:,d} B, "
            f"PEFT+ckpt {peft_bytes:,d} B (ratio {ia3_bytes / peft_bytes:.3f}); ia3fx without ckpt "
            f"{plain_bytes:,d} B"
        )
        # the graph ran in every block, forward and recomputed in backward
        assert _calls(ia3) == (graph_before[0] + 2 * 4, graph_before[1])
        torch.testing.assert_close(ia3_loss, peft_loss, rtol=1e-6, atol=1e-6)
        assert ia3_bytes <= 1.25 * peft_bytes
        assert ia3_bytes * 3 < plain_bytes  # the measure sees what checkpointing drops
    assert _captures(ia3) == 1


def test_capture_under_callers_saved_tensors_hooks():
    """A first (capturing) training call inside the caller's ``saved_tensors_hooks`` still gets the
    graph, and the hooks see only real tensors."""
    base = tiny_llama()
    ia3 = _ia3(copy.deepcopy(base), "llama")
    ia3.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inputs = token_inputs("llama")
    seen: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen.append(t.untyped_storage().data_ptr())  # what an offloading or measuring hook does
        return t

    ia3.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*run their own forward")  # no fallback to eager
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = ia3(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    assert seen
    assert all((r.graph_calls, r.eager_calls) == (2, 0) for r in ia3._runners.values())


# --- 2. dtype and device moves -----------------------------------------------------------------
def test_dtype_and_device_moves_follow_peft():
    """After a first call, each move gives PEFT's outputs bit for bit: both models hold their
    vectors in the moved dtype and compute ``(base(x) * v).to(dtype)`` / ``base((x * v).to(dtype))``
    in it, on both paths (the graph: ``use_cache=False``; the block's own forward with hooks: a cache)."""
    pm, ia3 = _pair("llama")
    pm.eval()
    inputs = token_inputs("llama", mask=True)

    def check(expect: torch.dtype) -> None:
        graph_before = _calls(ia3)[0]
        with torch.no_grad():
            a = ia3(**inputs, use_cache=False)
            b = pm(**inputs, use_cache=False)
            assert a.logits.dtype == expect
            _assert_same(a, b)
            assert _calls(ia3)[0] == graph_before + 2  # both blocks ran the graph
            _assert_same(ia3(**inputs), pm(**inputs))  # eval default: a KV cache, hooks
        for p in ia3.ia3_l.parameters():
            assert p.dtype == expect

    check(torch.float32)
    moves = [
        (lambda m: m.to(torch.bfloat16), torch.bfloat16),
        (lambda m: m.half(), torch.float16),
        (lambda m: m.bfloat16(), torch.bfloat16),
        (lambda m: m.float(), torch.float32),
        (lambda m: m.to("cpu"), torch.float32),
    ]
    for move, dtype in moves:
        assert move(ia3) is ia3
        move(pm)
        check(dtype)
    assert len(ia3._block_cache) == 3  # one capture per parameter dtype, reused when it comes back


# --- 3. autocast -------------------------------------------------------------------------------
def test_cpu_bf16_autocast_matches_peft():
    pm, ia3 = _pair("llama")
    inputs = token_inputs("llama", mask=True)
    pm.eval()
    with torch.no_grad():
        _ = ia3(**inputs, use_cache=False)  # a capture outside autocast first
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a = ia3(**inputs, use_cache=False)
            b = pm(**inputs, use_cache=False)
            assert a.logits.dtype == torch.bfloat16
            _assert_same(a, b)
            _assert_same(ia3(**inputs), pm(**inputs))  # with a KV cache: hooks
    assert len(ia3._block_cache) == 2  # autocast is a capture of its own
    assert _calls(ia3)[0] == 4

    # a training step under autocast: loss and vector gradients
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(ia3, inputs, _ia3_grads)
        peft_loss, peft_grads = _loss_and_grads(pm, inputs, _peft_grads)
    assert torch.equal(loss, peft_loss)
    for k in grads:
        torch.testing.assert_close(grads[k], peft_grads[k], rtol=1e-6, atol=1e-6, msg=k)
    assert _calls(ia3)[0] == 6


# --- 4. keyword arguments ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapted():
    """family -> (peft_model, ia3_model, base), with dropout off so that training mode is exact."""
    out = {}
    for family in ("llama", "gpt2", "bert"):
        base = FACTORY[family](**NO_DROPOUT[family])
        pm, ia3 = _pair(family, **NO_DROPOUT[family])
        pm.eval()
        with torch.no_grad():  # the adapter changes the output: the comparisons below mean something
            inputs = token_inputs(family)
            assert not torch.allclose(pm(**inputs).logits, base(**inputs).logits)
        out[family] = (pm, ia3, base)
    return out


def _kwargs_cases(family: str, base) -> dict[str, dict]:
    inputs = token_inputs(family, mask=True)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    labels = ids if family != "bert" else torch.tensor([0, 2])
    embeds = base.get_input_embeddings()(ids).detach()
    batch, seq = ids.shape
    cases = {
        "labels": dict(input_ids=ids, labels=labels),
        "attention_mask": dict(input_ids=ids, attention_mask=mask),
        "labels+attention_mask": dict(input_ids=ids, attention_mask=mask, labels=labels),
        "inputs_embeds": dict(inputs_embeds=embeds, attention_mask=mask),
        "output_hidden_states": dict(input_ids=ids, attention_mask=mask, output_hidden_states=True),
        "return_dict=False": dict(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False),
    }
    if family != "bert":
        cases["position_ids"] = dict(input_ids=ids, position_ids=torch.arange(3, 3 + seq).expand(batch, seq))
        cases["logits_to_keep"] = dict(input_ids=ids, attention_mask=mask, logits_to_keep=1)
        cases["num_items_in_batch"] = dict(
            input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(5)
        )
    return cases


KWARGS_IDS = [
    (family, case)
    for family in ("llama", "gpt2", "bert")
    for case in _kwargs_cases(family, FACTORY[family]())
]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("family, case", KWARGS_IDS, ids=[f"{f}-{c}" for f, c in KWARGS_IDS])
def test_keyword_arguments_match_peft(adapted, family, case, train):
    pm, ia3, base = adapted[family]
    kwargs = _kwargs_cases(family, base)[case]
    _set_mode(train, pm, ia3)
    graph_before = _calls(ia3)[0]
    with torch.no_grad():
        a = ia3(**kwargs)
        if train and family != "bert":
            kwargs = dict(kwargs, use_cache=False)  # what IA3Model passes in training (PEFT would return a cache)
        b = pm(**kwargs)
    _assert_same(a, b)
    if case == "logits_to_keep":
        assert a.logits.shape[1] == 1
    if case == "output_hidden_states":
        n_layers = base.config.num_hidden_layers
        assert len(a.hidden_states) == n_layers + 1
    if case == "return_dict=False":
        assert isinstance(a, tuple)
    if "labels" in kwargs:
        loss = a[0] if isinstance(a, tuple) else a.loss
        assert loss.dim() == 0 and torch.isfinite(loss)
    # the graphs serve training calls, and eval calls without a KV cache (BERT has none)
    uses_graph = train or family == "bert"
    assert (_calls(ia3)[0] > graph_before) == uses_graph


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_output_attentions_match_peft(family, train):
    """Attention weights are recorded by hooks inside the blocks: the blocks run their own forward."""
    pm, ia3 = _pair(family, attn_implementation="eager", **NO_DROPOUT[family])
    _set_mode(train, pm, ia3)
    inputs = token_inputs(family, mask=True)
    with torch.no_grad():
        a = ia3(**inputs, output_attentions=True)
        b = pm(**inputs, output_attentions=True, **({"use_cache": False} if train else {}))
    _assert_same(a, b)
    assert len(a.attentions) == 2 and a.attentions[0].shape[-1] == inputs["input_ids"].shape[1]
    assert _calls(ia3)[1] > 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_use_cache_in_eval_returns_cache_and_continues(adapted, family):
    pm, ia3, _ = adapted[family]
    _set_mode(False, pm, ia3)
    inputs = token_inputs(family, mask=False)
    with torch.no_grad():
        a = ia3(**inputs, use_cache=True)
        b = pm(**inputs, use_cache=True)
        assert isinstance(a.cache, Cache) and a.cache.get_seq_length() == inputs["input_ids"].shape[1]
        _assert_same(a, b)
        # one more token, reading the cache
        nxt = a.logits[:, -1:].argmax(-1)
        a2 = ia3(input_ids=nxt, cache=a.cache, use_cache=True)
        b2 = pm(input_ids=nxt, cache=b.cache, use_cache=True)
        _assert_same(a2, b2)


def test_hidden_states_of_a_capturing_call():
    """The first training call with ``output_hidden_states=True`` captures the block graph; the
    capture runs the block under export, and must not add (fake) entries to the hidden states."""
    pm, ia3 = _pair("llama")
    _set_mode(True, pm, ia3)
    inputs = token_inputs("llama", mask=True)
    with torch.no_grad():
        a = ia3(**inputs, output_hidden_states=True)
        b = pm(**inputs, output_hidden_states=True, use_cache=False)
    assert _calls(ia3)[0] == 2
    assert len(a.hidden_states) == 3
    _assert_same(a, b)


# --- 5. threads --------------------------------------------------------------------------------
def test_two_threads_capturing_at_once():
    pm, ia3 = _pair("llama")
    _set_mode(False, pm, ia3)
    # different structures and sizes: no mask, seq 7 / a padded mask, seq 1 (a size-1 dim is static)
    jobs = [token_inputs("llama", batch=2, seq=7, seed=3), token_inputs("llama", batch=3, seq=1, seed=4, mask=True)]
    barrier = threading.Barrier(len(jobs))
    results: list = [None] * len(jobs)

    def work(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            with torch.no_grad():
                results[i] = ia3(**jobs[i], use_cache=False)
        except BaseException as e:  # noqa: BLE001 - reported below
            results[i] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    for i, res in enumerate(results):
        assert not isinstance(res, BaseException), repr(res)
        with torch.no_grad():
            _assert_same(res, pm(**jobs[i], use_cache=False))
    # While one thread exports, torch's process-wide ``is_compiling()`` flag is set, and
    # transformers' own code in the other thread may branch on it (masks, caches): a block call
    # there can take the exact hook path. Every call is served, at least one thread's on graphs;
    # afterwards both kinds of call still equal PEFT.
    graph, eager = _calls(ia3)
    assert graph + eager == 4 and graph >= 2
    assert _captures(ia3) >= 1
    with torch.no_grad():
        for job in jobs:
            _assert_same(ia3(**job, use_cache=False), pm(**job, use_cache=False))


# --- 6. generate -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_generate_matches_peft(family):
    pm, ia3 = _pair(family)
    _set_mode(False, pm, ia3)
    inputs = token_inputs(family, seq=6)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        a = ia3.generate(**inputs, **kwargs)
        b = pm.generate(**inputs, **kwargs)
    assert a.shape == (2, 6 + 5)
    assert torch.equal(a, b)
    assert ((a >= 0) & (a < VOCAB)).all()


# --- 7. shared block graphs --------------------------------------------------------------------
def test_identical_blocks_share_one_capture():
    pm, ia3 = _pair("llama", num_hidden_layers=4)
    _set_mode(False, pm, ia3)
    assert len(ia3._runners) == 4 and len({r.group for r in ia3._runners.values()}) == 1
    inputs = token_inputs("llama", mask=True)
    with torch.no_grad():
        _assert_same(ia3(**inputs, use_cache=False), pm(**inputs, use_cache=False))
        assert len(ia3._block_cache) == 1 and _captures(ia3) == 1
        assert all((r.graph_calls, r.eager_calls) == (1, 0) for r in ia3._runners.values())
        # other sizes, same signature: the same (dynamic) graph
        other = token_inputs("llama", batch=3, seq=11, seed=5, mask=True)
        _assert_same(ia3(**other, use_cache=False), pm(**other, use_cache=False))
    assert _captures(ia3) == 1


# --- 8. adapters added and deleted after captures ----------------------------------------------
def test_adapters_added_and_deleted_after_a_capture_keep_the_graph_path():
    """A new adapter on other layers, both active, then deleted: every call runs block graphs
    (recaptured with the new set of layers) and equals PEFT doing the same."""
    pm, ia3 = _pair("llama")
    _set_mode(False, pm, ia3)
    x = token_inputs("llama", seed=5)
    with torch.no_grad():
        first = ia3(**x, use_cache=False).logits
        extra = {"target_modules": ["o_proj"], "feedforward_modules": [], "init_ia3_weights": False}
        ia3.add_adapter("o", ia3fx.IA3Config(**extra))
        pm.add_adapter("o", peft.IA3Config(**extra))
        peft.set_peft_model_state_dict(pm, ia3.adapter_state_dict("o"), adapter_name="o")
        ia3.set_adapter(["default", "o"])
        pm.base_model.set_adapter(["default", "o"])
        _assert_same(ia3(**x, use_cache=False), pm(**x, use_cache=False))
        ia3.set_adapter("default")
        pm.base_model.set_adapter("default")
        ia3.delete_adapter("o")
        pm.delete_adapter("o")
        after = ia3(**x, use_cache=False).logits
    assert torch.equal(after, first)
    assert _calls(ia3) == (6, 0)  # three calls, two blocks, all through graphs
