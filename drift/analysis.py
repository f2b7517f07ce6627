"""``drift.analyze``: per-family drift between layer pairs, with a null and rho."""

from __future__ import annotations

import itertools
import logging
from collections import deque
from typing import Callable, Iterable, Sequence

import torch

from . import __version__
from .align import lap_pool, lap_submit, random_orthogonal, release_memory, wait
from .canonical import LayerReader, open_layers
from .errors import DriftError, LayerIndexError
from .methods import AWAIT, METHOD_FORMS, METHOD_STEPS, METHODS, family_invariant, family_kind
from .result import AnalysisResult

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64}


FORM_BUDGET = 1 << 30
"""Default bytes of layer forms that :func:`analyze` keeps in host memory at once (at least two)."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DriftError("--device cuda requested but no CUDA device is available")
    return dev


def layer_pairs(layers: Sequence[int], pairs: str) -> list[tuple[int, int]]:
    """``consecutive``: (L_k, L_{k+1}) along ``layers``; ``all``: every i < j."""
    if pairs == "consecutive":
        return list(zip(layers[:-1], layers[1:]))
    if pairs == "all":
        return list(itertools.combinations(layers, 2))
    raise DriftError(f"pairs must be 'consecutive' or 'all', not {pairs!r}")


class _CallbackBar:
    """The two methods of a tqdm bar that ``analyze`` uses, reporting to ``fn(done, total)``."""

    def __init__(self, fn: Callable[[int, int], None], total: int):
        self.fn, self.total, self.done = fn, total, 0
        fn(0, total)

    def update(self, n: int = 1) -> None:
        self.done += n
        self.fn(self.done, self.total)

    def close(self) -> None:
        pass


def analyze(model: str | LayerReader, layers: Iterable[int] | None = None, pairs: str = "consecutive",
            method: str = "exact", seed: int = 0, n_null: int = 1, dtype: str | torch.dtype = "float32",
            device: str | torch.device = "auto", progress: bool | Callable[[int, int], None] = True,
            form_budget: int = FORM_BUDGET) -> AnalysisResult:
    """Drift between pairs of layers of ``model``, per weight family.

    Args:
        model: a local checkpoint folder, a repo id in the local HF cache, ``"minilm"``, or an
            open :class:`LayerReader`.
        layers: the layers to compare (default: all). Pairs are formed along this order.
        pairs: ``"consecutive"`` (the reference script's view) or ``"all"`` (for heatmaps).
        method: ``"exact"`` (remove exactly the model's symmetry group; default),
            ``"rotation"`` (the reference's per-head O(d_head) and O(d_ff) rotations, orientation
            corrected; approximate, not a symmetry) or ``"raw"`` (no alignment).
        seed: seed of the null's random residual rotations (results are reproducible).
        n_null: null draws averaged per pair. ``0`` computes no null (the reference script's
            work, about half the cost): ``null`` and ``rho`` are then NaN.
        dtype: ``float32`` (default) or ``float64`` for all arithmetic.
        device: ``auto`` | ``cpu`` | ``cuda``.
        progress: show a tqdm bar over pairs; or a function ``progress(done, total)`` called
            with the number of pairs finished (the explorer draws its own bar with it).
        form_budget: bytes of layer forms to keep in host memory at once (always at least
            two forms). Below ``n_layers`` forms, all-pairs runs make some forms more than once.

    Returns:
        An :class:`AnalysisResult`: one row per (family, pair) with ``residual`` (unit-normalised
        Frobenius distance after alignment), ``null`` (the same method against layer_b with its
        residual stream randomly rotated, or its gain entries shuffled), ``rho = residual / null``.

    Raises:
        DriftError: bad method/pairs/device, a layer out of range, fewer than two layers,
            or any checkpoint problem (see :mod:`drift.errors`).
    """
    if method not in METHODS:
        raise DriftError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    if n_null < 0:
        raise DriftError(f"n_null must be 0 (no null) or more, not {n_null}")
    reader = model if isinstance(model, LayerReader) else None
    tdtype = DTYPES.get(str(dtype).replace("torch.", ""), None) if not isinstance(dtype, torch.dtype) else dtype
    if tdtype is None:
        raise DriftError(f"dtype must be float32 or float64, not {dtype!r}")
    if reader is None:
        reader = open_layers(str(model), tdtype)
    dev = resolve_device(device)
    layers = list(range(reader.n_layers)) if layers is None else [int(x) for x in layers]
    for L in layers:
        if not 0 <= L < reader.n_layers:
            raise LayerIndexError(f"layer {L} is out of range: the model has {reader.n_layers} layers "
                                  f"(0..{reader.n_layers - 1})")
    if len(layers) < 2:
        raise DriftError(f"need at least two layers to compare, got {layers}")
    plist = layer_pairs(layers, pairs)
    form_fn = METHOD_FORMS[method]

    forms: dict[int, object] = {}
    uses = {L: [k for k, p in enumerate(plist) if L in p] for L in layers}
    form_bytes = [0]  # the size of one form, once one is made

    def form(L: int):
        if L not in forms:
            forms[L] = form_fn(reader.read(L).map(lambda t: t.to(device=dev, dtype=tdtype)), consume=True)
            release_memory()
            if not form_bytes[0]:
                form_bytes[0] = _nbytes(forms[L])
        return forms[L]

    gen = torch.Generator().manual_seed(int(seed))
    # One random residual rotation per null draw, shared by every pair: each pair's null is
    # still layer_b against an independent random rotation of itself (d_model QRs are not free).
    rotations = [random_orthogonal(reader.sym.d_model, gen, tdtype).to(dev) for _ in range(n_null)]
    null_gens = [torch.Generator().manual_seed(int(seed) * 1000 + k) for k in range(len(plist))]

    from tqdm.auto import tqdm

    # Each pair is one observed comparison plus n_null null ones. A comparison is a generator
    # (see methods.run_steps) that yields its large assignment problem (exact: the MLP units),
    # then does the work that does not need the answer, then yields AWAIT and receives it.
    # The assignments run in worker processes while this thread goes on with that work and
    # with the next comparisons, at most `workers` in flight. Layers are read in pair order
    # and a layer's form is dropped once every comparison that uses it has finished.
    steps_fn = METHOD_STEPS[method]
    workers = _workers(reader.sym.d_ff, len(plist) * (1 + n_null), method)
    obs: dict[int, dict[str, float]] = {}
    null_sum: dict[int, dict[str, float]] = {}
    left = {k: 1 + n_null for k in range(len(plist))}  # comparisons not yet finished, per pair
    if callable(progress):
        bar = _CallbackBar(progress, len(plist))
    else:
        bar = tqdm(total=len(plist), desc=f"drift {method}", unit="pair", disable=not progress, leave=False)

    def finished(task: tuple[int, int], values: dict[str, float]) -> None:
        k, j = task
        if j == 0:
            obs[k] = values
        else:
            acc = null_sum.setdefault(k, {})
            for f, v in values.items():
                acc[f] = acc.get(f, 0.0) + v / n_null
        left[k] -= 1
        if left[k] == 0:
            bar.update(1)
            for L in list(forms):
                if all(left[i] == 0 for i in uses[L]):
                    forms.pop(L)
        release_memory()

    def start(task: tuple[int, int]):
        k, j = task
        a, b = plist[k]
        fa, fb = form(a), form(b)
        if j:  # exact rotates the MLP blocks as it reads them: no rotated copy of the MLP
            fb = fb.rotate_residual(rotations[j - 1], lazy_mlp=method == "exact").shuffle_gains(null_gens[k])
        gen = steps_fn(fa, fb)
        try:
            fut = lap_submit(next(gen), maximize=True)
            if next(gen) is not AWAIT:
                raise AssertionError("a comparison must yield AWAIT after its assignment")
            return gen, fut
        except StopIteration as stop:
            finished(task, stop.value)
            return None

    inflight: deque = deque()

    # Forms held in host memory stay within `form_budget` bytes where the pair order allows:
    # before a comparison needs a new form, earlier comparisons are finished (their forms
    # dropped) and, if still over, forms that the next pair does not use are dropped and made
    # again when needed. At the 4B shape (0.4 GB a form) this keeps two forms, not four.
    budget = form_budget if dev.type == "cpu" else float("inf")

    def over(pair: tuple[int, int]) -> bool:
        new = sum(L not in forms for L in set(pair))
        return bool(new) and (len(forms) + new) * form_bytes[0] > max(budget, 2 * form_bytes[0])

    def make_room(pair: tuple[int, int]) -> None:
        while inflight and over(pair):
            finish_oldest()
        if over(pair):
            for L in [L for L in forms if L not in pair]:
                if over(pair):
                    forms.pop(L)
            release_memory()

    def finish_oldest() -> None:
        task, gen, fut = inflight.popleft()
        try:
            gen.send(wait(fut))
            raise AssertionError("a comparison yielded a second assignment")
        except StopIteration as stop:
            finished(task, stop.value)

    # While assignment workers run, this thread's torch ops get the cores they leave: on 2
    # cores, a 2-thread OpenMP region next to a busy worker waits on its descheduled thread.
    threads = torch.get_num_threads()
    if workers > 1 and dev.type == "cpu":
        torch.set_num_threads(max(1, threads - workers + 1))
    try:
        with lap_pool(workers):
            for task in ((k, j) for k in range(len(plist)) for j in range(1 + n_null)):
                make_room(plist[task[0]])
                started = start(task)
                if started is not None:
                    inflight.append((task, *started))
                while len(inflight) >= max(workers, 1):
                    finish_oldest()
            while inflight:
                finish_oldest()
    finally:
        torch.set_num_threads(threads)
    bar.close()
    nan = float("nan")

    def rho(v: float, null: float) -> float:
        return v / null if null > 0 else nan  # NaN when there is no null (n_null=0) or it is 0

    rows = [dict(family=f, layer_a=a, layer_b=b, residual=v, null=null, rho=rho(v, null),
                 invariant=family_invariant(method, reader.sym, f), kind=family_kind(f))
            for k, (a, b) in enumerate(plist) for f, v in obs[k].items()
            for null in [null_sum.get(k, {}).get(f, nan)]]
    reader.ckpt.close()
    import pandas as pd  # here, not at import: its pages would count in every run's peak

    df = pd.DataFrame(rows)
    order = _family_order(list(dict.fromkeys(df["family"])))
    df["family"] = pd.Categorical(df["family"], categories=order, ordered=True)
    df = df.sort_values(["family", "layer_a", "layer_b"], kind="stable").reset_index(drop=True)
    df["family"] = df["family"].astype(str)
    s = reader.sym
    meta = dict(
        model=str(model if not isinstance(model, LayerReader) else reader.ckpt.name),
        architecture=s.arch, method=method, pairs=pairs, layers=layers, seed=int(seed), n_null=n_null,
        dtype=str(tdtype).replace("torch.", ""), device=str(dev), drift_version=__version__,
        approximate=method != "exact",
        config=dict(n_layers=reader.n_layers, d_model=s.d_model, n_heads=s.n_heads,
                    n_kv_heads=s.n_kv_heads, d_head=s.d_head, d_ff=s.d_ff, rope=s.rope,
                    rotary_dims=s.rotary_dims, qk_norm=s.qk_norm, mlp=s.mlp_kind, norm=s.norm_kind),
        residual="Frobenius distance after alignment, each family unit-normalised per layer",
        null=("same method against layer_b with its residual stream randomly rotated "
              "(gain vectors: entries shuffled); mean over n_null draws"
              if n_null else "not computed (n_null=0): null and rho are NaN"),
        rho="residual / null (0: identical up to the removed gauge; 1: as different as unrelated)",
    )
    return AnalysisResult(df, meta)


def _nbytes(form) -> int:
    """Bytes held by a form's tensors."""
    from dataclasses import fields

    total = 0
    for f in fields(form):
        v = getattr(form, f.name)
        for t in (v.values() if isinstance(v, dict) else [v]):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _workers(d_ff: int, n_tasks: int, method: str) -> int:
    """Assignment worker processes: only worth starting when there are large assignments."""
    import os

    from .align import POOL_MIN_SIZE

    if method != "exact" or n_tasks < 2 or d_ff < POOL_MIN_SIZE:
        return 1
    return max(1, min(os.cpu_count() or 1, n_tasks))


_ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
          "qk_circuit", "ov_circuit", "input_ln", "post_attn_ln", "attn_out_ln", "mlp_out_ln",
          "q_norm", "k_norm"]


def _family_order(families: list[str]) -> list[str]:
    return [f for f in _ORDER if f in families] + [f for f in families if f not in _ORDER]
