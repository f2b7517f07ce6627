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


def test_compare_methods_refuses_results_of_different_models():
    """Bars of one family side by side are one model's methods; another model's result has
    the same families and pairs and would be drawn as if it were one."""
    def with_identity(r, identity):
        return AnalysisResult(r.df, {**r.meta, "identity": identity})

    a = with_identity(make_result(model="a"), "/m/a|model.safetensors:1000:1:2:3")
    b = with_identity(make_result("raw", model="b"), "/m/b|model.safetensors:2000:1:2:3")
    with pytest.raises(ValueError, match=r"different models \(exact: 'a' in /m/a, raw: 'b' in /m/b: other weight files\)"):
        plots.compare_methods({"exact": a, "raw": b})
    # the same files read elsewhere (another machine, another working folder), or no identity: said, drawn
    copy = with_identity(make_result("raw", model="a"), "/elsewhere/a|model.safetensors:1000:7:8:9")
    with pytest.warns(UserWarning, match="the same weight files and sizes"):
        plots.compare_methods({"exact": a, "raw": copy})
    with pytest.warns(UserWarning, match="names the model 'a' and raw 'b'"):
        plots.compare_methods({"exact": make_result(model="a"), "raw": make_result("raw", model="b")})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plots.compare_methods({"exact": a, "raw": with_identity(make_result("raw", model="a"), a.meta["identity"])})
        plots.compare_methods({"exact": make_result(model="a"), "raw": make_result("raw", model="a")})


def test_a_plot_asked_wrongly_is_a_drift_error():
    """Plot errors are the user's to fix, like the analysis's: DriftError (one line in the
    explorer and the CLI, no traceback), and still ValueError for code that catches that."""
    from drift.errors import DriftError

    for call in (lambda: plots.compare_methods({}), lambda: plots.heatmap(make_result(), "up_proj", value="bogus"),
                 lambda: plots.ranking(make_result(), families=["no_such_family"])):
        with pytest.raises(DriftError) as e:
            call()
        assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


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


# --------------------------------------------------------------------------- activations, ties: what each number is

def _activations(pairs: str = "all", layers=range(5), seed: int = 0) -> AnalysisResult:
    """A result shaped like ``drift.function.activation_similarity``'s (rows and meta): a
    distance (residual_angle, small for neighbours) and a similarity (update_cka, large for
    neighbours), null and ρ NaN. The real one is checked to have this shape below."""
    rng = np.random.default_rng(seed)
    layers = list(layers)
    plist = list(zip(layers[:-1], layers[1:])) if pairs == "consecutive" else \
        [(a, b) for i, a in enumerate(layers) for b in layers[i + 1:]]
    rows = []
    for fam in ("residual_angle", "update_cka"):
        for a, b in plist:
            near = 0.15 + 0.05 * (b - a) + rng.normal(0, 0.01)
            v = near if fam == "residual_angle" else 1.0 - 0.6 * near
            rows.append(dict(family=fam, layer_a=a, layer_b=b, residual=v, null=np.nan, rho=np.nan,
                             invariant=True, kind="activation", space="activations"))
    meta = dict(model="synthetic", architecture="bert", method="activations", space="activations",
                pairs=pairs, layers=layers, seed=seed)
    return AnalysisResult(pd.DataFrame(rows), meta)


def _tie(method: str = "exact", families=("q_proj", "up_proj")) -> AnalysisResult:
    """A result shaped like ``drift.function.tie``'s: consecutive (reference, target) pairs,
    damage / null tie, ``meta["space"] == "tie"``."""
    r = make_result(method, "consecutive", families=list(families))
    df = r.df.assign(residual=r.df["rho"] * 0.5, null=0.5, kind="tie", space="tie")
    return AnalysisResult(df, {**r.meta, "space": "tie", "reference": "previous", "measure": "relative_change"})


def _label_inside_figure(text) -> bool:
    """Is ``text`` (a colour bar's label) drawn wholly inside its figure?"""
    fig = text.figure
    fig.canvas.draw()
    box = text.get_window_extent(fig.canvas.get_renderer())
    return box.y0 >= 0 and box.y1 <= fig.bbox.height and box.x0 >= 0 and box.x1 <= fig.bbox.width


def _colorbars(fig) -> list:
    return [a for a in fig.axes if a.get_label() == "<colorbar>"]


def test_activation_result_of_the_real_function_is_what_the_plots_expect(toy_checkpoint):
    """The synthetic activations above have the real one's shape: every family a measure
    whose direction the plots know, the space in meta, no null."""
    from drift.function import activation_similarity
    from drift.plots._common import MEASURES, direction, space

    folder, _ = toy_checkpoint("llama")
    real = activation_similarity(folder, tokens="random", n_seq=2, seq_len=8, batch_size=2, progress=False)
    assert space(real) == space(_activations()) == "activations"
    assert real.families == _activations().families and set(real.families) <= set(MEASURES)
    assert direction(real, "residual_angle") == "distance" and direction(real, "update_cka") == "similarity"
    assert real.df["null"].isna().all()


def test_activation_ranking_turns_a_similarity_into_variation():
    """update_cka is a similarity: ranked and drawn as 1 − similarity, and it says so, so
    that "least variation on top" holds for both measures."""
    r = _activations()
    ax = plots.ranking(r, value="residual")
    bars = next(c for c in ax.containers if isinstance(c, BarContainer))
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    mean = r.df.groupby("family")["residual"].mean()
    widths = dict(zip([t.split("\n")[0] for t in ticks], [b.get_width() for b in bars]))
    assert widths["update_cka"] == pytest.approx(1.0 - mean["update_cka"])
    assert widths["residual_angle"] == pytest.approx(mean["residual_angle"])
    assert widths[ticks[0].split("\n")[0]] <= widths[ticks[1].split("\n")[0]]  # least variation on top
    assert "update_cka\n(1 − similarity)" in ticks and "residual_angle" in ticks
    assert "1 − similarity" in ax.get_xlabel() and "mean residual" not in ax.get_title()
    assert any(t.get_text().endswith(f"= 1 − {mean['update_cka']:.3f}") for t in ax.texts)  # CKA itself is shown


def test_activation_heatmap_grid_gives_each_measure_its_own_scale_and_label():
    r = _activations()
    axes = plots.heatmap_grid(r, value="residual")
    fig = axes.flat[0].figure
    cbars = _colorbars(fig)
    assert len(cbars) == 2  # a distance and a similarity share no colour bar
    labels = [c.get_ylabel() for c in cbars]
    assert labels[0].startswith("residual_angle: distance") and "update_cka" not in labels[0]
    assert labels[1].startswith("update_cka: similarity") and "residual_angle" not in labels[1]
    assert "larger = more different" in labels[0].replace("\n", " ")
    assert "larger = more alike" in labels[1].replace("\n", " ")
    clims = {ax.get_title(): ax.images[0].get_clim() for ax in axes.flat if ax.images}
    assert clims["update_cka"] == (0.0, 1.0) and clims["residual_angle"] != clims["update_cka"]
    cmaps = {ax.get_title(): ax.images[0].get_cmap().name for ax in axes.flat if ax.images}
    assert cmaps == {"residual_angle": "viridis", "update_cka": "viridis_r"}  # dark = alike in both
    assert "residual between layers" not in fig._suptitle.get_text()
    assert all(_label_inside_figure(c.yaxis.label) for c in cbars)


def test_single_measure_heatmap_carries_its_own_label():
    r = _activations()
    ax = plots.heatmap(r, "update_cka", value="residual")
    label = _colorbar_label(ax)
    assert label.startswith("update_cka: similarity") and "residual_angle" not in label
    assert "update_cka: similarity between layers" in ax.get_title()
    ax = plots.heatmap(r, "residual_angle", value="residual", cmap="magma")
    assert _colorbar_label(ax).startswith("residual_angle: distance") and "update_cka" not in _colorbar_label(ax)
    assert ax.images[0].get_cmap().name == "magma"  # a colour map asked for is used as given


@pytest.mark.parametrize("make, value, families", [
    (lambda: make_result("exact", "all"), "rho", ["q_proj"]),
    (lambda: make_result("exact", "all"), "rho", ["q_proj", "k_proj"]),
    (_activations, "residual", ["update_cka"]),  # its label was the two measures' combined one
    (_activations, "residual", ["residual_angle", "update_cka"]),
])
def test_one_row_heatmap_grid_colorbar_label_is_not_clipped(make, value, families):
    axes = plots.heatmap_grid(make(), families=families, value=value)
    cbars = _colorbars(axes.flat[0].figure)
    assert cbars and all(_label_inside_figure(c.yaxis.label) for c in cbars)


@pytest.mark.parametrize("draw", [lambda r: plots.heatmap(r, "update_cka"), lambda r: plots.ranking(r),
                                  lambda r: plots.drift_along(r), lambda r: plots.heatmap_grid(r),
                                  lambda r: plots.heatmap(r, "update_cka", value="null")])
def test_activations_have_no_null_and_are_not_told_to_rerun_with_one(draw):
    with pytest.raises(ValueError, match="activation measures have no null") as e:
        draw(_activations("consecutive"))
    assert "n_null" not in str(e.value) and "value='residual'" in str(e.value)


def test_activation_measures_along_the_depth_say_which_way_is_alike():
    ax = plots.drift_along(_activations("consecutive"), value="residual")
    labels = [ln.get_label() for ln in ax.get_lines()]
    assert "residual_angle (distance: up = different)" in labels
    assert "update_cka (similarity: up = alike)" in labels
    ax = plots.drift_along(_activations("consecutive"), families="update_cka", value="residual")
    assert ax.get_ylabel().startswith("update_cka: similarity") and "update_cka (similarity)" in ax.get_title()


def test_render_of_activations_draws_each_measure_on_its_own_axis():
    from drift.explorer_view import render

    figs = render(_activations(), value="residual")
    along = [ax for ax in figs["drift_along"].axes if ax.get_lines()]
    assert len(along) == 2
    assert [ax.get_ylabel().split(":")[0] for ax in along] == ["residual_angle", "update_cka"]
    for ax in along:
        assert len({ln.get_label() for ln in ax.get_lines() if not ln.get_label().startswith("_")}) == 1
    assert len(_colorbars(figs["heatmaps"])) == 2
    assert "1 − similarity" in figs["ranking"].axes[0].get_xlabel()


def test_ranking_null_label_is_clear_of_the_title(cons):
    fig, ax = plt.subplots(figsize=(6.4, 3), layout="constrained")
    plots.ranking(cons, ax=ax)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    title = ax.title.get_window_extent(r)
    assert not any(title.overlaps(t.get_window_extent(r)) for t in ax.texts)
    assert "null (ρ = 1)" in [t.get_text() for t in ax.get_legend().get_texts()]


def _self_comparison(pairs: str = "diagonal") -> AnalysisResult:
    """A model against itself (``analyze(m, other=m)``): every diagonal ρ is 0."""
    r = make_result("exact", "all", layers=range(4))
    rows = [dict(family=f, layer_a=L, layer_b=L, residual=0.0, null=1.36, rho=0.0, invariant=True, kind="weight")
            for f in ("q_proj", "k_proj") for L in range(4)]
    meta = {**r.meta, "model": "minilm", "pairs": pairs, "other": {"model": "minilm"}}
    return AnalysisResult(pd.DataFrame(rows), meta)


def test_a_model_against_itself_keeps_its_axes_apart_and_its_zero_lines_visible():
    r = _self_comparison()
    ax = plots.heatmap(r, "q_proj")
    assert ax.get_ylabel() == "layer of minilm (A)" and ax.get_xlabel() == "layer of minilm (B)"
    assert "minilm (A) vs minilm (B)" in ax.get_title()
    for value in ("rho", "residual"):
        ax = plots.diagonal_along(r, value=value)
        assert ax.get_ylim()[0] < 0.0  # the lines at 0 are drawn above the axis, not under it
        assert "minilm (A)" in ax.get_xlabel() and "minilm (B)" in ax.get_xlabel()
    axes = plots.heatmap_grid(r)
    fig = axes.flat[0].figure
    assert fig._supylabel.get_text() == "layer of minilm (A)" and fig._supxlabel.get_text() == "layer of minilm (B)"


def test_neighbouring_families_along_the_depth_stay_distinguishable():
    """Eleven families (tab20 gave the first two blue and light blue): neighbours differ in
    hue, or in marker and line style; no two families look the same."""
    import colorsys

    from matplotlib.colors import to_rgb

    r = make_result()
    ax = plots.drift_along(r)
    lines = [ln for ln in ax.get_lines() if ln.get_label() in r.families]
    assert len(lines) == len(r.families) == 11

    def hue(c):
        h, s, _ = colorsys.rgb_to_hsv(*to_rgb(c))
        return None if s < 0.1 else h  # grey has no hue

    looks = [(to_rgb(ln.get_color()), ln.get_marker(), ln.get_linestyle()) for ln in lines]
    assert len(set(looks)) == len(looks)
    for (c1, m1, s1), (c2, m2, s2) in zip(looks, looks[1:]):
        h1, h2 = hue(c1), hue(c2)
        apart = (h1 is None) != (h2 is None) or (h1 is not None and min(abs(h1 - h2), 1 - abs(h1 - h2)) >= 0.04)
        assert apart or (m1, s1) != (m2, s2), (c1, c2)


# --------------------------------------------------------------------------- argument checks

def test_weight_vs_tie_refuses_results_of_the_wrong_kind(cons):
    w, t = cons, _tie()
    assert plots.weight_vs_tie(w, t) is not None  # the right way round draws
    with pytest.raises(ValueError, match=r"weights is a tie result .*swapped"):
        plots.weight_vs_tie(t, w)
    with pytest.raises(ValueError, match=r"tie is a weight result \(drift.analyze\), not a tie result"):
        plots.weight_vs_tie(w, make_result("raw"))
    with pytest.raises(ValueError, match="tie is an activations result"):
        plots.weight_vs_tie(w, _activations())
    with pytest.raises(ValueError, match="weights is an activations result"):
        plots.weight_vs_tie(_activations(), t)
    with pytest.raises(TypeError, match="AnalysisResult"):
        plots.weight_vs_tie(w, None)


def test_weight_vs_tie_value_is_checked(cons):
    with pytest.raises(ValueError, match="value must be one of rho, residual, null, got 'bogus'"):
        plots.weight_vs_tie(cons, _tie(), value="bogus")


def test_weight_vs_tie_of_a_weight_result_without_null_says_so(cons):
    with pytest.raises(ValueError, match=r"weight result has no null .*value='residual'.*n_null >= 1"):
        plots.weight_vs_tie(_without_null(cons), _tie())
    ax = plots.weight_vs_tie(_without_null(cons), _tie(), value="residual")  # the way out works
    assert len(ax.collections) == 2


def test_compare_methods_refuses_activations_a_mix_and_a_list(three):
    with pytest.raises(ValueError, match="activation measures"):
        plots.compare_methods({"act": _activations()})
    with pytest.raises(ValueError, match="not a mix"):
        plots.compare_methods({"exact": three["exact"], "tie": _tie()})
    with pytest.raises(TypeError, match=r"mapping of label -> result.*not a list"):
        plots.compare_methods([three["exact"]])
    with pytest.raises(TypeError, match="AnalysisResult"):
        plots.compare_methods({"exact": None})


def test_compare_methods_of_ties_draws_no_weight_ceiling():
    """Ties by method (notebook 04) are one kind: drawn, without the weights' √2 line, titled
    with damage, not residual."""
    ax = plots.compare_methods({m: _tie(m) for m in ("exact", "raw")})
    assert not any("√2" in str(ln.get_label()) for ln in ax.get_lines())
    assert ax.get_title().startswith("damage per family") and "tie damage" in ax.get_ylabel()


def test_a_single_family_name_is_one_family(allp, three):
    axes = plots.heatmap_grid(allp, families="q_proj")
    assert [ax.get_title() for ax in axes.flat if ax.images] == ["q_proj"]
    ax = plots.ranking(allp, families="k_proj")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["k_proj"]
    ax = plots.drift_along(allp, families="q_proj")
    assert [ln.get_label() for ln in ax.get_lines() if ln.get_label() in allp.families] == ["q_proj"]
    ax = plots.compare_methods(three, families="q_proj")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["q_proj"]


@pytest.mark.parametrize("draw", [lambda r: plots.heatmap(r, "q_proj"), lambda r: plots.heatmap_grid(r),
                                  lambda r: plots.ranking(r), lambda r: plots.drift_along(r),
                                  lambda r: plots.diagonal_along(r)])
def test_no_result_is_a_clear_type_error(draw):
    with pytest.raises(TypeError, match="needs an AnalysisResult .* got NoneType"):
        draw(None)
    assert plt.get_fignums() == []  # refused before drawing


def test_weight_vs_tie_refuses_a_weight_result_of_no_known_method(cons):
    odd = AnalysisResult(cons.df, {**cons.meta, "method": "mystery"})
    with pytest.raises(ValueError, match="weights has method 'mystery', not one of"):
        plots.weight_vs_tie(odd, _tie())


def test_an_activation_measure_of_unknown_direction_is_refused_not_guessed():
    r = _activations()
    odd = AnalysisResult(r.df.assign(family=r.df["family"].replace({"update_cka": "new_measure"})), r.meta)
    with pytest.raises(ValueError, match="'new_measure' has no declared direction"):
        plots.heatmap_grid(odd, value="residual")
    with pytest.raises(ValueError, match="'new_measure' has no declared direction"):
        plots.ranking(odd, value="residual")


def test_a_result_written_from_python_keeps_the_cli_rules(tmp_path, cons):
    """to_json and export_csv replace only what drift wrote (force=True overrides), never a
    folder, pipe or device, and write nothing into the model's folder; save() names a path it
    cannot write in one line. Found by fuzzing: export_csv overwrote a checkpoint's files."""
    import os

    from drift import __version__
    from drift.checkpoint import resolve_model
    from drift.output import OutputError

    cons = AnalysisResult(cons.df, {**cons.meta, "drift_version": __version__})  # as analyze() records
    theirs = tmp_path / "config.json"
    theirs.write_text('{"hidden_size": 64}')
    for call in (lambda **k: plots.export_csv(cons, theirs, **k), lambda **k: cons.to_json(theirs, **k)):
        with pytest.raises(OutputError, match="exists and is not .*pass force=True to replace it"):
            call()
        assert theirs.read_text() == '{"hidden_size": 64}'
    assert plots.export_csv(cons, tmp_path / "t.csv") == plots.export_csv(cons, tmp_path / "t.csv")  # its own: replaced
    assert cons.to_json(tmp_path / "r.json") == cons.to_json(tmp_path / "r.json")
    with pytest.raises(OutputError, match="is not a drift result"):
        cons.to_json(tmp_path / "t.csv")  # a table is not a result file
    plots.export_csv(cons, theirs, force=True)
    assert theirs.read_text().startswith("family,layer_a,layer_b,residual,null,rho")
    os.mkfifo(tmp_path / "pipe.json")
    with pytest.raises(OutputError, match="not a regular file"):
        cons.to_json(tmp_path / "pipe.json", force=True)
    with pytest.raises(OutputError, match="is a folder"):
        plots.export_csv(cons, tmp_path)
    for write in (cons.to_json, lambda p: plots.export_csv(cons, p)):
        with pytest.raises(OutputError, match="not a file name"):
            write(f"{tmp_path}/new/x.json/")
    assert not (tmp_path / "new").exists()
    model = AnalysisResult(cons.df, {**cons.meta, "model": "tiny-qwen3"})
    with pytest.raises(OutputError, match="inside the model folder"):
        model.to_json(resolve_model("tiny-qwen3") / "r.json")
    assert not (resolve_model("tiny-qwen3") / "r.json").exists()
    fig = plots.ranking(cons).figure
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(OutputError, match="cannot save the figure to .*taken/fig.png"):
        plots.save(fig, tmp_path / "taken" / "fig.png")
    with pytest.raises(ValueError, match="dpi must be a positive number"):
        plots.save(fig, tmp_path / "fig.png", dpi=0)
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_an_empty_result_says_it_has_no_rows():
    """Not "computed with n_null=0" (found by fuzzing)."""
    from drift.errors import PlotArgumentError
    from drift.result import COLUMNS

    empty = AnalysisResult(pd.DataFrame(columns=COLUMNS), {"model": "x", "method": "exact"})
    for draw in (lambda: plots.heatmap(empty, "q_proj"), lambda: plots.ranking(empty), lambda: plots.drift_along(empty)):
        with pytest.raises(PlotArgumentError, match="no rows"):
            draw()
