"""The null: what a method reports for a structure-preserving *unrelated* partner.

Each null draw compares layer A with layer B after B's residual stream is rotated by a
Haar-random orthogonal matrix (readers W ← W Rᵀ, writers W ← R W) and its gain entries are
shuffled (gauge-spec §5). The rotations are shared by every pair (draw j uses rotation j)
and drawn, in order, from one generator seeded with ``seed``; the gain shuffles of pair k
come from their own generator (seed ``1000·seed + k``), consumed in draw order.
"""

from __future__ import annotations

import operator
import threading
from collections import OrderedDict

import numpy as np
import torch

from .align import random_orthogonal
from .errors import DriftError

SEED_LIMIT = 2 ** 53
"""Seeds are below this: ``1000·seed + k`` must fit torch's 64-bit generator seed."""


def check_seed(seed) -> int:
    """``seed`` as an int in [0, SEED_LIMIT), or a DriftError naming it."""
    try:
        if isinstance(seed, (bool, np.bool_)):  # True is no seed (as for n_null)
            raise TypeError
        seed = operator.index(seed)
    except TypeError:
        raise DriftError(f"seed must be an integer, not {seed!r}") from None
    if not 0 <= seed < SEED_LIMIT:
        raise DriftError(f"seed must be in 0 .. 2^53 - 1, not {seed}")
    return seed


class NullDraws:
    """The residual rotations of ``n`` null draws, made when first asked for.

    Rotations are kept while they fit in ``budget`` bytes; beyond that, one is remade from
    the generator state saved before it was first drawn, so every pair sees the same
    numbers while ``n_null=4000`` holds a few hundred MB at most, not one matrix per draw."""

    def __init__(self, d: int, n: int, seed: int, dtype: torch.dtype, device: torch.device,
                 budget: int = 256 << 20):
        self.d, self.n, self.dtype, self.device = d, n, dtype, device
        self.seed = seed
        self._gen = torch.Generator().manual_seed(seed)
        self._states: list[torch.Tensor] = []  # generator state before draw j
        self._kept: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._room = max(1, budget // max(1, d * d * torch.empty((), dtype=dtype).element_size()))
        self.made = 0  # rotations made, remade ones included
        self._lock = threading.Lock()  # a Dask worker's threads may share one (drift.cluster.null_draws)

    def rotation(self, j: int) -> torch.Tensor:
        """Rotation of draw ``j`` (0 ≤ j < n)."""
        if not 0 <= j < self.n:
            raise IndexError(j)
        with self._lock:
            return self._rotation(j)

    def _rotation(self, j: int) -> torch.Tensor:
        if j in self._kept:
            self._kept.move_to_end(j)
            return self._kept[j]
        while len(self._states) <= j:  # first time: draw in order, saving the states
            self._states.append(self._gen.get_state())
            R = self._make(self._gen)
            self._keep(len(self._states) - 1, R)
        if j not in self._kept:
            self._keep(j, self._make(torch.Generator().set_state(self._states[j])))
        return self._kept[j]

    def _make(self, gen: torch.Generator) -> torch.Tensor:
        self.made += 1
        return random_orthogonal(self.d, gen, self.dtype).to(self.device)

    def _keep(self, j: int, R: torch.Tensor) -> None:
        self._kept[j] = R
        while len(self._kept) > self._room:
            self._kept.popitem(last=False)

    def gains_generator(self, pair: int) -> torch.Generator:
        """A new generator for the gain shuffles of pair ``pair`` (one per pair, used in draw order)."""
        return torch.Generator().manual_seed(self.seed * 1000 + pair)
