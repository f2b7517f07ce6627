"""Architectures as data.

Each supported architecture is one :class:`ArchSpec`: where its tensors live, how fused
projections split, whether weights are ``nn.Linear`` (out, in) or GPT-2 ``Conv1D`` (in, out),
which norms feed which readers, and the facts that decide its symmetry group (RoPE and its
rotary fraction, q/k-norm, GLU or plain MLP). The symmetry description of a layer
(:class:`drift.canonical.LayerSymmetry`) is *derived* from this entry and the config; it is
never written a second time.

Adding an architecture = one entry here + one entry in ``drift.toy.TOY_CONFIGS``.

Tensor names are templates relative to the layer prefix, e.g. ``self_attn.q_proj``; the
loader appends ``.weight`` / ``.bias``. The layer prefix is ``root + layers.format(i=i)``,
with ``root`` the first of ``roots`` that the checkpoint actually contains (``BertModel`` saves
``encoder.layer.0``, ``BertForMaskedLM`` saves ``bert.encoder.layer.0``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import ConfigError, UnsupportedArchitectureError


@dataclass(frozen=True)
class NormSpec:
    """One norm that feeds (or, for sandwich norms, follows) a sub-block.

    ``module`` is relative to the layer prefix. With ``from_previous`` it is relative to the
    *previous* layer's prefix, and layer 0 uses ``first`` (relative to the root) instead:
    this is how BERT's post-LNs are relocated to the layer whose readers they feed.
    """

    module: str
    kind: str  # "rms" | "layer"
    offset: float = 0.0  # Gemma stores w and applies (1 + w)
    from_previous: bool = False
    first: str | None = None


@dataclass(frozen=True)
class Refusal:
    """A config field that changes the math in a way drift does not model."""

    key: str
    ok: Callable[[Any], bool]
    why: str


@dataclass(frozen=True)
class ArchSpec:
    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    roots: tuple[str, ...]
    layers: str
    # attention: "separate" (q, k, v modules), "concat" (one module, rows [q | k | v]),
    # "neox" (one module, rows interleaved per head: [q_h | k_h | v_h] for each head h)
    qkv_layout: str
    attn: dict[str, str]
    mlp: dict[str, str]  # keys: gate/up/down, or gate_up/down (rows [gate | up]), or up/down
    norms: dict[str, NormSpec]
    linear: str = "linear"  # "linear" (out, in) | "conv1d" (in, out)
    attn_bias: str = "none"  # "none" | "qkv" | "all"
    mlp_bias: bool = False
    rope: bool = True
    qk_norm: bool = False
    mlp_kind: str = "glu"  # "glu" | "plain"
    refuse: tuple[Refusal, ...] = field(default_factory=tuple)

    @property
    def norm_kind(self) -> str:
        return self.norms["attn_in"].kind


# --------------------------------------------------------------------------- helpers

def _false(v: Any) -> bool:
    return not v


def _absolute(v: Any) -> bool:
    return v in (None, "absolute")


_NO_CROSS = (
    Refusal("add_cross_attention", _false, "cross-attention layers are not modelled"),
    Refusal("is_encoder_decoder", _false, "encoder-decoder models are not modelled"),
)

_LLAMA_NORMS = {
    "attn_in": NormSpec("input_layernorm", "rms"),
    "mlp_in": NormSpec("post_attention_layernorm", "rms"),
}

_LLAMA_ATTN = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
               "o": "self_attn.o_proj"}
_LLAMA_MLP = {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}

_NO_BIAS = (
    Refusal("attention_bias", _false, "attention biases are not modelled for this architecture"),
    Refusal("mlp_bias", _false, "MLP biases are not modelled for this architecture"),
)


def _llama_like(name: str, arch: str, model_type: str, **kw: Any) -> ArchSpec:
    base: dict[str, Any] = dict(
        name=name, architectures=(arch, arch.replace("ForCausalLM", "Model")),
        model_types=(model_type,), roots=("model.", ""), layers="layers.{i}",
        qkv_layout="separate", attn=dict(_LLAMA_ATTN), mlp=dict(_LLAMA_MLP),
        norms=dict(_LLAMA_NORMS), refuse=_NO_CROSS + _NO_BIAS,
    )
    base.update(kw)
    return ArchSpec(**base)


REGISTRY: tuple[ArchSpec, ...] = (
    _llama_like("llama", "LlamaForCausalLM", "llama"),
    _llama_like("mistral", "MistralForCausalLM", "mistral"),
    _llama_like("qwen2", "Qwen2ForCausalLM", "qwen2", attn_bias="qkv",
                refuse=_NO_CROSS),
    _llama_like("qwen3", "Qwen3ForCausalLM", "qwen3", qk_norm=True,
                norms={**_LLAMA_NORMS,
                       "q_norm": NormSpec("self_attn.q_norm", "rms"),
                       "k_norm": NormSpec("self_attn.k_norm", "rms")}),
    _llama_like("gemma", "GemmaForCausalLM", "gemma",
                norms={"attn_in": NormSpec("input_layernorm", "rms", offset=1.0),
                       "mlp_in": NormSpec("post_attention_layernorm", "rms", offset=1.0)}),
    _llama_like("gemma2", "Gemma2ForCausalLM", "gemma2",
                norms={"attn_in": NormSpec("input_layernorm", "rms", offset=1.0),
                       "attn_out": NormSpec("post_attention_layernorm", "rms", offset=1.0),
                       "mlp_in": NormSpec("pre_feedforward_layernorm", "rms", offset=1.0),
                       "mlp_out": NormSpec("post_feedforward_layernorm", "rms", offset=1.0)}),
    _llama_like("phi3", "Phi3ForCausalLM", "phi3", qkv_layout="concat",
                attn={"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj"},
                mlp={"gate_up": "mlp.gate_up_proj", "down": "mlp.down_proj"},
                refuse=_NO_CROSS),
    ArchSpec(
        name="gpt2", architectures=("GPT2LMHeadModel", "GPT2Model"), model_types=("gpt2",),
        roots=("transformer.", ""), layers="h.{i}", qkv_layout="concat",
        attn={"qkv": "attn.c_attn", "o": "attn.c_proj"},
        mlp={"up": "mlp.c_fc", "down": "mlp.c_proj"},
        norms={"attn_in": NormSpec("ln_1", "layer"), "mlp_in": NormSpec("ln_2", "layer")},
        linear="conv1d", attn_bias="all", mlp_bias=True, rope=False, mlp_kind="plain",
        refuse=_NO_CROSS,
    ),
    ArchSpec(
        name="gpt_neox", architectures=("GPTNeoXForCausalLM", "GPTNeoXModel"),
        model_types=("gpt_neox",), roots=("gpt_neox.", ""), layers="layers.{i}",
        qkv_layout="neox",
        attn={"qkv": "attention.query_key_value", "o": "attention.dense"},
        mlp={"up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h"},
        norms={"attn_in": NormSpec("input_layernorm", "layer"),
               "mlp_in": NormSpec("post_attention_layernorm", "layer")},
        attn_bias="all", mlp_bias=True, mlp_kind="plain",
        refuse=_NO_CROSS + (Refusal("attention_bias", lambda v: v in (None, True),
                                    "GPT-NeoX without attention biases is not modelled"),),
    ),
    ArchSpec(
        name="bert", architectures=("BertModel", "BertForMaskedLM", "BertForPreTraining"),
        model_types=("bert",), roots=("", "bert."), layers="encoder.layer.{i}",
        qkv_layout="separate",
        attn={"q": "attention.self.query", "k": "attention.self.key",
              "v": "attention.self.value", "o": "attention.output.dense"},
        mlp={"up": "intermediate.dense", "down": "output.dense"},
        # Post-LN: the LN that feeds layer i's attention is layer i-1's output LN (the
        # embedding LN for layer 0); the LN that feeds the MLP is the attention output LN.
        norms={"attn_in": NormSpec("output.LayerNorm", "layer", from_previous=True,
                                   first="embeddings.LayerNorm"),
               "mlp_in": NormSpec("attention.output.LayerNorm", "layer")},
        attn_bias="all", mlp_bias=True, rope=False, mlp_kind="plain",
        refuse=_NO_CROSS + (
            Refusal("position_embedding_type", _absolute,
                    "relative position embeddings add query-position terms that break the QK gauge"),
            Refusal("is_decoder", _false, "BERT used as a decoder is not modelled"),
        ),
    ),
)

SUPPORTED = tuple(spec.name for spec in REGISTRY)


def find_arch(config: dict[str, Any]) -> ArchSpec:
    """The registry entry for a ``config.json`` dict.

    Looks up ``architectures[0]`` first, then ``model_type``.

    Raises:
        UnsupportedArchitectureError: neither key matches an entry, or the config sets a
            field (see ``ArchSpec.refuse``) that changes the math in a way drift does not model.
    """
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"config.json: architectures must be a list of class names, not {archs!r}")
    if model_type is not None and not isinstance(model_type, str):
        raise ConfigError(f"config.json: model_type must be a string, not {model_type!r}")
    spec = None
    for a in archs:
        spec = next((s for s in REGISTRY if a in s.architectures), None)
        if spec is not None:
            break
    if spec is None:
        spec = next((s for s in REGISTRY if model_type in s.model_types), None)
    if spec is None:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {archs[0] if archs else None!r} "
            f"(model_type {model_type!r}); supported: {', '.join(SUPPORTED)}")
    for r in spec.refuse:
        if r.key in config and not r.ok(config[r.key]):
            raise UnsupportedArchitectureError(
                f"{spec.name}: config field {r.key}={config[r.key]!r} is not supported: {r.why}")
    return spec
