"""An interactive explorer for notebooks: pick a model, a block of layers, a method, and see
every figure of :mod:`drift.plots` for it.

    >>> ex = drift.widgets.Explorer(model="minilm")
    >>> ex                                   # the widget, in a notebook
    >>> ex.set(block=(0, 3), method="rotation"); ex.refresh()   # or headless, in tests

Analyses go through :mod:`drift.cache`, so a setting seen before (in this session or an
earlier one) is served from disk; the figures of the last few settings are also kept in
memory, so going back to one of them redraws nothing (the drawing, that memory and the HTML
shown are in :mod:`drift.explorer_view`). A long analysis shows a progress bar and can be
stopped with the notebook's interrupt button, also when a control started it: the cache
stores a result only once it is complete, so nothing half-done is left behind.

What the browser shows is kept consistent by construction: the figures are one HTML value
(replaced whole, never appended to), the progress bar is a widget of its own, and every render
and status line carries the setting it belongs to (``data-drift-setting``), so a figure of an
older request can neither linger under a new status nor be shown in its place.

The explorer is testable without a browser: every control has a value that
:meth:`Explorer.set` changes, :meth:`Explorer.refresh` runs synchronously, and the last
``result``, ``figures`` and ``from_cache`` are attributes.

ipywidgets and matplotlib are imported here (matplotlib through :mod:`drift.explorer_view`),
never by ``import drift``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import ipywidgets as W

from .cache import Cache
from .errors import DriftError
from .explorer_view import RENDER_MEMORY, render  # noqa: F401 - importable from here, as before
from .explorer_view import FigureMemory, done_line, figures_html, progress_bar, status_html
from .explorer_view import esc as _esc
from .interrupt import interruptible
from .methods import METHODS as _REGISTRY
from .result import AnalysisResult

log = logging.getLogger(__name__)

METHODS = tuple(_REGISTRY)
PAIRS = ("consecutive", "all")
VALUES = (("ρ", "rho"), ("residual", "residual"))


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


def n_layers(model: str) -> int:
    """Number of layers of ``model``, from its config alone."""
    from .canonical import n_layers_of
    from .checkpoint import Checkpoint

    return n_layers_of(Checkpoint.open(model).config)


class Explorer:
    """Model picker, block slider, method / pairs / value toggles and a family selector over
    the figures of one analysis.

    Args:
        model: a bundled name (``"minilm"``), a local checkpoint folder, or a repo id in the
            local Hugging Face cache.
        block: ``(first, last)`` layers, inclusive (default: every layer).
        method: ``"exact"`` | ``"rotation"`` | ``"raw"``.
        pairs: ``"consecutive"`` | ``"all"``.
        families: families to draw (default: all of the result's).
        value: ``"rho"`` | ``"residual"``: what the heatmaps show.
        cache: a :class:`~drift.cache.Cache`, or a folder for one (default ``~/.cache/drift``).
        progress: pass ``analyze`` its progress bar.
        auto: re-analyse / redraw as soon as a control changes (off: only on :meth:`refresh`).
        dpi: resolution of the rendered figures.
        analyze_kwargs: further arguments for ``drift.analyze`` (``seed``, ``n_null``, ...).

    Attributes:
        result: the last :class:`AnalysisResult` (None before the first refresh).
        figures: the last figures, ``{"ranking", "drift_along", "heatmaps"}`` -> Figure.
        from_cache: whether the last result came from the disk cache.
        timing: seconds of the last refresh: ``result_s`` (getting the result), ``render_s``,
            ``total_s``.
        status: the last message shown under the controls.
        history: one dict per refresh (settings, from_cache, timing).
        widget: the ipywidgets container (what a notebook displays).
    """

    def __init__(self, model: str = "minilm", block: tuple[int, int] | None = None,
                 method: str = "exact", pairs: str = "consecutive",
                 families: Sequence[str] | None = None, value: str = "rho",
                 cache: Cache | str | Path | None = None, progress: bool = True, auto: bool = True,
                 dpi: int = 90, **analyze_kwargs: Any):
        self.cache = cache if isinstance(cache, Cache) else Cache(cache)
        self.progress = progress
        self.auto = auto
        self.dpi = dpi
        self.analyze_kwargs = analyze_kwargs
        self.result: AnalysisResult | None = None
        self.figures: dict[str, Any] = {}
        self.from_cache: bool | None = None
        self.timing: dict[str, float] = {}
        self.status = ""
        self.history: list[dict[str, Any]] = []
        self.interrupted = False
        self._drawn = FigureMemory()  # the figures of the last RENDER_MEMORY views
        self._wanted_families = list(families) if families is not None else None
        self._hold = False
        self._result_digest = ""
        self._unselected: set[str] = set()  # families the user switched off, across methods
        self._requests = 0
        self.shown_setting = ""  # the setting tag of the figures on screen

        label = {"description_width": "72px"}

        known = available_models()
        self._model = W.Dropdown(options=known, value=known[0], description="model", style=label,
                                 layout=W.Layout(width="392px"))
        self._path = W.Text(placeholder="…or a local folder / cached HF repo id",
                            continuous_update=False, layout=W.Layout(width="340px"))
        self._block = W.IntRangeSlider(value=(0, 1), min=0, max=1, description="block",
                                       continuous_update=False, style=label, layout=W.Layout(width="560px"))
        self._method = W.ToggleButtons(options=METHODS, value=_choice(method, METHODS, "method"),
                                       tooltips=[_REGISTRY[m].about for m in METHODS])
        self._pairs = W.ToggleButtons(options=PAIRS, value=_choice(pairs, PAIRS, "pairs"))
        self._value = W.ToggleButtons(options=VALUES, value=_choice(value, [v for _, v in VALUES], "value"))
        self._families = W.SelectMultiple(options=[], rows=6, description="families", style=label,
                                          layout=W.Layout(width="392px"))
        self._status = W.HTML()
        self._bar = W.IntProgress(value=0, min=0, max=1, layout=W.Layout(width="392px", visibility="hidden"))
        self._bar_text = W.Label()
        self._progress = W.HBox([self._bar, self._bar_text])
        self.output = W.HTML()  # the figures: one value, replaced whole
        for w, name in ((self._model, "model"), (self._path, "path"), (self._block, "block"),
                        (self._method, "method"), (self._pairs, "pairs"), (self._value, "value"),
                        (self._families, "families"), (self._status, "status"),
                        (self._progress, "progress"), (self.output, "figures")):
            w.add_class(f"drift-{name}")
        self.widget = W.VBox([
            W.HBox([self._model, self._path]), self._block,
            _labelled("method", self._method), _labelled("pairs", self._pairs),
            _labelled("heatmaps", self._value), self._families,
            self._status, self._progress, self.output,
        ])
        self.widget.add_class("drift-explorer")
        self._set_model(model, block)
        for w in (self._model, self._path, self._block, self._method, self._pairs):
            w.observe(self._on_analysis_change, names="value")
        for w in (self._families, self._value):
            w.observe(self._on_view_change, names="value")

    # ------------------------------------------------------------------ display
    def _ipython_display_(self) -> None:
        from IPython.display import display

        if self.result is None and self.auto:
            self.refresh()
        # The widget, with a readable plain-text fallback for renderers without widget state
        # (GitHub, nbviewer, HTML exports): the widget's own fallback is a long repr.
        bundle = self.widget._repr_mimebundle_()
        bundle["text/plain"] = (f"[drift Explorer: interactive; run the notebook to use it. "
                                f"Last view: {self.describe()}]")
        display(bundle, raw=True)

    def describe(self) -> str:
        """One line: the current settings and where the last result came from."""
        s = self.settings()
        lo, hi = s["block"]
        text = f"{s['model']}, layers {lo}–{hi}, method {s['method']}, {s['pairs']} pairs"
        if self.from_cache is not None:
            text += ", from the cache" if self.from_cache else ", computed"
        return text

    def __repr__(self) -> str:
        return f"Explorer({self.settings()})"

    # ------------------------------------------------------------------ settings
    @property
    def model(self) -> str:
        return self._path.value.strip() or self._model.value

    def settings(self) -> dict[str, Any]:
        """The current choice: model, block, method, pairs, families, value."""
        return dict(model=self.model, block=tuple(self._block.value), method=self._method.value,
                    pairs=self._pairs.value, families=list(self._families.value) or None,
                    value=self._value.value)

    def set(self, model: str | None = None, block: tuple[int, int] | None = None,
            method: str | None = None, pairs: str | None = None,
            families: Sequence[str] | None = None, value: str | None = None) -> "Explorer":
        """Change controls without triggering a refresh (call :meth:`refresh` after).

        Raises:
            ValueError: an unknown method / pairs / value, or a block outside the model.
        """
        self._hold = True
        try:
            if model is not None:
                self._set_model(model, block)
            elif block is not None:
                self._set_block(block)
            if method is not None:
                self._method.value = _choice(method, METHODS, "method")
            if pairs is not None:
                self._pairs.value = _choice(pairs, PAIRS, "pairs")
            if value is not None:
                self._value.value = _choice(value, [v for _, v in VALUES], "value")
            if families is not None:
                self._wanted_families = list(families)
                self._sync_families()
        finally:
            self._hold = False
        return self

    def _set_model(self, model: str, block: tuple[int, int] | None) -> None:
        model = str(model)
        if model in self._model.options:
            self._model.value = model
            self._path.value = ""
        else:
            self._path.value = model
        self._update_slider(block)

    def _update_slider(self, block: tuple[int, int] | None = None) -> None:
        """Fit the slider to the current model's depth and set the block (default: all layers)."""
        try:
            n = n_layers(self.model)
        except DriftError as e:
            self._show_status(f"<b style='color:#b00'>{_esc(e)}</b>", "error")
            return
        self._block.max = n - 1  # clamps the old value into range
        if block is not None:
            self._set_block(block)
        else:  # a new model starts with all of its layers
            self._block.value = (0, n - 1)

    def _set_block(self, block: tuple[int, int]) -> None:
        lo, hi = (int(b) for b in block)
        if not 0 <= lo <= hi <= self._block.max:
            raise ValueError(f"block {block} is outside the model's layers 0..{self._block.max}")
        self._block.value = (lo, hi)

    def _sync_families(self) -> None:
        """Family options from the result; keep the wanted selection where possible."""
        if self.result is None:
            return
        fams = self.result.families
        # A list given in code (constructor or set()) is kept as it is; a selection made in the
        # browser is remembered as what was switched off, so a family a new method or model
        # brings (rotation -> exact adds the circuits) is drawn, not silently left out.
        if self._wanted_families is not None:
            wanted = tuple(f for f in fams if f in self._wanted_families)
        else:
            wanted = tuple(f for f in fams if f not in self._unselected)
        wanted = wanted or tuple(fams)
        if tuple(self._families.options) == tuple(fams) and self._families.value == wanted:
            return
        # Options and selection in one message: the browser never sees a selection that
        # refers to options it does not have.
        with self._families.hold_sync():
            if tuple(self._families.options) != tuple(fams):
                self._families.value = ()
                self._families.options = fams
                self._families.rows = len(fams)
            self._families.value = wanted

    # ------------------------------------------------------------------ events
    def _on_analysis_change(self, change: dict) -> None:
        if self._hold:
            return
        if change["owner"] in (self._model, self._path):
            self._hold = True
            try:
                if change["owner"] is self._model:  # picking from the list overrides the text box
                    self._path.value = ""
                self._update_slider()
            finally:
                self._hold = False
        if self.auto:
            self.refresh()

    def _on_view_change(self, change: dict) -> None:
        if self._hold:
            return
        if change["owner"] is self._families:
            chosen = set(self._families.value)
            self._wanted_families = None
            self._unselected = (self._unselected | set(self._families.options)) - chosen
        if self.auto and self.result is not None:
            render_s = self._render_and_show()
            self._show_status(self._done_line(render_s), "done")

    # ------------------------------------------------------------------ work
    def refresh(self) -> AnalysisResult | None:
        """Get the result for the current settings (from the cache when possible) and draw it.

        Returns the result, or None when the analysis failed or was interrupted (the
        message is in ``status``; the previous figures stay, with their own setting tag).
        """
        s = self.settings()
        lo, hi = s["block"]
        if hi - lo < 1:
            self._show_status("Pick a block of at least two layers.", "error")
            return None
        self._requests += 1
        t0 = time.perf_counter()
        self.interrupted = False
        self._show_status(f"Analysing <code>{_esc(s['model'])}</code>, layers {lo}–{hi}, "
                          f"{s['method']}, {s['pairs']} pairs …", "running")
        failure: BaseException | None = None
        try:
            with interruptible(), progress_bar(self._bar, self._bar_text, self.progress) as progress:
                result, hit = self.cache.get_or_compute(
                    s["model"], layers=list(range(lo, hi + 1)), pairs=s["pairs"], method=s["method"],
                    progress=progress, **self.analyze_kwargs)
        except BaseException as e:  # noqa: BLE001 - sorted out below
            failure = e
        if failure is not None and not isinstance(failure, (KeyboardInterrupt, DriftError)):
            self._show_status(f"<b style='color:#b00'>{type(failure).__name__}: {_esc(failure)}</b>", "error")
            raise failure
        if isinstance(failure, KeyboardInterrupt):
            self.interrupted = True
            self._show_status("Interrupted. Nothing was cached; the figures below are the previous "
                              "ones (their setting is in their caption).", "interrupted")
            return None
        if failure is not None:
            self._show_status(f"<b style='color:#b00'>{_esc(failure)}</b>", "error")
            return None
        t1 = time.perf_counter()
        self.result, self.from_cache = result, hit
        self._result_digest = Cache.digest(self.cache.last_key)
        self._hold = True
        try:
            self._sync_families()
        finally:
            self._hold = False
        render_s = self._render_and_show()
        t2 = time.perf_counter()
        self.timing = {"result_s": t1 - t0, "render_s": render_s, "total_s": t2 - t0}
        self.history.append({**self.settings(), "from_cache": hit, **self.timing})
        self._show_status(self._done_line(render_s), "done")
        return result

    def _done_line(self, render_s: float) -> str:
        return done_line(self.settings(), self.from_cache, self.timing.get("result_s"), render_s)

    def setting_tag(self) -> str:
        """The current setting as one string; renders and status lines carry it."""
        s = self.settings()
        lo, hi = s["block"]
        fams = ",".join(self._families.value)
        return f"{s['model']}|{lo}-{hi}|{s['method']}|{s['pairs']}|{s['value']}|{fams}"

    def _render_and_show(self) -> float:
        """Draw (or recall) the figures of the current result and view; return the seconds."""
        t0 = time.perf_counter()
        fams = tuple(self._families.value) or tuple(self.result.families)
        self.figures, pngs = self._drawn.recall(self.result, self._result_digest, fams,
                                                self._value.value, self.dpi)
        self._show(pngs)
        return time.perf_counter() - t0

    def _show(self, pngs: list[tuple[str, str]]) -> None:
        """Replace the figures (base64 PNGs) in one assignment, tagged with the setting they show."""
        self.shown_setting = self.setting_tag()
        self.output.value = figures_html(pngs, self.shown_setting, self.settings(), self._requests)

    def _show_status(self, html: str, state: str = "done") -> None:
        self.status = html
        self._status.value = status_html(html, self.setting_tag(), state)


def _labelled(name: str, control: W.Widget) -> W.HBox:
    """``control`` with its name on the left, like the other controls' descriptions
    (ToggleButtons put their own description above the buttons in JupyterLab)."""
    label = W.HTML(f'<div style="text-align:right; padding-right:8px">{name}</div>',
                   layout=W.Layout(width="72px", min_width="72px"))
    return W.HBox([label, control])


def _choice(v: str, allowed: Sequence[str], what: str) -> str:
    if v not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}, got {v!r}")
    return v


__all__ = ["Explorer", "available_models", "render"]
