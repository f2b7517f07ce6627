"""Alignment primitives: small pure functions over a group, in torch.

Conventions. Every aligner moves layer *A* onto layer *B* (B is held fixed). A group element
acts on the **left** of a matrix whose rows are the gauge index (a head's d_head rows, an MLP
unit); a matrix that transforms as ``W Rᵀ`` (``W_O``, ``W_down``) enters transposed.
All residuals are plain Frobenius norms of the difference; callers normalise first.

See gauge-spec §4 for the derivations.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

Tensor = torch.Tensor


_LIBC = None


def _libc():
    """glibc through ctypes, or ``False`` where there is none (then the memory helpers do nothing)."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim, _LIBC.mallopt  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def release_memory() -> None:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``; elsewhere nothing).

    drift makes and drops many buffers of a few to a few tens of MiB; glibc keeps such freed
    chunks in the heap, so without this the process's resident size only grows (0.6B
    benchmark: 0.76 GB peak instead of 0.6). Called between comparisons, not per tensor:
    a fixed low mmap threshold does the same per buffer and cost 20% in page faults.
    """
    if _libc():
        _libc().malloc_trim(0)


def map_large_buffers(threshold: int = 4 << 20) -> None:
    """Have glibc map (and unmap on free) every buffer of ``threshold`` bytes or more.

    Process-wide, so only the CLI does it, and only for large layers: with layers of hundreds
    of MB a comparison makes and drops many buffers of 5-40 MB, which glibc's default keeps in
    the heap, where they add to the peak. Measured at the Qwen3-4B shape (4 layers, exact,
    default null): peak 1.43 GiB by default, 1.39 GiB with this, no slower. For small layers
    the extra page faults cost ~10%. Linux/glibc only; elsewhere nothing happens.
    """
    if _libc():
        _libc().mallopt(-3, threshold)  # M_MMAP_THRESHOLD


def fro(x: Tensor, keep: int = 0) -> Tensor:
    """Frobenius norm over every axis after the first ``keep`` (``keep=1``: one norm per head).

    Summed from the norms of the last axis's rows: torch's float32 CPU norm of a whole large
    tensor loses precision (relative error 7e-5 on 3M entries, enough to move a reported
    residual in its fifth digit), while row norms of a few thousand entries are exact to
    float32 rounding and their squares sum accurately.
    """
    lead = x.shape[:keep]
    rows = x.reshape(*lead, -1, x.shape[-1]) if x.dim() - keep >= 2 else x.reshape(*lead, 1, -1)
    return rows.norm(dim=-1).square().sum(-1).sqrt()


def polar(M: Tensor) -> Tensor:
    """Orthogonal polar factor ``U Vᵀ`` of ``M = U S Vᵀ``: the R ∈ O(n) maximising tr(Rᵀ M).

    Batched over leading axes. Not unique when M is rank-deficient; the part that is fixed
    (R on the row space of Mᵀ) is what every residual below depends on.
    """
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    return U @ Vh


def procrustes(As: Sequence[Tensor], Bs: Sequence[Tensor]) -> Tensor:
    """Joint left orthogonal Procrustes.

    Minimises ``Σ_j ‖R A_j − B_j‖_F`` subject to ``RᵀR = I``, where every ``A_j, B_j`` is
    (..., n, p_j) and R is (..., n, n). The solution is ``R = polar(Σ_j B_j A_jᵀ)``.

    Note the orientation: the cross-covariance is ``B Aᵀ``. The reference script built
    ``A Bᵀ`` and so returned ``R0ᵀ`` on a planted rotation ``B = R0 A`` (gauge-spec §4.1).
    scipy's ``orthogonal_procrustes(A, B)`` solves the *right* action ``‖A Ω − B‖``; the left
    action here equals ``orthogonal_procrustes(A.T, B.T)[0].T``.
    """
    M = None
    for A, B in zip(As, Bs):  # accumulated in place: one n×n matrix, however many terms
        if M is None:
            M = B @ A.transpose(-1, -2)  # (..., n, n)
        elif M.dim() == 2:
            M.addmm_(B, A.T)
        else:
            M += B @ A.transpose(-1, -2)
    return polar(M)


def procrustes_thin(As: Sequence[Tensor], Bs: Sequence[Tensor]) -> list[Tensor]:
    """``[R A_j]`` for the joint left Procrustes R, without forming the n×n matrix R.

    For n larger than the stacked width p = Σ p_j (an O(d_ff) rotation of MLP units with
    p = 3·d_model) use thin QR: ``Ā = Q_a R_a``, ``B̄ = Q_b R_b``, so
    ``Σ B_j A_jᵀ = Q_b (R_b R_aᵀ) Q_aᵀ`` and only a p×p SVD is needed. R is fixed on the span
    of ``Q_a``, which is all that ``R A_j`` sees.
    """
    n, p = As[0].shape[-2], sum(a.shape[-1] for a in As)
    if p >= n:
        R = procrustes(As, Bs)
        return [R @ a for a in As]
    A = torch.cat(list(As), dim=-1)  # (n, p)
    B = torch.cat(list(Bs), dim=-1)
    Qa, Ra = torch.linalg.qr(A)  # (n, p), (p, p)
    Qb, Rb = torch.linalg.qr(B)
    small = polar(Rb @ Ra.transpose(-1, -2))  # (p, p)
    return [Qb @ (small @ (Qa.transpose(-1, -2) @ a)) for a in As]


def _inv_sqrt_psd(G: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(G^{1/2}, G^{-1/2}) of a symmetric PSD matrix by eigh (eigenvalues floored at eps·max)."""
    w, E = torch.linalg.eigh(G)
    w = w.clamp_min(eps * w.max(dim=-1, keepdim=True).values.clamp_min(1e-300))
    Et = E.transpose(-1, -2)
    return (E * w.sqrt()[..., None, :]) @ Et, (E * w.rsqrt()[..., None, :]) @ Et


def balance_gl(A: Tensor, B: Tensor, eps: float = 1e-14) -> tuple[Tensor, Tensor]:
    """Balanced canonical factors of a GL(d) gauge pair.

    ``A`` (..., d, p) transforms as ``A ← M A`` and ``B`` (..., d, q) as ``B ← M⁻ᵀ B`` for any
    M ∈ GL(d): the product ``Aᵀ B`` (p, q) is the invariant. Returns ``(A_bal, B_bal)`` with
    ``A_balᵀ B_bal = Aᵀ B`` and ``A_bal A_balᵀ = B_bal B_balᵀ = S`` (diagonal, the singular
    values of ``AᵀB``). Two inputs related by a GL gauge give outputs related by an O(d)
    rotation only (gauge-spec §4.4b). Used for VO (A = V_g, B = stacked ``O_hᵀ``) and for QK
    without RoPE (A = stacked Q_h, B = K_g).

    Instead of two thin QRs (slow on CPU for tall matrices), the orthonormal factors come from
    the d×d Grams: with ``G_a = A Aᵀ``, ``Q_a = Aᵀ G_a^{-1/2}`` has orthonormal columns and
    ``Aᵀ = Q_a G_a^{1/2}``. All d×d work is in float64; only two (d, p) products touch the
    full matrices. Assumes A and B have full row rank d (true for trained and random weights).
    """
    dt = A.dtype
    A64, B64 = A.double(), B.double()
    Ga, Gb = A64 @ A64.transpose(-1, -2), B64 @ B64.transpose(-1, -2)  # (d, d)
    Ra, Ra_inv = _inv_sqrt_psd(Ga, eps)
    Rb, Rb_inv = _inv_sqrt_psd(Gb, eps)
    u, s, vh = torch.linalg.svd(Ra @ Rb)  # Ra, Rb symmetric: Aᵀ B = Q_a (Ra Rb) Q_bᵀ
    root = s.sqrt()[..., :, None]
    left = root * (u.transpose(-1, -2) @ Ra_inv)  # (d, d): A_bal = s^{1/2} uᵀ Ga^{-1/2} A
    right = root * (vh @ Rb_inv)  # B_bal = s^{1/2} vᵀ Gb^{-1/2} B
    return (left.to(dt) @ A), (right.to(dt) @ B)


def product_dist2(A_a: Tensor, B_a: Tensor, A_b: Tensor, B_b: Tensor) -> Tensor:
    """``‖A_aᵀB_a − A_bᵀB_b‖²_F`` from d×d Gram traces (gauge-spec §4.4a), batched.

    A (..., d, p), B (..., d, q). Cost O((p + q) d²) instead of O(p q d).
    """
    def tr(X: Tensor, Y: Tensor) -> Tensor:  # tr(X Y) for (..., d, d)
        return (X * Y.transpose(-1, -2)).sum((-1, -2))

    t = lambda X: X.transpose(-1, -2)  # noqa: E731
    aa = tr(A_a @ t(A_a), B_a @ t(B_a))
    bb = tr(A_b @ t(A_b), B_b @ t(B_b))
    ab = tr(A_a @ t(A_b), B_b @ t(B_a))
    return (aa + bb - 2 * ab).clamp_min(0)


def _lap_cols(c: np.ndarray, maximize: bool) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(c, maximize=maximize)
    out = np.empty(c.shape[0], dtype=np.int64)
    out[rows] = cols
    return out


def _lap_file(path: str, shape: tuple[int, int]) -> np.ndarray:
    """Worker side of :func:`lap_submit`: minimise the float64 cost stored at ``path``.
    scipy works on the mapped file directly (already float64 and C-contiguous, and minimising
    needs no negated copy), so a worker holds one n×n float64 matrix and nothing more."""
    # "r+": scipy copies a read-only array (measured: +n² float64 of private memory); it never
    # writes to a cost it minimises, and the file is ours and temporary anyway.
    return _lap_cols(np.memmap(path, dtype=np.float64, mode="r+", shape=shape), maximize=False)


class BlockCost:
    """An assignment cost produced in blocks of rows: ``block(r0, r1)`` returns rows
    ``r0:r1`` as a tensor. Large costs (d_ff × d_ff unit similarities) are never held whole
    in torch: :func:`lap_submit` writes the blocks, as the float64 matrix scipy wants, to a
    file that a worker maps, or into one numpy array when it solves in this process."""

    def __init__(self, shape: tuple[int, int], block, rows_per_block: int = 512):
        self.shape = (int(shape[0]), int(shape[1]))
        self.block = block
        self.rows_per_block = rows_per_block

    def blocks(self, sign: float = 1.0):
        """(r0, r1, float64 numpy block times ``sign``), in row order."""
        n = self.shape[0]
        for r0 in range(0, n, self.rows_per_block):
            r1 = min(n, r0 + self.rows_per_block)
            b = self.block(r0, r1)
            if sign != 1.0:
                b = -b
            yield r0, r1, b.detach().to(device="cpu", dtype=torch.float64).numpy()

    def dense(self, sign: float = 1.0) -> np.ndarray:
        out = np.empty(self.shape, dtype=np.float64)
        for r0, r1, b in self.blocks(sign):
            out[r0:r1] = b
        return out


_POOL = None
POOL_MIN_SIZE = 1024
"""Assignments at least this large go to the worker processes when a pool is active."""


class lap_pool:
    """Context manager: run large assignments (``n ≥ POOL_MIN_SIZE``) in ``workers`` forked
    processes, so that several layer pairs' MLP matchings proceed at once while the calling
    thread prepares the next comparison. scipy's ``linear_sum_assignment`` holds the GIL, and
    concurrent torch calls from several threads oversubscribe the CPU's OpenMP pool, so the
    parallelism is processes, driven from one thread. Workers only run scipy (no torch, no
    CUDA), which keeps fork safe. ``workers <= 1`` does nothing."""

    def __init__(self, workers: int):
        self.workers = workers

    def __enter__(self):
        global _POOL
        if self.workers > 1 and _POOL is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            import scipy.optimize  # noqa: F401 - imported once here, not again in every worker

            _POOL = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("fork"),
                                        initializer=_worker_init)
            # Fork the workers now, while this process is small: a worker forked later shares
            # (and its RSS counts) every page the parent had then, layer forms included.
            _POOL.submit(int).result()
            self._owner = True
        else:
            self._owner = False
        return self

    def __exit__(self, *exc):
        global _POOL
        if self._owner and _POOL is not None:
            _POOL.shutdown(wait=True, cancel_futures=True)
            _POOL = None


def _worker_init() -> None:
    """A worker ignores SIGINT: Ctrl-C (or a notebook's interrupt) reaches the whole process
    group, and it is the parent that stops, cancelling what is queued; a worker that died of
    it would leave the pool broken and print a traceback per worker."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def wait(fut, poll_s: float = 0.2):
    """``fut.result()``, waiting in slices so that an exception raised asynchronously in this
    thread (the explorer's interrupt, see :func:`drift.widgets._interruptible`) lands within
    ``poll_s`` instead of after the assignment."""
    while True:
        try:
            return fut.result(timeout=poll_s)
        except TimeoutError:
            if fut.done():  # the task itself raised TimeoutError
                return fut.result()


def _as_numpy(cost: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(cost, Tensor):
        c = cost.detach().cpu()
        return (c if c.dtype in (torch.float32, torch.float64) else c.double()).numpy()
    return np.asarray(cost, float)


def _write_cost(cost: BlockCost, sign: float) -> str:
    """The blocks of ``cost`` (times ``sign``) as raw float64 in a new temporary file."""
    import os
    import tempfile

    fd, path = tempfile.mkstemp(prefix="drift-lap-", suffix=".f64")
    try:
        with os.fdopen(fd, "wb") as f:
            for _, _, b in cost.blocks(sign):
                f.write(memoryview(np.ascontiguousarray(b)).cast("B"))
    except BaseException:
        os.unlink(path)
        raise
    release_memory()  # the blocks' buffers: without this the heap keeps ~0.1 GB at the 4B shape
    return path


def lap_submit(cost: np.ndarray | Tensor | BlockCost, maximize: bool = False):
    """A future of :func:`lap`: solved in a worker process inside :class:`lap_pool` (for
    problems of at least ``POOL_MIN_SIZE``), else solved now.

    A :class:`BlockCost` goes to the worker as a temporary float64 file (negated when
    maximising), deleted once the future is done; nothing of it stays in this process."""
    from concurrent.futures import Future

    shape = cost.shape if isinstance(cost, BlockCost) else tuple(np.shape(cost))
    pooled = _POOL is not None and min(shape) >= POOL_MIN_SIZE
    if isinstance(cost, BlockCost):
        sign = -1.0 if maximize else 1.0
        if pooled:
            import os

            path = _write_cost(cost, sign)
            fut = _POOL.submit(_lap_file, path, cost.shape)
            fut.add_done_callback(lambda _: os.path.exists(path) and os.unlink(path))
            return fut
        c, maximize = cost.dense(sign), False
    else:
        c = _as_numpy(cost)
        if pooled:
            return _POOL.submit(_lap_cols, c, maximize)
    done: Future = Future()
    done.set_result(_lap_cols(c, maximize))
    return done


def lap(cost: np.ndarray | Tensor | BlockCost, maximize: bool = False) -> np.ndarray:
    """``col[i]``: the column assigned to row i by ``scipy.optimize.linear_sum_assignment``.

    Inside :class:`lap_pool`, large problems run in a worker process (the calling thread
    waits without holding the GIL).
    """
    return wait(lap_submit(cost, maximize))


def match_heads(cost: Tensor, n_kv: int) -> np.ndarray:
    """Head assignment respecting GQA groups (the wreath product S_r ≀ S_{n_kv}).

    ``cost[h_a, h_b]`` (n_heads, n_heads) is a gauge-invariant distance. Returns ``perm`` with
    ``perm[h_b] = h_a``: the head of A matched to head ``h_b`` of B. Two levels, exact because a
    group pair's cost is the sum of its matched head costs (gauge-spec §4.5): an r×r LAP per
    group pair, then an n_kv×n_kv LAP on the optimal inner costs.
    """
    nh = cost.shape[0]
    r = nh // n_kv
    c = cost.detach().cpu().double().numpy().reshape(n_kv, r, n_kv, r)  # (g_a, i_a, g_b, i_b)
    if r <= 5:  # every inner assignment at once: all r! orderings, vectorised over group pairs
        import itertools

        orders = np.array(list(itertools.permutations(range(r))))  # (r!, r): order[i_b] = i_a
        # c[:, o, :, arange(r)] is (r, g_a, g_b): element [i, ga, gb] = c[ga, o[i], gb, i]
        totals = np.stack([c[:, o, :, np.arange(r)].sum(axis=0) for o in orders])  # (r!, g_a, g_b)
        best = totals.argmin(axis=0)  # (g_a, g_b)
        inner = totals.min(axis=0)
        inner_perm = {(ga, gb): orders[best[ga, gb]] for ga in range(n_kv) for gb in range(n_kv)}
    else:
        inner = np.zeros((n_kv, n_kv))
        inner_perm = {}
        for ga in range(n_kv):
            for gb in range(n_kv):
                block = c[ga, :, gb, :]  # (i_a, i_b)
                col = lap(block.T)  # for each i_b, the i_a
                inner_perm[ga, gb] = col
                inner[ga, gb] = block[col, np.arange(r)].sum()
    group_of_b = lap(inner.T)  # for each g_b, the g_a
    perm = np.empty(nh, dtype=np.int64)
    for gb in range(n_kv):
        ga = group_of_b[gb]
        perm[gb * r:(gb + 1) * r] = ga * r + inner_perm[ga, gb]
    return perm


def random_orthogonal(n: int, generator: torch.Generator, dtype=torch.float64) -> Tensor:
    """A Haar-random element of O(n) (QR of a Gaussian, signs fixed by diag(R))."""
    X = torch.randn(n, n, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(X)
    Q = Q * torch.sign(torch.diagonal(R))[None, :]
    return Q.to(dtype)
