"""Saving figures and exporting a result's table."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any


from ..errors import PlotArgumentError
from ..result import AnalysisResult
from ._common import SAVE_FORMATS, _check_result, _figure_of

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
    if isinstance(dpi, bool) or not isinstance(dpi, (int, float)) or not dpi > 0:
        raise PlotArgumentError(f"dpi must be a positive number, not {dpi!r}")
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
    inside the model's folder, a folder, a device or pipe, or an existing file that is not a
    table drift exported (``force=True`` replaces that)."""
    from ..output import OutputError, check_output, is_drift_csv, model_folder_of, write_atomic

    _check_result(result, "export_csv")
    folder = model_folder_of(result.meta)
    try:
        p = Path(path).expanduser()
        inside = folder is not None and (p.resolve() == folder or folder.resolve() in p.resolve().parents)
        if not inside:
            p.parent.mkdir(parents=True, exist_ok=True)
    except (OSError, RuntimeError) as e:
        raise OutputError(f"export_csv: cannot make the folder of {path} ({getattr(e, 'strerror', None) or e})") from None
    p = check_output(p, folder, force, label="export_csv:", force_hint="pass force=True to replace it",
                     ours=is_drift_csv, what="a table drift exported")
    df = result.df.copy()
    for key in ("model", "method", "pairs"):
        df[key] = result.meta.get(key)
    return write_atomic(p, df.to_csv(index=False))

