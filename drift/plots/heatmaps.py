"""Layer × layer heatmaps of one family, and small multiples of them.

Of a cross-model result (``analyze(model, other=...)``) the rows are layers of the model and
the columns layers of the other model, each axis labelled with its model's name, and the
diagonal is a measurement like any other cell.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd

from ..errors import PlotArgumentError
from ..result import AnalysisResult
from ._common import (_check_result, _check_value, _cmap, _color_limits, _families, _invariant, _layer_labels,
                      _new_axes, _null_top, _title, _wrap, direction, space, value_label, value_short)

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _draw_heatmap(ax: "Axes", m: pd.DataFrame, vmin: float, vmax: float, cmap: str,
                  annot: bool, block: tuple[int, int] | None, cross: bool = False,
                  labels: tuple[str, str] = ("layer", "layer")):
    """Draw matrix ``m`` (layers x layers; ``cross``: layers of A (rows) x layers of B) on
    ``ax``, rows labelled ``labels[0]``, columns ``labels[1]``; return the image (for a colour bar)."""
    import matplotlib
    import matplotlib.colors as mcolors
    from matplotlib.patches import Rectangle

    layers, cols = list(m.index), list(m.columns)
    n, k = len(layers), len(cols)
    data = m.to_numpy(dtype=float).copy()
    if not cross:
        np.fill_diagonal(data, np.nan)  # a layer against itself is 0 by definition, not a measurement
    cm = matplotlib.colormaps[cmap].with_extremes(bad="#eeeeee")
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cm, vmin=vmin, vmax=vmax,
                   interpolation="nearest", aspect="equal")
    ax.set_xticks(range(k), [str(L) for L in cols])
    ax.set_yticks(range(n), [str(L) for L in layers])
    for labs, size in ((ax.get_xticklabels(), k), (ax.get_yticklabels(), n)):
        step = max(1, math.ceil(size / 12))  # at most ~12 tick labels per axis
        for i, lab in enumerate(labs):
            lab.set_visible(i % step == 0)
    ax.set_xlabel(labels[1])
    ax.set_ylabel(labels[0])
    if annot:
        norm = mcolors.Normalize(vmin, vmax)
        for i in range(n):
            for j in range(k):
                v = data[i, j]
                if np.isfinite(v):
                    r, g, b, _ = cm(norm(v))
                    dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
    if block is not None:
        lo, hi = block
        rows = [i for i, L in enumerate(layers) if lo <= L <= hi]
        inside = [j for j, L in enumerate(cols) if lo <= L <= hi]
        if not rows or not inside:
            raise PlotArgumentError(f"block {block} contains none of the result's layers {layers}")
        ax.add_patch(Rectangle((inside[0] - 0.5, rows[0] - 0.5), inside[-1] - inside[0] + 1,
                               rows[-1] - rows[0] + 1, fill=False,
                               edgecolor="crimson", linewidth=2.0, label=f"block {lo}–{hi}"))
    return im


def heatmap(result: AnalysisResult, family: str, value: str = "rho", ax: "Axes | None" = None,
            block: tuple[int, int] | None = None, cmap: str | None = None,
            annot: bool | None = None, colorbar: bool = True) -> "Axes":
    """Layer x layer matrix of ``value`` for one ``family``.

    Cells that were not computed (e.g. non-neighbours under ``pairs="consecutive"``) and the
    diagonal (a layer against itself) are grey. Of a cross-model result: layers of the model
    (rows) x layers of the other model (columns), axes named after the two models, the
    diagonal drawn like every other cell. The colour bar is labelled with what it
    shows and starts at 0; its top is "as different as unrelated" (ρ = 1, or for residuals
    the family's largest null), so that colour means the same verdict in every heatmap.
    An activation measure is labelled as a distance or a similarity; a similarity's scale
    runs from 0 to 1 (alike).

    Args:
        result: the analysis.
        family: one of ``result.families``.
        value: ``"rho"`` | ``"residual"`` | ``"null"``.
        ax: where to draw; a new figure when None.
        block: ``(first, last)`` layer (inclusive) to outline.
        cmap: the colour map; default viridis, dark = alike (reversed for a similarity).
        annot: write each value in its cell; default when at most 12 layers.
        colorbar: add a labelled colour bar.

    Returns:
        The Axes.

    Raises:
        TypeError: ``result`` is not a result.
        ValueError: unknown ``value`` or ``family``, or a ``block`` outside the result's layers.
    """
    _check_result(result, "heatmap")
    _check_value(value, result)
    _families(result, [family])
    sim = direction(result, family) == "similarity"
    m = result.matrix(family, value)
    vmin, vmax = _color_limits(value, m.to_numpy(dtype=float), _null_top(result, [family]), sim)
    ax = _new_axes(ax, (4.6, 3.8))
    im = _draw_heatmap(ax, m, vmin, vmax, _cmap(cmap, sim), max(m.shape) <= 12 if annot is None else annot,
                       block, result.cross_model, _layer_labels(result))
    star = "" if _invariant(result, family) else " *"
    between = "between the models' layers" if result.cross_model else "between layers"
    ax.set_title(_title(f"{family}{star}: {value_short(value, result, family)} {between}", result), fontsize=10)
    if star:
        ax.text(0.0, -0.22, "* not gauge-invariant: compare with care", transform=ax.transAxes,
                fontsize=7, va="top")
    if colorbar:
        cb = ax.figure.colorbar(im, ax=ax, shrink=0.9)
        height = ax.get_position().height * ax.figure.get_figheight() * 0.9
        cb.set_label(_wrap(value_label(value, result, family), max(height, 2.0), 8), fontsize=8)
    return ax


def heatmap_grid(result: AnalysisResult, families: str | Sequence[str] | None = None, value: str = "rho",
                 block: tuple[int, int] | None = None, ncols: int = 4, cmap: str | None = None,
                 annot: bool | None = None, fig: "Figure | None" = None) -> np.ndarray:
    """Small multiples of :func:`heatmap`, one per family, on one shared colour scale.

    Activation measures are the exception: a distance and a similarity share no scale, so
    each panel has its own colour bar, labelled with its measure (dark = alike in both).

    Args:
        families: which families (default all); one name is one family.
        cmap: the colour map; default viridis, dark = alike (reversed for a similarity).
        fig: draw into this (empty) Figure instead of a new pyplot figure (widgets use this
            to keep figures out of pyplot's global state).

    Returns:
        2-D array of Axes (``nrows x ncols``); unused cells are switched off. The Figure is
        ``axes.flat[0].figure``.
    """
    _check_result(result, "heatmap_grid")
    _check_value(value, result)
    fams = _families(result, families)
    mats = {f: result.matrix(f, value) for f in fams}
    own = space(result) == "activations"  # each measure on its own scale, with its own label
    sims = {f: direction(result, f) == "similarity" for f in fams}
    if own:
        limits = {f: _color_limits(value, m.to_numpy(dtype=float), 0.0, sims[f]) for f, m in mats.items()}
    else:
        allvals = np.concatenate([m.to_numpy(dtype=float).ravel() for m in mats.values()])
        limits = dict.fromkeys(fams, _color_limits(value, allvals, _null_top(result, fams)))
    ncols = max(1, min(ncols, len(fams)))
    nrows = math.ceil(len(fams) / ncols)
    n = max(next(iter(mats.values())).shape)
    size = 2.4 + 0.12 * n
    figsize = (size * ncols + (1.6 * ncols if own else 1.2), size * nrows + 0.9)
    if fig is None:
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=figsize, layout="constrained")
    else:
        fig.set_size_inches(*figsize)
        fig.set_layout_engine("constrained")
    axes = np.atleast_2d(fig.subplots(nrows, ncols, squeeze=False))
    annot = (n <= 8) if annot is None else annot
    im = None
    for ax, fam in zip(axes.flat, fams):
        im = _draw_heatmap(ax, mats[fam], *limits[fam], _cmap(cmap, sims[fam]), annot, block, result.cross_model)
        ax.set_title(fam + ("" if _invariant(result, fam) else " *"), fontsize=10)
        ax.set_xlabel("")
        ax.set_ylabel("")
        if own:
            cb = fig.colorbar(im, ax=ax, shrink=0.9)
            cb.set_label(_wrap(value_label(value, result, fam), 0.9 * size, 8), fontsize=8)
    for ax in list(axes.flat)[len(fams):]:
        ax.set_axis_off()
    if not own:
        shrink = min(0.8, 0.35 + 0.15 * nrows)
        cb = fig.colorbar(im, ax=axes, shrink=shrink)
        cb.set_label(_wrap(value_label(value, result), shrink * size * nrows, 9), fontsize=9)
    note = "" if all(_invariant(result, f) for f in fams) else "   (* not gauge-invariant)"
    between = "between the models' layers" if result.cross_model else "between layers"
    what = "activation measures" if own else value_short(value, result)
    note += "   (each on its own colour scale)" if own and len(fams) > 1 else ""
    fig.suptitle(_title(f"{what} {between}, by family{note}", result), fontsize=11)
    rows, cols = _layer_labels(result)
    fig.supxlabel(cols, fontsize=9)
    fig.supylabel(rows, fontsize=9)
    return axes
