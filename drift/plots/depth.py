"""Along the depth: consecutive pairs of one model, or the diagonal of a cross-model result
(layer L of the model against layer L of the other)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..errors import PlotArgumentError
from ..result import AnalysisResult
from ._common import (_check_result, _check_value, _consecutive, _families, _family_styles,
                      _model_names, _new_axes, _pair_label, _title, direction, space, value_label)

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes


def drift_along(result: AnalysisResult, families: str | Sequence[str] | None = None,
                ax: "Axes | None" = None, value: str = "rho") -> "Axes":
    """Consecutive-pair drift along the depth, one line per family (for a tie result with a
    fixed ``reference`` layer: each of its pairs (reference, L), along L).

    ``value="rho"``: ρ of each pair (L, L+1), with the null at ρ = 1 drawn as a line and the
    region above it shaded ("as different as an unrelated partner").

    ``value="residual"``: the residual (solid) and the null (dashed, same colour) of each
    family, with the gap between them shaded: the raw numbers that ρ is the ratio of.

    Returns:
        The Axes.
    """
    _check_result(result, "drift_along")
    if value not in ("rho", "residual"):
        raise PlotArgumentError(f"drift_along shows value 'rho' or 'residual', got {value!r}")
    _check_value(value, result)
    ref = result.meta.get("reference") if space(result) == "tie" else None
    if isinstance(ref, int) and not isinstance(ref, bool):  # drift.function.tie(reference=L): every pair is (L, j)
        d = result.df[result.df["layer_a"] == ref]
        if d.empty:
            raise PlotArgumentError(f"the tie result has no pairs from its reference layer {ref}")
        return _along(result, d, families, ax, value, _pair_label, f"layer pair (each tied from layer {ref})",
                      f"ties from layer {ref}")
    return _along(result, _consecutive(result), families, ax, value, _pair_label, "layer pair",
                  "consecutive pairs")


def diagonal_along(result: AnalysisResult, families: str | Sequence[str] | None = None,
                   ax: "Axes | None" = None, value: str = "rho") -> "Axes":
    """The diagonal of a cross-model result along the depth: layer L of the model against
    layer L of the other (``analyze(model, other=..., pairs="diagonal")``), one line per family.

    ``value`` as in :func:`drift_along`: ρ with the null at ρ = 1, or residual and null.

    Returns:
        The Axes.

    Raises:
        ValueError: the result has no diagonal pairs (layer_a == layer_b), or a bad value/family.
    """
    _check_result(result, "diagonal_along")
    if value not in ("rho", "residual"):
        raise PlotArgumentError(f"diagonal_along shows value 'rho' or 'residual', got {value!r}")
    _check_value(value, result)
    d = result.diagonal().df
    if d.empty or not result.cross_model:
        raise PlotArgumentError("the result has no diagonal pairs (layer L of a model against layer L of "
                         "another): analyze(model, other=..., pairs='diagonal' or 'all')")
    where = "layer (of {} and of {})".format(*_model_names(result))
    return _along(result, d, families, ax, value, lambda a, b: str(a), where, "diagonal pairs")


def _along(result: AnalysisResult, d, families, ax, value: str, label, xlabel: str, pairs_text: str) -> "Axes":
    """One line per family over the pairs of ``d`` (rows of ``result``), in layer order;
    ``label(a, b)`` names a pair on the x axis, ``pairs_text`` the pairs in the title."""
    has_null = bool(result.df["null"].notna().any())
    fams = _families(result, families)
    pairs = sorted({(int(a), int(b)) for a, b in d[["layer_a", "layer_b"]].itertuples(index=False)})
    xpos = {p: k for k, p in enumerate(pairs)}
    ax = _new_axes(ax, (7.5, 4.0))
    styles = _family_styles(result.families)  # a family keeps its style whatever is selected
    kind = space(result)
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
        st = styles[fam]
        name = fam
        if kind == "activations":  # a distance and a similarity may share this axis: say which is which
            sim = direction(result, fam) == "similarity"
            name += " (similarity: up = alike)" if sim else " (distance: up = different)"
        ax.plot(x, f[value], ms=3.5, lw=1.6, label=name, **st)
        if value == "residual" and has_null and not one_band:
            ax.plot(x, f["null"], ls="--", lw=1.0, color=st["color"], alpha=0.8)
        drawn += 1
    if drawn == 0:
        raise PlotArgumentError(f"none of the families {fams} has {pairs_text}")
    if value == "rho":
        top = max(1.15, float(np.nanmax(sel["rho"])) * 1.05)
        ax.axhspan(1.0, top, color="#d9d9d9", alpha=0.5, lw=0, zorder=0,
                   label="as different as unrelated")
        ax.axhline(1.0, color="black", ls="--", lw=1.0, zorder=1, label="null: unrelated partner (ρ = 1)")
        ax.set_ylim(-0.02 * top, top)  # a margin below 0: lines at 0 (a model against itself) stay visible
        ax.set_ylabel(value_label("rho", result), fontsize=9)
        what = "ρ along the depth"
    else:
        if one_band:
            xb = [xpos[(int(a), int(b))] for a, b in nb.index]
            ax.fill_between(xb, nb["min"], nb["max"], color="#bbbbbb", alpha=0.6, lw=0, zorder=0,
                            label="null (unrelated partner),\nrange over families")
        elif has_null:
            ax.plot([], [], color="black", ls="--", lw=1.0, label="null of each family (dashed)")
        ax.set_ylim(-0.02 * ax.get_ylim()[1], ax.get_ylim()[1])  # lines at 0 stay visible above the axis
        drawn_fams = [f for f in fams if f in set(d["family"])]
        if kind == "weights":
            ax.set_ylabel(("residual / null" if has_null else "residual") + "\n(unit-normalised Frobenius)",
                          fontsize=9)
        elif kind == "activations":  # one measure: its own label; both: which is which
            ax.set_ylabel(value_label("residual", result, drawn_fams[0] if len(drawn_fams) == 1 else None),
                          fontsize=9)
        else:  # tie damage: say what the numbers are
            ax.set_ylabel(value_label("residual", result) + (" / null" if has_null else ""), fontsize=9)
        what = "residual vs null along the depth" if has_null else "residual along the depth (no null computed)"
        if kind == "activations":
            what = (f"{drawn_fams[0]} ({direction(result, drawn_fams[0])}) along the depth" if len(drawn_fams) == 1
                    else "activation measures along the depth")
    ax.set_xticks(range(len(pairs)), [label(*p) for p in pairs])
    if len(pairs) > 16:
        for k, lab in enumerate(ax.get_xticklabels()):
            lab.set_visible(k % math.ceil(len(pairs) / 16) == 0)
    ax.set_xlabel(xlabel)
    ax.set_title(_title(what, result, pairs=pairs_text), fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return ax
