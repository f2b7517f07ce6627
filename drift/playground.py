"""A bench for gauge experiments on tiny models (used by the primer notebook).

    >>> pg = Playground.of("llama")
    >>> pg.compare({"VO: random invertible G": lambda L: gauge.vo_gauge(L, 0, G)})

:class:`Playground` holds a tiny float64 ``transformers`` model (:mod:`drift.toy`), its
checkpoint read back as canonical layers, and a probe batch. :meth:`Playground.compare`
replaces one layer by transformed copies and reports, for each, how far the model's
**outputs** moved (a symmetry: not at all) and how far the layer's **weights** moved (a
symmetry: a lot, which is why raw weight comparisons mislead).

:meth:`Playground.of_model` does the same for a real checkpoint (e.g. the bundled
``tiny-qwen3``), so that a fitted alignment can be put back into a trained model.

:func:`fit_summary`, :func:`fit_heads` and :func:`fit_qk_pairs` say in words and small tables
which group element the exact fit found (``drift.methods.get("exact").fit(a, b)``);
:func:`residuals` measures pairs of layers family by family, without a null.

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

import numpy as np
import pandas as pd
import torch

from . import toy
from .align import procrustes
from .canonical import (
    CanonicalLayer,
    LayerReader,
    LayerSymmetry,
    layer_state_dict,
    open_layers,
)
from .checkpoint import Checkpoint, read_config, resolve_model

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

    @classmethod
    def of_model(cls, model: str | Path, probe_length: int = 32) -> Playground:
        """A real checkpoint (a bundled name such as ``"tiny-qwen3"``, a local folder, a repo
        id in the local HF cache), loaded by ``transformers`` in float64 from local files only
        (never remote code), eager attention; the probe is random token ids of length
        ``probe_length``. A causal LM's output is its logits, an encoder's its last hidden state."""
        import transformers

        folder = resolve_model(model)
        archs = read_config(folder).get("architectures") or []
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
        auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
        net = auto.from_pretrained(folder, local_files_only=True, trust_remote_code=False,
                                   dtype=torch.float64, attn_implementation="eager").eval()
        reader = open_layers(str(model), torch.float64)
        ids = toy.probe_ids(vocab=net.config.vocab_size, length=probe_length)
        return cls(str(model), net, reader, ids, toy.outputs(net, ids))

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


# --------------------------------------------------------------------------- the exact fit, read off

def _exact(alignment) -> None:
    if not hasattr(alignment, "head_perm"):
        raise ValueError(f"{type(alignment).__name__} is not an exact alignment (no head permutation): "
                         "fit it with drift.methods.get('exact').fit(layer_a, layer_b)")


def _pair_moves(alignment, sym: LayerSymmetry) -> tuple[np.ndarray, np.ndarray]:
    """q/k-norm's QK element per RoPE pair, as ``(swapped (m,) bool, sign (n_kv, m) ±1)``.

    Under q/k-norm the fitted phase of pair i in KV group g is ``i^t · s`` (gauge-spec §2.1):
    ``t`` (0 or 1) swaps the pair's two coordinates in every group of the layer at once,
    because the pair's gains (shared by the layer's heads) swap with them; ``s = ±1`` is a
    sign of the pair, one per group."""
    phase = alignment.qk_phase.to(torch.complex128)  # (n_kv, m)
    swapped = phase[0].imag.abs() > 0.5  # (m,)
    sign = (phase / torch.where(swapped, 1j, 1.0 + 0j)).real  # (n_kv, m), ±1
    return swapped.numpy(), np.sign(sign.numpy())


def fit_heads(alignment, sym: LayerSymmetry) -> pd.DataFrame:
    """Which head of layer A the exact fit puts in each head slot of layer B, with both KV groups.

    The head permutation of a GQA layer respects the groups: a KV group moves as a whole
    (its key and value heads with it), and its query heads may be reordered inside it. So the
    "KV group of A" column is constant on each group of B.

    Raises:
        ValueError: ``alignment`` is not an exact alignment.
    """
    _exact(alignment)
    perm = np.asarray(alignment.head_perm)  # (n_heads,): B's head h is A's head perm[h]
    r = sym.group_size
    return pd.DataFrame({"KV group of B": np.arange(sym.n_heads) // r, "head of A": perm,
                         "KV group of A": perm // r},
                        index=pd.Index(range(sym.n_heads), name="head of B"))


def fit_qk_pairs(alignment, sym: LayerSymmetry) -> pd.DataFrame:
    """The fitted QK element per RoPE pair (columns: pair i, coordinates (i, i + d_rot/2)).

    With q/k-norm: a row "swapped (whole layer)" (``↔`` where the pair's two coordinates are
    exchanged, ``·`` where not) and a row of signs (``+`` / ``−``) per KV group: the phase
    ``i^t · s`` of :func:`_pair_moves`, written out. Without q/k-norm (Llama-style RoPE): one
    row per KV group with the fitted phase of each pair in degrees.

    Raises:
        ValueError: ``alignment`` is not an exact alignment, or the layer has no RoPE pairs.
    """
    _exact(alignment)
    if alignment.qk_phase is None or not sym.rope_pairs:
        raise ValueError(f"a {sym.arch} layer without RoPE pairs has no per-pair QK phase")
    cols = pd.Index(range(sym.rope_pairs), name="RoPE pair")
    if sym.qk_norm:
        swapped, sign = _pair_moves(alignment, sym)
        rows = {"swapped (whole layer)": ["↔" if t else "·" for t in swapped]}
        rows.update({f"sign, KV group {g}": ["+" if v > 0 else "−" for v in sign[g]]
                     for g in range(sym.n_kv_heads)})
    else:
        deg = torch.rad2deg(torch.angle(alignment.qk_phase.to(torch.complex128))).numpy()  # (n_kv, m)
        rows = {f"phase, KV group {g}": [f"{v:+.0f}°" for v in deg[g]] for g in range(sym.n_kv_heads)}
    return pd.DataFrame.from_dict(rows, orient="index", columns=cols)


def fit_summary(alignment, sym: LayerSymmetry) -> pd.Series:
    """The exact fit in words: where the KV groups went, how many heads, RoPE pairs and MLP
    units stayed in place, how many signs flipped, and whether applying it keeps the function.

    "Stayed in place" counts identity entries of the fitted permutations; between unrelated
    layers they are about chance (n_heads / n_heads!, 1 unit in d_ff), against a layer's own
    earlier self they say whether training kept each head and unit where it was.

    Raises:
        ValueError: ``alignment`` is not an exact alignment.
    """
    _exact(alignment)
    r, n_kv, d_ff = sym.group_size, sym.n_kv_heads, len(alignment.mlp_perm)
    perm = np.asarray(alignment.head_perm)  # (n_heads,)
    groups = perm.reshape(n_kv, r) // r  # (n_kv, r): A's group of each head of B's group g
    out = {
        "KV groups (B ← A)": ", ".join(f"{g} ← {int(groups[g, 0])}" for g in range(n_kv)),
        "each KV group moved whole": bool((groups == groups[:, :1]).all()),
        "heads in place": f"{int((perm == np.arange(sym.n_heads)).sum())} of {sym.n_heads}",
    }
    if sym.qk_norm and alignment.qk_phase is not None:
        swapped, sign = _pair_moves(alignment, sym)
        out["RoPE pairs swapped (whole layer)"] = f"{int(swapped.sum())} of {sym.rope_pairs}"
        out["RoPE pair signs flipped"] = ", ".join(
            f"group {g}: {int((sign[g] < 0).sum())} of {sym.rope_pairs}" for g in range(n_kv))
    out["MLP units in place"] = f"{int((np.asarray(alignment.mlp_perm) == np.arange(d_ff)).sum())} of {d_ff}"
    if sym.is_glu:
        out["GLU unit signs flipped"] = f"{int((np.asarray(alignment.mlp_sign) < 0).sum())} of {d_ff}"
    out["keeps the function"] = bool(alignment.function_preserving)
    return pd.Series(out, dtype=object, name="exact fit")


def residuals(pairs: Mapping[str, tuple[CanonicalLayer, CanonicalLayer]], method: str = "exact") -> pd.DataFrame:
    """Per-family residual of each labelled pair of layers ``(A, B)`` under ``method``: the
    number ``drift.analyze`` reports, for layers held in memory, without a null.

    Returns:
        A DataFrame, one row per family (the method's order), one column per label.
    """
    from .methods import get, run

    m = get(method)
    return pd.DataFrame({label: run(m.compare(m.form(a), m.form(b))) for label, (a, b) in pairs.items()})


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


__all__ = ["Playground", "fit_heads", "fit_qk_pairs", "fit_summary", "residuals", "rotation_fit_null",
           "SAME", "DIFFERENT"]
