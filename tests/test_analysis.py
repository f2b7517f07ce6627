"""drift.analyze: planted answers are recovered, unrelated layers sit at the null, and the
``rotation`` method equals the reference script with its orientation fixed."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import drift
from drift import toy
from drift.canonical import LayerReader
from drift.checkpoint import Checkpoint
from drift.methods import exact_compare, exact_form

ARCHS = list(toy.TOY_CONFIGS)
WEIGHT_KINDS = ("weight", "circuit")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            folder, _, records = toy.planted_checkpoint(name, tmp_path_factory.mktemp(f"planted_{name}"),
                                                        dtype=torch.float32)
            cache[name] = (folder, records)
        return cache[name]

    return get


@pytest.mark.parametrize("name", ARCHS)
def test_planted_exact_gauge_chain_is_recovered(planted, name):
    """Every layer is a random exact gauge transform of the previous one: residual ≤ 1e-4 on
    every weight and circuit family (fp32), and the head/unit permutations are recovered."""
    folder, records = planted(name)
    result = drift.analyze(folder, method="exact", progress=False)
    weights = result.df[result.df["kind"].isin(WEIGHT_KINDS)]
    assert len(weights) >= 2 * 8  # 2 pairs x (q, k, v, o, up, down, 2 circuits) at least
    worst = weights.groupby("family")["residual"].max()
    assert (worst <= 1e-4).all(), worst.to_dict()
    assert weights["invariant"].all()
    # the nulls are far from zero, so rho ≈ 0 too
    assert (weights["null"] > 0.3).all()

    reader = LayerReader(Checkpoint.open(folder), torch.float32)
    for k, rec in enumerate(records):
        details: dict = {}
        exact_compare(exact_form(reader.read(k)), exact_form(reader.read(k + 1)), details)
        assert (details["head_perm"] == rec.head_perm).all()
        assert (details["mlp_perm"] == rec.mlp_perm).all()
    assert len(records) == reader.n_layers - 1


@pytest.mark.parametrize("name", ["llama", "qwen3", "gpt2"])
def test_rotation_method_does_not_recover_an_exact_gauge(planted, name):
    """The approximate method leaves a large residual on the same planted chain (GL, scales and
    head permutations are outside its per-head O(d_head))."""
    folder, _ = planted(name)
    result = drift.analyze(folder, method="rotation", progress=False)
    d = result.df[result.df["kind"] == "weight"]
    assert d.groupby("family")["residual"].mean().max() > 0.1
    assert not d["invariant"].any()


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_planted_with_noise_gives_small_but_nonzero_drift(tmp_path, name):
    folder, _, _ = toy.planted_checkpoint(name, tmp_path, noise=0.01, dtype=torch.float32)
    d = drift.analyze(folder, progress=False).df
    w = d[d["kind"] == "weight"]
    assert (w["residual"] > 1e-4).all() and (w["rho"] < 0.1).all()


@pytest.fixture(scope="module")
def unrelated(tmp_path_factory):
    """Independent random layers (the toy models' own random draw), hidden 64."""
    cache = {}

    def get(name):
        if name not in cache:
            model = toy.tiny_model(name, seed=11, dtype=torch.float32, num_hidden_layers=4) \
                if "n_layer" not in toy.TOY_CONFIGS[name][2] else toy.tiny_model(name, seed=11, dtype=torch.float32, n_layer=4)
            cache[name] = toy.save(model, tmp_path_factory.mktemp(f"unrel_{name}"))
        return cache[name]

    return get


@pytest.mark.parametrize("method", ["exact", "rotation"])
@pytest.mark.parametrize("name", ["qwen3", "llama", "gemma2", "phi3", "gpt2", "gpt_neox", "bert"])
def test_unrelated_layers_sit_at_the_null(unrelated, name, method):
    result = drift.analyze(unrelated(name), method=method, pairs="all", n_null=3, seed=1, progress=False)
    w = result.df[result.df["kind"].isin(WEIGHT_KINDS)]
    mean_rho = w.groupby("family")["rho"].mean()
    assert len(mean_rho) >= 6
    assert ((mean_rho > 0.85) & (mean_rho < 1.15)).all(), mean_rho.to_dict()


def test_results_are_reproducible_and_seed_dependent(unrelated):
    folder = unrelated("llama")
    a = drift.analyze(folder, layers=[0, 1], seed=3, progress=False).df
    b = drift.analyze(folder, layers=[0, 1], seed=3, progress=False).df
    c = drift.analyze(folder, layers=[0, 1], seed=4, progress=False).df
    assert a.equals(b)
    assert not np.allclose(a["null"], c["null"])
    assert np.allclose(a["residual"], c["residual"])  # the seed only moves the null


@pytest.mark.parametrize("method", ["exact", "rotation"])
def test_no_null_gives_the_same_residuals_and_nan_rho(unrelated, method, tmp_path):
    folder = unrelated("qwen3")
    with_null = drift.analyze(folder, layers=[0, 1, 2], method=method, seed=5, progress=False)
    bare = drift.analyze(folder, layers=[0, 1, 2], method=method, seed=5, n_null=0, progress=False)
    assert with_null.df["null"].notna().all() and with_null.df["null"].gt(0).all()
    pd.testing.assert_frame_equal(bare.df.drop(columns=["null", "rho"]),
                                  with_null.df.drop(columns=["null", "rho"]))
    assert bare.df["null"].isna().all() and bare.df["rho"].isna().all()
    assert bare.meta["n_null"] == 0 and "not computed" in bare.meta["null"]
    d = json.loads(bare.to_json(tmp_path / "bare.json").read_text())  # strict JSON: null, not NaN
    assert all(v is None for vals in d["null_residuals"].values() for v in vals)
    assert all(v is not None for vals in d["family_residuals"].values() for v in vals)


@pytest.mark.parametrize("name", ["qwen3", "gpt2", "bert"])
def test_consumed_form_and_lazy_null_rotation_change_nothing(unrelated, name):
    """exact_form(consume=True) equals the non-consuming form and releases the layer's
    matrices; the lazily rotated MLP of the null equals the eagerly rotated one."""
    reader = LayerReader(Checkpoint.open(unrelated(name)), torch.float32)
    fa = exact_form(reader.read(0))
    layer = reader.read(1)
    fb = exact_form(layer.clone())
    fb_consumed = exact_form(layer, consume=True)
    assert layer.W_up is None and layer.W_Q is None and layer.W_down is None
    for key in ("Q", "K", "V", "O", "U", "D"):
        assert torch.equal(getattr(fb, key), getattr(fb_consumed, key)), key
    R = torch.linalg.qr(torch.randn(fb.H, fb.H, generator=torch.Generator().manual_seed(2)))[0]
    eager = exact_compare(fa, fb.rotate_residual(R))
    lazy = exact_compare(fa, fb.rotate_residual(R, lazy_mlp=True))
    assert eager.keys() == lazy.keys()
    for fam in eager:
        assert lazy[fam] == pytest.approx(eager[fam], abs=2e-6), fam
    assert abs(eager["up_proj"] - exact_compare(fa, fb)["up_proj"]) > 1e-3  # the null did rotate


def test_lazy_rotations_are_refused_where_they_would_be_wrong(unrelated):
    from drift.methods import rotation_compare, rotation_form
    from drift.methods.exact import _mlp_cost

    reader = LayerReader(Checkpoint.open(unrelated("llama")), torch.float32)
    f = exact_form(reader.read(0))
    R = torch.eye(f.H)
    lazy = f.rotate_residual(R, lazy_mlp=True)
    with pytest.raises(ValueError, match="already carries"):
        lazy.rotate_residual(R, lazy_mlp=True)
    with pytest.raises(ValueError, match="only layer B"):
        _mlp_cost(lazy, f, glu=True)
    r = rotation_form(reader.read(1))
    with pytest.raises(ValueError, match="eagerly rotated"):
        rotation_compare(r, r.rotate_residual(R, lazy_mlp=True))


@pytest.mark.parametrize("pairs", ["consecutive", "all"])
def test_a_small_form_budget_gives_the_same_result(unrelated, pairs, monkeypatch):
    """With room for only two forms, analyze finishes and drops forms early (all pairs: makes
    some again) and gets exactly the same numbers; consecutive pairs still read each layer once."""
    folder = unrelated("llama")
    full = drift.analyze(folder, pairs=pairs, progress=False)
    reads: list[int] = []
    original = LayerReader.read
    monkeypatch.setattr(LayerReader, "read", lambda self, i: (reads.append(i), original(self, i))[1])
    tight = drift.analyze(folder, pairs=pairs, progress=False, form_budget=1)
    pd.testing.assert_frame_equal(full.df, tight.df)
    if pairs == "consecutive":
        assert sorted(reads) == [0, 1, 2, 3]
    else:
        assert len(reads) > 4 and set(reads) == {0, 1, 2, 3}


def test_device_auto_runs_the_cpu_path_here_and_cuda_is_refused_by_name(unrelated, monkeypatch):
    """The CUDA path is the same code on other tensors: ``auto`` takes CUDA where there is
    one (and must agree with the CPU to 1e-4) and the CPU elsewhere; asking for CUDA without
    one is a clear error."""
    folder = unrelated("qwen3")
    auto = drift.analyze(folder, layers=[0, 1], device="auto", progress=False)
    cpu = drift.analyze(folder, layers=[0, 1], device="cpu", progress=False)
    pd.testing.assert_frame_equal(auto.df, cpu.df, check_exact=False, atol=1e-4, rtol=0)
    assert auto.meta["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(drift.DriftError, match="no CUDA device"):
        drift.analyze(folder, layers=[0, 1], device="cuda", progress=False)


def test_fp64_and_fp32_agree(unrelated):
    folder = unrelated("qwen3")
    a = drift.analyze(folder, layers=[1, 2], dtype="float32", progress=False).df
    b = drift.analyze(folder, layers=[1, 2], dtype="float64", progress=False).df
    np.testing.assert_allclose(a["residual"], b["residual"], atol=1e-4)


def test_pairs_layout_and_json_round_trip(unrelated, tmp_path):
    folder = unrelated("gpt2")
    r = drift.analyze(folder, layers=[0, 1, 3], pairs="all", progress=False)
    assert r.pairs == [(0, 1), (0, 3), (1, 3)]
    r.to_json(tmp_path / "r.json")
    d = json.loads((tmp_path / "r.json").read_text())
    for key in ("model", "block_start", "block_end", "family_residuals", "method", "pairs",
                "null_residuals", "normalized", "architecture", "config", "drift_version"):
        assert key in d, key
    assert d["block_start"] == 0 and d["block_end"] == 3 and d["pairs"] == "all"
    assert len(d["family_residuals"]["q_proj"]) == 3
    back = drift.AnalysisResult.from_json(tmp_path / "r.json")
    np.testing.assert_allclose(back.df["rho"], r.df["rho"])
    assert back.meta["method"] == "exact"
    c = r.consecutive()
    assert c.pairs == [(0, 1)] and c.meta["pairs"] == "consecutive"


def test_summary_is_ranked_and_complete(unrelated):
    r = drift.analyze(unrelated("llama"), progress=False)
    s = r.summary()
    assert list(s["mean"]) == sorted(s["mean"])
    assert (s["n"] == 3).all()
    assert set(s.index) >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                            "qk_circuit", "ov_circuit", "input_ln", "post_attn_ln"}
    assert not s.loc["input_ln", "invariant"] and s.loc["q_proj", "invariant"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="procrustes"), "method must be one of"),
    (dict(pairs="some"), "pairs must be"),
    (dict(layers=[0, 9]), "out of range"),
    (dict(layers=[1]), "at least two layers"),
    (dict(dtype="float16"), "dtype must be"),
    (dict(n_null=-1), "n_null"),
])
def test_bad_arguments_raise_drift_errors(unrelated, kwargs, match):
    with pytest.raises(drift.DriftError, match=match):
        drift.analyze(unrelated("llama"), progress=False, **kwargs)


# ---------------------------------------------------------------------------- the reference

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "seed_layer_variation.py"


@pytest.mark.skipif(not REFERENCE.is_file(), reason="shared/reference not present beside the repo")
def test_rotation_equals_reference_with_fixed_orientation(unrelated, tmp_path, monkeypatch):
    """Run the reference script itself on a tiny Qwen3 checkpoint, with its Procrustes patched
    to return polar(Σ B Aᵀ) = polar(Σ A Bᵀ)ᵀ, and compare family by family."""
    pytest.importorskip("accelerate")
    folder = unrelated("qwen3")
    spec = importlib.util.spec_from_file_location("seed_reference", REFERENCE)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    original = ref.procrustes
    monkeypatch.setattr(ref, "procrustes", lambda M: original(M).T)
    out = tmp_path / "ref.json"
    monkeypatch.setattr(sys, "argv", ["ref", "--model", str(folder), "--block-start", "0",
                                      "--block-end", "3", "--out", str(out)])
    ref.main()
    expected = json.loads(out.read_text())["family_residuals"]
    got = drift.analyze(folder, method="rotation", progress=False).to_json_dict()["family_residuals"]
    compared = 0
    for fam, values in expected.items():
        assert fam in got, fam
        np.testing.assert_allclose(got[fam], values, atol=2e-5, err_msg=fam)
        compared += 1
    assert compared == 11
