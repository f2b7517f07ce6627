"""``rotation``: the reference script's semantics with the Procrustes orientation corrected:
one O(d_head) rotation per *query head* tying Q/K/V/O, one O(d_ff) rotation of the MLP units,
raw norm vectors. Neither rotation is a symmetry of the model: approximate, labelled so.
``raw`` is the same comparison with the identity in place of every fitted rotation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..align import fro, polar, procrustes_thin
from ..canonical import CanonicalLayer
from .form import EPS, Form, Tensor, _norm_gains, _unit


def rotation_form(layer: CanonicalLayer) -> Form:
    """The reference script's view: raw matrices, every head's Q, K, V, O unit-normalised
    separately (K/V repeated to query heads), MLP matrices and norm vectors normalised whole."""
    s = layer.sym
    gidx = torch.arange(s.n_heads, device=layer.W_Q.device) // s.group_size

    def per_head(W: Tensor) -> Tensor:
        return W / fro(W, keep=1).clamp_min(EPS)[:, None, None]

    gains, _ = _norm_gains(layer, exact=False)
    return Form(sym=s, H=s.d_model, Q=per_head(layer.W_Q), K=per_head(layer.W_K[gidx]),
                V=per_head(layer.W_V[gidx]), O=per_head(layer.W_O), U=_unit(layer.W_up),
                D=_unit(layer.W_down), G=None if layer.W_gate is None else _unit(layer.W_gate),
                gains=gains)


def _head_rotations(fa: Form, fb: Form) -> Tensor:
    """One O(d_head) per query head tying Q/K/V/O, (n_heads, d_head, d_head): R_h = polar(Σ B Aᵀ)."""
    t = lambda X: X.transpose(-1, -2)  # noqa: E731
    return polar(fb.Q @ t(fa.Q) + fb.K @ t(fa.K) + fb.V @ t(fa.V) + t(fb.O) @ fa.O)


def rotation_compare(fa: Form, fb: Form, fit: bool = True) -> dict[str, float]:
    """Per-family residuals with one O(d_head) rotation per query head (R_h = polar(Σ B Aᵀ),
    orientation corrected) and one O(d_ff) rotation of the MLP units; the mean over heads is
    reported for q/k/v/o, as the reference does. ``fit=False`` gives the raw distances."""
    if fa.mlp_rot is not None or fb.mlp_rot is not None:
        raise ValueError("rotation_compare needs eagerly rotated forms (rotate_residual(R))")
    Qa, Ka, Va, Oa = fa.Q, fa.K, fa.V, fa.O
    if fit:
        R = _head_rotations(fa, fb)
        Qa, Ka, Va, Oa = R @ Qa, R @ Ka, R @ Va, Oa @ R.transpose(-1, -2)
    hn = lambda X, Y: fro(X - Y, keep=1).mean()  # noqa: E731
    out = {"q_proj": float(hn(Qa, fb.Q)), "k_proj": float(hn(Ka, fb.K)),
           "v_proj": float(hn(Va, fb.V)), "o_proj": float(hn(Oa, fb.O))}
    As = ([fa.G] if fa.G is not None else []) + [fa.U, fa.D.T]
    Bs = ([fb.G] if fb.G is not None else []) + [fb.U, fb.D.T]
    aligned = procrustes_thin(As, Bs) if fit else As
    names = (["gate_proj"] if fa.G is not None else []) + ["up_proj", "down_proj"]
    for name, a, b in zip(names, aligned, Bs):
        out[name] = float(fro(a - b))
    for name, g in fa.gains.items():
        out[name] = float(fro(g - fb.gains[name]))
    return out



class RotationComparison:
    """A comparison without a large assignment: all of it happens in ``finish``."""

    assignment = None

    def __init__(self, fa: Form, fb: Form, fit: bool):
        self.fa, self.fb, self.fit = fa, fb, fit

    def prepare(self) -> None:
        pass

    def finish(self, answer: None = None) -> dict[str, float]:
        out = rotation_compare(self.fa, self.fb, fit=self.fit)
        self.fa = self.fb = None
        return out


@dataclass
class RotationAlignment:
    """What ``rotation`` fits between layer A and layer B, as something to apply to A.

    ``head`` (n_heads, d_head, d_head): Q_h ← R_h Q_h, O_h ← O_h R_hᵀ per query head; K and V
    are shared by a KV group, so they get the rotation nearest the group's (polar of Σ_h R_h;
    R_h itself when heads are not grouped). ``mlp`` (d_ff, d_ff): units ← R units. Neither is
    a symmetry of the model (RoPE and the MLP's nonlinearity do not commute with them), so
    ``apply`` changes what the layer computes: ``function_preserving`` is False. ``raw``'s
    alignment is the identity (``head`` and ``mlp`` None)."""

    head: Tensor | None
    mlp: Tensor | None
    function_preserving: bool = False

    def apply(self, layer: CanonicalLayer) -> CanonicalLayer:
        """``layer`` (A) rotated towards B, as a new float64 layer."""
        L = layer.map(lambda t: t.double())
        if self.head is None:
            return L
        s = L.sym
        R = self.head.double()
        Rg = polar(R.reshape(s.n_kv_heads, s.group_size, *R.shape[1:]).sum(1))  # (n_kv, dh, dh)
        L.W_Q, L.W_O = R @ L.W_Q, L.W_O @ R.transpose(-1, -2)
        L.W_K, L.W_V = Rg @ L.W_K, Rg @ L.W_V
        for name, M in (("b_Q", R), ("b_K", Rg), ("b_V", Rg)):
            b = getattr(L, name)
            if b is not None:
                setattr(L, name, (M @ b[..., None])[..., 0])
        S = self.mlp.double()
        for name in ("W_gate", "W_up", "b_gate", "b_up"):
            if getattr(L, name) is not None:
                setattr(L, name, S @ getattr(L, name))
        L.W_down = L.W_down @ S.T
        return L


def _full_procrustes(As: list[Tensor], Bs: list[Tensor]) -> Tensor:
    """The (n, n) orthogonal R of :func:`~drift.align.procrustes_thin`, completed on the
    complement of A's column span (where the fit says nothing) by matching complements."""
    A, B = torch.cat(As, dim=-1), torch.cat(Bs, dim=-1)  # (n, p)
    n, p = A.shape
    if p >= n:
        return polar(B @ A.T)
    Qa, Ra = torch.linalg.qr(A, mode="complete")
    Qb, Rb = torch.linalg.qr(B, mode="complete")
    core = torch.eye(n, dtype=A.dtype)
    core[:p, :p] = polar(Rb[:p] @ Ra[:p].T)
    return Qb @ core @ Qa.T


def fit_rotation(layer_a: CanonicalLayer, layer_b: CanonicalLayer, fit: bool = True) -> RotationAlignment:
    """``rotation``'s fitted rotations of layer A onto layer B (float64); ``fit=False``: ``raw``."""
    if not fit:
        return RotationAlignment(None, None)
    fa, fb = (rotation_form(L.map(lambda t: t.double())) for L in (layer_a, layer_b))
    R = _head_rotations(fa, fb)
    As = ([fa.G] if fa.G is not None else []) + [fa.U, fa.D.T]
    Bs = ([fb.G] if fb.G is not None else []) + [fb.U, fb.D.T]
    return RotationAlignment(R, _full_procrustes(As, Bs))

