"""Cross-model drift: ``drift.analyze(A, other=B)`` compares layer i of A with layer j of B.

Planted: B is A with every layer moved by its own random exact gauge, so every diagonal pair
is identical up to gauge (residual ≈ 0). Controls: B = A + Gaussian noise (ρ grows with the
noise), an unrelated B (ρ ≈ 1), the same model twice (the diagonal is 0 and the off-diagonal
is the one-model analysis). Refusals: another architecture, another shape, a pairs choice
that needs (or excludes) ``other``, a revision not in the local HF cache.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import drift  # noqa: E402
from drift import DriftError, ModelMismatchError, ModelNotFoundError, gauge, toy  # noqa: E402
from drift.cache import Cache  # noqa: E402
from drift.canonical import LayerReader, layer_state_dict  # noqa: E402
from drift.checkpoint import Checkpoint  # noqa: E402
from drift.cli import main  # noqa: E402

from _synthetic import make_result  # noqa: E402

ARCHS = list(toy.TOY_CONFIGS)


def rewrite(src: Path, model, dst: Path, edit) -> Path:
    """A copy of checkpoint ``src`` (whose weights ``model`` holds) with every layer L replaced
    by ``edit(layer L)``, saved to ``dst``."""
    reader = LayerReader(Checkpoint.open(src), torch.float64)
    for L in range(reader.n_layers):
        _, unexpected = model.load_state_dict(layer_state_dict(edit(reader.read(L)), reader), strict=False)
        assert not unexpected
    reader.ckpt.close()
    return toy.save(model, dst)


def gauged(src: Path, model, dst: Path, seed: int = 7) -> Path:
    gen = torch.Generator().manual_seed(seed)
    return rewrite(src, model, dst, lambda layer: gauge.random_gauge(layer, gen)[0])


def noisy(src: Path, model, dst: Path, sigma: float, seed: int = 3) -> Path:
    gen = torch.Generator().manual_seed(seed)  # the same noise at every level, scaled
    return rewrite(src, model, dst, lambda layer: layer.map(
        lambda t: t + sigma * t.std() * torch.randn(t.shape, generator=gen, dtype=t.dtype)))


def invariant_rows(result):
    d = result.df[result.df["invariant"]]
    assert len(d) >= 8 * len(result.pairs), d["family"].unique()  # every weight and circuit family
    return d


@pytest.fixture(scope="module")
def llama(toy_checkpoint, tmp_path_factory):
    """(A, B = A gauged layer by layer, U = an unrelated llama of another seed)."""
    a, model = toy_checkpoint("llama")
    root = tmp_path_factory.mktemp("cross")
    b = gauged(a, model, root / "gauged")
    u = toy.save(toy.tiny_model("llama", seed=1, dtype=torch.float32), root / "unrelated")
    return a, b, u


# --------------------------------------------------------------------------- planted and controls

@pytest.mark.parametrize("name", ARCHS)
def test_a_layerwise_gauged_copy_has_zero_diagonal(name, toy_checkpoint, tmp_path):
    a, model = toy_checkpoint(name)
    b = gauged(a, model, tmp_path / "b")
    ra, rb = (LayerReader(Checkpoint.open(f), torch.float32) for f in (a, b))
    moved = [float((rb.read(L).W_V - ra.read(L).W_V).norm() / ra.read(L).W_V.norm()) for L in range(ra.n_layers)]
    assert min(moved) > 0.1, moved  # the raw weights did move
    r = drift.analyze(a, other=b, n_null=0, progress=False)
    assert r.pairs == [(L, L) for L in range(ra.n_layers)] and r.meta["pairs"] == "diagonal"
    d = invariant_rows(r)
    worst = d.groupby("family")["residual"].max()
    assert (worst < 1e-4).all(), worst.to_dict()


def test_noise_raises_the_diagonal_monotonically(toy_checkpoint, tmp_path):
    a, model = toy_checkpoint("llama")
    levels = [0.01, 0.05, 0.2, 0.6]
    rho = []
    for k, sigma in enumerate(levels):
        b = noisy(a, model, tmp_path / f"noise{k}", sigma)
        d = invariant_rows(drift.analyze(a, other=b, progress=False))
        rho.append(float(d["rho"].mean()))
    assert all(x < y for x, y in zip(rho, rho[1:])), dict(zip(levels, rho))
    assert 0 < rho[0] < 0.05 and rho[-1] > 0.3, dict(zip(levels, rho))


def test_an_unrelated_model_sits_at_the_null(llama):
    a, _, u = llama
    r = drift.analyze(a, other=u, pairs="all", n_null=2, progress=False)
    assert len(r.pairs) == 9
    rho = invariant_rows(r).groupby("family")["rho"].mean()
    assert ((rho > 0.8) & (rho < 1.2)).all(), rho.to_dict()


def test_the_same_model_twice(llama):
    """The diagonal is 0 in every family; off the diagonal, the one-model analysis's numbers."""
    a, _, _ = llama
    r = drift.analyze(a, other=a, pairs="all", progress=False)
    assert r.pairs == [(i, j) for i in range(3) for j in range(3)]
    diag = r.diagonal().df
    assert len(diag) >= 3 * 9 and diag["residual"].max() < 1e-5 and diag["rho"].max() < 1e-4
    one = drift.analyze(a, pairs="all", progress=False).df.set_index(["family", "layer_a", "layer_b"])
    both = r.df.set_index(["family", "layer_a", "layer_b"]).loc[one.index]
    assert len(one) >= 3 * 9
    np.testing.assert_allclose(both["residual"], one["residual"], atol=1e-6)
    assert r.meta["other"] == {"model": str(a), "identity": Checkpoint.open(a).identity()}


def test_layers_choose_the_layers_of_both(llama):
    a, b, _ = llama
    r = drift.analyze(a, other=b, layers=[2, 0], pairs="all", n_null=0, progress=False)
    assert sorted(r.pairs) == [(0, 0), (0, 2), (2, 0), (2, 2)]
    assert drift.analyze(a, other=b, layers=[1], n_null=0, progress=False).pairs == [(1, 1)]


# --------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("other,config,message", [
    ("qwen3", {}, r"architecture differs \(llama vs qwen3\)"),
    ("llama_mha", {}, r"n_kv_heads 2 vs 4"),
    ("llama", {"intermediate_size": 96}, r"d_ff 128 vs 96"),
    ("llama", {"num_hidden_layers": 2}, r"n_layers 3 vs 2"),
    ("llama", {"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}, r"rope_theta 10000.0 vs 500000.0"),
])
def test_a_mismatch_is_one_line_naming_it(other, config, message, toy_checkpoint, checkpoint_copy):
    a, _ = toy_checkpoint("llama")
    b = checkpoint_copy(other, **config) if config else toy_checkpoint(other)[0]
    with pytest.raises(ModelMismatchError, match=message) as e:
        drift.analyze(a, other=b, progress=False)
    assert "\n" not in str(e.value) and str(a) in str(e.value) and str(b) in str(e.value)


@pytest.mark.parametrize("kwargs,message", [
    (dict(pairs="diagonal"), r"pairs='diagonal' needs other="),
    (dict(pairs="consecutive", other="OTHER"), r"with other= pairs must be 'diagonal' or 'all'"),
    (dict(pairs="diag", other="OTHER"), r"pairs must be 'diagonal' or 'all', not 'diag'"),
    (dict(layers=[3], other="OTHER"), r"layer 3 is out of range"),
    (dict(layers=[], other="OTHER"), r"need at least one layer"),
])
def test_pairs_and_layers_are_checked(kwargs, message, llama):
    a, b, _ = llama
    if kwargs.get("other") == "OTHER":
        kwargs["other"] = b
    with pytest.raises(DriftError, match=message):
        drift.analyze(a, progress=False, **kwargs)


# --------------------------------------------------------------------------- revisions in the HF cache

@pytest.fixture
def hf_cache(tmp_path, monkeypatch, llama):
    """A local HF cache holding org/tiny at two commits: main (A) and tag v2 (A gauged)."""
    from huggingface_hub import constants

    a, b, _ = llama
    repo = tmp_path / "hub" / "models--org--tiny"
    commits = {"main": "1" * 40, "v2": "2" * 40}
    for ref, src in (("main", a), ("v2", b)):
        shutil.copytree(src, repo / "snapshots" / commits[ref])
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commits[ref])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return repo, commits


def test_a_revision_in_the_local_cache(hf_cache):
    repo, commits = hf_cache
    assert drift.resolve_model("org/tiny@v2") == repo / "snapshots" / commits["v2"]
    assert drift.resolve_model(f"org/tiny@{commits['main']}") == repo / "snapshots" / commits["main"]
    r = drift.analyze("org/tiny", other="org/tiny@v2", n_null=0, progress=False)
    assert invariant_rows(r)["residual"].max() < 1e-4
    assert r.meta["other"]["model"] == "org/tiny@v2" and commits["v2"] in r.meta["other"]["identity"]


def test_a_revision_not_in_the_cache_is_named(hf_cache):
    _, commits = hf_cache
    with pytest.raises(ModelNotFoundError, match=r"revision 'v3' of org/tiny is not in the local") as e:
        drift.resolve_model("org/tiny@v3")
    assert "main" in str(e.value) and "v2" in str(e.value) and commits["v2"] in str(e.value)
    with pytest.raises(ModelNotFoundError, match="no revision of it is cached"):
        drift.resolve_model("org/absent@main")


# --------------------------------------------------------------------------- cache and CLI

def test_the_cache_key_holds_the_other_model(llama, tmp_path):
    a, b, u = llama
    c = Cache(tmp_path / "c")
    ab, au = c.key(a, other=b), c.key(a, other=u)
    assert ab != au and ab != c.key(a) and "other" not in c.key(a)
    assert ab == c.key(a, other=b, pairs="diagonal")  # the default, spelled out
    assert ab["other"]["identity"] == Checkpoint.open(b).identity()
    r1, hit1 = c.get_or_compute(a, other=b, n_null=0, progress=False)
    r2, hit2 = c.get_or_compute(a, other=b, n_null=0, progress=False)
    assert (hit1, hit2) == (False, True) and r2.meta["other"] == r1.meta["other"]


def test_cli_round_trip_writes_json(llama, tmp_path, capsys):
    a, b, _ = llama
    out = tmp_path / "ab.json"
    assert main(["analyze", "--model", str(a), "--other", str(b), "--pairs", "all", "--n-null", "0",
                 "--out", str(out)]) == 0
    assert f"{a} vs {b}" in capsys.readouterr().out
    d = json.loads(out.read_text())
    assert d["model"] == str(a) and d["other"]["model"] == str(b) and d["pairs"] == "all"
    assert d["pairs_list"] == [[i, j] for i in range(3) for j in range(3)]
    diag = [v for (i, j), v in zip(d["pairs_list"], d["family_residuals"]["qk_circuit"]) if i == j]
    assert len(diag) == 3 and max(diag) < 1e-4


@pytest.mark.parametrize("args,message", [
    (["--pairs", "diagonal"], "--pairs diagonal compares layer i of --model with layer i of --other"),
    (["--other", "QWEN3"], "architecture differs (llama vs qwen3)"),
    (["--other", "SELF", "--pairs", "consecutive"], "with --other use diagonal or all"),
])
def test_cli_errors_are_one_line(args, message, llama, toy_checkpoint, tmp_path, capsys):
    a, _, _ = llama
    subst = {"QWEN3": str(toy_checkpoint("qwen3")[0]), "SELF": str(a)}
    code = main(["analyze", "--model", str(a), *[subst.get(x, x) for x in args], "--quiet",
                 "--out", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and err.startswith("drift: ")


# --------------------------------------------------------------------------- plots

def test_cross_heatmap_and_diagonal_plot(llama):
    import matplotlib.pyplot as plt

    from drift import plots

    a, b, _ = llama
    r = drift.analyze(a, other=b, pairs="all", progress=False)
    m = r.matrix("qk_circuit")
    assert list(m.index) == [0, 1, 2] and list(m.columns) == [0, 1, 2]
    assert np.isfinite(m.to_numpy()).all() and np.diag(m.to_numpy()).max() < 1e-3 < m.to_numpy().max()
    ax = plots.heatmap(r, "qk_circuit")
    assert ax.get_ylabel() == f"layer of {a.name}" and ax.get_xlabel() == f"layer of {b.name}"
    data = ax.images[0].get_array()
    assert not np.ma.getmaskarray(data).any()  # the diagonal is a measurement, not masked
    assert f"{a.name} vs {b.name}" in ax.get_title()
    _, ax2 = plt.subplots()
    fams = ["q_proj", "qk_circuit"]
    assert plots.diagonal_along(r, families=fams, ax=ax2) is ax2
    lines = [ln for ln in ax2.get_lines() if ln.get_label() in fams]
    assert len(lines) == 2 and all(len(ln.get_xdata()) == 3 for ln in lines)
    assert max(float(np.max(ln.get_ydata())) for ln in lines) < 1e-3
    with pytest.raises(ValueError, match="no diagonal pairs"):
        plots.diagonal_along(make_result("exact", "all"))  # one model's pairs
    plt.close("all")

