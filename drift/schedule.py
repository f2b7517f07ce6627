"""Running an analysis's comparisons: the plan, a store of layer forms under a byte budget,
and executors for the large assignments.

The plan is every layer pair times (the observed comparison + ``n_null`` null draws), in pair
order. A pair names its two layers by *form key*: :func:`drift.analyze` uses ``(model, layer)``
(model 0, or 1 for the ``other`` model of a cross-model run), so that layer 3 of A and layer 3
of B are two forms; the store and the scheduler only hash and compare keys.

:func:`run` turns each task into a :class:`~drift.methods.Comparison`, hands its
assignment (if any) to the executor, does the comparison's ``prepare()`` here while the
executor solves (before, for one that solves at once: the heads are then let go before the
assignment's similarity is made), and its ``finish(answer)`` once the answer is back, with at most
``executor.width`` tasks in flight. Each comparison does the same arithmetic whatever the
executor, so pipelined and sequential runs give identical numbers.

Executors: :class:`InProcess` (solve now, in this thread; large MLP assignments go the
certified sparse path there, on the device their similarity is made on),
:class:`DeviceThreads` (the certified path in worker threads: a GPU's similarities stay on
it while their sparse problems are solved in worker processes on the CPU's cores, several
at once) and
:class:`LocalProcesses` (forked workers running scipy's dense solver, :func:`drift.assign.lap_pool`).
Another executor needs ``width``, ``submit(cost) -> Future`` and the context manager
protocol. A cluster runs whole pairs instead (:mod:`drift.cluster`), each worker with its own
executor.
"""

from __future__ import annotations

from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import numpy as np
import torch

from . import assign
from .assign import POOL_MIN_SIZE, lap_pool, lap_submit, solve, wait
from .memory import release_memory


@dataclass(frozen=True)
class Task:
    pair: int  # index into the analysis's pair list
    draw: int  # 0: the observed comparison; j ≥ 1: null draw j


def plan(n_pairs: int, n_null: int) -> list[Task]:
    return [Task(k, j) for k in range(n_pairs) for j in range(1 + n_null)]


class FormStore:
    """Layer forms made on demand by ``make(key)``, held within ``budget`` bytes where the pair
    order allows (never fewer than the two a comparison needs): before a pair needs a new form,
    the scheduler finishes comparisons in flight, then forms the pair does not use are dropped
    (and made again if a later pair needs them). A form is dropped as soon as every pair that
    uses it is finished. ``peak``: the most forms held at once; ``made``: forms made."""

    def __init__(self, make: Callable[[Hashable], object], pairs: Sequence[tuple[Hashable, Hashable]],
                 budget: float = float("inf")):
        self._make, self.pairs, self.budget = make, list(pairs), budget
        self.forms: dict[Hashable, object] = {}
        self._coming: dict[Hashable, Future] = {}  # forms being made ahead (see prefetch)
        self._spawn = None
        self._uses: dict[Hashable, set[int]] = {}  # form key -> the pairs that use it
        for k, pair in enumerate(self.pairs):
            for L in pair:
                self._uses.setdefault(L, set()).add(k)
        self._finished: set[int] = set()
        self.form_bytes = 0  # one form's size, once one is made
        self.peak = self.made = 0

    def make_ahead(self, spawn: Callable[..., Future]) -> None:
        """Have every form made by ``spawn(make, key) -> Future`` (one worker thread: a
        checkpoint is read by one thread at a time), so that :meth:`prefetch` can make the
        next pairs' forms while this thread drives comparisons. Only without a budget (forms
        on a GPU), where making ahead cannot go over it."""
        if self.budget == float("inf"):
            self._spawn = spawn

    def prefetch(self, keys: Sequence[Hashable]) -> None:
        """Start making the forms ``keys`` not yet held or coming (with :meth:`make_ahead`)."""
        if self._spawn is not None:
            for L in keys:
                if L not in self.forms and L not in self._coming:
                    self._coming[L] = self._spawn(self._make, L)

    def get(self, L: Hashable):
        if L not in self.forms:
            self.prefetch([L])
            fut = self._coming.pop(L, None)
            self.forms[L] = self._make(L) if fut is None else wait(fut)
            self.made += 1
            if fut is None:  # a GPU run's forms leave little on the host heap
                release_memory()
            if not self.form_bytes:
                self.form_bytes = nbytes(self.forms[L])
            self.peak = max(self.peak, len(self.forms))
        return self.forms[L]

    def over(self, pair: tuple[int, int]) -> bool:
        """Would making the forms ``pair`` lacks exceed the budget?"""
        new = sum(L not in self.forms for L in set(pair))
        return bool(new) and (len(self.forms) + new) * self.form_bytes > max(self.budget, 2 * self.form_bytes)

    def make_room(self, pair: tuple[int, int]) -> None:
        """Drop forms that ``pair`` does not use while over the budget."""
        if self.over(pair):
            for L in [L for L in self.forms if L not in pair]:
                if self.over(pair):
                    self.forms.pop(L)
            release_memory()

    def finished(self, pair: int) -> None:
        """Every comparison of ``pair`` is done: drop the forms no unfinished pair uses."""
        self._finished.add(pair)
        for L in list(self.forms):
            if self._uses[L] <= self._finished:
                self.forms.pop(L)


def nbytes(form) -> int:
    """Bytes held by a form's tensors."""
    from dataclasses import fields

    total = 0
    for f in fields(form):
        v = getattr(form, f.name)
        for t in (v.values() if isinstance(v, dict) else [v]):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


class InProcess:
    """Each assignment solved in this thread when it is submitted: one task at a time."""

    width = 1
    solves_now = True  # run() prepares a comparison first, so its heads are let go before the solve

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def submit(self, cost) -> Future:
        fut: Future = Future()
        fut.set_result(solve(cost, maximize=True))
        return fut


class LocalProcesses:
    """Assignments of at least ``POOL_MIN_SIZE`` solved in ``workers`` forked processes,
    ``workers`` tasks in flight. While they run, this thread's torch ops get the cores they
    leave: on 2 cores, a 2-thread OpenMP region next to a busy worker waits on its
    descheduled thread."""

    def __init__(self, workers: int, device: torch.device = torch.device("cpu")):
        self.width, self.device = workers, device
        self._pool = lap_pool(workers)

    def __enter__(self):
        self._threads = torch.get_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, self._threads - self.width + 1))
        try:
            self._pool.__enter__()
        except BaseException:
            torch.set_num_threads(self._threads)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._pool.__exit__(*exc)
        finally:
            torch.set_num_threads(self._threads)

    def submit(self, cost) -> Future:
        return lap_submit(cost, maximize=True)


class DeviceThreads:
    """Each assignment solved by the certified path in one of ``workers`` threads, ``workers``
    tasks in flight. For a GPU: its similarity, candidates and certificate stay on the device,
    and what runs on the CPU proceeds for several comparisons at once, beside this thread's
    next ``prepare()``: each round's sparse problem (scipy's sparse matching, which holds the
    GIL, and the duals) in one of ``workers`` forked processes (``processes=False``: in the
    thread). Not for the CPU: there the similarity's GEMMs already take every core."""

    solves_now = False

    def __init__(self, workers: int, processes: bool = True):
        self.width, self.processes = workers, processes

    def __enter__(self):
        from concurrent.futures import ThreadPoolExecutor

        self._rounds = _round_pool(self.width) if self.processes else None
        try:
            self._pool = ThreadPoolExecutor(self.width, thread_name_prefix="drift-compare")
            self._forms = ThreadPoolExecutor(1, thread_name_prefix="drift-forms")
        except BaseException:
            if self._rounds is not None:
                self._rounds.shutdown(wait=False, cancel_futures=True)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._pool.shutdown(wait=True, cancel_futures=True)
        finally:
            try:
                self._forms.shutdown(wait=True, cancel_futures=True)
            finally:
                if self._rounds is not None:
                    self._rounds.shutdown(wait=True, cancel_futures=True)

    def _solve_round(self, *args):
        from .certified import sparse_round

        return wait(self._rounds.submit(sparse_round, *args))

    def _solve(self, cost) -> np.ndarray:
        return solve(cost, True, None if self._rounds is None else self._solve_round)

    def submit(self, cost) -> Future:
        return self._pool.submit(self._solve, cost)

    def compare(self, c) -> Future:
        """The whole comparison in a worker thread: ``prepare()``, the assignment, ``finish``
        (its values are the future's result). The calling thread only starts comparisons, in
        task order (a null's gain shuffles are drawn there), so the arithmetic is that of
        :class:`InProcess`."""
        return self._pool.submit(_compare_now, self, c)

    def spawn(self, fn, *args) -> Future:
        """``fn(*args)`` in the one thread that makes forms (:meth:`FormStore.make_ahead`)."""
        return self._forms.submit(fn, *args)


def _round_pool(workers: int):
    """``workers`` processes for the certified path's sparse rounds, forked now, while this
    process holds no layer forms (a worker's RSS counts every page it shares with its parent);
    like :class:`drift.assign.lap_pool`'s, they only run numpy and scipy (no torch, no CUDA).
    None (said in a warning) when no process can be started."""
    import gc
    import logging
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    import scipy.sparse.csgraph  # noqa: F401 - imported once here, not again in every worker

    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=assign._worker_init)
    gc.freeze()  # a worker's collections then leave the inherited objects' pages shared
    try:
        for f in [pool.submit(int) for _ in range(workers)]:
            f.result()
    except OSError as e:  # no process to be had (a pids limit, memory): the rounds stay in the threads
        pool.shutdown(wait=False, cancel_futures=True)
        logging.getLogger(__name__).warning("no worker processes for the sparse rounds (%s); they run in "
                                            "the comparison threads", e)
        return None
    finally:
        gc.unfreeze()
    return pool


def _compare_now(ex: DeviceThreads, c) -> dict[str, float]:
    cost = c.assignment
    c.prepare()  # first, as InProcess does: the heads are let go before the assignment's similarity
    return c.finish(None if cost is None else ex._solve(cost))


DEVICE_THREADS = 16
"""The most certified assignments a GPU run keeps in flight (each holds its similarity on
the device in float16: 0.19 GB at d_ff 9728)."""


def executor_for(assigns: bool, d_ff: int, n_tasks: int, device: torch.device):
    """Worker processes only where there are large assignments to overlap and the dense
    solver solves them. Those of the certified path (``d_ff ≥ CERTIFIED_MIN_SIZE``) are
    solved where their similarity is made: on the CPU in this process (its sparse problem
    takes a fraction of the time the similarity does), on a GPU in worker threads
    (:class:`DeviceThreads`: there the sparse problems are what takes the time)."""
    import os

    if not assigns or n_tasks < 2 or d_ff < POOL_MIN_SIZE:
        return InProcess()
    workers = max(1, min(os.cpu_count() or 1, n_tasks))
    if d_ff >= assign.CERTIFIED_MIN_SIZE:
        if device.type == "cpu" or workers < 2:
            return InProcess()
        return DeviceThreads(min(workers, DEVICE_THREADS))
    return LocalProcesses(workers, device) if workers > 1 else InProcess()


def run(tasks: Sequence[Task], start: Callable, executor, store: FormStore,
        done: Callable[[Task, dict[str, float]], None],
        certified: Callable[[Task, object], None] | None = None) -> None:
    """Every task through ``start(task) -> Comparison``, the executor and ``done(task,
    residuals)``; see the module docstring. ``store`` is the one ``start`` takes forms from;
    it is told when the last task of a pair is done. ``certified(task, certificate)`` hears
    of each assignment the certified sparse path solved (:mod:`drift.certified`)."""
    inflight: deque = deque()
    left = Counter(t.pair for t in tasks)
    whole = hasattr(executor, "compare")  # it runs whole comparisons (DeviceThreads)
    if hasattr(executor, "spawn"):
        store.make_ahead(executor.spawn)

    def finished(task: Task, c, values: dict[str, float]) -> None:
        if certified is not None and getattr(c, "certificate", None) is not None:
            certified(task, c.certificate)
        done(task, values)
        left[task.pair] -= 1
        if not left[task.pair]:
            store.finished(task.pair)

    def finish_oldest() -> None:
        task, c, fut = inflight.popleft()
        finished(task, c, wait(fut) if whole else c.finish(wait(fut)))

    for i, task in enumerate(tasks):
        pair = store.pairs[task.pair]
        while inflight and store.over(pair):
            finish_oldest()
        store.make_room(pair)
        # the forms of the pairs the next ``width`` tasks start, made ahead where the store can
        store.prefetch([L for t in tasks[i:i + max(executor.width, 1) + 1] for L in store.pairs[t.pair]])
        c = start(task)
        if whole:
            inflight.append((task, c, executor.compare(c)))
        elif c.assignment is None:
            c.prepare()
            finished(task, c, c.finish(None))
        else:
            cost = c.assignment
            if getattr(executor, "solves_now", False):
                c.prepare()  # solved at once: the heads are let go first
                fut = executor.submit(cost)
            else:
                fut = executor.submit(cost)
                c.prepare()  # while the executor solves
            del cost
            inflight.append((task, c, fut))
        while len(inflight) >= max(executor.width, 1):
            finish_oldest()
    while inflight:
        finish_oldest()
