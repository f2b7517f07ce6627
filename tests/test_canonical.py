"""The canonical layer is the checkpoint, sliced: every architecture, every tensor, exactly.

The expected canonical tensors are computed here *independently* of ``drift.canonical``:
straight from the live ``transformers`` modules, head by head, following the layouts of
gauge-spec §1 (``Q_h = q_proj.weight[h·d_h:(h+1)·d_h, :]``, GPT-2 ``Conv1D`` columns, NeoX
per-head interleaving, Phi-3 fused rows, BERT's relocated post-LN, Gemma's ``1 + w``).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import drift
from drift.canonical import layer_state_dict, rope_freqs
from drift.errors import CheckpointError, UnsupportedArchitectureError

from drift.toy import TOY_CONFIGS

Tensor = torch.Tensor
TOY_NAMES = tuple(TOY_CONFIGS)


# --------------------------------------------------------------------------- independent oracle

def row_heads(w: Tensor, n: int, dh: int) -> Tensor:
    """(n·dh, H) -> (n, dh, H): head h is rows h·dh … (h+1)·dh."""
    return torch.stack([w[h * dh:(h + 1) * dh, :] for h in range(n)])


def col_heads(w: Tensor, n: int, dh: int) -> Tensor:
    """(H, n·dh) -> (n, H, dh): head h is columns h·dh … (h+1)·dh."""
    return torch.stack([w[:, h * dh:(h + 1) * dh] for h in range(n)])


def bias_heads(b: Tensor, n: int, dh: int) -> Tensor:
    """(n·dh,) -> (n, dh)."""
    return torch.stack([b[h * dh:(h + 1) * dh] for h in range(n)])


def _norm(out: dict[str, Tensor], role: str, module: torch.nn.Module, offset: float = 0.0) -> None:
    out[f"norm.{role}.weight"] = module.weight + offset if offset else module.weight
    if getattr(module, "bias", None) is not None:
        out[f"norm.{role}.bias"] = module.bias


# Llama-family norm roles -> module names (Gemma-2 has sandwich norms).
_LLAMA_NORMS = {"attn_in": "input_layernorm", "mlp_in": "post_attention_layernorm"}
_GEMMA2_NORMS = {"attn_in": "input_layernorm", "attn_out": "post_attention_layernorm",
                 "mlp_in": "pre_feedforward_layernorm", "mlp_out": "post_feedforward_layernorm"}


def _llama_like(model, i: int) -> dict[str, Tensor]:
    cfg, blk = model.config, model.model.layers[i]
    a, m = blk.self_attn, blk.mlp
    nh, nkv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, a.head_dim
    out = {
        "W_Q": row_heads(a.q_proj.weight, nh, dh),  # (nh, dh, H)
        "W_K": row_heads(a.k_proj.weight, nkv, dh),  # (nkv, dh, H)
        "W_V": row_heads(a.v_proj.weight, nkv, dh),  # (nkv, dh, H)
        "W_O": col_heads(a.o_proj.weight, nh, dh),  # (nh, H, dh)
        "W_gate": m.gate_proj.weight, "W_up": m.up_proj.weight, "W_down": m.down_proj.weight,
    }
    if a.q_proj.bias is not None:  # Qwen2
        out |= {"b_Q": bias_heads(a.q_proj.bias, nh, dh), "b_K": bias_heads(a.k_proj.bias, nkv, dh),
                "b_V": bias_heads(a.v_proj.bias, nkv, dh)}
    offset = 1.0 if cfg.model_type.startswith("gemma") else 0.0  # Gemma applies (1 + w)
    for role, module in (_GEMMA2_NORMS if cfg.model_type == "gemma2" else _LLAMA_NORMS).items():
        _norm(out, role, getattr(blk, module), offset)
    if cfg.model_type == "qwen3":
        _norm(out, "q_norm", a.q_norm)
        _norm(out, "k_norm", a.k_norm)
    return out


def _phi3(model, i: int) -> dict[str, Tensor]:
    cfg, blk = model.config, model.model.layers[i]
    a = blk.self_attn
    nh, nkv, dh, F = cfg.num_attention_heads, cfg.num_key_value_heads, a.head_dim, cfg.intermediate_size
    qkv = a.qkv_proj.weight  # rows [q | k | v]
    gate_up = blk.mlp.gate_up_proj.weight  # rows [gate | up]
    out = {
        "W_Q": row_heads(qkv[:nh * dh], nh, dh),
        "W_K": row_heads(qkv[nh * dh:(nh + nkv) * dh], nkv, dh),
        "W_V": row_heads(qkv[(nh + nkv) * dh:], nkv, dh),
        "W_O": col_heads(a.o_proj.weight, nh, dh),
        "W_gate": gate_up[:F], "W_up": gate_up[F:], "W_down": blk.mlp.down_proj.weight,
    }
    for role, module in _LLAMA_NORMS.items():
        _norm(out, role, getattr(blk, module))
    return out


def _gpt2(model, i: int) -> dict[str, Tensor]:
    cfg, blk = model.config, model.transformer.h[i]
    a, m = blk.attn, blk.mlp
    H, nh = cfg.n_embd, cfg.n_head
    dh = H // nh
    W, b = a.c_attn.weight, a.c_attn.bias  # Conv1D (in=H, out=3H), columns [q | k | v]
    out = {
        "W_Q": row_heads(W[:, :H].T, nh, dh), "W_K": row_heads(W[:, H:2 * H].T, nh, dh),
        "W_V": row_heads(W[:, 2 * H:].T, nh, dh),
        "b_Q": bias_heads(b[:H], nh, dh), "b_K": bias_heads(b[H:2 * H], nh, dh),
        "b_V": bias_heads(b[2 * H:], nh, dh),
        # c_proj is (in = heads·dh, out = H): head h reads rows h·dh … (h+1)·dh
        "W_O": torch.stack([a.c_proj.weight[h * dh:(h + 1) * dh, :].T for h in range(nh)]),
        "b_O": a.c_proj.bias,
        "W_up": m.c_fc.weight.T, "b_up": m.c_fc.bias, "W_down": m.c_proj.weight.T, "b_down": m.c_proj.bias,
    }
    _norm(out, "attn_in", blk.ln_1)
    _norm(out, "mlp_in", blk.ln_2)
    return out


def _gpt_neox(model, i: int) -> dict[str, Tensor]:
    cfg, blk = model.config, model.gpt_neox.layers[i]
    a, m = blk.attention, blk.mlp
    nh = cfg.num_attention_heads
    dh = cfg.hidden_size // nh
    W, b = a.query_key_value.weight, a.query_key_value.bias  # (3H, H), per head [q_h | k_h | v_h]

    def part(j: int, t: Tensor) -> Tensor:  # j = 0 (q), 1 (k), 2 (v)
        return torch.stack([t[3 * dh * h + j * dh: 3 * dh * h + (j + 1) * dh] for h in range(nh)])

    out = {
        "W_Q": part(0, W), "W_K": part(1, W), "W_V": part(2, W),
        "b_Q": part(0, b), "b_K": part(1, b), "b_V": part(2, b),
        "W_O": col_heads(a.dense.weight, nh, dh), "b_O": a.dense.bias,
        "W_up": m.dense_h_to_4h.weight, "b_up": m.dense_h_to_4h.bias,
        "W_down": m.dense_4h_to_h.weight, "b_down": m.dense_4h_to_h.bias,
    }
    _norm(out, "attn_in", blk.input_layernorm)
    _norm(out, "mlp_in", blk.post_attention_layernorm)
    return out


def _bert(model, i: int) -> dict[str, Tensor]:
    cfg, blk = model.config, model.encoder.layer[i]
    s, ao = blk.attention.self, blk.attention.output
    nh = cfg.num_attention_heads
    dh = cfg.hidden_size // nh
    out = {
        "W_Q": row_heads(s.query.weight, nh, dh), "W_K": row_heads(s.key.weight, nh, dh),
        "W_V": row_heads(s.value.weight, nh, dh),
        "b_Q": bias_heads(s.query.bias, nh, dh), "b_K": bias_heads(s.key.bias, nh, dh),
        "b_V": bias_heads(s.value.bias, nh, dh),
        "W_O": col_heads(ao.dense.weight, nh, dh), "b_O": ao.dense.bias,
        "W_up": blk.intermediate.dense.weight, "b_up": blk.intermediate.dense.bias,
        "W_down": blk.output.dense.weight, "b_down": blk.output.dense.bias,
    }
    # Post-LN: what layer i's attention reads is the LN that ended layer i-1 (or the embeddings).
    _norm(out, "attn_in", model.encoder.layer[i - 1].output.LayerNorm if i else model.embeddings.LayerNorm)
    _norm(out, "mlp_in", ao.LayerNorm)
    return out


ORACLE = {"llama": _llama_like, "mistral": _llama_like, "qwen2": _llama_like, "qwen3": _llama_like,
          "gemma": _llama_like, "gemma2": _llama_like, "phi3": _phi3, "gpt2": _gpt2,
          "gpt_neox": _gpt_neox, "bert": _bert}


@torch.no_grad()
def expected_layer(model, i: int) -> dict[str, Tensor]:
    """Canonical name (as in ``CanonicalLayer.tensors()``) -> tensor, from the live model."""
    return {k: v.detach() for k, v in ORACLE[model.config.model_type](model, i).items()}


def assert_layer_equals(layer: drift.CanonicalLayer, expected: dict[str, Tensor], dtype: torch.dtype) -> int:
    got = dict(layer.tensors())
    assert got.keys() == expected.keys(), f"layer {layer.index}: tensors differ"
    for k, want in expected.items():
        assert got[k].dtype == dtype, f"layer {layer.index} {k}: dtype {got[k].dtype}"
        assert torch.equal(got[k], want.to(dtype)), f"layer {layer.index} {k}: values differ"
    return len(expected)


# --------------------------------------------------------------------------- reading

@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("name", TOY_NAMES)
def test_every_tensor_is_the_live_model_slice(toy_checkpoint, name, sharded):
    folder, model = toy_checkpoint(name, sharded)
    reader = drift.open_layers(str(folder))
    n_layers = model.config.num_hidden_layers
    assert reader.n_layers == n_layers
    checked, layers = 0, 0
    for i, layer in enumerate(reader):
        assert layer.index == i
        checked += assert_layer_equals(layer, expected_layer(model, i), torch.float32)
        layers += 1
    assert layers == n_layers > 0
    assert checked >= 9 * n_layers  # the smallest layer (Llama) has 9 tensors


@pytest.mark.parametrize("name", TOY_NAMES)
def test_symmetry_description_matches_live_model(toy_checkpoint, name):
    folder, model = toy_checkpoint(name)
    sym = drift.open_layers(str(folder)).sym
    exp = expected_layer(model, 0)
    nh, dh, H = exp["W_Q"].shape
    assert (sym.n_heads, sym.d_head, sym.d_model) == (nh, dh, H)
    assert sym.n_kv_heads == exp["W_K"].shape[0]
    assert sym.d_ff == exp["W_up"].shape[0]
    assert sym.is_glu == ("W_gate" in exp)
    assert sym.qk_norm == ("norm.q_norm.weight" in exp)
    assert sym.norm_kind == ("layer" if "norm.attn_in.bias" in exp else "rms")
    assert sym.post_norms == ("norm.attn_out.weight" in exp)
    assert sym.post_ln == (name == "bert")
    _assert_rope_matches(model, sym)


def _assert_rope_matches(model, sym: drift.LayerSymmetry) -> None:
    """RoPE pairs and frequencies as the live model computes them (its ``inv_freq`` buffer)."""
    inv_freq = [b for n, b in model.named_buffers() if n.endswith("rotary_emb.inv_freq")]
    if not sym.rope:
        assert inv_freq == [] and sym.rotary_dims == 0
        return
    assert len(inv_freq) == 1
    assert sym.rotary_dims == 2 * inv_freq[0].numel()
    torch.testing.assert_close(rope_freqs(sym), inv_freq[0].double(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name, overrides, theta, rotary_dims", [
    ("llama", dict(rope_theta=500000.0), 500000.0, 16),
    ("qwen3", dict(rope_theta=1e6), 1e6, 16),
    ("gpt_neox", dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                       "partial_rotary_factor": 0.5},
                      rotary_pct=0.5, partial_rotary_factor=0.5), 500.0, 8),
])
def test_rope_base_and_fraction_are_read_from_config(tmp_path, name, overrides, theta, rotary_dims):
    from drift import toy

    model = toy.tiny_model(name, dtype=torch.float32, **overrides)
    sym = drift.open_layers(str(toy.save(model, tmp_path / name))).sym
    assert (sym.rope_theta, sym.rotary_dims) == (theta, rotary_dims)
    _assert_rope_matches(model, sym)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", TOY_NAMES)
def test_bf16_checkpoint_is_upcast(toy_checkpoint, name, dtype):
    folder, model = toy_checkpoint(name, dtype=torch.bfloat16)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    model = model.to(torch.bfloat16).to(dtype)  # what the file holds, widened
    reader = drift.open_layers(str(folder), dtype=dtype)
    checked = sum(assert_layer_equals(layer, expected_layer(model, layer.index), dtype) for layer in reader)
    assert checked >= 9 * model.config.num_hidden_layers > 0


# --------------------------------------------------------------------------- writing back

# Layer tensors that no layer reads: BERT's last output LN normalises the model's output.
def _unread(name: str, n_layers: int) -> set[str]:
    if name == "bert":
        return {f"encoder.layer.{n_layers - 1}.output.LayerNorm.{p}" for p in ("weight", "bias")}
    return set()


# Tensors outside the layers that a layer reads: BERT's embedding LN feeds layer 0.
def _borrowed(name: str) -> set[str]:
    return {f"embeddings.LayerNorm.{p}" for p in ("weight", "bias")} if name == "bert" else set()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", TOY_NAMES)
def test_layer_state_dict_round_trips_to_the_checkpoint(toy_checkpoint, name, dtype):
    """Exact, except that in float32 Gemma's gain (1 + w) - 1 loses up to one ulp of 1 + w."""
    folder, _ = toy_checkpoint(name)
    stored = load_file(str(folder / "model.safetensors"))
    reader = drift.open_layers(str(folder), dtype=dtype)
    written: set[str] = set()
    for i in range(reader.n_layers):
        sd = layer_state_dict(reader.read(i), reader)
        assert sd, f"layer {i}: nothing written"
        for k, t in sd.items():
            assert k in stored, f"layer {i}: wrote {k!r}, which the checkpoint does not have"
            t = t.to(stored[k].dtype)
            if dtype == torch.float32 and name.startswith("gemma") and k.endswith("norm.weight"):
                torch.testing.assert_close(t, stored[k], rtol=0, atol=torch.finfo(torch.float32).eps)
            else:
                assert torch.equal(t, stored[k]), f"layer {i}: {k} differs after the round trip"
        assert not written & sd.keys(), f"layer {i} rewrote tensors of an earlier layer"
        written |= sd.keys()
    # Every layer tensor of the checkpoint is read by exactly one layer: nothing ignored.
    in_layers = {k for k in stored if re.search(r"\.\d+\.", k)}
    assert in_layers
    assert written == (in_layers - _unread(name, reader.n_layers)) | _borrowed(name)


# --------------------------------------------------------------------------- laziness

@pytest.mark.parametrize("name", TOY_NAMES)
def test_reading_a_layer_opens_only_its_shards(toy_checkpoint, name):
    folder, _ = toy_checkpoint(name, sharded=True)
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    all_files = set(weight_map.values())
    assert len(all_files) > 3
    per_layer = []
    for i in range(drift.open_layers(str(folder)).n_layers):
        reader = drift.open_layers(str(folder))
        assert reader.ckpt.opened == []  # opening reads the index only
        layer = reader.read(i)
        needed = {weight_map[k] for k in layer_state_dict(layer, reader)}
        assert set(reader.ckpt.opened) == needed
        assert needed < all_files
        per_layer.append(frozenset(needed))
    assert len(set(per_layer)) == len(per_layer) > 0  # layers do land in different shards


# --------------------------------------------------------------------------- config errors

@pytest.mark.parametrize("name, change, match", [
    ("llama", dict(hidden_size=None), "lacks hidden_size"),
    ("llama", dict(num_key_value_heads=3), "not a multiple of num_key_value_heads=3"),
    ("llama", dict(num_hidden_layers=None), "lacks num_hidden_layers"),
])
def test_config_that_cannot_describe_a_layer(checkpoint_copy, name, change, match):
    folder = checkpoint_copy(name, **change)  # a missing field is a ConfigError, a bad head split unsupported
    with pytest.raises((drift.ConfigError, UnsupportedArchitectureError), match=match):
        drift.open_layers(str(folder))


@pytest.mark.parametrize("name, change, match", [
    ("llama", dict(num_attention_heads=8), r"q_proj: weight has shape \(64, 64\).*expected \(128, 64\)"),
    ("phi3", dict(num_key_value_heads=4), r"qkv_proj: weight has shape \(128, 64\).*expected \(192, 64\)"),
    ("llama", dict(intermediate_size=256), r"W_up has shape \(128, 64\), expected \(256, 64\)"),
    ("phi3", dict(intermediate_size=96), r"gate_up_proj: weight has shape \(256, 64\).*expected \(192, 64\)"),
])
def test_config_that_disagrees_with_the_weights(checkpoint_copy, name, change, match):
    reader = drift.open_layers(str(checkpoint_copy(name, **change)))
    with pytest.raises(CheckpointError, match=match):
        reader.read(0)


def test_glu_layer_without_gate_is_refused(toy_checkpoint):
    layer = drift.open_layers(str(toy_checkpoint("llama")[0])).read(0)
    with pytest.raises(CheckpointError, match="GLU MLP without a gate"):
        replace(layer, W_gate=None)


def test_plain_mlp_layer_with_gate_is_refused(toy_checkpoint):
    layer = drift.open_layers(str(toy_checkpoint("gpt2")[0])).read(0)
    with pytest.raises(CheckpointError, match="W_gate has shape"):
        replace(layer, W_gate=torch.zeros_like(layer.W_up))


def test_norm_of_wrong_size_is_refused(toy_checkpoint):
    layer = drift.open_layers(str(toy_checkpoint("llama")[0])).read(0)
    with pytest.raises(CheckpointError, match="norm attn_in has shape"):
        replace(layer, norms={"attn_in": (torch.ones(3), None)})
