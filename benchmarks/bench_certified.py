"""Certified sparse assignment against scipy's dense solver, same costs, same run.

    .venv/bin/python benchmarks/bench_certified.py [n ...]     (default: 3072 9728)

Costs: null-like (Gaussian, the null partner's) and related (a permuted noisy copy, negated
similarity), float64 as the worker maps them; then two real ones, the exact method's MLP
cost between MiniLM's layers 0 and 3 (d_ff 1536), observed and against its null partner,
where a few "hub" units top every row's similarity and the certified path falls back to the
dense solver. Prints wall times, their ratio and the certificate; the objectives must agree
to 1e-12.
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


def minilm_costs() -> dict[str, np.ndarray]:
    """The exact method's MLP costs (negated similarity) of MiniLM's layers 0 and 3."""
    import torch

    from drift import methods
    from drift.canonical import open_layers
    from drift.null import NullDraws

    m, r = methods.get("exact"), open_layers("minilm")
    fa, fb = m.form(r.read(0)), m.form(r.read(3))
    draws = NullDraws(fa.H, 1, 0, torch.float32, torch.device("cpu"))
    null = m.null_partner(fb, draws.rotation(0), draws.gains_generator(0))
    return {"minilm 0-3": -m.compare(fa, fb).assignment.dense(),
            "minilm 0-3 null": -m.compare(fa, null).assignment.dense()}


def main(sizes: list[int]) -> int:
    ok = True
    cases = [(kind, n, None) for n in sizes for kind in ("null-like", "related")]
    cases += [(kind, 1536, C) for kind, C in minilm_costs().items()]
    for kind, n, C in cases:
        if C is None:
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
