"""The numbers do not move: ``drift analyze --model minilm --pairs all`` under each method,
saved (tests/data/reference/, written by the CLI before the architecture work of #9) and
recomputed. Observed residuals must match to 1e-6; nulls and ρ too, since the seeded draws
are the same (a change of the null's random stream must update the data and say so)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import drift

DATA = Path(__file__).resolve().parent / "data" / "reference"


@pytest.mark.parametrize("method", ["exact", "rotation", "raw"])
def test_minilm_all_pairs_match_the_saved_reference(method):
    ref = json.loads((DATA / f"minilm_all_{method}.json").read_text())
    got = drift.analyze("minilm", pairs="all", method=method, progress=False)
    table = got.df.set_index(["family", "layer_a", "layer_b"])
    rows = ref["rows"]
    assert len(table) == len(rows)
    for col, tol in (("residual", 1e-6), ("null", 1e-6), ("rho", 1e-6)):
        want = np.array([r[col] for r in rows], float)
        have = np.array([table.loc[(r["family"], r["layer_a"], r["layer_b"]), col] for r in rows], float)
        assert np.allclose(have, want, rtol=0, atol=tol, equal_nan=True), \
            f"{method} {col}: max |Δ| {np.nanmax(np.abs(have - want)):.3g}"
    assert [r["invariant"] for r in rows] == [bool(table.loc[(r["family"], r["layer_a"], r["layer_b"]), "invariant"])
                                              for r in rows]
