"""The per-row pieces on their own: ``broadcast_rows``, ``stacked_rows``, ``row_index`` and the
``scale_per_row`` pass (a copy of the graph; the source is left as it was)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ia3fx
from ia3fx.mixed import BASE, RowMismatchError, Rows, broadcast_rows, choosing, row_index, stacked_rows
from ia3fx.passes.per_row import ROWS_ATTR, scale_per_row


def test_broadcast_rows_lines_up_with_batch_first_and_flattened_rows():
    v = torch.arange(6.0).reshape(2, 3)  # 2 rows, vectors of 3
    x = torch.ones(2, 5, 3)  # (batch, T, n)
    assert torch.equal(x * broadcast_rows(v, x), v[:, None, :].expand(2, 5, 3))
    flat = torch.ones(10, 3)  # GPT-2's Conv1D: (batch * T, n), batch outermost
    assert torch.equal(flat * broadcast_rows(v, flat), v.repeat_interleave(5, dim=0))
    conv = torch.ones(2, 3, 4, 4)  # (batch, C, H, W) with conv vectors (C, 1, 1)
    got = conv * broadcast_rows(v.reshape(2, 3, 1, 1), conv)
    assert torch.equal(got[1, 2], torch.full((4, 4), 5.0))


def test_broadcast_rows_refuses_a_leading_dim_that_is_no_multiple_of_the_batch():
    with pytest.raises(RowMismatchError, match=r"shape \(3, 4\) does not have the batch \(2 rows\)"):
        broadcast_rows(torch.ones(2, 4), torch.ones(3, 4))


def test_stacked_rows_and_row_index():
    a, b = torch.tensor([2.0, 2.0]), torch.tensor([3.0, 3.0])
    used, index = row_index(["b", BASE, "a", "b"], ["a", "b", "c"], 4)
    assert used == ["b", "a"] and index.tolist() == [1, 0, 2, 1]
    rows = stacked_rows([b, a], index)
    assert rows.tolist() == [[3.0, 3.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]
    assert stacked_rows([None, b], index)[0].tolist() == [1.0, 1.0]  # an adapter without the site: ones
    assert stacked_rows([None, None], index) is None


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class Fixed(nn.Module):
    """What the live model's rows module does, with fixed per-row values."""

    def __init__(self, values: dict) -> None:
        super().__init__()
        self.values = values

    def forward(self, layer: str, placement: str) -> torch.Tensor:
        return self.values[(layer, placement)]


def test_scale_per_row_copies_the_graph_and_reads_one_vector_per_row():
    torch.manual_seed(0)
    ia3 = ia3fx.get_ia3_model(Mlp().eval(), ia3fx.IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"]),
                              example_inputs=(torch.randn(3, 4),))
    gm = ia3.graph_module
    code_before = gm.code
    v1 = torch.stack([torch.full((8,), 2.0), torch.full((8,), 0.5)])  # row 0, row 1
    v2 = torch.stack([torch.ones(8), torch.full((8,), 3.0)])
    copy, record = scale_per_row(gm, Fixed({("fc1", "output"): v1, ("fc2", "input"): v2}))
    assert len(record.scales) == 2 and sorted(record.reads) == [("fc1", "output"), ("fc2", "input")]
    assert gm.code == code_before and not hasattr(gm, ROWS_ATTR)  # the source graph is untouched
    x = torch.randn(2, 4)
    with choosing(Rows(torch.tensor([0, 1]), lambda *a: None)), torch.no_grad():
        got = copy(x)
    base = ia3.model
    with torch.no_grad():
        want = torch.stack([base.fc2(torch.relu(base.fc1(x[i]) * v1[i]) * v2[i]) for i in range(2)])
    assert torch.allclose(got, want, atol=1e-6)
    assert copy.fc1.weight is base.fc1.weight  # the copy shares the parameters
