"""``torch.compile(ia3)``, as a PEFT user compiles a PEFT model: equal to PEFT, and never stale.

The risk under a compiler is the silent one: a compiled program that keeps reading the adapter it
was compiled with (after ``set_adapter``, ``disable_adapter``, a merge, an optimizer step, or an
in-place edit of a vector) returns plausible logits. Each test here changes the state and checks
the compiled model against the eager one and against a change it must show.
"""

from __future__ import annotations

import pytest
import torch
from conftest import logits, move_vectors, peft_and_ia3, tiny_gpt2, tiny_llama

import ia3fx

IDS = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(0))


def _two_adapters():
    """The tiny Llama with adapters "a" (active) and "b", each vector moved from ones (both adapters:
    ``move_vectors`` moves the trainable ones, and an added adapter is frozen until set active)."""
    ia3 = ia3fx.get_ia3_model(tiny_llama(use_cache=False), ia3fx.IA3Config(), adapter_name="a")
    ia3.add_adapter("b", ia3fx.IA3Config())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ia3.ia3_l.parameters():
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return ia3


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.fixture(autouse=True)
def _fresh_compiler():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("family", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_compiled_model_equals_peft(family):
    peft_model, ia3 = peft_and_ia3(family(), {})
    compiled = torch.compile(ia3)
    with torch.no_grad():
        got = logits(compiled(input_ids=IDS))
        want = logits(peft_model(input_ids=IDS))
        with peft_model.disable_adapter():
            base = logits(peft_model(input_ids=IDS))
    assert not _close(base, want)  # the adapter does something to compare
    assert _close(got, want)


def test_compiled_model_follows_adapter_switches_merges_and_edits():
    ia3 = _two_adapters()
    compiled = torch.compile(ia3)

    def both():
        with torch.no_grad():
            got, want = logits(compiled(input_ids=IDS)), logits(ia3(input_ids=IDS))
        assert _close(got, want)
        return got

    a = both()
    ia3.set_adapter("b")
    b = both()
    assert not _close(b, a)
    with ia3.disable_adapter():
        off = both()
    assert not _close(off, a) and not _close(off, b)
    ia3.set_adapter("a")
    assert _close(both(), a)
    with torch.no_grad():
        ia3.get_vector("model.layers.0.self_attn.k_proj").mul_(2.0)  # in place, as an optimizer does
    edited = both()
    assert not _close(edited, a)
    ia3.merge_adapter()
    assert _close(both(), edited)
    ia3.unmerge_adapter()
    assert _close(both(), edited)


def test_compiled_training_gives_eager_gradients_and_steps_are_seen():
    ia3 = move_vectors(ia3fx.get_ia3_model(tiny_llama(use_cache=False), ia3fx.IA3Config()), 0.3)
    ia3.train()
    compiled = torch.compile(ia3)
    trainable = [p for p in ia3.parameters() if p.requires_grad]
    compiled(input_ids=IDS, labels=IDS).loss.backward()
    got = [p.grad.clone() for p in trainable]
    ia3.zero_grad()
    ia3(input_ids=IDS, labels=IDS).loss.backward()
    assert len(trainable) == 6 and all(g.abs().sum() > 0 for g in got)
    assert all(_close(g, p.grad) for g, p in zip(got, trainable))
    before = compiled(input_ids=IDS, labels=IDS).loss.item()
    torch.optim.SGD(trainable, lr=1.0).step()
    ia3.zero_grad()
    after = compiled(input_ids=IDS, labels=IDS).loss.item()
    assert after != before
    assert after == pytest.approx(ia3(input_ids=IDS, labels=IDS).loss.item(), rel=1e-5)


def test_compiled_mixed_batch_rows_equal_each_adapter_alone():
    ia3 = _two_adapters()
    # what could go wrong here is Dynamo's capture of the row choice, the same under every backend:
    # aot_eager (no code generation) halves this test's time
    compiled = torch.compile(ia3, backend="aot_eager")
    with torch.no_grad():
        for names in (["a", "b", "__base__"], ["b", "b", "a"]):  # the second: new names, same program
            got = logits(compiled(input_ids=IDS, adapter_names=names))
            for row, name in enumerate(names):
                if name == "__base__":
                    with ia3.disable_adapter():
                        want = logits(ia3(input_ids=IDS[row:row + 1]))
                else:
                    ia3.set_adapter(name)
                    want = logits(ia3(input_ids=IDS[row:row + 1]))
                assert _close(got[row:row + 1], want), (names, row)
