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
import secrets
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
    try:  # a file made and removed: os.access says yes to root on /proc, where none can be made
        fd, probe = new_file(folder, f".{p.name}.", ".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"--out {p}: folder {folder} is not writable ({e.strerror or e})") from None
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


def new_file(folder: Path, prefix: str, suffix: str) -> tuple[int, Path]:
    """A new file ``folder/<prefix><random><suffix>``, open for writing: ``(fd, its path)``.

    Created with mode 0666 for the kernel to apply the umask (and a default ACL) to, as it
    does for ``open()``: no umask is read, so no thread sees it changed, and the result gets
    the mode any new file gets (``tempfile.mkstemp`` would make it 0600)."""
    while True:
        tmp = Path(folder) / f"{prefix}{secrets.token_hex(8)}{suffix}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:  # 64 random bits taken: draw again
            pass


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename:
    a reader sees the old file or the new one, never half of one; a failure leaves neither
    a partial file nor the temporary one, and is an OutputError naming ``path``."""
    try:
        fd, tmp = new_file(path.parent, f".{path.name}.", ".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    return path
