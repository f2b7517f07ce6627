"""Synthetic AnalysisResults for testing views (plots, widgets) without running an analysis.

Numbers are plausible, not real: each family has a base ρ, the null depends on the method
(raw ≈ √2, exact ≈ 1.36, rotation lower and ≈ 0.63 for the MLP, gauge-spec §5).
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from drift.result import COLUMNS, AnalysisResult

FAMILIES = {  # family -> (kind, base rho under the exact method)
    "q_proj": ("weight", 0.80), "k_proj": ("weight", 0.78), "v_proj": ("weight", 0.90),
    "o_proj": ("weight", 0.88), "gate_proj": ("weight", 0.95), "up_proj": ("weight", 0.96),
    "down_proj": ("weight", 0.97), "qk_circuit": ("circuit", 0.70), "ov_circuit": ("circuit", 0.85),
    "input_ln": ("norm", 0.20), "post_attn_ln": ("norm", 0.25),
}


def make_result(method: str = "exact", pairs: str = "consecutive", layers=range(6),
                families=None, seed: int = 0, model: str = "synthetic") -> AnalysisResult:
    rng = np.random.default_rng(seed)
    layers = list(layers)
    if pairs == "consecutive":
        plist = list(zip(layers[:-1], layers[1:]))
    else:
        plist = list(itertools.combinations(layers, 2))
    rows = []
    for fam in families or FAMILIES:
        kind, base = FAMILIES[fam]
        for a, b in plist:
            if method == "raw":
                null = np.sqrt(2) + rng.normal(0, 0.003)
                rho = min(1.0, base + 0.05) + rng.normal(0, 0.02)
            elif method == "rotation":
                null = (0.63 if fam in ("gate_proj", "up_proj", "down_proj") else 1.33) + rng.normal(0, 0.01)
                rho = base * 0.97 + rng.normal(0, 0.03)
            else:
                null = (1.40 if kind == "norm" else 1.36) + rng.normal(0, 0.005)
                rho = base + 0.02 * (b - a) + rng.normal(0, 0.03)
            residual = rho * null
            invariant = method == "exact" and kind != "norm"
            rows.append((fam, a, b, residual, null, residual / null, invariant, kind))
    df = pd.DataFrame(rows, columns=COLUMNS)
    meta = dict(model=model, arch="bert", method=method, pairs=pairs, layers=layers, seed=seed)
    return AnalysisResult(df, meta)
