"""Would a bfloat16 screen of the MLP similarity pay, with a rigorous error bound?

    .venv/bin/python benchmarks/bench_bf16_bound.py [--shape 0.6b|4b] [--rows 256]

The exact method's MLP unit similarity (GLU: <g, g'> + |<u, u'> + <d, d'>|) between layers 10
and 11 of a synthetic checkpoint (``benchmarks/synth.py``), observed and against the null
partner, for the first ``--rows`` units of B. For a screen made from bfloat16 inputs (float32
accumulation, a bfloat16 result), every entry is within

    E_ij = 2⁻⁶ · (‖u_i‖‖u'_j‖ + ‖d_i‖‖d'_j‖ + ‖g_i‖‖g'_j‖)

of the float32 value (Cauchy–Schwarz on the inputs' rounding, 2·2⁻⁸, the result's 2⁻⁹ and
the accumulation's, rounded up): the only bound that holds entry by entry without a second
product. A screen must recompute in float32 every entry whose interval reaches a row's k-th
largest value (the candidates depend on those). Printed: the largest actual error and the
bound, both over the similarity's standard deviation; the fraction of entries the screen
would recompute; the bound of the float16 copy drift holds between certificate scans
(``drift.certified``: 2⁻¹¹ of a block's largest magnitude, made from float32 blocks, so only
the scan's near-tight entries are in doubt); and the time of a float32 and a bfloat16 product
of one block here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synth  # noqa: E402

from drift import methods  # noqa: E402
from drift.canonical import open_layers  # noqa: E402
from drift.certified import start_k  # noqa: E402
from drift.methods.exact import mlp_down_cols, mlp_rows  # noqa: E402
from drift.null import NullDraws  # noqa: E402


def similarity(fa, fb, rows: int, dtype: torch.dtype) -> torch.Tensor:
    def mm(X, Y):
        return (X.to(dtype) @ Y.to(dtype).T).float()

    U = mm(mlp_rows(fb, fb.U, 0, rows), fa.U)
    D = mm(mlp_down_cols(fb, 0, rows).T, fa.D.T)
    return (U + D).abs() + mm(mlp_rows(fb, fb.G, 0, rows), fa.G)


def best_time(f, reps: int = 3) -> float:
    f()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(synth.SHAPES), default="0.6b")
    ap.add_argument("--rows", type=int, default=256)
    args = ap.parse_args(argv)
    shape = synth.SHAPES[args.shape]
    ckpt = synth.build(shape)  # cached after the first build
    m, reader = methods.get("exact"), open_layers(str(ckpt))
    fa, fb = m.form(reader.read(10)), m.form(reader.read(11))
    draws = NullDraws(fa.H, 1, 0, torch.float32, torch.device("cpu"))
    null = m.null_partner(fb, draws.rotation(0), draws.gains_generator(0))
    n, r = fa.U.shape[0], args.rows
    k = start_k(n)

    def norms(f):  # the norms of B's first r units, per matrix: the bound's rank-1 terms
        return (mlp_rows(f, f.U, 0, r).norm(dim=1), mlp_down_cols(f, 0, r).norm(dim=0), mlp_rows(f, f.G, 0, r).norm(dim=1))

    na = (fa.U.norm(dim=1), fa.D.norm(dim=0), fa.G.norm(dim=1))
    for name, g in (("observed", fb), ("null", null)):
        S = similarity(fa, g, r, torch.float32)
        A = similarity(fa, g, r, torch.bfloat16)
        nb = norms(g)
        E = 2.0 ** -6 * sum(x[:, None] * y[None, :] for x, y in zip(nb, na))
        kth = S.topk(k, dim=1).values[:, -1:]
        held = 2.0 ** -11 * S.abs().max()  # drift's float16 copy: its bound, per block of rows
        sd = float(S.std())
        print(json.dumps(dict(
            shape=args.shape, comparison=name, n=n, rows=r, k=k,
            bf16_max_error_over_sd=round(float((A - S).abs().max()) / sd, 4),
            bf16_bound_over_sd=round(float(E.mean()) / sd, 3),
            bound_holds=bool(((A - S).abs() <= E).all()),
            bf16_screen_recomputes=round(float((A + E >= kth - E.gather(1, S.topk(k, dim=1).indices[:, -1:])).float().mean()), 4),
            float16_copy_bound_over_sd=round(float(held) / sd, 4))))
    Xb, Ya = mlp_rows(fb, fb.U, 0, 512), fa.U
    t32 = best_time(lambda: Xb @ Ya.T)
    X16, Y16 = Xb.bfloat16(), Ya.bfloat16()
    t16 = best_time(lambda: X16 @ Y16.T)
    print(json.dumps(dict(product=f"(512 x {fa.H}) @ ({fa.H} x {n})", float32_s=round(t32, 4),
                          bfloat16_s=round(t16, 4), bfloat16_speedup=round(t32 / t16, 2))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
