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


# The device-resident path (drift.methods.exact's): a similarity to maximise, made in blocks of
# rows by torch and kept where it was made. Run here on the CPU; on a GPU the same code runs
# with the blocks, top-k and scan on the device.

def _similarity(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "offset":  # the optimum turns on differences float16 cannot hold (its ulp at 1 is 1e-3)
        return 1 + 1e-4 * rng.standard_normal((n, n))
    if kind == "zero-rows":  # a block of rows all 0 (its float16 scale must not be 0)
        S = rng.standard_normal((n, n))
        S[:100] = 0
        return S
    if kind == "tiny":  # float32 subnormals: below float16's range however scaled
        return 1e-39 * rng.standard_normal((n, n))
    if kind == "related":  # B's units a permuted noisy copy of A's
        X = rng.standard_normal((n, 24))
        return (X[rng.permutation(n)] + 0.4 * rng.standard_normal((n, 24))) @ X.T
    if kind == "glu":  # the exact method's form: <g, g'> + |<u, u'> + <d, d'>|
        G, U, D = (rng.standard_normal((2, n, 16)) for _ in range(3))
        return G[0] @ G[1].T + np.abs(U[0] @ U[1].T + D[0] @ D[1].T)
    return -_case(kind, n, rng)


SIM_CASES = [(kind, n, seed) for kind in ("gaussian", "related", "glu", "integer", "duplicates", "constant")
             for n in (8, 120, 700) for seed in (0, 1)] + [("gaussian", 2048, 0), ("related", 2048, 0),
                                                           ("offset", 120, 0), ("offset", 700, 0),
                                                           ("zero-rows", 300, 0), ("tiny", 300, 0)]


@pytest.mark.parametrize("held", ["float16", "float32"])
@pytest.mark.parametrize("kind,n,seed", SIM_CASES, ids=[f"{k}-{n}-{s}" for k, n, s in SIM_CASES])
def test_similarity_in_blocks_reaches_the_dense_optimum(kind, n, seed, held):
    import torch

    from drift.certified import certified_similarity

    S = torch.as_tensor(_similarity(kind, n, np.random.default_rng(seed)), dtype=torch.float32)
    made = []

    def block(r0, r1):
        made.append((r0, r1))
        return S[r0:r1].clone()

    sigma, cert = certified_similarity(n, block, rows_per_block=96, held=getattr(torch, held))
    assert sorted(sigma.tolist()) == list(range(n))
    blocks = [(r, min(n, r + 96)) for r in range(0, n, 96)]
    assert made[:len(blocks)] == blocks  # made once in order; float32 holds them
    assert len(made) == len(blocks) + cert.remade_blocks + (len(blocks) if cert.dense_fallback and held == "float16" else 0)
    assert set(made) <= set(blocks) and (held == "float16" or cert.remade_blocks == 0)
    if kind == "offset" and held == "float16" and not cert.dense_fallback:
        assert cert.remade_blocks > 0  # the float16 copy could not settle them: made again
    S64 = S.double().numpy()  # the float32 values, exactly
    r, c = linear_sum_assignment(S64, maximize=True)
    best, got = S64[r, c].sum(), S64[np.arange(n), sigma].sum()
    assert abs(got - best) <= 1e-12 * max(1.0, abs(best)), (got, best, cert)
    assert cert.objective == pytest.approx(-got, rel=1e-12, abs=1e-12)


def test_similarity_violators_and_fallback():
    """A violator outside every row's top k is found by the scan; with one round allowed, the
    dense solver decides and says so."""
    import torch

    from drift.certified import certified_similarity

    S = torch.tensor([[0.0, 0.0, -5.0], [0.0, -9.0, -3.0], [0.0, 0.0, -1.0]])
    sigma, cert = certified_similarity(3, lambda r0, r1: S[r0:r1], k=2)
    assert sigma.tolist() == [1, 0, 2] and cert.rounds == 2 and cert.violators == [1, 0]
    S = torch.as_tensor(np.random.default_rng(4).standard_normal((300, 300)), dtype=torch.float32)
    sigma, cert = certified_similarity(300, lambda r0, r1: S[r0:r1], k=1, max_rounds=1)
    r, c = linear_sum_assignment(S.double().numpy(), maximize=True)
    assert S.double().numpy()[np.arange(300), sigma].sum() == pytest.approx(S.double().numpy()[r, c].sum(), rel=1e-12)
    assert cert.dense_fallback


def test_each_round_goes_to_the_given_solver_and_the_answer_is_the_same():
    """``solve_round`` (what an executor sends to another process) is what solves every round:
    with it, σ and the certificate are those of the default; a solver that loses the duals
    (σ not optimal on its candidates) sends the problem to the dense solver."""
    import torch

    from drift import certified as dc

    S = torch.as_tensor(np.random.default_rng(7).standard_normal((400, 400)), dtype=torch.float32)
    seen = []

    def counting(*args):
        seen.append(len(args[1]))  # the round's candidate entries
        return dc.sparse_round(*args)

    base = dc.certified_similarity(400, lambda r0, r1: S[r0:r1].clone(), k=10, rows_per_block=96)
    got = dc.certified_similarity(400, lambda r0, r1: S[r0:r1].clone(), k=10, rows_per_block=96,
                                  solve_round=counting)
    assert np.array_equal(got[0], base[0]) and got[1] == base[1]
    assert len(seen) == got[1].rounds >= 2 and seen[0] == 400 * 10 and seen == sorted(seen)
    lost = dc.certified_similarity(400, lambda r0, r1: S[r0:r1].clone(), k=10, rows_per_block=96,
                                   solve_round=lambda *a: (dc.sparse_round(*a)[0], None))
    assert lost[1].dense_fallback and lost[1].rounds == 1 and np.array_equal(lost[0], base[0])


def test_a_similarity_with_nan_or_inf_is_refused():
    import torch

    from drift.certified import certified_similarity

    for bad in (float("nan"), float("inf")):
        S = torch.ones((300, 300))
        S[200, 7] = bad
        with pytest.raises(ValueError, match="NaN or infinite entries in rows 192..287"):
            certified_similarity(300, lambda r0, r1: S[r0:r1].clone(), rows_per_block=96)


def test_a_gap_above_the_limit_is_an_error(monkeypatch):
    """Potentials lowered by 1e-6 each stay dual feasible but prove only a bound 600e-6 below
    the objective (~ -1700): a gap of 3.5e-7 of it, above GAP_LIMIT."""
    import drift.certified as dc

    duals = dc._duals
    monkeypatch.setattr(dc, "_duals", lambda *a: (lambda u, v: (u - 1e-6, v))(*duals(*a)))
    with pytest.raises(dc.UncertifiedAssignment, match="gap bound"):
        dc.certified_lap(np.random.default_rng(0).standard_normal((600, 600)))
    monkeypatch.setattr(dc, "_duals", duals)
    dc.certified_lap(np.random.default_rng(0).standard_normal((600, 600)))


# Costs that once broke the sparse path (found by fuzzing): each must reach the dense optimum.
def _rows_apart(n, ratio, seed):
    X = np.random.default_rng(seed).standard_normal((n, n))
    X[:1] *= ratio ** 0.5
    X[1:] /= ratio ** 0.5
    return X


HARD = {
    "rows 1e10 apart (scipy's sparse matching looped)": lambda: _rows_apart(4, 1e10, 0),
    "rows 1e40 apart (a non-optimal sparse matching)": lambda: _rows_apart(4, 1e40, 0),
    "all zeros (objective 0: the gap limit)": lambda: np.zeros((6, 6)),
    "float32 subnormals": lambda: 1e-40 * np.random.default_rng(10).standard_normal((192, 192)),
}


@pytest.mark.parametrize("name", list(HARD))
@pytest.mark.parametrize("held", ["float16", "float32"])
def test_hard_costs_reach_the_optimum(name, held):
    import torch

    from drift.certified import certified_similarity

    S = torch.as_tensor(HARD[name](), dtype=torch.float32)
    n = S.shape[0]
    S64 = S.double().numpy()
    r, c = linear_sum_assignment(S64, maximize=True)
    best = S64[r, c].sum()
    for rows in (1, 7, 512):
        sigma, cert = certified_similarity(n, lambda r0, r1: S[r0:r1].clone(), k=n if n < 10 else None,
                                           rows_per_block=rows, held=getattr(torch, held))
        got = S64[np.arange(n), sigma].sum()
        assert abs(got - best) <= 1e-12 * max(abs(best), 1e-300) or got == best, (rows, got, best, cert)
    sigma, _ = certified_lap(-S64, k=n if n < 10 else None)
    assert abs(S64[np.arange(n), sigma].sum() - best) <= 1e-12 * max(abs(best), 1e-300) or got == best


# Wired into drift.analyze: MLP assignments of at least assign.CERTIFIED_MIN_SIZE units go the
# certified path (solved where the similarity is made) and the result says how they were proven.

@pytest.mark.parametrize("model", ["tiny-qwen3", "minilm"])
def test_analyze_through_the_certified_path_gives_the_dense_numbers(model, monkeypatch):
    """One torch thread for both runs: the dense path may run its GEMMs next to solver
    processes on fewer threads, which moves the residuals' last bits (~4e-8), not the assignment."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _compare_paths(model, monkeypatch)
    finally:
        torch.set_num_threads(threads)


def _compare_paths(model, monkeypatch):
    import drift
    from drift import assign


    kw = dict(pairs="all", method="exact", progress=False, layers=[0, 1, 2, 3])
    dense = drift.analyze(model, **kw)
    assert "assignment" not in dense.meta  # d_ff (384, 1536) is below the certified path's size
    monkeypatch.setattr(assign, "CERTIFIED_MIN_SIZE", 64)
    cert = drift.analyze(model, **kw)
    a = cert.meta["assignment"]
    assert a["assignments"] == 12  # 6 pairs, observed and null
    assert a["max_relative_gap_bound"] <= 1e-9
    if model == "tiny-qwen3":  # trained GLU units have no hubs: nearly all are certified (measured 11 of 12)
        assert a["assignments"] - a["dense_fallbacks"] >= 10, a
    else:  # MiniLM's MLP units share a direction: hub columns top every row, the candidates miss, dense decides
        assert a["dense_fallbacks"] > 0, a
    np.testing.assert_allclose(cert.df["residual"], dense.df["residual"], rtol=1e-12, atol=0)
    # For a null partner the certified path takes the MLP residuals from the similarity's own
    # float32 terms at the matched entries (exact._mlp_residuals_matched); the dense path
    # differences the units. Heads and gains are the same arithmetic on both paths.
    mlp = cert.df["family"].isin(["gate_proj", "up_proj", "down_proj"]).to_numpy()
    np.testing.assert_allclose(cert.df["null"][~mlp], dense.df["null"][~mlp], rtol=1e-12, atol=0)
    np.testing.assert_allclose(cert.df["null"][mlp], dense.df["null"][mlp], rtol=1e-6, atol=0)


def test_a_planted_unit_permutation_is_recovered_by_the_certified_path(monkeypatch):
    """Layer B is layer A with its MLP units permuted and signs flipped: the certified path
    finds the permutation (every MLP residual ~0) and proves it in one round."""
    import torch

    from drift import assign, methods
    from drift.canonical import open_layers

    monkeypatch.setattr(assign, "CERTIFIED_MIN_SIZE", 64)
    m = methods.get("exact")
    layer = open_layers("tiny-qwen3").read(2)
    fa = m.form(layer)
    perm = torch.randperm(fa.U.shape[0], generator=torch.Generator().manual_seed(3))
    sign = torch.where(torch.rand(len(perm), generator=torch.Generator().manual_seed(4)) < 0.5, -1.0, 1.0)
    from dataclasses import replace

    fb = replace(fa, U=fa.U[perm] * sign[:, None], D=fa.D[:, perm] * sign[None, :], G=fa.G[perm])
    c = m.compare(fa, fb)
    out = methods.run(c)
    assert c.certificate is not None and c.certificate.rounds == 1 and c.certificate.certified
    assert np.array_equal(c.mlp_perm, perm.numpy())
    for f in ("gate_proj", "up_proj", "down_proj"):
        assert out[f] < 1e-6, (f, out[f])


@pytest.mark.parametrize("model", ["tiny-qwen3", "gpt2"])
@pytest.mark.parametrize("null", [False, True])
def test_mlp_residuals_from_the_matched_terms_equal_the_differenced_ones(monkeypatch, toy_checkpoint, model, null):
    """For a null partner the certified path keeps the terms of S (⟨u_b, u_a⟩, and
    ⟨u_b, u_a⟩ + ⟨d_b, d_a⟩) at every candidate; the MLP residuals of the answer then need no
    second pass over the units (nor the null's rotation again). Either way they equal the
    residuals of the units differenced on the same assignment (numpy, float64), and the GLU
    signs equal the differenced ones. tiny-qwen3: trained GLU units; gpt2: a random plain MLP
    (S = ⟨u_b, u_a⟩ + ⟨d_b, d_a⟩, no signs)."""
    import torch

    from drift import assign, methods
    from drift.canonical import open_layers

    monkeypatch.setattr(assign, "CERTIFIED_MIN_SIZE", 64)
    m = methods.get("exact")
    reader = open_layers(model if model == "tiny-qwen3" else str(toy_checkpoint(model)[0]))
    fa, fb = m.form(reader.read(1)), m.form(reader.read(2))
    glu = fa.G is not None
    if null:  # B's residual stream rotated, applied lazily as the blocks read it
        gen = torch.Generator().manual_seed(5)
        R = torch.linalg.qr(torch.randn(fa.H, fa.H, generator=gen, dtype=torch.float64))[0].float()
        fb = m.null_partner(fb, R, gen)
        assert fb.mlp_rot is not None
    Ub, Db = fb.U.double().numpy().copy(), fb.D.double().numpy().copy()
    Gb = fb.G.double().numpy().copy() if glu else None
    if null:
        Rn = fb.mlp_rot.double().numpy()
        Ub[:, :fb.H], Db = Ub[:, :fb.H] @ Rn.T, Rn @ Db
        if glu:
            Gb[:, :fb.H] = Gb[:, :fb.H] @ Rn.T
    c = m.compare(fa, fb)
    out = methods.run(c)
    # kept only for a lazily rotated B, where a second pass would rotate B's units again
    assert c.mlp_from_terms == null and c.certificate is not None
    # (gpt2's 128 random units: some column tops a quarter of the rows, so the dense solver
    # decides; the first candidates still hold every matched entry)
    assert c.certificate.certified or model == "gpt2"
    sigma, sign = c.mlp_perm, c.mlp_sign
    Ua, Da = fa.U.double().numpy(), fa.D.double().numpy()
    if glu:
        want_sign = np.sign((Ua[sigma] * Ub).sum(1) + (Da[:, sigma] * Db).sum(0))
        assert np.array_equal(sign, np.where(want_sign == 0, 1.0, want_sign))
    else:
        assert (sign == 1).all()
    want = {"up_proj": np.linalg.norm(Ua[sigma] * sign[:, None] - Ub),
            "down_proj": np.linalg.norm(Da[:, sigma] * sign[None, :] - Db)}
    if glu:
        want["gate_proj"] = np.linalg.norm(fa.G.double().numpy()[sigma] - Gb)
    assert set(want) == {k for k in out if k in ("gate_proj", "up_proj", "down_proj")}
    for f, v in want.items():
        assert out[f] == pytest.approx(v, rel=1e-6), (f, out[f], v)


@pytest.mark.parametrize("seed", range(4))
def test_the_dense_solver_on_column_centred_costs_keeps_the_optimum(seed):
    """drift.assign subtracts each column's mean before scipy's dense solve (fewer augmenting
    steps on costs whose columns differ in level, such as MiniLM's): same optimal objective."""
    from drift.assign import _lap_centred

    rng = np.random.default_rng(seed)
    C = rng.standard_normal((300, 300)) + 5 * rng.standard_normal(300)[None, :]  # columns at different levels
    r, c = linear_sum_assignment(C)
    sigma = _lap_centred(C.copy())
    assert sorted(sigma.tolist()) == list(range(300))
    assert C[np.arange(300), sigma].sum() == pytest.approx(C[r, c].sum(), rel=1e-12)


def test_the_terms_at_the_answer_are_those_of_parts_or_none_when_one_was_no_first_candidate():
    """certified_similarity(parts=...) keeps each candidate's terms; at the answer they are the
    parts' own values there, and None when an answer's entry joined the candidates later."""
    import torch

    from drift.certified import certified_similarity

    gen = torch.Generator().manual_seed(7)
    n = 300
    P1, P2 = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)

    def parts(r0, r1):
        return P1[r0:r1] + P2[r0:r1], [P1[r0:r1], P2[r0:r1]]

    def block(r0, r1):
        return parts(r0, r1)[0]

    best = linear_sum_assignment((P1 + P2).double().numpy(), maximize=True)[1]
    sigma, cert, got = certified_similarity(n, block, k=n, parts=parts, matched=True, rows_per_block=64)
    assert np.array_equal(sigma, best)
    S_at, terms = got
    rows = np.arange(n)
    assert np.array_equal(S_at, (P1 + P2).double().numpy()[rows, sigma])
    assert np.array_equal(terms, np.stack([P1.double().numpy()[rows, sigma], P2.double().numpy()[rows, sigma]], 1))
    # two candidates a row: the optimum needs entries found only later (or by the dense solver)
    sigma2, cert2, got2 = certified_similarity(n, block, k=2, parts=parts, matched=True, rows_per_block=64)
    assert np.array_equal(sigma2, best)
    top2 = torch.topk(P1 + P2, 2, dim=1).indices.numpy()
    assert not all(sigma2[i] in top2[i] for i in range(n)) and got2 is None


def test_a_near_copy_behind_a_lazy_rotation_is_differenced_not_read_off_the_terms(monkeypatch):
    """B is A's units permuted, with a little noise, and its residual stream rotated lazily (as a
    null partner's); A is rotated by the same R, eagerly. The units match to ~1e-3, where
    ‖a‖² + ‖b‖² − 2⟨a, b⟩ would cancel in float32: the guard differences them, and the
    residuals equal numpy's. Read off the terms (guard off), they would be far off."""
    import torch
    from dataclasses import replace

    from drift import assign, methods
    from drift.canonical import open_layers
    from drift.methods import exact

    monkeypatch.setattr(assign, "CERTIFIED_MIN_SIZE", 64)
    m = methods.get("exact")
    fa = m.form(open_layers("tiny-qwen3").read(2))
    gen = torch.Generator().manual_seed(11)
    perm = torch.randperm(fa.U.shape[0], generator=gen)

    def noisy(x):
        return x + 1e-3 * x.abs().mean() * torch.randn(x.shape, generator=gen)

    fb = replace(fa, U=noisy(fa.U[perm]), D=noisy(fa.D[:, perm]), G=noisy(fa.G[perm]))
    R = torch.linalg.qr(torch.randn(fa.H, fa.H, generator=gen, dtype=torch.float64))[0].float()
    fa_rot, fb_lazy = fa.rotate_residual(R), fb.rotate_residual(R, lazy_mlp=True)

    def oracle(sigma):
        Ua, Ga, Da = (x.double().numpy() for x in (fa_rot.U, fa_rot.G, fa_rot.D))
        Rn, H = R.double().numpy(), fa.H
        Ub, Gb, Db = (x.double().numpy().copy() for x in (fb.U, fb.G, fb.D))
        Ub[:, :H], Gb[:, :H], Db = Ub[:, :H] @ Rn.T, Gb[:, :H] @ Rn.T, Rn @ Db
        sign = np.sign((Ua[sigma] * Ub).sum(1) + (Da[:, sigma] * Db).sum(0))
        return {"up_proj": np.linalg.norm(Ua[sigma] * sign[:, None] - Ub),
                "down_proj": np.linalg.norm(Da[:, sigma] * sign[None, :] - Db),
                "gate_proj": np.linalg.norm(Ga[sigma] - Gb)}

    c = m.compare(fa_rot, fb_lazy)
    out = methods.run(c)
    assert np.array_equal(c.mlp_perm, perm.numpy()) and not c.mlp_from_terms
    want = oracle(c.mlp_perm)
    assert max(want.values()) < 0.05
    for f, v in want.items():
        assert out[f] == pytest.approx(v, rel=1e-4), (f, out[f], v)
    monkeypatch.setattr(exact, "MATCHED_MIN_RESIDUAL", -1.0)  # no guard: the cancelling formula
    c = m.compare(fa_rot, fb_lazy)
    off = methods.run(c)
    assert c.mlp_from_terms
    assert any(not isinstance(off[f], float) or abs(off[f] - v) > 1e-3 * v for f, v in want.items())


def test_terms_of_one_answer_are_not_used_for_another(monkeypatch):
    """finish(σ) with an answer other than the one the certified path found (the terms are of
    that one): the units are differenced, so the residuals are those of the σ given."""
    import torch

    from drift import assign, methods
    from drift.canonical import open_layers

    monkeypatch.setattr(assign, "CERTIFIED_MIN_SIZE", 64)
    m = methods.get("exact")
    reader = open_layers("tiny-qwen3")
    fa, fb = m.form(reader.read(1)), m.form(reader.read(2))
    gen = torch.Generator().manual_seed(5)
    R = torch.linalg.qr(torch.randn(fa.H, fa.H, generator=gen, dtype=torch.float64))[0].float()
    fb = m.null_partner(fb, R, gen)
    runs = {}
    for shift in (0, 1):
        c = m.compare(fa, fb)
        sigma = assign.lap(c.assignment, maximize=True)
        c.prepare()
        runs[shift] = (c.finish(np.roll(sigma, shift)), c.mlp_from_terms)
    assert runs[0][1] and not runs[1][1]
    assert runs[1][0]["up_proj"] > runs[0][0]["up_proj"] * 1.01  # another σ, another (worse) residual
