"""What a method compares: the :class:`Form` of a layer, and the small tensor helpers that
the methods share (unit normalisation, RoPE pairs as complex numbers, KV-group stacking).

Every family matrix of a form is Frobenius-normalised to 1 per layer, so that residuals lie
in [0, 2] and unrelated, unaligned matrices sit near sqrt(2).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..align import fro
from ..canonical import CanonicalLayer, LayerSymmetry, rope_pair_index
from ..families import NORM_FAMILIES

Tensor = torch.Tensor
EPS = 1e-12


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
        reads, so the null holds no rotated copy of the largest matrices (measured saving:
        benchmarks/results/memory_notes.md)."""
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

    def constant_gains(self) -> set[str]:
        """The gains whose entries are all equal (an initialisation's ones). They have no
        shuffle null: a shuffle leaves them as they are, and a distance to a constant vector
        survives any permutation of either vector, so the null would repeat the residual."""
        return {name for name, g in self.gains.items() if bool((g == g.reshape(-1)[0]).all())}

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


def _norm_gains(layer: CanonicalLayer, exact: bool) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    gains = {NORM_FAMILIES[role]: _unit(w) for role, (w, _) in layer.norms.items()}
    pair_gains: tuple[str, ...] = ()
    if exact and layer.sym.qk_norm:
        # per-pair q<->k gain trade: balance |γ_q pair| = |γ_k pair|, sign so that γ_q pair sums ≥ 0
        i, j = rope_pair_index(layer.sym)
        gq, gk = layer.norms["q_norm"][0].clone(), layer.norms["k_norm"][0].clone()
        c = pair_gain_trade(gq, gk, layer.sym)
        for idx in (i, j):
            gq[idx], gk[idx] = gq[idx] * c, gk[idx] / c
        gains["q_norm"], gains["k_norm"] = _unit(gq), _unit(gk)
        pair_gains = ("q_norm", "k_norm")
    return gains, pair_gains


def pair_gain_trade(gq: Tensor, gk: Tensor, sym: LayerSymmetry) -> Tensor:
    """q/k-norm: the per-pair trade c (m,) that balances |γ_q pair| = |γ_k pair| (γ_q × c,
    γ_k / c), its sign chosen so that γ_q's pair sums to ≥ 0."""
    i, j = rope_pair_index(sym)
    nq = torch.sqrt(gq[i] ** 2 + gq[j] ** 2).clamp_min(EPS)
    nk = torch.sqrt(gk[i] ** 2 + gk[j] ** 2).clamp_min(EPS)
    return torch.sqrt(nk / nq) * torch.where(gq[i] + gq[j] < 0, -1.0, 1.0).to(gq)


def qk_pair_scale(zq: Tensor, zk: Tensor, sym: LayerSymmetry) -> Tensor:
    """The C* balance per RoPE pair and KV group, (n_kv, m): zq × s, zk / s makes
    Σ_h |zq_h,i|² = |zk_i|². ``zq`` (n_heads, m, P), ``zk`` (n_kv, m, P) complex pairs."""
    nq = (zq.abs() ** 2).sum(-1).reshape(sym.n_kv_heads, sym.group_size, -1).sum(1)  # (nkv, m)
    nk = (zk.abs() ** 2).sum(-1)
    return (nk.clamp_min(EPS) / nq.clamp_min(EPS)) ** 0.25
