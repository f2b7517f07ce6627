"""Saving figures and exporting a result's table."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any


from ..errors import PlotArgumentError
from ..result import AnalysisResult
from ._common import SAVE_FORMATS, _check_result, _figure_of, check_dpi

if TYPE_CHECKING:  # pragma: no cover
    pass


def save(fig_or_ax: Any, path: str | Path, dpi: int = 150) -> Path:
    """Write the figure of ``fig_or_ax`` (a Figure, an Axes, or an array of Axes) to ``path``;
    the format comes from the suffix: ``.png``, ``.svg`` or ``.pdf``. Parent folders are
    created.

    Raises:
        ValueError: another suffix, a dpi that is not a positive number.
        TypeError: not a matplotlib Figure or Axes.
        OutputError: the file cannot be written there (named, in one line).
    """
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in SAVE_FORMATS:
        raise PlotArgumentError(f"{path}: cannot save as {path.suffix or 'no suffix'!r}; "
                         f"use one of {', '.join('.' + f for f in SAVE_FORMATS)}")
    check_dpi(dpi, figure=True)
    fig = _figure_of(fig_or_ax)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format=fmt, dpi=dpi, bbox_inches="tight")
    except OSError as e:  # a folder in its place, a file where a folder should be, no permission
        from ..output import OutputError

        raise OutputError(f"cannot save the figure to {path}: {e.strerror or e}") from None
    return path


def export_csv(result: AnalysisResult, path: str | Path, force: bool = False) -> Path:
    """The data behind every figure: the result's tidy table, one row per (family, pair),
    with ``model``, ``method`` and ``pairs`` columns so the file says what it holds. Parent
    folders are created; written atomically. Refused (an :class:`~drift.output.OutputError`):
    a folder, a device or pipe, and unless ``force=True``, an existing file that is not a
    table drift exported or a path inside a model's folder."""
    from ..output import check_result_output, is_drift_csv, write_atomic

    _check_result(result, "export_csv")
    p = check_result_output(path, result.meta, force, "export_csv:", ours=is_drift_csv,
                            what="a table drift exported", make_folder=True)
    df = result.df.copy()
    for key in ("model", "method", "pairs"):
        df[key] = result.meta.get(key)
    return write_atomic(p, df.to_csv(index=False))

