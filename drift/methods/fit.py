"""The exact method's fit as a group element: ``fit(a, b).apply(a)`` is layer A moved into
layer B's coordinates, computing exactly what A computes.

The element is ``g = c_B⁻¹ ∘ k ∘ c_A``: ``c_L`` is the part of a layer's canonicalisation
that is a gauge element (norm gains folded into their readers, QK balanced per RoPE pair
and KV group, VO GL-balanced per KV group, GLU units balanced between up and down; the
per-family unit normalisation is not one and is not applied), and ``k`` is what the
comparison fitted between the two canonical forms (the GQA-respecting head permutation, a
phase per RoPE pair and group, an O(d_head) per group on VO, the MLP unit permutation and
GLU signs). Every step is a transform of :mod:`drift.gauge`, so ``apply`` preserves the
layer's function by construction; when A is an exact gauge of B it reproduces B.

So far for the architectures whose exact group is RMSNorm pre-norm, full RoPE, no q/k-norm
and no sandwich norms (llama, mistral, qwen2, phi3 with full rotary dims); others are
refused by name (:func:`unsupported`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import gauge
from ..align import gl_balancer
from ..assign import lap
from ..canonical import CanonicalLayer, LayerSymmetry
from ..errors import DriftError
from .exact import ExactComparison, exact_form
from .form import EPS, _group_stack

Tensor = torch.Tensor


def unsupported(sym: LayerSymmetry) -> str | None:
    """Why ``fit`` cannot (yet) build the applicable element for layers of ``sym``, or None."""
    why = []
    if sym.norm_kind != "rms":
        why.append("LayerNorm (bias folds, mean projections)")
    if sym.post_ln or sym.post_norms:
        why.append("post-norms")
    if sym.qk_norm:
        why.append("q/k-norm")
    if not sym.rope or sym.rotary_dims != sym.d_head:
        why.append("non-rotary head dims")
    return None if not why else f"{sym.arch}: {', '.join(why)}"


@dataclass
class Canonicaliser:
    """The gauge part of one layer's canonicalisation (float64)."""

    gains: dict[str, Tensor]  # role -> γ (folded into the readers: γ becomes 1)
    qk_scale: Tensor  # (n_kv, m): zq ← zq·s, zk ← zk / s
    vo: Tensor  # (n_kv, d_head, d_head): V ← G V, O ← O G⁻¹
    glu: Tensor | None  # (d_ff,): up row × k, down column / k

    @classmethod
    def of(cls, layer: CanonicalLayer) -> "Canonicaliser":
        s = layer.sym
        L = layer.map(lambda t: t.double())
        gains = {role: L.norms[role][0] for role in ("attn_in", "mlp_in")}
        for role, g in gains.items():
            L = gauge.norm_fold(L, role, 1.0 / g)
        Q, K, V = (_aug(getattr(L, w), getattr(L, b)) for w, b in (("W_Q", "b_Q"), ("W_K", "b_K"), ("W_V", "b_V")))
        m, r = s.rope_pairs, s.group_size
        nq = (Q[:, :m] ** 2 + Q[:, m:2 * m] ** 2).sum(-1).reshape(s.n_kv_heads, r, m).sum(1)  # (nkv, m)
        nk = (K[:, :m] ** 2 + K[:, m:2 * m] ** 2).sum(-1)
        qk_scale = (nk.clamp_min(EPS) / nq.clamp_min(EPS)) ** 0.25
        vo, _ = gl_balancer(V, _group_stack(L.W_O.transpose(-1, -2), r))
        glu = None
        if s.is_glu:
            U = _aug(L.W_up, L.b_up)
            glu = (L.W_down.norm(dim=0).clamp_min(EPS) / U.norm(dim=1).clamp_min(EPS)).sqrt()
        return cls(gains, qk_scale, vo, glu)


def _aug(W: Tensor, b: Tensor | None) -> Tensor:
    return W if b is None else torch.cat([W, b[..., None]], dim=-1)


def _pair_matrix(c: Tensor, m: int) -> Tensor:
    """(d_head, d_head) real matrix of z_i ← c_i z_i on rows (i, i + m) (complex c, (m,))."""
    cr, ci = c.real.double(), c.imag.double()
    M = torch.zeros(2 * m, 2 * m, dtype=torch.float64)
    i = torch.arange(m)
    M[i, i], M[i, i + m], M[i + m, i], M[i + m, i + m] = cr, -ci, ci, cr
    return M


@dataclass
class ExactAlignment:
    """The group element that moves layer A onto layer B (see the module docstring)."""

    a: Canonicaliser
    b: Canonicaliser
    head_perm: np.ndarray  # B's head h is A's head head_perm[h]
    qk_phase: Tensor  # (n_kv, m) complex, on the permuted heads
    vo_rotation: Tensor  # (n_kv, d_head, d_head)
    mlp_perm: np.ndarray  # B's unit j is A's unit mlp_perm[j]
    mlp_sign: np.ndarray  # (d_ff,) GLU signs (ones for a plain MLP)
    function_preserving: bool = True

    def apply(self, layer: CanonicalLayer) -> CanonicalLayer:
        """``layer`` (A) in B's coordinates: the same function, as a new float64 layer."""
        s = layer.sym
        m, ca, cb = s.rope_pairs, self.a, self.b
        L = layer.map(lambda t: t.double())
        for role, g in ca.gains.items():  # A's gains folded into its readers
            L = gauge.norm_fold(L, role, 1.0 / g)
        for g in range(s.n_kv_heads):  # A's balance, in A's groups
            L = gauge.qk_gauge(L, g, _pair_matrix(ca.qk_scale[g].to(torch.complex128), m))
            L = gauge.vo_gauge(L, g, ca.vo[g])
        if ca.glu is not None:
            L = gauge.glu_unit_scale(L, ca.glu)
        L = gauge.permute_heads(L, self.head_perm)  # the fitted compact part, in B's order
        L = gauge.permute_mlp(L, self.mlp_perm)
        for g in range(s.n_kv_heads):
            L = gauge.qk_gauge(L, g, _pair_matrix(self.qk_phase[g].to(torch.complex128), m))
            L = gauge.vo_gauge(L, g, self.vo_rotation[g].double())
            # B's balance undone
            L = gauge.qk_gauge(L, g, _pair_matrix((1.0 / cb.qk_scale[g]).to(torch.complex128), m))
            L = gauge.vo_gauge(L, g, torch.linalg.inv(cb.vo[g]))
        if cb.glu is not None:
            L = gauge.glu_unit_scale(L, torch.as_tensor(self.mlp_sign, dtype=torch.float64) / cb.glu)
        for role, g in cb.gains.items():  # B's gains unfolded
            L = gauge.norm_fold(L, role, g)
        return L


def fit(layer_a: CanonicalLayer, layer_b: CanonicalLayer) -> ExactAlignment:
    """The exact method's alignment of layer A onto layer B, fitted in float64."""
    why = unsupported(layer_a.sym)
    if why:
        raise DriftError(f"an applicable exact alignment is not implemented yet for {why}")
    fa, fb = (exact_form(L.map(lambda t: t.double())) for L in (layer_a, layer_b))
    c = ExactComparison(fa, fb)
    sigma = lap(c.assignment, maximize=True)
    c.prepare()
    c.finish(sigma)
    sign = c.mlp_sign if layer_a.sym.is_glu else np.ones(len(sigma))
    return ExactAlignment(Canonicaliser.of(layer_a), Canonicaliser.of(layer_b), np.asarray(c.head_perm),
                          c.record["qk_phase"], c.record["vo_rotation"], np.asarray(sigma), np.asarray(sign))
