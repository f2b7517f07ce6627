"""Certified sparse linear assignment: a dense problem's optimum from a sparse one, with a proof.

For an n × n cost C (minimised), each row's k cheapest columns are its candidates. The
sparse problem on the candidates is solved by scipy
(:func:`scipy.sparse.csgraph.min_weight_full_bipartite_matching`); dual potentials (u, v)
for it come from shortest paths (below). LP duality then settles the dense problem: the
sparse optimum σ is optimal for *all* of C iff every reduced cost C_ij − u_i − v_j is ≥ 0,
because Σ_i C_iσ(i) = Σ u + Σ v (complementary slackness on σ) is then a lower bound on every
assignment. Entries that violate it join the candidates and the problem is solved again; after
``max_rounds`` the dense solver decides (Volgenant's "core" idea behind LAPMOD).

The duals, without a solver that returns them: with v_j = C_{σ⁻¹(j) j} − u_{σ⁻¹(j)} (tight on
σ), dual feasibility on a candidate (i, j) reads u_i − u_{i'} ≤ C_ij − C_{i' j} for i' =
σ⁻¹(j): difference constraints, whose shortest-path solution (from a virtual source joined
to every row at 0) exists iff σ is optimal on the candidates (no negative cycle). They are
solved by Bellman–Ford relaxations of all candidate edges at once (numpy, one pass per
iteration; the passes needed are the depth of the shortest-path tree, tens here).

Two sources of dense costs share that loop: a numpy matrix (:func:`certified_lap`) and a
similarity to maximise made block by block in torch (:func:`certified_similarity`, what
:mod:`drift.methods.exact` solves), which stays where it was made (a GPU's memory, say):
the candidates are chosen in the pass that builds it, the certificate is checked there, and
only the sparse problems (n·k entries) and the potentials cross to the CPU. Between its scans
the similarity is held in float16 with a rigorous bound on each entry's rounding; the few
entries the bound cannot settle are taken from the candidates' float32 values or made again,
so the answer (σ, rounds, violators) is that of the float32 similarity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

K_START = 16
"""The fewest candidates per row a first round takes; see :func:`start_k`."""

GAP_LIMIT = 1e-9
"""A certified gap bound above this fraction of Σ|C_iσ(i)| (and above 2·n·tol, what the scan
itself allows when that sum is near 0) is a failure (:class:`UncertifiedAssignment`)."""


class UncertifiedAssignment(ArithmeticError):
    """The assignment's proven gap to the optimum is larger than :data:`GAP_LIMIT` allows."""


@dataclass
class Certificate:
    """How the assignment was proven optimal."""

    rounds: int  # sparse solves
    candidates: int  # candidate entries in the last round
    violators: list[int] = field(default_factory=list)  # per round: dense entries with negative reduced cost
    tolerance: float = 0.0  # a reduced cost counts as violated below −tolerance
    min_reduced_cost: float = 0.0  # over every dense entry, in the last round
    gap_bound: float = 0.0  # σ's cost − a proven lower bound on the optimum
    objective: float = 0.0  # Σ_i C[i, σ(i)] (the minimised cost)
    dense_fallback: bool = False
    remade_blocks: int = 0  # blocks of a similarity made again to settle entries its held copy could not

    @property
    def certified(self) -> bool:
        return not self.dense_fallback


class _NumpyCost:
    """A dense float64 cost to minimise, held whole."""

    def __init__(self, C: np.ndarray, rows_per_block: int = 512):
        self.C, self.n, self.rows = C, C.shape[0], rows_per_block
        self.scale = max(abs(float(C.max())), abs(float(C.min())), 1e-300)

    def candidates(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, cols, costs) of every row's k cheapest entries, a block of rows at a time."""
        n, C = self.n, self.C
        if k >= n:
            rows, cols = np.repeat(np.arange(n), n), np.tile(np.arange(n), n)
            return rows, cols, C[rows, cols]
        cols = np.empty((n, k), dtype=np.int64)
        for r0 in range(0, n, self.rows):
            cols[r0:r0 + self.rows] = np.argpartition(C[r0:r0 + self.rows], k - 1, axis=1)[:, :k]
        rows, cols = np.repeat(np.arange(n), k), cols.ravel()
        return rows, cols, C[rows, cols]

    def scan(self, u: np.ndarray, v: np.ndarray, tol: float, known=None):
        """Every entry whose reduced cost C_ij − u_i − v_j is below −tol (rows, cols, costs),
        and the smallest reduced cost: one pass over C, a block of rows at a time."""
        vr, vc = [np.empty(0, dtype=np.int64)], [np.empty(0, dtype=np.int64)]
        low = np.inf
        for r0 in range(0, self.n, self.rows):
            red = np.subtract(self.C[r0:r0 + self.rows], u[r0:r0 + self.rows, None])
            red -= v
            m = float(red.min())
            low = min(low, m)
            if m < -tol:
                i, j = np.nonzero(red < -tol)
                vr.append(i + r0)
                vc.append(j)
        rows, cols = np.concatenate(vr), np.concatenate(vc)
        return rows, cols, self.C[rows, cols], low

    def dense(self) -> np.ndarray:
        return self.C.copy()


class _TorchSimilarity:
    """A similarity S to maximise (cost −S), made in blocks of rows by ``block(r0, r1)`` on its
    device. Each block's top-``k`` entries are taken, with their values, as it is made: the
    candidates' costs are the blocks' own float32 values. S is then held where it was made, in
    ``held`` precision:

    * ``torch.float32``: the blocks' values, exactly (4 bytes an entry);
    * ``torch.float16`` (the default, half the memory): each block divided by ``sc``, the
      power of two at or below its largest magnitude (exactly: the quotients lie below 2 in
      magnitude), and rounded, so an entry is known to within ``sc·2⁻¹¹``. A block whose
      largest magnitude is below 2⁻¹⁰⁰ (or 0) is held unscaled, ``sc = 1``, within its largest
      magnitude: its entries near the threshold are settled from the block made again.

    The certificate's scan runs in float32 over the held values with a margin that covers
    that rounding and the scan's own arithmetic; an entry it cannot clear is settled exactly:
    a candidate from its kept value, any other from its block made again (the same call, so
    the same float32 values; only blocks with such an entry are remade, which is rare). Either
    way σ, the rounds and the violators are those of the float32 S; the smallest reduced cost
    is a bound for the cleared entries, so the gap bound may read up to n·tol higher."""

    def __init__(self, n: int, block, k: int, rows_per_block: int, held=None, parts=None):
        import torch

        self.n, self.rows, self.k = n, rows_per_block, min(k, n)
        # blocks made again come from the function that made the first pass: the same values
        self.block = block if parts is None else (lambda r0, r1: parts(r0, r1)[0])
        self.held = torch.float16 if held is None else held
        self.S = None
        self.sc, self.mag, self.err = [], [], []  # per block of rows: its scale, max |S|, the held values' error
        self.scale = 1e-300  # max |S|, taken block by block (S.abs() would be a second S)
        self.remade = 0  # blocks made again by the scans
        top_v, top_i, top_t = [], [], []
        for r0 in range(0, n, rows_per_block):
            r1 = min(n, r0 + rows_per_block)
            b, terms = (block(r0, r1), None) if parts is None else parts(r0, r1)
            if self.S is None:
                self.S = torch.empty((n, n), dtype=self.held, device=b.device)
            big = max(float(b.max()), -float(b.min()), 1e-300)
            if not math.isfinite(big):
                raise ValueError(f"the similarity has NaN or infinite entries in rows {r0}..{r0 + len(b) - 1}")
            self.scale = max(self.scale, big)
            self.mag.append(big)
            v, i = torch.topk(b, self.k, dim=1, sorted=False)
            top_v.append(v)
            top_i.append(i)
            if terms is not None:  # (rows, k, terms): each candidate's terms, for matched()
                top_t.append(torch.stack([t.gather(1, i) for t in terms], dim=-1))
            del terms  # (b's own values are kept: top_v)
            # a power of two (no rounding in the division, nor in float32), quotients below 2:
            # no overflow, float16's relative precision down to 2⁻¹⁴, rounding within sc·2⁻¹¹
            if self.held == torch.float32:
                sc, err = 1.0, 0.0
            elif big >= 2.0 ** -100:
                sc = 2.0 ** math.floor(math.log2(big))
                err = sc * 2.0 ** -11
            else:  # unscaled: float16 keeps nothing of it, and an entry is off by at most max |S|
                sc, err = 1.0, big
            self.sc.append(sc)
            self.err.append(err)
            self.S[r0:r0 + len(b)] = b if sc == 1.0 else b / sc
            del b
        self._top = torch.cat(top_v), torch.cat(top_i)
        self._terms = torch.cat(top_t) if top_t else None

    def matched(self, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """``(S[i, σ(i)], the terms of parts there)``, float64 ((n,), (n, terms)), or None when
        one of those entries is not among the first candidates (it joined later)."""
        import torch

        if self._terms is None:
            return None
        idx = self._top[1]
        hit = idx == torch.as_tensor(sigma, device=idx.device)[:, None]  # (n, k): at most one per row
        if not bool(hit.any(dim=1).all()):
            return None
        rows, pos = torch.arange(self.n, device=idx.device), hit.to(torch.uint8).argmax(dim=1)
        return self._top[0][rows, pos].cpu().double().numpy(), self._terms[rows, pos].cpu().double().numpy()

    def candidates(self, k: int):
        """The top ``k`` kept per row as S was made (``k`` is the one it was made with)."""
        v, i = self._top
        rows = np.repeat(np.arange(self.n), v.shape[1])
        return rows, i.cpu().numpy().ravel().astype(np.int64), -v.cpu().double().numpy().ravel()

    def _exact(self, r0: int, i, j):
        """The float32 values S[r0 + i, j] of the block of rows at ``r0`` (torch indices)."""
        import torch

        if self.held == torch.float32:
            return self.S[r0 + i, j]
        self.remade += 1
        return self.block(r0, min(self.n, r0 + self.rows))[i, j]

    def scan(self, u: np.ndarray, v: np.ndarray, tol: float, known: tuple[np.ndarray, np.ndarray]):
        """Every entry whose reduced cost −S_ij − u_i − v_j is below −tol (rows, cols, costs),
        and a lower bound on the smallest reduced cost (exact where it is near 0). ``known``:
        (sorted keys i·n + j, costs) of the candidates, whose costs are exact."""
        import torch

        dev, n = self.S.device, self.n
        keys, kw = known
        ut, vt = torch.as_tensor(u, device=dev), torch.as_tensor(v, device=dev)
        u32, v32 = ut.float(), vt.float()
        vmax = float(vt.abs().max()) if n else 0.0
        vr, vc, vw = [], [], []
        low = np.inf
        for b, r0 in enumerate(range(0, n, self.rows)):
            r1 = min(n, r0 + self.rows)
            sc, mag = self.sc[b], self.mag[b]
            # the held values' error, then |float32 red − (−S_held − u − v)|: the casts of u and
            # v and the roundings, each within 2⁻²⁴ of a magnitude ≤ max|S| + |u| + |v| (the
            # block's), plus 2⁻¹⁵⁰ where a result is subnormal
            margin = (self.err[b] + 8 * 2.0 ** -24 * (mag * (1 + 2.0 ** -10) + float(ut[r0:r1].abs().max()) + vmax)
                      + 8 * 2.0 ** -149)
            red = self.S[r0:r1].to(torch.float32, copy=True)
            if sc != 1.0:
                red.mul_(sc)
            red.neg_().sub_(u32[r0:r1, None]).sub_(v32)
            unclear = red < _float32_up(margin - tol)  # cleared: red ≥ margin − tol, so the exact one ≥ −tol
            i, j = torch.nonzero(unclear, as_tuple=True)
            red[unclear] = float("inf")
            low = min(low, max(float(red.min()) - margin, -tol))  # a bound for the entries cleared
            del red, unclear
            if not len(i):
                continue
            gi, gj = (i + r0).cpu().numpy(), j.cpu().numpy()
            key = gi * n + gj
            pos = np.minimum(np.searchsorted(keys, key), max(len(keys) - 1, 0))
            is_known = keys[pos] == key if len(keys) else np.zeros(len(key), bool)
            w = np.empty(len(key))
            w[is_known] = kw[pos[is_known]]
            other = ~is_known
            if other.any():
                sel = torch.as_tensor(np.nonzero(other)[0], device=i.device)
                w[other] = -self._exact(r0, i[sel], j[sel]).cpu().double().numpy()
            exact = w - u[gi] - v[gj]
            low = min(low, float(exact.min()))
            bad = exact < -tol
            if bad.any():
                vr.append(gi[bad])
                vc.append(gj[bad])
                vw.append(w[bad])
        if not vr:
            e = np.empty(0, dtype=np.int64)
            return e, e, np.empty(0), low
        return np.concatenate(vr), np.concatenate(vc), np.concatenate(vw), low

    def dense(self) -> np.ndarray:
        import torch

        if self.held == torch.float32:
            return self.S.double().neg_().cpu().numpy()
        out = np.empty((self.n, self.n))
        for r0 in range(0, self.n, self.rows):
            out[r0:r0 + self.rows] = self.block(r0, min(self.n, r0 + self.rows)).double().neg_().cpu().numpy()
        return out


def _float32_up(x: float) -> float:
    """The least float32 ≥ ``x`` (a threshold that float32 comparisons cannot round down)."""
    y = np.float32(x)
    if float(y) < x:
        y = np.nextafter(y, np.float32(np.inf))
    return float(y)


SPREAD_LIMIT = 1e6
"""A row whose candidates' costs span less than 1/SPREAD_LIMIT of the costs' magnitude sends
the problem to the dense solver: scipy's sparse matching loses such rows' differences next
to the others (row scales 1e10 apart made it loop forever; 1e20 apart, return a non-optimal
matching)."""


def _ill_scaled(n: int, rows: np.ndarray, w: np.ndarray) -> bool:
    """Do the rows' candidate costs span scales too far apart for the sparse solver?"""
    hi = np.full(n, -np.inf)
    lo = np.full(n, np.inf)
    np.maximum.at(hi, rows, w)
    np.minimum.at(lo, rows, w)
    spread = hi - lo
    spread = spread[spread > 0]
    return bool(len(spread)) and float(np.abs(w).max()) > SPREAD_LIMIT * float(spread.min())


def _sparse_solve(n: int, rows: np.ndarray, cols: np.ndarray, w: np.ndarray) -> np.ndarray | None:
    """σ (row -> column) minimising Σ w on the candidate entries, or None without a full matching."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    # scipy reads a stored 0 as no edge: every weight made positive, on the costs' own scale
    # (a shift of 1 would wash out costs of 1e-30)
    shift = (float(np.abs(w).max()) or 1.0) - float(w.min())
    G = sp.csr_matrix((w + shift, (rows, cols)), shape=(n, n))
    try:
        r, c = min_weight_full_bipartite_matching(G)
    except ValueError:  # no full matching among the candidates
        return None
    sigma = np.empty(n, dtype=np.int64)
    sigma[r] = c
    return sigma


def sparse_round(n: int, rows: np.ndarray, cols: np.ndarray,
                 w: np.ndarray) -> tuple[np.ndarray | None, tuple[np.ndarray, np.ndarray] | None]:
    """One round's sparse problem: σ on the candidates and its potentials (u, v); σ None
    without a full matching, the potentials None when σ is not optimal on its candidates (the
    sparse solver lost precision). What a round does on the CPU, as one function that an
    executor can run in another process (:class:`drift.schedule.DeviceThreads`: scipy's sparse
    matching holds the GIL)."""
    sigma = _sparse_solve(n, rows, cols, w)
    if sigma is None:
        return None, None
    try:
        return sigma, _duals(sigma, rows, cols, w)
    except ArithmeticError:
        return sigma, None


def _duals(sigma: np.ndarray, rows: np.ndarray, cols: np.ndarray,
           w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Potentials (u, v) tight on σ and feasible on the candidates (see the module docstring).
    σ's own entries are among the candidates (distinct entries, each with its cost ``w``)."""
    n = len(sigma)
    inv = np.empty(n, dtype=np.int64)
    inv[sigma] = np.arange(n)
    matched = np.empty(n)  # matched[j] = C[σ⁻¹(j), j]
    on = sigma[rows] == cols
    matched[cols[on]] = w[on]
    src = inv[cols]  # the row i' matched to the candidate's column
    keep = ~on
    src, dst = src[keep], rows[keep]
    wt = w[keep] - matched[cols[keep]]  # C_ij − C_{i' j}
    order = np.argsort(dst, kind="stable")
    src, dst, wt = src[order], dst[order], wt[order]
    heads, starts = np.unique(dst, return_index=True)
    u = np.zeros(n)
    for _ in range(n + 1):
        if not len(heads):
            break
        best = np.minimum.reduceat(u[src] + wt, starts)
        new = u.copy()
        new[heads] = np.minimum(u[heads], best)
        if np.array_equal(new, u):
            break
        u = new
    else:
        raise ArithmeticError("negative cycle: the sparse assignment is not optimal on its candidates")
    return u, matched - u[inv]


def start_k(n: int) -> int:
    """Candidates per row in the first round: enough that null-like costs (the hard case) need
    one or two rounds (at 9728: 53; measured, 16 took four rounds and 48 two)."""
    return max(K_START, int(4 * np.log2(max(n, 2))))


def _hubs(cols: np.ndarray, n: int) -> bool:
    """The candidates are hopeless: a column no row names (no full matching can exist), or a
    column among the candidates of a quarter of the rows (a few "hub" units top every row,
    as in MiniLM's MLP; the optimum lies deep in the rows, and the sparse solver is slower
    on such costs than the dense one). Gaussian costs: each column in ~k rows' candidates."""
    degree = np.bincount(cols, minlength=n)
    return n > 8 and (degree.min() == 0 or degree.max() > n / 4)


def _certify(source, n: int, k: int, max_rounds: int, rtol: float,
             solve_round=None) -> tuple[np.ndarray, Certificate]:
    solve_round = solve_round or sparse_round
    tol = rtol * source.scale
    rows, cols, w = source.candidates(k)
    keys, first = np.unique(rows * n + cols, return_index=True)  # sorted: the scan looks candidates up
    rows, cols, w = keys // n, keys % n, w[first]
    cert = Certificate(rounds=0, candidates=0, tolerance=tol)
    while cert.rounds < max_rounds and not _hubs(cols, n) and not _ill_scaled(n, rows, w):
        sigma, duals = solve_round(n, rows, cols, w)
        cert.rounds += 1
        if sigma is None:  # no full matching: a few columns top every row (hubs); dense is quicker
            break
        if duals is None:  # σ is not optimal on its candidates: the sparse solver lost precision
            break
        u, v = duals
        vr, vc, vw, low = source.scan(u, v, tol, (keys, w))
        cert.violators.append(len(vr))
        cert.candidates, cert.min_reduced_cost = len(rows), low
        if not len(vr):  # (u, v + min(low, 0)) is dual feasible: a lower bound within n·|low| of σ's cost
            on = sigma[rows] == cols
            cert.objective = float(w[on].sum())
            cert.gap_bound = cert.objective - float(u.sum() + v.sum()) + n * max(0.0, -low)
            # of the objective; at least the n·tol the scan itself allows (an objective near 0)
            if cert.gap_bound > max(GAP_LIMIT * float(np.abs(w[on]).sum()), 2 * n * tol, 1e-300):
                raise UncertifiedAssignment(f"assignment gap bound {cert.gap_bound:.3g} exceeds "
                                            f"{GAP_LIMIT:g} of the objective ({cert})")
            return sigma, cert
        if len(vr) > n:  # the candidates were far off (costs with hub columns): the dense solver is quicker
            break
        keys, first = np.unique(np.concatenate([rows * n + cols, vr * n + vc]), return_index=True)
        rows, cols, w = keys // n, keys % n, np.concatenate([w, vw])[first]
    from .assign import _lap_centred

    C = source.dense()  # a copy of its own, which the dense solve centres in place
    level = C.sum() / n  # Σ_j of the column means taken away
    sigma = _lap_centred(C)
    cert.dense_fallback = True
    cert.objective = float(C[np.arange(n), sigma].sum() + level)
    return sigma, cert


def certified_lap(C: np.ndarray, k: int | None = None, max_rounds: int = 4,
                  rtol: float = 1e-12) -> tuple[np.ndarray, Certificate]:
    """σ minimising Σ_i C[i, σ(i)] for a square float64 cost, and its certificate.

    A reduced cost counts as violated below −rtol·max|C|. When ``max_rounds`` sparse solves
    leave violators, one leaves more than n, or the candidates hold no full matching, scipy's
    dense solver gives the answer (``dense_fallback``).
    """
    C = np.asarray(C, dtype=np.float64)
    n = C.shape[0]
    if C.shape != (n, n):
        raise ValueError(f"certified_lap needs a square cost, got {C.shape}")
    return _certify(_NumpyCost(C), n, min(start_k(n) if k is None else k, n), max_rounds, rtol)


def certified_similarity(n: int, block, k: int | None = None, max_rounds: int = 4, rtol: float = 1e-12,
                         rows_per_block: int = 512, held=None, parts=None, matched: bool = False,
                         solve_round=None):
    """σ *maximising* Σ_i S[i, σ(i)] for a square similarity made in blocks of rows by
    ``block(r0, r1) -> float32 tensor`` (on any device), and its certificate (for the cost −S).
    ``held``: the precision S is kept in between its scans (default ``torch.float16``, half
    the memory; ``torch.float32`` keeps the blocks' values). The answer does not depend on it:
    entries that float16 cannot settle are made again in float32 (the gap bound may read up to
    n·tol higher). ``block`` must give the same values when called again for the same rows.

    ``parts(r0, r1) -> (block, [terms])``, if given, makes the blocks instead (the block of S
    rows r0:r1 as ``block`` would make it, up to rounding, and tensors of its shape, e.g.
    partial sums of S), and the terms are kept at the candidates; with ``matched=True``
    the return is ``(σ, certificate, matched)``: ``(S[i, σ(i)], the terms there)``, float64
    ((n,), (n, terms)), or None when an answer's entry was not a first candidate.
    ``solve_round``: what solves each round's sparse problem, called as :func:`sparse_round`
    (the default) is; an executor may run it in another process."""
    k = min(start_k(n) if k is None else k, n)
    source = _TorchSimilarity(n, block, k, rows_per_block, held, parts)
    sigma, cert = _certify(source, n, k, max_rounds, rtol, solve_round)
    cert.remade_blocks = source.remade
    return (sigma, cert, source.matched(sigma)) if matched else (sigma, cert)
