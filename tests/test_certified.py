"""Certified sparse assignment (drift.certified, issue #10) against scipy's dense optimum."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from drift.certified import certified_lap


def _case(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "gaussian":  # null-like: unrelated units
        return rng.standard_normal((n, n))
    if kind == "related":  # a permuted noisy copy, as for similar layers (negated similarity)
        X = rng.standard_normal((n, 16))
        Y = X[rng.permutation(n)] + 0.3 * rng.standard_normal((n, 16))
        return -(Y @ X.T)
    if kind == "integer":  # many exact ties
        return rng.integers(0, 4, (n, n)).astype(float)
    if kind == "duplicates":  # duplicate units: repeated rows and columns
        B = rng.standard_normal((max(2, n // 3), max(2, n // 3)))
        return B[rng.integers(0, len(B), n)][:, rng.integers(0, len(B), n)]
    if kind == "constant":
        return np.full((n, n), 2.5)
    if kind == "low_rank":  # structured: every row alike up to a scale
        return np.outer(rng.standard_normal(n), rng.standard_normal(n))
    raise ValueError(kind)


KINDS = ["gaussian", "related", "integer", "duplicates", "constant", "low_rank"]
CASES = [(kind, n, seed) for kind in KINDS for n in (8, 33, 200, 1000) for seed in (0, 1)] + \
        [("gaussian", 4096, 0), ("related", 4096, 0), ("integer", 3, 0), ("gaussian", 1, 0)]


@pytest.mark.parametrize("kind,n,seed", CASES, ids=[f"{k}-{n}-{s}" for k, n, s in CASES])
def test_objective_equals_the_dense_optimum(kind, n, seed):
    C = _case(kind, n, np.random.default_rng(seed))
    sigma, cert = certified_lap(C)
    assert sorted(sigma.tolist()) == list(range(n))  # a permutation
    r, c = linear_sum_assignment(C)
    best = C[r, c].sum()
    got = C[np.arange(n), sigma].sum()
    assert abs(got - best) <= 1e-12 * max(1.0, abs(best)), (got, best, cert)
    assert cert.gap_bound <= 1e-9 * max(1.0, abs(best)), cert


def test_violators_join_the_candidates_and_are_counted():
    """Row 2's optimum (column 2, cost 1) is not among its two cheapest columns: the first
    sparse optimum (3) is not the dense one (1); the certificate finds the violator and the
    second round is optimal."""
    C = np.array([[0.0, 0.0, 5.0],
                  [0.0, 9.0, 3.0],
                  [0.0, 0.0, 1.0]])
    sigma, cert = certified_lap(C, k=2)
    assert sigma.tolist() == [1, 0, 2] and C[np.arange(3), sigma].sum() == 1.0
    assert cert.certified and cert.rounds == 2 and cert.violators[0] > 0 and cert.violators[-1] == 0


def test_dense_fallback_is_said():
    rng = np.random.default_rng(4)
    C = rng.standard_normal((300, 300))
    sigma, cert = certified_lap(C, k=1, max_rounds=1)
    r, c = linear_sum_assignment(C)
    assert C[np.arange(300), sigma].sum() == pytest.approx(C[r, c].sum(), rel=1e-12)
    assert cert.dense_fallback and not cert.certified


def test_bad_shape():
    with pytest.raises(ValueError, match="square"):
        certified_lap(np.zeros((3, 4)))
