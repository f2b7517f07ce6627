"""An interactive explorer for notebooks: pick a model, a block of layers, a method, and see
every figure of :mod:`drift.plots` for it.

    >>> ex = drift.widgets.Explorer(model="minilm")
    >>> ex                                   # the widget, in a notebook
    >>> ex.set(block=(0, 3), method="rotation"); ex.refresh()   # or headless, in tests
    >>> ex.set(space="activations").refresh()                   # activation similarity instead
    >>> ex.set(space="weights", other="org/fine-tuned").refresh()  # layer i of one model vs of another

The space toggle chooses what is compared: the weights (:func:`drift.analyze`; with a second
model, ``analyze(model, other=...)`` and its A × B figures) or the activations on the default
text (:func:`drift.function.activation_similarity`; no method and no null, so the method and
heatmap-value controls are disabled there and the figures show the measures themselves).

Analyses go through :mod:`drift.cache`, so a setting seen before (in this session or an
earlier one) is served from disk; the figures of the last few settings are also kept in
memory, so going back to one of them redraws nothing (the drawing, that memory and the HTML
shown are in :mod:`drift.explorer_view`). A long analysis shows a progress bar and can be
stopped with the notebook's interrupt button, also when a control started it: the cache
stores a result only once it is complete, so nothing half-done is left behind. Displayed in a
notebook before its first result, the explorer shows itself first (controls, what it computes,
the progress bar) and computes under it.

What the browser shows is kept consistent by construction: the figures are one HTML value
(replaced whole, never appended to), the progress bar is a widget of its own, and every render
and status line carries the setting it belongs to (``data-drift-setting``), so a figure of an
older request can neither linger under a new status nor be shown in its place.

The explorer is testable without a browser: every control has a value that
:meth:`Explorer.set` changes, :meth:`Explorer.refresh` runs synchronously, and the last
``result``, ``figures`` and ``from_cache`` are attributes.

ipywidgets and matplotlib are imported by :mod:`drift.explorer_view`, on use, never by
``import drift``.
"""

from __future__ import annotations

import logging
import operator
import time
from pathlib import Path
from typing import Any, Sequence

from .analysis import PAIRS as _PAIRS
from .cache import Cache
from .errors import DriftError, ExplorerArgumentError
from .explorer_view import RENDER_MEMORY, render  # noqa: F401 - importable from here, as before
from .explorer_view import (INTERRUPTED, SPACES, FigureMemory, available_models, controls, done_line,
                            error_html, figures_html, progress_bar, reset_bar, running_line, setting_tag,
                            setting_words, status_html)
from .interrupt import interruptible
from .plots._common import _as_list, check_dpi
from .methods import METHODS as _REGISTRY
from .result import AnalysisResult

log = logging.getLogger(__name__)

METHODS = tuple(_REGISTRY)
VALUES = (("ρ", "rho"), ("residual", "residual"))
ANALYSIS = ("model", "block", "space", "method", "other", "pairs")
"""The settings that decide the result (the others only decide how it is drawn)."""


def n_layers(model: str) -> int:
    """Number of layers of ``model``, from its config alone."""
    from .canonical import n_layers_of
    from .checkpoint import Checkpoint

    return n_layers_of(Checkpoint.open(model).config)


class Explorer:
    """Model and second-model pickers, block slider, space / method / pairs / value toggles
    and a family selector over the figures of one analysis.

    Args:
        model: a bundled name (``"minilm"``), a local checkpoint folder, or a repo id in the
            local Hugging Face cache.
        block: ``(first, last)`` layers, inclusive (default: every layer).
        method: ``"exact"`` | ``"rotation"`` | ``"raw"`` (weights only).
        pairs: ``"consecutive"`` (default) | ``"all"``; with ``other``: ``"diagonal"``
            (default) | ``"all"``.
        families: families to draw (default: all of the result's).
        value: ``"rho"`` | ``"residual"``: what the heatmaps show (activations: always the
            residual column, their only number).
        space: ``"weights"`` (default) or ``"activations"``.
        other: a second model of the same architecture and shapes (weights only; default
            none): layer i of ``model`` against layer j of ``other``.
        cache: a :class:`~drift.cache.Cache`, or a folder for one (default ``~/.cache/drift``).
        activation_cache: the cache of the activations space (default: the ``activations``
            namespace in ``cache``'s folder).
        progress: pass ``analyze`` its progress bar.
        auto: re-analyse / redraw as soon as a control changes (off: only on :meth:`refresh`).
        dpi: resolution of the rendered figures.
        activation_kwargs: arguments for ``activation_similarity`` (``n_seq``, ``seq_len``,
            ``seed``, ...; the default text is always used).
        analyze_kwargs: further arguments for ``drift.analyze`` (``seed``, ``n_null``, ...).

    Attributes:
        result: the last :class:`AnalysisResult` (None before the first refresh).
        figures: the last figures, ``{"ranking", "drift_along" or "diagonal_along",
            "heatmaps"}`` -> Figure.
        from_cache: whether the last result came from the disk cache.
        timing: seconds of the last refresh: ``result_s`` (getting the result), ``render_s``,
            ``total_s``.
        status: the last message shown under the controls.
        history: one dict per refresh (settings, from_cache, timing).
        widget: the ipywidgets container (what a notebook displays).
    """

    def __init__(self, model: str = "minilm", block: tuple[int, int] | None = None,
                 method: str = "exact", pairs: str | None = None,
                 families: Sequence[str] | None = None, value: str = "rho", space: str = "weights",
                 other: str | None = None, cache: Cache | str | Path | None = None,
                 activation_cache: Cache | None = None, progress: bool = True, auto: bool = True,
                 dpi: int = 90, activation_kwargs: dict[str, Any] | None = None, **analyze_kwargs: Any):
        self.cache = cache if isinstance(cache, Cache) else Cache(cache)
        self.activation_cache = activation_cache or Cache(self.cache.directory, namespace="activations")
        if "text" in (activation_kwargs or {}):
            raise ExplorerArgumentError("the explorer reads the default text; run activation_similarity for another")
        try:
            check_dpi(dpi)
        except DriftError as e:
            raise ExplorerArgumentError(str(e)) from None
        self.activation_kwargs = dict(activation_kwargs or {})
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
        self._wanted_families = _family_list(families) if families is not None else None
        self._hold = False
        self._unknown_said: tuple[str, ...] = ()  # wanted families a result lacked, last said
        self._result_digest = ""
        self._unselected: set[str] = set()  # families the user switched off, across methods
        self._requests = 0
        self._result_setting: dict[str, Any] = {}  # the ANALYSIS settings of ``result``
        self.shown_setting = ""  # the setting tag of the figures on screen
        self._weights_value: str | None = None  # the heatmap value to restore when back in weights

        c = controls(available_models(), METHODS, [_REGISTRY[m].about for m in METHODS], VALUES)
        (self._model, self._path, self._other, self._block, self._space, self._method, self._pairs,
         self._value, self._families, self._status, self._bar, self._bar_text, self.output, self.widget) = (
            c[k] for k in ("model", "path", "other", "block", "space", "method", "pairs", "value",
                           "families", "status", "bar", "bar_text", "figures", "widget"))
        self._space.value = _choice(space, SPACES, "space")
        self._method.value = _choice(method, METHODS, "method")
        self._value.value = _choice(value, [v for _, v in VALUES], "value")
        self._other.value = str(other or "")
        self._sync_controls()
        if pairs is not None:
            self._pairs.value = _choice(pairs, self._pairs.options, "pairs")
        self._set_model(model, block)
        for w in (self._model, self._path, self._other, self._block, self._space, self._method, self._pairs):
            w.observe(self._on_analysis_change, names="value")
        for w in (self._families, self._value):
            w.observe(self._on_view_change, names="value")

    # ------------------------------------------------------------------ display
    def _ipython_display_(self) -> None:
        from IPython.display import display

        # The first result is got after the widget is on screen: the cell shows the controls,
        # what is being computed and the progress bar at once, not an empty output until the
        # figures are drawn. The widget's messages reach the browser while the cell runs.
        first = self.result is None and self.auto
        if first and _block_error(self.settings()) is None:
            self._show_status(running_line(self.settings()), "running")
            reset_bar(self._bar, self._bar_text, self.progress)
        # The widget, with a readable plain-text fallback for renderers without widget state
        # (GitHub, nbviewer, HTML exports): the widget's own fallback is a long repr.
        view = (f"Opened on: {setting_words(self.settings(), html=False)}" if first
                else f"Last view: {self.describe()}")
        bundle = self.widget._repr_mimebundle_()
        bundle["text/plain"] = f"[drift Explorer: interactive; run the notebook to use it. {view}]"
        handle = display(bundle, raw=True, display_id=True)
        if first:
            self.refresh()
            if handle is not None:  # the saved notebook's fallback then names what was computed
                bundle["text/plain"] = (f"[drift Explorer: interactive; run the notebook to use it. "
                                        f"Last view: {self.describe()}]")
                handle.update(bundle, raw=True)

    def describe(self) -> str:
        """One line: the setting of the figures shown and where their result came from, and
        the controls' setting when it is another one (not run yet, or failed)."""
        if self.result is None:
            return setting_words(self.settings(), html=False) + ", not run yet"
        text = setting_words(self._shown(), html=False)
        text += ", from the cache" if self.from_cache else ", computed"
        if self._analysis() != self._result_setting:
            text += f"; the controls now ask for {setting_words(self.settings(), html=False)} (not shown)"
        return text

    def __repr__(self) -> str:
        return f"Explorer({self.settings()})"

    # ------------------------------------------------------------------ settings
    @property
    def model(self) -> str:
        return self._path.value.strip() or self._model.value

    def settings(self) -> dict[str, Any]:
        """The current choice: model, block, space, method, other, pairs, families, value;
        as it applies: in the activations space ``method`` and ``other`` are None and
        ``value`` is ``"residual"``, whatever their (disabled) controls say."""
        weights = self._space.value == "weights"
        return dict(model=self.model, block=tuple(self._block.value), space=self._space.value,
                    method=self._method.value if weights else None,
                    other=(self._other.value.strip() or None) if weights else None,
                    pairs=self._pairs.value, families=list(self._families.value) or None,
                    value=self._value.value if weights else "residual")

    def set(self, model: str | None = None, block: tuple[int, int] | None = None,
            method: str | None = None, pairs: str | None = None,
            families: Sequence[str] | None = None, value: str | None = None,
            space: str | None = None, other: str | None = None) -> "Explorer":
        """Change controls without triggering a refresh (call :meth:`refresh` after).
        ``other=""`` removes the second model.

        Raises:
            ValueError: an unknown method / pairs / value / space, or a block outside the model.
        """
        self._hold = True
        try:
            if model is not None:
                self._set_model(model, block)
            elif block is not None:
                self._set_block(block)
            if space is not None:
                self._space.value = _choice(space, SPACES, "space")
            if other is not None:
                self._other.value = str(other)
            self._sync_controls()
            if method is not None:
                self._method.value = _choice(method, METHODS, "method")
            if pairs is not None:
                self._pairs.value = _choice(pairs, self._pairs.options, "pairs")
            if value is not None:
                value = _choice(value, [v for _, v in VALUES], "value")
                if self._space.value == "weights":
                    self._value.value = value
                else:  # the toggle shows what activations draw; the choice waits for the weights
                    self._weights_value = value
            if families is not None:
                self._wanted_families = _family_list(families)
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
            self._show_status(error_html(e), "error")
            return
        self._block.max = n - 1  # clamps the old value into range
        if block is not None:
            self._set_block(block)
        else:  # a new model starts with all of its layers
            self._block.value = (0, n - 1)

    def _set_block(self, block: tuple[int, int]) -> None:
        try:
            lo, hi = (operator.index(b) for b in block)
        except (TypeError, ValueError):
            raise ExplorerArgumentError(f"block must be two layer numbers (first, last), not {block!r}") from None
        if not 0 <= lo <= hi <= self._block.max:
            raise ExplorerArgumentError(f"block {block} is outside the model's layers 0..{self._block.max}")
        self._block.value = (lo, hi)

    def _sync_controls(self) -> None:
        """Enable what applies to the space (method, heatmap value and second model: weights
        only) and offer the pairs of one model or of two; consecutive <-> diagonal carry over.
        The disabled heatmap-value toggle of the activations shows what their heatmaps draw
        (the residual column: no null, so no ρ); the weights' choice comes back with them."""
        weights = self._space.value == "weights"
        for w in (self._method, self._value, self._other):
            w.disabled = not weights
        if not weights and self._weights_value is None:
            self._weights_value, self._value.value = self._value.value, "residual"
        elif weights and self._weights_value is not None:
            self._value.value, self._weights_value = self._weights_value, None
        want = _PAIRS[weights and bool(self._other.value.strip())]
        if tuple(self._pairs.options) != want:
            old = self._pairs.value
            with self._pairs.hold_sync():
                self._pairs.options = want
                self._pairs.value = old if old in want else want[0]

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
            unknown = [f for f in self._wanted_families if f not in fams]
            if unknown and tuple(unknown) != self._unknown_said:  # once, not at every refresh
                self._unknown_said = tuple(unknown)
                log.warning("families %s are not in this result (it has %s)%s", ", ".join(map(repr, unknown)),
                            ", ".join(fams), "" if wanted else ": all are drawn")
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
        if change["owner"] in (self._model, self._path, self._space, self._other):
            self._hold = True
            try:
                if change["owner"] is self._model:  # picking from the list overrides the text box
                    self._path.value = ""
                if change["owner"] in (self._model, self._path):
                    self._update_slider()
                self._sync_controls()
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
        # The result of another analysis setting (the one asked for failed or is not run
        # yet) is not redrawn under the new setting's name: its figures stay as they are.
        if self.auto and self.result is not None and self._analysis() == self._result_setting:
            render_s = self._render_and_show()
            self._show_status(self._done_line(render_s, redrawn=True), "done", self._shown_tag())

    # ------------------------------------------------------------------ work
    def refresh(self) -> AnalysisResult | None:
        """Get the result for the current settings (from the cache when possible) and draw it.

        Returns the result, or None when the analysis failed or was interrupted (the
        message is in ``status``; the previous figures stay, with their own setting tag).

        Everything shown is of the settings read when the refresh began: controls changed
        while it computes do not relabel its figures, and a result that a later refresh has
        overtaken (a control changed meanwhile, with ``auto``) is returned but not shown.
        """
        s = self.settings()
        if (error := _block_error(s)) is not None:
            self._show_status(error, "error")
            return None
        self._requests += 1
        request = self._requests
        t0 = time.perf_counter()
        self.interrupted = False
        self._show_status(running_line(s), "running")
        lo, hi = s["block"]
        layers = list(range(lo, hi + 1))
        if s["space"] == "activations":
            cache, unit, kwargs = self.activation_cache, "batches", dict(self.activation_kwargs)
        else:  # ``other`` only when there is one: a stand-in analyze need not take it
            cache, unit = self.cache, "pairs"
            kwargs = dict(method=s["method"], **({"other": s["other"]} if s["other"] else {}), **self.analyze_kwargs)
        failure: BaseException | None = None
        try:
            with interruptible(), progress_bar(self._bar, self._bar_text, self.progress, unit) as progress:
                result, hit, key = cache.get_or_compute_keyed(s["model"], layers=layers, pairs=s["pairs"],
                                                              progress=progress, **kwargs)
        except BaseException as e:  # noqa: BLE001 - sorted out below
            failure = e
        if request != self._requests:  # overtaken: the later refresh shows its own result or failure
            if failure is not None and not isinstance(failure, (KeyboardInterrupt, DriftError)):
                raise failure
            return None if failure is not None else result
        if isinstance(failure, KeyboardInterrupt):
            self.interrupted = True
            self._show_status(INTERRUPTED, "interrupted")
            return None
        if failure is not None:  # a DriftError is the user's to fix, in one line; anything else is a bug
            self._show_status(error_html(failure, with_type=not isinstance(failure, DriftError)), "error")
            if not isinstance(failure, DriftError):
                raise failure
            return None
        t1 = time.perf_counter()
        self.result, self.from_cache = result, hit
        self._result_digest = Cache.digest(key)
        self._result_setting = {k: s[k] for k in ANALYSIS}
        self._hold = True
        try:
            self._sync_families()
        finally:
            self._hold = False
        render_s = self._render_and_show()
        t2 = time.perf_counter()
        self.timing = {"result_s": t1 - t0, "render_s": render_s, "total_s": t2 - t0}
        self.history.append({**self._shown(), "from_cache": hit, **self.timing})
        self._show_status(self._done_line(render_s), "done", self._shown_tag())
        return result

    def _done_line(self, render_s: float, redrawn: bool = False) -> str:
        return done_line(self._shown(), self.from_cache, self.timing.get("result_s"), render_s, redrawn)

    def _shown(self) -> dict[str, Any]:
        """The setting of what is drawn: the result's analysis settings, the current view."""
        shown = {**self.settings(), **self._result_setting}
        shown["value"] = self._value.value if shown["space"] == "weights" else "residual"
        return shown

    def _shown_tag(self) -> str:
        return setting_tag(self._shown(), self._families.value)

    def setting_tag(self) -> str:
        """The current setting as one string; renders and status lines carry it."""
        return setting_tag(self.settings(), self._families.value)

    def _analysis(self) -> dict[str, Any]:
        s = self.settings()
        return {k: s[k] for k in ANALYSIS}

    def _render_and_show(self) -> float:
        """Draw (or recall) the figures of the current result and view; return the seconds."""
        t0 = time.perf_counter()
        fams = tuple(self._families.value) or tuple(self.result.families)
        shown = self._shown()
        self.figures, pngs = self._drawn.recall(self.result, self._result_digest, fams,
                                                shown["value"], self.dpi)
        self._show(pngs, shown)
        return time.perf_counter() - t0

    def _show(self, pngs: list[tuple[str, str]], shown: dict[str, Any]) -> None:
        """Replace the figures (base64 PNGs) in one assignment, tagged with the setting they show."""
        self.shown_setting = setting_tag(shown, self._families.value)
        self.output.value = figures_html(pngs, self.shown_setting, shown, self._requests)

    def _show_status(self, html: str, state: str = "done", tag: str | None = None) -> None:
        """The status line, tagged with the setting it is about (default: the controls')."""
        self.status = html
        self._status.value = status_html(html, tag if tag is not None else self.setting_tag(), state)


def _block_error(settings: dict[str, Any]) -> str | None:
    """Why the block of ``settings`` cannot be analysed (None: it can)."""
    lo, hi = settings["block"]
    return "Pick a block of at least two layers." if hi - lo < 1 else None


def _choice(v: str, allowed: Sequence[str], what: str) -> str:
    if not isinstance(v, str) or v not in allowed:
        raise ExplorerArgumentError(f"{what} must be one of {', '.join(allowed)}, got {v!r}")
    return v


def _family_list(families) -> list[str]:
    """Families given in code: one name or several (as the plots take them, :func:`_as_list`)."""
    try:
        out = _as_list(families)
    except TypeError:
        out = None
    if out is None or not all(isinstance(f, str) for f in out):
        raise ExplorerArgumentError(f"families must be a family name or a list of them, not {families!r}")
    return out


__all__ = ["Explorer", "available_models", "render"]
