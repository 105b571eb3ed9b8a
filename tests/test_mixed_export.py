"""Programs that serve several adapters: ``ia3fx.export(..., adapters=[...])`` and their table rows.

onnxruntime and ``torch.export.load`` runs equal the eager model's per-row results
(``adapter_names``); ``swap_adapter`` replaces and adds table rows; the decode loops take
``adapter_index``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import snapshot
from test_mixed_batch import NAMES, _adapted, _assert_close, _inputs

import ia3fx
from ia3fx.decode import greedy_onnx, greedy_pt2
from ia3fx.mixed import BASE
from ia3fx.swap import read_manifest

INDEX = {BASE: 0, "a": 1, "b": 2}  # the table order of adapters=["a", "b"]


def _index(names: list[str], order: dict[str, int] = INDEX) -> torch.Tensor:
    return torch.tensor([order[n] for n in names])


def _eager(ia3, inputs: dict, names: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return ia3(**inputs, adapter_names=names).logits


def _run_onnx(path: str, inputs: dict, index: torch.Tensor) -> torch.Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [*inputs, "adapter_index"]
    feeds = {k: v.numpy() for k, v in inputs.items()}
    return torch.from_numpy(session.run(None, {**feeds, "adapter_index": index.numpy()})[0])


def _run_pt2(path: str, inputs: dict, index: torch.Tensor) -> torch.Tensor:
    return torch.export.load(path).module()(**inputs, adapter_index=index).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_a_table_program_equals_the_eager_rows(tmp_path, family, fmt):
    ia3 = _adapted(family, active="c")
    path = ia3fx.export(ia3, tmp_path / f"m.{fmt}", fmt, adapters=["a", "b"])
    manifest = read_manifest(path)
    assert manifest["adapters"] == ["a", "b"] and manifest["table"] and not manifest["merged"]
    assert all(entry["rows"] == 3 for entry in manifest["vectors"].values())
    # other sizes than the export's: batch and sequence stay dynamic
    inputs = {"input_ids": _inputs(family)["input_ids"][:, :6]}
    run = _run_pt2 if fmt == "pt2" else _run_onnx
    got = run(path, inputs, _index(NAMES))
    _assert_close(got, _eager(ia3, {**inputs, "use_cache": False}, NAMES), f"{family} {fmt}")
    names = ["a", "a", BASE]
    _assert_close(run(path, {"input_ids": inputs["input_ids"][:3]}, _index(names)),
                  _eager(ia3, {"input_ids": inputs["input_ids"][:3], "use_cache": False}, names), "3 rows")


def test_the_table_holds_k_plus_one_rows_per_site(tmp_path):
    ia3 = _adapted("llama")
    path = ia3fx.export(ia3, tmp_path / "m.pt2", "pt2", adapters=["b", "a"])
    state = torch.export.load(path).state_dict
    tables = {k: v for k, v in state.items() if k.startswith("base.ia3.")}
    # a's sites (k, v, down) and b's (q, up): 5 per layer, 2 layers
    assert len(tables) == 10 and all(t.shape[0] == 3 for t in tables.values())
    k_proj = tables["base.ia3.model.layers.0.self_attn.k_proj.output"]
    assert torch.equal(k_proj[0], torch.ones_like(k_proj[0]))  # base
    assert torch.equal(k_proj[1], torch.ones_like(k_proj[1]))  # b does not scale k_proj
    assert torch.equal(k_proj[2], ia3.get_vector("model.layers.0.self_attn.k_proj", "a").detach())


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_a_generation_program_serves_each_prompt_its_adapter(tmp_path, fmt):
    ia3 = _adapted("llama", active="c")
    prompts = _inputs("llama", batch=3)["input_ids"]
    names = ["b", BASE, "a"]
    path = ia3fx.export(ia3, tmp_path / f"g.{fmt}", fmt, adapters=["a", "b"], for_generation=True,
                        batch_size=3, max_cache_len=32)
    want = ia3.generate(prompts, adapter_names=names, max_new_tokens=6, do_sample=False)
    decode = greedy_pt2 if fmt == "pt2" else greedy_onnx
    assert torch.equal(decode(path, prompts, 6, adapter_index=_index(names)), want)
    assert not torch.equal(decode(path, prompts, 6, adapter_index=_index(["a", BASE, "b"])), want)
    with pytest.raises(ValueError, match="pass adapter_index"):
        decode(path, prompts, 6)
    with pytest.raises(ValueError, match="2 entries for 3 prompts"):
        decode(path, prompts, 6, adapter_index=[1, 2])


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_swap_adapter_replaces_and_adds_table_rows(tmp_path, fmt):
    ia3 = _adapted("llama")
    path = ia3fx.export(ia3, tmp_path / f"m.{fmt}", fmt, adapters=["a", "b"])
    ia3.save_pretrained(tmp_path / "saved", selected_adapters=["b", "c"])
    ia3.add_adapter("d", ia3fx.IA3Config(target_modules=["k_proj"], feedforward_modules=[]))  # one site of the table
    with torch.no_grad():
        for p in ia3.ia3_l["d"].parameters():
            p.uniform_(0.2, 1.8)
    ia3.save_pretrained(tmp_path / "saved_d", selected_adapters=["d"])
    before = snapshot(tmp_path)
    added = ia3fx.swap_adapter(path, tmp_path / "saved_d" / "d", tmp_path / f"added.{fmt}", adapter_name="d")
    assert read_manifest(added)["adapters"] == ["a", "b", "d"]
    replaced = ia3fx.swap_adapter(added, tmp_path / "saved" / "c", tmp_path / f"replaced.{fmt}", adapter_name="b")
    assert read_manifest(replaced)["adapters"] == ["a", "b", "d"]  # row "b" now holds c's vectors
    assert all(before[k] == v for k, v in snapshot(tmp_path).items() if k in before)  # sources untouched
    inputs = {"input_ids": _inputs("llama")["input_ids"]}
    run = _run_pt2 if fmt == "pt2" else _run_onnx
    order = {BASE: 0, "a": 1, "c": 2, "d": 3}
    names = ["d", "c", BASE, "a", "d"]
    _assert_close(run(replaced, inputs, _index(names, order)), _eager(ia3, {**inputs, "use_cache": False}, names), fmt)


def test_swap_adapter_needs_a_row_name_for_a_table(tmp_path):
    ia3 = _adapted("llama")
    path = ia3fx.export(ia3, tmp_path / "m.pt2", "pt2", adapters=["a", "b"])
    ia3.save_pretrained(tmp_path / "saved", selected_adapters=["b"])
    with pytest.raises(ValueError, match=r"holds a table of adapters \['a', 'b'\]: pass adapter_name"):
        ia3fx.swap_adapter(path, tmp_path / "saved" / "b", tmp_path / "out.pt2")
    with pytest.raises(ValueError, match="'__base__', row 0, stays the base model"):
        ia3fx.swap_adapter(path, tmp_path / "saved" / "b", tmp_path / "out.pt2", adapter_name=BASE)
    ia3.add_adapter("o", ia3fx.IA3Config(target_modules=["o_proj"], feedforward_modules=[]))
    ia3.save_pretrained(tmp_path / "saved_o", selected_adapters=["o"])
    with pytest.raises(ia3fx.AdapterLoadError, match="o_proj.ia3_l' .a vector the program does not have"):
        ia3fx.swap_adapter(path, tmp_path / "saved_o" / "o", tmp_path / "out.pt2", adapter_name="o")
    single = ia3fx.export(ia3, tmp_path / "g.pt2", "pt2", merged=False, for_generation=True, max_cache_len=16)
    with pytest.raises(ValueError, match="holds one adapter, not a table: drop adapter_name"):
        ia3fx.swap_adapter(single, tmp_path / "saved" / "b", tmp_path / "out.pt2", adapter_name="b")
    assert not (tmp_path / "out.pt2").exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"adapters": ["a", "zz"]}, r"unknown adapter\(s\) \['zz'\]"),
        ({"adapters": ["a", "a"]}, "lists a name twice"),
        ({"adapters": [BASE, "a"]}, "row 0 of every table"),
        ({"adapters": []}, "non-empty list"),
        ({"adapters": ["a"], "merged": True}, "cannot be merged"),
        ({"adapters": ["a"], "format": "transformers"}, "pt2 or onnx"),
    ],
)
def test_bad_table_exports_are_refused_before_anything_is_written(tmp_path, kwargs, match):
    ia3 = _adapted("llama")
    kwargs = {"format": "pt2", **kwargs}
    with pytest.raises(ValueError, match=match):
        ia3fx.export(ia3, tmp_path / "m.out", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_a_merged_model_cannot_export_a_table(tmp_path):
    ia3 = _adapted("llama")
    ia3.merge_adapter()
    with pytest.raises(ValueError, match=r"merged into the weights: unmerge_adapter\(\)"):
        ia3fx.export(ia3, tmp_path / "m.pt2", "pt2", adapters=["a", "b"])


def test_the_exported_index_is_a_plain_int64_input(tmp_path):
    import onnx

    ia3 = _adapted("gpt2")
    path = ia3fx.export(ia3, tmp_path / "m.onnx", "onnx", adapters=["a"])
    model = onnx.load(path)
    index = next(i for i in model.graph.input if i.name == "adapter_index")
    assert index.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert index.type.tensor_type.shape.dim[0].dim_param == "batch"
    held = {init.name for init in model.graph.initializer}
    assert set(read_manifest(path)["vectors"]) <= held


def test_cli_exports_a_table_and_swaps_a_row(tmp_path, capsys):
    from ia3fx.cli import load_model, main

    ia3 = ia3fx.get_ia3_model(load_model("tiny-llama"), ia3fx.IA3Config(), adapter_name="x")
    ia3.add_adapter("y", ia3fx.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    ia3.add_adapter("z", ia3fx.IA3Config())
    with torch.no_grad():
        for p in ia3.ia3_l.parameters():
            p.uniform_(0.3, 1.7)
    ia3.save_pretrained(tmp_path / "saved", selected_adapters=["x", "y", "z"])
    out = tmp_path / "table.pt2"
    assert main(["export", "tiny-llama", "--adapters", f"x={tmp_path / 'saved' / 'x'}", str(tmp_path / "saved" / "y"),
                 "--out", str(out)]) == 0
    assert "a table of 2 adapters (adapter_index 1..2: x, y; 0: base)" in capsys.readouterr().out
    assert main(["swap-adapter", str(out), str(tmp_path / "saved" / "z"), "--out", str(tmp_path / "more.pt2"),
                 "--adapter-name", "z"]) == 0
    assert "as table row 3 ('z'; adapters ['x', 'y', 'z'])" in capsys.readouterr().out
    ids = torch.randint(1, 100, (4, 5))
    names = ["z", "x", BASE, "y"]
    got = _run_pt2(str(tmp_path / "more.pt2"), {"input_ids": ids}, _index(names, {BASE: 0, "x": 1, "y": 2, "z": 3}))
    _assert_close(got, _eager(ia3.eval(), {"input_ids": ids, "use_cache": False}, names), "cli table")
