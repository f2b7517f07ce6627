"""``drift.analyze``: per-family drift between layer pairs, with a null and rho.

Pairs are layers of one model, or, with ``other``, layer i of model A against layer j of a
model B of the same architecture and layer shapes (a fine-tune against its base, two
revisions, two seeds): the same methods, null, result and cache either way.

What is computed lives elsewhere: the methods (:mod:`drift.methods`), the null
(:mod:`drift.null`), the scheduling of comparisons (:mod:`drift.schedule`) and the memory
policy (:mod:`drift.memory`). This module checks the arguments, wires those together and
assembles the :class:`~drift.result.AnalysisResult`.
"""

from __future__ import annotations

import itertools
import logging
import numbers
import operator
from typing import Callable, Iterable, Sequence

import torch

from . import __version__, families, memory, methods, schedule
from .canonical import LayerReader, open_layers
from .errors import DriftError, LayerIndexError, ModelMismatchError
from .null import NullDraws, check_seed
from .result import AnalysisResult

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64}


FORM_BUDGET = 1 << 30
"""Default bytes of layer forms that :func:`analyze` keeps in host memory at once (at least two)."""

N_NULL_WARN = 100
"""From this many null draws on, :func:`analyze` logs how many comparisons the run means
(each draw costs as much as the observed comparison; it starts without a word otherwise)."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise DriftError(f"device must be auto, cpu or cuda (cuda:N), not {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DriftError(f"device {str(device)!r} requested but no CUDA device is available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise DriftError(f"device {str(device)!r} requested but there {'is' if n == 1 else 'are'} only {n} "
                         f"CUDA device{'' if n == 1 else 's'} (cuda:0..cuda:{n - 1})")
    return dev


PAIRS = {False: ("consecutive", "all"), True: ("diagonal", "all")}
"""The ``pairs`` choices of one model (False) and of a model against ``other`` (True); the first is the default."""


def default_pairs(pairs: str | None, cross: bool) -> str:
    """``pairs``, or when None the default: ``consecutive`` for one model, ``diagonal`` for two."""
    return PAIRS[cross][0] if pairs is None else pairs


def layer_pairs(layers: Sequence[int], pairs: str, cross: bool = False) -> list[tuple[int, int]]:
    """The (layer_a, layer_b) pairs along ``layers``.

    One model: ``consecutive``: (L_k, L_{k+1}); ``all``: every i < j. A model against another
    (``cross``): ``diagonal``: (L, L); ``all``: every (i, j), i of A, j of B, both in ``layers``.
    """
    if pairs not in PAIRS[cross]:
        one, two = (f"'{a}' or '{b}'" for a, b in (PAIRS[False], PAIRS[True]))
        if pairs in PAIRS[not cross]:
            raise DriftError(f"pairs={pairs!r} needs other= (layer i of model against layer i of other)"
                             if not cross else
                             f"pairs={pairs!r} compares layers of one model; with other= pairs must be {two}")
        raise DriftError(f"pairs must be {two if cross else one}, not {pairs!r}")
    if pairs == "consecutive":
        return list(zip(layers[:-1], layers[1:]))
    if pairs == "diagonal":
        return [(L, L) for L in layers]
    if cross:
        return list(itertools.product(layers, layers))
    return list(itertools.combinations(layers, 2))


MATCHED_FIELDS = ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_head", "d_ff", "rope", "rotary_dims",
                  "rope_theta", "qk_norm", "norm_kind", "mlp_kind", "activation", "post_norms", "post_ln")
"""What two models must share, besides the architecture, to be compared layer by layer: the
shapes and every field that decides a layer's exact gauge group (:class:`LayerSymmetry`)."""


def check_comparable(a: LayerReader, b: LayerReader, name_a: str, name_b: str) -> None:
    """Refuse two models whose layers cannot be compared with one gauge group.

    Raises:
        ModelMismatchError: a different architecture, or the fields of :data:`MATCHED_FIELDS`
            that differ, each with both values, in one line.
    """
    if a.sym.arch != b.sym.arch:
        raise ModelMismatchError(f"cannot compare {name_a} with {name_b}: architecture differs "
                                 f"({a.sym.arch} vs {b.sym.arch})")

    def value(r: LayerReader, f: str):
        return r.n_layers if f == "n_layers" else getattr(r.sym, f)

    diff = [f"{f} {value(a, f)!r} vs {value(b, f)!r}" for f in MATCHED_FIELDS if value(a, f) != value(b, f)]
    if diff:
        raise ModelMismatchError(f"cannot compare {name_a} with {name_b} ({a.sym.arch}): "
                                 f"{', '.join(diff)}")


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


def analyze(model: str | LayerReader, layers: Iterable[int] | None = None, pairs: str | None = None,
            method: str = "exact", seed: int = 0, n_null: int = 1, dtype: str | torch.dtype = "float32",
            device: str | torch.device = "auto", progress: bool | Callable[[int, int], None] = True,
            form_budget: int = FORM_BUDGET, other: str | LayerReader | None = None,
            scheduler=None) -> AnalysisResult:
    """Drift between pairs of layers of ``model`` (or of ``model`` and ``other``), per weight family.

    Args:
        model: a local checkpoint folder, a repo id in the local HF cache (``org/name`` or
            ``org/name@revision``), ``"minilm"``, or an open :class:`LayerReader`.
        layers: the layers to compare (default: all). Pairs are formed along this order.
        pairs: one model: ``"consecutive"`` (default; the reference script's view) or ``"all"``
            (for heatmaps). With ``other``: ``"diagonal"`` (default; layer i of ``model``
            against layer i of ``other``) or ``"all"`` (every i of ``model`` against every j
            of ``other``, both among ``layers``).
        method: ``"exact"`` (remove exactly the model's symmetry group; default),
            ``"rotation"`` (the reference's per-head O(d_head) and O(d_ff) rotations, orientation
            corrected; approximate, not a symmetry) or ``"raw"`` (no alignment).
        seed: seed of the null's random residual rotations (results are reproducible).
        n_null: null draws averaged per pair (an integer, numpy's too). ``0`` computes no null
            (the reference script's work, about half the cost): ``null`` and ``rho`` are then
            NaN. Each draw costs as much as the observed comparison; from
            :data:`N_NULL_WARN` draws on, a warning says how many comparisons the run means.
        dtype: ``float32`` (default) or ``float64`` for all arithmetic.
        device: ``auto`` | ``cpu`` | ``cuda``.
        progress: show a tqdm bar over pairs; or a function ``progress(done, total)`` called
            with the number of pairs finished (the explorer draws its own bar with it).
        form_budget: bytes of layer forms to keep in host memory at once, a number > 0
            (always at least two forms are kept). Below ``n_layers`` forms, all-pairs runs make
            some forms more than once.
        other: a second model (same kinds as ``model``) of the same architecture and layer
            shapes: ``layer_a`` is then a layer of ``model``, ``layer_b`` a layer of ``other``,
            and the null partner is ``other``'s layer with its residual stream rotated. The
            same model twice is allowed (its diagonal is 0).
        scheduler: where the pairs run. ``None``: here. An address (``"tcp://host:8786"``) or
            a ``distributed.Client``: one task per pair on that Dask cluster, each worker
            opening ``model`` (and ``other``) itself, so they must be names, not open readers,
            that mean the same checkpoint there (:mod:`drift.cluster`; needs the ``cluster``
            extra). The result is the local one, number for number. A client made from an
            address is closed at the end; a given Client is left open.

    Returns:
        An :class:`AnalysisResult`: one row per (family, pair) with ``residual`` (unit-normalised
        Frobenius distance after alignment), ``null`` (the same method against layer_b with its
        residual stream randomly rotated, or its gain entries shuffled), ``rho = residual / null``.
        With ``other``, ``meta["other"]`` holds its name and checkpoint identity.

    Raises:
        ModelMismatchError: ``other`` has another architecture, depth or layer shapes.
        DriftError: bad method/pairs/device/n_null/seed/form_budget, a layer out of range, fewer
            than two layers (one model), or any checkpoint problem (see :mod:`drift.errors`);
            with ``scheduler``, an open reader, no ``distributed`` installed, an address no
            scheduler can have, or none answering there within
            :data:`drift.cluster.CONNECT_TIMEOUT`.
    """
    m = methods.get(method)
    n_null = _count(n_null)
    form_budget = _form_budget(form_budget)
    seed = check_seed(seed)
    tdtype = _dtype(dtype)
    cross = other is not None
    pairs = default_pairs(pairs, cross)
    layer_pairs([], pairs, cross)  # a bad choice is named before any checkpoint is opened
    if scheduler is not None:
        from . import cluster

        cluster.check(scheduler, (model, other))
    readers, names = _readers(model, other, tdtype)  # form key (k, L): layer L of readers[k]
    reader = readers[0]
    dev = resolve_device(device)
    layers = _layers(layers, reader.n_layers, minimum=1 if cross else 2)
    plist = layer_pairs(layers, pairs, cross)
    keys = [((0, a), (1 if cross else 0, b)) for a, b in plist]  # the store's pairs
    if n_null >= N_NULL_WARN:
        log.warning(f"n_null={n_null} means {len(plist) * (1 + n_null):,} comparisons ({len(plist)} pairs x "
                    f"(1 observed + {n_null} null)), about {(1 + n_null) / 2:,.0f} times the work of the "
                    f"default n_null=1")
    memory.for_layers(reader.sym, torch.empty((), dtype=tdtype).element_size())
    bar = _progress_bar(progress, len(plist), f"drift {method}")
    try:
        if scheduler is None:
            obs, null_sum, certs = compare_pairs(readers, m, keys, range(len(plist)), n_null, seed, tdtype, dev,
                                                 form_budget, bar)
        else:
            obs, null_sum, certs = cluster.compare_pairs(scheduler, (model, other), m, keys, n_null, seed, tdtype,
                                                  dev, form_budget, bar)
    finally:
        bar.close()
        for r in readers:
            r.ckpt.close()
    result = _result(names[0], reader, m, plist, obs, null_sum,
                     dict(pairs=pairs, layers=layers, seed=seed, n_null=n_null, dtype=tdtype, device=dev))
    if cross:
        result.meta["other"] = dict(model=names[1], identity=readers[1].ckpt.identity())
    if certs:
        result.meta["assignment"] = assignment_summary(certs)
    return result


def assignment_summary(certs: Sequence[dict]) -> dict:
    """What the results say of their MLP assignments solved by the certified sparse path
    (``meta["assignment"]``): ``assignments`` solved, ``dense_fallbacks`` among them that
    scipy's dense solver decided, ``max_rounds`` of sparse solves one needed, ``violators``
    (entries that joined the candidates after a scan, in all), ``max_relative_gap_bound`` (the
    largest proven gap to the optimum over the objective; above 1e-9 is an error, never
    reported), ``remade_blocks`` (blocks of a similarity made again because its float16 copy
    could not settle an entry)."""
    return dict(
        solver="certified sparse (scipy min_weight_full_bipartite_matching on each row's top-k "
               "candidates, then an LP-duality check of every dense entry; drift.certified)",
        assignments=len(certs), dense_fallbacks=sum(c["dense_fallback"] for c in certs),
        max_rounds=max(c["rounds"] for c in certs), violators=sum(c["violators"] for c in certs),
        max_relative_gap_bound=max(c["relative_gap_bound"] for c in certs),
        remade_blocks=sum(c["remade_blocks"] for c in certs))


Values = dict[int, dict[str, float]]
"""Per pair (its index in the analysis's pair list), a value per family."""


def compare_pairs(readers: Sequence[LayerReader], m: methods.Method, keys: Sequence[tuple],
                  ids: Iterable[int], n_null: int, seed: int, dtype: torch.dtype, dev: torch.device,
                  form_budget: int, bar, executor=None, draws: NullDraws | None = None) -> tuple[Values, Values, list[dict]]:
    """The observed values and null means of the pairs ``ids``, as ``(obs, null_sum, certs)``,
    with a summary of each certified assignment (``certs``, see :meth:`_Tally.certified`).

    ``keys`` is the analysis's whole pair list, as form keys ``(model, layer)`` into
    ``readers``; ``ids`` index it. A pair's numbers do not depend on which others run with
    it: null draw j's rotation is the same for every pair, and pair k's gain shuffles are
    seeded by k, so a subset (one pair on a cluster worker) gives the whole run's values.
    ``executor``: the :mod:`drift.schedule` executor (default: worker processes where worth it).
    ``draws``: the null's rotations, for a caller that runs many subsets (made here by default).
    """
    ids = list(ids)
    sub = [keys[k] for k in ids]
    sym = readers[0].sym
    # Layers are read in pair order; a form is dropped once every comparison using it is done.
    budget = form_budget if dev.type == "cpu" else float("inf")
    store = schedule.FormStore(
        lambda key: m.form(readers[key[0]].read(key[1]).map(lambda t: t.to(device=dev, dtype=dtype)),
                           consume=True),
        sub, budget)
    if draws is None:
        draws = NullDraws(sym.d_model, n_null, seed, dtype, dev)
    tally = _Tally(ids, n_null, bar)

    def start(task: schedule.Task) -> methods.Comparison:
        a, b = sub[task.pair]
        fa, fb = store.get(a), store.get(b)
        if task.draw:
            tally.no_null.setdefault(task.pair, fa.constant_gains() | fb.constant_gains())
            fb = m.null_partner(fb, draws.rotation(task.draw - 1), tally.shuffle(task.pair, draws))
        return m.compare(fa, fb)

    tasks = schedule.plan(len(sub), n_null)
    if executor is None:
        executor = schedule.executor_for(m.assigns, sym.d_ff, len(tasks), dev)
    with executor:
        schedule.run(tasks, start, executor, store, tally.done, tally.certified)
    return tally.obs, tally.null_sum, tally.certs


class _Tally:
    """The comparisons' values as they arrive: observed per pair, the null's mean over its
    draws; a pair's bar step and gain-shuffle generator end with its last comparison. Tasks
    name pairs by position in ``ids``; the values are keyed by the pair's index ``ids[i]``."""

    def __init__(self, ids: Sequence[int], n_null: int, bar):
        self.ids, self.n_null, self.bar = ids, n_null, bar
        self.obs: Values = {}
        self.null_sum: Values = {}
        self.left = {i: 1 + n_null for i in range(len(ids))}  # comparisons not yet finished, per pair
        self.shuffles: dict[int, torch.Generator] = {}  # pair -> its gain-shuffle generator, while in use
        self.certs: list[dict] = []
        self.no_null: dict[int, set[str]] = {}  # pair -> gain families whose null is NaN (constant gains)

    def shuffle(self, i: int, draws: NullDraws) -> torch.Generator:
        return self.shuffles.setdefault(i, draws.gains_generator(self.ids[i]))

    def certified(self, task: schedule.Task, cert) -> None:
        scale = max(abs(cert.objective), 1e-300)
        self.certs.append(dict(rounds=cert.rounds, violators=sum(cert.violators), dense_fallback=cert.dense_fallback,
                               relative_gap_bound=0.0 if cert.dense_fallback else cert.gap_bound / scale,
                               remade_blocks=cert.remade_blocks))

    def done(self, task: schedule.Task, values: dict[str, float]) -> None:
        i, k = task.pair, self.ids[task.pair]
        if task.draw == 0:
            self.obs[k] = values
        else:
            acc = self.null_sum.setdefault(k, {})
            for f, v in values.items():
                acc[f] = float("nan") if f in self.no_null.get(i, ()) else acc.get(f, 0.0) + v / self.n_null
        self.left[i] -= 1
        if self.left[i] == 0:
            self.bar.update(1)
            self.shuffles.pop(i, None)
            self.no_null.pop(i, None)
        memory.release_memory()


def _readers(model, other, dtype: torch.dtype) -> tuple[list[LayerReader], list[str]]:
    """The model's reader (and ``other``'s, checked comparable), and their names."""
    readers = [_open(model, dtype)]
    names = [_name(model, readers[0])]
    if other is not None:
        readers.append(_open(other, dtype))
        names.append(_name(other, readers[1]))
        check_comparable(readers[0], readers[1], *names)
    return readers, names


def _open(model: str | LayerReader, dtype: torch.dtype) -> LayerReader:
    return model if isinstance(model, LayerReader) else open_layers(str(model), dtype)


def _name(model: str | LayerReader, reader: LayerReader) -> str:
    return str(model if not isinstance(model, LayerReader) else reader.ckpt.name)


def _count(n_null) -> int:
    """``n_null`` as an int >= 0: a Python or numpy integer, not a bool or a float."""
    try:
        n = None if isinstance(n_null, bool) else operator.index(n_null)  # numpy's bool has no __index__
    except TypeError:
        n = None
    if n is None or n < 0:
        raise DriftError(f"n_null must be an integer, 0 (no null) or more, not {n_null!r}")
    return n


def _form_budget(form_budget) -> float:
    """``form_budget`` as a number of bytes > 0 (an int, a float such as 2e9, or inf)."""
    ok = isinstance(form_budget, numbers.Real) and not isinstance(form_budget, bool)  # numpy's bool is no Real
    if not ok or not form_budget > 0:  # NaN fails > 0
        raise DriftError(f"form_budget must be a number of bytes > 0 (e.g. {FORM_BUDGET} = 1 GiB), "
                         f"not {form_budget!r}")
    return form_budget


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    name = str(dtype).replace("torch.", "")
    if name not in DTYPES:
        raise DriftError(f"dtype must be float32 or float64, not {dtype!r}")
    return DTYPES[name]


def _layers(layers: Iterable[int] | None, n_layers: int, minimum: int = 2) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise DriftError(f"layers must be an iterable of layer numbers, not {layers!r}")
    out = []
    try:
        given = list(layers)
    except TypeError:  # a number, a 0-d array
        raise DriftError(f"layers must be a list of layer numbers, not {layers!r}") from None
    for L in given:
        if isinstance(L, bool) or not hasattr(L, "__index__") or getattr(L, "ndim", 0):
            raise DriftError(f"layers must be integers, not {L!r}")
        L = int(L)
        if not 0 <= L < n_layers:
            raise LayerIndexError(f"layer {L} is out of range: the model has {n_layers} layers "
                                  f"(0..{n_layers - 1})")
        if L in out:  # a layer twice would compare it with itself (a residual of 0) or repeat pairs
            raise DriftError(f"layers must be distinct: layer {L} appears twice")
        out.append(L)
    if len(out) < minimum:
        raise DriftError(f"need at least {'two layers' if minimum == 2 else 'one layer'} to compare, got {out}")
    return out


def _progress_bar(progress, total: int, desc: str, unit: str = "pair"):
    """A tqdm bar (``progress`` True/False), or ``progress(done, total)`` called as it advances."""
    if callable(progress):
        return _CallbackBar(progress, total)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not progress, leave=False)


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
        model=name, identity=reader.ckpt.identity(), architecture=s.arch, method=m.name, pairs=args["pairs"], layers=args["layers"],
        seed=args["seed"], n_null=n_null, dtype=str(args["dtype"]).replace("torch.", ""),
        device=str(args["device"]), drift_version=__version__, approximate=m.approximate,
        config=dict(n_layers=reader.n_layers, d_model=s.d_model, n_heads=s.n_heads,
                    n_kv_heads=s.n_kv_heads, d_head=s.d_head, d_ff=s.d_ff, rope=s.rope,
                    rotary_dims=s.rotary_dims, qk_norm=s.qk_norm, mlp=s.mlp_kind, norm=s.norm_kind),
        residual="Frobenius distance after alignment, each family unit-normalised per layer",
        null=("same method against layer_b with its residual stream randomly rotated "
              "(gain vectors: entries shuffled; NaN for a gain whose entries are all equal, which "
              "no shuffle moves); mean over n_null draws"
              if n_null else "not computed (n_null=0): null and rho are NaN (null in JSON)"),
        rho="residual / null (0: identical up to the removed gauge; 1: as different as unrelated)",
    )
    return AnalysisResult(df, meta)
