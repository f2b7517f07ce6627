"""drift.playground: the primer's bench tells symmetries from non-symmetries, the O(d_ff)
fit's null on unrelated weights matches gauge-spec §5, and the exact fit read off in words and
tables (heads, RoPE pairs, units) names a planted element, on a toy layer and in the trained
tiny-qwen3."""

from __future__ import annotations

import math

import pytest
import torch

from drift import align, gauge
from drift.playground import (
    Playground,
    fit_heads,
    fit_qk_pairs,
    fit_summary,
    residuals,
    rotation_fit_null,
)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Playground:
    return Playground.of("llama", folder=tmp_path_factory.mktemp("pg") / "llama")


def test_compare_tells_symmetries_from_non_symmetries(llama):
    g = torch.Generator().manual_seed(0)
    d_head, d_ff = llama.sym.d_head, llama.sym.d_ff
    table = llama.compare({
        "vo": lambda L: gauge.vo_gauge(L, 0, gauge.random_gl(d_head, g)),
        "whole group": lambda L: gauge.random_gauge(L, g)[0],
        "qk rotation": lambda L: gauge.not_a_symmetry_qk_rotation(L, 0, align.random_orthogonal(d_head, g)),
        "mlp rotation": lambda L: gauge.not_a_symmetry_mlp_rotation(L, align.random_orthogonal(d_ff, g)),
    })
    assert list(table["verdict"]) == ["same function"] * 2 + ["different function"] * 2
    assert (table["weight change"] > 0.1).all()  # the weights really moved
    assert table.loc["vo", "output change"] < 1e-8


def test_identity_changes_nothing(llama):
    table = llama.compare({"identity": lambda L: L.clone()})
    assert table.loc["identity", "output change"] == 0.0
    assert table.loc["identity", "weight change"] == 0.0


def test_with_layer_leaves_the_original_model_alone(llama):
    before = {k: v.clone() for k, v in llama.model.state_dict().items()}
    llama.with_layer(gauge.random_gauge(llama.layer(), 0)[0])
    after = llama.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_rotation_fit_null_matches_the_spec():
    # p / n = 3 d_model / d_ff = 0.75: gauge-spec §5 gives 0.613 (n = 512)
    out = rotation_fit_null(128, 512, seed=0)
    assert out["no alignment"] == pytest.approx(math.sqrt(2), abs=0.02)
    assert out["O(d_ff) rotation"] == pytest.approx(0.613, abs=0.02)
    # more units than the fit can be told apart from: the null keeps falling
    assert rotation_fit_null(64, 1024)["O(d_ff) rotation"] < out["O(d_ff) rotation"]


# --------------------------------------------------------------------------- the exact fit, read off

@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> Playground:
    return Playground.of("qwen3", folder=tmp_path_factory.mktemp("pg") / "qwen3")


def _fit(a, b):
    from drift import methods

    return methods.get("exact").fit(a, b)


def test_fit_read_off_a_layer_onto_itself_is_the_identity(qwen3):
    B = qwen3.layer(1)
    s = B.sym
    summary = fit_summary(_fit(B, B), s)
    assert summary["heads in place"] == f"{s.n_heads} of {s.n_heads}"
    assert summary["MLP units in place"] == f"{s.d_ff} of {s.d_ff}"
    assert summary["RoPE pairs swapped (whole layer)"] == f"0 of {s.rope_pairs}"
    assert summary["GLU unit signs flipped"] == f"0 of {s.d_ff}"
    assert summary["keeps the function"] is True
    heads = fit_heads(_fit(B, B), s)
    assert (heads["head of A"] == range(s.n_heads)).all()


def test_fit_read_off_recovers_a_planted_group_swap_and_pair_swap(qwen3):
    B = qwen3.layer(1)
    s = B.sym
    assert (s.n_heads, s.n_kv_heads, s.qk_norm) == (4, 2, True)
    planted = [2, 3, 0, 1]  # KV groups exchanged, heads kept in order inside them (an involution)
    pairs = torch.tensor([0, 3, 5])
    A = gauge.qwen3_pair_swap(gauge.permute_heads(B, planted), pairs)
    al = _fit(A, B)
    heads = fit_heads(al, s)
    assert list(heads["head of A"]) == planted
    assert list(heads["KV group of A"]) == [1, 1, 0, 0]
    assert list(heads["KV group of B"]) == [0, 0, 1, 1]
    summary = fit_summary(al, s)
    assert summary["KV groups (B ← A)"] == "0 ← 1, 1 ← 0"
    assert summary["each KV group moved whole"] is True
    table = fit_qk_pairs(al, s)
    assert list(table.index) == ["swapped (whole layer)", "sign, KV group 0", "sign, KV group 1"]
    assert [i for i, v in enumerate(table.loc["swapped (whole layer)"]) if v == "↔"] == pairs.tolist()
    assert set(table.iloc[1:].to_numpy().ravel()) <= {"+", "−"}
    assert summary["RoPE pairs swapped (whole layer)"] == f"3 of {s.rope_pairs}"
    # the read-off element really moves A onto B
    moved = al.apply(A)
    assert float((moved.W_Q - B.W_Q).norm() / B.W_Q.norm()) < 1e-9


def test_fit_qk_pairs_without_qk_norm_gives_phases(llama):
    B = llama.layer(1)
    A = gauge.qk_gauge(B, 0, gauge.random_qk_element(B, torch.Generator().manual_seed(3)))
    table = fit_qk_pairs(_fit(A, B), B.sym)
    assert list(table.index) == [f"phase, KV group {g}" for g in range(B.sym.n_kv_heads)]
    assert table.shape[1] == B.sym.rope_pairs
    assert all(v.endswith("°") for v in table.to_numpy().ravel())
    assert "RoPE pairs swapped (whole layer)" not in fit_summary(_fit(A, B), B.sym)


def test_fit_qk_pairs_refuses_a_layer_without_rope(tmp_path):
    bert = Playground.of("bert", folder=tmp_path / "bert")
    L = bert.layer(1)
    with pytest.raises(ValueError, match="without RoPE pairs"):
        fit_qk_pairs(_fit(L, L), L.sym)


@pytest.mark.parametrize("read", [fit_heads, fit_qk_pairs, fit_summary])
def test_fit_read_off_refuses_an_approximate_alignment(llama, read):
    from drift import methods

    L0, L1 = llama.layer(0), llama.layer(1)
    with pytest.raises(ValueError, match="not an exact alignment"):
        read(methods.get("rotation").fit(L0, L1), L0.sym)


def test_residuals_see_the_moved_layer_as_the_original(qwen3):
    from drift import families

    A, B = qwen3.layer(0), qwen3.layer(1)
    moved = _fit(A, B).apply(A)
    exact = residuals({"A": (A, B), "moved": (moved, B), "same": (B, B)})
    inv = [f for f in exact.index if families.invariant("exact", A.sym, f)]
    assert len(inv) >= 8
    assert (exact.loc[inv, "A"] - exact.loc[inv, "moved"]).abs().max() < 1e-6
    assert exact["same"].abs().max() < 1e-6
    raw = residuals({"A": (A, B), "moved": (moved, B)}, method="raw")
    assert (raw["A"] - raw["moved"]).abs().max() > 0.01  # raw weights see the move


def test_of_model_puts_a_fit_back_into_the_trained_tiny_qwen3():
    from drift import methods

    pg = Playground.of_model("tiny-qwen3")
    A, B = pg.layer(0), pg.layer(1)
    table = pg.compare({"exact": methods.get("exact").fit(A, B).apply,
                        "rotation": methods.get("rotation").fit(A, B).apply}, layer=0)
    assert list(table["verdict"]) == ["same function", "different function"]
    assert (table["weight change"] > 0.5).all()
