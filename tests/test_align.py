"""The alignment primitives against independent implementations and planted answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import orthogonal_procrustes
from scipy.optimize import linear_sum_assignment

from drift import align, assign
from drift.gauge import random_gl, random_group_perm


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=gen(seed), dtype=torch.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_procrustes_agrees_with_scipy_transposed(seed):
    """Left action R A ≈ B equals scipy's right-action solution on the transposes (spec §4.1)."""
    A, B = randn(16, 40, seed=seed), randn(16, 40, seed=seed + 10)
    R = align.procrustes([A], [B])
    R_scipy = orthogonal_procrustes(A.numpy().T, B.numpy().T)[0].T
    np.testing.assert_allclose(R.numpy(), R_scipy, atol=1e-6)


def test_procrustes_is_optimal_against_random_rotations():
    A, B = randn(8, 30, seed=3), randn(8, 30, seed=4)
    best = float((align.procrustes([A], [B]) @ A - B).norm())
    for s in range(50):
        Q = align.random_orthogonal(8, gen(100 + s))
        assert best <= float((Q @ A - B).norm()) + 1e-12


@pytest.mark.parametrize("seed", [0, 1])
def test_planted_rotation_is_recovered_and_reference_orientation_fails(seed):
    """B_j = R0 A_j for Q, K, V and O ← O R0ᵀ. The corrected cross-covariance Σ B Aᵀ recovers
    R0; the reference's Σ A Bᵀ returns R0ᵀ, which leaves residuals near the unaligned value."""
    dh, H = 16, 64
    R0 = align.random_orthogonal(dh, gen(seed))
    q, k, v = randn(dh, H, seed=seed + 1), randn(dh, H, seed=seed + 2), randn(dh, H, seed=seed + 3)
    o = randn(H, dh, seed=seed + 4)
    qb, kb, vb, ob = R0 @ q, R0 @ k, R0 @ v, o @ R0.T
    R = align.procrustes([q, k, v, o.T], [qb, kb, vb, ob.T])
    assert float((R - R0).norm()) < 1e-10
    assert float((R @ q - qb).norm()) < 1e-10
    # the reference: M = qa qbᵀ + ka kbᵀ + va vbᵀ + oaᵀ ob, R = U Vᵀ of M
    M = q @ qb.T + k @ kb.T + v @ vb.T + o.T @ ob
    U, _, Vh = torch.linalg.svd(M)
    R_ref = U @ Vh
    assert float((R_ref - R0.T).norm()) < 1e-10  # it is the transpose
    rel = float((R_ref @ q - qb).norm() / qb.norm())
    assert rel > 0.5  # far from recovered


def test_procrustes_thin_matches_full():
    """The thin-QR route gives the same R A_j as the full n×n polar factor."""
    As = [randn(200, 30, seed=5), randn(200, 20, seed=6)]
    Bs = [randn(200, 30, seed=7), randn(200, 20, seed=8)]
    R = align.procrustes(As, Bs)
    thin = align.procrustes_thin(As, Bs)
    for a, t in zip(As, thin):
        np.testing.assert_allclose((R @ a).numpy(), t.numpy(), atol=1e-9)


def test_balance_gl_is_a_canonical_form():
    """A GL gauge pair (A ← M A, B ← M⁻ᵀ B) balances to factors related by a rotation only."""
    d, p, q = 8, 40, 50
    A, B = randn(d, p, seed=9), randn(d, q, seed=10)
    M = random_gl(d, gen(11))
    A2, B2 = M @ A, torch.linalg.inv(M).T @ B
    Ab, Bb = align.balance_gl(A, B)
    A2b, B2b = align.balance_gl(A2, B2)
    np.testing.assert_allclose((Ab.T @ Bb).numpy(), (A.T @ B).numpy(), atol=1e-9)  # same product
    np.testing.assert_allclose((Ab @ Ab.T).numpy(), (Bb @ Bb.T).numpy(), atol=1e-9)  # balanced
    R = align.procrustes([Ab, Bb], [A2b, B2b])
    assert float((R @ Ab - A2b).norm()) < 1e-9 and float((R @ Bb - B2b).norm()) < 1e-9
    # an O(d) fit alone cannot undo a GL gauge on the raw factors
    R_raw = align.procrustes([A, B], [A2, B2])
    assert float((R_raw @ A - A2).norm() / A2.norm()) > 0.1


def test_lap_matches_scipy_and_recovers_planted_permutation():
    n = 300
    X = randn(n, 20, seed=16)
    perm = torch.randperm(n, generator=gen(17)).numpy()
    Y = X[perm] + 0.01 * randn(n, 20, seed=18)  # Y[j] ≈ X[perm[j]]
    C = (Y @ X.T).numpy()  # rows: Y units, cols: X units
    col = assign.lap(C, maximize=True)
    rows, cols = linear_sum_assignment(C, maximize=True)
    assert (col[rows] == cols).all()
    assert (col == perm).all()


@pytest.mark.parametrize("pooled", [False, True])
def test_block_cost_assignment_equals_scipy_on_the_dense_matrix(pooled, tmp_path, monkeypatch):
    """A cost made in row blocks (as the MLP similarity is) gives scipy's assignment, whether it
    is solved here or written to a file for a worker process; the file is gone afterwards."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    n = assign.POOL_MIN_SIZE + 37
    X, Y = randn(n, 8, seed=30).float(), randn(n, 8, seed=31).float()
    cost = assign.BlockCost((n, n), lambda r0, r1: Y[r0:r1] @ X.T, rows_per_block=200)
    dense = (Y @ X.T).double().numpy()
    rows, cols = linear_sum_assignment(dense, maximize=True)
    with assign.lap_pool(2 if pooled else 1):
        got = assign.lap(cost, maximize=True)
    assert (got[rows] == cols).all()
    assert list(tmp_path.iterdir()) == []


def test_fro_is_accurate_in_float32():
    """The Frobenius norm that every residual goes through agrees with float64 to float32
    rounding, whole or per head, also on millions of entries."""
    X = (0.03 * randn(3072, 1024, seed=32)).float()
    exact = float(X.double().pow(2).sum().sqrt())
    assert float(align.fro(X)) == pytest.approx(exact, rel=1e-6)
    H = X.reshape(16, 192, 1024)
    np.testing.assert_allclose(align.fro(H, keep=1).double().numpy(),
                               H.double().pow(2).sum((1, 2)).sqrt().numpy(), rtol=1e-6)
    v = X[0]
    assert float(align.fro(v)) == pytest.approx(float(v.double().norm()), rel=1e-6)


@pytest.mark.parametrize("n_kv,r", [(2, 2), (1, 4), (4, 1), (3, 2)])
def test_match_heads_recovers_a_planted_group_permutation(n_kv, r):
    """Two-level assignment: finds a planted S_r ≀ S_n_kv permutation and never mixes groups."""
    nh = n_kv * r
    perm = random_group_perm(nh, n_kv, gen(19))
    feats = randn(nh, 10, seed=20)
    cost = torch.cdist(feats, feats[perm]) ** 2  # cost[h_a, h_b] = 0 iff h_a = perm[h_b]
    got = assign.match_heads(cost, n_kv)
    assert (got == perm).all()


def test_match_heads_respects_groups_even_when_a_cross_group_swap_is_cheaper():
    # heads 0,1 in group 0; 2,3 in group 1. Cheapest head-wise matching pairs 0<->2, but that mixes groups.
    cost = torch.full((4, 4), 10.0, dtype=torch.float64)
    cost[0, 2] = cost[2, 0] = 0.0
    cost[0, 0] = cost[1, 1] = cost[2, 2] = cost[3, 3] = 1.0
    got = assign.match_heads(cost, 2)
    groups = got.reshape(2, 2) // 2
    assert (groups == groups[:, :1]).all()
    flat = assign.lap(cost)
    assert flat[2] == 0  # the unconstrained optimum would cross groups


@pytest.mark.parametrize("n_kv,r", [(2, 2), (4, 4), (3, 5), (8, 2), (2, 6)])
def test_match_heads_is_optimal_against_scipy_two_level(n_kv, r):
    """Both inner routes (enumerated orderings for r ≤ 5, LAPs above) reach the optimum that
    scipy's assignment finds on the same two-level problem."""
    rng = np.random.default_rng(n_kv * 10 + r)
    for _ in range(10):
        c = rng.random((n_kv * r, n_kv * r))
        perm = assign.match_heads(torch.as_tensor(c), n_kv)
        groups = perm.reshape(n_kv, r) // r
        assert (groups == groups[:, :1]).all()
        got = c[perm, np.arange(n_kv * r)].sum()
        blocks = c.reshape(n_kv, r, n_kv, r)
        inner = np.array([[blocks[ga, :, gb, :][linear_sum_assignment(blocks[ga, :, gb, :])].sum()
                           for gb in range(n_kv)] for ga in range(n_kv)])
        best = inner[linear_sum_assignment(inner)].sum()
        assert got == pytest.approx(best, abs=1e-9)


def test_pool_workers_ignore_sigint_and_the_parent_keeps_them():
    """Ctrl-C reaches the whole process group; a worker must not die of it (the parent
    decides), or the pool breaks and every worker prints a traceback."""
    import os
    import signal

    with assign.lap_pool(2):
        pids = assign._POOL.submit(os.getpid).result(), assign._POOL.submit(os.getpid).result()
        for pid in set(pids):
            os.kill(pid, signal.SIGINT)
        rng = np.random.default_rng(0)
        cost = rng.normal(size=(assign.POOL_MIN_SIZE, assign.POOL_MIN_SIZE))
        col = assign.lap(cost)
    assert (col == linear_sum_assignment(cost)[1]).all()
