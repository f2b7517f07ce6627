"""``exact``: remove exactly the layer's symmetry group (gauge-spec §2, §4, §7).

1. *Per layer* (:func:`exact_form`), gauges with a canonical representative are removed:
   norm gains folded into their readers; for LayerNorm models the reader null direction
   projected out, writers centred, b_K dropped on non-rotary dims and b_V folded into b_O;
   QK balanced per RoPE pair (or per head for Qwen3's q/k-norm, or GL-balanced on non-rotary
   dims); VO GL-balanced per KV group; GLU units balanced between up and down. What is left
   is a compact group (phases, signs, O(d), permutations), fitted per pair.
2. *Per pair* (:class:`ExactComparison`): heads are matched on gauge-invariant circuit costs
   (two-level assignment that respects GQA groups); then the compact residual gauge is fitted
   in closed form; MLP units are matched by one assignment, the comparison's declared large
   step, which a scheduler may solve elsewhere while the heads are aligned.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from ..align import balance_gl, fro, polar
from ..assign import BlockCost, lap, match_heads
from ..canonical import CanonicalLayer, activation_group_known, rope_pair_index
from ..errors import UnsupportedArchitectureError
from ..memory import release_memory
from .circuits import _circuit_residuals, _ov_cost, _qk_form_cost
from .form import (EPS, Form, Tensor, _aug, _cinner, _complex_pairs, _from_complex, _group_stack,
                   _group_unstack, _halves, _norm_gains, _rotate_pairs_, _unit_, qk_pair_scale)


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


def not_exact(s) -> str | None:
    """Why the exact method cannot take layers of symmetry ``s`` (a LayerSymmetry), or None:
    an MLP activation whose symmetry group gauge-spec §2.4 does not derive."""
    if activation_group_known(s.activation):
        return None
    return (f"{s.arch}: activation {s.activation!r} is not supported by the exact method: its symmetry groups are "
            "derived for silu and gelu; another activation can have more (ReLU: a positive scale per unit) that "
            "it would not remove (method 'raw' or 'rotation' still runs)")


def exact_form(layer: CanonicalLayer, consume: bool = False) -> Form:
    """Per-layer canonical representative under the exact group, up to the compact part.

    ``consume=True`` gives the layer up: its weight matrices are released as soon as they
    are folded (the layer is left with ``None`` in their place), so that making a form needs
    about one layer of memory instead of two."""
    s = layer.sym
    why = not_exact(s)
    if why:
        raise UnsupportedArchitectureError(why)
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
            sc = qk_pair_scale(zq, zk, s)  # (nkv, m)
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
    return Form(sym=s, H=s.d_model, Q=_unit_(Q), K=_unit_(K), V=_unit_(V), O=_unit_(O),
                U=_unit_(U), D=_unit_(D), G=None if G is None else _unit_(G), gains=gains,
                pair_gains=pair_gains)


def _permuted(f: Form, perm: Tensor) -> Form:
    """``f`` with query head h replaced by head perm[h] (and KV groups alike)."""
    s = f.sym
    gperm = perm.reshape(s.n_kv_heads, s.group_size)[:, 0] // s.group_size
    return replace(f, Q=f.Q[perm], K=f.K[gperm], V=f.V[gperm], O=f.O[perm])


def _fit_qk(Qa: Tensor, Ka: Tensor, fa: Form, fb: Form,
            record: dict | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
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
        if record is not None:
            record["qk_phase"] = phase.clone()  # (nkv, m): z ← z·phase on Q and K
        Qa = _rotate_pairs_(Qa, phase.repeat_interleave(r, 0), s)
        Ka = _rotate_pairs_(Ka, phase, s)
    if rd < s.d_head:  # O(d_p) on the balanced non-rotary dims, jointly over the group's Q and K
        A = torch.cat([_group_stack(Qa[:, rd:], r), Ka[:, rd:]], dim=-1)  # (nkv, dp, (r+1)P)
        B = torch.cat([_group_stack(fb.Q[:, rd:], r), fb.K[:, rd:]], dim=-1)
        R = polar(B @ A.transpose(-1, -2))  # (nkv, dp, dp)
        if record is not None:
            record["qk_rotation"] = R.clone()  # (nkv, dp, dp): non-rotary rows ← R rows, Q and K
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
    # the blocks read only the MLP: a comparison's heads (a null's rotated copies) can go first
    fa, fb = (replace(f, Q=None, K=None, V=None, O=None) for f in (fa, fb))

    def block(j0: int, j1: int) -> Tensor:
        S = mlp_rows(fb, fb.U, j0, j1) @ fa.U.T
        S.addmm_(mlp_down_cols(fb, j0, j1).T, fa.D)
        if glu:
            S.abs_()
            S.addmm_(mlp_rows(fb, fb.G, j0, j1), fa.G.T)
        return S

    def parts(j0: int, j1: int) -> tuple[Tensor, list[Tensor]]:
        """Rows j0:j1 of S, and of ⟨u_b, u_a⟩ and the signed ⟨u_b, u_a⟩ + ⟨d_b, d_a⟩ (GLU;
        for a plain MLP that sum is S): each term at the matched entries follows
        (:func:`_unit_terms`), so the MLP residuals need no second pass over the units."""
        Su = mlp_rows(fb, fb.U, j0, j1) @ fa.U.T
        T = torch.addmm(Su, mlp_down_cols(fb, j0, j1).T, fa.D)
        if not glu:
            return T, [Su]
        S = T.abs().addmm_(mlp_rows(fb, fb.G, j0, j1), fa.G.T)
        return S, [Su, T]

    # Only where B is rotated lazily (a null partner) does a second pass cost much (the
    # rotation again, ~0.8 of a similarity product at Qwen3-4B's shape); elsewhere the
    # differencing pass is cheaper than keeping the terms.
    return BlockCost((fb.U.shape[0], fa.U.shape[0]), block, parts=parts if fb.mlp_rot is not None else None)


MATCHED_MIN_RESIDUAL = 0.25
"""The MLP residuals come from the similarity's own terms at the matched entries,
‖a − b‖² = ‖a‖² + ‖b‖² − 2⟨a, b⟩, only while ‖a − b‖² ≥ this fraction of ‖a‖² + ‖b‖²: there
the float32 terms' rounding moves a residual by well under 1e-6 of itself (measured 2e-9 to
6e-8 against the differenced residuals at Qwen3-0.6B's shape); closer units (a near copy, a
planted gauge) are read again and differenced."""


def _unit_terms(S: np.ndarray, kept: np.ndarray, glu: bool) -> np.ndarray:
    """(d_ff, 2 or 3) float64: ⟨u_b, u_a⟩, ⟨d_b, d_a⟩ (and ⟨g_b, g_a⟩) of each matched pair,
    from the similarity S and the terms ``parts`` kept there (float32 values, so each
    difference below is exact in float64; a term carries the rounding of S, ≤ 2⁻²⁴·|S|)."""
    if not glu:
        return np.stack([kept[:, 0], S - kept[:, 0]], axis=1)
    u, t = kept[:, 0], kept[:, 1]
    return np.stack([u, t - u, S - np.abs(t)], axis=1)


def _mlp_residuals_matched(fa: Form, fb: Form, terms: np.ndarray,
                           glu: bool) -> tuple[Tensor, dict[str, float]] | None:
    """The MLP residuals of :func:`_mlp_residuals` from ``terms`` (:func:`_unit_terms`), or
    None where a family is too close for that (:data:`MATCHED_MIN_RESIDUAL`). B's lazy
    rotation leaves its norms as they are."""
    if glu:
        sign = np.sign(terms[:, 0] + terms[:, 1])
        sign[sign == 0] = 1.0
    else:
        sign = np.ones(len(terms))
    # in _mlp_residuals' order
    names = ([("gate_proj", "G", 2)] if glu else []) + [("up_proj", "U", 0), ("down_proj", "D", 1)]
    out = {}
    for name, m, t in names:
        na, nb = (float(fro(getattr(f, m))) ** 2 for f in (fa, fb))
        cross = float(terms[:, t] @ sign) if t < 2 else float(terms[:, t].sum())
        sq = na + nb - 2 * cross
        if not sq >= MATCHED_MIN_RESIDUAL * (na + nb):
            return None
        out[name] = sq ** 0.5
    return torch.as_tensor(sign, dtype=fa.U.dtype), out


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


def _fro_by_heads(diff, n: int, step: int = 4) -> float:
    """‖·‖_F of a per-head difference made ``step`` heads at a time: diff(slice) -> tensor."""
    total = 0.0
    for h0 in range(0, n, step):
        total += float(fro(diff(slice(h0, h0 + step)))) ** 2
    return total ** 0.5


def _attention_residuals(fa: Form, fb: Form, record: dict | None = None) -> tuple[dict[str, float], np.ndarray]:
    """Heads matched on invariant circuit costs, then the compact QK and VO gauge fitted:
    the circuit, q/k/v/o and gain residuals, and the head permutation (perm[h_b] = h_a).
    Aligned copies are made a few heads at a time or dropped as soon as they are used."""
    s = fa.sym
    r, nh, nkv = s.group_size, s.n_heads, s.n_kv_heads
    perm = match_heads(_qk_form_cost(fa, fb) + _ov_cost(fa, fb), nkv)
    fa = _permuted(fa, torch.as_tensor(perm, device=fa.Q.device))
    out = _circuit_residuals(fa, fb)
    release_memory()

    Qa, Ka, gains = _fit_qk(fa.Q, fa.K, fa, fb, record)
    out["q_proj"] = _fro_by_heads(lambda h: Qa[h] - fb.Q[h], nh)
    out["k_proj"] = _fro_by_heads(lambda h: Ka[h] - fb.K[h], nkv)
    del Qa, Ka
    # VO: O(d_head) per group on the balanced factors B = [V | O_1ᵀ .. O_rᵀ] of each group:
    # R = polar(B_b B_aᵀ), B_b B_aᵀ = V_b V_aᵀ + Σ_x O_b,xᵀ O_a,x
    H, dh = s.d_model, s.d_head
    M = fb.V @ fa.V.transpose(-1, -2) + torch.einsum(
        "gxki,gxkj->gij", fb.O.reshape(nkv, r, H, dh), fa.O.reshape(nkv, r, H, dh))
    R = polar(M)  # (nkv, dh, dh)
    if record is not None:
        record["vo_rotation"] = R.clone()  # V ← R V, O ← O Rᵀ per group
    out["v_proj"] = float(fro(R @ fa.V - fb.V))
    Rh = R.repeat_interleave(r, 0).transpose(-1, -2)  # (nh, dh, dh): O_h ← O_h Rᵀ
    out["o_proj"] = _fro_by_heads(lambda h: fa.O[h] @ Rh[h] - fb.O[h], nh)
    for name, g in gains.items():
        out[name] = float(fro(g - fb.gains[name]))
    return out, perm


class ExactComparison:
    """Layer A aligned onto layer B under the exact group, in the three steps of a
    :class:`~drift.methods.Comparison`: ``assignment`` (the MLP unit similarity to maximise,
    B's units × A's), ``prepare()`` (heads matched and their compact gauge fitted; the
    heads' tensors are then let go), ``finish(sigma)`` (the MLP residuals for B's unit j
    matched to A's ``sigma[j]``). After ``finish``: ``head_perm`` and ``mlp_perm``
    (B's head/unit j is matched to A's ``perm[j]``), ``mlp_sign``, the MLP assignment's
    ``certificate`` (None when the dense solver found it), and ``mlp_from_terms`` (the MLP
    residuals were read off the certified assignment's terms, :func:`_mlp_residuals_matched`)."""

    def __init__(self, fa: Form, fb: Form):
        self.fa, self.fb = fa, fb
        self.assignment: BlockCost = _mlp_cost(fa, fb, fa.sym.is_glu)
        self._cost = self.assignment  # its certificate, once solved (its blocks are let go then)
        self.certificate = None
        self.residuals: dict[str, float] = {}
        self.head_perm = self.mlp_perm = self.mlp_sign = None
        self.mlp_from_terms = False  # finish() read the MLP residuals off the assignment's terms

    def prepare(self) -> None:
        # The assignment is the executor's (or the caller's) now: its blocks read only the MLP.
        self.assignment = None
        self.record: dict = {}
        self.residuals, self.head_perm = _attention_residuals(self.fa, self.fb, self.record)
        # Keep only what the MLP residuals read: a null's rotated heads are freed while it waits.
        self.fa, self.fb = (replace(f, Q=None, K=None, V=None, O=None) for f in (self.fa, self.fb))
        release_memory()

    def finish(self, sigma: np.ndarray) -> dict[str, float]:
        glu = self.fa.sym.is_glu
        at = getattr(self._cost, "matched", None)  # (σ, S, the kept terms) at the certified path's answer
        fast = None
        if at is not None and np.array_equal(at[0], sigma):  # the terms are of this answer, not another's
            fast = _mlp_residuals_matched(self.fa, self.fb, _unit_terms(at[1], at[2], glu), glu)
        sign, mlp = fast if fast is not None else _mlp_residuals(self.fa, self.fb, sigma, glu)
        self.mlp_from_terms = fast is not None
        self.mlp_perm, self.mlp_sign = sigma, sign.cpu().numpy()
        self.certificate, self._cost = self._cost.certificate, None
        self.fa = self.fb = None
        return {**self.residuals, **mlp}


def exact_compare(fa: Form, fb: Form, details: dict | None = None) -> dict[str, float]:
    """Per-family residuals of layer A aligned onto layer B under the exact group, in this
    thread. ``details``, if given, receives ``head_perm``, ``mlp_perm`` and ``mlp_sign``."""
    c = ExactComparison(fa, fb)
    sigma = lap(c.assignment, maximize=True)
    c.prepare()
    out = c.finish(sigma)
    if details is not None:
        details.update(head_perm=c.head_perm, mlp_perm=c.mlp_perm, mlp_sign=c.mlp_sign)
    return out
