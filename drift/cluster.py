"""An analysis's layer pairs on a Dask ``distributed`` cluster (``pip install 'gauge-drift[cluster]'``).

``drift.analyze(..., scheduler=...)`` sends each layer pair, its observed comparison and all
its null draws, to a worker as one task. The worker opens the checkpoint itself, from the
path (made absolute), repo id or bundled name the caller gave, so that name must mean the
same checkpoint on every worker (a shared file system, the same HF cache); an open
:class:`~drift.canonical.LayerReader` cannot travel and is refused.

The numbers are the local run's: null draw j's rotation comes from the seed alone and pair
k's gain shuffles from the seed and k, so a worker computes pair k under its index in the
whole pair list (:func:`drift.analysis.compare_pairs`). They are equal bit for bit where the
torch thread counts are equal: Dask starts its workers with ``OMP_NUM_THREADS=1``, and
torch's float32 kernels round differently on more threads (about 1e-7, relative). A worker
solves its pair's assignments in its own thread (:class:`~drift.schedule.InProcess`): the
cluster already runs pairs side by side, and a Dask worker's process may not fork a pool.

``distributed`` is imported only here, and only when a scheduler is given.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from pathlib import Path
from typing import Sequence

import torch

from . import analysis, memory, methods, schedule
from .canonical import LayerReader, open_layers
from .checkpoint import resolve_model
from .errors import DriftError
from .null import NullDraws


def check(scheduler, models: Sequence) -> None:
    """Refuse, before any checkpoint is opened, what a cluster cannot run: an open reader
    among ``models``, a ``scheduler`` that is neither an address nor a Client, an address
    that no scheduler can have (:func:`check_address`), or no ``distributed`` installed."""
    for what, model in zip(("model", "other"), models):
        if isinstance(model, LayerReader):
            raise DriftError(f"with a scheduler, {what} must be a path, repo id or 'minilm' that every "
                             f"worker opens itself, not an open LayerReader")
    distributed = _distributed()
    if not isinstance(scheduler, (str, distributed.Client)):
        raise DriftError(f"scheduler must be an address such as 'tcp://host:8786' or a distributed.Client, "
                         f"not {scheduler!r}")
    if isinstance(scheduler, str):
        check_address(scheduler)


HOST_PORT_SCHEMES = ("tcp", "tls", "ws", "wss")
"""Dask address schemes that name a host and a port (``inproc``, ``ucx`` are left to Dask)."""


def check_address(address: str) -> None:
    """Refuse an address that no Dask scheduler can have (``hello``, ``tcp://host``, a port
    out of range), before a Client is made: Dask's own refusal comes from inside the Client's
    constructor, which leaves a half-made Client whose ``__del__`` then blocks for a minute."""
    from distributed.comm.addressing import get_address_host_port, parse_address

    try:
        scheme, _ = parse_address(address)
        port = get_address_host_port(address)[1] if scheme in HOST_PORT_SCHEMES else 1
    except ValueError as e:
        raise DriftError(f"scheduler {address!r} is not a Dask scheduler address ({e}): give "
                         f"tcp://host:port, e.g. 'tcp://127.0.0.1:8786'") from None
    if scheme == "inproc":
        _check_inproc(address)
    if not 0 < port < 1 << 16:
        raise DriftError(f"scheduler {address!r} is not a Dask scheduler address (port {port} is not in "
                         f"1..65535): give tcp://host:port, e.g. 'tcp://127.0.0.1:8786'")


def _check_inproc(address: str) -> None:
    """Dask's in-process addresses read ``inproc://host/pid/n``: they name a scheduler inside
    this very process (a LocalCluster(processes=False)), so another pid, or another form, is
    none that drift can reach (Dask's own message would be a failed tuple unpacking)."""
    parts = address[len("inproc://"):].split("/")
    pid = parts[1] if len(parts) == 3 else ""
    if not (pid.isdigit() and parts[2].isdigit()):
        raise DriftError(f"scheduler {address!r} is not a Dask inproc address (inproc://host/pid/n): give "
                         f"tcp://host:port, e.g. 'tcp://127.0.0.1:8786', or the Client of an in-process cluster")
    if int(pid) != os.getpid():
        raise DriftError(f"scheduler {address!r} is in process {pid}, not this one ({os.getpid()}): an "
                         f"inproc address is reachable only from its own process; give tcp://host:port")


def compare_pairs(scheduler, models: Sequence, m: methods.Method, keys: Sequence[tuple], n_null: int,
                  seed: int, dtype: torch.dtype, dev: torch.device, form_budget: int,
                  bar) -> tuple[analysis.Values, analysis.Values, list[dict]]:
    """What :func:`drift.analysis.compare_pairs` returns for every pair of ``keys``, one task
    per pair on ``scheduler`` (an address, or a ``distributed.Client``, which is left open);
    ``bar`` advances as each pair comes back."""
    distributed = _distributed()
    client = scheduler if isinstance(scheduler, distributed.Client) else _connect(distributed, scheduler)
    names = [None if model is None else _worker_name(model) for model in models]
    futures: dict = {}  # future -> its pair's index
    obs: analysis.Values = {}
    null_sum: analysis.Values = {}
    certs: list[dict] = []
    try:
        for k in range(len(keys)):
            futures[client.submit(_pair, names, m.name, keys, k, n_null, seed, dtype, str(dev), form_budget,
                                  code_id(), pure=False)] = k
        for fut in distributed.as_completed(list(futures), loop=client.loop):
            k = futures[fut]
            try:
                obs[k], null, pair_certs = fut.result()
            except DriftError as e:
                raise type(e)(f"on a Dask worker: {e}") from None
            if null:
                null_sum[k] = null
            certs += pair_certs
            bar.update(1)
    finally:
        if len(obs) < len(keys):
            client.cancel(list(futures))
        if client is not scheduler:
            client.close()
    return obs, null_sum, certs


def _pair(names: list[str | None], method: str, keys: Sequence[tuple], k: int, n_null: int, seed: int,
          dtype: torch.dtype, device: str, form_budget: int,
          caller_code: str) -> tuple[dict[str, float], dict[str, float], list[dict]]:
    """On a worker: pair ``k``'s observed values, null mean and assignment certificates, from
    checkpoints it opens itself, by the same drift code as the caller's (``caller_code``)."""
    if code_id() != caller_code:
        from . import __version__

        raise DriftError(f"this worker runs other drift code (version {__version__}, code {code_id()}) than the "
                         f"caller (code {caller_code}): install the same drift on every worker")
    readers = [open_layers(name, dtype) for name in names if name is not None]
    try:
        memory.for_layers(readers[0].sym, torch.empty((), dtype=dtype).element_size())
        dev = analysis.resolve_device(device)
        obs, null_sum, certs = analysis.compare_pairs(readers, methods.get(method), keys, [k], n_null, seed, dtype,
                                               dev, form_budget, analysis._CallbackBar(lambda *_: None, 1),
                                               schedule.InProcess(), null_draws(readers[0].sym.d_model, n_null,
                                                                                seed, dtype, str(dev)))
    finally:
        for r in readers:
            r.ckpt.close()
    return obs[k], null_sum.get(k, {}), certs


@functools.lru_cache(maxsize=2)
def null_draws(d: int, n: int, seed: int, dtype: torch.dtype, device: str) -> NullDraws:
    """One worker process's null rotations for an analysis, shared by the pairs it runs: each
    is a QR of a d × d matrix (0.9 s at d = 2560), and the same for every pair."""
    return NullDraws(d, n, seed, dtype, torch.device(device))


@functools.cache
def code_id() -> str:
    """A digest of this drift's source files: equal on two machines iff they run the same code
    (a version number does not tell two editable checkouts apart)."""
    return digest(Path(__file__).parent)


def digest(root: Path) -> str:
    """12 hex digits of SHA-256 over the ``*.py`` files under ``root``, names and bytes."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def _worker_name(model) -> str:
    """``model`` as a worker opens it: a local folder as an absolute path (a worker's working
    directory is not ours), any other name (bundled, HF cache) as given."""
    from .checkpoint import expand_user

    path = expand_user(str(model))
    return str(path.resolve()) if resolve_model(str(model)) == path else str(model)


CONNECT_TIMEOUT = 5.0
"""Seconds to wait at most for the scheduler at an address to answer (less where Dask's
``distributed.comm.timeouts.connect`` says less). Dask waits 30 s by default, retrying, for a
scheduler that may still be starting; drift is given the address of one that runs."""


def _connect(distributed, address: str):
    """A Client of the scheduler at ``address``, or a DriftError naming it. A Client whose
    constructor fails is closed here: left to its ``__del__``, it blocks for a minute on an
    event loop that no longer runs, then prints a traceback (distributed 2026.8)."""
    import dask
    from dask.utils import parse_timedelta

    timeout = min(CONNECT_TIMEOUT, parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), "s"))
    client = distributed.Client.__new__(distributed.Client)  # a hold on it, should __init__ fail
    try:
        client.__init__(address, set_as_default=False, timeout=timeout)
    except BaseException as e:
        with contextlib.suppress(Exception):  # a constructor that failed early has less to close
            client.close(timeout=1)
        if isinstance(e, (OSError, ValueError, TypeError)):  # TypeError: tls:// without a security config
            raise DriftError(f"cannot connect to the Dask scheduler at {address}: {e}") from None
        raise
    return client


def _distributed():
    try:
        import distributed
    except ImportError:
        raise DriftError("a scheduler needs Dask distributed: pip install 'gauge-drift[cluster]' "
                         "(in a clone: pip install -e '.[cluster]')") from None
    return distributed
