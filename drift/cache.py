"""A disk cache of analyses, so that revisiting a setting in a notebook is instant.

An entry is one JSON file named by the SHA-256 of its key. The key is everything that
decides the numbers::

    checkpoint identity   folder + size, mtime, inode and ctime of every weight file
                          (Checkpoint.identity; ctime catches a rewrite whose mtime was restored)
    checkpoint config     SHA-256 of the parsed config.json: editing it changes the model
    other's identity      the same two, under ``other``, for a cross-model analysis
                          (``analyze(model, other=...)``); absent for one model
    analyze's arguments   method, layers, pairs, seed, n_null, dtype, ... (all of them, with
                          their defaults filled in), except those that cannot change the
                          numbers' meaning: ``progress`` and ``device``. They are normalised
                          first, so equal requests share one entry: ``layers`` as any iterable
                          of integers (generator, range, numpy array) is a list of ints,
                          ``dtype`` "fp32" or torch.float32 is "float32", ``pairs`` None
                          is the default it stands for
    drift version         a new release never serves an old release's numbers
    drift code digest     SHA-256 of the package's numerical source files as they were when
                          drift was imported, so that editing the analysis in a development
                          checkout (same version) does not serve numbers the new code would
                          not produce; while the files on disk differ from that (a ``git
                          pull`` or an edit under a running kernel, ``%autoreload``), the
                          process may run either, so the cache is bypassed: neither read
                          nor written, with one warning
    libraries             the installed versions of the libraries that compute the numbers
                          (:data:`LIBRARIES`: torch, numpy and scipy; for a run of the model
                          also transformers and tokenizers): a new release may round, order
                          a sum or break a tie differently, so its numbers are computed anew
    namespace, inputs     only for a function other than ``drift.analyze`` (:data:`NAMESPACES`):
                          its name, so that two functions never serve each other's results, and
                          what it reads besides the weights and the config (activations: the
                          checkpoint's other files, its tokenizer among them, and the text by
                          content, since a text file edited in place keeps its path)

Safety:

* **Atomic writes.** An entry is written to a temporary file in the same folder, flushed
  and fsync'd, then renamed over the final name (``os.replace``). A computation or a write
  that is interrupted (KeyboardInterrupt, a crash, a full disk) leaves at most a stray
  ``.tmp-*`` file, never a half entry under a real name.
* **Verified reads.** An entry carries its key and a checksum of its payload. A file that is
  not valid JSON, whose checksum or key does not match, or whose table lacks columns is
  logged, deleted and recomputed; it is never returned.
* **Never in the way.** The cache is an optimisation, so no state of the folder makes a call
  fail: an entry that cannot be read or decoded, or a folder that cannot be written (read
  only, a file in its place, a full disk), costs one logged warning, and the result is
  computed and returned as if there were no cache.

The folder is ``~/.cache/drift``, or ``$DRIFT_CACHE_DIR`` when set, or the ``directory``
given to :class:`Cache`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import importlib
import inspect
import json
import logging
import operator
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

from .output import expand, new_file
from .result import COLUMNS, AnalysisResult

log = logging.getLogger(__name__)

FORMAT = 1
"""Version of the entry layout; bump when it changes."""

NOT_IN_KEY = frozenset({"model", "other", "progress", "device", "form_budget"})
"""analyze() arguments that are not part of the key: ``model`` and ``other`` enter as their
identity; the others change how the work is done, not its numbers (the form budget only
decides how many layer forms are held at once; tests/test_schedule.py: pipelined ==
sequential)."""

NAMESPACES = {"weights": ("drift.analysis", "analyze"),
              "activations": ("drift.function", "activation_similarity"),
              "tie": ("drift.function.tie", "tie")}
"""The functions a cache holds, by namespace (module, name). A key of ``weights`` carries no
namespace, so that entries written before there were namespaces stay valid; every other key
names its namespace, so its digest (and file) can never be a weights entry's."""

LIBRARIES = {"weights": ("torch", "numpy", "scipy"),
             "activations": ("torch", "numpy", "scipy", "transformers", "tokenizers"),
             "tie": ("torch", "numpy", "scipy", "transformers", "tokenizers")}
"""The distributions, by namespace, whose installed versions are part of a key: what the
numbers are computed with (the weights path never runs transformers; a run of the model does)."""

STALE_TMP_S = 3600.0
"""Temporary files older than this are left-overs of interrupted writes and are removed."""

ENTRY_NAME = re.compile(r"[0-9a-f]{32}\.json")
"""An entry's file name (:meth:`Cache.path`); the cache reads, lists and deletes no other."""
TMP_GLOB = ".tmp-*.json"
"""The cache's temporary files (:meth:`Cache.put`)."""


def default_dir() -> Path:
    """``$DRIFT_CACHE_DIR`` if set, else ``~/.cache/drift``."""
    env = os.environ.get("DRIFT_CACHE_DIR")
    return expand(env, "DRIFT_CACHE_DIR") if env else Path.home() / ".cache" / "drift"


def _jsonable(v: Any) -> Any:
    """Arguments as plain JSON: ranges and tuples become lists, dtypes become their name."""
    if isinstance(v, (range, tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in sorted(v.items())}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 1) == 0:  # numpy scalar
        return v.item()
    return str(v)  # torch.dtype -> "torch.float32"


def _dtype_name(v: Any) -> Any:
    """``"fp32"``, ``"torch.float32"`` and ``torch.float32`` all as ``"float32"``: the
    spellings that analyze() takes as one dtype (``drift.analysis.DTYPES``)."""
    from .analysis import DTYPES

    name = str(v).replace("torch.", "")
    return str(DTYPES[name]).replace("torch.", "") if name in DTYPES else name


def _layer_list(layers: Any) -> Any:
    """``layers`` as a list of Python ints, whatever iterable it came as. Materialised once
    because a generator would be consumed by the key; anything that is not a sequence of
    integers is left for analyze() to refuse with its own message."""
    try:
        items = list(layers)
    except TypeError:
        return layers
    try:
        return [x if isinstance(x, bool) else operator.index(x) for x in items]
    except TypeError:
        return items


def _why(e: BaseException) -> str:
    """The cause in words, without the path (the warning names it once)."""
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


VIEW_MODULES = frozenset({"widgets.py", "explorer_view.py", "cache.py", "interrupt.py"})
VIEW_PACKAGES = frozenset({"plots"})
"""Source files and subpackages of drift that cannot change a result (left out of the code digest)."""


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 (16 hex digits) of every source file of the package (subpackages included)
    that can change a result, as they were on first call: ``import drift`` makes it."""
    return _source_digest()


def code_changed() -> bool:
    """Do drift's numerical source files differ from those :func:`code_digest` describes?"""
    return _source_digest() != code_digest()


def _source_digest() -> str:
    h = hashlib.sha256()
    root = Path(__file__).parent
    for f in sorted(root.rglob("*.py")):
        if f.parent == root and f.name in VIEW_MODULES or f.parent.name in VIEW_PACKAGES:
            continue
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def library_versions(namespace: str = "weights") -> dict[str, str]:
    """``{distribution: version}`` of :data:`LIBRARIES` for ``namespace``: the version of the
    module this process has imported (a library upgraded under a running kernel is not
    imported anew), else the installed metadata (nothing is imported); ``"absent"`` when it
    is not installed."""
    import sys
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in LIBRARIES[namespace]:
        loaded = getattr(sys.modules.get(name), "__version__", None)
        if loaded is not None:
            out[name] = str(loaded)
            continue
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def _checksum(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _run_inputs(ckpt: Any, arguments: dict[str, Any]) -> dict[str, Any]:
    """What a run of the model reads besides its weights and config: the folder's other files
    (size and mtime; the tokenizer is among them) and the text, by its SHA-256 (the default
    text comes with Python, so a new Python may change it; a file may be edited in place)."""
    skip = set(ckpt.index.weight_map.values()) | {"config.json"}
    files = []
    for f in sorted(ckpt.folder.iterdir()):
        if f.name not in skip and not f.name.startswith(".") and f.is_file():
            st = f.stat()
            files.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    text = None
    if arguments.get("tokens", "text") == "text":
        if arguments.get("text") is None:
            from .function.text import default_text

            text = hashlib.sha256(default_text().encode()).hexdigest()
        else:
            try:
                text = hashlib.sha256(Path(arguments["text"]).read_bytes()).hexdigest()
            except OSError as e:  # the run itself says so; nothing is stored then
                text = f"unreadable: {_why(e)}"
    return {"files": files, "text": text}


class CorruptEntry(Exception):
    """An entry that must not be served (internal: caught, logged, entry deleted)."""


class Cache:
    """A folder of cached :class:`AnalysisResult` entries.

    Args:
        directory: where entries live (default :func:`default_dir`, read at construction).
        analyze: the function to cache (default: the namespace's, :func:`drift.analyze` for
            ``weights``); its signature decides which arguments enter the key. Tests pass a
            stand-in.
        namespace: ``"weights"`` (default), ``"activations"`` or ``"tie"``
            (:func:`drift.function.activation_similarity`), see :data:`NAMESPACES`. Caches of
            different namespaces may share a folder: their keys never match.

    ``hits`` and ``misses`` count this object's lookups; ``last_hit`` and ``last_key`` say
    whether the latest :meth:`get_or_compute` was served from disk, and under which key.
    """

    def __init__(self, directory: str | Path | None = None,
                 analyze: Callable[..., AnalysisResult] | None = None, namespace: str = "weights"):
        if namespace not in NAMESPACES:
            raise ValueError(f"namespace must be one of {', '.join(NAMESPACES)}, got {namespace!r}")
        if directory is not None and not isinstance(directory, (str, os.PathLike)):
            from .errors import DriftError

            raise DriftError(f"cache must be a Cache or a folder for one, not {directory!r}")
        self.directory = expand(directory, "cache folder") if directory is not None else default_dir()
        self._analyze = analyze
        self.namespace = namespace
        self.hits = 0
        self.misses = 0
        self.last_hit: bool | None = None
        self.last_key: dict[str, Any] | None = None

    def __repr__(self) -> str:
        ns = "" if self.namespace == "weights" else f", namespace={self.namespace!r}"
        return f"Cache({str(self.directory)!r}{ns})"

    @property
    def analyze(self) -> Callable[..., AnalysisResult]:
        if self._analyze is None:  # imported on use: the cache itself needs no torch work
            module, name = NAMESPACES[self.namespace]
            return getattr(importlib.import_module(module), name)
        return self._analyze

    # ---------------------------------------------------------------- keys
    def key(self, model: Any, **kwargs: Any) -> dict[str, Any]:
        """The key of ``analyze(model, **kwargs)``: checkpoint identity, every argument that
        can change the result (defaults filled in), drift version, code digest and the
        versions of the libraries that compute the numbers.

        Raises:
            TypeError: an argument ``analyze`` does not take.
            ModelNotFoundError, CheckpointError: ``model`` cannot be opened.
        """
        return self._key(self._bind(model, kwargs))

    def _bind(self, model: Any, kwargs: dict[str, Any]) -> inspect.BoundArguments:
        """analyze's arguments with defaults filled in and ``layers`` made a list (the key and
        the call then see the same layers, even from a generator)."""
        bound = inspect.signature(self.analyze).bind(model, **kwargs)
        bound.apply_defaults()
        if bound.arguments.get("layers") is not None:
            bound.arguments["layers"] = _layer_list(bound.arguments["layers"])
        return bound

    def _key(self, bound: inspect.BoundArguments) -> dict[str, Any]:
        from . import __version__
        from .checkpoint import Checkpoint

        args = {k: _jsonable(v) for k, v in bound.arguments.items() if k not in NOT_IN_KEY}
        if "dtype" in args:
            args["dtype"] = _dtype_name(args["dtype"])
        other = bound.arguments.get("other")
        if "pairs" in args and args["pairs"] is None:
            from .analysis import default_pairs

            args["pairs"] = default_pairs(None, other is not None)

        def open_(model: Any) -> Any:
            if isinstance(model, (str, os.PathLike)):
                return Checkpoint.open(model)
            ckpt = getattr(model, "ckpt", model)  # an open Checkpoint, or a LayerReader over one
            if not hasattr(ckpt, "identity"):
                from .errors import ModelNotFoundError

                raise ModelNotFoundError(f"model must be a checkpoint folder, a cached repo id, a bundled name "
                                         f"or an open LayerReader, not {model!r}")
            return ckpt

        def checkpoint(ckpt: Any) -> dict[str, str]:
            return {"identity": ckpt.identity(), "config": _checksum(getattr(ckpt, "config", None))}

        def reader_dtype(model: Any) -> dict[str, str]:  # an open reader converts in its own dtype
            dt = getattr(model, "dtype", None) if hasattr(model, "ckpt") else None
            return {"reader_dtype": _dtype_name(dt)} if dt is not None else {}

        ckpt = open_(bound.args[0])  # analyze's first argument is the model
        key = {"format": FORMAT, **checkpoint(ckpt), **reader_dtype(bound.args[0]), "args": args,
               "drift": __version__, "code": code_digest(), "libraries": library_versions(self.namespace)}
        if other is not None:
            key["other"] = {**checkpoint(open_(other)), **reader_dtype(other)}
        if self.namespace != "weights":  # a run of the model on text
            key["namespace"] = self.namespace
            key["inputs"] = _run_inputs(ckpt, bound.arguments)
        return key

    @staticmethod
    def digest(key: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]

    def path(self, key: dict[str, Any]) -> Path:
        return self.directory / f"{self.digest(key)}.json"

    # ---------------------------------------------------------------- entries
    def get(self, key: dict[str, Any]) -> AnalysisResult | None:
        """The cached result for ``key``, or None (absent, unreadable or corrupt)."""
        return self._lookup(key)[0]

    def _lookup(self, key: dict[str, Any]) -> tuple[AnalysisResult | None, bool]:
        """``(result or None, whether a new entry may be written under the key's name)``.

        A bad entry is deleted so that it is recomputed into a sound one; if it cannot be
        deleted (a folder in its place, a read-only cache) it is skipped, and no write is
        tried either, so that the caller gets one warning, not two.
        """
        path = self.path(key)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):  # absent; a file where the folder is
            return None, True  # is the writer's to report
        except OSError as e:  # permission denied, a directory in its place, an I/O error
            what, why = "unreadable", _why(e)
        else:
            try:
                return self._decode(data, key), True
            except CorruptEntry as e:
                what, why = "corrupt", str(e)
        try:
            path.unlink(missing_ok=True)
        except OSError:
            log.warning("drift cache: skipping %s entry %s (%s); it cannot be removed, so the "
                        "result is computed and not stored", what, path, why)
            return None, False
        log.warning("drift cache: discarding %s entry %s (%s); it will be recomputed", what, path, why)
        return None, True

    @staticmethod
    def _decode(data: bytes, key: dict[str, Any]) -> AnalysisResult:
        try:
            entry = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise CorruptEntry(f"not UTF-8: {e}") from None
        except (ValueError, RecursionError) as e:  # json.JSONDecodeError is a ValueError
            raise CorruptEntry(f"not valid JSON: {e}") from None
        if not isinstance(entry, dict) or not {"key", "checksum", "result"} <= set(entry):
            raise CorruptEntry("not a drift cache entry")
        if entry["key"] != key:
            raise CorruptEntry("key mismatch (hash collision or a copied file)")
        if _checksum(entry["result"]) != entry["checksum"]:
            raise CorruptEntry("checksum mismatch")
        rows = entry["result"].get("rows") if isinstance(entry["result"], dict) else None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise CorruptEntry("no table rows")
        missing = sorted({c for r in rows for c in COLUMNS if c not in r})
        if missing:  # from_json_dict would fill them with NaN
            raise CorruptEntry(f"rows lack columns {missing}")
        try:
            return AnalysisResult.from_json_dict(entry["result"])
        except Exception as e:  # noqa: BLE001 - whatever the content, an entry never raises
            raise CorruptEntry(f"unreadable result ({type(e).__name__}: {e})") from None

    def put(self, key: dict[str, Any], result: AnalysisResult) -> Path | None:
        """Store ``result`` under ``key`` atomically (temporary file + fsync + rename).

        Returns the entry's path, or None when it could not be written (logged as a warning:
        the cache is an optimisation, so a read-only or full disk must not fail the caller).
        """
        path = self.path(key)
        tmp = None
        try:
            if self.directory.exists() and not self.directory.is_dir():  # say so, not "File exists"
                raise NotADirectoryError(errno.ENOTDIR, f"{self.directory} is not a folder")
            self.directory.mkdir(parents=True, exist_ok=True)
            self._sweep_tmp()
            payload = result.to_json_dict()
            entry = {"key": key, "checksum": _checksum(payload), "result": payload}
            fd, tmp = new_file(self.directory, ".tmp-", ".json")  # the mode a new file gets, not 0600
            with os.fdopen(fd, "w") as f:
                json.dump(entry, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            return path
        except OSError as e:  # unwritable or full (a result that cannot be serialised is a bug: raised)
            log.warning("drift cache: cannot store entry %s (%s); the result is not cached",
                        path, _why(e))
            return None
        finally:  # KeyboardInterrupt included: never leave the temporary file
            if tmp is not None and os.path.lexists(tmp):
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def _sweep_tmp(self) -> None:
        """Remove left-overs of interrupted writes; housekeeping, so failures are ignored."""
        now = time.time()
        with contextlib.suppress(OSError):
            for tmp in self.directory.glob(TMP_GLOB):
                with contextlib.suppress(OSError):  # swept by another process, or not ours
                    if now - tmp.stat().st_mtime > STALE_TMP_S:
                        tmp.unlink()

    def entries(self) -> list[Path]:
        """The entry files (not temporary files): ``<digest>.json``, 32 hex digits. Other files
        in the folder (``DRIFT_CACHE_DIR`` may name one that holds more) are not the cache's."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.glob("*.json") if ENTRY_NAME.fullmatch(p.name))

    def clear(self) -> int:
        """Delete every entry and temporary file of the cache (nothing else in its folder);
        return how many entries were deleted."""
        n = 0
        for p in self.entries():
            p.unlink(missing_ok=True)
            n += 1
        if self.directory.is_dir():
            for tmp in self.directory.glob(TMP_GLOB):
                tmp.unlink(missing_ok=True)
        return n

    # ---------------------------------------------------------------- use
    def get_or_compute(self, model: Any, refresh: bool = False, **kwargs: Any
                       ) -> tuple[AnalysisResult, bool]:
        """``(result, served_from_cache)`` for ``analyze(model, **kwargs)``.

        The result is stored only after ``analyze`` returns, so an interrupted analysis
        stores nothing. ``refresh=True`` recomputes and overwrites. Problems of the cache
        itself are logged, never raised: ``analyze``'s result is returned all the same.
        """
        return self.get_or_compute_keyed(model, refresh, **kwargs)[:2]

    def get_or_compute_keyed(self, model: Any, refresh: bool = False, **kwargs: Any
                             ) -> tuple[AnalysisResult, bool, dict[str, Any]]:
        """:meth:`get_or_compute` and the key it used (``last_key`` is another call's as
        soon as one starts, in another thread)."""
        bound = self._bind(model, kwargs)
        key = self._key(bound)
        self.last_key = key
        use = not code_changed()
        if not use:
            _warn_code_changed()
        writable = use
        if use and not refresh:
            hit, writable = self._lookup(key)
            if hit is not None:
                self.hits += 1
                self.last_hit = True
                _renamed(hit, bound)
                return hit, True, key
        self.misses += 1
        self.last_hit = False
        result = self.analyze(*bound.args, **bound.kwargs)
        if writable:
            self.put(key, result)
        return result, False, key


def _renamed(result: AnalysisResult, bound: inspect.BoundArguments) -> None:
    """A hit names the models as this request does: the entry may have been made under
    another name for the same files (a symlink since repointed, the bundled model's path)."""
    for meta, model in ((result.meta, bound.args[0]),
                        (result.meta.get("other"), bound.arguments.get("other"))):
        if isinstance(meta, dict) and "model" in meta and model is not None:
            meta["model"] = str(model.ckpt.name if hasattr(model, "ckpt") else model)


@functools.lru_cache(maxsize=1)
def _warn_code_changed() -> None:
    log.warning("drift cache: drift's source files changed after it was imported; this process "
                "may run the old code or the new, so the cache is not used until it restarts")


def cached_analyze(model: Any, *, cache: Cache | str | Path | None = None, refresh: bool = False,
                   **kwargs: Any) -> AnalysisResult:
    """:func:`drift.analyze` through the disk cache.

    Args:
        model: as for ``drift.analyze`` (a bundled name, a local folder, a cached HF repo id).
        cache: a :class:`Cache`, or a folder for one (default :func:`default_dir`).
        refresh: recompute even when an entry exists, and overwrite it.
        **kwargs: ``drift.analyze``'s arguments (``layers``, ``pairs``, ``method``, ...).

    Example::

        r = drift.cache.cached_analyze("minilm", method="exact", pairs="all")
    """
    if not isinstance(cache, Cache):
        cache = Cache(cache)
    return cache.get_or_compute(model, refresh=refresh, **kwargs)[0]


def cached_function(model: Any, *, cache: Cache | str | Path | None = None, refresh: bool = False,
                    **kwargs: Any) -> AnalysisResult:
    """:func:`drift.function.activation_similarity` through the disk cache (its own namespace
    in the same folder: keyed also by the tokenizer's files and the text's SHA-256)."""
    c = Cache(cache if not isinstance(cache, Cache) else cache.directory, namespace="activations")
    return c.get_or_compute(model, refresh=refresh, **kwargs)[0]


def cached_tie(model: Any, *, cache: Cache | str | Path | None = None, refresh: bool = False,
               **kwargs: Any) -> AnalysisResult:
    """:func:`drift.function.tie` through the disk cache (namespace ``tie``, keyed as
    :func:`cached_function`)."""
    c = Cache(cache if not isinstance(cache, Cache) else cache.directory, namespace="tie")
    return c.get_or_compute(model, refresh=refresh, **kwargs)[0]


__all__ = ["Cache", "cached_analyze", "cached_function", "cached_tie", "default_dir"]
