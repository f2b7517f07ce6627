"""drift.plots draws what it promises: titles name the method, colour bars say what they show,
nothing is recomputed or mutated, and figures save as png/svg/pdf."""

from __future__ import annotations

import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import LineCollection, PolyCollection  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from drift import plots  # noqa: E402
from drift.result import AnalysisResult  # noqa: E402

from _synthetic import make_result  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def cons() -> AnalysisResult:
    return make_result("exact", "consecutive")


@pytest.fixture
def allp() -> AnalysisResult:
    return make_result("exact", "all")


def _colorbar_label(ax) -> str:
    """The label of the colour bar attached to ``ax``'s image."""
    cb = ax.images[0].colorbar
    assert cb is not None, "no colour bar"
    return cb.ax.get_ylabel()


# --------------------------------------------------------------------------- cheap import

def test_import_drift_does_not_import_plotting_or_widgets():
    """Nor pandas: the CLI's import floor and every run's peak memory pay for what is imported
    (pandas: 0.5 s and 27 MB, loaded only when a result table is built)."""
    code = ("import sys, drift, drift.cli, drift.analysis; bad = [m for m in ('matplotlib', 'seaborn', "
            "'ipywidgets', 'pandas') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- heatmap

@pytest.mark.parametrize("method", ["exact", "rotation", "raw"])
def test_heatmap_title_names_method_and_colorbar_says_rho(method):
    r = make_result(method, "all")
    ax = plots.heatmap(r, "q_proj")
    assert plots.METHOD_NAMES[method] in ax.get_title()
    assert "q_proj" in ax.get_title()
    assert "ρ = residual / null" in _colorbar_label(ax)
    im = ax.images[0]
    assert isinstance(im, AxesImage)
    assert im.get_clim()[0] == 0.0 and im.get_clim()[1] >= 1.0  # ρ = 1 always has a colour


def test_heatmap_residual_scale_reaches_the_null(cons):
    ax = plots.heatmap(cons, "input_ln", value="residual")
    assert "residual (unit-normalised Frobenius" in _colorbar_label(ax)
    null_max = cons.df.loc[cons.df.family == "input_ln", "null"].max()
    assert ax.images[0].get_clim()[1] == pytest.approx(null_max)


def test_heatmap_values_match_matrix_and_diagonal_is_masked(allp):
    ax = plots.heatmap(allp, "k_proj")
    data = ax.images[0].get_array()
    m = allp.matrix("k_proj", "rho").to_numpy()
    n = len(m)
    assert data.shape == (n, n)
    assert np.all(data.mask[np.eye(n, dtype=bool)])
    off = ~np.eye(n, dtype=bool)
    np.testing.assert_allclose(data.data[off], m[off])
    # each computed cell is annotated (6 layers <= 12)
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == n * (n - 1)
    assert f"{m[0, 1]:.2f}" in texts


def test_heatmap_consecutive_leaves_uncomputed_cells_grey(cons):
    ax = plots.heatmap(cons, "q_proj")
    data = ax.images[0].get_array()
    n = data.shape[0]
    assert int((~data.mask).sum()) == 2 * (n - 1)


def test_heatmap_marks_block(allp):
    ax = plots.heatmap(allp, "q_proj", block=(1, 4))
    rects = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_label() == "block 1–4"]
    assert len(rects) == 1
    assert rects[0].get_xy() == (0.5, 0.5) and rects[0].get_width() == 4


def test_heatmap_marks_non_invariant_family(cons):
    ax = plots.heatmap(cons, "input_ln")
    assert "input_ln *" in ax.get_title()
    assert any("not gauge-invariant" in t.get_text() for t in ax.texts)


def test_heatmap_draws_on_given_axes(cons):
    fig, ax = plt.subplots()
    assert plots.heatmap(cons, "q_proj", ax=ax, colorbar=False) is ax
    assert len(fig.axes) == 1  # no colour bar axes added


@pytest.mark.parametrize("kwargs, match", [
    (dict(family="nope"), "not in the result"),
    (dict(family="q_proj", value="bogus"), "value must be one of"),
    (dict(family="q_proj", block=(10, 12)), "contains none of"),
])
def test_heatmap_errors(cons, kwargs, match):
    with pytest.raises(ValueError, match=match):
        plots.heatmap(cons, **kwargs)


def test_heatmap_grid_small_multiples_share_one_scale(allp):
    axes = plots.heatmap_grid(allp, ncols=4)
    fams = allp.families
    assert axes.shape == (3, 4)
    images = [ax.images[0] for ax in axes.flat if ax.images]
    assert len(images) == len(fams)
    assert len({im.get_clim() for im in images}) == 1
    assert [ax.get_title().rstrip(" *") for ax in axes.flat if ax.images] == fams
    assert not axes.flat[-1].axison  # 11 families in 12 cells: the last is switched off
    fig = axes.flat[0].figure
    assert plots.METHOD_NAMES["exact"] in fig._suptitle.get_text()
    cbars = [a for a in fig.axes if a.get_label() == "<colorbar>"]
    assert len(cbars) == 1 and "ρ = residual / null" in cbars[0].get_ylabel()


def test_heatmap_grid_into_given_figure(cons):
    from matplotlib.figure import Figure

    fig = Figure()
    axes = plots.heatmap_grid(cons, families=["q_proj", "k_proj"], value="residual", fig=fig)
    assert axes.shape == (1, 2) and axes[0, 0].figure is fig
    assert plt.get_fignums() == []  # pyplot never saw it


# --------------------------------------------------------------------------- along depth

def test_drift_along_rho_one_line_per_family_and_null_line(cons):
    ax = plots.drift_along(cons, families=["q_proj", "input_ln"])
    labels = [ln.get_label() for ln in ax.get_lines()]
    assert "q_proj" in labels and "input_ln" in labels
    nulls = [ln for ln in ax.get_lines() if "null" in ln.get_label()]
    assert len(nulls) == 1 and tuple(nulls[0].get_ydata()) == (1.0, 1.0)
    q = next(ln for ln in ax.get_lines() if ln.get_label() == "q_proj")
    expect = cons.df[cons.df.family == "q_proj"].sort_values("layer_a")["rho"].to_numpy()
    np.testing.assert_allclose(q.get_ydata(), expect)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0→1", "1→2", "2→3", "3→4", "4→5"]
    assert plots.METHOD_NAMES["exact"] in ax.get_title()
    assert "ρ" in ax.get_ylabel()


def test_drift_along_residual_shows_null_band_when_nulls_agree(cons):
    ax = plots.drift_along(cons, value="residual")
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 1 and "null" in bands[0].get_label()
    assert plots.METHOD_NAMES["exact"] in ax.get_title()


def test_drift_along_residual_dashed_null_per_family_when_nulls_differ():
    r = make_result("rotation")  # MLP null ~0.63, attention ~1.33: no single band
    ax = plots.drift_along(r, families=["q_proj", "up_proj"], value="residual")
    dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--" and len(ln.get_xdata())]
    assert len(dashed) == 2
    up_null = r.df[r.df.family == "up_proj"].sort_values("layer_a")["null"].to_numpy()
    assert any(np.allclose(ln.get_ydata(), up_null) for ln in dashed)
    assert plots.METHOD_NAMES["rotation"] in ax.get_title()


def test_drift_along_needs_consecutive_pairs():
    r = make_result("exact", "all", layers=[0, 2, 4])
    with pytest.raises(ValueError, match="no consecutive pairs"):
        plots.drift_along(r)


def test_drift_along_uses_consecutive_rows_of_all_pairs(allp):
    ax = plots.drift_along(allp, families=["q_proj"])
    assert len(ax.get_xticklabels()) == 5
    assert "consecutive pairs" in ax.get_title() and "all pairs" not in ax.get_title()


def test_titles_read_the_pairs_from_the_rows(allp):
    assert "all pairs" in plots.ranking(allp).get_title()
    title = plots.ranking(allp.consecutive()).get_title()  # meta still says "all"
    assert "consecutive pairs" in title and "all pairs" not in title


# --------------------------------------------------------------------------- ranking

def test_ranking_least_variation_on_top_with_whiskers(cons):
    ax = plots.ranking(cons)
    bars = next(c for c in ax.containers if isinstance(c, BarContainer))
    assert len(bars) == len(cons.families)
    s = cons.summary("rho")
    order = [t.get_text().rstrip(" *") for t in ax.get_yticklabels()]
    assert order == list(s.index)  # ascending mean; y axis inverted so the first is on top
    assert ax.yaxis_inverted()
    widths = [b.get_width() for b in bars]
    np.testing.assert_allclose(widths, s["mean"].to_numpy())
    assert ax.containers[0].has_xerr
    assert plots.METHOD_NAMES["exact"] in ax.get_title()
    assert "ρ = residual / null" in ax.get_xlabel()


def test_ranking_hatches_non_invariant_families(cons):
    ax = plots.ranking(cons)
    bars = next(c for c in ax.containers if isinstance(c, BarContainer))
    labels = [t.get_text() for t in ax.get_yticklabels()]
    for bar, lab in zip(bars, labels):
        assert (bar.get_hatch() is not None) == lab.endswith(" *")
    assert any(lab.endswith(" *") for lab in labels)


# --------------------------------------------------------------------------- methods

@pytest.fixture
def three() -> dict[str, AnalysisResult]:
    circuits = ["qk_circuit", "ov_circuit"]
    return {
        "raw": make_result("raw", families=[f for f in make_result().families if f not in circuits]),
        "rotation": make_result("rotation", families=[f for f in make_result().families if f not in circuits]),
        "exact": make_result("exact"),
    }


def test_compare_methods_one_bar_group_per_method_with_nulls(three):
    ax = plots.compare_methods(three)
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(bars) == 3
    # raw and rotation lack the circuit families: fewer bars, no gap filled with zeros
    assert [len(b) for b in bars] == [9, 9, 11]
    nulls = [c for c in ax.collections if isinstance(c, LineCollection) and "null" in str(c.get_label())]
    assert len(nulls) == 1  # one legend entry; all three methods drew their null ticks
    ticks = [c for c in ax.collections if isinstance(c, LineCollection) and c.get_linewidth()[0] == 2.0]
    assert len(ticks) == 3
    rot_up_null = three["rotation"].df.query("family == 'up_proj'")["null"].mean()
    segs = np.concatenate([s for c in ticks for s in c.get_segments()])
    assert np.any(np.isclose(segs[:, 1], rot_up_null))  # the over-fitting method's low null is drawn
    title = ax.get_title()
    for m in ("raw", "rotation", "exact"):
        assert plots.METHOD_NAMES[m] in title
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert "qk_circuit\n(exact only)" in ticks and "q_proj" in ticks
    # ranked by the exact result, whatever the dict order
    exact_order = list(three["exact"].summary("residual").index)
    assert [t.split("\n")[0].rstrip(" *") for t in ticks] == exact_order
    assert "input_ln *" in ticks  # not invariant under exact (synthetic norms): starred


def test_compare_methods_rho(three):
    ax = plots.compare_methods(three, value="rho")
    assert any(tuple(ln.get_ydata()) == (1.0, 1.0) for ln in ax.get_lines())
    assert "ρ" in ax.get_ylabel()


def test_compare_methods_labels_bars_too_short_to_see():
    exact = make_result("exact")
    exact.df["residual"] = 0.0  # a planted checkpoint: identical up to gauge
    exact.df["rho"] = 0.0
    ax = plots.compare_methods({"raw": make_result("raw"), "exact": exact}, value="rho")
    zeros = [t for t in ax.texts if t.get_text() == "0.00"]
    assert len(zeros) == len(exact.families)


def test_titles_name_a_local_folder_by_its_last_component():
    r = make_result(model="/tmp/drift-planted-abc/planted")
    assert "planted, consecutive pairs" in plots.ranking(r).get_title()
    assert "/tmp" not in plots.ranking(r).get_title()
    assert "Qwen/Qwen3-4B" in plots.ranking(make_result(model="Qwen/Qwen3-4B")).get_title()


def test_compare_methods_needs_results():
    with pytest.raises(ValueError, match="at least one"):
        plots.compare_methods({})


# --------------------------------------------------------------------------- purity

def test_plots_do_not_mutate_or_recompute(three, allp, monkeypatch):
    import drift

    monkeypatch.setattr(drift, "analyze", lambda *a, **k: pytest.fail("a plot recomputed"))
    before = {k: r.df.copy() for k, r in {**three, "all": allp}.items()}
    plots.heatmap(allp, "q_proj")
    plots.heatmap_grid(allp)
    plots.drift_along(allp)
    plots.ranking(allp)
    plots.compare_methods(three)
    for k, r in {**three, "all": allp}.items():
        pd.testing.assert_frame_equal(r.df, before[k])


# --------------------------------------------------------------------------- output

MAGIC = {"png": b"\x89PNG", "svg": b"<?xml", "pdf": b"%PDF"}


@pytest.mark.parametrize("fmt", ["png", "svg", "pdf"])
@pytest.mark.parametrize("what", ["axes", "figure", "grid"])
def test_save_formats(tmp_path, cons, fmt, what):
    if what == "grid":
        obj = plots.heatmap_grid(cons, families=["q_proj", "k_proj"])
    else:
        ax = plots.ranking(cons)
        obj = ax if what == "axes" else ax.figure
    path = plots.save(obj, tmp_path / "sub" / f"fig.{fmt}")
    assert path.read_bytes().startswith(MAGIC[fmt])


def test_save_refuses_unknown_format_and_non_figures(tmp_path, cons):
    ax = plots.ranking(cons)
    with pytest.raises(ValueError, match="use one of .png, .svg, .pdf"):
        plots.save(ax, tmp_path / "fig.jpg")
    with pytest.raises(ValueError, match="no suffix"):
        plots.save(ax, tmp_path / "fig")
    with pytest.raises(TypeError, match="Figure or Axes"):
        plots.save("not a figure", tmp_path / "fig.png")


def test_export_csv_is_the_data_behind_the_figures(tmp_path, cons):
    path = plots.export_csv(cons, tmp_path / "out" / "drift.csv")
    back = pd.read_csv(path)
    assert len(back) == len(cons.df)
    assert {"family", "layer_a", "layer_b", "residual", "null", "rho", "method", "model"} <= set(back)
    assert set(back["method"]) == {"exact"}
    np.testing.assert_allclose(back["rho"], cons.df["rho"])


def _without_null(result: AnalysisResult) -> AnalysisResult:
    df = result.df.copy()
    df["null"] = np.nan
    df["rho"] = np.nan
    return AnalysisResult(df, {**result.meta, "n_null": 0})


@pytest.mark.parametrize("draw", [lambda r: plots.heatmap(r, "q_proj"), lambda r: plots.ranking(r),
                                  lambda r: plots.drift_along(r), lambda r: plots.heatmap_grid(r),
                                  lambda r: plots.compare_methods({"exact": r}, value="rho")])
def test_rho_of_a_result_without_null_is_refused_by_name(cons, draw):
    with pytest.raises(ValueError, match="n_null=0"):
        draw(_without_null(cons))


def test_residual_plots_of_a_result_without_null_draw_no_null(cons):
    bare = _without_null(cons)
    ax = plots.drift_along(bare, value="residual")
    assert "no null" in ax.get_title()
    assert not any(line.get_linestyle() == "--" for line in ax.get_lines())
    assert not ax.collections  # no null band
    plots.heatmap(bare, "q_proj", value="residual")
    plots.compare_methods({"exact": bare})


def test_drift_along_colours_do_not_depend_on_the_selection():
    result = make_result()
    fams = result.families
    every = {l.get_label(): l.get_color() for l in plots.drift_along(result).get_lines()}
    some = {l.get_label(): l.get_color() for l in plots.drift_along(result, families=fams[1:]).get_lines()}
    assert all(some[f] == every[f] for f in fams[1:])
