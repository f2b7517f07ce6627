"""Weight space next to function space: weight ρ against the tie test's damage."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..errors import PlotArgumentError
from ..result import AnalysisResult
from ..methods import METHODS
from ._common import (METHOD_NAMES, _check_result, _check_same_model, _check_value, _family_styles, _model_name,
                      _new_axes, space, value_label)

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes


def weight_tie_table(weights: AnalysisResult, tie: AnalysisResult, value: str = "rho") -> pd.DataFrame:
    """One row per (family, layer pair) present in both results: the weight view's ``value``
    (``weight``) and the tie test's (``tie``), pairs as (reference, tied layer)."""
    key = ["family", "layer_a", "layer_b"]
    w = weights.df[key + [value]].rename(columns={value: "weight"})
    t = tie.df[key + [value]].rename(columns={value: "tie"})
    return w.merge(t, on=key).dropna()


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN below three points."""
    if len(x) < 3:
        return float("nan")
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    return float(np.corrcoef(rx, ry)[0, 1])


def weight_tie_correlations(weights: AnalysisResult, tie: AnalysisResult, value: str = "rho") -> pd.DataFrame:
    """The numbers :func:`weight_vs_tie` draws, to cite: Spearman's rank correlation between
    the weight view's ``value`` and the tie test's over every (family, layer pair) in both
    (row ``family="all"``, first), then per family, with the number of points (``n``) each
    rests on. NaN below three points. Checked as :func:`weight_vs_tie` checks its arguments."""
    return _correlations(_paired(weights, tie, value))


def _correlations(t: pd.DataFrame) -> pd.DataFrame:
    rows = [("all", len(t), spearman(t["weight"].to_numpy(), t["tie"].to_numpy()))]
    rows += [(fam, len(g), spearman(g["weight"].to_numpy(), g["tie"].to_numpy()))
             for fam, g in t.groupby("family", sort=False)]
    return pd.DataFrame(rows, columns=["family", "n", "rank_corr"])


def _paired(weights: AnalysisResult, tie: AnalysisResult, value: str) -> pd.DataFrame:
    """:func:`weight_tie_table` of two checked results, refused in one line when empty."""
    _check_kinds(weights, tie)
    _check_same_model({"weights": weights, "tie": tie}, "weight_vs_tie(weights, tie)")
    _check_value(value)
    if value in ("rho", "null") and not weights.df[value].notna().any():
        raise PlotArgumentError(f"the weight result has no null (it was computed with n_null=0), so no {value!r} "
                         "to set against the tie's: use value='residual', or analyse with n_null >= 1")
    _check_value(value, tie)
    t = weight_tie_table(weights, tie, value)
    if t.empty:
        raise PlotArgumentError("the two results share no (family, layer pair): analyse the same block and "
                         "families (tie with reference='previous' pairs with consecutive pairs)")
    return t


def weight_vs_tie(weights: AnalysisResult, tie: AnalysisResult, ax: "Axes | None" = None,
                  value: str = "rho") -> "Axes":
    """Each (family, pair): its weight-space ``value`` (x) against the damage of tying that
    family across the pair (y, same ``value``: ρ = damage / null tie by default), one colour
    per family, with the rank correlation over all points and per family in the legend
    (the numbers: :func:`weight_tie_correlations`).

    Does a family that looks alike in weight space also tie without harm? Points near the
    origin are both; points low on x but high on y look alike but are not interchangeable.

    Raises:
        TypeError: an argument that is not a result.
        ValueError: ``weights`` is not a weight result (:func:`drift.analyze`) or ``tie`` not a
            tie result (:func:`drift.function.tie`), e.g. the two swapped; an unknown
            ``value``; ρ or the null asked of a weight result computed without a null; no
            (family, pair) in both.
    """
    t = _paired(weights, tie, value)
    corr = _correlations(t).set_index("family")["rank_corr"]
    ax = _new_axes(ax, (6.2, 4.6))
    groups = list(t.groupby("family", sort=False))
    styles = _family_styles([fam for fam, _ in groups])  # past ten families: another marker
    for fam, g in groups:
        r = corr[fam]
        label = fam if np.isnan(r) else f"{fam} (rank corr. {r:+.2f})"
        ax.scatter(g["weight"], g["tie"], s=28, color=styles[fam]["color"], marker=styles[fam]["marker"],
                   label=label, alpha=0.85)
    r_all = corr["all"]
    if value == "rho":
        ax.axhline(1.0, color="black", ls="--", lw=0.8)
        ax.axvline(1.0, color="black", ls="--", lw=0.8)
    ax.set_xlabel(f"weights: {value_label(value, weights)}", fontsize=8)
    ax.set_ylabel(f"tie: {value_label(value, tie)}", fontsize=8)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    name = _model_name(tie) or ""
    ax.set_title(f"weight space vs tie damage — {name}\nweights: {METHOD_NAMES.get(weights.method, weights.method)}, "
                 f"tie: {METHOD_NAMES.get(tie.method, tie.method)}; rank correlation {r_all:+.2f} "
                 f"over {len(t)} points", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(alpha=0.3)
    return ax


def _check_kinds(weights: AnalysisResult, tie: AnalysisResult) -> None:
    """``weights`` a weight result (``drift.analyze``: no ``meta["space"]``, an alignment
    method), ``tie`` a tie result (``meta["space"] == "tie"``), named when not."""
    _check_result(weights, "weight_vs_tie: weights")
    _check_result(tie, "weight_vs_tie: tie")
    what = {"tie": "a tie result (drift.function.tie)",
            "activations": "an activations result (drift.function.activation_similarity)",
            "weights": "a weight result (drift.analyze)"}
    kinds = space(weights), space(tie)
    if kinds[0] == "weights" and weights.method not in METHODS:
        raise PlotArgumentError(f"weight_vs_tie(weights, tie): weights has method {weights.method!r}, not one of "
                         f"{', '.join(METHODS)}: is it a result of drift.analyze?")
    if kinds[0] != "weights":
        swapped = " (are the two swapped?)" if kinds == ("tie", "weights") else ""
        raise PlotArgumentError(f"weight_vs_tie(weights, tie): weights is {what.get(kinds[0], repr(kinds[0]))}, "
                         f"not a weight result (drift.analyze){swapped}")
    if kinds[1] != "tie":
        raise PlotArgumentError(f"weight_vs_tie(weights, tie): tie is {what.get(kinds[1], repr(kinds[1]))}, "
                         "not a tie result (drift.function.tie)")
