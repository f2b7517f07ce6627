"""Bad input of every kind, through the CLI as a user meets it: damaged weights, configs of
the wrong type or range, bad paths and flags, outputs that would lose data, signals.

Each case must end in exactly one ``drift: ...`` line on stderr (exit status 2; signals:
128 + the signal), no traceback, the model folder and any existing file untouched, and no
process or temporary file left behind. A few positive cases check that the refusals are
not too broad (``--force``, a second default output name).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from drift import cli


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    rc = None
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err
    return rc, err


def assert_one_line(rc, err: str, *words: str, status: int = 2) -> None:
    lines = err.strip().splitlines()
    assert rc == status, f"exit {rc}: {err}"
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("drift: "), err
    for w in words:
        assert w.lower() in lines[0].lower(), f"{w!r} not in {lines[0]!r}"


@pytest.fixture
def model(checkpoint_copy):
    return checkpoint_copy("llama")


def refused(folder: Path, tmp_path: Path, capsys, *words: str, extra: list[str] | None = None) -> None:
    """``drift analyze`` on ``folder`` ends in one line naming ``words``; nothing written or changed."""
    before = _digest(folder)
    out = tmp_path / "out.json"
    rc, err = run_cli(["analyze", "--model", str(folder), "--out", str(out), "--quiet", *(extra or [])], capsys)
    assert_one_line(rc, err, *words)
    assert not out.exists()
    assert _digest(folder) == before


# --------------------------------------------------------------------------- weights

def _edit_weights(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    f = folder / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def _set(name: str, fn):
    def edit(t):
        t[name] = fn(t[name])
    return edit


Q1 = "model.layers.1.self_attn.q_proj.weight"
D2 = "model.layers.2.mlp.down_proj.weight"
N0 = "model.layers.0.input_layernorm.weight"


def _poke(value):
    def fn(w):
        w = w.clone()
        w.view(-1)[3] = value
        return w
    return fn


WEIGHT_CASES = {
    "nan in q_proj": (_set(Q1, _poke(float("nan"))), [Q1, "NaN"]),
    "inf in down_proj": (_set(D2, _poke(float("inf"))), [D2, "Inf"]),
    "-inf in a norm gain": (_set(N0, _poke(-float("inf"))), [N0]),
    "int8 weight": (_set(Q1, lambda w: (w * 100).to(torch.int8)), [Q1, "int8", "quantised"]),
    "uint8 weight": (_set(Q1, lambda w: (w.abs() * 100).to(torch.uint8)), [Q1, "uint8"]),
    "bool weight": (_set(Q1, lambda w: w > 0), [Q1, "bool"]),
    "complex weight": (_set(Q1, lambda w: w.to(torch.complex64)), [Q1, "complex64"]),
    "float8 weight": (_set(Q1, lambda w: w.to(torch.float8_e4m3fn)), [Q1, "float8_e4m3fn", "quantised"]),
    "int32 norm gain": (_set(N0, lambda w: w.to(torch.int32)), [N0, "int32"]),
    "all-zero q_proj": (_set(Q1, torch.zeros_like), [Q1, "all zeros"]),
    "all-zero down_proj": (_set(D2, torch.zeros_like), [D2, "all zeros"]),
    "all-zero norm gain": (_set(N0, torch.zeros_like), [N0, "norm gain", "all zeros"]),
}


@pytest.mark.parametrize("case", list(WEIGHT_CASES))
def test_damaged_weights_are_refused_by_tensor_name(case, model, tmp_path, capsys):
    edit, words = WEIGHT_CASES[case]
    _edit_weights(model, edit)
    refused(model, tmp_path, capsys, *words)


def test_finite_weights_whose_sum_overflows_are_read(model):
    """The NaN/Inf check is one Σ|w| pass; a sum that overflows float32 with every entry finite
    (two entries of 3e38) is checked entry by entry, and read, not refused."""
    from drift.canonical import open_layers

    def big(w):
        w = w.clone()
        w.view(-1)[3] = w.view(-1)[5] = 3e38
        return w

    _edit_weights(model, _set(Q1, big))
    layer = open_layers(model).read(1)
    assert float(layer.W_Q.abs().max()) == pytest.approx(3e38, rel=1e-6)


def test_fp8_block_quantised_checkpoint_is_refused_not_misread(model, tmp_path, capsys):
    """Weights in float8 with their scales beside them, as FP8 checkpoints ship: refused by
    name (reading them unscaled gave ρ 0.56-0.93 on a model whose dequantised twin gives 0.03)."""
    def edit(t):
        for name in [n for n in t if n.endswith("proj.weight")]:
            t[name + "_scale_inv"] = torch.ones(1)
            t[name] = t[name].to(torch.float8_e4m3fn)
    _edit_weights(model, edit)
    cfg = json.loads((model / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (model / "config.json").write_text(json.dumps(cfg))
    refused(model, tmp_path, capsys, "quantised", "fp8")


# --------------------------------------------------------------------------- configs

def _config(folder: Path, edit) -> None:
    f = folder / "config.json"
    cfg = json.loads(f.read_text())
    edit(cfg)
    f.write_text(json.dumps(cfg))


def _put(key, value):
    return lambda c: c.__setitem__(key, value)


def _rope(key, value):
    return lambda c: c.setdefault("rope_parameters", {}).__setitem__(key, value)


CONFIG_CASES = {
    "kv heads 0": (_put("num_key_value_heads", 0), ["num_key_value_heads"]),
    "kv heads string": (_put("num_key_value_heads", "2"), ["num_key_value_heads", "'2'"]),
    "kv heads do not divide": (_put("num_key_value_heads", 3), ["num_key_value_heads=3"]),
    "more kv heads than heads": (_put("num_key_value_heads", 8), ["num_key_value_heads=8"]),
    "negative heads": (_put("num_attention_heads", -4), ["num_attention_heads"]),
    "fractional hidden size": (_put("hidden_size", 64.5), ["hidden_size"]),
    "negative layer count": (_put("num_hidden_layers", -1), ["num_hidden_layers"]),
    "string layer count": (_put("num_hidden_layers", "3"), ["num_hidden_layers"]),
    "boolean layer count": (_put("num_hidden_layers", True), ["num_hidden_layers"]),
    "architectures a string": (_put("architectures", "LlamaForCausalLM"), ["architectures", "LlamaForCausalLM"]),
    "architectures not names": (_put("architectures", [1]), ["architectures"]),
    "model_type a number": (lambda c: (c.pop("architectures", None), c.__setitem__("model_type", 5)), ["model_type"]),
    "unknown architecture": (lambda c: c.update(architectures=["FooForCausalLM"], model_type="foo"),
                             ["FooForCausalLM", "unsupported"]),
    "rope_theta a string": (_rope("rope_theta", "10000"), ["rope_theta"]),
    "rope_theta negative": (_rope("rope_theta", -1.0), ["rope_theta"]),
    "rope_theta NaN": (_rope("rope_theta", math.nan), ["rope_theta"]),
    "partial_rotary_factor 2": (_put("partial_rotary_factor", 2.0), ["partial_rotary_factor"]),
    "partial_rotary_factor a word": (_put("partial_rotary_factor", "half"), ["partial_rotary_factor"]),
    "rope_parameters not an object": (_put("rope_parameters", "x"), ["rope_parameters"]),
    "intermediate_size 0": (_put("intermediate_size", 0), ["intermediate_size"]),
    "head_dim 0": (_put("head_dim", 0), ["head_dim"]),
    "head_dim disagrees with weights": (_put("head_dim", 8), ["shape"]),
    "missing hidden_size": (lambda c: c.pop("hidden_size"), ["hidden_size"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_fields_are_named(case, model, tmp_path, capsys):
    edit, words = CONFIG_CASES[case]
    _config(model, edit)
    refused(model, tmp_path, capsys, *words)


@pytest.mark.parametrize("text, words", [("{not json", ["malformed JSON"]), ("[1, 2]", ["JSON object"]),
                                         (None, ["no config.json"])])
def test_unreadable_config_files(text, words, model, tmp_path, capsys):
    f = model / "config.json"
    if text is None:
        f.unlink()
    else:
        f.write_text(text)
    refused(model, tmp_path, capsys, *words)


@pytest.mark.parametrize("index, words", [
    ('{"weight_map": 3', ["malformed shard index"]),
    (b"\xff\xfe{}", ["malformed shard index", "not UTF-8"]),
    ('{"weight_map": []}', ["weight_map must map tensor names to file names"]),
    ('{"weight_map": {"model.embed_tokens.weight": 3}}', ["weight_map must map"]),
    ('{"weight_map": {"model.embed_tokens.weight": null}}', ["weight_map must map"]),
    ('[1, 2]', ["malformed shard index"]),
    ('{"weight_map": {"model.embed_tokens.weight": "../elsewhere.safetensors"}}', ["outside the checkpoint folder"]),
    ('{"weight_map": {"model.embed_tokens.weight": "/etc/passwd"}}', ["outside the checkpoint folder", "/etc/passwd"]),
])
def test_malformed_shard_index(index, words, checkpoint_copy, tmp_path, capsys):
    folder = checkpoint_copy("llama", sharded=True)
    f = folder / "model.safetensors.index.json"
    f.write_bytes(index) if isinstance(index, bytes) else f.write_text(index)
    refused(folder, tmp_path, capsys, *words)


@pytest.mark.parametrize("content, words", [
    ([1, 2, 3], ["holding a list, not a state dict"]),
    ({"model.embed_tokens.weight": [1.0, 2.0]}, ["'model.embed_tokens.weight' is a list, not a tensor"]),
    ({"state_dict": {"a": torch.zeros(2)}}, ["'state_dict' is a dict, not a tensor"]),
])
def test_a_pickle_checkpoint_that_is_no_state_dict(content, words, checkpoint_copy, tmp_path, capsys):
    folder = checkpoint_copy("llama")
    (folder / "model.safetensors").unlink()
    torch.save(content, folder / "pytorch_model.bin")
    with pytest.warns(UserWarning, match="pickle checkpoint"):
        refused(folder, tmp_path, capsys, *words)


def test_shard_index_naming_a_missing_shard(checkpoint_copy, tmp_path, capsys):
    folder = checkpoint_copy("llama", sharded=True)
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    refused(folder, tmp_path, capsys, "missing", shard.name)


def test_a_permission_error_is_not_reported_as_a_corrupt_file(model, tmp_path, capsys, monkeypatch):
    import builtins

    real_open = builtins.open

    def guarded(f, *a, **k):
        if str(f).endswith(".safetensors"):
            raise PermissionError(errno.EACCES, "Permission denied", str(f))
        return real_open(f, *a, **k)

    monkeypatch.setattr(builtins, "open", guarded)
    refused(model, tmp_path, capsys, "permission denied")


# --------------------------------------------------------------------------- paths and flags

FLAG_CASES = {
    "no such model": (["--model", "/nonexistent/model"], ["no such directory"]),
    "model is a file": (["--model", "FILE"], ["not a directory"]),
    "empty model folder": (["--model", "EMPTY"], ["config.json"]),
    "over-long path": (["--model", "/" + "a" * 5000], ["a" * 20]),
    "no such user's home": (["--model", "~no-such-user-drift/x"], ["~no-such-user-drift/x", "no such directory"]),
    "block start past the end": (["--block-start", "99"], ["--block-start 99", "out of range"]),
    "block end before start": (["--block-start", "2", "--block-end", "1"], ["--block-end 1"]),
    "negative block start": (["--block-start", "-1"], ["--block-start -1"]),
    "block end past the end": (["--block-end", "3"], ["--block-end 3", "3 layers"]),
    "negative n-null": (["--n-null", "-1"], ["n_null"]),
    "seed beyond 64 bits": (["--seed", str(2 ** 70)], ["seed"]),
    "negative seed": (["--seed", "-3"], ["seed"]),
    "device mps": (["--device", "mps"], ["device", "mps"]),
    "device meta": (["--device", "meta"], ["device", "meta"]),
    "device nonsense": (["--device", "gpu0"], ["device", "gpu0"]),
    "cuda without one": (["--device", "cuda"], ["cuda"]),
    "cuda:1 without one": (["--device", "cuda:1"], ["'cuda:1'", "no CUDA device"]),
    "cuda:3 of one": (["--device", "cuda:3"], ["'cuda:3'", "only 1 CUDA device"]),
    "dtype float16": (["--dtype", "float16"], ["--dtype", "float16"]),
    "unknown pairs": (["--pairs", "diag"], ["--pairs", "diag"]),
    "unknown method": (["--method", "foo"], ["--method", "foo"]),
    "n-null not a number": (["--n-null", "abc"], ["--n-null", "abc"]),
    "unknown flag": (["--bogus"], ["--bogus"]),
}


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_bad_paths_and_flags(case, model, tmp_path, capsys, monkeypatch):
    if case.endswith("without one"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if case == "cuda:3 of one":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    argv, words = FLAG_CASES[case]
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "EMPTY").mkdir()
    argv = [str(tmp_path / a) if a in ("FILE", "EMPTY") else a for a in argv]
    if "--model" not in argv:
        argv = ["--model", str(model), *argv]
    out = tmp_path / "out.json"
    rc, err = run_cli(["analyze", *argv, "--out", str(out), "--quiet"], capsys)
    assert_one_line(rc, err, *words)
    assert not out.exists()


@pytest.mark.parametrize("out, words", [
    ("~no-such-user-drift/x.json", ["--out ~no-such-user-drift/x.json", "cannot expand ~"]),
    ("PIPE", ["is not a regular file"]),  # it used to wait for a writer, before any work
    ("DIR/", ["not a file name"]),  # it used to write DIR
])
def test_an_out_that_names_no_regular_file_is_refused(out, words, model, tmp_path, capsys):
    os.mkfifo(tmp_path / "PIPE")
    out = out.replace("PIPE", str(tmp_path / "PIPE")).replace("DIR", str(tmp_path / "DIR"))
    rc, err = run_cli(["analyze", "--model", str(model), "--out", out, "--quiet"], capsys)
    assert_one_line(rc, err, *words)
    assert not (tmp_path / "DIR").exists()


@pytest.mark.parametrize("command", ["analyze", "function", "tie"])
def test_an_empty_out_is_refused_not_taken_for_the_default(command, tmp_path, capsys, monkeypatch):
    # --out "" (an unset shell variable) wrote drift_<model>_<method>.json here instead
    monkeypatch.chdir(tmp_path)
    rc, err = run_cli([command, "--model", "minilm", "--out", "", "--quiet"], capsys)
    assert_one_line(rc, err, "--out '' is empty")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["function", "tie"])
@pytest.mark.parametrize("spec, bad", [("0:100", 6), ("7:9", 7), ("-1:3", -1)])
def test_a_layer_range_beyond_the_model_quotes_the_spec(command, spec, bad, tmp_path, capsys):
    rc, err = run_cli([command, "--model", "minilm", f"--layers={spec}", "--quiet",
                       "--out", str(tmp_path / "x.json")], capsys)
    assert_one_line(rc, err, f"--layers {spec}: layer {bad} is out of range", "6 layers (0..5)")


def test_no_command(capsys):
    rc, err = run_cli([], capsys)
    assert_one_line(rc, err, "command")


# --------------------------------------------------------------------------- outputs

@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "new.json", "sub/x.json"])
def test_output_inside_the_model_folder_is_refused(name, model, tmp_path, capsys):
    (model / "sub").mkdir(exist_ok=True)
    refused(model, tmp_path, capsys, "inside the model folder", extra=["--out", str(model / name)])


def test_output_folder_missing_or_a_folder(model, tmp_path, capsys):
    for out, words in ((tmp_path / "no" / "such" / "x.json", ["does not exist"]), (tmp_path, ["is a folder"])):
        rc, err = run_cli(["analyze", "--model", str(model), "--out", str(out), "--quiet"], capsys)
        assert_one_line(rc, err, *words)


def test_output_over_a_file_that_is_not_a_drift_result(model, tmp_path, capsys):
    notes = tmp_path / "notes.json"
    notes.write_text('{"my": "notes"}')
    rc, err = run_cli(["analyze", "--model", str(model), "--out", str(notes), "--quiet"], capsys)
    assert_one_line(rc, err, "not a drift result", "--force")
    assert notes.read_text() == '{"my": "notes"}'
    rc, err = run_cli(["analyze", "--model", str(model), "--out", str(notes), "--quiet", "--force"], capsys)
    assert rc == 0 and "drift_version" in notes.read_text()  # forced: replaced
    rc, err = run_cli(["analyze", "--model", str(model), "--out", str(notes), "--quiet"], capsys)
    assert rc == 0  # a drift result may be replaced by the path's owner asking for it


def test_default_output_never_replaces_an_earlier_one(model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert run_cli(["analyze", "--model", str(model), "--quiet"], capsys)[0] == 0
    first, second = tmp_path / f"drift_{model.name}_exact.json", tmp_path / f"drift_{model.name}_exact-2.json"
    assert first.exists() and second.exists()


def test_model_dot_does_not_write_into_the_checkpoint(model, capsys, monkeypatch):
    monkeypatch.chdir(model)
    before = _digest(model)
    rc, err = run_cli(["analyze", "--model", ".", "--quiet"], capsys)
    assert_one_line(rc, err, "the default --out", "inside the model folder")  # no --out was given
    assert _digest(model) == before


def test_small_refusals_from_fuzzing(model, tmp_path, capsys, checkpoint_copy):
    """An empty --other is named as --other; a seed of True and a CPU index are refused; a
    layer count or a token count too large for memory is named, not a MemoryError."""
    import drift
    from drift.errors import ConfigError, DriftError
    from drift.function import activation_similarity

    with pytest.raises(ConfigError, match="num_hidden_layers is 1000000000000, more than 100000"):
        drift.open_layers(str(checkpoint_copy("llama", num_hidden_layers=10 ** 12)))
    with pytest.raises(DriftError, match="random tokens do not fit in memory"):
        activation_similarity("tiny-qwen3", tokens="random", n_seq=10 ** 12, progress=False)

    rc, err = run_cli(["analyze", "--model", str(model), "--other", "", "--out", str(tmp_path / "o.json")], capsys)
    assert_one_line(rc, err, "--other '' is an empty name")
    for kw, words in ((dict(seed=True), "seed must be an integer, not True"),
                      (dict(device="cpu:1"), "device must be auto, cpu or cuda")):
        with pytest.raises(DriftError, match=words):
            drift.analyze(model, progress=False, n_null=0, **kw)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_unwritable_output_folder_is_refused_before_the_work(model, capsys, monkeypatch):
    """No file can be made in /proc, though os.access says one can to root (and here to anyone)."""
    from drift import analysis

    monkeypatch.setattr(os, "access", lambda *a, **k: True)
    monkeypatch.setattr(analysis, "analyze", lambda *a, **k: pytest.fail("computed before checking --out"))
    rc, err = run_cli(["analyze", "--model", str(model), "--out", "/proc/x.json", "--quiet"], capsys)
    assert_one_line(rc, err, "--out /proc/x.json", "folder /proc is not writable (")


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(model, tmp_path, capsys, monkeypatch):
    from drift import output

    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(output.os, "replace", full)
    rc, err = run_cli(["analyze", "--model", str(model), "--out", str(tmp_path / "x.json"), "--quiet"], capsys)
    assert_one_line(rc, err, f"cannot write {tmp_path / 'x.json'}: no space left")  # --out, not the temporary file
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- signals

def _children(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.fixture
def slow_run(tmp_path):
    """``drift analyze`` on MiniLM, all pairs, exact (assignment workers), in its own temp folder."""
    procs = []

    def start():
        tmp = tmp_path / "tmp"
        tmp.mkdir(exist_ok=True)
        env = {**os.environ, "TMPDIR": str(tmp), "DRIFT_CACHE_DIR": str(tmp_path / "cache")}
        p = subprocess.Popen([sys.executable, "-m", "drift", "analyze", "--model", "minilm", "--pairs", "all",
                              "--n-null", "3", "--out", str(tmp_path / "out.json"), "--quiet"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
        procs.append(p)
        t_end = time.monotonic() + 60
        while len(_children(p.pid)) < 2:  # the workers are up: the assignments have started
            assert p.poll() is None and time.monotonic() < t_end, p.communicate()
            time.sleep(0.1)
        time.sleep(1.0)  # some cost files written and queued
        return p, _children(p.pid), tmp

    yield start
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_stops_cleanly(sig, slow_run, tmp_path):
    p, workers, tmp = slow_run()
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert_one_line(p.returncode, err, status=130 if sig == signal.SIGINT else 128 + sig)
    deadline = time.monotonic() + 10
    while any(w.is_running() and w.status() != "zombie" for w in workers):
        assert time.monotonic() < deadline, "assignment workers outlived the run"
        time.sleep(0.1)
    assert not list(tmp.glob("drift-lap-*")), "temporary cost files left behind"
    assert not (tmp_path / "out.json").exists()


def test_workers_exit_when_drift_is_killed_and_its_files_are_cleaned_next_time(slow_run, tmp_path):
    p, workers, tmp = slow_run()
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    deadline = time.monotonic() + 10
    while any(w.is_running() and w.status() != "zombie" for w in workers):
        assert time.monotonic() < deadline, "workers outlived a killed parent"
        time.sleep(0.1)
    stale = tmp / f"drift-lap-{p.pid}-left.f64"  # what a kill between write and pickup leaves
    stale.write_bytes(b"\0" * 64)
    from drift import assign

    monkey = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp)
    try:
        import tempfile

        tempfile.tempdir = None
        gone = assign.remove_stale_costs()
    finally:
        if monkey is None:
            os.environ.pop("TMPDIR")
        else:
            os.environ["TMPDIR"] = monkey
        tempfile.tempdir = None
    assert str(stale) in gone and not list(tmp.glob("drift-lap-*"))


@pytest.mark.parametrize("command", ["analyze", "function", "tie"])
def test_an_unknown_flag_points_to_its_commands_help(command, capsys):
    rc, err = run_cli([command, "--bogus"], capsys)
    assert_one_line(rc, err, "unrecognized arguments: --bogus", f"(see drift {command} --help)")


@pytest.mark.parametrize("layers, words", [([1, 1, 2], ("distinct", "layer 1 appears twice")),
                                           ([0, 1, 2, 1], ("distinct", "layer 1 appears twice")),
                                           (3, ("iterable", "not 3")),
                                           ("012", ("iterable",))])
def test_repeated_or_scalar_layers_are_refused(layers, words, model):
    # [1, 1, 2] compared layer 1 with itself (a residual of 0, no warning); with pairs="all"
    # [0, 1, 2, 1] gave duplicate rows that to_json then failed on, after the work
    import drift
    from drift.errors import DriftError

    with pytest.raises(DriftError) as e:
        drift.analyze(str(model), layers=layers, n_null=0, progress=False, pairs="all")
    for w in words:
        assert w in str(e.value)


def test_a_family_given_twice_is_refused_before_the_tie(capsys):
    # it used to crash in to_json_dict after the whole computation, losing the result
    rc, err = run_cli(["tie", "--model", "minilm", "--quiet", "--family", "mlp,mlp", "--layers", "0:1"], capsys)
    assert_one_line(rc, err, "family 'mlp' is given twice")


# --------------------------------------------------------------------------- the API's arguments

def test_numpy_integers_are_taken_for_n_null(model):
    """n_null took only Python ints while seed took numpy's too (a loop over np.arange)."""
    import numpy as np

    import drift

    got = drift.analyze(str(model), layers=[0, 1], n_null=np.int64(1), seed=np.int64(2), progress=False)
    want = drift.analyze(str(model), layers=[0, 1], n_null=1, seed=2, progress=False)
    assert type(got.meta["n_null"]) is int and got.meta == want.meta
    assert got.df.equals(want.df)


@pytest.mark.parametrize("n_null", [True, 1.0, 1.5, -1, "1", None])
def test_n_null_that_is_not_a_count_is_refused(n_null, model):
    import drift
    from drift.errors import DriftError

    with pytest.raises(DriftError, match=r"n_null must be an integer, 0 \(no null\) or more, not "):
        drift.analyze(str(model), layers=[0, 1], n_null=n_null, progress=False)


@pytest.mark.parametrize("budget", ["x", 0, -1, float("nan"), True, None, [1 << 30]])
def test_a_bad_form_budget_is_refused_before_the_model_is_opened(budget):
    # "x" was a TypeError from deep inside the form store, after the model was opened
    import drift
    from drift.errors import DriftError

    with pytest.raises(DriftError, match=r"form_budget must be a number of bytes > 0 .*, not "):
        drift.analyze("/nonexistent/model", form_budget=budget, progress=False)


def test_form_budgets_of_any_number_type_are_taken(model):
    import numpy as np

    import drift

    want = drift.analyze(str(model), layers=[0, 1], n_null=0, progress=False).df
    for budget in (np.int64(1), 2.5e9, float("inf")):
        assert drift.analyze(str(model), layers=[0, 1], n_null=0, form_budget=budget, progress=False).df.equals(want)


class _Stop(Exception):
    pass


def _stop(done, total):
    raise _Stop  # at the bar's first report, before any comparison


@pytest.mark.parametrize("n_null, warned", [(10_000, True), (99, False), (1, False)])
def test_a_large_n_null_says_how_many_comparisons_it_means(n_null, warned, model, caplog):
    import drift

    with caplog.at_level("WARNING", logger="drift.analysis"), pytest.raises(_Stop):
        drift.analyze(str(model), n_null=n_null, pairs="all", progress=_stop)  # 3 layers: 3 pairs
    lines = [r.getMessage() for r in caplog.records if r.name == "drift.analysis"]
    if warned:
        assert lines == ["n_null=10000 means 30,003 comparisons (3 pairs x (1 observed + 10000 null)), "
                         "about 5,000 times the work of the default n_null=1"]
    else:
        assert lines == []


def _result():
    from _synthetic import make_result

    return make_result(layers=range(3))


@pytest.mark.parametrize("call, words", [
    (lambda r: r.matrix("q_proj", value="bogus"), "value must be one of residual, null, rho, not 'bogus'"),
    (lambda r: r.matrix("bogus"), "family 'bogus' is not in the result (it has q_proj, "),
    (lambda r: r.summary(by="bogus"), "by must be one of residual, null, rho, not 'bogus'"),
    (lambda r: r.summary(by="invariant"), "by must be one of residual, null, rho, not 'invariant'"),
])
def test_a_result_names_its_choices(call, words):
    # these were a bare KeyError('bogus') from pandas, or an empty matrix for an unknown family
    from drift.errors import DriftError

    with pytest.raises(DriftError) as e:
        call(_result())
    assert words in str(e.value)


def test_a_result_takes_every_number_column():
    r = _result()
    assert r.value_columns == ["residual", "null", "rho"]
    r.df["embedding_cos"] = 0.5  # a tie's extra column
    assert r.summary(by="embedding_cos")["mean"].eq(0.5).all()
    null = r.df.query("family == 'q_proj' and layer_a == 0")["null"].item()
    assert r.matrix("q_proj", value="null").loc[0, 1] == null


def test_python_arguments_of_the_wrong_kind_are_one_line(tmp_path):
    """Found by fuzzing the Python API: each of these ended in a TypeError, KeyError,
    AttributeError or FileNotFoundError from deep inside; now a DriftError naming the argument
    (reference: numpy's integers are taken, as counts are)."""
    import numpy as np

    import drift
    from drift.cache import cached_analyze
    from drift.errors import DriftError
    from drift.function import activation_similarity, tie
    from drift.result import AnalysisResult

    quick = dict(tokens="random", n_seq=2, seq_len=8, progress=False)
    (tmp_path / "config.json").write_text('{"hidden_size": 64}')
    (tmp_path / "list.json").write_text("[1]")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    cases = [
        (lambda: tie("tiny-qwen3", family=None, **quick), "family must be 'all', a family name or a list"),
        (lambda: tie("tiny-qwen3", family=3, **quick), "family must be"),
        (lambda: drift.analyze("tiny-qwen3", layers=torch.tensor(1), progress=False), "layers must be a list"),
        (lambda: drift.analyze("tiny-qwen3", layers=np.array([[0, 1]]), progress=False), "layers must be integers"),
        (lambda: activation_similarity("minilm", text=5, progress=False), "text must be the path of a text file"),
        (lambda: activation_similarity("minilm", text=tmp_path / "none.txt", progress=False), "No such file"),
        (lambda: activation_similarity("minilm", text="", progress=False), "an empty name"),
        (lambda: AnalysisResult.from_json(tmp_path / "config.json"), "not a drift result"),
        (lambda: AnalysisResult.from_json(tmp_path / "list.json"), "not a drift result"),
        (lambda: AnalysisResult.from_json(tmp_path / "binary.json"), "not a drift result .not JSON"),
        (lambda: cached_analyze(None, cache=tmp_path / "c"), "model must be a checkpoint folder"),
        (lambda: cached_analyze("tiny-qwen3", cache=5), "cache must be a Cache or a folder"),
    ]
    for call, words in cases:
        with pytest.raises(DriftError, match=words) as e:
            call()
        assert "\n" not in str(e.value)
    r = tie("tiny-qwen3", family="q_proj", reference=np.int64(0), layers=[0, 1, 2], **quick)
    assert r.meta["reference"] == 0 and type(r.meta["reference"]) is int


def test_a_value_that_reads_as_a_flag_gets_a_hint(capsys):
    rc, err = run_cli(["function", "--model", "minilm", "--layers", "-1:2"], capsys)
    assert_one_line(rc, err, "--layers: expected one argument", "give it as --layers=VALUE")
