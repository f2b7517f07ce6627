"""drift.cache: round trip, keys, atomic writes, corrupt entries recomputed and never served."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pandas as pd
import pytest

import drift
from drift import cache as dcache
from drift.cache import Cache, cached_analyze
from drift.result import COLUMNS, AnalysisResult

from _synthetic import make_result


class FakeAnalyze:
    """Stands in for drift.analyze (same signature); counts calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, model, layers=None, pairs="consecutive", method="exact", seed=0, n_null=1,
                 dtype="float32", device="auto", progress=True) -> AnalysisResult:
        self.calls += 1
        layers = list(layers) if layers is not None else list(range(3))
        return make_result(method, pairs, layers=layers, seed=seed, model=str(model))


@pytest.fixture
def ckpt(toy_checkpoint) -> Path:
    return toy_checkpoint("bert")[0]


@pytest.fixture
def fake() -> FakeAnalyze:
    return FakeAnalyze()


@pytest.fixture
def cache(tmp_path, fake) -> Cache:
    return Cache(tmp_path / "cache", analyze=fake)


def _same(a: AnalysisResult, b: AnalysisResult) -> None:
    pd.testing.assert_frame_equal(a.df, b.df, check_dtype=False)
    assert a.meta == b.meta


# --------------------------------------------------------------------------- round trip

def test_round_trip_second_call_is_a_hit(cache, fake, ckpt):
    r1, hit1 = cache.get_or_compute(ckpt, method="rotation", layers=[0, 1, 2])
    r2, hit2 = cache.get_or_compute(ckpt, method="rotation", layers=[0, 1, 2])
    assert (hit1, hit2) == (False, True)
    assert fake.calls == 1
    assert (cache.hits, cache.misses) == (1, 1)
    _same(r1, r2)
    assert len(cache.entries()) == 1


def test_clear_deletes_the_entries_and_nothing_else_in_the_folder(cache, fake, ckpt):
    """DRIFT_CACHE_DIR may name a folder that holds other files (a checkpoint's config.json, a
    saved drift result, the user's own .tmp- file): ``clear()`` and ``entries()`` touch only
    the cache's own ``<digest>.json`` and ``.tmp-*.json`` files."""
    cache.get_or_compute(ckpt, method="rotation", layers=[0, 1, 2])
    cache.get_or_compute(ckpt, method="raw", layers=[0, 1, 2])
    theirs = {"config.json": "{}", "drift_minilm_exact.json": "{}", ".tmp-notes": "x",
              "0123456789abcdef0123456789abcdeg.json": "{}", "0123.json": "{}"}
    for name, text in theirs.items():
        (cache.directory / name).write_text(text)
    (cache.directory / ".tmp-0123.json").write_text("left by an interrupted write")
    assert len(cache.entries()) == 2
    assert cache.clear() == 2
    assert sorted(p.name for p in cache.directory.iterdir()) == sorted(theirs)
    assert cache.get_or_compute(ckpt, method="rotation", layers=[0, 1, 2])[1] is False  # gone: recomputed


def test_defaults_progress_and_device_do_not_split_the_key(cache, fake, ckpt):
    cache.get_or_compute(ckpt)
    cache.get_or_compute(ckpt, method="exact", pairs="consecutive", progress=False, device="cpu")
    cache.get_or_compute(ckpt, layers=None, seed=0, n_null=1, dtype="float32")
    assert fake.calls == 1


def test_the_form_budget_does_not_split_the_key(tmp_path, ckpt):
    real = Cache(tmp_path / "cache")  # analyze's own signature, nothing computed
    assert real.key(ckpt) == real.key(ckpt, form_budget=1) == real.key(ckpt, form_budget=10**12)
    assert real.key(ckpt) != real.key(ckpt, n_null=2)


@pytest.mark.parametrize("change", [
    dict(method="raw"), dict(pairs="all"), dict(layers=[0, 1]), dict(seed=1), dict(n_null=2),
    dict(dtype="float64"),
])
def test_every_argument_that_changes_numbers_is_in_the_key(cache, fake, ckpt, change):
    cache.get_or_compute(ckpt, layers=[0, 1, 2])
    cache.get_or_compute(ckpt, **{"layers": [0, 1, 2], **change})
    assert fake.calls == 2


def test_ranges_and_lists_give_the_same_key(cache, ckpt):
    assert cache.key(ckpt, layers=range(3)) == cache.key(ckpt, layers=[0, 1, 2])


def test_new_drift_version_misses(cache, fake, ckpt, monkeypatch):
    cache.get_or_compute(ckpt)
    monkeypatch.setattr(drift, "__version__", "999.0")
    _, hit = cache.get_or_compute(ckpt)
    assert not hit and fake.calls == 2


@pytest.mark.parametrize("library", ["torch", "numpy", "scipy"])
def test_a_new_release_of_a_library_that_computes_the_numbers_misses(cache, fake, ckpt, monkeypatch, library):
    cache.get_or_compute(ckpt)
    before = dcache.library_versions()
    assert before[library] not in ("", "absent")
    monkeypatch.setattr(dcache, "library_versions", lambda namespace="weights": {**before, library: "999.0"})
    _, hit = cache.get_or_compute(ckpt)
    assert not hit and fake.calls == 2 and len(cache.entries()) == 2


def test_library_versions_are_those_this_process_runs(monkeypatch):
    import sys
    import types

    import numpy
    import torch

    versions = dcache.library_versions()
    assert versions["torch"] == str(torch.__version__) and versions["numpy"] == numpy.__version__
    # a module already imported is the one that computes: its version, not what is installed now
    monkeypatch.setitem(sys.modules, "scipy", types.SimpleNamespace(__version__="0.0-loaded"))
    assert dcache.library_versions()["scipy"] == "0.0-loaded"
    # a run of the model also depends on transformers and tokenizers; the weights path does not
    assert {"transformers", "tokenizers"} <= set(dcache.library_versions("tie"))
    assert "transformers" not in versions


def test_a_library_that_is_not_installed_reads_absent(monkeypatch):
    monkeypatch.setitem(dcache.LIBRARIES, "weights", ("torch", "no-such-distribution-drift"))
    assert dcache.library_versions()["no-such-distribution-drift"] == "absent"


def test_edited_numerical_code_misses(cache, fake, ckpt, monkeypatch):
    cache.get_or_compute(ckpt)
    monkeypatch.setattr(dcache, "code_digest", lambda: "edited")  # a new process on edited code
    monkeypatch.setattr(dcache, "_source_digest", lambda: "edited")
    _, hit = cache.get_or_compute(ckpt)
    assert not hit and fake.calls == 2 and len(cache.entries()) == 2


def test_sources_changed_under_a_running_process_bypass_the_cache(cache, fake, ckpt, monkeypatch, caplog):
    """After a ``git pull`` under a running kernel the process may run old code or new: its
    results are neither served from nor stored in the cache, and it says so once."""
    cache.get_or_compute(ckpt)
    monkeypatch.setattr(dcache, "_source_digest", lambda: "pulled")
    dcache._warn_code_changed.cache_clear()
    with caplog.at_level(logging.WARNING, logger="drift.cache"):
        for layers in ([0, 1, 2], [0, 1]):
            _, hit = cache.get_or_compute(ckpt, layers=layers)
            assert not hit
    assert fake.calls == 3 and len(cache.entries()) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "source files changed" in warnings[0]
    dcache._warn_code_changed.cache_clear()


def test_the_code_digest_is_that_of_the_sources_drift_was_imported_from(tmp_path):
    import shutil
    import subprocess
    import sys

    shutil.copytree(Path(dcache.__file__).parent, tmp_path / "drift", ignore=shutil.ignore_patterns("__pycache__"))
    script = (
        "import json, pathlib, drift, drift.cache as c\n"
        "assert drift.__file__.startswith(%r)\n"
        "before = c.code_digest(), c.code_changed()\n"
        "f = pathlib.Path(drift.__file__).parent / 'null.py'\n"
        "f.write_text(f.read_text() + '# pulled\\n')\n"
        "print(json.dumps([*before, c.code_digest(), c.code_changed(), c._source_digest()]))\n"
    ) % str(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                         check=True)
    d0, changed0, d1, changed1, disk = json.loads(out.stdout)
    assert d0 == d1 != disk and not changed0 and changed1


def test_code_digest_ignores_the_view_modules():
    names = {p.name for p in Path(dcache.__file__).parent.glob("*.py")}
    assert {"analysis.py", "result.py"} <= names - dcache.VIEW_MODULES
    assert "widgets.py" in dcache.VIEW_MODULES and "plots" in dcache.VIEW_PACKAGES
    assert len(dcache.code_digest()) == 16


def test_code_digest_reads_the_methods_subpackage(tmp_path, monkeypatch):
    """An edit to a method (drift/methods/*.py) must change the digest, as one to analysis.py."""
    import shutil

    root = Path(dcache.__file__).parent
    copy = tmp_path / "drift"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(dcache, "__file__", str(copy / "cache.py"))
    digests = []
    for edit in (None, copy / "methods" / "exact.py", copy / "plots" / "ranking.py", copy / "widgets.py"):
        if edit is not None:
            edit.write_text(edit.read_text() + "\n# edited\n")
        dcache.code_digest.cache_clear()
        digests.append(dcache.code_digest())
    dcache.code_digest.cache_clear()
    assert digests[0] != digests[1] and digests[1] == digests[2] == digests[3]


def test_changed_checkpoint_misses(tmp_path, cache, fake, ckpt):
    import shutil

    mine = shutil.copytree(ckpt, tmp_path / "mine")
    cache.get_or_compute(mine)
    weights = mine / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # "retrained"
    _, hit = cache.get_or_compute(mine)
    assert not hit and fake.calls == 2


def test_unknown_argument_is_refused(cache, ckpt):
    with pytest.raises(TypeError):
        cache.key(ckpt, lr=3)


def test_missing_model_is_refused_before_computing(cache, fake, tmp_path):
    with pytest.raises(drift.ModelNotFoundError):
        cache.get_or_compute(tmp_path / "nothing-here")
    assert fake.calls == 0


def test_refresh_recomputes_and_overwrites(cache, fake, ckpt):
    cache.get_or_compute(ckpt)
    _, hit = cache.get_or_compute(ckpt, refresh=True)
    assert not hit and fake.calls == 2 and len(cache.entries()) == 1


# --------------------------------------------------------------------------- location

def test_directory_from_env_and_default(tmp_path, monkeypatch):
    monkeypatch.setenv("DRIFT_CACHE_DIR", str(tmp_path / "env"))
    assert Cache().directory == tmp_path / "env"
    monkeypatch.delenv("DRIFT_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Cache().directory == tmp_path / "home" / ".cache" / "drift"


def test_cached_analyze_with_a_folder(tmp_path, ckpt, monkeypatch):
    fake = FakeAnalyze()
    monkeypatch.setattr(dcache.Cache, "analyze", property(lambda self: fake))
    r1 = cached_analyze(ckpt, cache=tmp_path / "c", method="raw")
    r2 = cached_analyze(ckpt, cache=tmp_path / "c", method="raw")
    assert fake.calls == 1
    _same(r1, r2)


# --------------------------------------------------------------------------- corruption

def _truncate(p: Path) -> None:
    p.write_text(p.read_text()[: len(p.read_text()) // 2])


def _tamper_value(p: Path) -> None:
    e = json.loads(p.read_text())
    e["result"]["rows"][0]["residual"] = 0.0  # checksum no longer matches
    p.write_text(json.dumps(e))


def _drop_column(p: Path) -> None:
    e = json.loads(p.read_text())
    for row in e["result"]["rows"]:
        del row["null"]
    e["checksum"] = dcache._checksum(e["result"])  # a consistent, but unusable, entry
    p.write_text(json.dumps(e))


def _not_an_entry(p: Path) -> None:
    p.write_text(json.dumps([1, 2, 3]))


def _wrong_key(p: Path) -> None:
    e = json.loads(p.read_text())
    e["key"]["args"]["method"] = "raw"
    p.write_text(json.dumps(e))


def _empty(p: Path) -> None:
    p.write_bytes(b"")


@pytest.mark.parametrize("corrupt", [_truncate, _tamper_value, _drop_column, _not_an_entry,
                                     _wrong_key, _empty])
def test_corrupt_entry_is_detected_deleted_and_recomputed(cache, fake, ckpt, corrupt, caplog):
    good, _ = cache.get_or_compute(ckpt)
    (entry,) = cache.entries()
    corrupt(entry)
    key = cache.key(ckpt)
    with caplog.at_level(logging.WARNING, logger="drift.cache"):
        assert cache.get(key) is None  # never served
    assert not entry.exists()  # deleted
    assert "corrupt entry" in caplog.text
    again, hit = cache.get_or_compute(ckpt)
    assert not hit and fake.calls == 2
    _same(again, good)
    assert entry.exists()  # a sound entry replaced it
    assert cache.get_or_compute(ckpt)[1]


# --------------------------------------------------------------------------- atomicity

def test_interrupted_write_leaves_no_entry_and_no_temp_file(cache, fake, ckpt, monkeypatch):
    real_dump = json.dump

    def dump_half_then_interrupt(obj, f, **kw):
        text = json.dumps(obj)
        f.write(text[: len(text) // 2])
        f.flush()
        # a concurrent reader at this moment sees no entry under the real name
        assert cache.entries() == []
        assert cache.get(cache.key(ckpt)) is None
        raise KeyboardInterrupt

    monkeypatch.setattr(dcache.json, "dump", dump_half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        cache.get_or_compute(ckpt)
    assert cache.entries() == []
    assert list(cache.directory.iterdir()) == []
    monkeypatch.setattr(dcache.json, "dump", real_dump)
    _, hit = cache.get_or_compute(ckpt)
    assert not hit and fake.calls == 2 and len(cache.entries()) == 1


def test_interrupted_analysis_stores_nothing(tmp_path, ckpt):
    def interrupted(model, layers=None, pairs="consecutive", method="exact", seed=0, n_null=1,
                    dtype="float32", device="auto", progress=True):
        raise KeyboardInterrupt

    c = Cache(tmp_path / "c", analyze=interrupted)
    with pytest.raises(KeyboardInterrupt):
        c.get_or_compute(ckpt)
    assert c.entries() == []


def test_stale_temp_files_are_swept_fresh_ones_kept(cache, ckpt):
    cache.directory.mkdir(parents=True)
    stale = cache.directory / ".tmp-old.json"
    fresh = cache.directory / ".tmp-new.json"
    for p in (stale, fresh):
        p.write_text("{half")
    old = time.time() - 2 * dcache.STALE_TMP_S
    os.utime(stale, (old, old))
    cache.get_or_compute(ckpt)
    assert not stale.exists() and fresh.exists()  # fresh: maybe another process is writing it
    assert len(cache.entries()) == 1  # temp files are never entries


def test_clear(cache, ckpt):
    cache.get_or_compute(ckpt)
    cache.get_or_compute(ckpt, method="raw")
    (cache.directory / ".tmp-x.json").write_text("")
    assert cache.clear() == 2
    assert list(cache.directory.iterdir()) == []


# --------------------------------------------------------------------------- with the real analysis

def test_real_analysis_round_trip(tmp_path, toy_checkpoint):
    folder, _ = toy_checkpoint("llama")
    c = Cache(tmp_path / "c")
    r1, hit1 = c.get_or_compute(folder, pairs="all", progress=False)
    r2, hit2 = c.get_or_compute(folder, pairs="all", progress=False)
    assert (hit1, hit2) == (False, True)
    assert list(r2.df.columns[: len(COLUMNS)]) == COLUMNS
    _same(r1, r2)


def test_a_hit_names_the_model_as_the_request_does(cache, fake, ckpt, tmp_path):
    """The entry was made through a symlink (since repointed, say): a request by the real
    folder gets the same numbers under its own name."""
    link = tmp_path / "latest"
    link.symlink_to(ckpt, target_is_directory=True)
    first, hit = cache.get_or_compute(str(link))
    assert not hit and first.meta["model"] == str(link)
    again, hit = cache.get_or_compute(str(ckpt))
    assert hit and fake.calls == 1 and again.meta["model"] == str(ckpt)


def test_an_open_readers_dtype_is_in_the_key(cache, ckpt):
    """A reader converts the weights in its own dtype, whatever ``dtype`` the analysis asks."""
    import torch

    r32, r64 = drift.open_layers(str(ckpt), torch.float32), drift.open_layers(str(ckpt), torch.float64)
    keys = [cache.key(m, dtype="float64") for m in (r32, r64, str(ckpt))]
    assert keys[0] != keys[1] and keys[0] != keys[2]
    assert cache.key(r32, dtype="float64") == keys[0]


def test_entries_get_the_mode_of_a_new_file(cache, ckpt):
    """Not mkstemp's 0600: a cache folder shared by a team ($DRIFT_CACHE_DIR) is readable by it."""
    old = os.umask(0o022)
    try:
        cache.get_or_compute(ckpt)
    finally:
        os.umask(old)
    assert [p.stat().st_mode & 0o777 for p in cache.entries()] == [0o644]
