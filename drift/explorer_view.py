"""What the explorer of :mod:`drift.widgets` shows: its controls laid out (and the models its
picker offers), a result turned into figures, the figures into one HTML value, and the
status line and progress bar beside them.

The controls' values and wiring live in :mod:`drift.widgets`; this module only draws, from a
result it is given (it never analyses), and says in words and in a tag which setting a
render or status line belongs to. The figures of the last few settings are kept in a
:class:`FigureMemory`, so going back to one of them redraws nothing. The browser contract
(one HTML value replaced whole, every render and status line tagged with its setting) is
described in :mod:`drift.widgets`; the HTML that carries it is written here.

Like the rest of the views, this module cannot change a result, so it is left out of the
cache's code digest (:data:`drift.cache.VIEW_MODULES`). matplotlib and ipywidgets are
imported where used.
"""

from __future__ import annotations

import base64
import contextlib
import html as _html
import io
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Sequence

from . import plots
from .plots._common import space
from .result import AnalysisResult

RENDER_MEMORY = 8
"""How many settings' figures are kept in memory."""


def render(result: AnalysisResult, families: Sequence[str] | None = None,
           value: str = "rho") -> dict[str, Any]:
    """The explorer's figures for ``result``, as pyplot-free Figures (nothing is displayed):
    ``ranking``; along the depth ``drift_along`` (consecutive pairs of one model) or, of a
    cross-model result, ``diagonal_along`` (layer L of both models), each as ρ above residual
    vs null; and ``heatmaps`` (a grid of the families, showing ``value``). A result without a
    null (activations, ``n_null=0``) has no ρ: its ranking and depth figure show the residual
    column alone, and ``value`` must be ``"residual"``. Activation measures (a distance and a
    similarity) are drawn along the depth one per panel, each on its own axis and label."""
    from matplotlib.figure import Figure

    fams = list(families) if families else result.families
    has_null = bool(result.df["null"].notna().any())
    values = ["rho", "residual"] if has_null else ["residual"]
    out: dict[str, Any] = {}
    fig = Figure(figsize=(7.5, 0.38 * len(fams) + 1.8), layout="constrained")
    plots.ranking(result, ax=fig.subplots(), families=fams, value=values[0])
    out["ranking"] = fig
    # A cross-model table's consecutive-looking rows (A's L against B's L+1) are no depth
    # profile of either model: its profile is the diagonal.
    name, along, rows = (("diagonal_along", plots.diagonal_along, result.diagonal()) if result.cross_model
                         else ("drift_along", plots.drift_along, result.consecutive()))
    # (value, families) of each panel: a distance and a similarity never share one y axis.
    panels = ([("residual", [f]) for f in fams] if space(result) == "activations"
              else [(v, fams) for v in values])
    if not rows.df.empty:
        # One above the other: side by side, the figure is scaled down to the notebook's
        # width and the legends become unreadable.
        fig = Figure(figsize=(9, 4.2 * len(panels)), layout="constrained")
        for ax, (v, shown) in zip([fig.subplots()] if len(panels) == 1 else fig.subplots(len(panels), 1), panels):
            along(result, families=shown, ax=ax, value=v)
        out[name] = fig
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


SPACES = ("weights", "activations")
"""What the explorer compares: weights (``drift.analyze``) or activations
(``drift.function.activation_similarity``, where no method applies)."""

NO_METHOD = "activations (the method does not apply)"
"""How a setting of the activations space is named where a weights setting names its method."""


def available_models() -> list[str]:
    """Models the explorer can offer without the network: the bundled ``minilm`` and
    ``tiny-qwen3``, and every model repo in the local Hugging Face cache whose architecture
    drift supports."""
    import json

    from .archs import find_arch
    from .checkpoint import BUNDLED, TINY_QWEN3, TINY_QWEN3_DIR

    names = list(BUNDLED) + ([TINY_QWEN3] if (TINY_QWEN3_DIR / "final" / "config.json").is_file() else [])
    try:
        from huggingface_hub import scan_cache_dir

        repos = scan_cache_dir().repos
    except Exception:  # no cache folder yet, or an unreadable one: offer what is bundled
        return names
    for repo in sorted(repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        snap = max(repo.revisions, key=lambda r: r.last_modified).snapshot_path
        try:
            find_arch(json.loads((Path(snap) / "config.json").read_text()))
        except Exception:  # no config, unreadable, or an architecture drift refuses
            continue
        names.append(repo.repo_id)
    return names


def setting_tag(settings: dict[str, Any], families: Sequence[str]) -> str:
    """A setting as one string, ``model|lo-hi|method|pairs|value|space|other|families``
    (method and other empty where they do not apply); renders and status lines carry it."""
    lo, hi = settings["block"]
    return "|".join([settings["model"], f"{lo}-{hi}", settings["method"] or "", settings["pairs"],
                     settings["value"], settings["space"], settings["other"] or "", ",".join(families)])


def setting_words(settings: dict[str, Any], html: bool = True) -> str:
    """A setting in words: ``model [vs other], layers a–b, method (or what the activations
    space has instead), pairs pairs``; models in ``<code>`` when ``html``."""
    name = (lambda m: f"<code>{esc(m)}</code>") if html else str
    lo, hi = settings["block"]
    models = name(settings["model"]) + (f" vs {name(settings['other'])}" if settings["other"] else "")
    return f"{models}, layers {lo}–{hi}, {settings['method'] or NO_METHOD}, {settings['pairs']} pairs"


def figures_html(pngs: list[tuple[str, str]], tag: str, settings: dict[str, Any],
                 request: int) -> str:
    """The figures (base64 PNGs) as one HTML value, captioned with the setting they show and
    tagged with it (``data-drift-setting``) and with the request that drew them."""
    tag = esc(tag)
    caption = f'<div class="drift-caption" style="margin:4px 0">Figures of {setting_words(settings)}.</div>'
    imgs = "".join(
        f'<img class="drift-figure" alt="{name}" data-drift-setting="{tag}" style="max-width:100%" '
        f'src="data:image/png;base64,{png}"><br>' for name, png in pngs)
    return (f'<div class="drift-render" data-drift-setting="{tag}" '
            f'data-drift-request="{request}">{caption}{imgs}</div>')


INTERRUPTED = ("Interrupted. Nothing was cached; the figures below are the previous ones "
               "(their setting is in their caption).")


def error_html(e: BaseException, with_type: bool = False) -> str:
    """An error as the status line shows it: its message (and type, for a bug), in red."""
    return f"<b style='color:#b00'>{esc(f'{type(e).__name__}: {e}' if with_type else e)}</b>"


def status_html(message: str, tag: str, state: str) -> str:
    """A status line (``message`` is HTML) tagged with its setting and state."""
    return (f'<span class="drift-state" data-drift-setting="{esc(tag)}" '
            f'data-drift-state="{state}">{message}</span>')


def running_line(settings: dict[str, Any]) -> str:
    """The status while a result is got: what is computed (a setting seen before comes from
    the cache instead, at once)."""
    return f"Computing {setting_words(settings)} …"


def done_line(settings: dict[str, Any], from_cache: bool | None, result_s: float | None,
              render_s: float, redrawn: bool = False) -> str:
    """The status of a finished refresh: the setting, where the result came from, the times.

    ``redrawn``: only the view changed (families, heatmap value), so nothing was computed or
    read now; the line says so and names no compute time (it would be the old one's)."""
    if redrawn:
        source = "read from the cache" if from_cache else "already computed"
        return f"{setting_words(settings)}: redrawn in {render_s:.2f} s from the result {source}; nothing recomputed."
    where = "from the cache" if from_cache else "computed"
    took = f" in {result_s:.2f} s" if result_s is not None else ""
    return f"{setting_words(settings)}: result {where}{took}, drawn in {render_s:.2f} s."


def reset_bar(bar: Any, text: Any, shown: bool) -> None:
    """``bar`` (an IntProgress) at zero, its ``text`` (a Label) empty, visible when ``shown``."""
    bar.value, text.value = 0, ""
    bar.layout.visibility = "visible" if shown else "hidden"


@contextlib.contextmanager
def progress_bar(bar: Any, text: Any, shown: bool, unit: str = "pairs") -> Iterator[Any]:
    """A progress function for ``analyze`` that moves ``bar`` (an IntProgress) and its
    ``text`` (a Label, counting ``unit``); ``False`` (no progress) when not ``shown``. Hidden
    again on exit."""

    def progress(done: int, total: int) -> None:
        bar.max, bar.value = max(total, 1), done
        text.value = f"{done}/{total} {unit}"

    reset_bar(bar, text, shown)
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


def controls(models: Sequence[str], methods: Sequence[str], method_tips: Sequence[str],
             values: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """The explorer's widgets, by name, each with its ``drift-<name>`` class (the browser's
    handle on it), and ``widget``, the container they are laid out in. The explorer sets
    their values and wires them."""
    import ipywidgets as W

    label, wide = {"description_width": "72px"}, W.Layout(width="392px")
    c = dict(
        model=W.Dropdown(options=models, value=models[0], description="model", style=label, layout=wide),
        path=W.Text(placeholder="…or a local folder / cached HF repo id", continuous_update=False,
                    layout=W.Layout(width="340px")),
        other=W.Combobox(options=models, placeholder="none, or a model of the same shapes", ensure_option=False,
                         continuous_update=False, description="vs other", style=label, layout=wide),
        block=W.IntRangeSlider(value=(0, 1), min=0, max=1, description="block", continuous_update=False,
                               style=label, layout=W.Layout(width="560px")),
        space=W.ToggleButtons(options=SPACES), method=W.ToggleButtons(options=methods, tooltips=list(method_tips)),
        pairs=W.ToggleButtons(), value=W.ToggleButtons(options=values),
        families=W.SelectMultiple(options=[], rows=6, description="families", style=label, layout=wide),
        status=W.HTML(), bar=W.IntProgress(value=0, min=0, max=1, layout=W.Layout(width="392px", visibility="hidden")),
        bar_text=W.Label(), figures=W.HTML())  # the figures: one value, replaced whole
    c["progress"] = W.HBox([c["bar"], c["bar_text"]])
    for name, w in c.items():
        if name not in ("bar", "bar_text"):
            w.add_class(f"drift-{name}")
    c["widget"] = W.VBox([
        W.HBox([c["model"], c["path"]]), c["other"], c["block"], _labelled("space", c["space"]),
        _labelled("method", c["method"]), _labelled("pairs", c["pairs"]), _labelled("heatmaps", c["value"]),
        c["families"], c["status"], c["progress"], c["figures"]])
    c["widget"].add_class("drift-explorer")
    return c


def _labelled(name: str, control: Any) -> Any:
    """``control`` with its name on the left, like the other controls' descriptions
    (ToggleButtons put their own description above the buttons in JupyterLab)."""
    import ipywidgets as W

    label = W.HTML(f'<div style="text-align:right; padding-right:8px">{name}</div>',
                   layout=W.Layout(width="72px", min_width="72px"))
    return W.HBox([label, control])


__all__ = ["INTERRUPTED", "NO_METHOD", "RENDER_MEMORY", "SPACES", "FigureMemory", "available_models",
           "controls", "done_line", "error_html", "esc", "figures_html", "progress_bar", "render",
           "reset_bar", "running_line", "setting_tag", "setting_words", "status_html"]
