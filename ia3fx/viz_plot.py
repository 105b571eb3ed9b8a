"""What training learned, as a picture: ``ia3fx.report(ia3).plot("movement.png")``.

(IA)³ vectors start at ones. How far each one moved (``|v - 1|``: its mean over the vector, and the
spread of ``|v - 1|`` across the vector's entries) shows which layers an adapter uses. The figure
has one panel per site kind (``self_attn.k_proj``, ``mlp.down_proj``: a layer's path inside its
block), blocks along the x axis, and one bar per adapter, side by side, so adapters compare at a
glance. :func:`movement_table` is the same data without matplotlib (what the figure draws).

matplotlib is an optional extra: ``pip install 'ia3fx[plot]'``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .analysis import block_of

__all__ = ["MovementTable", "movement_table", "plot_report"]


@dataclass
class MovementTable:
    """Per site kind, per adapter: one ``(mean |v - 1|, spread)`` per block (``None`` where it has no such layer)."""

    adapters: list[str]
    blocks: list[str]
    kinds: list[str]
    mean: dict[str, dict[str, list[float | None]]]  # kind -> adapter -> per block
    spread: dict[str, dict[str, list[float | None]]]

    def to_dict(self) -> dict[str, Any]:
        return {"adapters": self.adapters, "blocks": self.blocks, "kinds": self.kinds, "mean": self.mean,
                "spread": self.spread}


def _kind(layer: str, block: str) -> str:
    return layer[len(block) + 1:] if layer.startswith(block + ".") else layer


def movement_table(report: Any, adapters: Sequence[str] | None = None) -> MovementTable:
    """The numbers :func:`plot_report` draws, from ``report.vectors`` (adapter -> layer -> statistics)."""
    vectors = report.vectors
    if not vectors:
        raise ValueError(
            "this report holds no vector values to plot: make it from an IA3Model with its adapter(s) loaded "
            "(ia3fx.report(ia3), or ia3fx report MODEL --adapter DIR --plot out.png), not from a config alone"
        )
    names = list(vectors) if adapters is None else list(adapters)
    unknown = [a for a in names if a not in vectors]
    if unknown:
        raise ValueError(f"adapter {unknown[0]!r} is not in this report; it has {', '.join(vectors)}")
    blocks: list[str] = []
    kinds: list[str] = []
    for a in names:
        for layer in vectors[a]:
            b = block_of(layer)
            if b not in blocks:
                blocks.append(b)
            k = _kind(layer, b)
            if k not in kinds:
                kinds.append(k)
    col = {b: i for i, b in enumerate(blocks)}
    mean = {k: {a: [None] * len(blocks) for a in names} for k in kinds}
    spread = {k: {a: [None] * len(blocks) for a in names} for k in kinds}
    for a in names:
        for layer, stats in vectors[a].items():
            if stats is None:
                continue
            b = block_of(layer)
            k = _kind(layer, b)
            mean[k][a][col[b]] = stats["mean_abs_dev"]
            spread[k][a][col[b]] = stats["std_abs_dev"]
    return MovementTable(names, blocks, kinds, mean, spread)


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(
            "plotting needs matplotlib, an optional extra: pip install 'ia3fx[plot]' (or pip install matplotlib); "
            "the text report (str(report)) needs nothing more"
        ) from e
    return plt


def plot_report(report: Any, path: str | os.PathLike | None = None, adapters: Sequence[str] | None = None) -> Any:
    """Draw how far each adapter's vectors moved from ones; write ``path`` (``.png``, ``.svg``, ``.pdf``) if given.

    Returns the matplotlib ``Figure``.
    """
    if path is not None:
        suffix = os.path.splitext(os.fspath(path))[1].lower()
        if suffix not in (".png", ".svg", ".pdf"):
            raise ValueError(f"cannot tell the format from {os.fspath(path)!r}: use .png, .svg or .pdf")
    table = movement_table(report, adapters)
    plt = _pyplot()
    n, width = len(table.adapters), 0.8 / len(table.adapters)
    short = [b.rpartition(".")[2] if b.rpartition(".")[2].isdigit() else b for b in table.blocks]
    fig, axes = plt.subplots(len(table.kinds), 1, figsize=(max(6.0, 0.28 * len(table.blocks) * n + 2), 1.9 * len(table.kinds) + 0.9),
                             squeeze=False, sharex=True)
    for row, kind in enumerate(table.kinds):
        ax = axes[row][0]
        for i, a in enumerate(table.adapters):
            xs = [j + (i - (n - 1) / 2) * width for j, v in enumerate(table.mean[kind][a]) if v is not None]
            ys = [v for v in table.mean[kind][a] if v is not None]
            err = [v for v in table.spread[kind][a] if v is not None]
            ax.bar(xs, ys, width * 0.95, yerr=err, capsize=2, label=a, error_kw={"elinewidth": 0.8})
        ax.set_ylabel("mean |v−1|")
        ax.set_title(kind, loc="left", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[-1][0].set_xticks(range(len(table.blocks)))
    axes[-1][0].set_xticklabels(short, rotation=90 if len(short) > 16 else 0, fontsize=8)
    axes[-1][0].set_xlabel("block" + (f" ({table.blocks[0].rpartition('.')[0]}.N)" if short != table.blocks else ""))
    if n > 1:
        axes[0][0].legend(fontsize=8, ncols=min(n, 4))
    fig.suptitle(f"{report.model}: distance from ones, mean |v−1| (whiskers: spread)", fontsize=10)
    fig.tight_layout()
    if path is not None:
        from .viz import _write_file

        buf = io.BytesIO()
        fig.savefig(buf, format=os.path.splitext(os.fspath(path))[1].lower()[1:], dpi=90)
        _write_file(os.fspath(path), buf.getvalue())
    return fig
