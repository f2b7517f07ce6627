"""drift.widgets.Explorer, headless: every control re-renders, revisits come from the cache,
an interrupted run leaves the cache and the figures as they were."""

from __future__ import annotations

import functools
import html
import os
import re
import signal
import time

import json
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import numpy as np

matplotlib.use("Agg")

import pytest  # noqa: E402

import drift  # noqa: E402
from drift import plots  # noqa: E402
from drift.cache import Cache  # noqa: E402
from drift.widgets import Explorer, available_models, render  # noqa: E402

from _synthetic import make_result  # noqa: E402


@pytest.fixture
def llama(toy_checkpoint) -> Path:
    return toy_checkpoint("llama")[0]  # 3 layers, GLU, RoPE


@pytest.fixture
def bert(toy_checkpoint) -> Path:
    return toy_checkpoint("bert")[0]


@pytest.fixture
def cache(tmp_path) -> Cache:
    return Cache(tmp_path / "cache")


FEW = ["q_proj", "k_proj"]
"""Families every architecture has; drawing few keeps the tests quick (drawing is most of a refresh)."""


def _explorer(model, cache, **kw) -> Explorer:
    return Explorer(model=str(model), cache=cache, progress=False, **{"families": FEW, **kw})


def _heatmap_titles(ex: Explorer) -> list[str]:
    return [ax.get_title() for ax in ex.figures["heatmaps"].axes if ax.images]


def _all_titles(ex: Explorer) -> str:
    out = []
    for fig in ex.figures.values():
        out += [ax.get_title() for ax in fig.axes]
        if fig._suptitle is not None:
            out.append(fig._suptitle.get_text())
    return "\n".join(out)


# --------------------------------------------------------------------------- basics

def test_first_refresh_renders_every_figure(llama, cache):
    ex = _explorer(llama, cache)
    assert ex.result is None and ex.settings()["block"] == (0, 2)
    r = ex.refresh()
    assert r is ex.result and r.method == "exact" and r.meta["layers"] == [0, 1, 2]
    assert set(ex.figures) == {"ranking", "drift_along", "heatmaps"}
    imgs = re.findall(r'<img class="drift-figure" alt="(\w+)" data-drift-setting="([^"]*)"', ex.output.value)
    assert [name for name, _ in imgs] == ["ranking", "drift_along", "heatmaps"]
    assert {tag for _, tag in imgs} == {html.escape(ex.setting_tag())} == {ex.shown_setting and html.escape(ex.shown_setting)}
    assert f'data-drift-setting="{html.escape(ex.setting_tag())}" data-drift-state="done"' in ex._status.value
    assert ex.from_cache is False
    assert "computed" in ex.status
    assert list(ex._families.options) == r.families
    assert ex._families.value == tuple(FEW)
    assert plots.METHOD_NAMES["exact"] in _all_titles(ex)


def test_changing_method_block_and_families_rerenders(llama, cache):
    ex = _explorer(llama, cache).set(block=(0, 2), method="exact")
    ex.refresh()
    first = dict(ex.figures)

    ex.set(method="rotation").refresh()
    assert ex.result.method == "rotation"
    assert plots.METHOD_NAMES["rotation"] in _all_titles(ex)
    assert ex.figures["ranking"] is not first["ranking"]

    ex.set(block=(1, 2)).refresh()
    assert ex.result.meta["layers"] == [1, 2]

    ex.set(pairs="all").refresh()
    assert ex.result.meta["pairs"] == "all"

    ex.set(families=["q_proj", "down_proj"]).refresh()
    assert [t.rstrip(" *") for t in _heatmap_titles(ex)] == ["q_proj", "down_proj"]
    assert len(ex.history) == 5


def test_changing_model_resizes_the_block_and_rerenders(llama, bert, cache, toy_checkpoint):
    qwen3 = toy_checkpoint("qwen3")[0]
    ex = _explorer(llama, cache)
    ex.refresh()
    assert "gate_proj" in ex.result.families  # GLU
    ex.set(model=str(bert)).refresh()
    assert ex.result.meta["model"] == str(bert)
    assert "gate_proj" not in ex.result.families
    assert "gate_proj" not in ex._families.options
    ex.set(model=str(qwen3), block=(1, 2)).refresh()
    assert "q_norm" in ex.result.families and ex.result.meta["layers"] == [1, 2]
    assert [t.rstrip(" *") for t in _heatmap_titles(ex)] == FEW  # the selection survives


def test_controls_trigger_refresh_and_view_changes_do_not_reanalyse(llama, cache, monkeypatch):
    ex = _explorer(llama, cache)
    ex.refresh()
    calls = []
    real = cache.get_or_compute_keyed
    monkeypatch.setattr(cache, "get_or_compute_keyed", lambda *a, **k: calls.append(k) or real(*a, **k))

    ex._method.value = "raw"  # what a click does
    assert len(calls) == 1 and ex.result.method == "raw"

    ex._value.value = "residual"
    ex._families.value = ("q_proj",)
    assert len(calls) == 1  # redrawn, not re-analysed
    assert [t.rstrip(" *") for t in _heatmap_titles(ex)] == ["q_proj"]
    cbar = [a for a in ex.figures["heatmaps"].axes if a.get_label() == "<colorbar>"][0]
    assert "residual" in cbar.get_ylabel()


def test_displaying_shows_the_widget_before_the_first_analysis(llama, tmp_path, monkeypatch):
    """In a notebook the first result is got after the widget is displayed, so the cell shows
    the controls, a "Computing ..." status and the progress bar while it computes."""
    import IPython.display

    events = []

    def seen(what: str) -> tuple:
        return what, ex.setting_tag(), _status_of(ex), ex._bar.layout.visibility, ex.output.value

    @functools.wraps(drift.analyze)
    def analyze(*a, **k):
        events.append(seen("compute"))
        return drift.analyze(*a, **k)

    bundles, updates = [], []

    class Handle:
        def update(self, obj, raw=False):
            updates.append(dict(obj))

    def display(obj, raw=False, display_id=None):
        bundles.append(dict(obj))
        events.append(seen("display"))
        return Handle() if display_id else None

    monkeypatch.setattr(IPython.display, "display", display)
    ex = Explorer(model=str(llama), cache=Cache(tmp_path / "cache", analyze=analyze), families=FEW)
    ex._ipython_display_()  # what a cell ending in ``ex`` does
    assert [e[0] for e in events] == ["display", "compute"]
    for what, now, (tag, state, text), bar, figures in events:  # on screen, and while it computes
        assert (state, tag, bar, figures) == ("running", now, "visible", ""), what
        assert text == f"Computing {ex.model}, layers 0–2, exact, consecutive pairs …", what
    assert "[drift Explorer: interactive" in bundles[0]["text/plain"] and "not run yet" not in bundles[0]["text/plain"]
    figs, status, state = _tags(ex)  # then the figures, of the setting the status names
    assert state == "done" and figs == {html.escape(status)} and status == ex.setting_tag()
    assert set(ex.figures) == {"ranking", "drift_along", "heatmaps"} and ex.from_cache is False
    assert ex._bar.value == ex._bar.max == len(ex.result.pairs) and ex._bar.layout.visibility == "hidden"
    # the saved notebook's plain-text fallback is brought up to date: it names what was computed
    assert len(updates) == 1 and "Last view:" in updates[0]["text/plain"] and "computed" in updates[0]["text/plain"]
    done = ex._status.value
    ex._ipython_display_()  # displayed again: shown as it is, nothing recomputed
    assert [e[0] for e in events] == ["display", "compute", "display"] and ex._status.value == done
    assert "Last view:" in bundles[1]["text/plain"]


def test_displaying_a_block_too_short_shows_the_error_not_a_computing_status(llama, cache, monkeypatch):
    import IPython.display

    monkeypatch.setattr(IPython.display, "display", lambda obj, raw=False, display_id=None: None)
    ex = _explorer(llama, cache, block=(1, 1))
    ex._ipython_display_()
    assert _status_of(ex)[1] == "error" and "at least two layers" in ex.status
    assert ex._bar.layout.visibility == "hidden" and ex.result is None


def test_auto_off_waits_for_refresh(llama, cache):
    ex = _explorer(llama, cache, auto=False)
    ex._method.value = "raw"
    assert ex.result is None
    ex.refresh()
    assert ex.result.method == "raw"


# --------------------------------------------------------------------------- cache

def test_revisit_is_served_from_cache(llama, cache):
    ex = _explorer(llama, cache)
    ex.refresh()
    ex.set(method="raw").refresh()
    assert ex.from_cache is False
    ex.set(method="exact").refresh()
    assert ex.from_cache is True and "from the cache" in ex.status
    again = _explorer(llama, cache)  # a new session, same cache folder
    again.refresh()
    assert again.from_cache is True


# --------------------------------------------------------------------------- failures

def _interrupting(model, layers=None, pairs="consecutive", method="exact", seed=0, n_null=1,
                  dtype="float32", device="auto", progress=True):
    raise KeyboardInterrupt


def test_interrupt_keeps_previous_figures_and_cache_clean(llama, tmp_path):
    real = Cache(tmp_path / "cache")
    ex = _explorer(llama, real)
    ex.refresh()
    before_result, before_figs, n_entries = ex.result, dict(ex.figures), len(real.entries())

    ex.cache = Cache(real.directory, analyze=_interrupting)
    assert ex.set(method="rotation").refresh() is None
    assert ex.interrupted and "Interrupted" in ex.status
    assert ex.result is before_result and ex.figures == before_figs
    assert len(real.entries()) == n_entries
    assert not list(real.directory.glob(".tmp-*"))

    ex.cache = real
    assert ex.refresh().method == "rotation"  # picks up where it stopped
    assert not ex.interrupted


def test_missing_model_shows_error(cache, tmp_path, llama):
    ex = _explorer(llama, cache)
    ex.refresh()
    ex.set(model=str(tmp_path / "nowhere"))
    assert "no such directory" in ex.status
    assert ex.refresh() is None
    assert "no such directory" in ex.status


def test_bad_settings(llama, cache):
    ex = _explorer(llama, cache)
    with pytest.raises(ValueError, match="outside the model's layers 0..2"):
        ex.set(block=(0, 7))
    with pytest.raises(ValueError, match="method must be one of"):
        ex.set(method="procrustes")
    ex.set(block=(1, 1))
    assert ex.refresh() is None and "at least two layers" in ex.status
    # found by fuzzing: 0.5 was read as layer 0, a family given as a string matched nothing
    from drift.errors import DriftError

    for bad in ((0.5, 1.5), "0:2", (None, None), (0, 1, 2)):
        with pytest.raises(DriftError, match="block must be two layer numbers"):
            ex.set(block=bad)
    with pytest.raises(DriftError, match="families must be a family name or a list"):
        ex.set(families=3)
    with pytest.raises(DriftError, match="dpi must be a positive number"):
        _explorer(llama, cache, dpi=0)
    ex.set(block=(0, 2), families="q_proj")
    ex.refresh()
    assert ex._families.value == ("q_proj",)


def test_programming_errors_are_not_swallowed(llama, tmp_path):
    def broken(model, layers=None, pairs="consecutive", method="exact", seed=0, n_null=1,
               dtype="float32", device="auto", progress=True):
        raise RuntimeError("bug")

    ex = _explorer(llama, Cache(tmp_path / "c", analyze=broken))
    with pytest.raises(RuntimeError, match="bug"):
        ex.refresh()


# --------------------------------------------------------------------------- pieces

def test_render_keeps_figures_out_of_pyplot():
    import matplotlib.pyplot as plt

    figs = render(make_result("exact", "all"), families=["q_proj", "k_proj"])
    assert set(figs) == {"ranking", "drift_along", "heatmaps"}
    assert plt.get_fignums() == []


def test_available_models_reads_only_the_local_hf_cache(tmp_path, monkeypatch, llama):
    import huggingface_hub

    def repo(repo_id, folder, repo_type="model"):
        rev = SimpleNamespace(snapshot_path=folder, last_modified=1.0)
        return SimpleNamespace(repo_id=repo_id, repo_type=repo_type, revisions=[rev])

    weird = tmp_path / "weird"
    weird.mkdir()
    (weird / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"]}))
    repos = [repo("org/toy-llama", llama), repo("org/mamba", weird), repo("org/data", llama, "dataset"),
             repo("org/empty", tmp_path / "missing")]
    monkeypatch.setattr(huggingface_hub, "scan_cache_dir", lambda: SimpleNamespace(repos=repos))
    assert available_models() == ["minilm", "tiny-qwen3", "org/toy-llama"]

    def no_cache():
        raise huggingface_hub.errors.CacheNotFound("none", cache_dir=str(tmp_path))

    monkeypatch.setattr(huggingface_hub, "scan_cache_dir", no_cache)
    assert available_models() == ["minilm", "tiny-qwen3"]


def test_model_outside_the_picker_goes_into_the_text_box(llama, cache):
    ex = _explorer(llama, cache)
    assert ex._path.value == str(llama) and ex.model == str(llama)
    ex.set(model="minilm")
    assert ex._path.value == "" and ex._model.value == "minilm" and ex.model == "minilm"
    assert ex._block.max == 5


def test_picking_from_the_list_overrides_the_text_box(llama, cache, monkeypatch):
    import drift.widgets as dw

    monkeypatch.setattr(dw, "available_models", lambda: ["minilm", str(llama)])
    ex = Explorer(model="minilm", cache=cache, progress=False, auto=False)
    ex._path.value = "/somewhere/else"
    assert ex.model == "/somewhere/else"
    ex._model.value = str(llama)  # the user picks from the list
    assert ex._path.value == "" and ex.model == str(llama) and ex._block.max == 2


def test_bad_choices_at_construction(llama, cache):
    with pytest.raises(ValueError, match="method must be one of"):
        Explorer(model=str(llama), cache=cache, method="procrustes")


def test_widget_tree_is_displayable(llama, cache):
    ex = _explorer(llama, cache)
    import ipywidgets as W

    assert isinstance(ex.widget, W.VBox)
    assert ex.output in ex.widget.children
    assert drift.widgets is not None


# --------------------------------------------------------------------------- what the browser sees

def _tags(ex: Explorer) -> tuple[set[str], str, str]:
    """(figure tags, status tag, status state) as the browser reads them."""
    figs = set(re.findall(r'<img class="drift-figure" alt="\w+" data-drift-setting="([^"]*)"', ex.output.value))
    status = re.search(r'data-drift-setting="([^"]*)" data-drift-state="(\w+)"', ex._status.value)
    return figs, html.unescape(status.group(1)), status.group(2)


def _status_of(ex: Explorer) -> tuple[str, str, str]:
    """(tag, state, text) of the status line, as the browser reads them."""
    m = re.search(r'data-drift-setting="([^"]*)" data-drift-state="(\w+)">(.*)</span>', ex._status.value, re.S)
    return html.unescape(m.group(1)), m.group(2), html.unescape(re.sub("<[^>]+>", "", m.group(3)))


def test_a_view_change_says_it_redrew_and_names_no_compute_time(llama, cache):
    ex = _explorer(llama, cache)
    ex.refresh()
    assert re.search(r"result computed in \d+\.\d\d s, drawn in", ex.status)
    for click in (lambda: setattr(ex._value, "value", "residual"), lambda: setattr(ex._families, "value", ("k_proj",))):
        click()
        tag, state, text = _status_of(ex)
        assert state == "done" and tag == ex.setting_tag() == ex.shown_setting
        assert re.fullmatch(rf"{re.escape(str(llama))}, layers 0–2, exact, consecutive pairs: redrawn in \d+\.\d\d s "
                            r"from the result already computed; nothing recomputed\.", text), text
        assert "computed in" not in text
    ex.set(method="raw").refresh()
    ex.set(method="exact").refresh()  # served from the cache, then a view change
    assert ex.from_cache is True
    ex._value.value = "rho"
    assert "redrawn in" in ex.status and "from the result read from the cache" in ex.status
    assert "from the cache in" not in ex.status
    ex.set(method="rotation").refresh()  # a new analysis names its time again
    assert re.search(r"result computed in \d+\.\d\d s", ex.status) and "redrawn" not in ex.status


def test_every_render_and_status_carries_its_setting(llama, cache):
    ex = _explorer(llama, cache)
    ex.refresh()
    for change in (dict(method="rotation"), dict(pairs="all"), dict(value="residual"), dict(block=(1, 2))):
        ex.set(**change).refresh()
        figs, status, state = _tags(ex)
        assert state == "done" and figs == {html.escape(status)} and status == ex.setting_tag()
        key, val = next(iter(change.items()))
        part = {"method": 2, "pairs": 3, "value": 4, "block": 1}[key]
        assert status.split("|")[part] == (f"{val[0]}-{val[1]}" if key == "block" else val)
    ex._families.value = ("k_proj",)  # a view change, as a click makes it: status and figures move together
    figs, status, state = _tags(ex)
    assert status.endswith("|k_proj") and figs == {html.escape(status)} and state == "done"


def test_interrupted_request_keeps_the_old_figures_tagged_as_old(llama, tmp_path):
    real = Cache(tmp_path / "cache")
    ex = _explorer(llama, real)
    ex.refresh()
    old_tag = ex.setting_tag()
    ex.cache = Cache(real.directory, analyze=_interrupting)
    ex.set(method="raw").refresh()
    figs, status, state = _tags(ex)
    assert state == "interrupted" and figs == {html.escape(old_tag)} and status != old_tag


def _paused(gate: dict):
    """drift.analyze, except that an exact analysis waits at ``gate["go"]`` after saying so."""
    import threading

    gate.update(started=threading.Event(), go=threading.Event())

    def analyze(model, **kw):
        if kw.get("method") == "exact":
            gate["started"].set()
            assert gate["go"].wait(60)
        return drift.analyze(model, **kw)

    return analyze


@pytest.mark.parametrize("how", ["set", "click"])
def test_a_setting_changed_while_computing_does_not_relabel_the_figures(llama, tmp_path, how):
    """A refresh running in a thread (a control's callback under ipykernel 7) while the
    controls change: ``set`` in a cell (no new refresh) leaves its figures labelled as its
    own setting; a click (``auto``: a second refresh) wins, the overtaken result is not shown,
    and neither leaves figures in the figure memory under another setting."""
    import threading

    gate: dict = {}
    ex = _explorer(llama, Cache(tmp_path / "cache", analyze=_paused(gate)), method="rotation")
    ex.refresh()
    ex.set(method="exact")
    exact_tag = ex.setting_tag()
    worker = threading.Thread(target=ex.refresh)
    worker.start()
    assert gate["started"].wait(60)
    if how == "set":
        ex.set(method="raw")
    else:
        ex._method.value = "raw"  # raw's refresh runs and shows; exact finishes after it
    gate["go"].set()
    worker.join(60)
    figs, status, state = _tags(ex)
    assert state == "done" and figs == {html.escape(status)}
    want = "exact" if how == "set" else "raw"
    assert ex.result.method == want and status.split("|")[2] == want
    assert ("exact gauge" in _all_titles(ex)) == (want == "exact")
    if how == "set":
        assert status == exact_tag and "the controls now ask for" in ex.describe()
    ex.set(method="raw", value="residual").refresh()  # race-free: raw's own figures, whatever came before
    assert ex.result.method == "raw" and "exact gauge" not in _all_titles(ex)
    ex.set(method="exact", value="rho").refresh()
    assert ex.result.method == "exact" and "exact gauge" in _all_titles(ex)


def _signalling(model, progress=True, **kw):
    """An analysis that is interrupted the way the notebook's button does it: SIGINT to the kernel."""
    progress(0, 3)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
    raise AssertionError("SIGINT did not interrupt the analysis")


def test_sigint_interrupts_an_analysis_started_by_a_control(llama, tmp_path):
    """ipykernel ignores SIGINT outside cell executions; a control's callback runs there."""
    real = Cache(tmp_path / "cache")
    ex = _explorer(llama, real)
    ex.progress = True
    ex.refresh()
    n_entries = len(real.entries())
    ex.cache = Cache(real.directory, analyze=_signalling)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ex._method.value = "rotation"  # a click
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # restored
    finally:
        signal.signal(signal.SIGINT, previous)
    assert ex.interrupted and _tags(ex)[2] == "interrupted"
    assert len(real.entries()) == n_entries
    assert ex._bar.layout.visibility == "hidden"


def test_browser_selection_survives_method_changes(llama, cache):
    ex = Explorer(model=str(llama), cache=cache, progress=False, method="rotation")
    ex.refresh()
    assert ex._families.rows == len(ex._families.options)  # every family visible
    rotation_fams = list(ex._families.options)
    ex._families.value = tuple(f for f in rotation_fams if f != "v_proj")  # a ctrl-click
    ex._method.value = "exact"
    fams = list(ex._families.options)
    assert set(fams) > set(rotation_fams)  # exact adds the circuit families ...
    assert set(ex._families.value) == set(fams) - {"v_proj"}  # ... drawn; v_proj stays off
    ex._method.value = "rotation"
    assert set(ex._families.value) == set(rotation_fams) - {"v_proj"}


def test_progress_function_counts_pairs(llama):
    seen = []
    drift.analyze(str(llama), method="raw", pairs="all", progress=lambda d, t: seen.append((d, t)))
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 3)]


# --------------------------------------------------------------------------- weights | activations

ACT = dict(n_seq=8, seq_len=32, batch_size=4)
"""Few, short sequences: enough to draw; the numbers are tests/test_function.py's business."""


def _minilm(cache, **kw) -> Explorer:
    """MiniLM (it has a tokenizer; the toy checkpoints do not), three layers, the fast method."""
    return Explorer(model="minilm", block=(0, 2), method="raw", cache=cache, progress=False, families=FEW,
                    activation_kwargs=ACT, **kw)


def _caption(ex: Explorer) -> str:
    return html.unescape(re.sub("<[^>]+>", "", re.search(r'drift-caption[^>]*>(.*?)</div>', ex.output.value).group(1)))


def _never_cache(directory: Path) -> Cache:
    """The activations cache in ``directory``, with a function that fails if it is called (it
    has activation_similarity's signature, so the keys are the real ones)."""
    from drift.function import activation_similarity

    @functools.wraps(activation_similarity)
    def never(*a, **k):
        raise AssertionError("recomputed: a revisit must come from the cache")

    return Cache(directory, analyze=never, namespace="activations")


def test_space_toggle_shows_activations_and_back(cache):
    ex = _minilm(cache)
    w = ex.refresh()
    assert set(w.df["space"]) == {"weights"} and w.method == "raw" and not ex._method.disabled

    a = ex.set(space="activations").refresh()
    assert a is ex.result and a.meta["space"] == "activations" and set(a.df["space"]) == {"activations"}
    assert a.families == ["residual_angle", "update_cka"] and a.meta["layers"] == [0, 1, 2]
    assert ex._method.disabled and ex._value.disabled and ex._other.disabled  # they do not apply
    assert list(ex._families.options) == a.families and ex._families.value == tuple(a.families)
    assert set(ex.figures) == {"ranking", "drift_along", "heatmaps"}
    assert [t.rstrip(" *") for t in _heatmap_titles(ex)] == a.families
    cbar = [x for x in ex.figures["heatmaps"].axes if x.get_label() == "<colorbar>"][0]
    assert "residual_angle: distance" in cbar.get_ylabel()  # the activations' own label, not ρ
    assert ex.settings()["method"] is None and ex.settings()["value"] == "residual"
    assert _caption(ex) == "Figures of minilm, layers 0–2, activations (the method does not apply), consecutive pairs."
    figs, status, state = _tags(ex)
    assert state == "done" and figs == {html.escape(status)}
    assert status.split("|")[2:7] == ["", "consecutive", "residual", "activations", ""]

    ex.set(space="weights").refresh()
    assert ex.result.method == "raw" and set(ex.result.df["space"]) == {"weights"} and not ex._method.disabled
    assert ex.from_cache is True
    assert [t.rstrip(" *") for t in _heatmap_titles(ex)] == FEW  # the code's selection is back
    assert _caption(ex) == "Figures of minilm, layers 0–2, raw, consecutive pairs."


def test_the_value_toggle_shows_what_activations_draw(cache):
    """Activations have no null, hence no ρ: their disabled heatmap toggle shows the residual
    (what their heatmaps draw), and the weights' choice comes back with the weights."""
    ex = _minilm(cache, auto=False)
    assert (ex._value.value, ex._value.label, ex._value.disabled) == ("rho", "ρ", False)
    ex._space.value = "activations"  # a click
    assert (ex._value.value, ex._value.label, ex._value.disabled) == ("residual", "residual", True)
    assert ex.settings()["value"] == "residual"
    ex._space.value = "weights"
    assert (ex._value.value, ex._value.disabled) == ("rho", False)
    ex.set(space="activations", value="rho")  # asked for in code: kept for the weights, not shown
    assert ex._value.value == "residual"
    ex.set(space="weights")
    assert ex._value.value == "rho"
    ex.set(value="residual").set(space="activations").set(space="weights")
    assert ex._value.value == "residual"
    at_start = _minilm(cache, auto=False, space="activations")
    assert (at_start._value.value, at_start._value.disabled) == ("residual", True)
    assert at_start.set(space="weights")._value.value == "rho"


def test_a_revisited_activation_setting_comes_from_the_cache(cache):
    ex = _minilm(cache, space="activations")
    first = ex.refresh()
    assert ex.from_cache is False and len(cache.entries()) == 1
    ex.set(pairs="all").refresh()
    ex.activation_cache = _never_cache(cache.directory)
    again = ex.set(pairs="consecutive").refresh()
    assert ex.from_cache is True and "from the cache" in ex.status
    cols = ["family", "layer_a", "layer_b"]
    assert again.df[cols].equals(first.df[cols]) and again.df["null"].isna().all()
    np.testing.assert_allclose(again.df["residual"], first.df["residual"], rtol=1e-9)  # through JSON
    later = _minilm(Cache(cache.directory), space="activations")  # a new session, same folder
    later.activation_cache = _never_cache(cache.directory)
    assert later.refresh().meta["space"] == "activations" and later.from_cache is True


def _stand_in(space: str):
    """A function with analyze's (and activation_similarity's) common arguments, whose result
    says which one it is."""
    def run(model, layers=None, pairs="consecutive", seed=0, dtype="float32", device="auto", progress=True):
        r = make_result("raw", pairs, layers=layers, families=["q_proj"])
        r.df["space"] = space
        r.meta["space"] = space
        return r
    return run


def test_weights_and_activations_never_serve_each_other(llama, tmp_path):
    # The same signature and the same arguments: only the namespace tells the two apart.
    w = Cache(tmp_path / "c", analyze=_stand_in("weights"))
    a = Cache(tmp_path / "c", analyze=_stand_in("activations"), namespace="activations")
    assert w.path(w.key(llama, layers=[0, 1, 2])) != a.path(a.key(llama, layers=[0, 1, 2]))
    for first, second in ((w, a), (a, w)):
        c = Cache(tmp_path / first.namespace, analyze=first.analyze, namespace=first.namespace)
        other = Cache(c.directory, analyze=second.analyze, namespace=second.namespace)
        r, hit = c.get_or_compute(llama, layers=[0, 1, 2])
        assert not hit and r.meta["space"] == first.namespace
        r, hit = other.get_or_compute(llama, layers=[0, 1, 2])  # an entry of the other kind is there ...
        assert not hit and r.meta["space"] == second.namespace  # ... and is not served
        for cc in (c, other):
            r, hit = cc.get_or_compute(llama, layers=[0, 1, 2])
            assert hit and r.meta["space"] == cc.namespace and set(r.df["space"]) == {cc.namespace}
        assert len(c.entries()) == 2


def test_the_activation_key_holds_the_tokenizer_and_the_text(checkpoint_copy, tmp_path):
    folder = checkpoint_copy("llama")
    c = Cache(tmp_path / "c", namespace="activations")
    bare = c.key(folder, layers=[0, 1])
    assert bare["namespace"] == "activations" and "namespace" not in Cache(tmp_path / "c").key(folder)
    (folder / "tokenizer.json").write_text("{}")
    with_tok = c.key(folder, layers=[0, 1])
    assert with_tok != bare
    (folder / "tokenizer.json").write_text('{"model": {}}')  # edited in place
    assert c.key(folder, layers=[0, 1]) != with_tok
    text = tmp_path / "prose.txt"
    text.write_text("one text")
    k1 = c.key(folder, layers=[0, 1], text=text)
    text.write_text("another text")  # same path, new content
    assert c.key(folder, layers=[0, 1], text=text) != k1 != c.key(folder, layers=[0, 1])
    assert c.key(folder, tokens="random")["inputs"]["text"] is None  # random ids read no text


def test_no_tokenizer_is_one_line_and_keeps_the_figures(llama, cache):
    ex = _explorer(llama, cache, activation_kwargs=ACT)
    ex.refresh()
    before_result, before_figs, old_tag = ex.result, dict(ex.figures), ex.setting_tag()
    assert ex.set(space="activations").refresh() is None
    assert "no tokenizer" in ex.status and "\n" not in ex.status
    figs, status, state = _tags(ex)
    assert state == "error" and figs == {html.escape(old_tag)} and status != old_tag
    assert ex.result is before_result and ex.figures == before_figs
    assert _caption(ex) == f"Figures of {llama}, layers 0–2, exact, consecutive pairs."
    ex._families.value = ("k_proj",)  # a view change: the weights result is not redrawn as activations
    assert _tags(ex)[0] == {html.escape(old_tag)} and ex.figures == before_figs


def test_bad_space_and_activation_arguments(llama, cache, tmp_path):
    with pytest.raises(ValueError, match="space must be one of weights, activations"):
        _explorer(llama, cache).set(space="function")
    with pytest.raises(ValueError, match="space must be one of"):
        _explorer(llama, cache, space="function")
    with pytest.raises(ValueError, match="reads the default text"):
        _explorer(llama, cache, activation_kwargs=dict(text=tmp_path / "t.txt"))
    with pytest.raises(ValueError, match="namespace must be one of weights, activations"):
        Cache(tmp_path, namespace="function")


# --------------------------------------------------------------------------- a second model

@pytest.fixture
def unrelated(tmp_path) -> Path:
    """A llama of the toy's shapes and another seed."""
    import torch

    from drift import toy

    return toy.save(toy.tiny_model("llama", seed=1, dtype=torch.float32), tmp_path / "unrelated")


def test_a_second_model_gives_the_cross_result_and_its_figures(llama, unrelated, cache):
    ex = _explorer(llama, cache)
    ex.refresh()
    ex.set(other=str(unrelated))
    assert ex._pairs.options == ("diagonal", "all") and ex._pairs.value == "diagonal"
    r = ex.refresh()
    assert r.cross_model and r.meta["other"]["model"] == str(unrelated) and r.pairs == [(0, 0), (1, 1), (2, 2)]
    assert set(ex.figures) == {"ranking", "diagonal_along", "heatmaps"}
    assert "diagonal pairs" in _all_titles(ex) and "llama-single-float32 vs unrelated" in _all_titles(ex)
    heat = ex.figures["heatmaps"]  # A x B: rows are layers of the model, columns of the other
    assert (heat._supylabel.get_text(), heat._supxlabel.get_text()) == ("layer of llama-single-float32",
                                                                        "layer of unrelated")
    assert "between the models' layers" in heat._suptitle.get_text()
    assert _caption(ex) == f"Figures of {llama} vs {unrelated}, layers 0–2, exact, diagonal pairs."
    figs, status, _ = _tags(ex)
    assert figs == {html.escape(status)} and status.split("|")[3:7] == ["diagonal", "rho", "weights", str(unrelated)]

    r = ex.set(pairs="all").refresh()
    assert r.cross_model and len(r.pairs) == 9 and set(ex.figures) == {"ranking", "diagonal_along", "heatmaps"}

    ex.set(other="")  # back to one model: its pairs again, "all" carried over
    assert ex._pairs.options == ("consecutive", "all") and ex._pairs.value == "all"
    assert not ex.refresh().cross_model and "drift_along" in ex.figures


def test_the_second_model_is_for_weights_only(llama, unrelated, cache):
    ex = _explorer(llama, cache, other=str(unrelated))
    assert ex._pairs.value == "diagonal" and ex.settings()["other"] == str(unrelated)
    ex.set(space="activations")
    assert ex._other.disabled and ex.settings()["other"] is None
    assert ex._pairs.options == ("consecutive", "all") and ex._pairs.value == "consecutive"
    ex.set(space="weights")
    assert ex._pairs.value == "diagonal" and ex.settings()["other"] == str(unrelated)
    with pytest.raises(ValueError, match="pairs must be one of diagonal, all"):
        ex.set(pairs="consecutive")
    with pytest.raises(ValueError, match="pairs must be one of consecutive, all"):
        _explorer(llama, cache).set(pairs="diagonal")


@pytest.mark.parametrize("name,config,message", [
    ("qwen3", {}, r"architecture differs \(llama vs qwen3\)"),
    ("llama", {"intermediate_size": 96}, r"d_ff 128 vs 96"),
])
def test_a_mismatched_second_model_is_one_line_and_keeps_the_figures(name, config, message, llama, cache,
                                                                      toy_checkpoint, checkpoint_copy):
    other = checkpoint_copy(name, **config) if config else toy_checkpoint(name)[0]
    ex = _explorer(llama, cache)
    ex.refresh()
    before_result, before_figs, old_tag = ex.result, dict(ex.figures), ex.setting_tag()
    ex._other.value = str(other)  # what typing a folder and pressing enter does
    assert ex.result is before_result and ex.figures == before_figs
    assert re.search(message, ex.status) and "\n" not in ex.status
    figs, status, state = _tags(ex)
    assert state == "error" and figs == {html.escape(old_tag)} and status.split("|")[6] == str(other)
