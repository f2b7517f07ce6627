"""A disk cache of analyses, so that revisiting a setting in a notebook is instant.

An entry is one JSON file named by the SHA-256 of its key. The key is everything that
decides the numbers::

    checkpoint identity   folder + size and mtime of every weight file (Checkpoint.identity)
    analyze's arguments   method, layers, pairs, seed, n_null, dtype, ... (all of them, with
                          their defaults filled in), except those that cannot change the
                          numbers' meaning: ``progress`` and ``device``
    drift version         a new release never serves an old release's numbers
    drift code digest     SHA-256 of the package's numerical source files, so that editing
                          the analysis in a development checkout (same version) does not
                          serve numbers the new code would not produce

Safety:

* **Atomic writes.** An entry is written to a temporary file in the same folder, flushed
  and fsync'd, then renamed over the final name (``os.replace``). A computation or a write
  that is interrupted (KeyboardInterrupt, a crash, a full disk) leaves at most a stray
  ``.tmp-*`` file, never a half entry under a real name.
* **Verified reads.** An entry carries its key and a checksum of its payload. A file that is
  not valid JSON, whose checksum or key does not match, or whose table lacks columns is
  logged, deleted and recomputed; it is never returned.

The folder is ``~/.cache/drift``, or ``$DRIFT_CACHE_DIR`` when set, or the ``directory``
given to :class:`Cache`.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .result import COLUMNS, AnalysisResult

log = logging.getLogger(__name__)

FORMAT = 1
"""Version of the entry layout; bump when it changes."""

NOT_IN_KEY = frozenset({"model", "progress", "device"})
"""analyze() arguments that are not part of the key (``model`` enters as its identity)."""

STALE_TMP_S = 3600.0
"""Temporary files older than this are left-overs of interrupted writes and are removed."""


def default_dir() -> Path:
    """``$DRIFT_CACHE_DIR`` if set, else ``~/.cache/drift``."""
    env = os.environ.get("DRIFT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "drift"


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


VIEW_MODULES = frozenset({"plots.py", "widgets.py", "cache.py"})
"""Source files that cannot change a result (left out of the code digest)."""


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 (16 hex digits) of every source file of the package (subpackages included)
    that can change a result."""
    h = hashlib.sha256()
    root = Path(__file__).parent
    for f in sorted(root.rglob("*.py")):
        if f.name not in VIEW_MODULES or f.parent != root:
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _checksum(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class CorruptEntry(Exception):
    """An entry that must not be served (internal: caught, logged, entry deleted)."""


class Cache:
    """A folder of cached :class:`AnalysisResult` entries.

    Args:
        directory: where entries live (default :func:`default_dir`, read at construction).
        analyze: the function to cache (default :func:`drift.analyze`); its signature decides
            which arguments enter the key. Tests pass a stand-in.

    ``hits`` and ``misses`` count this object's lookups; ``last_hit`` and ``last_key`` say
    whether the latest :meth:`get_or_compute` was served from disk, and under which key.
    """

    def __init__(self, directory: str | Path | None = None,
                 analyze: Callable[..., AnalysisResult] | None = None):
        self.directory = Path(directory).expanduser() if directory is not None else default_dir()
        self._analyze = analyze
        self.hits = 0
        self.misses = 0
        self.last_hit: bool | None = None
        self.last_key: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"Cache({str(self.directory)!r})"

    @property
    def analyze(self) -> Callable[..., AnalysisResult]:
        if self._analyze is None:
            from . import analysis  # imported on use: the cache itself needs no torch work

            return analysis.analyze
        return self._analyze

    # ---------------------------------------------------------------- keys
    def key(self, model: Any, **kwargs: Any) -> dict[str, Any]:
        """The key of ``analyze(model, **kwargs)``: checkpoint identity, every argument that
        can change the result (defaults filled in), drift version and code digest.

        Raises:
            TypeError: an argument ``analyze`` does not take.
            ModelNotFoundError, CheckpointError: ``model`` cannot be opened.
        """
        from . import __version__
        from .checkpoint import Checkpoint

        bound = inspect.signature(self.analyze).bind(model, **kwargs)
        bound.apply_defaults()
        args = {k: _jsonable(v) for k, v in bound.arguments.items() if k not in NOT_IN_KEY}
        if isinstance(model, (str, os.PathLike)):
            identity = Checkpoint.open(model).identity()
        else:  # an open Checkpoint, or a LayerReader over one
            identity = getattr(model, "ckpt", model).identity()
        return {"format": FORMAT, "identity": identity, "args": args, "drift": __version__,
                "code": code_digest()}

    @staticmethod
    def digest(key: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]

    def path(self, key: dict[str, Any]) -> Path:
        return self.directory / f"{self.digest(key)}.json"

    # ---------------------------------------------------------------- entries
    def get(self, key: dict[str, Any]) -> AnalysisResult | None:
        """The cached result for ``key``, or None (absent, or corrupt and now deleted)."""
        path = self.path(key)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            return self._decode(text, key)
        except CorruptEntry as e:
            log.warning("drift cache: discarding corrupt entry %s (%s); it will be recomputed", path, e)
            path.unlink(missing_ok=True)
            return None

    @staticmethod
    def _decode(text: str, key: dict[str, Any]) -> AnalysisResult:
        try:
            entry = json.loads(text)
        except json.JSONDecodeError as e:
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
        except (ValueError, KeyError, TypeError) as e:  # e.g. "result table lacks columns"
            raise CorruptEntry(f"unreadable result ({e})") from None

    def put(self, key: dict[str, Any], result: AnalysisResult) -> Path:
        """Store ``result`` under ``key`` atomically (temporary file + fsync + rename)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._sweep_tmp()
        payload = result.to_json_dict()
        entry = {"key": key, "checksum": _checksum(payload), "result": payload}
        path = self.path(key)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(entry, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:  # KeyboardInterrupt included: never leave the temporary file
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def _sweep_tmp(self) -> None:
        now = time.time()
        for tmp in self.directory.glob(".tmp-*"):
            try:
                if now - tmp.stat().st_mtime > STALE_TMP_S:
                    tmp.unlink()
            except FileNotFoundError:  # another process swept it
                pass

    def entries(self) -> list[Path]:
        """The entry files (not temporary files)."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.glob("*.json") if not p.name.startswith("."))

    def clear(self) -> int:
        """Delete every entry and temporary file; return how many entries were deleted."""
        n = 0
        for p in self.entries():
            p.unlink(missing_ok=True)
            n += 1
        if self.directory.is_dir():
            for tmp in self.directory.glob(".tmp-*"):
                tmp.unlink(missing_ok=True)
        return n

    # ---------------------------------------------------------------- use
    def get_or_compute(self, model: Any, refresh: bool = False, **kwargs: Any
                       ) -> tuple[AnalysisResult, bool]:
        """``(result, served_from_cache)`` for ``analyze(model, **kwargs)``.

        The result is stored only after ``analyze`` returns, so an interrupted analysis
        stores nothing. ``refresh=True`` recomputes and overwrites.
        """
        key = self.key(model, **kwargs)
        self.last_key = key
        if not refresh:
            hit = self.get(key)
            if hit is not None:
                self.hits += 1
                self.last_hit = True
                return hit, True
        self.misses += 1
        self.last_hit = False
        result = self.analyze(model, **kwargs)
        self.put(key, result)
        return result, False


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


__all__ = ["Cache", "cached_analyze", "default_dir"]
