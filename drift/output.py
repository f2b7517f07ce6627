"""Where results are written: checked before any work, written atomically.

A result file is checked before the analysis starts, so that a bad path costs nothing and a
good computation is never lost to it: its folder must exist and be writable; it must not lie
inside the model's folder (a checkpoint is not overwritten with JSON, nor is a result mixed
into it); an existing file is replaced only if it is itself a drift result, or with ``force``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from .errors import DriftError


class OutputError(DriftError):
    """An output path that would lose data or cannot be written."""


def is_drift_result(path: Path) -> bool:
    """Does ``path`` hold a result that drift wrote (JSON with drift's keys)?"""
    try:
        with open(path, "rb") as f:
            head = f.read(64 << 20)
        d = json.loads(head)
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and "drift_version" in d and "family_residuals" in d


def check_output(path: str | Path, model_folder: Path | None = None, force: bool = False) -> Path:
    """``path``, made absolute, if a result may be written there; else an OutputError
    naming the problem. See the module docstring for the rules."""
    p = Path(path).expanduser()
    if p.name in ("", ".", ".."):
        raise OutputError(f"--out {path}: not a file name")
    try:
        p = p.resolve()
    except (OSError, RuntimeError) as e:
        raise OutputError(f"--out {path}: cannot resolve ({e.strerror or e})") from None
    if model_folder is not None:
        model = Path(model_folder).resolve()
        if p == model or model in p.parents:
            raise OutputError(f"--out {p} is inside the model folder {model}; write the result elsewhere")
    folder = p.parent
    if not folder.is_dir():
        raise OutputError(f"--out {p}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"--out {p}: folder {folder} is not writable")
    if p.is_dir():
        raise OutputError(f"--out {p} is a folder; give a file name")
    if p.exists() and not force and not is_drift_result(p):
        raise OutputError(f"--out {p} exists and is not a drift result; pass --force to replace it")
    return p


def free_name(path: Path) -> Path:
    """``path`` if nothing is there, else the first of ``stem-2.suffix``, ``stem-3.suffix``, … that is free."""
    if not path.exists():
        return path
    k = 2
    while (cand := path.with_name(f"{path.stem}-{k}{path.suffix}")).exists():
        k += 1
    return cand


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename:
    a reader sees the old file or the new one, never half of one; a failure leaves neither
    a partial file nor the temporary one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
