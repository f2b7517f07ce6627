"""What the explorer of :mod:`drift.widgets` shows: a result turned into figures, the figures
into one HTML value, and the status line and progress bar beside them.

The controls and their wiring live in :mod:`drift.widgets`; this module only draws, from a
result it is given (it never analyses). The figures of the last few settings are kept in a
:class:`FigureMemory`, so going back to one of them redraws nothing. The browser contract
(one HTML value replaced whole, every render and status line tagged with its setting) is
described in :mod:`drift.widgets`; the HTML that carries it is written here.

Like the rest of the views, this module cannot change a result, so it is left out of the
cache's code digest (:data:`drift.cache.VIEW_MODULES`). matplotlib is imported where used.
"""

from __future__ import annotations

import base64
import contextlib
import html as _html
import io
from collections import OrderedDict
from typing import Any, Iterator, Sequence

from . import plots
from .result import AnalysisResult

RENDER_MEMORY = 8
"""How many settings' figures are kept in memory."""


def render(result: AnalysisResult, families: Sequence[str] | None = None,
           value: str = "rho") -> dict[str, Any]:
    """The explorer's figures for ``result``, as pyplot-free Figures (nothing is displayed):
    ``ranking``, ``drift_along`` (ρ and residual vs null, when the result has
    consecutive pairs, one above the other) and ``heatmaps`` (a grid of the families)."""
    from matplotlib.figure import Figure

    fams = list(families) if families else result.families
    out: dict[str, Any] = {}
    fig = Figure(figsize=(7.5, 0.38 * len(fams) + 1.8), layout="constrained")
    plots.ranking(result, ax=fig.subplots(), families=fams)
    out["ranking"] = fig
    if not result.consecutive().df.empty:
        # One above the other: side by side, the figure is scaled down to the notebook's
        # width and the legends become unreadable.
        fig = Figure(figsize=(9, 8.4), layout="constrained")
        a1, a2 = fig.subplots(2, 1)
        plots.drift_along(result, families=fams, ax=a1)
        plots.drift_along(result, families=fams, ax=a2, value="residual")
        out["drift_along"] = fig
    fig = Figure()
    plots.heatmap_grid(result, families=fams, value=value, fig=fig)
    out["heatmaps"] = fig
    return out


class FigureMemory:
    """The figures of the last :data:`RENDER_MEMORY` views, each drawn once.

    A view is keyed by the digest of the result's cache key, the families drawn and the
    heatmaps' value; the least recently shown one is forgotten first. Each entry holds the
    Figures and their PNGs (base64), so a revisit neither draws nor encodes.
    """

    def __init__(self) -> None:
        self._views: OrderedDict[tuple, tuple[dict, list[tuple[str, str]]]] = OrderedDict()

    def recall(self, result: AnalysisResult, digest: str, families: tuple[str, ...],
               value: str, dpi: int) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        """``(figures, [(name, base64 PNG), ...])`` of ``result`` for this view, drawn only
        if it is not remembered (``dpi`` is not part of the key)."""
        key = (digest, families, value)
        if key in self._views:
            self._views.move_to_end(key)
            return self._views[key]
        figures = render(result, families=list(families), value=value)
        pngs = [(name, base64.b64encode(_png(f, dpi)).decode()) for name, f in figures.items()]
        self._views[key] = (figures, pngs)
        while len(self._views) > RENDER_MEMORY:
            self._views.popitem(last=False)
        return figures, pngs


def figures_html(pngs: list[tuple[str, str]], tag: str, settings: dict[str, Any],
                 request: int) -> str:
    """The figures (base64 PNGs) as one HTML value, captioned with the setting they show and
    tagged with it (``data-drift-setting``) and with the request that drew them."""
    tag = esc(tag)
    lo, hi = settings["block"]
    caption = (f'<div class="drift-caption" style="margin:4px 0">Figures of <code>{esc(settings["model"])}</code>, '
               f'layers {lo}–{hi}, {settings["method"]}, {settings["pairs"]} pairs.</div>')
    imgs = "".join(
        f'<img class="drift-figure" alt="{name}" data-drift-setting="{tag}" style="max-width:100%" '
        f'src="data:image/png;base64,{png}"><br>' for name, png in pngs)
    return (f'<div class="drift-render" data-drift-setting="{tag}" '
            f'data-drift-request="{request}">{caption}{imgs}</div>')


def status_html(message: str, tag: str, state: str) -> str:
    """A status line (``message`` is HTML) tagged with its setting and state."""
    return (f'<span class="drift-state" data-drift-setting="{esc(tag)}" '
            f'data-drift-state="{state}">{message}</span>')


def done_line(settings: dict[str, Any], from_cache: bool | None, result_s: float | None,
              render_s: float) -> str:
    """The status of a finished refresh: the setting, where the result came from, the times."""
    lo, hi = settings["block"]
    where = "from the cache" if from_cache else "computed"
    took = f" in {result_s:.2f} s" if result_s is not None else ""
    return (f"<code>{esc(settings['model'])}</code>, layers {lo}–{hi}, {settings['method']}, "
            f"{settings['pairs']} pairs: result {where}{took}, drawn in {render_s:.2f} s.")


@contextlib.contextmanager
def progress_bar(bar: Any, text: Any, shown: bool) -> Iterator[Any]:
    """A progress function for ``analyze`` that moves ``bar`` (an IntProgress) and its
    ``text`` (a Label); ``False`` (no progress) when not ``shown``. Hidden again on exit."""

    def progress(done: int, total: int) -> None:
        bar.max, bar.value = max(total, 1), done
        text.value = f"{done}/{total} pairs"

    bar.value, text.value = 0, ""
    bar.layout.visibility = "visible" if shown else "hidden"
    try:
        yield progress if shown else False
    finally:
        bar.layout.visibility = "hidden"
        text.value = ""


def esc(x: Any) -> str:
    """``x`` as text, escaped for HTML."""
    return _html.escape(str(x))


def _png(fig: Any, dpi: int) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


__all__ = ["FigureMemory", "RENDER_MEMORY", "done_line", "esc", "figures_html", "progress_bar",
           "render", "status_html"]
