"""Saving figures and exporting a result's table."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any


from ..errors import PlotArgumentError
from ..result import AnalysisResult
from ._common import SAVE_FORMATS, _figure_of

if TYPE_CHECKING:  # pragma: no cover
    pass


def save(fig_or_ax: Any, path: str | Path, dpi: int = 150) -> Path:
    """Write the figure of ``fig_or_ax`` (a Figure, an Axes, or an array of Axes) to ``path``;
    the format comes from the suffix: ``.png``, ``.svg`` or ``.pdf``. Parent folders are
    created.

    Raises:
        ValueError: another suffix.
        TypeError: not a matplotlib Figure or Axes.
    """
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in SAVE_FORMATS:
        raise PlotArgumentError(f"{path}: cannot save as {path.suffix or 'no suffix'!r}; "
                         f"use one of {', '.join('.' + f for f in SAVE_FORMATS)}")
    fig = _figure_of(fig_or_ax)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=fmt, dpi=dpi, bbox_inches="tight")
    return path


def export_csv(result: AnalysisResult, path: str | Path) -> Path:
    """The data behind every figure: the result's tidy table, one row per (family, pair),
    with ``model``, ``method`` and ``pairs`` columns so the file says what it holds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df = result.df.copy()
    for key in ("model", "method", "pairs"):
        df[key] = result.meta.get(key)
    df.to_csv(path, index=False)
    return path

