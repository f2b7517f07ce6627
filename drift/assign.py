"""Linear assignment: scipy's solver, in this process or in worker processes.

A large assignment (the MLP units of two layers, d_ff × d_ff) is given as a :class:`BlockCost`
that is made in blocks of rows and never held whole in torch; :func:`lap_submit` solves it
now or, inside :class:`lap_pool`, in a forked worker that maps it from a temporary file.
:func:`match_heads` is the two-level head assignment that respects GQA groups.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

from .memory import release_memory

Tensor = torch.Tensor


def _lap_cols(c: np.ndarray, maximize: bool) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(c, maximize=maximize)
    out = np.empty(c.shape[0], dtype=np.int64)
    out[rows] = cols
    return out


def _lap_centred(cost: np.ndarray) -> np.ndarray:
    """:func:`_lap_cols` of a cost to minimise after subtracting each column's mean, in place:
    every assignment uses each column once, so the optimum is the same, and scipy's
    shortest-augmenting-path solver needs fewer steps on costs whose columns differ in level
    (MiniLM's 30 MLP costs: 10.1 s → 6.7 s, the same 30 permutations; issue #10's note)."""
    cost -= cost.mean(axis=0)
    return _lap_cols(cost, maximize=False)


def _lap_file(path: str, shape: tuple[int, int]) -> np.ndarray:
    """Worker side of :func:`lap_submit`: minimise the float64 cost stored at ``path``.
    scipy works on the mapped file directly (already float64 and C-contiguous, and minimising
    needs no negated copy), so a worker holds one n×n float64 matrix and nothing more."""
    # "r+": scipy copies a read-only array (measured: +n² float64 of private memory); it never
    # writes to a cost it minimises, and the file is ours and temporary anyway.
    cost = np.memmap(path, dtype=np.float64, mode="r+", shape=shape)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # the mapping stays readable; no file outlives a killed process now
    return _lap_centred(cost)


class BlockCost:
    """An assignment cost produced in blocks of rows: ``block(r0, r1)`` returns rows
    ``r0:r1`` as a tensor. Large costs (d_ff × d_ff unit similarities) are never held whole
    in torch: :func:`lap_submit` writes the blocks, as the float64 matrix scipy wants, to a
    file that a worker maps, or into one numpy array when it solves in this process."""

    def __init__(self, shape: tuple[int, int], block, rows_per_block: int = 512, parts=None):
        self.shape = (int(shape[0]), int(shape[1]))
        self.block = block
        self.rows_per_block = rows_per_block
        # parts(r0, r1) -> (the block, [its terms]): the certified path makes the blocks with it,
        # keeps the terms at the candidates and leaves (σ, S, terms) at its answer σ in
        # ``matched`` (None where an answer's entry was no first candidate)
        self.parts = parts
        self.matched = None
        self.certificate = None  # a drift.certified.Certificate, once solved by the certified path

    def release(self) -> None:
        """Let go of what the blocks read (the layers' forms), once every block is made."""
        self.block = self.parts = None

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

            remove_stale_costs()

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
            try:
                _POOL.shutdown(wait=True, cancel_futures=True)
            finally:
                _POOL = None
                for path in list(_COST_FILES):  # whatever a signal left between write and callback
                    _unlink_quietly(path)


def _worker_init() -> None:
    """A worker ignores SIGINT: Ctrl-C (or a notebook's interrupt) reaches the whole process
    group, and it is the parent that stops, cancelling what is queued; a worker that died of
    it would leave the pool broken and print a traceback per worker. SIGTERM and SIGHUP end
    it at once, and so does its parent's death."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # not the parent's handlers (the CLI's unwinding)
        signal.signal(sig, signal.SIG_DFL)
    _die_with_parent()


def _die_with_parent() -> None:
    """Linux: have the kernel send this worker SIGTERM when its parent dies (``kill -9`` of
    drift, a closed notebook kernel), so that no worker is left holding the parent's stdout."""
    import signal

    from .memory import _libc

    libc = _libc()
    if not libc or not hasattr(libc, "prctl"):  # not glibc/Linux
        return
    libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)


COST_PREFIX = "drift-lap-"
"""Temporary cost files: ``drift-lap-<pid>-<random>.f64`` in the temp folder."""


def remove_stale_costs() -> list[str]:
    """Delete cost files left by drift processes that no longer exist (killed before they
    could clean up); returns their paths."""
    import glob
    import tempfile

    gone = []
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{COST_PREFIX}*-*.f64")):
        try:
            pid = int(os.path.basename(path)[len(COST_PREFIX):].split("-")[0])
            os.kill(pid, 0)
        except ValueError:
            continue
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.unlink(path)
                gone.append(path)
        except PermissionError:  # alive, another user's
            continue
    return gone


def wait(fut, poll_s: float = 0.2):
    """``fut.result()``, waiting in slices so that an exception raised asynchronously in this
    thread (the explorer's interrupt, see :func:`drift.interrupt.interruptible`) lands within
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
    import tempfile

    fd, path = tempfile.mkstemp(prefix=f"{COST_PREFIX}{os.getpid()}-", suffix=".f64")
    _COST_FILES.add(path)
    try:
        with os.fdopen(fd, "wb") as f:
            for _, _, b in cost.blocks(sign):
                f.write(memoryview(np.ascontiguousarray(b)).cast("B"))
    except BaseException:
        _unlink_quietly(path)
        raise
    release_memory()  # the blocks' buffers: glibc would keep them in the heap, at the peak
    return path


def lap_submit(cost: np.ndarray | Tensor | BlockCost, maximize: bool = False):
    """A future of :func:`lap`: solved in a worker process inside :class:`lap_pool` (for
    problems of at least ``POOL_MIN_SIZE``), else solved now.

    A :class:`BlockCost` goes to the worker as a temporary float64 file (negated when
    maximising), deleted once the future is done; nothing of it stays in this process."""
    from concurrent.futures import Future

    shape = cost.shape if isinstance(cost, BlockCost) else tuple(np.shape(cost))
    done: Future = Future()
    if _POOL is None or min(shape) < POOL_MIN_SIZE:
        done.set_result(solve(cost, maximize))
        return done
    if isinstance(cost, BlockCost):
        path = _write_cost(cost, -1.0 if maximize else 1.0)
        cost.release()
        fut = _POOL.submit(_lap_file, path, cost.shape)
        fut.add_done_callback(lambda _: _unlink_quietly(path))  # the worker may have done it
        return fut
    return _POOL.submit(_lap_cols, _as_numpy(cost), maximize)


_COST_FILES: set[str] = set()
"""Cost files this process wrote and has not yet seen removed (see lap_pool.__exit__)."""


def _unlink_quietly(path: str) -> None:
    _COST_FILES.discard(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


CERTIFIED_MIN_SIZE = 2048
"""Square BlockCosts at least this large are solved by :func:`drift.certified.certified_similarity`
(sparse candidates and an optimality certificate) where they are made, not by the dense solver."""


def solve(cost: np.ndarray | Tensor | BlockCost, maximize: bool = False, solve_round=None) -> np.ndarray:
    """:func:`lap` in this process, whatever pool is active. A large square :class:`BlockCost`
    to maximise is solved by the certified sparse path on its own device, and keeps its
    certificate (``cost.certificate``); the dense solver's answers carry none (scipy's is exact).
    ``solve_round``: what solves the certified path's sparse rounds
    (:func:`drift.certified.certified_similarity`)."""
    if isinstance(cost, BlockCost):
        n, m = cost.shape
        if maximize and n == m and n >= CERTIFIED_MIN_SIZE:
            from .certified import certified_similarity

            sigma, cost.certificate, at = certified_similarity(
                n, cost.block, rows_per_block=cost.rows_per_block, parts=cost.parts, matched=True,
                solve_round=solve_round)
            cost.matched = None if at is None else (sigma.copy(), *at)  # the answer the terms belong to
        else:
            sigma = _lap_centred(cost.dense(-1.0 if maximize else 1.0))
        cost.release()
        return sigma
    return _lap_cols(_as_numpy(cost), maximize)


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

