"""drift.widgets.Explorer, headless: every control re-renders, revisits come from the cache,
an interrupted run leaves the cache and the figures as they were."""

from __future__ import annotations

import html
import os
import re
import signal
import time

import json
from pathlib import Path
from types import SimpleNamespace

import matplotlib

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
    real = cache.get_or_compute
    monkeypatch.setattr(cache, "get_or_compute", lambda *a, **k: calls.append(k) or real(*a, **k))

    ex._method.value = "raw"  # what a click does
    assert len(calls) == 1 and ex.result.method == "raw"

    ex._value.value = "residual"
    ex._families.value = ("q_proj",)
    assert len(calls) == 1  # redrawn, not re-analysed
    assert [t.rstrip(" *") for t in _heatmap_titles(ex)] == ["q_proj"]
    cbar = [a for a in ex.figures["heatmaps"].axes if a.get_label() == "<colorbar>"][0]
    assert "residual" in cbar.get_ylabel()


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
