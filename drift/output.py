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
from typing import Sequence

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


CSV_HEADER = "family,layer_a,layer_b,residual,null,rho"
"""How a table drift exported (:func:`drift.plots.export_csv`) begins."""


def is_drift_csv(path: Path) -> bool:
    """Does ``path`` hold a table that drift exported (its header)?"""
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().startswith(CSV_HEADER)
    except (OSError, ValueError):
        return False


def expand(path: str | Path, label: str) -> Path:
    """``Path(path).expanduser()``, or an OutputError naming ``label`` when ``~user`` names no user."""
    try:
        return Path(path).expanduser()
    except RuntimeError as e:
        raise OutputError(f"{label} {path}: cannot expand ~ ({e})") from None


def check_output(path: str | Path, model_folders: Sequence[Path] = (), force: bool = False,
                 label: str = "--out", force_hint: str = "pass --force to replace it",
                 ours=is_drift_result, what: str = "a drift result", make_folder: bool = False) -> Path:
    """``path``, made absolute, if a result may be written there; else an OutputError
    naming the problem. See the module docstring for the rules. ``label``, ``force_hint``:
    how the caller names the path and the override (the CLI's ``--out``, ``--force``);
    ``ours(path)``: is an existing file one drift wrote, ``what``: such a file, named;
    ``make_folder``: create a missing folder (once the name and the model folder are checked)."""
    p = expand(path, label)
    if p.name in ("", ".", "..") or str(path).endswith(("/", os.sep)):
        raise OutputError(f"{label} {path}: not a file name")
    try:
        p = p.resolve()
    except (OSError, RuntimeError) as e:
        raise OutputError(f"{label} {path}: cannot resolve ({e.strerror or e})") from None
    for model in model_folders:
        model = Path(model).resolve()
        if p == model or model in p.parents:
            raise OutputError(f"{label} {p} is inside the model folder {model}; write the result elsewhere")
    folder = p.parent
    if make_folder and not folder.exists():
        try:
            folder.mkdir(parents=True)
        except OSError as e:
            raise OutputError(f"{label} {p}: cannot make folder {folder} ({e.strerror or e})") from None
    if not folder.is_dir():
        raise OutputError(f"{label} {p}: folder {folder} does not exist")
    try:  # a file made and removed: os.access says yes to root on /proc, where none can be made
        fd, probe = new_file(folder, f".{p.name}.", ".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{label} {p}: folder {folder} is not writable ({e.strerror or e})") from None
    if p.is_dir():
        raise OutputError(f"{label} {p} is a folder; give a file name")
    if p.exists() and not p.is_file():  # a pipe would block the check below; a device would be replaced
        raise OutputError(f"{label} {p} is not a regular file (a device, pipe or socket); give a file name")
    if p.exists() and not force and not ours(p):
        raise OutputError(f"{label} {p} exists and is not {what}; {force_hint}")
    return p


def model_metas(meta: dict) -> list[dict]:
    """A result's ``meta`` and, for two models, the other's (``meta["other"]``, a dict)."""
    other = meta.get("other")
    return [meta] + ([other if isinstance(other, dict) else {"model": other}] if other is not None else [])


def model_folders_of(meta: dict) -> list[Path]:
    """The checkpoint folders of a result known here: its model's and, for two models, the other's."""
    return [f for f in map(model_folder_of, model_metas(meta)) if f is not None]


def check_result_output(path, meta: dict, force: bool, label: str, **kw) -> Path:
    """:func:`check_output` for a result written from Python (``to_json``, ``export_csv``):
    the CLI's rules, with ``force=True`` allowing an existing file and the model's folder."""
    return check_output(path, [] if force else model_folders_of(meta), force, label=label,
                        force_hint="pass force=True to replace it", **kw)


def model_folder_of(meta: dict) -> Path | None:
    """The checkpoint folder a result's ``meta`` names, where it is known here: a weight
    result's ``identity`` begins with it; else its ``model`` resolved (None when it cannot be,
    e.g. a result read on another machine)."""
    from .checkpoint import identity_files, resolve_model

    parsed = identity_files(meta.get("identity"))
    if parsed is not None:
        return Path(parsed[0])
    try:

        return resolve_model(str(meta.get("model"))).resolve()
    except Exception:  # noqa: BLE001 - not a checkpoint this machine has
        return None


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
