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

So far for the architectures whose exact group is RMSNorm pre-norm with full RoPE and no
post-LN (llama, mistral, qwen2, gemma, phi3 with full rotary dims; qwen3 with its q/k-norm:
head scales, pair swaps, signs and gain trades in place of the pair balance and phases;
gemma2 with its sandwich norms: the output scales of O and D); others are refused by name
(:func:`unsupported`).
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
from .form import EPS, _aug, _complex_pairs, _group_stack, pair_gain_trade, qk_pair_scale

Tensor = torch.Tensor


def unsupported(sym: LayerSymmetry) -> str | None:
    """Why ``fit`` cannot (yet) build the applicable element for layers of ``sym``, or None."""
    why = []
    if sym.norm_kind != "rms":
        why.append("LayerNorm (bias folds, mean projections)")
    if sym.post_ln:
        why.append("post-LN")
    if not sym.rope or sym.rotary_dims != sym.d_head:
        why.append("non-rotary head dims")
    return None if not why else f"{sym.arch}: {', '.join(why)}"


@dataclass
class Canonicaliser:
    """The gauge part of one layer's canonicalisation (float64)."""

    gains: dict[str, Tensor]  # role -> γ (folded into the readers: γ becomes 1)
    qk_scale: Tensor | None  # (n_kv, m): zq ← zq·s, zk ← zk / s (not under q/k-norm)
    vo: Tensor  # (n_kv, d_head, d_head): V ← G V, O ← O G⁻¹
    glu: Tensor | None  # (d_ff,): up row × k, down column / k
    output: tuple[float, float] | None = None  # sandwich norms: the scales of O and D (made 1)
    head_norms: tuple[Tensor, Tensor] | None = None  # q/k-norm: ‖Q_h‖, ‖K_g‖ (heads scaled to 1)
    gain_trade: Tensor | None = None  # q/k-norm: (m,) q_norm pair gains × c, k_norm / c

    @classmethod
    def of(cls, layer: CanonicalLayer) -> "Canonicaliser":
        s = layer.sym
        L = layer.map(lambda t: t.double())
        gains = {role: L.norms[role][0] for role in ("attn_in", "mlp_in")}
        for role, g in gains.items():
            L = gauge.norm_fold(L, role, 1.0 / g)
        Q, K, V = (_aug(getattr(L, w), getattr(L, b)) for w, b in (("W_Q", "b_Q"), ("W_K", "b_K"), ("W_V", "b_V")))
        r = s.group_size
        output = None
        if s.post_norms:  # a norm after attention and MLP: their output scales are free (Gemma2)
            gidx = torch.arange(s.n_heads) // r
            s_o = float(torch.einsum("hxd,hdp->hxp", L.W_O, V[gidx]).norm())  # ‖O V‖: VO-GL invariant
            U = _aug(L.W_up, L.b_up)
            s_d = float((L.W_down.norm(dim=0) * U.norm(dim=1)).sum())  # unit-scale invariant
            output = (s_o, s_d)
            L = gauge.output_scale(L, 1.0 / s_o, 1.0 / s_d)
        qk_scale = head_norms = gain_trade = None
        if s.qk_norm:  # as exact_form and _norm_gains: unit heads, balanced pair gains
            head_norms = (Q.flatten(1).norm(dim=1), K.flatten(1).norm(dim=1))
            gain_trade = pair_gain_trade(L.norms["q_norm"][0], L.norms["k_norm"][0], s)
        else:
            qk_scale = qk_pair_scale(_complex_pairs(Q, s), _complex_pairs(K, s), s)
        vo, _ = gl_balancer(V, _group_stack(L.W_O.transpose(-1, -2), r))
        glu = None
        if s.is_glu:
            U = _aug(L.W_up, L.b_up)
            glu = (L.W_down.norm(dim=0).clamp_min(EPS) / U.norm(dim=1).clamp_min(EPS)).sqrt()
        return cls(gains, qk_scale, vo, glu, output, head_norms, gain_trade)


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
        if ca.output is not None:
            L = gauge.output_scale(L, 1.0 / ca.output[0], 1.0 / ca.output[1])
        if s.qk_norm:
            L = gauge.qwen3_head_scale(L, 1.0 / ca.head_norms[0], 1.0 / ca.head_norms[1])
            L = gauge.qwen3_gain_trade(L, ca.gain_trade)
        for g in range(s.n_kv_heads):  # A's balance, in A's groups
            if not s.qk_norm:
                L = gauge.qk_gauge(L, g, _pair_matrix(ca.qk_scale[g].to(torch.complex128), m))
            L = gauge.vo_gauge(L, g, ca.vo[g])
        if ca.glu is not None:
            L = gauge.glu_unit_scale(L, ca.glu)
        L = gauge.permute_heads(L, self.head_perm)  # the fitted compact part, in B's order
        L = gauge.permute_mlp(L, self.mlp_perm)
        phase = self.qk_phase.to(torch.complex128)
        if s.qk_norm:  # phase = i^t · sign: the layer-wide pair swaps (gains too), then signs
            swapped = phase[0].imag != 0
            L = gauge.qwen3_pair_swap(L, torch.nonzero(swapped).flatten())
            phase = phase / torch.where(swapped, 1j, 1.0 + 0j)
        for g in range(s.n_kv_heads):
            L = gauge.qk_gauge(L, g, _pair_matrix(phase[g], m))
            L = gauge.vo_gauge(L, g, self.vo_rotation[g].double())
            # B's balance undone
            if not s.qk_norm:
                L = gauge.qk_gauge(L, g, _pair_matrix((1.0 / cb.qk_scale[g]).to(torch.complex128), m))
            L = gauge.vo_gauge(L, g, torch.linalg.inv(cb.vo[g]))
        if s.qk_norm:
            L = gauge.qwen3_head_scale(L, cb.head_norms[0], cb.head_norms[1])
            L = gauge.qwen3_gain_trade(L, 1.0 / cb.gain_trade)
        if cb.glu is not None:
            L = gauge.glu_unit_scale(L, torch.as_tensor(self.mlp_sign, dtype=torch.float64) / cb.glu)
        if cb.output is not None:
            L = gauge.output_scale(L, cb.output[0], cb.output[1])
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
