"""A bench for gauge experiments on tiny models (used by the primer notebook).

    >>> pg = Playground.of("llama")
    >>> pg.compare({"VO: random invertible G": lambda L: gauge.vo_gauge(L, 0, G)})

:class:`Playground` holds a tiny float64 ``transformers`` model (:mod:`drift.toy`), its
checkpoint read back as canonical layers, and a probe batch. :meth:`Playground.compare`
replaces one layer by transformed copies and reports, for each, how far the model's
**outputs** moved (a symmetry: not at all) and how far the layer's **weights** moved (a
symmetry: a lot, which is why raw weight comparisons mislead).

:func:`rotation_fit_null` shows the over-fitting of an O(d_ff) "alignment" on unrelated
weights (gauge-spec §0, claim 2).

Imports transformers' model classes on use (through :mod:`drift.toy`), never at ``import drift``.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import pandas as pd
import torch

from . import toy
from .align import procrustes
from .canonical import CanonicalLayer, LayerReader, LayerSymmetry, layer_state_dict
from .checkpoint import Checkpoint

Tensor = torch.Tensor

SAME = 1e-4
"""Relative output change below which a transform counts as "same function" (float64 model;
HF computes some ops in float32, and q/k-norm symmetries are exact only up to the norm's eps)."""
DIFFERENT = 1e-3
"""Relative output change above which it counts as "different function"."""


@dataclass
class Playground:
    """A tiny model of architecture ``name``, its canonical reader, and a probe batch."""

    name: str
    model: torch.nn.Module
    reader: LayerReader
    ids: Tensor
    base: Tensor  # the model's outputs on ``ids``

    @classmethod
    def of(cls, name: str, seed: int = 0, folder: str | Path | None = None) -> "Playground":
        """Build ``drift.toy.tiny_model(name, seed)`` in float64 and save it to ``folder``
        (a temporary folder by default)."""
        model = toy.tiny_model(name, seed=seed, dtype=torch.float64)
        folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix=f"drift-{name}-"))
        toy.save(model, folder)
        reader = LayerReader(Checkpoint.open(folder), torch.float64)
        ids = toy.probe_ids(vocab=model.config.vocab_size)
        return cls(name, model, reader, ids, toy.outputs(model, ids))

    @property
    def sym(self) -> LayerSymmetry:
        return self.reader.sym

    def layer(self, i: int = 1) -> CanonicalLayer:
        return self.reader.read(i)

    def with_layer(self, layer: CanonicalLayer) -> torch.nn.Module:
        """A copy of the model with layer ``layer.index`` replaced by ``layer``."""
        m = copy.deepcopy(self.model)
        m.load_state_dict(layer_state_dict(layer, self.reader), strict=False)
        return m

    def output_change(self, layer: CanonicalLayer) -> float:
        """max |Δ output| / max |output| when ``layer`` replaces its original."""
        out = toy.outputs(self.with_layer(layer), self.ids)
        return float((out - self.base).abs().max() / self.base.abs().max())

    @staticmethod
    def weight_change(old: CanonicalLayer, new: CanonicalLayer) -> float:
        """‖new − old‖ / ‖old‖ over every tensor of the layer (Frobenius, all concatenated)."""
        a = dict(old.tensors())
        b = dict(new.tensors())
        num = sum(float((b[k] - a[k]).pow(2).sum()) for k in a)
        den = sum(float(a[k].pow(2).sum()) for k in a)
        return (num / den) ** 0.5

    def compare(self, transforms: Mapping[str, Callable[[CanonicalLayer], CanonicalLayer]],
                layer: int = 1) -> pd.DataFrame:
        """One row per transform of layer ``layer``: how much the outputs and the weights moved,
        and the verdict ("same function" / "different function" / "≈ (eps)")."""
        old = self.layer(layer)
        rows = []
        for label, fn in transforms.items():
            new = fn(old)
            out = self.output_change(new)
            verdict = ("same function" if out < SAME else
                       "different function" if out > DIFFERENT else "≈ same (up to eps)")
            rows.append({"transform": label, "output change": out,
                         "weight change": self.weight_change(old, new), "verdict": verdict})
        return pd.DataFrame(rows).set_index("transform")


def rotation_fit_null(d_model: int, d_ff: int, seed: int = 0, glu: bool = True) -> dict[str, float]:
    """Residual between two *unrelated* random MLPs (Gaussian, each family unit-normalised),
    without alignment and after the reference's O(d_ff) rotation fit of the units.

    The unit axis is the row of ``[W_gate | W_up | W_downᵀ]`` (d_ff × p, p = 3 d_model for a
    GLU, 2 d_model otherwise). Fitting R ∈ O(d_ff) to ``R A ≈ B`` has d_ff(d_ff−1)/2 degrees of
    freedom; once d_ff approaches p it can map almost anything onto anything, so the residual
    of unrelated weights falls far below √2 (0.61 at p/d_ff = 0.75; gauge-spec §5).

    Returns:
        ``{"no alignment": ..., "O(d_ff) rotation": ...}``, each the root-mean-square over
        families of the unit-normalised Frobenius residual.
    """
    g = torch.Generator().manual_seed(seed)
    n_fam = 3 if glu else 2

    def mlp() -> list[Tensor]:
        # (d_ff, d_model) per family; down enters transposed, so every family is unit-major
        fams = [torch.randn(d_ff, d_model, generator=g, dtype=torch.float64) for _ in range(n_fam)]
        return [f / f.norm() for f in fams]

    A, B = mlp(), mlp()
    R = procrustes(A, B)  # (d_ff, d_ff): R A_j ≈ B_j jointly
    raw = sum(float((a - b).norm() ** 2) for a, b in zip(A, B)) / n_fam
    fit = sum(float((R @ a - b).norm() ** 2) for a, b in zip(A, B)) / n_fam
    return {"no alignment": raw ** 0.5, "O(d_ff) rotation": fit ** 0.5}


__all__ = ["Playground", "rotation_fit_null", "SAME", "DIFFERENT"]
