"""Alignment primitives: small pure functions over a group, in torch.

Conventions. Every aligner moves layer *A* onto layer *B* (B is held fixed). A group element
acts on the **left** of a matrix whose rows are the gauge index (a head's d_head rows, an MLP
unit); a matrix that transforms as ``W Rᵀ`` (``W_O``, ``W_down``) enters transposed.
All residuals are plain Frobenius norms of the difference; callers normalise first.

See gauge-spec §4 for the derivations.
"""

from __future__ import annotations

from typing import Sequence

import torch

Tensor = torch.Tensor


def fro(x: Tensor, keep: int = 0) -> Tensor:
    """Frobenius norm over every axis after the first ``keep`` (``keep=1``: one norm per head).

    Summed from the norms of the last axis's rows: torch's float32 CPU norm of a whole large
    tensor loses precision (relative error 7e-5 on 3M entries, enough to move a reported
    residual in its fifth digit), while row norms of a few thousand entries are exact to
    float32 rounding and their squares sum accurately.
    """
    lead = x.shape[:keep]
    rows = x.reshape(*lead, -1, x.shape[-1]) if x.dim() - keep >= 2 else x.reshape(*lead, 1, -1)
    return rows.norm(dim=-1).square().sum(-1).sqrt()



def polar(M: Tensor) -> Tensor:
    """Orthogonal polar factor ``U Vᵀ`` of ``M = U S Vᵀ``: the R ∈ O(n) maximising tr(Rᵀ M).

    Batched over leading axes. Not unique when M is rank-deficient; the part that is fixed
    (R on the row space of Mᵀ) is what every residual below depends on.
    """
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    return U @ Vh



def procrustes(As: Sequence[Tensor], Bs: Sequence[Tensor]) -> Tensor:
    """Joint left orthogonal Procrustes.

    Minimises ``Σ_j ‖R A_j − B_j‖_F`` subject to ``RᵀR = I``, where every ``A_j, B_j`` is
    (..., n, p_j) and R is (..., n, n). The solution is ``R = polar(Σ_j B_j A_jᵀ)``.

    Note the orientation: the cross-covariance is ``B Aᵀ``. The reference script built
    ``A Bᵀ`` and so returned ``R0ᵀ`` on a planted rotation ``B = R0 A`` (gauge-spec §4.1).
    scipy's ``orthogonal_procrustes(A, B)`` solves the *right* action ``‖A Ω − B‖``; the left
    action here equals ``orthogonal_procrustes(A.T, B.T)[0].T``.
    """
    M = None
    for A, B in zip(As, Bs):  # accumulated in place: one n×n matrix, however many terms
        if M is None:
            M = B @ A.transpose(-1, -2)  # (..., n, n)
        elif M.dim() == 2:
            M.addmm_(B, A.T)
        else:
            M += B @ A.transpose(-1, -2)
    return polar(M)



def procrustes_thin(As: Sequence[Tensor], Bs: Sequence[Tensor]) -> list[Tensor]:
    """``[R A_j]`` for the joint left Procrustes R, without forming the n×n matrix R.

    For n larger than the stacked width p = Σ p_j (an O(d_ff) rotation of MLP units with
    p = 3·d_model) use thin QR: ``Ā = Q_a R_a``, ``B̄ = Q_b R_b``, so
    ``Σ B_j A_jᵀ = Q_b (R_b R_aᵀ) Q_aᵀ`` and only a p×p SVD is needed. R is fixed on the span
    of ``Q_a``, which is all that ``R A_j`` sees.
    """
    n, p = As[0].shape[-2], sum(a.shape[-1] for a in As)
    if p >= n:
        R = procrustes(As, Bs)
        return [R @ a for a in As]
    A = torch.cat(list(As), dim=-1)  # (n, p)
    B = torch.cat(list(Bs), dim=-1)
    Qa, Ra = torch.linalg.qr(A)  # (n, p), (p, p)
    Qb, Rb = torch.linalg.qr(B)
    small = polar(Rb @ Ra.transpose(-1, -2))  # (p, p)
    return [Qb @ (small @ (Qa.transpose(-1, -2) @ a)) for a in As]



def _inv_sqrt_psd(G: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(G^{1/2}, G^{-1/2}) of a symmetric PSD matrix by eigh (eigenvalues floored at eps·max)."""
    w, E = torch.linalg.eigh(G)
    w = w.clamp_min(eps * w.max(dim=-1, keepdim=True).values.clamp_min(1e-300))
    Et = E.transpose(-1, -2)
    return (E * w.sqrt()[..., None, :]) @ Et, (E * w.rsqrt()[..., None, :]) @ Et



def balance_gl(A: Tensor, B: Tensor, eps: float = 1e-14) -> tuple[Tensor, Tensor]:
    """Balanced canonical factors of a GL(d) gauge pair.

    ``A`` (..., d, p) transforms as ``A ← M A`` and ``B`` (..., d, q) as ``B ← M⁻ᵀ B`` for any
    M ∈ GL(d): the product ``Aᵀ B`` (p, q) is the invariant. Returns ``(A_bal, B_bal)`` with
    ``A_balᵀ B_bal = Aᵀ B`` and ``A_bal A_balᵀ = B_bal B_balᵀ = S`` (diagonal, the singular
    values of ``AᵀB``). Two inputs related by a GL gauge give outputs related by an O(d)
    rotation only (gauge-spec §4.4b). Used for VO (A = V_g, B = stacked ``O_hᵀ``) and for QK
    without RoPE (A = stacked Q_h, B = K_g).

    Instead of two thin QRs (slow on CPU for tall matrices), the orthonormal factors come from
    the d×d Grams: with ``G_a = A Aᵀ``, ``Q_a = Aᵀ G_a^{-1/2}`` has orthonormal columns and
    ``Aᵀ = Q_a G_a^{1/2}``. All d×d work is in float64; only two (d, p) products touch the
    full matrices. Assumes A and B have full row rank d (true for trained and random weights).
    """
    dt = A.dtype
    left, right = gl_balancer(A, B, eps)
    return (left.to(dt) @ A), (right.to(dt) @ B)


def gl_balancer(A: Tensor, B: Tensor, eps: float = 1e-14) -> tuple[Tensor, Tensor]:
    """The float64 (d, d) maps of :func:`balance_gl`: ``A_bal = left A``, ``B_bal = right B``,
    with ``right = left⁻ᵀ`` (so ``left`` is the GL gauge element that balances the pair)."""
    A64, B64 = A.double(), B.double()
    Ga, Gb = A64 @ A64.transpose(-1, -2), B64 @ B64.transpose(-1, -2)  # (d, d)
    Ra, Ra_inv = _inv_sqrt_psd(Ga, eps)
    Rb, Rb_inv = _inv_sqrt_psd(Gb, eps)
    u, s, vh = torch.linalg.svd(Ra @ Rb)  # Ra, Rb symmetric: Aᵀ B = Q_a (Ra Rb) Q_bᵀ
    root = s.sqrt()[..., :, None]
    left = root * (u.transpose(-1, -2) @ Ra_inv)  # (d, d): A_bal = s^{1/2} uᵀ Ga^{-1/2} A
    right = root * (vh @ Rb_inv)  # B_bal = s^{1/2} vᵀ Gb^{-1/2} B
    return left, right



def random_orthogonal(n: int, generator: torch.Generator, dtype=torch.float64) -> Tensor:
    """A Haar-random element of O(n) (QR of a Gaussian, signs fixed by diag(R))."""
    X = torch.randn(n, n, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(X)
    Q = Q * torch.sign(torch.diagonal(R))[None, :]
    return Q.to(dtype)

