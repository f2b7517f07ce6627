"""drift.function: activation similarity between layers (residual angle, update CKA).

Each measure against an independent implementation (numpy, token-space CKA; HF's
``output_hidden_states``); functional, i.e. blind to an exact gauge of the weights and not
to a non-symmetry; padding masked out; MiniLM on the default text; every bad input one error.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from drift import gauge, toy
from drift.canonical import LayerReader, layer_state_dict
from drift.checkpoint import Checkpoint
from drift.errors import CheckpointError, DriftError, LayerIndexError
from drift.function import CrossCovariances, activation_similarity, angular_distance, random_tokens
from drift.result import AnalysisResult

QUICK = dict(tokens="random", n_seq=6, seq_len=16, batch_size=4, progress=False)  # tiny models: no tokenizer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread here (the machine is shared), the caller's count again afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- independent references

def numpy_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Linear CKA in token space (Kornblith et al. 2019, eq. for HSIC with linear kernels):
    HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), K = X Xᵀ, L = Y Yᵀ, centred by H = I − 11ᵀ/n."""
    n = len(X)
    H = np.eye(n) - 1.0 / n
    K, L = H @ X @ X.T @ H, H @ Y @ Y.T @ H  # (n, n)
    return float(np.sum(K * L) / np.sqrt(np.sum(K * K) * np.sum(L * L)))


def numpy_angle(A: np.ndarray, B: np.ndarray) -> float:
    cos = np.sum(A * B, 1) / (np.linalg.norm(A, axis=1) * np.linalg.norm(B, axis=1))
    return float(np.mean(np.arccos(np.clip(cos, -1, 1)) / np.pi))


def value(result: AnalysisResult, family: str, a: int, b: int) -> float:
    d = result.df
    row = d[(d["family"] == family) & (d["layer_a"] == a) & (d["layer_b"] == b)]
    assert len(row) == 1
    return float(row["residual"].iloc[0])


def table(result: AnalysisResult) -> np.ndarray:
    return result.df.sort_values(["family", "layer_a", "layer_b"])["residual"].to_numpy(float)


# --------------------------------------------------------------------------- the measures

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accumulated_cka_equals_the_direct_one(seed):
    rng = np.random.default_rng(seed)
    n, d = 300, 12
    X = rng.normal(size=(n, d)) * rng.uniform(0.1, 3, d) + 50.0  # a large mean: the raw sums cancel
    Y = 0.5 * X @ rng.normal(size=(d, d)) + rng.normal(size=(n, d)) - 20.0
    acc = CrossCovariances([(0, 1)])
    cuts = [0, 1, 7, 8, 100, 233, n]  # uneven batches, one of a single token
    for a, b in zip(cuts[:-1], cuts[1:]):
        acc.add({0: torch.tensor(X[a:b], dtype=torch.float32 if seed == 2 else torch.float64),
                 1: torch.tensor(Y[a:b])})
    assert acc.n == n
    Xw = X.astype(np.float32).astype(np.float64) if seed == 2 else X  # the float32 input, exactly
    assert acc.cka(0, 1) == pytest.approx(numpy_cka(Xw, Y), abs=1e-6)
    assert acc.cka(0, 0) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_one_under_rotation_and_scale_and_small_for_unrelated_features():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(400, 10))
    Q, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    acc = CrossCovariances([(0, 1), (0, 2)])
    acc.add({0: torch.tensor(X), 1: torch.tensor(3.0 * X @ Q + 7.0), 2: torch.tensor(rng.normal(size=(400, 10)))})
    assert acc.cka(0, 1) == pytest.approx(1.0, abs=1e-10)
    assert acc.cka(0, 2) < 0.1  # ~ d / n for independent Gaussians


def test_angular_distance_of_planted_angles():
    t = torch.tensor([0.0, np.pi / 3, np.pi / 2, np.pi], dtype=torch.float64)
    a = torch.stack([torch.ones(4), torch.zeros(4)], 1).double() * 2.5  # (4, 2)
    b = torch.stack([torch.cos(t), torch.sin(t)], 1)
    assert torch.allclose(angular_distance(a, b), t / np.pi, atol=1e-7)


# --------------------------------------------------------------------------- against HF on a tiny model

def test_both_measures_match_output_hidden_states(toy_checkpoint):
    folder, model = toy_checkpoint("llama")
    got = activation_similarity(folder, pairs="all", **QUICK)
    # HF's last hidden state is after the final RMSNorm; without it, index l + 1 is layer l's output
    model.model.norm = torch.nn.Identity()
    ids = torch.tensor(random_tokens(model.config.vocab_size, QUICK["n_seq"], QUICK["seq_len"], seed=0))
    with torch.no_grad():
        hs = model.model(input_ids=ids, output_hidden_states=True).hidden_states
    h = [x.reshape(-1, x.shape[-1]).double().numpy() for x in hs]  # (N, d) each, h[0] = embeddings
    checked = 0
    for a, b in got.pairs:
        assert value(got, "residual_angle", a, b) == pytest.approx(numpy_angle(h[a + 1], h[b + 1]), abs=1e-6)
        assert value(got, "update_cka", a, b) == pytest.approx(
            numpy_cka(h[a + 1] - h[a], h[b + 1] - h[b]), abs=1e-5)
        checked += 1
    assert checked == 3
    assert got.meta["tokens"] == "random" and "not text" in got.meta["text"]
    assert got.meta["n_tokens"] == QUICK["n_seq"] * QUICK["seq_len"]


def test_a_random_exact_gauge_leaves_the_numbers_unchanged(toy_checkpoint, tmp_path):
    folder, model = toy_checkpoint("llama")
    before = activation_similarity(folder, pairs="all", **QUICK)
    reader = LayerReader(Checkpoint.open(folder), torch.float64)
    layer = reader.read(1)
    moved, record = gauge.random_gauge(layer, seed=7)
    S, _ = torch.linalg.qr(torch.randn(layer.sym.d_ff, layer.sym.d_ff, generator=torch.Generator().manual_seed(1),
                                       dtype=torch.float64))
    broken = gauge.not_a_symmetry_mlp_rotation(layer, S)

    def saved(new_layer, name):
        m = toy.tiny_model("llama", dtype=torch.float32)
        m.load_state_dict(model.state_dict())
        missing, unexpected = m.load_state_dict(layer_state_dict(new_layer, reader), strict=False)
        assert not unexpected
        return toy.save(m, tmp_path / name)

    assert {"qk", "vo", "norm_fold", "head_perm", "mlp_perm"} <= set(record.parts)
    assert (moved.W_Q - layer.W_Q).norm() > 0.1 * layer.W_Q.norm()  # the weights did move
    after = activation_similarity(saved(moved, "gauged"), pairs="all", **QUICK)
    control = activation_similarity(saved(broken, "rotated"), pairs="all", **QUICK)
    reader.ckpt.close()
    assert len(before.df) == 6
    assert np.abs(table(after) - table(before)).max() < 1e-5
    assert np.abs(table(control) - table(before)).max() > 1e-3  # a non-symmetry is seen


def test_padding_is_masked_out(tmp_path):
    text = tmp_path / "prose.txt"
    text.write_text("The quick brown fox jumps over the lazy dog, and then it rests a while. " * 12)
    kw = dict(layers=[0, 1, 2], pairs="all", text=text, n_seq=50, seq_len=40, progress=False)
    one = activation_similarity("minilm", batch_size=1, **kw)  # no padding at all
    padded = activation_similarity("minilm", batch_size=8, **kw)  # the short tail padded to 40
    assert one.meta["n_tokens"] == padded.meta["n_tokens"] < one.meta["n_seq"] * 40
    assert np.abs(table(one) - table(padded)).max() < 1e-5


# --------------------------------------------------------------------------- MiniLM

@pytest.fixture(scope="module")
def minilm_all():
    return activation_similarity("minilm", pairs="all", progress=False)


def test_minilm_all_pairs_on_the_default_text(minilm_all):
    from drift.function.cli import format_table

    r = minilm_all
    print("\n" + format_table(r))
    assert len(r.pairs) == 15 and set(r.families) == {"residual_angle", "update_cka"}
    assert r.meta["n_tokens"] == 64 * 128 and "pydoc_data" in r.meta["text"]
    assert set(r.df["kind"]) == {"activation"} and set(r.df["space"]) == {"activations"}
    assert r.df["null"].isna().all() and r.df["rho"].isna().all()
    assert ((r.df["residual"] > 0) & (r.df["residual"] < 1)).all()
    # the residual stream turns steadily: from any layer, the angle grows with the distance
    for a in range(5):
        row = [value(r, "residual_angle", a, b) for b in range(a + 1, 6)]
        assert row == sorted(row), (a, row)


def test_minilm_result_draws_as_heatmap_and_along_depth(minilm_all, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from drift import plots

    ax = plots.heatmap(minilm_all, "update_cka", value="residual")
    assert "update_cka" in ax.get_title()
    ax = plots.drift_along(minilm_all, value="residual")
    assert len(ax.get_lines()) >= 2
    back = AnalysisResult.from_json(minilm_all.to_json(tmp_path / "r.json"))
    assert set(back.df["space"]) == {"activations"}
    np.testing.assert_allclose(table(back), table(minilm_all))


def test_weight_results_read_weights(tmp_path):
    import pandas as pd

    df = pd.DataFrame([dict(family="q_proj", layer_a=0, layer_b=1, residual=1.0, null=1.2, rho=0.8,
                            invariant=True, kind="weight")])
    r = AnalysisResult(df, {"method": "exact"})
    assert list(r.df["space"]) == ["weights"]
    d = r.to_json_dict()
    assert d["rows"][0]["space"] == "weights"
    old = {**d, "rows": [{k: v for k, v in d["rows"][0].items() if k != "space"}]}  # written before the column
    assert list(AnalysisResult.from_json_dict(old).df["space"]) == ["weights"]


# --------------------------------------------------------------------------- the CLI

def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    from drift.cli import main

    out = tmp_path / "f.json"
    assert main(["function", "--model", "minilm", "--layers", "3:", "--n-seq", "4", "--seq-len", "32",
                 "--out", str(out), "--quiet"]) == 0
    d = json.loads(out.read_text())
    assert d["pairs_list"] == [[3, 4], [4, 5]] and d["space"] == "activations"
    assert set(d["family_residuals"]) == {"residual_angle", "update_cka"}
    assert main(["function", "--model", "minilm", "--layers", "0:1", "--n-seq", "2", "--seq-len", "16",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "angle" in printed and "cka" in printed and "Saved:" in printed


@pytest.mark.parametrize("argv, message", [
    (["--layers", "0:0"], "at least two layers"),
    (["--layers", "2:9"], "layer 6 is out of range"),
    (["--layers", "two"], "--layers must be FIRST:LAST"),
    (["--n-seq", "0"], "n_seq must be a positive integer"),
])
def test_cli_bad_input_is_one_line(argv, message, tmp_path, capsys):
    from drift.cli import main

    assert main(["function", "--model", "minilm", "--out", str(tmp_path / "x.json"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("drift: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("command", ["function", "tie"])
def test_cli_reversed_layers_are_refused(command, tmp_path, capsys):
    from drift.cli import main

    assert main([command, "--model", "minilm", "--layers", "4:2", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert err == "drift: --layers 4:2: the last layer 2 is before the first 4\n"


@pytest.mark.parametrize("command", ["function", "tie"])
def test_cli_unsupported_architecture_is_named(command, tmp_path, capsys):
    from drift.cli import main

    folder = tmp_path / "t5"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["T5Model"], "model_type": "t5", "num_layers": 6}))
    (folder / "model.safetensors").write_bytes(b"")
    assert main([command, "--model", str(folder), "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("drift: unsupported architecture 'T5Model' (model_type 't5')") and err.count("\n") == 1


def test_cli_weights_of_another_shape_than_the_config_are_one_line(checkpoint_copy, tmp_path):
    """transformers' multi-line load report is not shown (run as a user does: its default verbosity)."""
    import os
    import subprocess
    import sys

    folder = checkpoint_copy("llama", intermediate_size=256)  # the weights have 128
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    proc = subprocess.run([sys.executable, "-m", "drift", "function", "--model", str(folder), "--tokens", "random",
                           "--n-seq", "2", "--seq-len", "8", "--out", str(tmp_path / "x.json"), "--quiet"],
                          capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr == (f"drift: {folder}: layers.0.mlp.down_proj.weight has shape (64, 128), expected "
                           f"(64, 256) from config.json (and 8 more)\n")


@pytest.mark.parametrize("damage, message", [
    (lambda t: torch.full_like(t, float("nan")), "weight 'layers.1.self_attn.q_proj.weight' has NaN or Inf values"),
    (lambda t: (t * 100).to(torch.int8), "tensor 'model.layers.1.self_attn.q_proj.weight' is stored as I8, not as floats"),
])
def test_weights_the_weights_path_refuses_are_refused_on_text_too(checkpoint_copy, damage, message):
    """A NaN weight gave plausible-looking numbers (Qwen3's q_norm hid it), an int8 one was
    cast to floats as it was: both are refused, as ``drift analyze`` refuses them."""
    from safetensors.torch import load_file, save_file

    import drift
    from drift.function import tie

    folder = checkpoint_copy("qwen3")
    f = folder / "model.safetensors"
    state = load_file(f)
    name = "model.layers.1.self_attn.q_proj.weight"
    state[name] = damage(state[name])
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError):
        drift.analyze(folder, progress=False, n_null=0)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(")):
        activation_similarity(folder, tokens="random", n_seq=2, seq_len=8, progress=False)
    with pytest.raises(CheckpointError):
        tie(folder, tokens="random", n_seq=2, seq_len=8, progress=False, family="k_proj")


def test_cli_no_tokenizer_is_one_line(toy_checkpoint, tmp_path, capsys):
    from drift.cli import main

    folder, _ = toy_checkpoint("llama")
    assert main(["function", "--model", str(folder), "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "no tokenizer" in err and "--tokens random" in err and err.count("\n") == 1


# --------------------------------------------------------------------------- bad input

@pytest.fixture
def empty_file(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("  \n\n ")
    return f


@pytest.fixture
def latin1_file(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("déjà vu".encode("latin-1"))
    return f


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(layers=[2]), DriftError, "need at least two layers"),
    (dict(layers=[0, 6]), LayerIndexError, "layer 6 is out of range: the model has 6 layers"),
    (dict(pairs="diagonal"), DriftError, "pairs must be .consecutive. or .all."),
    (dict(text="EMPTY"), DriftError, "holds no text"),
    (dict(text="LATIN1"), DriftError, "not UTF-8"),
    (dict(tokens="words"), DriftError, "tokens must be 'text' or 'random'"),
    (dict(tokens="random", text="EMPTY"), DriftError, "not both"),
    (dict(seq_len=513), DriftError, "exceeds the model's 512 positions"),
    (dict(seq_len=2), DriftError, "leaves no room for text"),
    (dict(n_seq=0), DriftError, "n_seq must be a positive integer"),
    (dict(batch_size=True), DriftError, "batch_size must be a positive integer"),
    (dict(seed=-1), DriftError, "seed"),
    (dict(dtype="float16"), DriftError, "dtype must be float32 or float64"),
    (dict(device="tpu"), DriftError, "device must be"),
    (dict(tokens="random", n_seq=1, seq_len=2), DriftError, "2 tokens to compare the layers on: the update CKA needs at least 3"),
])
def test_bad_input_is_one_clear_error(kwargs, error, message, empty_file, latin1_file):
    kwargs = {k: {"EMPTY": empty_file, "LATIN1": latin1_file}.get(v, v) if isinstance(v, str) else v
              for k, v in kwargs.items()}
    with pytest.raises(error, match=message) as e:
        activation_similarity("minilm", progress=False, **kwargs)
    assert "\n" not in str(e.value)


def test_numpy_integers_are_counts_too():
    """n_seq, seq_len, batch_size from numpy (a sweep over np.arange, say) are accepted, and
    stored as the Python ints they stand for (a result's metadata is JSON)."""
    import numpy as np

    r = activation_similarity("minilm", layers=[0, 1], n_seq=np.int64(2), seq_len=np.int32(16),
                              batch_size=np.int64(1), progress=False)
    assert (r.meta["n_seq"], r.meta["seq_len"], r.meta["batch_size"]) == (2, 16, 1)
    assert all(type(r.meta[k]) is int for k in ("n_seq", "seq_len", "batch_size"))
    with pytest.raises(DriftError, match="n_seq must be a positive integer, not 2.5"):
        activation_similarity("minilm", n_seq=2.5, progress=False)
    with pytest.raises(DriftError, match="batch_size must be a positive integer"):
        activation_similarity("minilm", batch_size=np.bool_(True), progress=False)


def test_a_checkpoint_without_tokenizer_needs_random_tokens(toy_checkpoint):
    folder, _ = toy_checkpoint("llama")
    with pytest.raises(DriftError, match="no tokenizer in .*tokens='random'") as e:
        activation_similarity(folder, seq_len=16, progress=False)
    assert "\n" not in str(e.value)
    r = activation_similarity(folder, **QUICK)  # asked for explicitly: runs, and says so
    assert r.meta["tokens"] == "random" and r.meta["text"].startswith("random token ids")


def test_text_without_tokens_is_refused(tmp_path):
    f = tmp_path / "specials.txt"
    f.write_text("\u200b\u200b")  # zero-width spaces: BERT's tokenizer drops them
    with pytest.raises(DriftError, match="the text gives 0 tokens"):
        activation_similarity("minilm", text=f, progress=False)


def test_a_short_text_warns_of_the_sequences_it_gives(tmp_path, caplog):
    f = tmp_path / "short.txt"
    f.write_text("hi")
    with caplog.at_level("WARNING", logger="drift.function.run"):
        r = activation_similarity("minilm", layers=[0, 1], text=f, n_seq=2, progress=False)
    assert r.meta["n_tokens"] == 3  # [CLS] hi [SEP]
    assert caplog.messages == ["the text gives 1 sequence of 3 tokens, not the 2 asked for",
                               "the update CKA from 3 tokens, fewer than the model's width (384): with so few "
                               "it reads closer to 1 than the layers are alike"]


def test_progress_callback_counts_batches(toy_checkpoint):
    folder, _ = toy_checkpoint("llama")
    seen = []
    activation_similarity(folder, **{**QUICK, "progress": lambda done, total: seen.append((done, total))})
    assert seen == [(0, 2), (1, 2), (2, 2)]


def test_weights_transformers_would_invent_are_refused(checkpoint_copy):
    from safetensors.torch import load_file, save_file

    folder = checkpoint_copy("llama")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DriftError, match="1 weights missing .*layers.1.mlp.up_proj.weight.*at random"):
        activation_similarity(folder, **QUICK)


@pytest.mark.parametrize("headers_read", [True, False])
def test_a_checkpoint_transformers_cannot_load_is_one_line(checkpoint_copy, monkeypatch, headers_read):
    """Named by drift's own read of the weights' headers (the stored dtypes), or, past it,
    by transformers' loader, in one line either way."""
    from drift.function import run

    folder = checkpoint_copy("llama")
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")  # a header, no tensors
    if not headers_read:
        monkeypatch.setattr(run, "_check_stored", lambda *a: None)
    message = "corrupt or truncated safetensors file" if headers_read else "transformers cannot load it .SafetensorError"
    with pytest.raises(CheckpointError, match=message) as e:
        activation_similarity(folder, **QUICK)
    assert "\n" not in str(e.value) and str(e.value).startswith(str(folder))


def test_without_transformers_says_how_to_get_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(DriftError, match="needs transformers.*pip install"):
        activation_similarity("minilm", progress=False)


def test_a_tokenizer_that_is_not_the_models_is_refused(checkpoint_copy):
    """Token ids past vocab_size used to end in an IndexError inside torch.embedding (a
    device-side assert on a GPU)."""
    import shutil

    from drift.checkpoint import bundled_path
    from drift.function import tie

    folder = checkpoint_copy("qwen3")
    src = bundled_path("minilm")
    for f in src.iterdir():
        if "token" in f.name or f.name == "vocab.txt":
            shutil.copy(f, folder / f.name)
    for run in (lambda: activation_similarity(folder, n_seq=2, seq_len=16, progress=False),
                lambda: tie(folder, n_seq=2, seq_len=16, progress=False, family="q_proj")):
        with pytest.raises(DriftError, match=r"its tokenizer gives token id \d+, but the model has \d+ \(vocab_size\)"):
            run()


def test_a_text_file_reads_as_text_mode_does(tmp_path):
    """read_text reads bytes (to bound what a device gives) and decodes them as Python's text
    mode does: \\r\\n and \\r are newlines, a BOM stays, so the windows (and numbers) stay."""
    from drift.function.text import read_text

    f = tmp_path / "t.txt"
    f.write_bytes("\ufeffa\r\nb\rc\n\r\nd é".encode("utf-8"))
    assert read_text(f) == f.read_text(encoding="utf-8")
