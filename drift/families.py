"""The weight families drift reports: one table, used by the methods, the analysis, the
result, the plots, the explorer and the CLI.

A family is a group of a layer's parameters compared as one matrix (``q_proj``), a gauge-
invariant product of them (``qk_circuit``), or a norm's gain vector (``input_ln``). Its
*kind* decides its colour and legend; its *order* the rows of every table and figure; its
*invariance* whether a number for it is a property of the model or of the coordinates the
checkpoint happens to use (shown with a ``*`` and hatching).
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("weight", "circuit", "norm", "activation")


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # one of KINDS
    norm: str | None = None  # the CanonicalLayer.norms role a norm family reads, e.g. "attn_in"
    about: str = ""


FAMILIES: tuple[Family, ...] = (
    Family("q_proj", "weight", about="query projection"),
    Family("k_proj", "weight", about="key projection"),
    Family("v_proj", "weight", about="value projection"),
    Family("o_proj", "weight", about="attention output projection"),
    Family("gate_proj", "weight", about="GLU gate projection"),
    Family("up_proj", "weight", about="MLP input projection"),
    Family("down_proj", "weight", about="MLP output projection"),
    Family("qk_circuit", "circuit", about="per-head bilinear form W_Qᵀ W_K (per RoPE pair)"),
    Family("ov_circuit", "circuit", about="per-head product W_O W_V"),
    Family("input_ln", "norm", "attn_in", "gain of the norm before attention"),
    Family("post_attn_ln", "norm", "mlp_in", "gain of the norm before the MLP"),
    Family("attn_out_ln", "norm", "attn_out", "gain of the norm after attention (sandwich norm)"),
    Family("mlp_out_ln", "norm", "mlp_out", "gain of the norm after the MLP (sandwich norm)"),
    Family("q_norm", "norm", "q_norm", "per-head query norm gain (Qwen3)"),
    Family("k_norm", "norm", "k_norm", "per-head key norm gain (Qwen3)"),
    # drift.function: measured on activations, not weights
    Family("residual_angle", "activation",
           about="angular distance of the residual streams after the two layers (0: same direction)"),
    Family("update_cka", "activation", about="linear CKA of the two layers' updates h_(l+1) - h_l (1: alike)"),
)

BY_NAME = {f.name: f for f in FAMILIES}
NORM_FAMILIES = {f.norm: f.name for f in FAMILIES if f.norm}
"""norm role of a CanonicalLayer -> family name."""


def kind(family: str) -> str:
    """``weight`` | ``circuit`` | ``norm`` (a family not in the table counts as a weight)."""
    f = BY_NAME.get(family)
    return f.kind if f else "weight"


def order(families: list[str]) -> list[str]:
    """``families`` in display order: the table's, then any others as given."""
    known = [f.name for f in FAMILIES if f.name in families]
    return known + [f for f in families if f not in BY_NAME]


def invariant(method: str, sym, family: str) -> bool:
    """Is the number of ``family`` under ``method`` a property of the model, whatever
    coordinates (gauge) its checkpoint uses? Only the exact method removes the gauge from the
    matrices and circuits. Of the norms: pre-norm gains trade with their readers' columns
    (gauge-spec §2.5), so they are not invariant, except in post-LN models (BERT) where they
    write the residual stream; sandwich post-norms write it too; q/k-norm gains are balanced
    by ``exact`` only. Activation families measure the function itself: invariant always."""
    if kind(family) == "activation":
        return True
    if kind(family) != "norm":
        return method == "exact"
    if family in ("q_norm", "k_norm"):
        return method == "exact"
    if family in ("attn_out_ln", "mlp_out_ln"):
        return True
    return bool(sym.post_ln)
