"""drift.playground: the primer's bench tells symmetries from non-symmetries, and the O(d_ff)
fit's null on unrelated weights matches gauge-spec §5."""

from __future__ import annotations

import math

import pytest
import torch

from drift import align, gauge
from drift.playground import Playground, rotation_fit_null


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
