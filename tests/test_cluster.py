"""``drift.analyze(..., scheduler=...)``: layer pairs as tasks on a Dask cluster (drift.cluster).

On a local two-process cluster the result is the local one, value for value: every method,
all and consecutive pairs, two models, a Client or an address, and the CLI's ``--scheduler``.
The local references run on one torch thread, as Dask's workers do (``OMP_NUM_THREADS=1``):
torch's float32 kernels round differently on more threads. Refusals: an open reader, a
scheduler that is not one, no ``distributed``, no scheduler at the address, a worker that
cannot open the model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import drift
from drift import DriftError, ModelNotFoundError, cluster as drift_cluster
from drift.canonical import open_layers
from drift.checkpoint import TINY_QWEN3, TINY_QWEN3_DIR

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def dask_cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as c:
        yield c


@pytest.fixture(scope="module")
def client(dask_cluster):
    with distributed.Client(dask_cluster, set_as_default=False) as c:
        yield c


def local(model, **kwargs):
    """``drift.analyze`` here, on one torch thread like a Dask worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return drift.analyze(model, progress=False, **kwargs)
    finally:
        torch.set_num_threads(threads)


def assert_same(got: drift.AnalysisResult, want: drift.AnalysisResult) -> None:
    """The same rows, meta and values (residual, null, rho to 1e-9 relative)."""
    numbers = ["residual", "null", "rho"]
    pd.testing.assert_frame_equal(got.df.drop(columns=numbers), want.df.drop(columns=numbers))
    for col in numbers:
        np.testing.assert_allclose(got.df[col], want.df[col], rtol=1e-9, atol=0, err_msg=col)
    assert got.meta == want.meta


@pytest.mark.parametrize("model,kwargs", [
    (TINY_QWEN3, dict(pairs="all", method="exact")),
    (TINY_QWEN3, dict(pairs="all", method="rotation", n_null=2, seed=3)),
    (TINY_QWEN3, dict(pairs="consecutive", method="raw")),
    (TINY_QWEN3, dict(other=f"{TINY_QWEN3}@step20", pairs="diagonal", n_null=2)),
    ("minilm", dict(layers=[0, 1, 2], method="exact")),  # here: assignments in worker processes
], ids=["all-exact", "all-rotation", "consecutive-raw", "other", "minilm"])
def test_a_cluster_run_equals_the_local_run(client, model, kwargs):
    want = local(model, **kwargs)
    got = drift.analyze(model, progress=False, scheduler=client, **kwargs)
    assert_same(got, want)
    assert len(got.df) >= 8 * len(got.pairs) >= 16 and got.df["null"].gt(0).all()
    assert client.status == "running"  # the caller's Client is left open


def test_an_address_works_its_client_is_closed_and_progress_follows_the_pairs(dask_cluster, client):
    def clients() -> int:
        return client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.clients))

    before = clients()
    calls: list[tuple[int, int]] = []
    got = drift.analyze(TINY_QWEN3, layers=[0, 2, 3, 5], scheduler=dask_cluster.scheduler_address,
                        progress=lambda done, total: calls.append((done, total)))
    assert_same(got, local(TINY_QWEN3, layers=[0, 2, 3, 5]))
    assert calls == [(k, 3) for k in range(4)]
    deadline = time.monotonic() + 10
    while clients() > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert clients() == before


def test_a_relative_folder_is_opened_by_the_workers_too(client, tmp_path, monkeypatch):
    shutil.copytree(TINY_QWEN3_DIR / "final", tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)  # the workers' working directory stays where it was
    assert_same(drift.analyze("tiny", progress=False, scheduler=client), local("tiny"))


def test_what_a_cluster_cannot_run_is_refused(client, monkeypatch):
    reader = open_layers(TINY_QWEN3)
    with pytest.raises(DriftError, match="model must be a path, repo id or 'minilm'.*not an open LayerReader"):
        drift.analyze(reader, scheduler=client)
    with pytest.raises(DriftError, match="other must be .*not an open LayerReader"):
        drift.analyze(TINY_QWEN3, other=reader, scheduler=client)
    reader.ckpt.close()
    with pytest.raises(DriftError, match="scheduler must be an address"):
        drift.analyze(TINY_QWEN3, scheduler=8786)
    monkeypatch.setattr(drift_cluster, "_worker_name", lambda model: "/nonexistent/tiny")
    with pytest.raises(ModelNotFoundError, match="on a Dask worker: /nonexistent/tiny: no such directory"):
        drift.analyze(TINY_QWEN3, progress=False, scheduler=client)


def test_a_worker_with_other_drift_code_refuses(client, monkeypatch, tmp_path):
    """Workers that import another drift (an older install, an edited checkout) would give
    other numbers under the same meta: each compares a digest of its drift's sources first."""
    copy = tmp_path / "drift"
    shutil.copytree(Path(drift.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__", "data"))
    assert drift_cluster.digest(copy) == drift_cluster.code_id()
    (copy / "methods" / "exact.py").write_text((copy / "methods" / "exact.py").read_text() + "\n# edited\n")
    assert drift_cluster.digest(copy) != drift_cluster.code_id()
    monkeypatch.setattr(drift_cluster, "code_id", lambda: "000000000000")  # this side only: workers are processes
    with pytest.raises(DriftError, match="on a Dask worker: this worker runs other drift code .*caller "
                                         r"\(code 000000000000\): install the same drift on every worker"):
        drift.analyze(TINY_QWEN3, layers=[0, 1], progress=False, scheduler=client)


def test_a_worker_makes_the_null_rotations_once_for_all_its_pairs():
    """Each task is one pair; the rotations (the same for every pair) are kept per worker
    process, so a worker running many pairs draws them once. Run here in this process."""
    drift_cluster.null_draws.cache_clear()
    keys = [((0, i), (0, i + 1)) for i in range(3)]
    got = [drift_cluster._pair([TINY_QWEN3], "exact", keys, k, 2, 5, torch.float32, "cpu", 1 << 30,
                               drift_cluster.code_id()) for k in range(3)]
    draws = drift_cluster.null_draws(open_layers(TINY_QWEN3).sym.d_model, 2, 5, torch.float32, "cpu")
    assert draws.made == 2 and drift_cluster.null_draws.cache_info().hits == 3  # 2 draws, made by the first pair
    want = local(TINY_QWEN3, layers=[0, 1, 2, 3], n_null=2, seed=5).df
    for k, (obs, null, _) in enumerate(got):
        rows = want[want.layer_a == k].set_index("family")
        for family, value in obs.items():
            assert value == pytest.approx(rows.residual[family], rel=1e-6, abs=1e-9)
            assert null[family] == pytest.approx(rows.null[family], rel=1e-6, abs=1e-9)


def test_no_scheduler_at_the_address_is_one_error():
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(DriftError, match="cannot connect to the Dask scheduler at tcp://127.0.0.1:9"):
            drift.analyze(TINY_QWEN3, progress=False, scheduler="tcp://127.0.0.1:9")


def test_without_distributed_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    with pytest.raises(DriftError, match=r"pip install 'gauge-drift\[cluster\]'"):
        drift.analyze(TINY_QWEN3, scheduler="tcp://127.0.0.1:8786")
    drift.analyze(TINY_QWEN3, layers=[0, 1], progress=False)  # without a scheduler it is not needed


def test_the_cli_runs_on_a_scheduler(dask_cluster, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    outs = {}
    for name, extra in (("local", []), ("cluster", ["--scheduler", dask_cluster.scheduler_address])):
        outs[name] = tmp_path / f"{name}.json"
        subprocess.run([sys.executable, "-m", "drift", "analyze", "--model", TINY_QWEN3, "--pairs", "all",
                        "--quiet", "--out", str(outs[name]), *extra], check=True, env=env, timeout=120)
    got, want = (drift.AnalysisResult.from_json(outs[n]) for n in ("cluster", "local"))
    assert_same(got, want)
    assert json.loads(outs["cluster"].read_text())["model"] == TINY_QWEN3


def _cli(*args, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}  # Dask's own defaults
    return subprocess.run([sys.executable, "-m", "drift", "analyze", "--model", "minilm", "--quiet", *args],
                          capture_output=True, text=True, env=dict(env, OMP_NUM_THREADS="1"), timeout=timeout)


@pytest.mark.parametrize("address, words", [
    ("hello", ["scheduler 'hello' is not a Dask scheduler address", "missing port", "tcp://host:port"]),
    ("tcp://127.0.0.1", ["scheduler 'tcp://127.0.0.1' is not a Dask scheduler address", "missing port"]),
    ("tcp://127.0.0.1:99999", ["port 99999 is not in 1..65535"]),
    ("tls://127.0.0.1:1", ["cannot connect to the Dask scheduler at tls://127.0.0.1:1", "TLS"]),
    ("inproc://x", ["scheduler 'inproc://x' is not a Dask inproc address (inproc://host/pid/n)"]),
    ("inproc://127.0.0.1/1/0", ["is in process 1, not this one", "reachable only from its own process"]),
])
def test_a_bad_address_is_one_line_and_the_cli_exits_at_once(address, words, tmp_path):
    """'hello' printed its line, then the half-made Client's __del__ blocked for 60 s and
    printed a traceback; tls:// without a TLS config did the same after a TypeError's."""
    proc = _cli("--scheduler", address, "--out", str(tmp_path / "x.json"), timeout=30)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("drift: "), proc.stderr
    for w in words:
        assert w in lines[0]
    assert not (tmp_path / "x.json").exists()


def test_an_inproc_address_of_this_process_passes_the_check():
    """An in-process cluster's own address (inproc://host/<this pid>/n) is left to Dask."""
    drift_cluster.check_address(f"inproc://127.0.0.1/{os.getpid()}/3")


def test_no_scheduler_answering_fails_within_the_connect_timeout(tmp_path):
    """Nothing listens on port 1: Dask retried for its 30 s default; drift waits CONNECT_TIMEOUT."""
    assert drift_cluster.CONNECT_TIMEOUT <= 5
    proc = _cli("--scheduler", "tcp://127.0.0.1:1", "--out", str(tmp_path / "x.json"), timeout=25)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("drift: cannot connect to the Dask scheduler at tcp://127.0.0.1:1: ")
