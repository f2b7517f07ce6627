"""The null's draws (drift.null): the same numbers however they are kept, held within a
budget, and seeds checked before any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drift import DriftError
from drift.align import random_orthogonal
from drift.null import NullDraws, check_seed


def test_draws_are_the_seeded_sequence_and_remade_identically_beyond_the_budget():
    d, n = 24, 40
    gen = torch.Generator().manual_seed(7)
    want = [random_orthogonal(d, gen, torch.float32) for _ in range(n)]
    room = 5
    draws = NullDraws(d, n, 7, torch.float32, torch.device("cpu"), budget=room * d * d * 4)
    for sweep in range(3):  # every pair asks for every draw, in order
        for j in range(n):
            assert torch.equal(draws.rotation(j), want[j]), (sweep, j)
            assert len(draws._kept) <= room
    assert draws.made > n  # some were made again, from their saved generator states
    roomy = NullDraws(d, n, 7, torch.float32, torch.device("cpu"))
    for _ in range(2):
        for j in range(n):
            roomy.rotation(j)
    assert roomy.made == n
    with pytest.raises(IndexError):
        draws.rotation(n)


def test_many_null_draws_cost_little_memory_up_front():
    """``n_null=4000`` at d_model 2560 would be 100 GB of float32 rotations if made at once;
    nothing is made until a rotation is asked for, and then at most the budget is kept."""
    draws = NullDraws(2560, 4000, 0, torch.float32, torch.device("cpu"))
    assert draws.made == 0 and not draws._kept
    assert draws._room * 2560 * 2560 * 4 <= 256 << 20


@pytest.mark.parametrize("bad", [-1, 2 ** 53, 2 ** 64, 1.5, "3", None])
def test_bad_seeds_are_refused_by_name(bad):
    with pytest.raises(DriftError, match="seed must be"):
        check_seed(bad)


def test_integer_like_seeds_are_accepted():
    assert check_seed(np.int64(5)) == 5 and check_seed(0) == 0 and check_seed(2 ** 53 - 1) == 2 ** 53 - 1


@pytest.mark.parametrize("method", ["exact", "rotation"])
def test_a_constant_gain_has_no_null(toy_checkpoint, tmp_path, method):
    """Layer 1's input norm set to ones (an initialisation): no shuffle moves it and its
    distance to any gain survives permuting either, so the shuffled null would equal the
    residual (rho 1 by construction). Its pairs' null and rho are NaN; the others are
    finite, as in the untouched model (whose gains are not constant)."""
    import math

    import drift
    from drift import toy

    folder, model = toy_checkpoint("llama")  # 3 layers
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight.fill_(1.0)
    edited = tmp_path / "edited"
    toy.save(model, edited)
    kw = dict(method=method, pairs="all", progress=False)
    got = drift.analyze(str(edited), **kw).df.set_index(["family", "layer_a", "layer_b"])
    base = drift.analyze(str(folder), **kw).df.set_index(["family", "layer_a", "layer_b"])
    for (fam, a, b), row in got.iterrows():
        if fam == "input_ln" and 1 in (a, b):
            assert math.isnan(row["null"]) and math.isnan(row["rho"]) and row["residual"] > 0
        else:
            assert row["null"] > 0 and not math.isnan(row["rho"])
    assert base["null"].notna().all() and (base["null"] > 0).all()
