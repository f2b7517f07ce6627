"""Weight space next to function space: weight ρ against the tie test's damage."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..result import AnalysisResult
from ._common import METHOD_NAMES, _model_name, _new_axes, value_label

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


def weight_vs_tie(weights: AnalysisResult, tie: AnalysisResult, ax: "Axes | None" = None,
                  value: str = "rho") -> "Axes":
    """Each (family, pair): its weight-space ``value`` (x) against the damage of tying that
    family across the pair (y, same ``value``: ρ = damage / null tie by default), one colour
    per family, with the rank correlation over all points and per family in the legend.

    Does a family that looks alike in weight space also tie without harm? Points near the
    origin are both; points low on x but high on y look alike but are not interchangeable.
    """
    t = weight_tie_table(weights, tie, value)
    if t.empty:
        raise ValueError("the two results share no (family, layer pair): analyse the same block and "
                         "families (tie with reference='previous' pairs with consecutive pairs)")
    ax = _new_axes(ax, (6.2, 4.6))
    for k, (fam, g) in enumerate(t.groupby("family", sort=False)):
        r = spearman(g["weight"].to_numpy(), g["tie"].to_numpy())
        label = fam if np.isnan(r) else f"{fam} (rank corr. {r:+.2f})"
        ax.scatter(g["weight"], g["tie"], s=28, color=f"C{k % 10}", label=label, alpha=0.85)
    r_all = spearman(t["weight"].to_numpy(), t["tie"].to_numpy())
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
