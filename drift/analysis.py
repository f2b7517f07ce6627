"""``drift.analyze``: per-family drift between layer pairs, with a null and rho.

What is computed lives elsewhere: the methods (:mod:`drift.methods`), the null
(:mod:`drift.null`), the scheduling of comparisons (:mod:`drift.schedule`) and the memory
policy (:mod:`drift.memory`). This module checks the arguments, wires those together and
assembles the :class:`~drift.result.AnalysisResult`.
"""

from __future__ import annotations

import itertools
import logging
from typing import Callable, Iterable, Sequence

import torch

from . import __version__, families, memory, methods, schedule
from .canonical import LayerReader, open_layers
from .errors import DriftError, LayerIndexError
from .null import NullDraws, check_seed
from .result import AnalysisResult

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64}


FORM_BUDGET = 1 << 30
"""Default bytes of layer forms that :func:`analyze` keeps in host memory at once (at least two)."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise DriftError(f"device must be auto, cpu or cuda (cuda:N), not {device!r}")
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
    m = methods.get(method)
    if isinstance(n_null, bool) or not isinstance(n_null, int) or n_null < 0:
        raise DriftError(f"n_null must be an integer, 0 (no null) or more, not {n_null!r}")
    seed = check_seed(seed)
    tdtype = _dtype(dtype)
    reader = model if isinstance(model, LayerReader) else open_layers(str(model), tdtype)
    dev = resolve_device(device)
    layers = _layers(layers, reader.n_layers)
    plist = layer_pairs(layers, pairs)
    sym = reader.sym
    memory.for_layers(sym, torch.empty((), dtype=tdtype).element_size())

    # Layers are read in pair order; a form is dropped once every comparison using it is done.
    budget = form_budget if dev.type == "cpu" else float("inf")
    store = schedule.FormStore(
        lambda L: m.form(reader.read(L).map(lambda t: t.to(device=dev, dtype=tdtype)), consume=True),
        plist, budget)
    draws = NullDraws(sym.d_model, n_null, seed, tdtype, dev)
    shuffles: dict[int, torch.Generator] = {}  # pair -> its gain-shuffle generator, while in use
    obs: dict[int, dict[str, float]] = {}
    null_sum: dict[int, dict[str, float]] = {}
    left = {k: 1 + n_null for k in range(len(plist))}  # comparisons not yet finished, per pair
    bar = _progress_bar(progress, len(plist), method)

    def start(task: schedule.Task) -> methods.Comparison:
        a, b = plist[task.pair]
        fa, fb = store.get(a), store.get(b)
        if task.draw:
            gen = shuffles.setdefault(task.pair, draws.gains_generator(task.pair))
            fb = m.null_partner(fb, draws.rotation(task.draw - 1), gen)
        return m.compare(fa, fb)

    def done(task: schedule.Task, values: dict[str, float]) -> None:
        k = task.pair
        if task.draw == 0:
            obs[k] = values
        else:
            acc = null_sum.setdefault(k, {})
            for f, v in values.items():
                acc[f] = acc.get(f, 0.0) + v / n_null
        left[k] -= 1
        if left[k] == 0:
            bar.update(1)
            shuffles.pop(k, None)
        memory.release_memory()

    tasks = schedule.plan(len(plist), n_null)
    with schedule.executor_for(m.assigns, sym.d_ff, len(tasks), dev) as executor:
        schedule.run(tasks, start, executor, store, done)
    bar.close()
    reader.ckpt.close()
    name = str(model if not isinstance(model, LayerReader) else reader.ckpt.name)
    return _result(name, reader, m, plist, obs, null_sum,
                   dict(pairs=pairs, layers=layers, seed=seed, n_null=n_null, dtype=tdtype, device=dev))


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    name = str(dtype).replace("torch.", "")
    if name not in DTYPES:
        raise DriftError(f"dtype must be float32 or float64, not {dtype!r}")
    return DTYPES[name]


def _layers(layers: Iterable[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    out = []
    for L in list(layers):
        if isinstance(L, bool) or not hasattr(L, "__index__"):
            raise DriftError(f"layers must be integers, not {L!r}")
        L = int(L)
        if not 0 <= L < n_layers:
            raise LayerIndexError(f"layer {L} is out of range: the model has {n_layers} layers "
                                  f"(0..{n_layers - 1})")
        out.append(L)
    if len(out) < 2:
        raise DriftError(f"need at least two layers to compare, got {out}")
    return out


def _progress_bar(progress, total: int, method: str):
    if callable(progress):
        return _CallbackBar(progress, total)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"drift {method}", unit="pair", disable=not progress, leave=False)


def _result(name: str, reader: LayerReader, m: methods.Method, plist, obs, null_sum, args: dict) -> AnalysisResult:
    import pandas as pd  # here, not at import: its pages would count in every run's peak

    nan = float("nan")

    def rho(v: float, null: float) -> float:
        return v / null if null > 0 else nan  # NaN when there is no null (n_null=0) or it is 0

    s = reader.sym
    rows = [dict(family=f, layer_a=a, layer_b=b, residual=v, null=null, rho=rho(v, null),
                 invariant=families.invariant(m.name, s, f), kind=families.kind(f))
            for k, (a, b) in enumerate(plist) for f, v in obs[k].items()
            for null in [null_sum.get(k, {}).get(f, nan)]]
    df = pd.DataFrame(rows)
    order = families.order(list(dict.fromkeys(df["family"])))
    df["family"] = pd.Categorical(df["family"], categories=order, ordered=True)
    df = df.sort_values(["family", "layer_a", "layer_b"], kind="stable").reset_index(drop=True)
    df["family"] = df["family"].astype(str)
    n_null = args["n_null"]
    meta = dict(
        model=name, architecture=s.arch, method=m.name, pairs=args["pairs"], layers=args["layers"],
        seed=args["seed"], n_null=n_null, dtype=str(args["dtype"]).replace("torch.", ""),
        device=str(args["device"]), drift_version=__version__, approximate=m.approximate,
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
