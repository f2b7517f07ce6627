"""The two measures, as running sums over batches of tokens (torch, float64).

``angular_distance``   per-token angle between two residual streams, / π (Gromov et al. 2024)
``CrossCovariances``   centred d × d cross-covariances of per-layer features, and linear CKA
                       from them (Kornblith et al. 2019), without keeping any token
"""

from __future__ import annotations

from typing import Iterable

import torch


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """arccos(cos(a_t, b_t)) / π per row: (N, d), (N, d) -> (N,), in [0, 1]. A zero row gives 0.5."""
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-30)  # (N,)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / torch.pi


class CrossCovariances:
    """Running centred cross-covariances of per-layer features, for linear CKA of layer pairs.

    For each layer l it keeps n and s_l = Σ_t (x_{l,t} − μ_l) (d,), and for each needed key
    (i, j), the pairs and every (l, l), S_ij = Σ_t (x_{i,t} − μ_i)(x_{j,t} − μ_j)ᵀ (d, d), all
    in float64. μ_l is the first batch's mean: a shift that changes no centred quantity but
    keeps the raw sums from cancelling catastrophically when the features have a large mean
    (residual streams do). The centred cross-covariance is then
    Cᵢⱼ = S_ij − s_i s_jᵀ / n (times n; the 1/n cancels in CKA), and

        CKA(i, j) = ‖Cᵢⱼ‖_F² / (‖Cᵢᵢ‖_F ‖Cⱼⱼ‖_F)

    which equals the token-space form HSIC(K, L) / √(HSIC(K, K) HSIC(L, L)) with K = Xᶜ Xᶜᵀ,
    L = Yᶜ Yᶜᵀ, without the N × N Gram matrices. Memory: O(keys · d²), whatever N.
    """

    def __init__(self, pairs: Iterable[tuple[int, int]]):
        self.keys = sorted({k for i, j in pairs for k in ((i, j), (i, i), (j, j))})
        self.n = 0
        self.shift: dict[int, torch.Tensor] = {}
        self.s: dict[int, torch.Tensor] = {}
        self.S: dict[tuple[int, int], torch.Tensor] = {}

    def add(self, feats: dict[int, torch.Tensor]) -> None:
        """Add one batch: ``feats[l]`` (N, d) for every layer of the keys, the same N tokens."""
        if not len(next(iter(feats.values()))):
            return  # no tokens: nothing to add (and no mean to shift by)
        x = {}
        for l in {i for k in self.keys for i in k}:
            f = feats[l].to(torch.float64)  # (N, d)
            if l not in self.shift:
                self.shift[l] = f.mean(0)  # (d,)
                self.s[l] = torch.zeros_like(self.shift[l])
            x[l] = f - self.shift[l]
            self.s[l] += x[l].sum(0)
        for i, j in self.keys:
            prod = x[i].T @ x[j]  # (d, d)
            self.S[i, j] = prod if (i, j) not in self.S else self.S[i, j] + prod
        self.n += len(next(iter(x.values())))

    def centred(self, i: int, j: int) -> torch.Tensor:
        """Cᵢⱼ = Σ_t (x_{i,t} − x̄_i)(x_{j,t} − x̄_j)ᵀ  (d, d)."""
        return self.S[i, j] - torch.outer(self.s[i], self.s[j]) / self.n

    def cka(self, i: int, j: int) -> float:
        """Linear CKA of layers i and j; NaN when either has no variance."""
        den = torch.linalg.matrix_norm(self.centred(i, i)) * torch.linalg.matrix_norm(self.centred(j, j))
        return float(torch.linalg.matrix_norm(self.centred(i, j)) ** 2 / den) if den > 0 else float("nan")

