"""What every figure shares: value labels, method names and colours, titles, axes."""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd

from ..methods import METHODS
from ..errors import PlotArgumentError
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

SPACE_SHORT = {"tie": {"residual": "damage", "null": "null damage"}}
"""Short names (titles) of the values of results that are not weight-space distances."""

MEASURES = {
    "residual_angle": ("distance", "residual_angle: distance (residual streams)\n"
                                   "0: same direction, 0.5: orthogonal\nlarger = more different"),
    "update_cka": ("similarity", "update_cka: similarity (CKA of the updates)\n"
                                 "1: alike up to rotation and scale\nlarger = more alike"),
}
"""Each activation measure (a family of ``space="activations"``): ``distance`` (larger = more
different, like a weight residual) or ``similarity`` (larger = more alike), and its label. A
figure never puts a distance and a similarity on one scale: a ranking shows a similarity as
1 − similarity, a heatmap grid gives each its own colour bar."""

SPACE_LABELS = {
    "activations": {"residual": "value: residual_angle a distance (larger = more different),\n"
                                "update_cka a similarity (larger = more alike)"},
    "tie": {"residual": "tie damage", "null": "null tie damage (family from an unrelated partner)",
            "rho": "ρ = damage / null tie\n(0: harmless, 1: as damaging as an unrelated operator)"},
}
"""Labels of results that are not weight-space distances (``meta["space"]``); an activation
measure drawn alone carries its own label (:data:`MEASURES`)."""


def space(result: AnalysisResult) -> str:
    """What ``result`` measures: ``"weights"`` (:func:`drift.analyze`), ``"activations"``
    (:func:`drift.function.activation_similarity`) or ``"tie"`` (:func:`drift.function.tie`),
    from ``meta["space"]`` (a weight result has none), else the table's one ``space``."""
    if result.meta.get("space"):
        return str(result.meta["space"])
    spaces = set(result.df["space"]) if "space" in result.df else set()
    return str(spaces.pop()) if len(spaces) == 1 else "weights"


def direction(result: AnalysisResult, family: str) -> str:
    """``"similarity"`` (larger = more alike) or ``"distance"`` (larger = more different: every
    weight residual, tie damage and ρ; the activation measures of :data:`MEASURES` as declared).

    Raises:
        ValueError: an activation family that :data:`MEASURES` does not describe.
    """
    if space(result) != "activations":
        return "distance"
    if family not in MEASURES:
        raise PlotArgumentError(f"activation measure {family!r} has no declared direction (distance or similarity) "
                         f"in drift.plots._common.MEASURES (it knows {', '.join(MEASURES)})")
    return MEASURES[family][0]


def value_label(value: str, result: AnalysisResult | None = None, family: str | None = None) -> str:
    """The axis label of ``value`` for ``result``: weight residuals, activation measures (of
    ``family`` alone, when given) or tie damage."""
    meta = {} if result is None else result.meta
    if result is not None and family is not None and space(result) == "activations":
        direction(result, family)  # refuses a measure it cannot label
        return MEASURES[family][1]
    label = SPACE_LABELS.get(meta.get("space"), {}).get(value, VALUE_LABELS[value])
    if meta.get("space") == "tie" and value == "residual":
        label += " (KL, nats/token)" if meta.get("measure") == "kl" else " (relative change of the outputs)"
    return label


def value_short(value: str, result: AnalysisResult, family: str | None = None) -> str:
    """The short name of ``value`` in a title: ρ, residual, damage, or an activation measure's
    direction (distance, similarity)."""
    if space(result) == "activations":
        return direction(result, family) if family is not None else "activation measures"
    return SPACE_SHORT.get(space(result), {}).get(value, VALUE_SHORT[value])


METHOD_NAMES = {name: m.title for name, m in METHODS.items()}
"""How titles name each method."""


METHOD_COLORS = {"raw": "#9e9e9e", "rotation": "#e6892e", "exact": "#2b6cb0"}


KIND_COLORS = {"weight": "#2b6cb0", "circuit": "#7b3fa0", "norm": "#3c9d5d", "activation": "#b7791f",
               "tie": "#c05621"}


SAVE_FORMATS = ("png", "svg", "pdf")


def _check_value(value: str, result: AnalysisResult | None = None) -> None:
    if value not in VALUE_LABELS:
        raise PlotArgumentError(f"value must be one of {', '.join(VALUE_LABELS)}, got {value!r}")
    if result is not None and result.df.empty:
        raise PlotArgumentError("this result has no rows (no layer pair) to plot")
    if result is not None and value in ("rho", "null") and not result.df[value].notna().any():
        if space(result) == "activations":
            raise PlotArgumentError(f"activation measures have no null, so no {value!r} to plot (nothing is fitted "
                             "against an unrelated partner): use value='residual'")
        raise PlotArgumentError(f"this result has no null (it was computed with n_null=0), so no {value!r} "
                         "to plot: use value='residual', or analyse with n_null >= 1")


def _check_result(result: Any, what: str) -> None:
    """Refuse anything but a result, before drawing."""
    if not isinstance(result, AnalysisResult):
        raise TypeError(f"{what} needs an AnalysisResult (from drift.analyze, drift.function.tie or "
                        f"drift.function.activation_similarity), got {type(result).__name__}")


def _check_same_model(results: dict[str, AnalysisResult], what: str) -> None:
    """Results drawn together must be of one model (and, for two-model results, the same other
    one): their rows are paired or set side by side by family and layer only. Refused when
    their checkpoints are certainly different (other folders, other weight files or sizes);
    when only the names or folders differ (the same files read elsewhere, a result without an
    identity), a warning says so."""
    import warnings

    from ..checkpoint import identity_files
    from ..output import model_metas

    labels = list(results)
    first = model_metas(results[labels[0]].meta)
    for label in labels[1:]:
        these = model_metas(results[label].meta)
        if len(these) != len(first):
            raise PlotArgumentError(f"{what}: {labels[0]} and {label} compare {len(first)} and {len(these)} models")
        for a, b in zip(first, these):
            wa, wb = identity_files(a.get("identity")), identity_files(b.get("identity"))
            if wa is not None and wb is not None and wa != wb:
                if wa[1] != wb[1]:
                    raise PlotArgumentError(
                        f"{what}: the results are of different models ({labels[0]}: {a.get('model')!r} in {wa[0]}, "
                        f"{label}: {b.get('model')!r} in {wb[0]}: other weight files); their rows would be "
                        "paired by family and layer alone")
                warnings.warn(f"{what}: {labels[0]} and {label} were computed from checkpoints in {wa[0]} and "
                              f"{wb[0]} (the same weight files and sizes): make sure they are one model", stacklevel=3)
            elif (wa is None or wb is None) and str(a.get("model")) != str(b.get("model")):
                warnings.warn(f"{what}: {labels[0]} names the model {a.get('model')!r} and {label} "
                              f"{b.get('model')!r}: make sure they are one model", stacklevel=3)


def _method(result: AnalysisResult) -> str:
    if space(result) == "activations":
        return "none (activations)"
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


def _model_names(result: AnalysisResult) -> tuple[str, str]:
    """The model and the other model of a cross-model result as titles and axes name them,
    "(A)" and "(B)" added when the two names are the same (a model against itself, or two
    checkpoints in folders of one name), so that the axes stay apart."""
    a, b = _model_name(result) or "model", _model_name(result, "other") or "other"
    return (f"{a} (A)", f"{b} (B)") if a == b else (a, b)


def _layer_labels(result: AnalysisResult) -> tuple[str, str]:
    """Axis labels of layer_a and layer_b: "layer", or for a cross-model result "layer of <model>"."""
    if not result.cross_model:
        return "layer", "layer"
    return tuple(f"layer of {name}" for name in _model_names(result))


def _context(result: AnalysisResult, pairs: str | None = None) -> str:
    """'model, pairs' (or 'model vs other, pairs') for titles (method is named separately)."""
    name = _model_name(result)
    if name and result.cross_model:
        name = " vs ".join(_model_names(result))
    parts = [name] if name else []
    parts.append(pairs or _pairs_text(result))
    return ", ".join(parts)


def _title(what: str, result: AnalysisResult, pairs: str | None = None) -> str:
    ctx = _context(result, pairs)
    return f"{what}\nmethod: {_method(result)}" + (f" — {ctx}" if ctx else "")


def check_dpi(dpi, figure: bool = False) -> None:
    """A figure resolution: a positive number (or matplotlib's ``"figure"``, where allowed)."""
    if figure and isinstance(dpi, str) and dpi == "figure":
        return
    if isinstance(dpi, bool) or not isinstance(dpi, numbers.Real) or not dpi > 0:
        raise PlotArgumentError(f"dpi must be a positive number, not {dpi!r}")


def _as_list(families: str | Sequence[str] | None) -> list[str] | None:
    """``families`` as a list: one family name (a str) is a list of one, not of its characters."""
    if families is None:
        return None
    return [families] if isinstance(families, str) else list(families)


def _families(result: AnalysisResult, families: str | Sequence[str] | None) -> list[str]:
    if families is None:
        return result.families
    fams = _as_list(families)
    unknown = [f for f in fams if f not in result.families]
    if unknown:
        raise PlotArgumentError(f"families {unknown} are not in the result (it has {', '.join(result.families)})")
    if not fams:
        raise PlotArgumentError("families is empty")
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
        raise PlotArgumentError("the result has no consecutive pairs (layer_b == layer_a + 1) to plot along depth")
    return d


def _color_limits(value: str, data: np.ndarray, null_top: float, similarity: bool = False) -> tuple[float, float]:
    """Colour range starting at 0 whose top is "as different as unrelated": ρ = 1, or for
    residuals the largest null of the families drawn, so equal colours mean equal verdicts.
    A similarity (update_cka) runs from 0 to 1, "alike"."""
    finite = data[np.isfinite(data)]
    top = float(finite.max()) if finite.size else 1.0
    if similarity:
        return min(0.0, float(finite.min()) if finite.size else 0.0), max(1.0, top)
    if value == "rho":
        return 0.0, max(1.0, top)
    return 0.0, max(top, null_top, 1e-12)


def _cmap(cmap: str | None, similarity: bool) -> str:
    """The colour map: as given, or by default viridis with dark = alike, i.e. reversed for a
    similarity (dark = small for a distance, dark = large for a similarity)."""
    if cmap is not None:
        return cmap
    return "viridis_r" if similarity else "viridis"


def _wrap(label: str, length_in: float, fontsize: float) -> str:
    """``label`` with each line wrapped to fit ``length_in`` inches at ``fontsize`` (a colour
    bar's label longer than the bar runs off the figure)."""
    import textwrap

    width = max(16, int(length_in * 72 / (0.5 * fontsize)))  # ~0.5 em a character (DejaVu Sans)
    return "\n".join(textwrap.fill(line, width) for line in label.split("\n"))


def _family_styles(fams: Sequence[str]) -> dict[str, dict[str, Any]]:
    """A line style per family (``color``, ``marker``, ``ls``) that keeps neighbours apart:
    the ten tab10 hues in turn, and from the eleventh family on another marker and line style
    (tab20's pairs of light and dark shades are hard to tell apart on a line)."""
    import matplotlib

    hues = matplotlib.colormaps["tab10"]
    markers, styles = "osD^v", ["-", "-.", ":", "-", "-."]
    return {f: dict(color=hues(k % 10), marker=markers[(k // 10) % len(markers)],
                    ls=styles[(k // 10) % len(styles)]) for k, f in enumerate(fams)}


def _null_top(result: AnalysisResult, families: Sequence[str]) -> float:
    nulls = result.df.loc[result.df["family"].isin(families), "null"].to_numpy(dtype=float)
    nulls = nulls[np.isfinite(nulls)]
    return float(nulls.max()) if nulls.size else 0.0

