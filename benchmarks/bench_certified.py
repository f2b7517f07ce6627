"""Certified sparse assignment against scipy's dense solver, same costs, same run.

    .venv/bin/python benchmarks/bench_certified.py [n ...]     (default: 3072 9728)

Costs: null-like (Gaussian, the null partner's) and related (a permuted noisy copy, negated
similarity), float64 as the worker maps them. Prints wall times, their ratio and the
certificate; the objectives must agree to 1e-12.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
from scipy.optimize import linear_sum_assignment

from drift.certified import certified_lap


def cost(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "null-like":
        return rng.standard_normal((n, n))
    X = rng.standard_normal((n, 64))
    return -(X[rng.permutation(n)] + 0.5 * rng.standard_normal((n, 64))) @ X.T


def main(sizes: list[int]) -> int:
    ok = True
    for n in sizes:
        for kind in ("null-like", "related"):
            C = cost(kind, n, np.random.default_rng(0))
            t0 = time.perf_counter()
            r, c = linear_sum_assignment(C)
            dense = time.perf_counter() - t0
            t0 = time.perf_counter()
            sigma, cert = certified_lap(C)
            sparse = time.perf_counter() - t0
            a, b = C[r, c].sum(), C[np.arange(n), sigma].sum()
            same = abs(a - b) <= 1e-12 * abs(a)
            ok &= same
            print(json.dumps(dict(n=n, cost=kind, dense_s=round(dense, 3), certified_s=round(sparse, 3),
                                  speedup=round(dense / sparse, 2), same_objective=bool(same), rounds=cert.rounds,
                                  violators=cert.violators, candidates=cert.candidates,
                                  dense_fallback=cert.dense_fallback)))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main([int(a) for a in sys.argv[1:]] or [3072, 9728]))
