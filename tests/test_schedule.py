"""The scheduler (drift.schedule): counted, not timed.

Pipelined (worker processes, several comparisons in flight) and sequential runs give the
same numbers; the form store never holds more forms than its budget allows; every
comparison's answer reaches that comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch

import drift
from drift import assign, schedule
from drift.analysis import layer_pairs


@dataclass
class FakeForm:
    layer: int
    t: torch.Tensor


class PlantedComparison:
    """Its assignment's optimum is a permutation planted from the pair; finish checks that
    the answer it receives is that one (so answers cannot be crossed between comparisons)."""

    def __init__(self, fa: FakeForm, fb: FakeForm, n: int, log: list):
        self.perm = np.random.default_rng(100 * fa.layer + fb.layer).permutation(n)
        self.assignment = -np.abs(np.arange(n)[None, :] - self.perm[:, None]).astype(float)  # max at col perm[j]
        self.prepared, self.log, self.pair = False, log, (fa.layer, fb.layer)

    def prepare(self) -> None:
        self.prepared = True

    def finish(self, answer) -> dict[str, float]:
        assert self.prepared
        self.log.append(self.pair)
        return {"ok": float((answer == self.perm).all())}


def _run(layers, pairs, budget, executor, n=64, n_null=1):
    plist = layer_pairs(layers, pairs)
    held = []

    def make(L):
        held.append(len(store.forms) + 1)
        return FakeForm(L, torch.zeros(256))  # 1 KiB a form

    store = schedule.FormStore(make, plist, budget)
    log, results = [], {}

    def start(task):
        a, b = plist[task.pair]
        return PlantedComparison(store.get(a), store.get(b), n, log)

    with executor:
        schedule.run(schedule.plan(len(plist), n_null), start, executor, store,
                     lambda task, v: results.__setitem__((task.pair, task.draw), v))
    return store, held, log, results


@pytest.mark.parametrize("budget_forms", [2, 3, 5])
@pytest.mark.parametrize("pairs", ["consecutive", "all"])
def test_the_form_store_keeps_to_its_budget(pairs, budget_forms):
    layers = list(range(7))
    store, held, log, results = _run(layers, pairs, budget_forms * 1024, schedule.InProcess())
    assert max(held) <= budget_forms and store.peak <= budget_forms
    assert all(v == {"ok": 1.0} for v in results.values())
    n_pairs = len(layer_pairs(layers, pairs))
    assert len(results) == 2 * n_pairs  # observed + one null draw each
    if pairs == "consecutive":
        assert store.made == len(layers)  # each layer read once, whatever the budget
    else:
        assert store.made >= len(layers)
    assert not store.forms  # every form dropped once its pairs are done


def test_an_unbounded_store_makes_each_form_once():
    store, *_ = _run(list(range(6)), "all", float("inf"), schedule.InProcess())
    assert store.made == 6


def test_pipelined_answers_reach_their_comparisons(monkeypatch):
    """Several comparisons in flight in worker processes: each still gets its own answer,
    and the scheduler never holds more than ``width`` of them."""
    monkeypatch.setattr(assign, "POOL_MIN_SIZE", 16)
    ex = schedule.LocalProcesses(2)
    store, held, log, results = _run(list(range(5)), "all", 4 * 1024, ex, n=48, n_null=2)
    assert len(results) == 3 * 10 and all(v == {"ok": 1.0} for v in results.values())
    assert max(held) <= 4


def test_pipelined_and_sequential_analyses_are_identical(tmp_path, monkeypatch):
    """The real thing on a tiny llama: worker processes (2 in flight, every MLP assignment
    sent to them) against everything in this thread, all pairs, two null draws."""
    from drift import toy

    folder = toy.save(toy.tiny_model("llama", seed=11, dtype=torch.float32, num_hidden_layers=4), tmp_path / "m")
    monkeypatch.setattr(assign, "POOL_MIN_SIZE", 8)
    sent = []
    original = assign._write_cost
    monkeypatch.setattr(assign, "_write_cost", lambda *a: (sent.append(1), original(*a))[1])
    monkeypatch.setattr(schedule, "executor_for", lambda *a: schedule.LocalProcesses(2))
    piped = drift.analyze(folder, pairs="all", n_null=2, progress=False)
    n_sent = len(sent)
    monkeypatch.setattr(schedule, "executor_for", lambda *a: schedule.InProcess())
    seq = drift.analyze(folder, pairs="all", n_null=2, progress=False)
    assert n_sent == 6 * 3 and len(sent) == n_sent  # 6 pairs × (1 + 2 draws) went to the workers
    pd.testing.assert_frame_equal(piped.df, seq.df, check_exact=True)


def test_device_threads_give_the_numbers_of_one_thread(monkeypatch):
    """The GPU's executor, run on the CPU: whole comparisons (heads, certified assignment, MLP
    residuals) in two worker threads, several in flight, each round's sparse problem in a
    worker process, and the forms made ahead in a thread of their own, against everything in
    this thread. The same assignments and certificates, so the same numbers to the last bit
    (one torch thread: a GEMM's bits may depend on how many it is split over)."""
    monkeypatch.setattr(assign, "CERTIFIED_MIN_SIZE", 64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    solved = []
    original = assign.solve
    monkeypatch.setattr(schedule, "solve", lambda *a, **k: (solved.append(1), original(*a, **k))[1])
    from drift import certified as dc

    sent = []  # rounds handed to the worker processes
    original_round, original_pool, original_sparse = (
        schedule.DeviceThreads._solve_round, schedule._round_pool, dc._sparse_solve)
    monkeypatch.setattr(schedule.DeviceThreads, "_solve_round",
                        lambda self, *a: (sent.append(1), original_round(self, *a))[1])

    def in_this_process(*a):
        raise AssertionError("a sparse round was solved in this process")

    def round_pool(workers):
        pool = original_pool(workers)  # forked: the workers keep scipy's solver, this process loses it
        monkeypatch.setattr(dc, "_sparse_solve", in_this_process)
        return pool

    monkeypatch.setattr(schedule, "_round_pool", round_pool)
    try:
        monkeypatch.setattr(schedule, "executor_for", lambda *a: schedule.DeviceThreads(2))
        made = []
        original_make_ahead = schedule.FormStore.make_ahead
        monkeypatch.setattr(schedule.FormStore, "make_ahead",
                            lambda self, spawn: original_make_ahead(self, lambda *a: (made.append(1), spawn(*a))[1]))
        # no form budget, as on a GPU: the forms are made ahead in the executor's forms thread
        piped = drift.analyze("tiny-qwen3", pairs="all", layers=[0, 1, 2, 3], n_null=2, progress=False,
                              form_budget=float("inf"))
        n_threaded = len(solved)
        monkeypatch.setattr(dc, "_sparse_solve", original_sparse)
        monkeypatch.setattr(schedule, "executor_for", lambda *a: schedule.InProcess())
        seq = drift.analyze("tiny-qwen3", pairs="all", layers=[0, 1, 2, 3], n_null=2, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert len(made) == 4  # each layer's form made once, ahead, in the forms thread
    assert n_threaded == 6 * 3 and len(solved) == 2 * n_threaded  # every MLP assignment, each way
    assert piped.meta["assignment"] == seq.meta["assignment"]
    assert piped.meta["assignment"]["assignments"] - piped.meta["assignment"]["dense_fallbacks"] >= 10
    # every certified assignment's rounds were solved in the worker processes
    assert len(sent) >= piped.meta["assignment"]["assignments"] - piped.meta["assignment"]["dense_fallbacks"]
    pd.testing.assert_frame_equal(piped.df, seq.df, check_exact=True)


@pytest.mark.parametrize("device, d_ff, want", [
    ("cuda", 9728, "DeviceThreads"), ("cpu", 9728, "InProcess"), ("cpu", 1536, "LocalProcesses"),
    ("cuda", 512, "InProcess")])
def test_the_executor_suits_the_device(monkeypatch, device, d_ff, want):
    """A GPU's certified assignments go to threads (its similarity stays on it); on the CPU the
    certified path solves in this thread; mid-sized dense assignments go to worker processes."""
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    ex = schedule.executor_for(True, d_ff, 70, torch.device(device))
    assert type(ex).__name__ == want
    if want == "DeviceThreads":
        assert ex.width == min(16, schedule.DEVICE_THREADS)
