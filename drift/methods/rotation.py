"""``rotation``: the reference script's semantics with the Procrustes orientation corrected:
one O(d_head) rotation per *query head* tying Q/K/V/O, one O(d_ff) rotation of the MLP units,
raw norm vectors. Neither rotation is a symmetry of the model: approximate, labelled so.
``raw`` is the same comparison with the identity in place of every fitted rotation.
"""

from __future__ import annotations

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


def rotation_compare(fa: Form, fb: Form, fit: bool = True) -> dict[str, float]:
    """Per-family residuals with one O(d_head) rotation per query head (R_h = polar(Σ B Aᵀ),
    orientation corrected) and one O(d_ff) rotation of the MLP units; the mean over heads is
    reported for q/k/v/o, as the reference does. ``fit=False`` gives the raw distances."""
    if fa.mlp_rot is not None or fb.mlp_rot is not None:
        raise ValueError("rotation_compare needs eagerly rotated forms (rotate_residual(R))")
    Qa, Ka, Va, Oa = fa.Q, fa.K, fa.V, fa.O
    if fit:
        t = lambda X: X.transpose(-1, -2)  # noqa: E731
        M = fb.Q @ t(Qa) + fb.K @ t(Ka) + fb.V @ t(Va) + t(fb.O) @ Oa  # (nh, dh, dh)
        R = polar(M)
        Qa, Ka, Va, Oa = R @ Qa, R @ Ka, R @ Va, Oa @ t(R)
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
