"""The two comparison methods, as (per-layer canonical form, per-pair comparison).

``exact`` removes exactly the layer's symmetry group (gauge-spec §2, §4, §7):

1. *Per layer* (:func:`exact_form`), gauges with a canonical representative are removed:
   norm gains folded into their readers; for LayerNorm models the reader null direction
   projected out, writers centred, b_K dropped on non-rotary dims and b_V folded into b_O;
   QK balanced per RoPE pair (or per head for Qwen3's q/k-norm, or GL-balanced on non-rotary
   dims); VO GL-balanced per KV group; GLU units balanced between up and down. What is left
   is a compact group (phases, signs, O(d), permutations), fitted per pair.
2. *Per pair* (:func:`exact_compare`): heads are matched on gauge-invariant circuit costs
   (two-level assignment that respects GQA groups); then the compact residual gauge is fitted
   in closed form; MLP units are matched by one assignment.

``rotation`` is the reference script's semantics with the Procrustes orientation corrected:
one O(d_head) rotation per *query head* tying Q/K/V/O, one O(d_ff) rotation of the MLP units,
raw norm vectors. Neither rotation is a symmetry of the model: approximate, labelled so.
``raw`` is ``rotation`` with the identity in place of every fitted rotation.

Every family matrix is Frobenius-normalised to 1 per layer, so that residuals lie in
[0, 2] and unrelated, unaligned matrices sit near sqrt(2).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch

from .align import BlockCost, balance_gl, fro, lap, match_heads, polar, procrustes_thin, release_memory
from .canonical import CanonicalLayer, LayerSymmetry, rope_pair_index

Tensor = torch.Tensor
EPS = 1e-12

METHODS = ("exact", "rotation", "raw")


def _unit(x: Tensor) -> Tensor:
    return x / fro(x).clamp_min(EPS)


def _unit_(x: Tensor) -> Tensor:
    """In place, for tensors this module just made."""
    return x.div_(fro(x).clamp_min(EPS))


def _aug(W: Tensor, b: Tensor | None) -> Tensor:
    """[W | b]: the bias as one more input column (input [x; 1])."""
    return W if b is None else torch.cat([W, b[..., None]], dim=-1)


@dataclass
class Form:
    """A layer prepared for comparison. Readers keep the residual axis last; ``H`` counts the
    residual columns (an extra bias column, where present, is not rotated by the null)."""

    sym: LayerSymmetry
    method: str
    H: int
    Q: Tensor  # (n_heads, d_head, P)   [rotation/raw: per query head]
    K: Tensor  # (n_kv, d_head, P)      [rotation/raw: (n_heads, ...) expanded]
    V: Tensor  # (n_kv, d_head, P_v)
    O: Tensor  # (n_heads, H, d_head)
    U: Tensor  # (d_ff, P_m)
    D: Tensor  # (H, d_ff)
    G: Tensor | None = None  # (d_ff, P_m)
    gains: dict[str, Tensor] = field(default_factory=dict)
    pair_gains: tuple[str, ...] = ()  # gains permuted by RoPE pair under the null (q/k-norm)
    mlp_rot: Tensor | None = None  # a residual rotation still to be applied to G, U, D (lazy)

    def rotate_residual(self, R: Tensor, lazy_mlp: bool = False) -> "Form":
        """The structure-preserving null partner: readers W ← W Rᵀ, writers W ← R W.

        ``lazy_mlp``: leave G, U and D as they are and record R in ``mlp_rot``; the MLP code
        of ``exact`` (:func:`mlp_rows`, :func:`mlp_down_cols`) rotates the blocks of units it
        reads, so the null holds no rotated copy of the largest matrices (4B: 0.3 GB)."""
        if self.mlp_rot is not None:
            raise ValueError("this form already carries a lazy residual rotation")
        H = self.H

        def rd(W: Tensor | None) -> Tensor | None:
            if W is None:
                return None
            if W.shape[-1] == H:
                return W @ R.T
            return torch.cat([W[..., :H] @ R.T, W[..., H:]], dim=-1)  # bias column stays

        if lazy_mlp:
            return replace(self, Q=rd(self.Q), K=rd(self.K), V=rd(self.V), O=R @ self.O, mlp_rot=R)
        return replace(self, Q=rd(self.Q), K=rd(self.K), V=rd(self.V), G=rd(self.G), U=rd(self.U),
                       O=R @ self.O, D=R @ self.D)

    def shuffle_gains(self, gen: torch.Generator) -> "Form":
        """Permutation null for gain vectors (whose entries sit near 1, gauge-spec §5 (ii))."""
        gains = {}
        for name, g in self.gains.items():
            if name in self.pair_gains:
                m = g.shape[0] // 2
                p = torch.randperm(m, generator=gen).to(g.device)
                gains[name] = torch.cat([g[:m][p], g[m:][p]])
            else:
                gains[name] = g[torch.randperm(g.shape[0], generator=gen).to(g.device)]
        return replace(self, gains=gains)


# =========================================================================== exact

def _fold(layer: CanonicalLayer, consume: bool = False) -> dict[str, Tensor | None]:
    """Fold pre-norm gains into readers; for LayerNorm models also project out the reader
    null direction, fold β into reader biases, centre writers, drop b_K on non-rotary dims
    and fold b_V into b_O. Returns augmented reader matrices Q, K, V, G, U and writers O, D.
    ``consume``: let go of each of the layer's weight matrices once it is used."""
    s = layer.sym

    def take(name: str) -> Tensor | None:
        t = getattr(layer, name)
        if consume:
            setattr(layer, name, None)
        return t

    H = s.d_model
    gam_a, beta_a = layer.norms["attn_in"]
    gam_m, beta_m = layer.norms["mlp_in"]
    layer_norm = s.norm_kind == "layer"

    def reader(W: Tensor | None, b: Tensor | None, gam: Tensor, beta: Tensor | None):
        if W is None:
            return None, None
        Wf = W * gam  # W diag(γ)
        if layer_norm:
            b = (b if b is not None else 0) + W @ beta
            Wf = Wf - Wf.mean(-1, keepdim=True)  # W diag(γ) (I − 11ᵀ/H): LN output ⊥ 1
        return Wf, b

    Q, bQ = reader(take("W_Q"), layer.b_Q, gam_a, beta_a)
    K, bK = reader(take("W_K"), layer.b_K, gam_a, beta_a)
    V, bV = reader(take("W_V"), layer.b_V, gam_a, beta_a)
    G, bG = reader(take("W_gate"), layer.b_gate, gam_m, beta_m)
    U, bU = reader(take("W_up"), layer.b_up, gam_m, beta_m)
    O, D = take("W_O"), take("W_down")
    if layer_norm:  # every reader of the residual is a LayerNorm: writers' means are invisible
        O = O - O.mean(-2, keepdim=True)
        D = D - D.mean(-2, keepdim=True)
    if bK is not None and s.rotary_dims < s.d_head:  # key-bias translation on non-rotary dims
        bK = bK.clone()
        bK[:, s.rotary_dims:] = 0
    if bV is not None and layer.b_O is not None:  # b_V folds into b_O (softmax weights sum to 1)
        bV = None
    return dict(Q=_aug(Q, bQ), K=_aug(K, bK), V=_aug(V, bV), G=None if G is None else _aug(G, bG),
                U=_aug(U, bU), O=O, D=D)


def _complex_pairs(W: Tensor, sym: LayerSymmetry) -> Tensor:
    """Rows (i, i+m) of each head as z_i = W[i] + i·W[i+m]: (..., d_head, P) -> (..., m, P)."""
    return torch.complex(*_halves(W, sym))


def _from_complex(z: Tensor, W: Tensor, sym: LayerSymmetry) -> Tensor:
    i, j = rope_pair_index(sym)
    out = W.clone()
    out[..., i, :], out[..., j, :] = z.real, z.imag
    return out


def _halves(W: Tensor, sym: LayerSymmetry) -> tuple[Tensor, Tensor]:
    """The real and imaginary parts of :func:`_complex_pairs` as views, without copies: the
    RoPE pairs (i, i + m) of ``rotate_half`` are the head's rows :m and m:2m."""
    m = sym.rope_pairs
    i, j = rope_pair_index(sym)
    assert int(i[-1]) == m - 1 and int(j[0]) == m, "RoPE pairs are (i, i + m)"
    return W[..., :m, :], W[..., m:2 * m, :]


def _cinner(xa: Tensor, ya: Tensor, xb: Tensor, yb: Tensor, spec: str) -> Tensor:
    """Σ_p z_a conj(z_b) for z = x + i·y, contracted by the einsum ``spec``, from the real parts."""
    re = torch.einsum(spec, xa, xb) + torch.einsum(spec, ya, yb)
    im = torch.einsum(spec, ya, xb) - torch.einsum(spec, xa, yb)
    return torch.complex(re, im)


def _rotate_pairs_(W: Tensor, phase: Tensor, sym: LayerSymmetry, heads_per_step: int = 4) -> Tensor:
    """In place: every RoPE pair z_i of head h of ``W`` (n, d_head, P) times phase[h, i]."""
    x, y = _halves(W, sym)
    cr, ci = phase.real.to(W.dtype)[..., None], phase.imag.to(W.dtype)[..., None]
    for h0 in range(0, W.shape[0], heads_per_step):
        h = slice(h0, h0 + heads_per_step)
        x0 = x[h].clone()
        x[h].mul_(cr[h]).addcmul_(y[h], ci[h], value=-1)  # x cr − y ci
        y[h].mul_(cr[h]).addcmul_(x0, ci[h])  # y cr + x ci
    return W


def _group_stack(Q: Tensor, r: int) -> Tensor:
    """(n_heads, d, P) -> (n_kv, d, r·P): the query heads of a group side by side."""
    nh, d, P = Q.shape
    return Q.reshape(nh // r, r, d, P).permute(0, 2, 1, 3).reshape(nh // r, d, r * P)


def _group_unstack(X: Tensor, r: int) -> Tensor:
    nkv, d, rP = X.shape
    return X.reshape(nkv, d, r, rP // r).permute(0, 2, 1, 3).reshape(nkv * r, d, rP // r)


def exact_form(layer: CanonicalLayer, consume: bool = False) -> Form:
    """Per-layer canonical representative under the exact group, up to the compact part.

    ``consume=True`` gives the layer up: its weight matrices are released as soon as they
    are folded (the layer is left with ``None`` in their place), so that making a form needs
    about one layer of memory instead of two (4B shape: 0.4 GB each)."""
    s = layer.sym
    r, rd = s.group_size, s.rotary_dims
    W_down = layer.W_down
    f = _fold(layer, consume)
    Q, K, V, O, G, U, D = f["Q"], f["K"], f["V"], f["O"], f["G"], f["U"], f["D"]
    del f

    # ---- QK
    if s.qk_norm:  # per-head scale is a gauge: unit-normalise every head
        Q = Q / fro(Q, keep=1).clamp_min(EPS)[:, None, None]
        K = K / fro(K, keep=1).clamp_min(EPS)[:, None, None]
    else:
        if rd:  # C* per pair and group: balance Σ_h |zq_h,i|² = |zk_i|²
            zq, zk = _complex_pairs(Q, s), _complex_pairs(K, s)  # (nh, m, P), (nkv, m, P)
            nq = (zq.abs() ** 2).sum(-1).reshape(s.n_kv_heads, r, -1).sum(1)  # (nkv, m)
            nk = (zk.abs() ** 2).sum(-1)
            sc = (nk.clamp_min(EPS) / nq.clamp_min(EPS)) ** 0.25  # (nkv, m)
            zq = zq * sc.repeat_interleave(r, 0)[..., None]
            zk = zk / sc[..., None]
            Q, K = _from_complex(zq, Q, s), _from_complex(zk, K, s)
        if rd < s.d_head:  # GL on non-rotary dims: balanced factors of the group's Q̄ᵀ K
            Qp, Kp = balance_gl(_group_stack(Q[:, rd:], r), K[:, rd:])
            Q = torch.cat([Q[:, :rd], _group_unstack(Qp, r)], dim=1)
            K = torch.cat([K[:, :rd], Kp], dim=1)

    # ---- VO: GL per group, balanced factors of Ō V
    Ot = _group_stack(O.transpose(-1, -2), r)  # (nkv, dh, r·H)
    V, Ot = balance_gl(V, Ot)
    O = _group_unstack(Ot, r).transpose(-1, -2)  # (nh, H, dh)

    # ---- MLP: GLU units balanced between up and down
    if s.is_glu:
        k = (D.norm(dim=0).clamp_min(EPS) / U.norm(dim=1).clamp_min(EPS)).sqrt()  # (d_ff,)
        U = U.mul_(k[:, None])  # U is the fold's own copy
        D = D / k[None, :]
    if D is W_down:
        D = D.clone()  # normalised in place below: never write into the layer's tensors
    del W_down

    gains, pair_gains = _norm_gains(layer, exact=True)
    return Form(sym=s, method="exact", H=s.d_model, Q=_unit_(Q), K=_unit_(K), V=_unit_(V), O=_unit_(O),
                U=_unit_(U), D=_unit_(D), G=None if G is None else _unit_(G), gains=gains,
                pair_gains=pair_gains)


NORM_FAMILIES = {"attn_in": "input_ln", "mlp_in": "post_attn_ln", "attn_out": "attn_out_ln",
                 "mlp_out": "mlp_out_ln", "q_norm": "q_norm", "k_norm": "k_norm"}


def norm_invariant(sym: LayerSymmetry, family: str) -> bool:
    """Is a norm family's number invariant under the exact group? Pre-norm gains trade with
    their readers' columns (gauge-spec §2.5): not invariant. Post-norm gains (BERT, Gemma2's
    sandwich outputs) write the residual stream: genuine. q/k-norm: balanced, invariant under
    ``exact``."""
    if family in ("q_norm", "k_norm"):
        return True
    if family in ("attn_out_ln", "mlp_out_ln"):
        return True
    return sym.post_ln


def _norm_gains(layer: CanonicalLayer, exact: bool) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    gains = {NORM_FAMILIES[role]: _unit(w) for role, (w, _) in layer.norms.items()}
    pair_gains: tuple[str, ...] = ()
    if exact and layer.sym.qk_norm:
        # per-pair q<->k gain trade: balance |γ_q pair| = |γ_k pair|, sign so that γ_q pair sums ≥ 0
        i, j = rope_pair_index(layer.sym)
        gq, gk = layer.norms["q_norm"][0].clone(), layer.norms["k_norm"][0].clone()
        nq = torch.sqrt(gq[i] ** 2 + gq[j] ** 2).clamp_min(EPS)
        nk = torch.sqrt(gk[i] ** 2 + gk[j] ** 2).clamp_min(EPS)
        c = torch.sqrt(nk / nq) * torch.where(gq[i] + gq[j] < 0, -1.0, 1.0).to(gq)
        for idx in (i, j):
            gq[idx], gk[idx] = gq[idx] * c, gk[idx] / c
        gains["q_norm"], gains["k_norm"] = _unit(gq), _unit(gk)
        pair_gains = ("q_norm", "k_norm")
    return gains, pair_gains


def _pairwise(spec: str, x: Tensor, y: Tensor, diag: bool) -> Tensor:
    """einsum over every head pair (a, b), or over matched heads only (a == b) when ``diag``."""
    if diag:
        lhs, rest = spec.split("->")
        x_s, y_s = lhs.split(",")
        spec = f"{x_s},{y_s.replace('b', 'a')}->{rest.replace('b', '')}"
    return torch.einsum(spec, x, y)


def _normalised_dist2(na: Tensor, nb: Tensor, cross: Tensor, diag: bool) -> Tensor:
    Na, Nb = na.sum().clamp_min(EPS), nb.sum().clamp_min(EPS)
    if diag:
        return (na / Na + nb / Nb - 2 * cross / torch.sqrt(Na * Nb)).clamp_min(0)
    return (na[:, None] / Na + nb[None, :] / Nb - 2 * cross / torch.sqrt(Na * Nb)).clamp_min(0)


def _qk_form_cost(fa: Form, fb: Form, diag: bool = False) -> Tensor:
    """Squared distance between the per-layer-normalised QK forms of every head pair
    (n_heads_a, n_heads_b), or of head h of A and head h of B when ``diag``: per RoPE pair the
    rank-1 complex forms conj(zq) zkᵀ (gauge-spec §4.2a), plus ‖Q_pᵀK_p‖ on non-rotary dims
    (§4.4a). Gram traces only: O(n_heads² d_head² d_model), no d_model² matrices."""
    return _normalised_dist2(*_qk_terms(fa, fb, diag), diag)


def _per_head(x: Tensor, gidx: Tensor, diag: bool) -> Tensor:
    """A per-KV-head quantity (n_kv, ...) or per KV-head pair (n_kv, n_kv, ...) expanded to
    query heads: K and V are never copied once per query head."""
    return x[gidx] if diag else x[gidx][:, gidx]


def _qk_terms(fa: Form, fb: Form, diag: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(‖form_a,h‖², ‖form_b,h‖², ⟨form_a,h, form_b,h'⟩) of :func:`_qk_form_cost`."""
    s = fa.sym
    r, rd = s.group_size, s.rotary_dims
    gidx = torch.arange(s.n_heads, device=fa.Q.device) // r
    na = nb = cross = 0
    if rd:
        qa, qb = _halves(fa.Q, s), _halves(fb.Q, s)  # z = x + i·y, each (nh, m, P)
        ka, kb = _halves(fa.K, s), _halves(fb.K, s)  # (nkv, m, P)

        def sq(z: tuple[Tensor, Tensor]) -> Tensor:  # |z_i|² per head and pair
            return torch.linalg.vector_norm(z[0], dim=-1) ** 2 + torch.linalg.vector_norm(z[1], dim=-1) ** 2

        na = (sq(qa) * sq(ka)[gidx]).sum(-1)  # (nh,): Σ_i |form_i|²
        nb = (sq(qb) * sq(kb)[gidx]).sum(-1)
        spec = "amp,amp->am" if diag else "amp,bmp->abm"
        qq = _cinner(*qa, *qb, spec)  # ⟨za, zb⟩
        kk = _per_head(_cinner(*ka, *kb, spec), gidx, diag)  # ⟨ka, kb⟩
        cross = (qq.conj() * kk).real.sum(-1)  # Re(⟨zb,za⟩⟨ka,kb⟩)
    if rd < s.d_head:
        Qa, Qb = fa.Q[:, rd:], fb.Q[:, rd:]  # (nh, dp, P)
        Ka, Kb = fa.K[:, rd:], fb.K[:, rd:]  # (nkv, dp, P)
        t = lambda X: X.transpose(-1, -2)  # noqa: E731
        na = na + ((Qa @ t(Qa)) * (Ka @ t(Ka))[gidx]).sum((-1, -2))  # tr(QQᵀ KKᵀ), both symmetric
        nb = nb + ((Qb @ t(Qb)) * (Kb @ t(Kb))[gidx]).sum((-1, -2))
        QaQb = _pairwise("aip,bjp->abij", Qa, Qb, diag)  # Qa Qbᵀ
        KaKb = _per_head(_pairwise("aip,bjp->abij", Ka, Kb, diag), gidx, diag)
        cross = cross + (QaQb * KaKb).sum((-1, -2))  # tr(Qa Qbᵀ Kb Kaᵀ)
    return na, nb, cross


def _ov_cost(fa: Form, fb: Form, diag: bool = False) -> Tensor:
    """Squared distance between per-layer-normalised OV products X_h = O_h V_g (gauge-spec
    §4.4a), for every head pair or (``diag``) for matched heads."""
    return _normalised_dist2(*_ov_terms(fa, fb, diag), diag)


def _ov_terms(fa: Form, fb: Form, diag: bool, heads_per_step: int = 8) -> tuple[Tensor, Tensor, Tensor]:
    s = fa.sym
    r = s.group_size
    gidx = torch.arange(s.n_heads, device=fa.O.device) // r
    t = lambda X: X.transpose(-1, -2)  # noqa: E731
    na = ((t(fa.O) @ fa.O) * (fa.V @ t(fa.V))[gidx]).sum((-1, -2))
    nb = ((t(fb.O) @ fb.O) * (fb.V @ t(fb.V))[gidx]).sum((-1, -2))
    if diag:
        OaOb = torch.einsum("aki,akj->aij", fa.O, fb.O)  # Oaᵀ Ob
        cross = (OaOb * torch.einsum("aip,ajp->aij", fa.V, fb.V)[gidx]).sum((-1, -2))  # tr(Oaᵀ Ob Vb Vaᵀ)
        return na, nb, cross
    # every head pair, a few KV groups of A at a time: (heads, n_heads, d_head, d_head) blocks
    nkv, dh = s.n_kv_heads, s.d_head
    step = max(1, heads_per_step // r)
    rows = []
    for g0 in range(0, nkv, step):
        g1 = min(nkv, g0 + step)
        OaOb = torch.einsum("aki,bkj->abij", fa.O[g0 * r:g1 * r], fb.O)
        VaVb = torch.einsum("aip,bjp->abij", fa.V[g0:g1], fb.V)  # per KV-group pair
        rows.append(torch.einsum("gxhyij,ghij->gxhy", OaOb.reshape(g1 - g0, r, nkv, r, dh, dh), VaVb)
                    .reshape((g1 - g0) * r, nkv * r))
    return na, nb, torch.cat(rows)


def _permuted(f: Form, perm: Tensor) -> Form:
    """``f`` with query head h replaced by head perm[h] (and KV groups alike)."""
    s = f.sym
    gperm = perm.reshape(s.n_kv_heads, s.group_size)[:, 0] // s.group_size
    return replace(f, Q=f.Q[perm], K=f.K[gperm], V=f.V[gperm], O=f.O[perm])


def _circuit_residuals(fa: Form, fb: Form, groups_per_chunk: int = 1) -> dict[str, float]:
    """Reported circuit distances for matched heads, in float64: the trace formulas subtract
    nearly equal numbers, and in float32 a zero distance would read as ~3e-4. The float64
    copies are made a few KV groups at a time (each head's terms are independent; only the
    layer-wide normalisation needs them all)."""
    s = fa.sym
    r = s.group_size
    terms: dict[str, list[list[Tensor]]] = {"qk": [[], [], []], "ov": [[], [], []]}
    for g0 in range(0, s.n_kv_heads, groups_per_chunk):
        g1 = min(s.n_kv_heads, g0 + groups_per_chunk)
        sym = replace(s, n_heads=(g1 - g0) * r, n_kv_heads=g1 - g0)

        def part(f: Form) -> Form:
            return replace(f, sym=sym, Q=f.Q[g0 * r:g1 * r].double(), K=f.K[g0:g1].double(),
                           V=f.V[g0:g1].double(), O=f.O[g0 * r:g1 * r].double())

        a, b = part(fa), part(fb)
        for name, fn in (("qk", _qk_terms), ("ov", _ov_terms)):
            for acc, t in zip(terms[name], fn(a, b, diag=True)):
                acc.append(t)
    return {f"{name}_circuit": float(_normalised_dist2(*(torch.cat(t) for t in terms[name]), diag=True)
                                     .sum().sqrt())
            for name in ("qk", "ov")}


def _fit_qk(Qa: Tensor, Ka: Tensor, fa: Form, fb: Form) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Fit the compact QK gauge left after balancing; returns aligned (Qa, Ka) and gains.
    ``Qa`` and ``Ka`` are the caller's own copies: the RoPE phases are applied in place."""
    s = fa.sym
    r, rd = s.group_size, s.rotary_dims
    gains = dict(fa.gains)
    if rd:
        c = (_cinner(*_halves(Qa, s), *_halves(fb.Q, s), "hmp,hmp->hm").reshape(s.n_kv_heads, r, -1).sum(1)
             + _cinner(*_halves(Ka, s), *_halves(fb.K, s), "hmp,hmp->hm"))  # (nkv, m): Σ za conj(zb)
        if s.qk_norm:
            # layer-wide t ∈ {0, 1} per pair (multiply by i^t and swap the pair's gains), then a sign per group
            i, j = rope_pair_index(s)
            score = []
            for t_ in (0, 1):
                ct = c * (1j ** t_)
                mis = 0
                for name in ("q_norm", "k_norm"):
                    ga, gb = fa.gains[name], fb.gains[name]
                    a_i, a_j = (ga[i], ga[j]) if t_ == 0 else (ga[j], ga[i])
                    mis = mis + (a_i - gb[i]) ** 2 + (a_j - gb[j]) ** 2
                score.append(2 * ct.real.abs().sum(0) - mis)  # (m,)
            t = (score[1] > score[0])  # (m,)
            rot = torch.where(t, 1j, 1.0 + 0j).to(c.dtype)  # (m,)
            sign = torch.sign((c * rot).real)
            sign = torch.where(sign == 0, torch.ones_like(sign), sign)
            phase = rot[None, :] * sign  # (nkv, m)
            it, jt = i[t.cpu()], j[t.cpu()]  # pair indices live on the CPU
            for name in ("q_norm", "k_norm"):
                g = fa.gains[name].clone()
                g[it], g[jt] = fa.gains[name][jt], fa.gains[name][it]
                gains[name] = g
        else:
            phase = c.conj() / c.abs().clamp_min(EPS)  # e^{iα} = conj(c)/|c|
        Qa = _rotate_pairs_(Qa, phase.repeat_interleave(r, 0), s)
        Ka = _rotate_pairs_(Ka, phase, s)
    if rd < s.d_head:  # O(d_p) on the balanced non-rotary dims, jointly over the group's Q and K
        A = torch.cat([_group_stack(Qa[:, rd:], r), Ka[:, rd:]], dim=-1)  # (nkv, dp, (r+1)P)
        B = torch.cat([_group_stack(fb.Q[:, rd:], r), fb.K[:, rd:]], dim=-1)
        R = polar(B @ A.transpose(-1, -2))  # (nkv, dp, dp)
        Qa = torch.cat([Qa[:, :rd], torch.einsum("hij,hjp->hip", R.repeat_interleave(r, 0), Qa[:, rd:])], 1)
        Ka = torch.cat([Ka[:, :rd], R @ Ka[:, rd:]], 1)
    return Qa, Ka, gains


def mlp_rows(f: Form, W: Tensor, j0: int, j1: int) -> Tensor:
    """Rows j0:j1 (MLP units) of the reader ``W`` (f.G or f.U), with f's lazy rotation."""
    X = W[j0:j1]
    R = f.mlp_rot
    if R is None:
        return X
    if X.shape[-1] == f.H:
        return X @ R.T
    return torch.cat([X[:, :f.H] @ R.T, X[:, f.H:]], dim=-1)


def mlp_down_cols(f: Form, j0: int, j1: int) -> Tensor:
    """Columns j0:j1 (MLP units) of f.D, with f's lazy rotation."""
    X = f.D[:, j0:j1]
    return X if f.mlp_rot is None else f.mlp_rot @ X


def _mlp_cost(fa: Form, fb: Form, glu: bool) -> BlockCost:
    """The unit similarity to *maximise* (gauge-spec §4.6), (F_b, F_a): for GLU
    ⟨g_b, g_a⟩ + |⟨u_b, u_a⟩ + ⟨d_b, d_a⟩| (a unit's sign flips u and d together), else the
    plain inner product. Made in blocks of B units, so no F×F matrix is ever held in torch."""
    if fa.mlp_rot is not None:
        raise ValueError("only layer B of a comparison may carry a lazy rotation")

    def block(j0: int, j1: int) -> Tensor:
        S = mlp_rows(fb, fb.U, j0, j1) @ fa.U.T
        S.addmm_(mlp_down_cols(fb, j0, j1).T, fa.D)
        if glu:
            S.abs_()
            S.addmm_(mlp_rows(fb, fb.G, j0, j1), fa.G.T)
        return S

    return BlockCost((fb.U.shape[0], fa.U.shape[0]), block)


def _mlp_residuals(fa: Form, fb: Form, sigma: np.ndarray, glu: bool,
                   rows: int = 512) -> tuple[Tensor, dict[str, float]]:
    """Residuals of the matched MLP units (B's unit j against A's unit sigma[j]), and the
    GLU signs, computed in blocks of units: (sign, {gate_proj, up_proj, down_proj})."""
    sg = torch.as_tensor(sigma, device=fa.U.device)
    sq = {"gate_proj": 0.0, "up_proj": 0.0, "down_proj": 0.0}
    signs = []
    for j0 in range(0, len(sg), rows):
        idx = sg[j0:j0 + rows]
        j1 = j0 + len(idx)
        Ua, Ub = fa.U[idx], mlp_rows(fb, fb.U, j0, j1)
        Da, Db = fa.D[:, idx], mlp_down_cols(fb, j0, j1)
        if glu:
            sign = torch.sign((Ua * Ub).sum(1) + (Da * Db).sum(0))
            sign = torch.where(sign == 0, torch.ones_like(sign), sign)
            Ua, Da = Ua * sign[:, None], Da * sign[None, :]
        else:
            sign = torch.ones(len(idx), dtype=Ua.dtype, device=Ua.device)
        signs.append(sign)
        sq["up_proj"] += float(((Ua - Ub) ** 2).sum())
        sq["down_proj"] += float(((Da - Db) ** 2).sum())
        if fa.G is not None:
            sq["gate_proj"] += float(((fa.G[idx] - mlp_rows(fb, fb.G, j0, j1)) ** 2).sum())
    if fa.G is None:
        del sq["gate_proj"]
    return torch.cat(signs), {k: v ** 0.5 for k, v in sq.items()}


AWAIT = object()
"""Yielded by a comparison once it has done all it can without its assignment's answer."""


def run_steps(gen) -> dict[str, float]:
    """Drive a comparison generator to the end, solving its assignment in place.

    The protocol (what :func:`drift.analysis.analyze` drives with worker processes): the
    generator yields its assignment problem (a cost to *maximise*) and receives ``None``;
    goes on with the work that does not need the answer; yields :data:`AWAIT` and receives
    the assignment; returns its residuals. A comparison without an assignment just returns.
    """
    try:
        cost = next(gen)
        if gen.send(None) is not AWAIT:
            raise AssertionError("a comparison must yield AWAIT after its assignment")
        gen.send(lap(cost, maximize=True))
        raise AssertionError("a comparison yielded a second assignment")
    except StopIteration as stop:
        return stop.value


def exact_compare(fa: Form, fb: Form, details: dict | None = None) -> dict[str, float]:
    """Per-family residuals of layer A aligned onto layer B under the exact group.

    ``details``, if given, receives ``head_perm`` and ``mlp_perm`` (B's head/unit j is matched
    to A's ``perm[j]``) and ``mlp_sign``.
    """
    return run_steps(exact_compare_steps(fa, fb, details))


def exact_compare_steps(fa: Form, fb: Form, details: dict | None = None):
    """:func:`exact_compare` as a generator (protocol: :func:`run_steps`): it yields its one
    large assignment problem (the MLP units) first, aligns the heads while a driver solves it
    elsewhere, then yields :data:`AWAIT` for the answer (see :func:`drift.analysis.analyze`)."""
    s = fa.sym
    yield _mlp_cost(fa, fb, s.is_glu)  # solved elsewhere while the heads are aligned
    out, perm = _attention_residuals(fa, fb)  # its copies of the heads are gone on return
    # Keep only what the MLP residuals read: a null's rotated heads are freed while it waits.
    fa, fb = (replace(f, Q=None, K=None, V=None, O=None) for f in (fa, fb))
    release_memory()
    sigma = yield AWAIT
    sign, mlp = _mlp_residuals(fa, fb, sigma, s.is_glu)
    out.update(mlp)
    if details is not None:
        details.update(head_perm=perm, mlp_perm=sigma, mlp_sign=sign.cpu().numpy())
    return out


def _fro_by_heads(diff, n: int, step: int = 4) -> float:
    """‖·‖_F of a per-head difference made ``step`` heads at a time: diff(slice) -> tensor."""
    total = 0.0
    for h0 in range(0, n, step):
        total += float(fro(diff(slice(h0, h0 + step)))) ** 2
    return total ** 0.5


def _attention_residuals(fa: Form, fb: Form) -> tuple[dict[str, float], np.ndarray]:
    """Heads matched on invariant circuit costs, then the compact QK and VO gauge fitted:
    the circuit, q/k/v/o and gain residuals, and the head permutation (perm[h_b] = h_a).
    Aligned copies are made a few heads at a time or dropped as soon as they are used."""
    s = fa.sym
    r, nh, nkv = s.group_size, s.n_heads, s.n_kv_heads
    perm = match_heads(_qk_form_cost(fa, fb) + _ov_cost(fa, fb), nkv)
    fa = _permuted(fa, torch.as_tensor(perm, device=fa.Q.device))
    out = _circuit_residuals(fa, fb)
    release_memory()

    Qa, Ka, gains = _fit_qk(fa.Q, fa.K, fa, fb)
    out["q_proj"] = _fro_by_heads(lambda h: Qa[h] - fb.Q[h], nh)
    out["k_proj"] = _fro_by_heads(lambda h: Ka[h] - fb.K[h], nkv)
    del Qa, Ka
    # VO: O(d_head) per group on the balanced factors B = [V | O_1ᵀ .. O_rᵀ] of each group:
    # R = polar(B_b B_aᵀ), B_b B_aᵀ = V_b V_aᵀ + Σ_x O_b,xᵀ O_a,x
    H, dh = s.d_model, s.d_head
    M = fb.V @ fa.V.transpose(-1, -2) + torch.einsum(
        "gxki,gxkj->gij", fb.O.reshape(nkv, r, H, dh), fa.O.reshape(nkv, r, H, dh))
    R = polar(M)  # (nkv, dh, dh)
    out["v_proj"] = float(fro(R @ fa.V - fb.V))
    Rh = R.repeat_interleave(r, 0).transpose(-1, -2)  # (nh, dh, dh): O_h ← O_h Rᵀ
    out["o_proj"] = _fro_by_heads(lambda h: fa.O[h] @ Rh[h] - fb.O[h], nh)
    for name, g in gains.items():
        out[name] = float(fro(g - fb.gains[name]))
    return out, perm


# =========================================================================== rotation / raw

def rotation_form(layer: CanonicalLayer, method: str = "rotation") -> Form:
    """The reference script's view: raw matrices, every head's Q, K, V, O unit-normalised
    separately (K/V repeated to query heads), MLP matrices and norm vectors normalised whole."""
    s = layer.sym
    gidx = torch.arange(s.n_heads, device=layer.W_Q.device) // s.group_size

    def per_head(W: Tensor) -> Tensor:
        return W / fro(W, keep=1).clamp_min(EPS)[:, None, None]

    gains, _ = _norm_gains(layer, exact=False)
    return Form(sym=s, method=method, H=s.d_model, Q=per_head(layer.W_Q), K=per_head(layer.W_K[gidx]),
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


# =========================================================================== registry

FormFn = Callable[[CanonicalLayer], Form]
CompareFn = Callable[[Form, Form], dict[str, float]]

def _no_assignment(fn: CompareFn) -> Callable:
    """A comparison without assignment problems, as a generator that yields nothing."""
    def steps(fa: Form, fb: Form):
        return fn(fa, fb)
        yield  # noqa: unreachable - makes this a generator

    return steps


METHOD_FORMS: dict[str, FormFn] = {
    "exact": exact_form,
    "rotation": lambda L, consume=False: rotation_form(L, "rotation"),
    "raw": lambda L, consume=False: rotation_form(L, "raw"),
}
"""method -> per-layer form; ``consume=True`` lets it release the layer's tensors as it goes."""

METHOD_STEPS: dict[str, Callable] = {
    "exact": exact_compare_steps,
    "rotation": _no_assignment(rotation_compare),
    "raw": _no_assignment(lambda a, b: rotation_compare(a, b, fit=False)),
}
"""method -> comparison as a generator that yields its assignment problems (see run_steps)."""


def family_kind(family: str) -> str:
    if family.endswith("_circuit"):
        return "circuit"
    if family in NORM_FAMILIES.values():
        return "norm"
    return "weight"


def family_invariant(method: str, sym: LayerSymmetry, family: str) -> bool:
    kind = family_kind(family)
    if kind == "norm":
        return norm_invariant(sym, family) and (method == "exact" or family not in ("q_norm", "k_norm"))
    return method == "exact"
