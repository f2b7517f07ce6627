"""Families ranked by mean ρ, and methods compared per family."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import pandas as pd

from ..errors import PlotArgumentError
from ..result import AnalysisResult
from ._common import (KIND_COLORS, METHOD_COLORS, METHOD_NAMES, _as_list, _check_result, _check_same_model,
                      _check_value, _context, _families, _invariant, _new_axes, _title, direction, space, value_label, value_short)

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes


def _stats(result: AnalysisResult, value: str) -> pd.DataFrame:
    """Per family: mean/min/max of ``value``, mean null, kind, invariant; first-seen order.

    Of activation measures the statistics are of the *variation*: a distance as it is, a
    similarity as 1 − similarity, so that small means alike for both (``similarity`` says
    which families were turned)."""
    d = result.df
    turned = {f for f in result.families if direction(result, f) == "similarity"}
    sim = d["family"].isin(turned)
    if turned:
        d = d.assign(**{value: d[value].where(~sim, 1.0 - d[value])})
    g = d.groupby("family", sort=False)
    out = g[value].agg(["mean", "min", "max", "count"])
    out["null"] = g["null"].mean()
    out["kind"] = g["kind"].first()
    out["invariant"] = g["invariant"].all()
    out["similarity"] = [f in turned for f in out.index]
    return out


def ranking(result: AnalysisResult, ax: "Axes | None" = None, value: str = "rho",
            families: str | Sequence[str] | None = None) -> "Axes":
    """Mean ``value`` per family (bar) with min/max over pairs (whisker), ranked from least
    to most variation, top to bottom, like the reference script's table.

    Bars are coloured by kind (weight / circuit / norm). Families whose number is not
    gauge-invariant (raw norm gains; every family under ``rotation``) are hatched and marked
    with ``*``. For ρ the null (ρ = 1) is drawn as a dashed line.

    Activation measures (``drift.function.activation_similarity``) are a distance
    (``residual_angle``) and a similarity (``update_cka``): a similarity is drawn and ranked
    as 1 − similarity, its tick and bar say so, so that "least variation on top" holds for both.

    Returns:
        The Axes.
    """
    _check_result(result, "ranking")
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
    for yi, (mean, sim) in enumerate(zip(s["mean"], s["similarity"])):  # clear of whiskers and the null line
        text = f"{mean:.3f}" + (f" = 1 − {1.0 - mean:.3f}" if sim else "")
        ax.text(0.01, yi, text, transform=ax.get_yaxis_transform(), va="center",
                fontsize=7, color="white", fontweight="bold", path_effects=outline)
    labels = [f + ("" if inv else " *") + ("\n(1 − similarity)" if sim else "")
              for f, inv, sim in zip(s.index, s["invariant"], s["similarity"])]
    ax.set_yticks(y, labels)
    ax.invert_yaxis()  # least variation on top
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=k) for k, c in KIND_COLORS.items() if k in set(s["kind"])]
    if value == "rho":  # in the legend: above the axes it collides with the two-line title
        ax.axvline(1.0, color="black", ls="--", lw=1.0)
        handles.append(Line2D([], [], color="black", ls="--", lw=1.0, label="null (ρ = 1)"))
    ax.set_xlim(0, max(1.1 if value == "rho" else 0, float(s["max"].max())) * 1.12)
    whiskers = f"whiskers: min–max over {int(s['count'].max())} layer pairs"
    if space(result) == "activations":
        what = "variation"
        ax.set_xlabel("mean variation (0: alike): a distance as it is, a similarity as 1 − similarity\n"
                      f"{whiskers}", fontsize=8)
    else:
        what = value_short(value, result)
        ax.set_xlabel(f"mean {value_label(value, result)}\n{whiskers}", fontsize=8)
    if not s["invariant"].all():
        handles.append(Patch(facecolor="#bbbbbb", hatch="///", edgecolor="white",
                             label="* not gauge-invariant"))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(_title(f"families ranked by mean {what} (least variation on top)", result), fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return ax


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
    _check_methods(results)
    _check_value(value)
    if value != "residual":
        for r in results.values():
            _check_value(value, r)
    labels = list(results)
    first = results[labels[0]]
    # Rank by the exact method when it is there (the other methods' ranking is not meaningful).
    ref = next((r for r in results.values() if r.method == "exact"), first)
    fams = _method_families(results, ref, value) if families is None else _as_list(families)
    ax = _new_axes(ax, (min(11.0, 2.5 + 0.25 * len(fams) * len(labels)), 4.2))
    _method_bars(ax, results, fams, value)
    if value == "rho":
        ax.axhline(1.0, color="black", ls="--", lw=1.0, label="null (ρ = 1)")
    elif space(first) == "weights":  # a unit-normalised residual's ceiling; not a tie's damage
        ax.axhline(math.sqrt(2), color="#999999", ls=":", lw=1.0, label="√2: orthogonal, nothing fitted")
    _method_ticks(ax, results, fams, ref)
    ax.set_ylabel(f"mean {value_label(value, first)}", fontsize=8)
    ax.set_ylim(bottom=0)
    handles, names = ax.get_legend_handles_labels()
    from matplotlib.container import BarContainer

    order = sorted(range(len(handles)), key=lambda k: not isinstance(handles[k], BarContainer))
    ax.legend([handles[k] for k in order], [names[k] for k in order], fontsize=7, loc="upper left",
              bbox_to_anchor=(1.01, 1.0), frameon=False)
    ctx = _context(first)
    meths = " vs ".join(METHOD_NAMES.get(results[lab].method, lab) for lab in labels)
    ax.set_title(f"{value_short(value, first)} per family, by method\nmethods: {meths}"
                 + (f" — {ctx}" if ctx else ""), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return ax


def _check_methods(results: Mapping[str, AnalysisResult]) -> None:
    """A mapping of label -> result, all weight results or all tie results: each an
    alignment method's, compared with the others on one scale."""
    if not isinstance(results, Mapping):
        raise TypeError("compare_methods takes a mapping of label -> result, e.g. {'raw': r0, 'exact': r1}, "
                        f"not a {type(results).__name__}")
    if not results:
        raise PlotArgumentError("compare_methods needs at least one result")
    for label, r in results.items():
        _check_result(r, f"compare_methods: results[{label!r}]")
    _check_same_model(dict(results), "compare_methods")
    spaces = {label: space(r) for label, r in results.items()}
    acts = [label for label, sp in spaces.items() if sp == "activations"]
    if acts:
        raise PlotArgumentError(f"compare_methods compares alignment methods, and results {acts} are activation "
                         "measures (drift.function.activation_similarity), which no method made: draw them "
                         "with ranking or heatmap_grid")
    if len(set(spaces.values())) > 1:
        kinds = ", ".join(f"{label!r}: {'tie' if sp == 'tie' else 'weights'}" for label, sp in spaces.items())
        raise PlotArgumentError("compare_methods puts every result on one scale, so they must be all weight results "
                         f"(drift.analyze) or all tie results (drift.function.tie), not a mix ({kinds})")


def _method_families(results: Mapping[str, AnalysisResult], ref: AnalysisResult, value: str) -> list[str]:
    """The reference result's families ranked by its mean, then any the others add."""
    order = _stats(ref, value).sort_values("mean").index
    seen = list(order) + [f for r in results.values() for f in r.families if f not in order]
    return list(dict.fromkeys(seen))


def _method_bars(ax: "Axes", results: Mapping[str, AnalysisResult], fams: list[str], value: str) -> None:
    """One bar per method and family (mean, min/max whiskers), its null as a black tick."""
    labels = list(results)
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


def _method_ticks(ax: "Axes", results: Mapping[str, AnalysisResult], fams: list[str],
                  ref: AnalysisResult) -> None:
    """Family ticks: a family only some methods produce (the circuits: exact only) says so;
    one that is not gauge-invariant even under the reference (exact) method is starred."""
    labels = list(results)
    ticks = []
    starred = False
    for f in fams:
        have = [results[lab].method for lab in labels if f in results[lab].families]
        star = f in ref.families and not _invariant(ref, f)
        starred |= star
        name = f + (" *" if star else "")
        ticks.append(name if len(have) == len(labels) else f"{name}\n({', '.join(have)} only)")
    ax.set_xticks(np.arange(len(fams)), ticks, rotation=35, ha="right")
    if starred:
        ax.text(1.01, 0.0, f"* not gauge-invariant,\n  even under {METHOD_NAMES.get(ref.method, ref.method)}",
                transform=ax.transAxes, fontsize=7, va="bottom")

