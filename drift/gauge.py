"""The exact symmetries of a layer, as transforms of a :class:`CanonicalLayer`.

Each function returns a new layer that computes *the same function* (gauge-spec §2), except
the ones named ``not_a_symmetry_*``, which are the transforms the reference script assumed and
which change the model's outputs. :func:`random_gauge` composes a random element of the
layer's whole exact group; it is how tests plant an answer and how the primer notebook
shows that raw weights move while the function does not.

A gauge freedom, in one line: two weight settings are the same model when one maps to the
other by an invertible change of basis that the next operation undoes. Which changes of
basis are undone depends on the architecture:

* VO: ``O_h V_g`` is all that matters, so any invertible G per KV group (V ← G V, O ← O G⁻¹).
* QK without RoPE: ``Q_hᵀ K_g`` is all that matters, so any invertible M (Q ← M Q, K ← M⁻ᵀ K).
* QK with RoPE: M must commute with every position rotation; with distinct frequencies only a
  complex scalar per frequency pair survives (a scale and a phase).
* QK with Qwen3's q/k-norm: the RMS norm fixes the metric and the learned gain breaks the
  pair's isotropy, so only a sign per pair (per KV group), a per-head scale, and two
  layer-wide discrete/gain moves survive.
* MLP: units can be permuted; a GLU's up/down pair can be rescaled per unit (sign included),
  but the gate cannot (silu/gelu are not homogeneous), and nothing rotates units.
* Norms: a pre-norm gain trades with the columns of the matrices that read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .align import random_orthogonal
from .canonical import CanonicalLayer, rope_pair_index

Tensor = torch.Tensor

_READERS = {"attn_in": ("W_Q", "W_K", "W_V"), "mlp_in": ("W_gate", "W_up")}
_READER_BIAS = {"W_Q": "b_Q", "W_K": "b_K", "W_V": "b_V", "W_gate": "b_gate", "W_up": "b_up"}


def _heads(layer: CanonicalLayer, g: int) -> range:
    r = layer.sym.group_size
    return range(g * r, (g + 1) * r)


# --------------------------------------------------------------------------- attention

def qk_gauge(layer: CanonicalLayer, g: int, M: Tensor) -> CanonicalLayer:
    """Q_h ← M Q_h (h in group g), K_g ← M⁻ᵀ K_g, biases alike.

    A symmetry only for M in the layer's QK group: any GL(d_head) without RoPE; a complex
    scalar per RoPE pair (plus GL on pass-through dims) with RoPE; signs per pair with
    q/k-norm. Use :func:`random_qk_element` for a valid M.
    """
    out = layer.clone()
    Mt = torch.linalg.inv(M).T
    for h in _heads(layer, g):
        out.W_Q[h] = M @ layer.W_Q[h]
        if layer.b_Q is not None:
            out.b_Q[h] = M @ layer.b_Q[h]
    out.W_K[g] = Mt @ layer.W_K[g]
    if layer.b_K is not None:
        out.b_K[g] = Mt @ layer.b_K[g]
    return out


def vo_gauge(layer: CanonicalLayer, g: int, G: Tensor) -> CanonicalLayer:
    """V_g ← G V_g, b_V ← G b_V, O_h ← O_h G⁻¹ for every h in group g: GL(d_head) per KV group."""
    out = layer.clone()
    Ginv = torch.linalg.inv(G)
    out.W_V[g] = G @ layer.W_V[g]
    if layer.b_V is not None:
        out.b_V[g] = G @ layer.b_V[g]
    for h in _heads(layer, g):
        out.W_O[h] = layer.W_O[h] @ Ginv
    return out


def key_bias_shift(layer: CanonicalLayer, g: int, delta: Tensor) -> CanonicalLayer:
    """b_K ← b_K + δ on the non-rotary dims: qᵀδ is the same for every key, softmax ignores it."""
    out = layer.clone()
    out.b_K[g, layer.sym.rotary_dims:] += delta
    return out


def value_bias_fold(layer: CanonicalLayer, g: int, delta: Tensor) -> CanonicalLayer:
    """b_V ← b_V + δ, b_O ← b_O − Σ_{h∈g} O_h δ (attention weights sum to 1); needs b_O."""
    out = layer.clone()
    out.b_V[g] = layer.b_V[g] + delta
    for h in _heads(layer, g):
        out.b_O = out.b_O - layer.W_O[h] @ delta
    return out


def permute_heads(layer: CanonicalLayer, perm: np.ndarray) -> CanonicalLayer:
    """New head h = old head ``perm[h]``. ``perm`` must respect KV groups (S_r ≀ S_{n_kv}):
    the KV heads follow their query heads."""
    s = layer.sym
    perm = np.asarray(perm)
    r = s.group_size
    groups = perm.reshape(s.n_kv_heads, r) // r
    if not (groups == groups[:, :1]).all():
        raise ValueError(f"head permutation {perm.tolist()} mixes KV groups (group size {r})")
    gperm = torch.as_tensor(groups[:, 0])
    p = torch.as_tensor(perm)
    out = layer.clone()
    out.W_Q, out.W_O = layer.W_Q[p], layer.W_O[p]
    out.W_K, out.W_V = layer.W_K[gperm], layer.W_V[gperm]
    for name, idx in (("b_Q", p), ("b_K", gperm), ("b_V", gperm)):
        if getattr(layer, name) is not None:
            setattr(out, name, getattr(layer, name)[idx])
    return out


def qwen3_head_scale(layer: CanonicalLayer, c_q: Tensor, c_k: Tensor) -> CanonicalLayer:
    """Q_h × c_q[h], K_g × c_k[g] (positive): invisible behind q/k-norm (exact up to its eps)."""
    out = layer.clone()
    out.W_Q = layer.W_Q * c_q[:, None, None]
    out.W_K = layer.W_K * c_k[:, None, None]
    return out


def qwen3_pair_swap(layer: CanonicalLayer, pairs: Tensor) -> CanonicalLayer:
    """Layer-wide π/2 rotation J of the given RoPE pairs in every Q and K head, with the two
    gain entries of each pair swapped in q_norm and k_norm."""
    i, j = (t[pairs] for t in rope_pair_index(layer.sym))
    out = layer.clone()
    for W_name in ("W_Q", "W_K"):
        W, new = getattr(layer, W_name), getattr(out, W_name)
        new[:, i], new[:, j] = -W[:, j], W[:, i]  # z -> i z
    for role in ("q_norm", "k_norm"):
        w = layer.norms[role][0].clone()
        w[i], w[j] = layer.norms[role][0][j], layer.norms[role][0][i]
        out.norms[role] = (w, None)
    return out


def qwen3_gain_trade(layer: CanonicalLayer, c: Tensor) -> CanonicalLayer:
    """Both q_norm gains of pair i × c[i], both k_norm gains of pair i / c[i]."""
    i, j = rope_pair_index(layer.sym)
    out = layer.clone()
    scale = torch.ones_like(layer.norms["q_norm"][0])
    scale[i], scale[j] = c, c
    out.norms["q_norm"] = (layer.norms["q_norm"][0] * scale, None)
    out.norms["k_norm"] = (layer.norms["k_norm"][0] / scale, None)
    return out


def output_scale(layer: CanonicalLayer, c_o: float, c_down: float) -> CanonicalLayer:
    """Gemma2: a sandwich norm follows attention and MLP, so a global scale of W_O (and of
    W_down) is invisible (exact up to the norm's eps)."""
    out = layer.clone()
    out.W_O = layer.W_O * c_o
    out.W_down = layer.W_down * c_down
    return out


# --------------------------------------------------------------------------- MLP

def permute_mlp(layer: CanonicalLayer, perm: np.ndarray) -> CanonicalLayer:
    """New unit i = old unit ``perm[i]``: rows of gate/up (and biases), columns of down."""
    p = torch.as_tensor(np.asarray(perm))
    out = layer.clone()
    for name in ("W_gate", "W_up", "b_gate", "b_up"):
        if getattr(layer, name) is not None:
            setattr(out, name, getattr(layer, name)[p])
    out.W_down = layer.W_down[:, p]
    return out


def glu_unit_scale(layer: CanonicalLayer, c: Tensor) -> CanonicalLayer:
    """GLU only: up row i × c[i], down column i / c[i], any nonzero c (sign included)."""
    out = layer.clone()
    out.W_up = layer.W_up * c[:, None]
    if layer.b_up is not None:
        out.b_up = layer.b_up * c
    out.W_down = layer.W_down / c[None, :]
    return out


# --------------------------------------------------------------------------- norms

def norm_fold(layer: CanonicalLayer, role: str, c: Tensor, shift: Tensor | None = None) -> CanonicalLayer:
    """Pre-norm gain fold: γ ← γ⊙c (β ← β⊙c for LayerNorm) and every reader W ← W diag(1/c).
    For LayerNorm, ``shift`` d also moves β ← β + d with reader biases b ← b − W d."""
    out = layer.clone()
    w, b = layer.norms[role]
    nb = None if b is None else b * c
    for name in _READERS[role]:
        W = getattr(layer, name)
        if W is None:
            continue
        W2 = W / c  # broadcasts over the last (d_model) axis
        setattr(out, name, W2)
        if shift is not None:
            bias = getattr(layer, _READER_BIAS[name])
            setattr(out, _READER_BIAS[name], bias - W2 @ shift)
    if shift is not None:
        nb = nb + shift
    out.norms[role] = (w * c, nb)
    return out


def reader_mean_null(layer: CanonicalLayer, role: str, vs: dict[str, Tensor]) -> CanonicalLayer:
    """LayerNorm output is orthogonal to 1: W ← W + v (1/γ)ᵀ, b ← b − (β·(1/γ)) v for each
    reader (``vs[name]`` shaped like W's output axes)."""
    out = layer.clone()
    w, b = layer.norms[role]
    inv = 1.0 / w
    for name, v in vs.items():
        W = getattr(layer, name)
        setattr(out, name, W + v[..., None] * inv)
        bias = getattr(layer, _READER_BIAS[name])
        setattr(out, _READER_BIAS[name], bias - (b @ inv) * v)
    return out


def writer_center_shift(layer: CanonicalLayer, v_o: Tensor, t_o: float, v_down: Tensor,
                        t_down: float) -> CanonicalLayer:
    """Every reader of the residual is a LayerNorm, which removes the mean: W_O,h ← W_O,h + 1 v_hᵀ,
    b_O ← b_O + t·1; the same for W_down / b_down. ``v_o`` (n_heads, d_head), ``v_down`` (d_ff,)."""
    out = layer.clone()
    out.W_O = layer.W_O + v_o[:, None, :]
    out.b_O = layer.b_O + t_o
    out.W_down = layer.W_down + v_down[None, :]
    out.b_down = layer.b_down + t_down
    return out


# --------------------------------------------------------------------------- non-symmetries

def not_a_symmetry_qk_rotation(layer: CanonicalLayer, g: int, R: Tensor) -> CanonicalLayer:
    """A full O(d_head) rotation of Q/K: a symmetry without RoPE, **not** with RoPE or q/k-norm."""
    return qk_gauge(layer, g, R)


def not_a_symmetry_one_head(layer: CanonicalLayer, h: int, M: Tensor) -> CanonicalLayer:
    """A valid QK element applied to ONE query head of a GQA group: not a symmetry when r > 1."""
    out = layer.clone()
    out.W_Q[h] = M @ layer.W_Q[h]
    g = layer.sym.kv_of(h)
    out.W_K[g] = torch.linalg.inv(M).T @ layer.W_K[g]
    return out


def not_a_symmetry_mlp_rotation(layer: CanonicalLayer, S: Tensor) -> CanonicalLayer:
    """An O(d_ff) rotation of the MLP units (the reference's assumption): never a symmetry."""
    out = layer.clone()
    if layer.W_gate is not None:
        out.W_gate = S @ layer.W_gate
    out.W_up = S @ layer.W_up
    out.W_down = layer.W_down @ S.T
    if layer.b_up is not None:
        out.b_up = S @ layer.b_up
    return out


# --------------------------------------------------------------------------- random elements

def random_gl(n: int, gen: torch.Generator, dtype=torch.float64, sigma: float = 0.5) -> Tensor:
    """A well-conditioned random invertible matrix: U diag(exp(σ N(0,1))) Vᵀ."""
    U = random_orthogonal(n, gen, dtype)
    V = random_orthogonal(n, gen, dtype)
    s = torch.exp(sigma * torch.randn(n, generator=gen, dtype=torch.float64)).to(dtype)
    return (U * s) @ V.T


def random_qk_element(layer: CanonicalLayer, gen: torch.Generator) -> Tensor:
    """A random M in the layer's QK group (d_head × d_head)."""
    s = layer.sym
    dh, dtype = s.d_head, layer.W_Q.dtype
    M = torch.zeros(dh, dh, dtype=dtype)
    i, j = rope_pair_index(s)
    m = s.rope_pairs
    if s.qk_norm:  # a sign per pair
        sign = torch.where(torch.rand(m, generator=gen) < 0.5, -1.0, 1.0).to(dtype)
        M[i, i], M[j, j] = sign, sign
        return M
    if m:  # a complex scalar per pair: [[a, -b], [b, a]]
        mod = torch.exp(0.5 * torch.randn(m, generator=gen, dtype=torch.float64)).to(dtype)
        ang = (2 * torch.pi * torch.rand(m, generator=gen, dtype=torch.float64)).to(dtype)
        a, b = mod * torch.cos(ang), mod * torch.sin(ang)
        M[i, i], M[i, j], M[j, i], M[j, j] = a, -b, b, a
    rd = s.rotary_dims
    if rd < dh:  # pass-through dims: any invertible map
        M[rd:, rd:] = random_gl(dh - rd, gen, dtype)
    return M


def random_group_perm(n_heads: int, n_kv: int, gen: torch.Generator) -> np.ndarray:
    """A random element of S_r ≀ S_{n_kv}: permute groups, then heads inside each group."""
    r = n_heads // n_kv
    gp = torch.randperm(n_kv, generator=gen).numpy()
    perm = np.concatenate([gp[g] * r + torch.randperm(r, generator=gen).numpy() for g in range(n_kv)])
    return perm


@dataclass
class GaugeRecord:
    """What :func:`random_gauge` applied (for assertions and teaching)."""

    head_perm: np.ndarray
    mlp_perm: np.ndarray
    parts: list[str] = field(default_factory=list)


def random_gauge(layer: CanonicalLayer, seed: int | torch.Generator = 0,
                 permute: bool = True) -> tuple[CanonicalLayer, GaugeRecord]:
    """Apply a random element of the layer's whole exact gauge group.

    Composes, as the architecture allows: the QK group per KV group, GL(d_head) VO per KV
    group, key-bias shifts on non-rotary dims, value-bias folds, a GQA-respecting head
    permutation, an MLP unit permutation with GLU unit scales, norm folds (pre-norm models),
    LayerNorm reader null directions and writer centering shifts, Qwen3's head scales, pair
    swaps and gain trades, Gemma2's output scales. Returns the new layer and a record.
    """
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    s, dtype = layer.sym, layer.W_Q.dtype
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    parts: list[str] = []
    out = layer
    for g in range(s.n_kv_heads):
        out = qk_gauge(out, g, random_qk_element(out, gen))
        out = vo_gauge(out, g, random_gl(s.d_head, gen, dtype))
        if out.b_K is not None and s.rotary_dims < s.d_head:
            out = key_bias_shift(out, g, rnd(s.d_head - s.rotary_dims))
        if out.b_V is not None and out.b_O is not None:
            out = value_bias_fold(out, g, rnd(s.d_head))
    parts += ["qk", "vo"]
    if s.qk_norm:
        out = qwen3_head_scale(out, torch.exp(rnd(s.n_heads)), torch.exp(rnd(s.n_kv_heads)))
        out = qwen3_pair_swap(out, torch.nonzero(torch.rand(s.rope_pairs, generator=gen) < 0.5).flatten())
        out = qwen3_gain_trade(out, torch.exp(0.5 * rnd(s.rope_pairs)))
        parts += ["qwen3_head_scale", "qwen3_pair_swap", "qwen3_gain_trade"]
    if s.post_norms:
        out = output_scale(out, float(torch.exp(rnd(1))), float(torch.exp(rnd(1))))
        parts.append("output_scale")
    if s.is_glu:
        c = torch.exp(0.5 * rnd(s.d_ff)) * torch.where(torch.rand(s.d_ff, generator=gen) < 0.5, -1.0, 1.0).to(dtype)
        out = glu_unit_scale(out, c)
        parts.append("glu_unit_scale")
    if not s.post_ln:
        for role in ("attn_in", "mlp_in"):
            c = torch.exp(0.3 * rnd(s.d_model))
            shift = rnd(s.d_model) if s.norm_kind == "layer" else None
            out = norm_fold(out, role, c, shift)
        parts.append("norm_fold")
    if s.norm_kind == "layer":
        readers = {"attn_in": ("W_Q", "W_K", "W_V"), "mlp_in": ("W_up",)}
        for role, names in readers.items():
            out = reader_mean_null(out, role, {n: rnd(*getattr(out, n).shape[:-1]) for n in names})
        out = writer_center_shift(out, rnd(s.n_heads, s.d_head), float(rnd(1)), rnd(s.d_ff), float(rnd(1)))
        parts += ["reader_mean_null", "writer_center_shift"]
    head_perm = np.arange(s.n_heads)
    mlp_perm = np.arange(s.d_ff)
    if permute:
        head_perm = random_group_perm(s.n_heads, s.n_kv_heads, gen)
        mlp_perm = torch.randperm(s.d_ff, generator=gen).numpy()
        out = permute_mlp(permute_heads(out, head_perm), mlp_perm)
        parts += ["head_perm", "mlp_perm"]
    out.check()
    return out, GaugeRecord(head_perm, mlp_perm, parts)


__all__ = [n for n in dir() if not n.startswith("_") and n not in ("annotations", "dataclass", "field",
                                                                    "replace", "np", "torch", "Tensor")]
