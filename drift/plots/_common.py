"""What every figure shares: value labels, method names and colours, titles, axes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd

from ..methods import METHODS
from ..result import AnalysisResult

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

SPACE_LABELS = {
    "activations": {"residual": "value (residual_angle: distance 0–1; update_cka: similarity 0–1)"},
    "tie": {"residual": "tie damage", "null": "null tie damage (family from an unrelated partner)",
            "rho": "ρ = damage / null tie\n(0: harmless, 1: as damaging as an unrelated operator)"},
}
"""Labels of results that are not weight-space distances (``meta["space"]``)."""


def value_label(value: str, result: AnalysisResult | None = None) -> str:
    """The axis label of ``value`` for ``result``: weight residuals, activation measures or tie damage."""
    meta = {} if result is None else result.meta
    label = SPACE_LABELS.get(meta.get("space"), {}).get(value, VALUE_LABELS[value])
    if meta.get("space") == "tie" and value == "residual":
        label += " (KL, nats/token)" if meta.get("measure") == "kl" else " (relative change of the outputs)"
    return label


METHOD_NAMES = {name: m.title for name, m in METHODS.items()}
"""How titles name each method."""


METHOD_COLORS = {"raw": "#9e9e9e", "rotation": "#e6892e", "exact": "#2b6cb0"}


KIND_COLORS = {"weight": "#2b6cb0", "circuit": "#7b3fa0", "norm": "#3c9d5d", "activation": "#b7791f",
               "tie": "#c05621"}


SAVE_FORMATS = ("png", "svg", "pdf")


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


def _model_name(result: AnalysisResult, which: str = "model") -> str | None:
    """The model (``which="other"``: the other model of a cross-model result) as titles name
    it: a local folder by its last component (a temporary folder's full path is noise), a
    bundled name or an HF repo id as is."""
    model = result.meta.get("model") if which == "model" else (result.meta.get("other") or {}).get("model")
    if not model:
        return None
    model = str(model)
    return Path(model).name or model if model.startswith(("/", ".", "~")) else model


def _layer_labels(result: AnalysisResult) -> tuple[str, str]:
    """Axis labels of layer_a and layer_b: "layer", or for a cross-model result "layer of <model>"."""
    if not result.cross_model:
        return "layer", "layer"
    return tuple(f"layer of {_model_name(result, w) or w}" for w in ("model", "other"))


def _context(result: AnalysisResult, pairs: str | None = None) -> str:
    """'model, pairs' (or 'model vs other, pairs') for titles (method is named separately)."""
    name = _model_name(result)
    if name and result.cross_model:
        name = f"{name} vs {_model_name(result, 'other') or 'other'}"
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

