"""Gauge-invariant circuit costs between the heads of two forms, from Gram traces.

The QK circuit of a head is its bilinear form per RoPE pair, conj(zq) zkᵀ (gauge-spec §4.2a),
plus Q_pᵀ K_p on non-rotary dims; the OV circuit is O_h V_g (§4.4a). Neither is ever made:
their inner products are traces of d_head × d_head Grams, O(n_heads² d_head² d_model).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .form import EPS, Form, Tensor, _cinner, _halves


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


def _ov_terms(fa: Form, fb: Form, diag: bool) -> tuple[Tensor, Tensor, Tensor]:
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
    # every head pair: tr(Oaᵀ Ob Vb Vaᵀ) = ⟨Oa (Va Vbᵀ), Ob⟩ with one product Oa (Va Vbᵀ) per head
    # of A and KV group of B (n_heads · n_kv · d_model · d_head² multiply-adds, instead of
    # n_heads² · d_model · d_head² for every Oaᵀ Ob), one head of A at a time
    nh, H, dh = fa.O.shape
    nkv = s.n_kv_heads
    VaVb = torch.einsum("aip,bjp->abij", fa.V, fb.V)  # (nkv, nkv, dh, dh) per KV-group pair
    Ob = fb.O.reshape(nkv, r, H * dh)
    rows = [torch.einsum("gm,gxm->gx", (fa.O[h] @ VaVb[h // r]).reshape(nkv, H * dh), Ob).reshape(1, nh)
            for h in range(nh)]
    return na, nb, torch.cat(rows)


CHUNK_BYTES = 16 << 20
"""About how many bytes of float64 head copies :func:`_circuit_residuals` makes at once."""


def _circuit_residuals(fa: Form, fb: Form, groups_per_chunk: int | None = None) -> dict[str, float]:
    """Reported circuit distances for matched heads, in float64: the trace formulas subtract
    nearly equal numbers, and in float32 a zero distance would read as ~3e-4. The float64
    copies are made a few KV groups at a time, as many as fit in :data:`CHUNK_BYTES` (each
    head's terms are independent; only the layer-wide normalisation needs them all)."""
    s = fa.sym
    r = s.group_size
    if groups_per_chunk is None:
        per_group = 2 * 8 * sum(t[0].numel() * m for t, m in ((fa.Q, r), (fa.K, 1), (fa.V, 1), (fa.O, r)))
        groups_per_chunk = max(1, CHUNK_BYTES // max(per_group, 1))
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

