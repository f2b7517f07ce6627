"""Each exact symmetry leaves a tiny model's outputs unchanged; each non-symmetry the
reference script assumed changes them (gauge-spec §3.1)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from drift import gauge, toy
from drift.align import random_orthogonal
from drift.canonical import LayerReader, layer_state_dict
from drift.checkpoint import Checkpoint

ARCHS = list(toy.TOY_CONFIGS)
SYM_TOL = 1e-5  # relative, float64 weights (HF casts some ops to float32: ~1e-7 seen)
EPS_TOL = 1e-4  # symmetries exact only up to a norm's eps (Qwen3 head scale, Gemma2 output scale)
BREAK = 1e-3


@pytest.fixture(scope="module")
def fp64_models(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            model = toy.tiny_model(name, dtype=torch.float64)
            folder = toy.save(model, tmp_path_factory.mktemp(name))
            reader = LayerReader(Checkpoint.open(folder), torch.float64)
            ids = toy.probe_ids()
            cache[name] = (model, reader, ids, toy.outputs(model, ids))
        return cache[name]

    return get


def rel_change(fp64_models, name, transform) -> float:
    """max |Δ output| / max |output| after replacing layer 1 by ``transform(layer 1)``."""
    model, reader, ids, base = fp64_models(name)
    layer = reader.read(1)
    new = transform(layer)
    m2 = copy.deepcopy(model)
    sd = layer_state_dict(new, reader)
    assert set(sd) <= set(m2.state_dict()), set(sd) - set(m2.state_dict())
    m2.load_state_dict(sd, strict=False)
    out = toy.outputs(m2, ids)
    return float((out - base).abs().max() / base.abs().max())


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("seed", [0, 1])
def test_random_exact_gauge_keeps_outputs(fp64_models, name, seed):
    sym = fp64_models(name)[1].sym
    tol = EPS_TOL if (sym.qk_norm or sym.post_norms) else SYM_TOL
    new_holder = {}

    def transform(layer):
        new, rec = gauge.random_gauge(layer, seed)
        new_holder["new"], new_holder["old"] = new, layer
        return new

    assert rel_change(fp64_models, name, transform) < tol
    # and the raw weights did move: the test is not vacuous
    assert (new_holder["new"].W_Q - new_holder["old"].W_Q).norm() > 0.1 * new_holder["old"].W_Q.norm()
    assert (new_holder["new"].W_up - new_holder["old"].W_up).norm() > 0.1 * new_holder["old"].W_up.norm()


@pytest.mark.parametrize("name", ARCHS)
def test_each_component_is_a_symmetry(fp64_models, name):
    """Every piece on its own, so that one wrong piece cannot hide behind another."""
    reader = fp64_models(name)[1]
    s = reader.sym
    g = gen(3)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    pieces = {
        "qk": lambda L: gauge.qk_gauge(L, 0, gauge.random_qk_element(L, g)),
        "vo": lambda L: gauge.vo_gauge(L, s.n_kv_heads - 1, gauge.random_gl(s.d_head, g)),
        "heads": lambda L: gauge.permute_heads(L, gauge.random_group_perm(s.n_heads, s.n_kv_heads, g)),
        "mlp_perm": lambda L: gauge.permute_mlp(L, torch.randperm(s.d_ff, generator=g).numpy()),
    }
    if s.is_glu:
        pieces["glu_scale"] = lambda L: gauge.glu_unit_scale(L, rnd(s.d_ff))  # signs included
    if not s.post_ln:
        pieces["norm_fold"] = lambda L: gauge.norm_fold(
            L, "attn_in", torch.exp(rnd(s.d_model)), rnd(s.d_model) if s.norm_kind == "layer" else None)
    if s.norm_kind == "layer":
        pieces["reader_null"] = lambda L: gauge.reader_mean_null(L, "mlp_in", {"W_up": rnd(s.d_ff)})
        pieces["writer_center"] = lambda L: gauge.writer_center_shift(
            L, rnd(s.n_heads, s.d_head), 0.5, rnd(s.d_ff), -0.3)
    layer = reader.read(1)
    if layer.b_V is not None and layer.b_O is not None:
        pieces["value_bias_fold"] = lambda L: gauge.value_bias_fold(L, 0, rnd(s.d_head))
    if layer.b_K is not None and s.rotary_dims < s.d_head:
        pieces["key_bias_shift"] = lambda L: gauge.key_bias_shift(L, 0, rnd(s.d_head - s.rotary_dims))
    if s.qk_norm:
        pieces["qwen3_pair_swap"] = lambda L: gauge.qwen3_pair_swap(L, torch.tensor([1, 4, 6]))
        pieces["qwen3_gain_trade"] = lambda L: gauge.qwen3_gain_trade(L, torch.exp(rnd(s.rope_pairs)))
    checked = 0
    for piece, fn in pieces.items():
        assert rel_change(fp64_models, name, fn) < SYM_TOL, piece
        checked += 1
    assert checked >= 4


@pytest.mark.parametrize("name", ["qwen3", "gemma2"])
def test_eps_level_symmetries(fp64_models, name):
    s = fp64_models(name)[1].sym
    g = gen(4)
    if name == "qwen3":
        fn = lambda L: gauge.qwen3_head_scale(  # noqa: E731
            L, torch.tensor([3.7, 0.4, 2.5, 1.3], dtype=torch.float64), torch.tensor([0.5, 2.0], dtype=torch.float64))
    else:
        fn = lambda L: gauge.output_scale(L, 3.0, 0.3)  # noqa: E731
    assert rel_change(fp64_models, name, fn) < EPS_TOL
    del s, g


ROPE = [n for n in ARCHS if toy.TOY_CONFIGS[n][0] not in ("GPT2Config", "BertConfig")]


@pytest.mark.parametrize("name", ROPE)
def test_full_head_rotation_breaks_under_rope(fp64_models, name):
    """The reference's per-head O(d_head) rotation of Q/K is not a symmetry with RoPE."""
    s = fp64_models(name)[1].sym
    R = random_orthogonal(s.d_head, gen(5))
    assert rel_change(fp64_models, name, lambda L: gauge.not_a_symmetry_qk_rotation(L, 0, R)) > BREAK


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_full_head_rotation_is_a_symmetry_without_rope(fp64_models, name):
    s = fp64_models(name)[1].sym
    R = random_orthogonal(s.d_head, gen(5))
    assert rel_change(fp64_models, name, lambda L: gauge.not_a_symmetry_qk_rotation(L, 0, R)) < SYM_TOL


@pytest.mark.parametrize("name", ARCHS)
def test_mlp_rotation_breaks(fp64_models, name):
    """O(d_ff) on the MLP units (the reference's MLP alignment) is never a symmetry."""
    s = fp64_models(name)[1].sym
    S = random_orthogonal(s.d_ff, gen(6))
    assert rel_change(fp64_models, name, lambda L: gauge.not_a_symmetry_mlp_rotation(L, S)) > BREAK


GQA = [n for n in ARCHS if toy.TOY_CONFIGS[n][2].get("num_key_value_heads", 4) < 4]


@pytest.mark.parametrize("name", GQA)
def test_gauge_on_one_query_head_of_a_group_breaks(fp64_models, name):
    """A valid QK element applied to one query head only (the reference's per-query-head fit)."""
    reader = fp64_models(name)[1]
    M = gauge.random_qk_element(reader.read(1), gen(7))
    assert rel_change(fp64_models, name, lambda L: gauge.not_a_symmetry_one_head(L, 0, M)) > BREAK


@pytest.mark.parametrize("name", ["qwen3"])
def test_qwen3_rejects_continuous_pair_rotations(fp64_models, name):
    """Under q/k-norm the RoPE-compatible per-pair rotation is no longer a symmetry."""
    reader = fp64_models(name)[1]
    s = reader.sym
    i = torch.arange(s.rope_pairs)
    M = torch.eye(s.d_head, dtype=torch.float64)
    c, sn = np.cos(0.7), np.sin(0.7)
    M[i, i], M[i, i + s.rope_pairs], M[i + s.rope_pairs, i], M[i + s.rope_pairs, i + s.rope_pairs] = c, -sn, sn, c
    assert rel_change(fp64_models, name, lambda L: gauge.qk_gauge(L, 0, M)) > BREAK


def test_head_permutation_across_groups_is_refused(fp64_models):
    layer = fp64_models("llama")[1].read(1)
    with pytest.raises(ValueError, match="mixes KV groups"):
        gauge.permute_heads(layer, np.array([0, 2, 1, 3]))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_glu_scale_of_gate_or_plain_unit_breaks(fp64_models, name):
    """A GLU gate (or a plain GELU unit) cannot be rescaled."""
    s = fp64_models(name)[1].sym
    c = torch.exp(torch.randn(s.d_ff, generator=gen(8), dtype=torch.float64))

    def scale_first_matrix(L):
        out = L.clone()
        if L.W_gate is not None:
            out.W_gate = L.W_gate * c[:, None]
        else:
            out.W_up, out.b_up = L.W_up * c[:, None], L.b_up * c
        out.W_down = L.W_down / c[None, :]
        return out

    assert rel_change(fp64_models, name, scale_first_matrix) > BREAK
