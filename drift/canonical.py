"""One canonical layer for every architecture.

Every checkpoint is translated here, at the boundary, into :class:`CanonicalLayer` with a
fixed axis order (math layout, ``y = W x + b``)::

    W_Q   (n_heads,    d_head, d_model)     b_Q (n_heads, d_head)
    W_K   (n_kv_heads, d_head, d_model)     b_K (n_kv_heads, d_head)
    W_V   (n_kv_heads, d_head, d_model)     b_V (n_kv_heads, d_head)
    W_O   (n_heads,    d_model, d_head)     b_O (d_model,)
    W_gate(d_ff, d_model)  [GLU only]       b_gate
    W_up  (d_ff, d_model)                   b_up (d_ff,)
    W_down(d_model, d_ff)                   b_down (d_model,)
    norms: role -> (weight (n,), bias (n,) or None); roles ``attn_in`` (read by attention),
           ``mlp_in`` (read by the MLP), ``q_norm``/``k_norm`` (over d_head, Qwen3),
           ``attn_out``/``mlp_out`` (Gemma2 sandwich norms)

Norm weights are stored as the *effective gain* (Gemma's ``1 + w`` already added).
Query head h reads KV head ``h // (n_heads // n_kv_heads)`` (HF ``repeat_kv``).

The inverse, :func:`layer_state_dict`, writes a canonical layer back into the checkpoint's
own names and layouts, so that a transformed layer can be loaded into the HF model (tests)
or saved as a planted checkpoint.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import torch

from .archs import ArchSpec, find_arch
from .checkpoint import Checkpoint
from .config import _cfg, _int, _num
from .errors import (CheckpointError, ConfigError, LayerIndexError, MissingTensorError,
                     UnsupportedArchitectureError)

Tensor = torch.Tensor


@dataclass(frozen=True)
class LayerSymmetry:
    """What decides a layer's exact gauge group (gauge-spec §2.7), derived from ArchSpec + config."""

    arch: str
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    d_ff: int
    rope: bool
    rotary_dims: int  # 0 without RoPE; d_head for full RoPE; fewer for partial rotary (NeoX)
    rope_theta: float
    qk_norm: bool
    norm_kind: str  # "rms" | "layer"
    mlp_kind: str  # "glu" | "plain"
    activation: str
    post_norms: bool  # Gemma2 sandwich norms after attention and MLP
    post_ln: bool  # BERT: norms follow the residual add (readers read the previous LN)

    @property
    def group_size(self) -> int:
        """r = n_heads / n_kv_heads: query heads per KV group."""
        return self.n_heads // self.n_kv_heads

    def kv_of(self, h: int) -> int:
        return h // self.group_size

    @property
    def rope_pairs(self) -> int:
        """Number of RoPE frequency pairs (i, i + rotary_dims/2) per head (``rotate_half``)."""
        return self.rotary_dims // 2

    @property
    def is_glu(self) -> bool:
        return self.mlp_kind == "glu"


@dataclass
class CanonicalLayer:
    """One transformer layer in the canonical vocabulary (see the module docstring)."""

    index: int
    sym: LayerSymmetry
    W_Q: Tensor
    W_K: Tensor
    W_V: Tensor
    W_O: Tensor
    W_up: Tensor
    W_down: Tensor
    W_gate: Tensor | None = None
    b_Q: Tensor | None = None
    b_K: Tensor | None = None
    b_V: Tensor | None = None
    b_O: Tensor | None = None
    b_gate: Tensor | None = None
    b_up: Tensor | None = None
    b_down: Tensor | None = None
    norms: dict[str, tuple[Tensor, Tensor | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Assert every shape against the symmetry description."""
        s = self.sym
        nh, nkv, dh, H, F = s.n_heads, s.n_kv_heads, s.d_head, s.d_model, s.d_ff
        expect = {
            "W_Q": (nh, dh, H), "W_K": (nkv, dh, H), "W_V": (nkv, dh, H), "W_O": (nh, H, dh),
            "W_up": (F, H), "W_down": (H, F), "W_gate": (F, H) if s.is_glu else None,
            "b_Q": (nh, dh), "b_K": (nkv, dh), "b_V": (nkv, dh), "b_O": (H,),
            "b_gate": (F,), "b_up": (F,), "b_down": (H,),
        }
        for name, shape in expect.items():
            t = getattr(self, name)
            if t is None:
                if name == "W_gate" and s.is_glu:
                    raise CheckpointError(f"layer {self.index}: GLU MLP without a gate matrix")
                continue
            if shape is None or tuple(t.shape) != shape:
                raise CheckpointError(f"layer {self.index}: {name} has shape {tuple(t.shape)}, "
                                      f"expected {shape} for {s.arch}")
        for role, (w, b) in self.norms.items():
            n = dh if role in ("q_norm", "k_norm") else H
            if tuple(w.shape) != (n,) or (b is not None and tuple(b.shape) != (n,)):
                raise CheckpointError(f"layer {self.index}: norm {role} has shape {tuple(w.shape)}, "
                                      f"expected ({n},)")

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        """(name, tensor) for every tensor present, norms as ``norm.<role>.weight|bias``."""
        for name in ("W_Q", "W_K", "W_V", "W_O", "W_gate", "W_up", "W_down",
                     "b_Q", "b_K", "b_V", "b_O", "b_gate", "b_up", "b_down"):
            t = getattr(self, name)
            if t is not None:
                yield name, t
        for role, (w, b) in self.norms.items():
            yield f"norm.{role}.weight", w
            if b is not None:
                yield f"norm.{role}.bias", b

    def map(self, fn) -> "CanonicalLayer":
        """A copy with ``fn`` applied to every tensor (e.g. ``.to(device)``)."""
        kw = {name: (fn(getattr(self, name)) if getattr(self, name) is not None else None)
              for name in ("W_Q", "W_K", "W_V", "W_O", "W_gate", "W_up", "W_down",
                           "b_Q", "b_K", "b_V", "b_O", "b_gate", "b_up", "b_down")}
        kw["norms"] = {r: (fn(w), fn(b) if b is not None else None) for r, (w, b) in self.norms.items()}
        return replace(self, **kw)

    def clone(self) -> "CanonicalLayer":
        return self.map(lambda t: t.clone())


# --------------------------------------------------------------------------- config -> symmetry

def symmetry_of(spec: ArchSpec, config: dict[str, Any]) -> LayerSymmetry:
    """Derive the layer symmetry description from an architecture entry and its config."""
    H = _int(config, "hidden_size", "n_embd")
    nh = _int(config, "num_attention_heads", "n_head")
    nkv = _int(config, "num_key_value_heads", default=nh)
    if config.get("head_dim") is None and H % nh:
        raise ConfigError(f"config.json: hidden_size={H} is not a multiple of num_attention_heads={nh} "
                          "(and no head_dim is given)")
    dh = _int(config, "head_dim", default=H // nh)
    F = _int(config, "intermediate_size", "n_inner", default=4 * H)
    if nkv > nh or nh % nkv:
        raise UnsupportedArchitectureError(
            f"{spec.name}: num_attention_heads={nh} is not a multiple of num_key_value_heads={nkv}")
    rope_params = config.get("rope_parameters") or {}
    if not isinstance(rope_params, dict):
        raise ConfigError(f"config.json: rope_parameters must be an object, not {rope_params!r}")
    if spec.rope:
        where = rope_params if _cfg(rope_params, "partial_rotary_factor") is not None else config
        frac = _num(where, "partial_rotary_factor", "rotary_pct", default=1.0, high=1.0)
        rotary_dims = int(dh * frac)
        rotary_dims -= rotary_dims % 2
        where = rope_params if _cfg(rope_params, "rope_theta") is not None else config
        theta = _num(where, "rope_theta", "rotary_emb_base", default=10000.0)
    else:
        rotary_dims, theta = 0, 0.0
    act = _cfg(config, "hidden_activation", "hidden_act", "activation_function", default=None)
    act = "?" if act is None else act if isinstance(act, str) else repr(act)  # "?": the class's default
    return LayerSymmetry(
        arch=spec.name, n_heads=nh, n_kv_heads=nkv, d_head=dh, d_model=H, d_ff=F,
        rope=spec.rope, rotary_dims=rotary_dims, rope_theta=theta, qk_norm=spec.qk_norm,
        norm_kind=spec.norm_kind, mlp_kind=spec.mlp_kind, activation=act,
        post_norms="attn_out" in spec.norms,
        post_ln=any(n.from_previous for n in spec.norms.values()),
    )


ACTIVATIONS = frozenset({"silu", "swish", "quick_gelu"})
"""MLP activations (``transformers``' names; and every ``gelu*`` variant) whose symmetries
gauge-spec §2.4 derives: neither homogeneous nor odd, so a unit's gate can be neither scaled
nor sign-flipped, and a non-gated unit only permuted. ``?``: none given, the config class's
default (one of these for every supported architecture)."""


def activation_group_known(act: str) -> bool:
    """Is ``act`` (a :class:`LayerSymmetry`'s) one whose symmetry group :mod:`drift.methods.exact` removes?"""
    return act == "?" or act in ACTIVATIONS or act.startswith("gelu")


MAX_LAYERS = 100_000
"""More layers than this in config.json is a damaged config, not a model (the deepest are hundreds)."""


def n_layers_of(config: dict[str, Any]) -> int:
    return _int(config, "num_hidden_layers", "n_layer", maximum=MAX_LAYERS)


# --------------------------------------------------------------------------- reading

class LayerReader:
    """Reads canonical layers from a :class:`Checkpoint`, one layer's tensors at a time."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype = torch.float32):
        self.ckpt = ckpt
        self.dtype = dtype
        quant = ckpt.config.get("quantization_config")
        if quant:
            how = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
            raise CheckpointError(f"{ckpt.folder}: a quantised checkpoint (quantization_config, quant_method "
                                  f"{how!r}); drift reads unquantised weights: dequantise it first")
        self.spec = find_arch(ckpt.config)
        self.sym = symmetry_of(self.spec, ckpt.config)
        self.n_layers = n_layers_of(ckpt.config)
        self.root = self._find_root()

    def _find_root(self) -> str:
        first = self.spec.layers.format(i=0)
        for root in self.spec.roots:
            if any(n.startswith(root + first + ".") for n in self.ckpt.index.weight_map):
                return root
        raise MissingTensorError(
            f"{self.ckpt.folder}: no tensors under any of "
            f"{', '.join(repr(r + first) for r in self.spec.roots)} for a {self.spec.name} checkpoint")

    def prefix(self, i: int) -> str:
        return f"{self.root}{self.spec.layers.format(i=i)}."

    def _t(self, name: str) -> Tensor:
        return self._checked(name)[0]

    def _checked(self, name: str) -> tuple[Tensor, float]:
        """Tensor ``name``, refused if it holds NaN or Inf, and its Σ|t|."""
        t = self.ckpt.get(name, self.dtype)
        # One fused pass: Σ|t| is NaN or Inf iff an entry is (or, harmlessly, if the sum overflows)
        l1 = float(torch.linalg.vector_norm(t, 1)) if t.numel() else 0.0
        if not math.isfinite(l1):
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise CheckpointError(f"{self.ckpt.folder}: tensor {name!r} has {bad} NaN or Inf "
                                      f"value{'s' if bad > 1 else ''} (of {t.numel()})")
        if t.numel() >= 1 << 22:
            # Let the shard's mapped pages of a large tensor go at once: they count in the
            # process's RSS while mapped, and would add to the peak of a read.
            self.ckpt.close()
        return t, l1

    def _linear(self, module: str, bias: bool,
                shape: tuple[int, int] | None = None) -> tuple[Tensor, Tensor | None]:
        """(W (out, in), b (out,) or None) for one module of the current layer.

        With ``shape``, the math-layout ``W`` must have that shape (checked here, before any
        reshape, so that a config that disagrees with the weights is named, not a torch error).
        """
        w, l1 = self._checked(module + ".weight")
        if l1 == 0.0:  # every entry is 0
            raise CheckpointError(f"{self.ckpt.folder}: tensor {module + '.weight'!r} is all zeros (a pruned or "
                                  "uninitialised layer?): its distance to anything is undefined")
        if self.spec.linear == "conv1d":
            w = w.T.contiguous()
        b = self._t(module + ".bias") if bias else None
        if shape is not None and (tuple(w.shape) != shape or (b is not None and tuple(b.shape) != shape[:1])):
            got = f"{tuple(w.shape)}" + (f" (bias {tuple(b.shape)})" if b is not None else "")
            raise CheckpointError(
                f"{module}: weight has shape {got} in (out, in) layout, expected {shape} from "
                f"config.json ({self.spec.name}: n_heads={self.sym.n_heads}, "
                f"n_kv_heads={self.sym.n_kv_heads}, d_head={self.sym.d_head}, d_model={self.sym.d_model})")
        return w, b

    def norm_names(self, i: int, role: str) -> str:
        n = self.spec.norms[role]
        if n.from_previous:
            return self.root + n.first if i == 0 else self.prefix(i - 1) + n.module
        return self.prefix(i) + n.module

    def read(self, i: int) -> CanonicalLayer:
        """Canonical layer ``i``.

        Raises:
            LayerIndexError: ``i`` outside ``[0, n_layers)``.
            MissingTensorError: a tensor the architecture requires is absent.
        """
        if not 0 <= i < self.n_layers:
            raise LayerIndexError(f"layer {i} is out of range: the model has {self.n_layers} "
                                  f"layers (0..{self.n_layers - 1})")
        spec, s, p = self.spec, self.sym, self.prefix(i)
        nh, nkv, dh, H = s.n_heads, s.n_kv_heads, s.d_head, s.d_model
        qkv_bias = spec.attn_bias in ("qkv", "all")
        kw: dict[str, Any] = {}

        if spec.qkv_layout == "separate":
            wq, bq = self._linear(p + spec.attn["q"], qkv_bias, (nh * dh, H))
            wk, bk = self._linear(p + spec.attn["k"], qkv_bias, (nkv * dh, H))
            wv, bv = self._linear(p + spec.attn["v"], qkv_bias, (nkv * dh, H))
        else:
            w, b = self._linear(p + spec.attn["qkv"], qkv_bias, ((nh + 2 * nkv) * dh, H))  # (n_out, H)
            if spec.qkv_layout == "concat":  # rows [q | k | v]
                sizes = [nh * dh, nkv * dh, nkv * dh]
                wq, wk, wv = torch.split(w, sizes, dim=0)
                bq, bk, bv = torch.split(b, sizes) if b is not None else (None, None, None)
            elif spec.qkv_layout == "neox":  # rows per head [q_h | k_h | v_h]
                w4 = w.reshape(nh, 3, dh, H)  # (head, qkv, d_head, H)
                wq, wk, wv = (w4[:, j].reshape(nh * dh, H) for j in range(3))
                if b is not None:
                    b3 = b.reshape(nh, 3, dh)
                    bq, bk, bv = (b3[:, j].reshape(nh * dh) for j in range(3))
                else:
                    bq = bk = bv = None
            else:  # pragma: no cover - registry is static
                raise AssertionError(spec.qkv_layout)
        kw["W_Q"] = wq.reshape(nh, dh, H)
        kw["W_K"] = wk.reshape(nkv, dh, H)
        kw["W_V"] = wv.reshape(nkv, dh, H)
        if bq is not None:
            kw["b_Q"], kw["b_K"], kw["b_V"] = bq.reshape(nh, dh), bk.reshape(nkv, dh), bv.reshape(nkv, dh)
        wo, bo = self._linear(p + spec.attn["o"], spec.attn_bias == "all", (H, nh * dh))
        kw["W_O"] = wo.reshape(H, nh, dh).permute(1, 0, 2).contiguous()  # (nh, H, dh)
        kw["b_O"] = bo

        m = spec.mlp
        if "gate_up" in m:
            w, _ = self._linear(p + m["gate_up"], False, (2 * s.d_ff, H))
            kw["W_gate"], kw["W_up"] = (t.contiguous() for t in torch.chunk(w, 2, dim=0))
        else:
            if "gate" in m:
                kw["W_gate"], kw["b_gate"] = self._linear(p + m["gate"], spec.mlp_bias)
            kw["W_up"], kw["b_up"] = self._linear(p + m["up"], spec.mlp_bias)
        kw["W_down"], kw["b_down"] = self._linear(p + m["down"], spec.mlp_bias)

        norms = {}
        for role, n in spec.norms.items():
            name = self.norm_names(i, role)
            w = self._t(name + ".weight") + n.offset
            if w.numel() and not bool(w.any()):  # its readers would see nothing: every distance 0/0
                raise CheckpointError(f"{self.ckpt.folder}: norm gain {name + '.weight'!r} is all zeros"
                                      f"{' (after its +' + str(n.offset) + ')' if n.offset else ''}: the layer reads nothing")
            b = self._t(name + ".bias") if n.kind == "layer" else None
            norms[role] = (w, b)
        # Let the shard's mapped pages go: the next layer may live in another file, and a
        # reader that walks a large checkpoint should hold one layer, not a shard.
        self.ckpt.close()
        return CanonicalLayer(index=i, sym=s, norms=norms, **kw)

    def __iter__(self) -> Iterator[CanonicalLayer]:
        for i in range(self.n_layers):
            yield self.read(i)


def open_layers(model: str, dtype: torch.dtype = torch.float32) -> LayerReader:
    """Resolve ``model`` and return a reader of its canonical layers.

    The architecture is checked before any weight file is touched, so an unsupported model
    is named as such even when its weights are also unreadable."""
    from .checkpoint import read_config, resolve_model

    find_arch(read_config(resolve_model(model)))
    return LayerReader(Checkpoint.open(model), dtype)


# --------------------------------------------------------------------------- writing back

def layer_state_dict(layer: CanonicalLayer, reader: LayerReader) -> dict[str, Tensor]:
    """The checkpoint tensors (names and layouts of ``reader``'s architecture) of ``layer``.

    The inverse of :meth:`LayerReader.read`. Norm gains are written back without Gemma's
    offset. For BERT the relocated ``attn_in`` norm is written under the previous layer's
    (or the embeddings') name.
    """
    spec, s, p = reader.spec, layer.sym, reader.prefix(layer.index)
    nh, nkv, dh, H = s.n_heads, s.n_kv_heads, s.d_head, s.d_model
    out: dict[str, Tensor] = {}

    def put(module: str, w: Tensor, b: Tensor | None) -> None:
        out[module + ".weight"] = (w.T if spec.linear == "conv1d" else w).contiguous()
        if b is not None:
            out[module + ".bias"] = b.contiguous()

    wq, wk, wv = layer.W_Q.reshape(nh * dh, H), layer.W_K.reshape(nkv * dh, H), layer.W_V.reshape(nkv * dh, H)
    has_b = layer.b_Q is not None
    bq, bk, bv = ((layer.b_Q.reshape(-1), layer.b_K.reshape(-1), layer.b_V.reshape(-1))
                  if has_b else (None, None, None))
    if spec.qkv_layout == "separate":
        put(p + spec.attn["q"], wq, bq)
        put(p + spec.attn["k"], wk, bk)
        put(p + spec.attn["v"], wv, bv)
    elif spec.qkv_layout == "concat":
        put(p + spec.attn["qkv"], torch.cat([wq, wk, wv]), torch.cat([bq, bk, bv]) if has_b else None)
    else:  # neox: per head [q_h | k_h | v_h]
        w = torch.stack([layer.W_Q, layer.W_K, layer.W_V], dim=1).reshape(3 * nh * dh, H)
        b = torch.stack([layer.b_Q, layer.b_K, layer.b_V], dim=1).reshape(-1) if has_b else None
        put(p + spec.attn["qkv"], w, b)
    put(p + spec.attn["o"], layer.W_O.permute(1, 0, 2).reshape(H, nh * dh), layer.b_O)
    m = spec.mlp
    if "gate_up" in m:
        put(p + m["gate_up"], torch.cat([layer.W_gate, layer.W_up]), None)
    else:
        if "gate" in m:
            put(p + m["gate"], layer.W_gate, layer.b_gate)
        put(p + m["up"], layer.W_up, layer.b_up)
    put(p + m["down"], layer.W_down, layer.b_down)
    for role, (w, b) in layer.norms.items():
        name = reader.norm_names(layer.index, role)
        out[name + ".weight"] = (w - spec.norms[role].offset).contiguous()
        if b is not None:
            out[name + ".bias"] = b.contiguous()
    return out


def rope_pair_index(sym: LayerSymmetry) -> tuple[Tensor, Tensor]:
    """Row indices (i, i + rotary_dims/2) of the RoPE pairs in a head (HF ``rotate_half``)."""
    m = sym.rope_pairs
    i = torch.arange(m)
    return i, i + m


def rope_freqs(sym: LayerSymmetry) -> Tensor:
    """theta_i = base^(-2i / rotary_dims) for each pair (default RoPE; scaling rescales these)."""
    i = torch.arange(sym.rope_pairs, dtype=torch.float64)
    return sym.rope_theta ** (-2.0 * i / max(sym.rotary_dims, 1))


__all__ = ["CanonicalLayer", "LayerSymmetry", "LayerReader", "open_layers", "layer_state_dict",
           "symmetry_of", "n_layers_of", "rope_pair_index", "rope_freqs"]
