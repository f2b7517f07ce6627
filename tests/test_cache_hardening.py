"""drift.cache never blocks work (issue #13): a bad entry or an unwritable folder is one
warning, and the result is computed and returned; equal requests share one key.

Tests may run as root, which ignores permission bits, so unreadable and unwritable states
are simulated by making ``Path.open`` / ``os.replace`` / ... raise, or by putting a regular
file or a folder where the cache expects the other.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from drift import cache as dcache
from drift.cache import Cache, cached_analyze

from _synthetic import make_result
from test_cache import _same, cache, ckpt, fake  # noqa: F401 - fixtures used by name

EACCES = PermissionError(errno.EACCES, "Permission denied")
ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def _expected(ckpt: Path) -> object:
    """What FakeAnalyze returns for ``get_or_compute(ckpt)``."""
    return make_result("exact", "consecutive", layers=[0, 1, 2], model=str(ckpt))


def _one_warning(caplog, path: Path, cause: str) -> str:
    """Exactly one warning, naming ``path`` and ``cause``, without a traceback."""
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(records) == 1, [r.getMessage() for r in records]
    msg = records[0].getMessage()
    assert str(path) in msg and cause in msg, msg
    assert records[0].exc_info is None and "Traceback" not in caplog.text
    return msg


def _no_temp_files(c: Cache) -> None:
    assert not c.directory.is_dir() or not list(c.directory.glob(".tmp-*"))


def _fail_for(monkeypatch, method: str, target: Path, exc: BaseException) -> None:
    """Make ``Path.<method>`` raise ``exc`` for ``target`` only."""
    real = getattr(Path, method)

    def failing(self, *a, **k):
        if self == target:
            raise exc
        return real(self, *a, **k)

    monkeypatch.setattr(Path, method, failing)


@pytest.fixture
def other(cache, ckpt) -> tuple[Path, bytes]:
    """An unrelated entry, whose bytes must survive whatever happens to the one under test."""
    cache.get_or_compute(ckpt, method="raw")
    (path,) = cache.entries()
    return path, path.read_bytes()


# --------------------------------------------------------------------------- unreadable entries

@pytest.mark.parametrize("exc", [EACCES, OSError(errno.EIO, "Input/output error")], ids=["eacces", "eio"])
def test_unreadable_entry_is_discarded_and_recomputed(cache, fake, ckpt, other, exc, monkeypatch, caplog):
    cache.get_or_compute(ckpt)
    entry = cache.path(cache.key(ckpt))
    _fail_for(monkeypatch, "open", entry, exc)  # read_bytes and read_text both open through it
    with caplog.at_level(logging.WARNING):
        result, hit = cache.get_or_compute(ckpt)
    assert not hit and fake.calls == 3
    _same(result, _expected(ckpt))
    assert "discarding unreadable entry" in _one_warning(caplog, entry, exc.strerror)
    _no_temp_files(cache)
    assert other[0].read_bytes() == other[1]
    monkeypatch.undo()
    assert cache.get_or_compute(ckpt)[1]  # a sound entry replaced it


def test_a_folder_in_place_of_an_entry_is_skipped_and_left_alone(cache, fake, ckpt, other, caplog):
    entry = cache.path(cache.key(ckpt))
    entry.mkdir()
    (entry / "someone's file").write_text("keep")
    for n in (1, 2):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            result, hit = cache.get_or_compute(ckpt)
        assert not hit and fake.calls == 1 + n
        _same(result, _expected(ckpt))
        assert "skipping unreadable entry" in _one_warning(caplog, entry, "Is a directory")
    assert (entry / "someone's file").read_text() == "keep"
    assert other[0].read_bytes() == other[1]
    _no_temp_files(cache)


@pytest.mark.parametrize("data, cause", [
    (b'{"key": "\xff\xfe"}', "not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),  # too deep for the JSON parser
], ids=["not-utf8", "too-deep"])
def test_undecodable_entry_is_discarded_and_recomputed(cache, fake, ckpt, other, data, cause, caplog):
    cache.get_or_compute(ckpt)
    entry = cache.path(cache.key(ckpt))
    entry.write_bytes(data)
    with caplog.at_level(logging.WARNING):
        result, hit = cache.get_or_compute(ckpt)
    assert not hit and fake.calls == 3
    _same(result, _expected(ckpt))
    assert "discarding corrupt entry" in _one_warning(caplog, entry, cause)
    assert other[0].read_bytes() == other[1]
    assert cache.get_or_compute(ckpt)[1]


def test_corrupt_entry_that_cannot_be_deleted_is_skipped(cache, fake, ckpt, other, monkeypatch, caplog):
    cache.get_or_compute(ckpt)
    entry = cache.path(cache.key(ckpt))
    e = json.loads(entry.read_text())
    e["result"]["rows"][0]["residual"] = 0.0
    entry.write_text(json.dumps(e))
    bad = entry.read_bytes()
    _fail_for(monkeypatch, "unlink", entry, EACCES)
    with caplog.at_level(logging.WARNING):
        result, hit = cache.get_or_compute(ckpt)
    assert not hit and fake.calls == 3
    _same(result, _expected(ckpt))
    msg = _one_warning(caplog, entry, "checksum mismatch")  # and no second one for the write
    assert "skipping corrupt entry" in msg
    assert entry.read_bytes() == bad and other[0].read_bytes() == other[1]
    _no_temp_files(cache)


# --------------------------------------------------------------------------- unwritable folder

def test_a_file_in_place_of_the_cache_folder(tmp_path, fake, ckpt, caplog):
    where = tmp_path / "cache"
    where.write_text("precious")
    c = Cache(where, analyze=fake)
    with caplog.at_level(logging.WARNING):
        result = cached_analyze(ckpt, cache=c)
    _same(result, _expected(ckpt))
    assert c.last_hit is False and fake.calls == 1
    _one_warning(caplog, c.path(c.key(ckpt)), "is not a folder")
    assert where.read_text() == "precious" and list(tmp_path.iterdir()) == [where]


@pytest.mark.parametrize("target, exc", [
    ("new_file", EACCES),  # a read-only folder: no new file
    ("os.replace", EACCES),  # the rename is refused
    ("os.fsync", ENOSPC),  # the disk is full
], ids=["new-file-eacces", "replace-eacces", "fsync-enospc"])
def test_failed_write_is_a_warning_and_leaves_nothing(cache, fake, ckpt, other, target, exc,
                                                     monkeypatch, caplog):
    def fail(*a, **k):
        raise exc

    *module, name = target.split(".")
    monkeypatch.setattr(getattr(dcache, module[0]) if module else dcache, name, fail)
    with caplog.at_level(logging.WARNING):
        result, hit = cache.get_or_compute(ckpt)
    monkeypatch.undo()
    assert not hit and fake.calls == 2
    _same(result, _expected(ckpt))
    assert "cannot store entry" in _one_warning(caplog, cache.path(cache.key(ckpt)), exc.strerror)
    _no_temp_files(cache)
    assert cache.entries() == [other[0]] and other[0].read_bytes() == other[1]
    assert not cache.get_or_compute(ckpt)[1] and cache.get_or_compute(ckpt)[1]  # works again


# --------------------------------------------------------------------------- keys

@pytest.mark.parametrize("layers", [
    lambda: (i for i in range(3)), lambda: iter([0, 1, 2]), lambda: np.arange(3),
    lambda: np.array([0, 1, 2], dtype=np.int32), lambda: torch.arange(3),
], ids=["generator", "iterator", "numpy", "numpy-int32", "torch"])
def test_layers_key_like_a_list_of_ints(cache, ckpt, layers):
    assert cache.key(ckpt, layers=layers()) == cache.key(ckpt, layers=[0, 1, 2])


def test_generator_layers_hit_and_reach_analyze_whole(tmp_path, cache, fake, ckpt):
    cache.get_or_compute(ckpt, layers=[0, 1, 2])
    _, hit = cache.get_or_compute(ckpt, layers=(i for i in range(3)))
    assert hit and fake.calls == 1
    fresh = Cache(tmp_path / "fresh", analyze=fake)
    result, hit = fresh.get_or_compute(ckpt, layers=(i for i in range(3)))
    assert not hit and result.meta["layers"] == [0, 1, 2]  # the key did not consume it
    assert fresh.get_or_compute(ckpt, layers=range(3))[1]


@pytest.mark.parametrize("spelling, name", [
    ("fp32", "float32"), (torch.float32, "float32"), ("torch.float32", "float32"),
    ("fp64", "float64"), (torch.float64, "float64"),
])
def test_dtype_spellings_key_alike(cache, ckpt, spelling, name):
    assert cache.key(ckpt, dtype=spelling) == cache.key(ckpt, dtype=name)


def test_defaults_spelled_out_share_the_entry(cache, fake, ckpt):
    cache.get_or_compute(ckpt)
    _, hit = cache.get_or_compute(ckpt, pairs="consecutive", method="exact", seed=np.int64(0),
                                  n_null=1, dtype=torch.float32)
    assert hit and fake.calls == 1 and len(cache.entries()) == 1


def test_editing_config_json_misses(tmp_path, cache, fake, ckpt):
    mine = shutil.copytree(ckpt, tmp_path / "mine")
    cache.get_or_compute(mine)
    config = mine / "config.json"
    cfg = json.loads(config.read_text())
    config.write_text(json.dumps(cfg, indent=7))  # the same content, laid out differently
    assert cache.get_or_compute(mine)[1]
    config.write_text(json.dumps({**cfg, "drift_test_edit": 1}))
    _, hit = cache.get_or_compute(mine)
    assert not hit and fake.calls == 2
