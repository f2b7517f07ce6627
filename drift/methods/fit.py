"""The exact method's fit as a group element: ``fit(a, b).apply(a)`` is layer A moved into
layer B's coordinates, computing exactly what A computes.

The element is ``g = c_B⁻¹ ∘ k ∘ c_A``. ``c_L`` (:class:`Canonicaliser`) is the part of a
layer's canonicalisation that is a gauge element, recorded as a list of
:mod:`drift.gauge` transforms with their inverses, in the order :func:`exact_form` removes
them:

1. pre-norm gains folded into their readers (γ becomes 1; for LayerNorm β becomes 0 and
   moves into the reader biases). BERT's post-LN gains also scale the residual stream
   itself, so they are genuine parameters and stay;
2. LayerNorm only: each reader's component along the norm's null direction removed, and
   the writers centred (every reader of the residual is a LayerNorm, which removes means);
3. the key bias on non-rotary dims and the value bias (into b_O) made 0, as seen through
   the norm;
4. Gemma2's free output scales of O and D set to 1 (measured by invariants);
5. QK balanced: per RoPE pair and KV group (a complex scale), GL-balanced on non-rotary
   dims, or, under q/k-norm, heads scaled to 1 and the pair gains traded into balance;
6. VO GL-balanced per KV group; GLU units balanced between up and down.

The per-family unit normalisation of a form is not a gauge element and is not applied.
``k`` is what :class:`~drift.methods.exact.ExactComparison` fitted between the two
canonical forms: the GQA-respecting head permutation, a phase per RoPE pair and group (or
q/k-norm's pair swaps and signs), an O(d_p) per group on non-rotary dims, an O(d_head) per
group on VO, the MLP unit permutation and GLU signs. Every step is a transform of
:mod:`drift.gauge`, so ``apply`` preserves the layer's function by construction; when A is
an exact gauge of B it reproduces B.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import numpy as np
import torch

from .. import gauge
from ..align import gl_balancer
from ..assign import lap
from ..canonical import CanonicalLayer, LayerSymmetry
from ..errors import UnsupportedArchitectureError
from .exact import ExactComparison, _fold, not_exact
from .form import EPS, Form, _complex_pairs, _group_stack, _norm_gains, _unit, pair_gain_trade, qk_pair_scale

Tensor = torch.Tensor
Transform = Callable[[CanonicalLayer], CanonicalLayer]


def unsupported(sym: LayerSymmetry) -> str | None:
    """Why ``fit`` cannot build the applicable element for layers of ``sym``, or None: every
    architecture of the registry is covered, but not every MLP activation (:func:`not_exact`)."""
    return not_exact(sym)


@dataclass
class Step:
    """One gauge transform of a canonicalisation, and the transform that undoes it."""

    name: str
    forward: Transform
    inverse: Transform


@dataclass
class Canonicaliser:
    """The gauge part of one layer's canonicalisation (float64), as transforms in order."""

    steps: list[Step] = field(default_factory=list)

    def apply(self, layer: CanonicalLayer) -> CanonicalLayer:
        for step in self.steps:
            layer = step.forward(layer)
        return layer

    def undo(self, layer: CanonicalLayer) -> CanonicalLayer:
        for step in reversed(self.steps):
            layer = step.inverse(layer)
        return layer

    @classmethod
    def of(cls, layer: CanonicalLayer) -> "Canonicaliser":
        return cls.made(layer)[0]

    @classmethod
    def made(cls, layer: CanonicalLayer) -> tuple["Canonicaliser", CanonicalLayer]:
        """The canonicaliser of ``layer`` and the canonical layer it makes (float64)."""
        c = cls()
        L = layer.map(lambda t: t.double())
        for stage in (_gain_steps, _mean_steps, _bias_steps, _output_steps, _qk_steps, _vo_glu_steps):
            for step in stage(L):  # each stage reads the layer as the previous stages left it
                c.steps.append(step)
                L = step.forward(L)
        return c, L


def _gain_steps(L: CanonicalLayer) -> list[Step]:
    """Pre-norm gains folded into their readers (γ ← 1, and β ← 0 for LayerNorm)."""
    s, steps = L.sym, []
    if s.post_ln:
        return steps
    for role in ("attn_in", "mlp_in"):
        g, beta = L.norms[role]
        shift = None if beta is None else -beta / g  # β/γ + shift = 0
        undo = None if shift is None else -shift * g
        steps.append(Step(f"norm_fold {role}", partial(gauge.norm_fold, role=role, c=1.0 / g, shift=shift),
                          partial(gauge.norm_fold, role=role, c=g, shift=undo)))
    return steps


def _mean_steps(L: CanonicalLayer) -> list[Step]:
    """LayerNorm: each reader's part along the norm's null direction removed (W diag(γ) ⊥ 1),
    and the writers centred."""
    if L.sym.norm_kind != "layer":
        return []
    steps = []
    for role, names in (("attn_in", ("W_Q", "W_K", "W_V")), ("mlp_in", ("W_gate", "W_up"))):
        g = L.norms[role][0]
        vs = {n: -(getattr(L, n) * g).mean(-1) for n in names if getattr(L, n) is not None}
        steps.append(Step(f"reader_mean_null {role}", partial(gauge.reader_mean_null, role=role, vs=vs),
                          partial(gauge.reader_mean_null, role=role, vs={n: -v for n, v in vs.items()})))
    shifts = dict(v_o=-L.W_O.mean(1), t_o=-float(L.b_O.mean()), v_down=-L.W_down.mean(0),
                  t_down=-float(L.b_down.mean()))
    steps.append(Step("writer_center_shift", partial(gauge.writer_center_shift, **shifts),
                      partial(gauge.writer_center_shift, **{k: -v for k, v in shifts.items()})))
    return steps


def _effective_bias(L: CanonicalLayer, W: Tensor, b: Tensor) -> Tensor:
    """A reader's bias as the norm's output sees it: b + W β (β of attn_in; 0 after a fold)."""
    beta = L.norms["attn_in"][1]
    return b if beta is None else b + W @ beta


def _bias_steps(L: CanonicalLayer) -> list[Step]:
    """The key bias on non-rotary dims and the value bias made 0 (as exact_form drops them)."""
    s, steps = L.sym, []
    rd = s.rotary_dims
    for g in range(s.n_kv_heads):
        if L.b_K is not None and rd < s.d_head:
            d = -_effective_bias(L, L.W_K[g], L.b_K[g])[rd:]
            steps.append(Step(f"key_bias_shift {g}", partial(gauge.key_bias_shift, g=g, delta=d),
                              partial(gauge.key_bias_shift, g=g, delta=-d)))
        if L.b_V is not None and L.b_O is not None:
            d = -_effective_bias(L, L.W_V[g], L.b_V[g])
            steps.append(Step(f"value_bias_fold {g}", partial(gauge.value_bias_fold, g=g, delta=d),
                              partial(gauge.value_bias_fold, g=g, delta=-d)))
    return steps


def _output_steps(L: CanonicalLayer) -> list[Step]:
    """Gemma2's sandwich norms: the output scales of O and D, measured by invariants, made 1."""
    s = L.sym
    if not s.post_norms:
        return []
    f = _fold(L)
    gidx = torch.arange(s.n_heads) // s.group_size
    s_o = float(torch.einsum("hxd,hdp->hxp", f["O"], f["V"][gidx]).norm())  # ‖O V‖: VO-GL invariant
    s_d = float((f["D"].norm(dim=0) * f["U"].norm(dim=1)).sum())  # invariant under unit scales
    return [Step("output_scale", partial(gauge.output_scale, c_o=1.0 / s_o, c_down=1.0 / s_d),
                 partial(gauge.output_scale, c_o=s_o, c_down=s_d))]


def _qk_matrix(sym: LayerSymmetry, pair: Tensor | None, rest: Tensor | None) -> Tensor:
    """(d_head, d_head) map of Q rows: the complex scalars ``pair`` (m,) on RoPE pairs (i, i+m),
    the matrix ``rest`` (d_p, d_p) on the non-rotary dims; identity where None."""
    rd, m = sym.rotary_dims, sym.rope_pairs
    M = torch.eye(sym.d_head, dtype=torch.float64)
    if pair is not None and m:
        c = pair.to(torch.complex128)
        i = torch.arange(m)
        M[i, i], M[i, i + m], M[i + m, i], M[i + m, i + m] = c.real, -c.imag, c.imag, c.real
    if rest is not None and rd < sym.d_head:
        M[rd:, rd:] = rest.double()
    return M


def _qk_steps(L: CanonicalLayer) -> list[Step]:
    s = L.sym
    r, rd = s.group_size, s.rotary_dims
    f = _fold(L)
    Q, K = f["Q"], f["K"]
    if s.qk_norm:  # as exact_form and _norm_gains: unit heads, balanced pair gains
        nq, nk = Q.flatten(1).norm(dim=1), K.flatten(1).norm(dim=1)
        c = pair_gain_trade(L.norms["q_norm"][0], L.norms["k_norm"][0], s)
        return [Step("qwen3_head_scale", partial(gauge.qwen3_head_scale, c_q=1.0 / nq, c_k=1.0 / nk),
                     partial(gauge.qwen3_head_scale, c_q=nq, c_k=nk)),
                Step("qwen3_gain_trade", partial(gauge.qwen3_gain_trade, c=c),
                     partial(gauge.qwen3_gain_trade, c=1.0 / c))]
    scale = qk_pair_scale(_complex_pairs(Q, s), _complex_pairs(K, s), s) if rd else None  # (n_kv, m)
    rest = gl_balancer(_group_stack(Q[:, rd:], r), K[:, rd:])[0] if rd < s.d_head else None  # (n_kv, d_p, d_p)
    steps = []
    for g in range(s.n_kv_heads):
        M = _qk_matrix(s, None if scale is None else scale[g], None if rest is None else rest[g])
        steps.append(Step(f"qk_gauge {g}", partial(gauge.qk_gauge, g=g, M=M),
                          partial(gauge.qk_gauge, g=g, M=torch.linalg.inv(M))))
    return steps


def _vo_glu_steps(L: CanonicalLayer) -> list[Step]:
    s = L.sym
    f = _fold(L)
    vo, _ = gl_balancer(f["V"], _group_stack(f["O"].transpose(-1, -2), s.group_size))
    steps = [Step(f"vo_gauge {g}", partial(gauge.vo_gauge, g=g, G=vo[g]),
                  partial(gauge.vo_gauge, g=g, G=torch.linalg.inv(vo[g]))) for g in range(s.n_kv_heads)]
    if s.is_glu:
        k = (f["D"].norm(dim=0).clamp_min(EPS) / f["U"].norm(dim=1).clamp_min(EPS)).sqrt()
        steps.append(Step("glu_unit_scale", partial(gauge.glu_unit_scale, c=k),
                          partial(gauge.glu_unit_scale, c=1.0 / k)))
    return steps


@dataclass
class ExactAlignment:
    """The group element that moves layer A onto layer B (see the module docstring)."""

    a: Canonicaliser
    b: Canonicaliser
    head_perm: np.ndarray  # B's head h is A's head head_perm[h]
    qk_phase: Tensor | None  # (n_kv, m) complex, on the permuted heads (None without RoPE)
    qk_rotation: Tensor | None  # (n_kv, d_p, d_p) on the non-rotary dims (None with full RoPE)
    vo_rotation: Tensor  # (n_kv, d_head, d_head)
    mlp_perm: np.ndarray  # B's unit j is A's unit mlp_perm[j]
    mlp_sign: np.ndarray  # (d_ff,) GLU signs (ones for a plain MLP)
    function_preserving: bool = True

    def apply(self, layer: CanonicalLayer) -> CanonicalLayer:
        """``layer`` (A) in B's coordinates: the same function, as a new float64 layer."""
        s = layer.sym
        L = self.a.apply(layer.map(lambda t: t.double()))
        L = gauge.permute_heads(L, self.head_perm)  # the fitted compact part, in B's order
        L = gauge.permute_mlp(L, self.mlp_perm)
        phase = None if self.qk_phase is None else self.qk_phase.to(torch.complex128)
        if s.qk_norm:  # phase = i^t · sign: the layer-wide pair swaps (gains too), then signs
            swapped = phase[0].imag != 0
            L = gauge.qwen3_pair_swap(L, torch.nonzero(swapped).flatten())
            phase = phase / torch.where(swapped, 1j, 1.0 + 0j)
        for g in range(s.n_kv_heads):
            M = _qk_matrix(s, None if phase is None else phase[g],
                           None if self.qk_rotation is None else self.qk_rotation[g])
            L = gauge.qk_gauge(L, g, M)
            L = gauge.vo_gauge(L, g, self.vo_rotation[g].double())
        if s.is_glu:
            L = gauge.glu_unit_scale(L, torch.as_tensor(self.mlp_sign, dtype=torch.float64))
        return self.b.undo(L)


def _balanced_form(C: CanonicalLayer) -> Form:
    """The exact form of a layer its canonicaliser has already balanced: the fold and the
    unit normalisation only. The compact part is then fitted in the canonicaliser's own
    coordinates; balancing again (as :func:`exact_form` does) could choose other signs of
    the SVD it balances with, and the fit would not compose with the canonicaliser."""
    f = _fold(C)
    gains, pair_gains = _norm_gains(C, exact=True)
    unit = {k: None if v is None else _unit(v) for k, v in f.items()}
    return Form(sym=C.sym, H=C.sym.d_model, Q=unit["Q"], K=unit["K"], V=unit["V"], O=unit["O"], U=unit["U"],
                D=unit["D"], G=unit["G"], gains=gains, pair_gains=pair_gains)


def fit(layer_a: CanonicalLayer, layer_b: CanonicalLayer) -> ExactAlignment:
    """The exact method's alignment of layer A onto layer B, fitted in float64."""
    why = unsupported(layer_a.sym)
    if why:
        raise UnsupportedArchitectureError(why)
    (ca, A), (cb, B) = Canonicaliser.made(layer_a), Canonicaliser.made(layer_b)
    c = ExactComparison(_balanced_form(A), _balanced_form(B))
    sigma = lap(c.assignment, maximize=True)
    c.prepare()
    c.finish(sigma)
    sign = c.mlp_sign if layer_a.sym.is_glu else np.ones(len(sigma))
    rec = c.record
    return ExactAlignment(ca, cb, np.asarray(c.head_perm),
                          rec.get("qk_phase"), rec.get("qk_rotation"), rec["vo_rotation"],
                          np.asarray(sigma), np.asarray(sign))
