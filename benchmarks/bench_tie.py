"""The shared-operator test on MiniLM at its default settings, measured, with the numbers a
researcher would quote: every family tied across the whole block (each layer from its
predecessor, exact alignment, with the null tie), timed end to end in this process, next to
the weight view (exact, consecutive pairs) and the rank correlation between weight ρ and tie ρ.

    .venv/bin/python benchmarks/bench_tie.py [--method exact] [--out benchmarks/results/tie_minilm.json]

Exit status 1 if the tie takes longer than the target (120 s on the 2-core CPU machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import drift
from drift.function import activation_similarity, tie
from drift.plots.function import spearman, weight_tie_table

TARGET_S = 120.0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="exact")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    t0 = time.perf_counter()
    t = tie("minilm", method=args.method, progress=False)
    tie_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    act = activation_similarity("minilm", pairs="all", progress=False)
    act_s = time.perf_counter() - t0
    w = drift.analyze("minilm", method="exact", progress=False)
    table = weight_tie_table(w, t)
    per_family = {f: round(spearman(g["weight"].to_numpy(), g["tie"].to_numpy()), 3)
                  for f, g in table.groupby("family")}
    mean = t.df.groupby("family")[["residual", "null", "rho", "embedding_cos"]].mean()
    wmean = w.df.groupby("family")["rho"].mean()
    out = {
        "tie_s": round(tie_s, 1), "activation_similarity_all_pairs_s": round(act_s, 1), "target_s": TARGET_S,
        "method": args.method, "n_tokens": t.meta["n_tokens"],
        "rank_correlation_weight_rho_vs_tie_rho": round(spearman(table["weight"].to_numpy(), table["tie"].to_numpy()), 3),
        "rank_correlation_per_family": per_family,
        "family_means": {f: {"weight_rho": round(float(wmean.get(f, float("nan"))), 3),
                             **{k: round(float(v), 4) for k, v in row.items()}} for f, row in mean.iterrows()},
        "block": {f: {k: round(v, 4) for k, v in d.items()} for f, d in t.meta["block"].items()},
        "consecutive_activation": {f"{a}-{b}": round(float(v), 4) for (f, a, b, v) in
                                   act.df[["family", "layer_a", "layer_b", "residual"]].itertuples(index=False)
                                   if b == a + 1 and f == "residual_angle"},
    }
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0 if tie_s <= TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
