"""The ``drift analyze`` command: the real MiniLM run offline, the reference's JSON keys, and
one-line errors with exit status 2."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from drift.cli import main

BERT_FAMILIES = {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "qk_circuit",
                 "ov_circuit", "input_ln", "post_attn_ln"}


def run_cli(*args, env_extra=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "drift", *args], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "minilm.json"
    proc = run_cli("analyze", "--model", "minilm", "--out", str(out))
    return proc, out


def test_minilm_analyze_offline_reports_every_family(minilm_run):
    proc, out = minilm_run
    assert proc.returncode == 0, proc.stderr
    d = json.loads(out.read_text())
    assert d["model"] == "minilm" and d["architecture"] == "bert" and d["method"] == "exact"
    assert d["block_start"] == 0 and d["block_end"] == 5 and d["pairs"] == "consecutive"
    assert set(d["family_residuals"]) == BERT_FAMILIES
    for key in ("family_residuals", "null_residuals", "normalized"):
        for fam, values in d[key].items():
            assert len(values) == 5, (key, fam)
            assert all(v is not None and math.isfinite(v) and v >= 0 for v in values), (key, fam)
    assert all(v > 0 for vals in d["null_residuals"].values() for v in vals)
    # the printed table ranks every family and names the method
    assert "method=exact" in proc.stdout
    assert all(fam in proc.stdout for fam in BERT_FAMILIES)


def analyze_ok(tmp_path, *args) -> tuple[str, dict]:
    """``drift analyze --model minilm *args``: must succeed; (stdout, the JSON it wrote)."""
    out = tmp_path / "out.json"
    proc = run_cli("analyze", "--model", "minilm", *args, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, json.loads(out.read_text())


def test_rotation_method_is_labelled_approximate(tmp_path):
    stdout, d = analyze_ok(tmp_path, "--block-start", "2", "--block-end", "3", "--method", "rotation")
    assert "APPROXIMATE" in stdout
    assert d["approximate"] is True and d["method"] == "rotation"
    assert len(d["family_residuals"]["q_proj"]) == 1


def test_raw_method_is_labelled_unaligned(tmp_path):
    stdout, d = analyze_ok(tmp_path, "--block-start", "2", "--block-end", "3", "--method", "raw", "--n-null", "0")
    assert "weights as stored (no alignment)" in stdout
    assert "APPROXIMATE" not in stdout and "after alignment" not in stdout


@pytest.mark.parametrize("args,message", [
    (["--model", "/nonexistent/ckpt"], "no such directory"),
    (["--model", "minilm", "--block-end", "9"], "out of range"),
    (["--model", "minilm", "--block-start", "4", "--block-end", "2"], "before --block-start"),
    (["--model", "someorg/not-cached-model"], "not in the local Hugging Face cache"),
])
def test_errors_are_one_line_with_status_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code = main(["analyze", *args, "--quiet", "--out", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("drift: ")
    assert "Traceback" not in err


def test_unknown_architecture_exits_2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"],
                                                      "model_type": "mamba"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    proc = run_cli("analyze", "--model", str(tmp_path), "--quiet")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("drift: ") and "Traceback" not in proc.stderr
    assert "unsupported architecture 'MambaForCausalLM'" in proc.stderr and "qwen3" in proc.stderr


def test_no_null_run_ranks_by_residual_and_writes_null_as_json_null(tmp_path):
    stdout, d = analyze_ok(tmp_path, "--block-start", "0", "--block-end", "2", "--n-null", "0")
    assert "not computed (--n-null 0)" in stdout
    assert "by mean residual; no null computed" in stdout
    assert d["n_null"] == 0
    assert all(v is None for vals in d["normalized"].values() for v in vals)
    assert all(v is not None and v >= 0 for vals in d["family_residuals"].values() for v in vals)


@pytest.mark.parametrize("umask", [0o022, 0o002], ids=["022", "002"])
def test_result_file_gets_the_mode_of_a_new_file(umask, toy_checkpoint, tmp_path):
    folder, _ = toy_checkpoint("llama")
    out = tmp_path / "r.json"
    old = os.umask(umask)
    try:
        assert main(["analyze", "--model", str(folder), "--out", str(out), "--quiet"]) == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def _synthetic_table() -> str:
    from _synthetic import make_result

    from drift.cli import _format_table

    r = make_result(layers=range(3))  # input_ln, post_attn_ln among its families
    r.meta["architecture"] = "bert"
    return _format_table(r)


def test_table_says_a_gain_null_shuffles_entries():
    assert "null: same method vs layer_b with its residual stream rotated (a gain: its entries shuffled)" \
        in _synthetic_table()


def test_table_says_rho_and_std_are_over_pairs():
    """rho is the mean of the pairs' ratios, not mean residual / mean null; std the pairs' population std."""
    assert "over each family's pairs: residual mean, min, max, std (population); mean null; mean of the pairs' rho" \
        in _synthetic_table()


def test_only_large_layers_switch_the_allocator():
    """Analyses (API and CLI alike) map large buffers for layers of Qwen3-4B's size, not for small ones."""
    from drift.canonical import LayerSymmetry
    from drift.memory import LARGE_LAYER_BYTES, layer_bytes

    def qwen3(d, nh, nkv, ff):
        return LayerSymmetry(arch="qwen3", n_heads=nh, n_kv_heads=nkv, d_head=128, d_model=d, d_ff=ff,
                             rope=True, rotary_dims=128, rope_theta=1e6, qk_norm=True, norm_kind="rms",
                             mlp_kind="glu", activation="silu", post_norms=False, post_ln=False)

    big, small = qwen3(2560, 32, 8, 9728), qwen3(1024, 16, 8, 3072)
    assert layer_bytes(big) == 4 * (2 * 32 + 2 * 8) * 128 * 2560 + 4 * 3 * 9728 * 2560  # 0.40 GB
    assert layer_bytes(big) >= LARGE_LAYER_BYTES > layer_bytes(small)
