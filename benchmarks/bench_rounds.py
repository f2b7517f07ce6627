"""Certified assignments from several threads at once: the sparse rounds in the threads, or in
worker processes (what :class:`drift.schedule.DeviceThreads` does for a GPU run).

On a GPU the similarities are cheap and what is left runs on the CPU, one comparison per
thread; scipy's sparse matching holds the GIL, so in threads those rounds take turns. Here
each problem's similarity is a stored float32 matrix (a block is a copy of its rows), so
that, as on a GPU, the products cost nothing and the CPU work of the certified path is what
is timed. Every way must give the same assignments.

    python benchmarks/bench_rounds.py                  # n 9728 (Qwen3-4B's d_ff), 4 problems, 2 threads
    python benchmarks/bench_rounds.py --n 3072 --problems 8

Prints one JSON line per way: wall seconds for the rounds alone (one problem's candidates
solved ``--problems`` times), then for whole certified solves, with the ratio to the first.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from drift import schedule
from drift.certified import certified_similarity


def rounds_only(args, ways) -> None:
    """The rounds alone: one null-like problem's first-round candidates, solved ``--problems``
    times from ``--threads`` threads (what the GIL serialises)."""
    from drift.certified import sparse_round, start_k

    n, k = args.n, start_k(args.n)
    S = torch.randn(n, n, generator=torch.Generator().manual_seed(1))
    v, i = torch.topk(S, k, dim=1, sorted=False)
    del S
    rows, cols, w = np.repeat(np.arange(n), k), i.numpy().ravel().astype(np.int64), -v.double().numpy().ravel()
    for name, ex in ways.items():
        solve_round = ex._solve_round if ex._rounds is not None else sparse_round
        t = time.perf_counter()
        with ThreadPoolExecutor(args.threads) as pool:
            out = list(pool.map(lambda _: solve_round(n, rows, cols, w), range(args.problems)))
        assert all(np.array_equal(o[0], out[0][0]) for o in out)
        print(json.dumps({"way": name, "rounds only": args.problems, "n": n, "threads": args.threads,
                          "wall_s": round(time.perf_counter() - t, 3)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=9728)
    ap.add_argument("--problems", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)  # each thread's torch calls on one core, as beside a GPU
    # the executors first: a GPU run forks its workers before it holds any layer's form
    ways = {"rounds in the threads": schedule.DeviceThreads(args.threads, processes=False),
            "rounds in processes": schedule.DeviceThreads(args.threads)}
    for ex in ways.values():
        ex.__enter__()
    rounds_only(args, ways)
    gen = torch.Generator().manual_seed(0)
    sims = [torch.randn(args.n, args.n, generator=gen) for _ in range(args.problems)]  # null-like

    def run(ex) -> tuple[float, list]:
        solve_round = ex._solve_round if ex._rounds is not None else None
        t = time.perf_counter()
        with ThreadPoolExecutor(args.threads) as pool:
            out = list(pool.map(lambda S: certified_similarity(
                args.n, lambda r0, r1: S[r0:r1].clone(), solve_round=solve_round), sims))
        return time.perf_counter() - t, out

    best: dict[str, float] = {}
    answers = {}
    try:
        for _ in range(args.repeat):  # interleaved, best of --repeat
            for name, ex in ways.items():
                wall, out = run(ex)
                best[name] = min(best.get(name, np.inf), wall)
                answers[name] = [(sig, cert.rounds, cert.violators) for sig, cert in out]
    finally:
        for ex in ways.values():
            ex.__exit__(None, None, None)
    first = next(iter(ways))
    for name in ways:
        same = all(np.array_equal(a[0], b[0]) and a[1:] == b[1:] for a, b in zip(answers[name], answers[first]))
        print(json.dumps({"way": name, "n": args.n, "problems": args.problems, "threads": args.threads,
                          "wall_s": round(best[name], 3), "vs_first": round(best[first] / best[name], 2),
                          "rounds": [a[1] for a in answers[name]], "same_answers": same}))


if __name__ == "__main__":
    main()
