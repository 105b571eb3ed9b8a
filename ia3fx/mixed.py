"""Several adapters in one batch: each row of a call scaled by the vectors of its own adapter.

For (IA)³ a per-row choice is a gather plus the multiply that is already there: the vector of a
slot becomes a ``(rows, *shape)`` tensor (one row of a stacked table per batch row) and
:func:`broadcast_rows` lines it up with the activation it scales. Which rows take which vectors is
the *row choice* of the call (:class:`Rows`), set for its duration with :func:`choosing`: the
block graphs, the scale hooks (a KV cache, generation) and the whole-model graphs all read it, and
so do exported programs, where it is built from their ``adapter_index`` input.

Gradients reach each adapter's vectors from its own rows only: the gather is differentiable.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence

import torch

__all__ = ["BASE", "Rows", "RowMismatchError", "broadcast_rows", "choosing", "current_rows", "row_index"]

BASE = "__base__"  # a row without adapter (PEFT's LoRA convention)

_state = threading.local()


class RowMismatchError(ValueError):
    """An activation whose leading dim is not the batch (or a whole multiple of it): rows were
    mixed across the batch there, so per-row vectors cannot follow them."""


class Rows:
    """The row choice of one call: ``index`` (one int per row, into a table whose row 0 is the
    base) and ``value(layer, placement)``, the ``(rows, *shape)`` vectors of a slot (``None``:
    no row's adapter scales it). Values are computed once per slot and kept for the call."""

    def __init__(
        self,
        index: torch.Tensor,
        value: Callable[[str, str], torch.Tensor | None],
        ones: Callable[[str, str, torch.Size], torch.Tensor] | None = None,
    ) -> None:
        self.index = index
        self._value = value
        self._ones = ones
        self._kept: dict[tuple[str, str], torch.Tensor | None] = {}

    @property
    def batch(self) -> int:
        return self.index.shape[0]

    def value(self, layer: str, placement: str) -> torch.Tensor | None:
        key = (layer, placement)
        if key not in self._kept:
            self._kept[key] = self._value(layer, placement)
        return self._kept[key]

    def compute(self, layer: str, placement: str) -> torch.Tensor | None:
        """``value`` computed afresh: a checkpointed block recomputes the same ops as its forward."""
        return self._value(layer, placement)

    def ones(self, layer: str, placement: str, shape: torch.Size) -> torch.Tensor:
        """The vector of ones for a slot no row's adapter scales (on the vectors' device)."""
        return self._ones(layer, placement, shape) if self._ones is not None else torch.ones(shape)


def current_rows() -> Rows | None:
    """The row choice of the call running in this thread, if it has one."""
    return getattr(_state, "rows", None)


@contextlib.contextmanager
def choosing(rows: Rows | None) -> Iterator[None]:
    """Run the block with ``rows`` as this thread's row choice (``None``: every row alike)."""
    before = getattr(_state, "rows", None)
    _state.rows = rows
    try:
        yield
    finally:
        _state.rows = before


def row_index(names: Sequence[str], known: Sequence[str], batch: int | None) -> tuple[list[str], torch.Tensor]:
    """The adapters a batch uses (in order of first use) and each row's index into ``[base, *used]``.

    Raises ``ValueError`` for a name that is not an adapter or ``BASE`` (listing the adapters), and
    for a number of names that is not the batch size.
    """
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"adapter_names must be a list with one adapter name per row, got {type(names).__name__}")
    names = list(names)
    unknown = sorted({n for n in names if n != BASE and n not in known}, key=str)
    if unknown:
        raise ValueError(f"unknown adapter name(s) {unknown} in adapter_names; adapters: {list(known)} (or {BASE!r} for no adapter)")
    if batch is not None and len(names) != batch:
        raise ValueError(f"adapter_names has {len(names)} names for a batch of {batch} rows: give one name per row")
    if not names:
        raise ValueError("adapter_names is empty: give one name per row")
    used = list(dict.fromkeys(n for n in names if n != BASE))
    position = {n: i + 1 for i, n in enumerate(used)}
    index = torch.tensor([position.get(n, 0) for n in names], dtype=torch.long)
    return used, index


def stacked_rows(vectors: Sequence[torch.Tensor | None], index: torch.Tensor) -> torch.Tensor | None:
    """``[ones, *vectors][index]``: each row's vector, a missing one counting as ones."""
    template = next((v for v in vectors if v is not None), None)
    if template is None:
        return None
    ones = torch.ones_like(template, requires_grad=False)
    table = torch.stack([ones, *(ones if v is None else v for v in vectors)])
    return table.index_select(0, index.to(table.device))


def broadcast_rows(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``v`` (``(rows, *shape)``) shaped to multiply ``x`` row by row.

    ``x``'s leading dim is the batch (``(rows, T, n)``, ``(rows, C, H, W)``), or the batch times
    the rest when the layer runs on flattened rows (GPT-2's ``Conv1D`` on ``(rows * T, n)``, a
    beam search's ``rows * beams``): each vector is repeated over its row's positions. One formula
    serves both (no branch on sizes), so an exported graph stays valid for every size.
    """
    rows, shape = v.shape[0], tuple(v.shape[1:])
    lead = x.shape[0]
    spare = x.dim() - 1 - len(shape)
    if isinstance(lead, int) and isinstance(rows, int):  # eager: check what a graph cannot
        if spare < 0 or lead % rows:
            raise RowMismatchError(
                f"a scaled activation of shape {tuple(x.shape)} does not have the batch ({rows} rows) as its leading "
                "dim: this layer mixes rows across the batch, so per-row adapters (adapter_names) cannot follow "
                "them. Run one adapter per call for this model"
            )
        if lead == rows:
            return v.reshape(rows, *([1] * spare), *shape)
    per_row = lead // rows
    v = v.unsqueeze(1).expand(rows, per_row, *shape).reshape(lead, *shape)
    return v.reshape(lead, *([1] * spare), *shape)
