"""Figures of an :class:`~drift.result.AnalysisResult`.

Results are data, plots are views: every function here takes a finished result (or a dict
of results), draws on ``ax`` (a new figure when ``ax`` is None) and returns what it drew on.
Nothing is recomputed. Every title names the alignment method, because a residual only
means something next to the method's own null (gauge-spec §5)::

    ρ = residual / null     ~0: identical up to the removed gauge
                            ~1: as different as an unrelated partner

``heatmap``          layer x layer matrix of one family
``heatmap_grid``     small multiples of ``heatmap``, one shared colour scale
``drift_along``      consecutive pairs along the depth: ρ (with the ρ = 1 null line), or
                     residual and null side by side (``value="residual"``)
``ranking``          mean ρ per family with min/max whiskers, least to most variation
``compare_methods``  one bar per method and family; with ``value="residual"`` each bar
                     carries its own null, so an over-fitting method shows a low null
``save``, ``export_csv``

matplotlib is imported inside the functions, so ``import drift.plots`` stays cheap and
``import drift`` never imports it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd

from .methods import METHODS
from .result import AnalysisResult

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

VALUE_LABELS = {
    "rho": "ρ = residual / null\n(0: identical up to gauge, 1: as different as unrelated)",
    "residual": "residual (unit-normalised Frobenius; √2 = orthogonal)",
    "null": "null residual (unrelated partner, same method)",
}
"""Axis and colour-bar label of each value a figure can show."""

VALUE_SHORT = {"rho": "ρ", "residual": "residual", "null": "null"}

METHOD_NAMES = {name: m.title for name, m in METHODS.items()}
"""How titles name each method."""

METHOD_COLORS = {"raw": "#9e9e9e", "rotation": "#e6892e", "exact": "#2b6cb0"}
KIND_COLORS = {"weight": "#2b6cb0", "circuit": "#7b3fa0", "norm": "#3c9d5d"}

SAVE_FORMATS = ("png", "svg", "pdf")


# --------------------------------------------------------------------------- helpers

def _check_value(value: str, result: AnalysisResult | None = None) -> None:
    if value not in VALUE_LABELS:
        raise ValueError(f"value must be one of {', '.join(VALUE_LABELS)}, got {value!r}")
    if result is not None and value in ("rho", "null") and not result.df[value].notna().any():
        raise ValueError(f"this result has no null (it was computed with n_null=0), so no {value!r} "
                         "to plot: use value='residual', or analyse with n_null >= 1")


def _method(result: AnalysisResult) -> str:
    return METHOD_NAMES.get(result.method, str(result.method))


def _pairs_text(result: AnalysisResult) -> str:
    """Which pairs the table holds, read from the rows (``meta["pairs"]`` survives
    ``.consecutive()`` unchanged, so it can say "all" for a consecutive subset)."""
    d = result.df
    if len(d) and bool((d["layer_b"] == d["layer_a"] + 1).all()):
        return "consecutive pairs"
    return f"{result.meta['pairs']} pairs" if result.meta.get("pairs") else f"{len(result.pairs)} pairs"


def _model_name(result: AnalysisResult) -> str | None:
    """The model as titles name it: a local folder by its last component (a temporary
    folder's full path is noise), a bundled name or an HF repo id as is."""
    model = result.meta.get("model")
    if not model:
        return None
    model = str(model)
    return Path(model).name or model if model.startswith(("/", ".", "~")) else model


def _context(result: AnalysisResult, pairs: str | None = None) -> str:
    """'model, pairs' for titles (method is named separately)."""
    name = _model_name(result)
    parts = [name] if name else []
    parts.append(pairs or _pairs_text(result))
    return ", ".join(parts)


def _title(what: str, result: AnalysisResult, pairs: str | None = None) -> str:
    ctx = _context(result, pairs)
    return f"{what}\nmethod: {_method(result)}" + (f" — {ctx}" if ctx else "")


def _families(result: AnalysisResult, families: Sequence[str] | None) -> list[str]:
    if families is None:
        return result.families
    fams = list(families)
    unknown = [f for f in fams if f not in result.families]
    if unknown:
        raise ValueError(f"families {unknown} are not in the result (it has {', '.join(result.families)})")
    if not fams:
        raise ValueError("families is empty")
    return fams


def _new_axes(ax: "Axes | None", figsize: tuple[float, float]) -> "Axes":
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def _figure_of(obj: Any) -> "Figure":
    """The Figure behind a Figure, an Axes, or an array/list of Axes."""
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure, SubFigure

    if isinstance(obj, (np.ndarray, list, tuple)):
        obj = np.asarray(obj, dtype=object).flat[0]
    if isinstance(obj, Axes):
        obj = obj.figure
    while isinstance(obj, SubFigure):
        obj = obj.figure
    if not isinstance(obj, Figure):
        raise TypeError(f"expected a matplotlib Figure or Axes, got {type(obj).__name__}")
    return obj


def _invariant(result: AnalysisResult, family: str) -> bool:
    return bool(result.df.loc[result.df["family"] == family, "invariant"].all())


def _pair_label(a: int, b: int) -> str:
    return f"{a}→{b}"


def _consecutive(result: AnalysisResult) -> pd.DataFrame:
    d = result.consecutive().df
    if d.empty:
        raise ValueError("the result has no consecutive pairs (layer_b == layer_a + 1) to plot along depth")
    return d


def _color_limits(value: str, data: np.ndarray, null_top: float) -> tuple[float, float]:
    """Colour range starting at 0 whose top is "as different as unrelated": ρ = 1, or for
    residuals the largest null of the families drawn, so equal colours mean equal verdicts."""
    finite = data[np.isfinite(data)]
    top = float(finite.max()) if finite.size else 1.0
    if value == "rho":
        return 0.0, max(1.0, top)
    return 0.0, max(top, null_top, 1e-12)


def _null_top(result: AnalysisResult, families: Sequence[str]) -> float:
    nulls = result.df.loc[result.df["family"].isin(families), "null"].to_numpy(dtype=float)
    nulls = nulls[np.isfinite(nulls)]
    return float(nulls.max()) if nulls.size else 0.0


# --------------------------------------------------------------------------- heatmaps

def _draw_heatmap(ax: "Axes", m: pd.DataFrame, vmin: float, vmax: float, cmap: str,
                  annot: bool, block: tuple[int, int] | None):
    """Draw matrix ``m`` (layers x layers) on ``ax``; return the image (for a colour bar)."""
    import matplotlib
    import matplotlib.colors as mcolors
    from matplotlib.patches import Rectangle

    layers = list(m.index)
    n = len(layers)
    data = m.to_numpy(dtype=float).copy()
    np.fill_diagonal(data, np.nan)  # a layer against itself is 0 by definition, not a measurement
    cm = matplotlib.colormaps[cmap].with_extremes(bad="#eeeeee")
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cm, vmin=vmin, vmax=vmax,
                   interpolation="nearest", aspect="equal")
    ax.set_xticks(range(n), [str(L) for L in layers])
    ax.set_yticks(range(n), [str(L) for L in layers])
    step = max(1, math.ceil(n / 12))  # at most ~12 tick labels per axis
    for i, lab in enumerate(ax.get_xticklabels()):
        lab.set_visible(i % step == 0)
    for i, lab in enumerate(ax.get_yticklabels()):
        lab.set_visible(i % step == 0)
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    if annot:
        norm = mcolors.Normalize(vmin, vmax)
        for i in range(n):
            for j in range(n):
                v = data[i, j]
                if np.isfinite(v):
                    r, g, b, _ = cm(norm(v))
                    dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
    if block is not None:
        lo, hi = block
        inside = [k for k, L in enumerate(layers) if lo <= L <= hi]
        if not inside:
            raise ValueError(f"block {block} contains none of the result's layers {layers}")
        k0, k1 = inside[0], inside[-1]
        ax.add_patch(Rectangle((k0 - 0.5, k0 - 0.5), k1 - k0 + 1, k1 - k0 + 1, fill=False,
                               edgecolor="crimson", linewidth=2.0, label=f"block {lo}–{hi}"))
    return im


def heatmap(result: AnalysisResult, family: str, value: str = "rho", ax: "Axes | None" = None,
            block: tuple[int, int] | None = None, cmap: str = "viridis",
            annot: bool | None = None, colorbar: bool = True) -> "Axes":
    """Layer x layer matrix of ``value`` for one ``family``.

    Cells that were not computed (e.g. non-neighbours under ``pairs="consecutive"``) and the
    diagonal (a layer against itself) are grey. The colour bar is labelled with what it
    shows and starts at 0; its top is "as different as unrelated" (ρ = 1, or for residuals
    the family's largest null), so that colour means the same verdict in every heatmap.

    Args:
        result: the analysis.
        family: one of ``result.families``.
        value: ``"rho"`` | ``"residual"`` | ``"null"``.
        ax: where to draw; a new figure when None.
        block: ``(first, last)`` layer (inclusive) to outline.
        annot: write each value in its cell; default when at most 12 layers.
        colorbar: add a labelled colour bar.

    Returns:
        The Axes.

    Raises:
        ValueError: unknown ``value`` or ``family``, or a ``block`` outside the result's layers.
    """
    _check_value(value, result)
    _families(result, [family])
    m = result.matrix(family, value)
    vmin, vmax = _color_limits(value, m.to_numpy(dtype=float), _null_top(result, [family]))
    ax = _new_axes(ax, (4.6, 3.8))
    im = _draw_heatmap(ax, m, vmin, vmax, cmap, len(m) <= 12 if annot is None else annot, block)
    star = "" if _invariant(result, family) else " *"
    ax.set_title(_title(f"{family}{star}: {VALUE_SHORT[value]} between layers", result), fontsize=10)
    if star:
        ax.text(0.0, -0.22, "* not gauge-invariant: compare with care", transform=ax.transAxes,
                fontsize=7, va="top")
    if colorbar:
        cb = ax.figure.colorbar(im, ax=ax, shrink=0.9)
        cb.set_label(VALUE_LABELS[value], fontsize=8)
    return ax


def heatmap_grid(result: AnalysisResult, families: Sequence[str] | None = None, value: str = "rho",
                 block: tuple[int, int] | None = None, ncols: int = 4, cmap: str = "viridis",
                 annot: bool | None = None, fig: "Figure | None" = None) -> np.ndarray:
    """Small multiples of :func:`heatmap`, one per family, on one shared colour scale.

    Args:
        fig: draw into this (empty) Figure instead of a new pyplot figure (widgets use this
            to keep figures out of pyplot's global state).

    Returns:
        2-D array of Axes (``nrows x ncols``); unused cells are switched off. The Figure is
        ``axes.flat[0].figure``.
    """
    _check_value(value, result)
    fams = _families(result, families)
    mats = {f: result.matrix(f, value) for f in fams}
    allvals = np.concatenate([m.to_numpy(dtype=float).ravel() for m in mats.values()])
    vmin, vmax = _color_limits(value, allvals, _null_top(result, fams))
    ncols = max(1, min(ncols, len(fams)))
    nrows = math.ceil(len(fams) / ncols)
    n = len(next(iter(mats.values())))
    size = 2.4 + 0.12 * n
    figsize = (size * ncols + 1.2, size * nrows + 0.9)
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
        im = _draw_heatmap(ax, mats[fam], vmin, vmax, cmap, annot, block)
        ax.set_title(fam + ("" if _invariant(result, fam) else " *"), fontsize=10)
        ax.set_xlabel("")
        ax.set_ylabel("")
    for ax in list(axes.flat)[len(fams):]:
        ax.set_axis_off()
    cb = fig.colorbar(im, ax=axes, shrink=min(0.8, 0.35 + 0.15 * nrows))
    cb.set_label(VALUE_LABELS[value], fontsize=9)
    note = "" if all(_invariant(result, f) for f in fams) else "   (* not gauge-invariant)"
    fig.suptitle(_title(f"{VALUE_SHORT[value]} between layers, by family{note}", result), fontsize=11)
    fig.supxlabel("layer", fontsize=9)
    fig.supylabel("layer", fontsize=9)
    return axes


# --------------------------------------------------------------------------- along depth

def drift_along(result: AnalysisResult, families: Sequence[str] | None = None,
                ax: "Axes | None" = None, value: str = "rho") -> "Axes":
    """Consecutive-pair drift along the depth, one line per family.

    ``value="rho"``: ρ of each pair (L, L+1), with the null at ρ = 1 drawn as a line and the
    region above it shaded ("as different as an unrelated partner").

    ``value="residual"``: the residual (solid) and the null (dashed, same colour) of each
    family, with the gap between them shaded: the raw numbers that ρ is the ratio of.

    Returns:
        The Axes.
    """
    if value not in ("rho", "residual"):
        raise ValueError(f"drift_along shows value 'rho' or 'residual', got {value!r}")
    _check_value(value, result)
    has_null = bool(result.df["null"].notna().any())
    fams = _families(result, families)
    d = _consecutive(result)
    pairs = sorted({(int(a), int(b)) for a, b in d[["layer_a", "layer_b"]].itertuples(index=False)})
    xpos = {p: k for k, p in enumerate(pairs)}
    ax = _new_axes(ax, (7.5, 4.0))
    colors = _family_colors(result.families)  # a family keeps its colour whatever is selected
    sel = d[d["family"].isin(fams)]
    # The nulls of all families at one pair: one grey band when they agree (to 0.1), else one
    # dashed line per family (e.g. under ``rotation`` the MLP null is far below the attention null).
    nb = sel.groupby(["layer_a", "layer_b"])["null"].agg(["min", "max"]).sort_index()
    one_band = value == "residual" and has_null and float((nb["max"] - nb["min"]).max()) < 0.1
    drawn = 0
    for fam in fams:
        f = d[d["family"] == fam].sort_values("layer_a")
        if f.empty:
            continue
        x = [xpos[(int(a), int(b))] for a, b in f[["layer_a", "layer_b"]].itertuples(index=False)]
        c = colors[fam]
        if value == "rho":
            ax.plot(x, f["rho"], marker="o", ms=3.5, lw=1.6, color=c, label=fam)
        else:
            ax.plot(x, f["residual"], marker="o", ms=3.5, lw=1.6, color=c, label=fam)
            if has_null and not one_band:
                ax.plot(x, f["null"], ls="--", lw=1.0, color=c, alpha=0.8)
        drawn += 1
    if drawn == 0:
        raise ValueError(f"none of the families {fams} has consecutive pairs")
    if value == "rho":
        top = max(1.15, float(np.nanmax(sel["rho"])) * 1.05)
        ax.axhspan(1.0, top, color="#d9d9d9", alpha=0.5, lw=0, zorder=0,
                   label="as different as unrelated")
        ax.axhline(1.0, color="black", ls="--", lw=1.0, zorder=1, label="null: unrelated partner (ρ = 1)")
        ax.set_ylim(0, top)
        ax.set_ylabel(VALUE_LABELS["rho"], fontsize=9)
        what = "ρ along the depth"
    else:
        if one_band:
            xb = [xpos[(int(a), int(b))] for a, b in nb.index]
            ax.fill_between(xb, nb["min"], nb["max"], color="#bbbbbb", alpha=0.6, lw=0, zorder=0,
                            label="null (unrelated partner),\nrange over families")
        elif has_null:
            ax.plot([], [], color="black", ls="--", lw=1.0, label="null of each family (dashed)")
        ax.set_ylim(bottom=0)
        if has_null:
            ax.set_ylabel("residual / null\n(unit-normalised Frobenius)", fontsize=9)
            what = "residual vs null along the depth"
        else:
            ax.set_ylabel("residual\n(unit-normalised Frobenius)", fontsize=9)
            what = "residual along the depth (no null computed)"
    ax.set_xticks(range(len(pairs)), [_pair_label(*p) for p in pairs])
    if len(pairs) > 16:
        for k, lab in enumerate(ax.get_xticklabels()):
            lab.set_visible(k % math.ceil(len(pairs) / 16) == 0)
    ax.set_xlabel("layer pair")
    ax.set_title(_title(what, result, pairs="consecutive pairs"), fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return ax


def _family_colors(fams: Sequence[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(fams) <= 10 else "tab20"]
    return {f: cmap(k % cmap.N) for k, f in enumerate(fams)}


# --------------------------------------------------------------------------- ranking

def _stats(result: AnalysisResult, value: str) -> pd.DataFrame:
    """Per family: mean/min/max of ``value``, mean null, kind, invariant; first-seen order."""
    g = result.df.groupby("family", sort=False)
    out = g[value].agg(["mean", "min", "max", "count"])
    out["null"] = g["null"].mean()
    out["kind"] = g["kind"].first()
    out["invariant"] = g["invariant"].all()
    return out


def ranking(result: AnalysisResult, ax: "Axes | None" = None, value: str = "rho",
            families: Sequence[str] | None = None) -> "Axes":
    """Mean ``value`` per family (bar) with min/max over pairs (whisker), ranked from least
    to most variation, top to bottom, like the reference script's table.

    Bars are coloured by kind (weight / circuit / norm). Families whose number is not
    gauge-invariant (raw norm gains; every family under ``rotation``) are hatched and marked
    with ``*``. For ρ the null (ρ = 1) is drawn as a dashed line.

    Returns:
        The Axes.
    """
    _check_value(value, result)
    fams = _families(result, families)
    s = _stats(result, value).loc[fams].sort_values("mean")
    ax = _new_axes(ax, (6.4, 0.38 * len(s) + 1.6))
    y = np.arange(len(s))
    colors = [KIND_COLORS.get(k, "#777777") for k in s["kind"]]
    err = np.vstack([s["mean"] - s["min"], s["max"] - s["mean"]])
    bars = ax.barh(y, s["mean"], xerr=err, color=colors, alpha=0.85, height=0.7,
                   error_kw=dict(ecolor="black", lw=1, capsize=3))
    for bar, inv in zip(bars, s["invariant"]):
        if not inv:
            bar.set_hatch("///")
            bar.set_edgecolor("white")
    from matplotlib import patheffects

    outline = [patheffects.withStroke(linewidth=2, foreground="#333333")]  # readable on hatching
    for yi, mean in enumerate(s["mean"]):  # the value inside the bar, clear of whiskers and the null line
        ax.text(0.01, yi, f"{mean:.3f}", transform=ax.get_yaxis_transform(), va="center",
                fontsize=7, color="white", fontweight="bold", path_effects=outline)
    labels = [f + ("" if inv else " *") for f, inv in zip(s.index, s["invariant"])]
    ax.set_yticks(y, labels)
    ax.invert_yaxis()  # least variation on top
    if value == "rho":
        ax.axvline(1.0, color="black", ls="--", lw=1.0)
        ax.text(1.0, 1.0, "null\n(ρ = 1)", transform=ax.get_xaxis_transform(), ha="center",
                va="bottom", fontsize=7)
    ax.set_xlim(0, max(1.1 if value == "rho" else 0, float(s["max"].max())) * 1.12)
    ax.set_xlabel(f"mean {VALUE_LABELS[value]}\nwhiskers: min–max over "
                  f"{int(s['count'].max())} layer pairs", fontsize=8)
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=k) for k, c in KIND_COLORS.items() if k in set(s["kind"])]
    if not s["invariant"].all():
        handles.append(Patch(facecolor="#bbbbbb", hatch="///", edgecolor="white",
                             label="* not gauge-invariant"))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(_title(f"families ranked by mean {VALUE_SHORT[value]} (least variation on top)",
                        result), fontsize=10, pad=18 if value == "rho" else 6)
    ax.grid(axis="x", alpha=0.3)
    return ax


# --------------------------------------------------------------------------- methods

def compare_methods(results: Mapping[str, AnalysisResult], ax: "Axes | None" = None,
                    value: str = "residual", families: Sequence[str] | None = None) -> "Axes":
    """Per family, one bar per method (mean over pairs, min/max whiskers), side by side.

    ``value="residual"`` (default): each bar also carries its method's mean null as a black
    tick. This is the view that shows what gauge removal changes: ``raw`` sits at its null
    (√2), ``exact`` drops below its null where layers share structure, and ``rotation``
    drops lower still *and so does its null*: a fit with more freedom than the model's
    symmetries makes unrelated weights look alike too (gauge-spec §0, claim 2).

    ``value="rho"``: the ratio itself, with the ρ = 1 line.

    Args:
        results: label -> result, e.g. ``{"raw": r0, "rotation": r1, "exact": r2}``; drawn in
            this order. Labels default to the result's method in the legend.
        families: which families (default: those of the first result, ranked by its mean).

    Returns:
        The Axes.
    """
    _check_value(value)
    if not results:
        raise ValueError("compare_methods needs at least one result")
    if value != "residual":
        for r in results.values():
            _check_value(value, r)
    labels = list(results)
    first = results[labels[0]]
    # Rank by the exact method when it is there (the other methods' ranking is not meaningful).
    ref = next((r for r in results.values() if r.method == "exact"), first)
    if families is None:
        order = _stats(ref, value).sort_values("mean").index
        seen = list(order) + [f for r in results.values() for f in r.families if f not in order]
        fams = list(dict.fromkeys(seen))
    else:
        fams = list(families)
    ax = _new_axes(ax, (min(11.0, 2.5 + 0.25 * len(fams) * len(labels)), 4.2))
    width = 0.8 / len(labels)
    x = np.arange(len(fams))
    null_drawn = False
    tops = [float(r.df[value].max()) for r in results.values()]
    tiny = 0.015 * max(tops + [1.0 if value == "rho" else math.sqrt(2)])
    for k, lab in enumerate(labels):
        r = results[lab]
        s = _stats(r, value).reindex(fams)
        xs = x - 0.4 + width * (k + 0.5)
        color = METHOD_COLORS.get(r.method, f"C{k}")
        name = lab if lab == r.method else f"{lab} ({r.method})"
        ok = s["mean"].notna().to_numpy()
        err = np.vstack([s["mean"] - s["min"], s["max"] - s["mean"]])[:, ok]
        ax.bar(xs[ok], s["mean"][ok], width=width * 0.92, color=color, label=METHOD_NAMES.get(name, name),
               yerr=err, error_kw=dict(ecolor="#333333", lw=0.8, capsize=2))
        for xi, m in zip(xs[ok], s["mean"][ok]):
            if m < tiny:  # a bar too short to see is not a missing bar: say its value
                ax.text(xi, tiny, f"{m:.2f}", ha="center", va="bottom", fontsize=6, rotation=90,
                        color=color, fontweight="bold")
        if value == "residual" and s["null"][ok].notna().any():
            ax.hlines(s["null"][ok], xs[ok] - width * 0.46, xs[ok] + width * 0.46, colors="black",
                      lw=2.0, label=None if null_drawn else "its null (unrelated partner)")
            null_drawn = True
    if value == "rho":
        ax.axhline(1.0, color="black", ls="--", lw=1.0, label="null (ρ = 1)")
    else:
        ax.axhline(math.sqrt(2), color="#999999", ls=":", lw=1.0, label="√2: orthogonal, nothing fitted")
    # A family that only some methods produce (the circuits: exact only) says so; a family
    # that is not gauge-invariant even under the reference (exact) method is starred.
    ticks = []
    starred = False
    for f in fams:
        have = [results[lab].method for lab in labels if f in results[lab].families]
        star = f in ref.families and not _invariant(ref, f)
        starred |= star
        name = f + (" *" if star else "")
        ticks.append(name if len(have) == len(labels) else f"{name}\n({', '.join(have)} only)")
    ax.set_xticks(x, ticks, rotation=35, ha="right")
    if starred:
        ax.text(1.01, 0.0, f"* not gauge-invariant,\n  even under {METHOD_NAMES.get(ref.method, ref.method)}",
                transform=ax.transAxes, fontsize=7, va="bottom")
    ax.set_ylabel(f"mean {VALUE_LABELS[value]}", fontsize=8)
    ax.set_ylim(bottom=0)
    handles, names = ax.get_legend_handles_labels()
    from matplotlib.container import BarContainer

    order = sorted(range(len(handles)), key=lambda k: not isinstance(handles[k], BarContainer))
    ax.legend([handles[k] for k in order], [names[k] for k in order], fontsize=7, loc="upper left",
              bbox_to_anchor=(1.01, 1.0), frameon=False)
    ctx = _context(first)
    meths = " vs ".join(METHOD_NAMES.get(results[lab].method, lab) for lab in labels)
    ax.set_title(f"{VALUE_SHORT[value]} per family, by method\nmethods: {meths}"
                 + (f" — {ctx}" if ctx else ""), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return ax


# --------------------------------------------------------------------------- output

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
        raise ValueError(f"{path}: cannot save as {path.suffix or 'no suffix'!r}; "
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


__all__ = ["heatmap", "heatmap_grid", "drift_along", "ranking", "compare_methods", "save",
           "export_csv", "VALUE_LABELS", "METHOD_NAMES"]
