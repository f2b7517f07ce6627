"""Tiny random models of every supported architecture, for tests, teaching and benchmarks.

Weights are redrawn *generically* (W ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2), norm gains
1 + 0.3 N(0, 1)), because Hugging Face's init (zero biases, unit gains) has extra, accidental
symmetries that would make the gauge tests pass for the wrong reason (gauge-spec §3.1).

Imports transformers' model classes on call, never at ``import drift``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

# name -> (config class, model class, config kwargs). Hidden 64, 3 layers, d_head 16.
_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             vocab_size=97, max_position_embeddings=64)
TOY_CONFIGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_BASE, num_key_value_heads=2, head_dim=16)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_BASE, num_key_value_heads=2, head_dim=16)),
    "llama_mqa": ("LlamaConfig", "LlamaForCausalLM", dict(_BASE, num_key_value_heads=1, head_dim=16)),
    "llama_mha": ("LlamaConfig", "LlamaForCausalLM", dict(_BASE, num_key_value_heads=4, head_dim=16)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_BASE, num_key_value_heads=2, head_dim=16)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_BASE, num_key_value_heads=2)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_BASE, num_key_value_heads=2, head_dim=16)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_BASE, num_key_value_heads=2, head_dim=16,
                                                        query_pre_attn_scalar=16)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_BASE, num_key_value_heads=2,
                                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=3, n_head=4, n_inner=128, bos_token_id=1, eos_token_id=2,
                                                   vocab_size=97, n_positions=64)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(_BASE, rotary_pct=0.25, partial_rotary_factor=0.25)),
    "bert": ("BertConfig", "BertModel", dict(_BASE, max_position_embeddings=64)),
}


def tiny_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float64, **overrides: Any):
    """A tiny ``transformers`` model of architecture ``name`` (a key of TOY_CONFIGS), eval mode,
    eager attention, with generic random weights."""
    import transformers

    cfg_cls, model_cls, kw = TOY_CONFIGS[name]
    cfg = getattr(transformers, cfg_cls)(**{**kw, **overrides})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).to(dtype).eval()
    randomize_(model, seed)
    return model


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Redraw every parameter generically, in place (see module docstring)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim == 1 and ("norm" in name.lower() or "ln" in name.split(".")[-2].lower()):
            base = 0.0 if "gemma" in type(model).__name__.lower() else 1.0
            vals = base + 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64)
            if leaf == "bias":
                vals = 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64)
        elif leaf == "bias":
            vals = 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64)
        elif p.ndim == 2:
            fan_in = p.shape[0] if "Conv1D" in _owner_type(model, name) else p.shape[1]
            vals = torch.randn(p.shape, generator=g, dtype=torch.float64) / fan_in ** 0.5
        else:
            vals = torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1
        p.copy_(vals.to(p.dtype))
    return model


def _owner_type(model: torch.nn.Module, pname: str) -> str:
    mod = model.get_submodule(pname.rsplit(".", 1)[0]) if "." in pname else model
    return type(mod).__name__


def save(model, folder: str | Path, shard_size: str | None = None, dtype: torch.dtype | None = None) -> Path:
    """``save_pretrained`` to ``folder`` (safetensors; sharded when ``shard_size`` is given),
    cast to ``dtype`` if given (``model`` itself is left unchanged)."""
    folder = Path(folder)
    # nn.Module.to() converts in place: cast a copy, never the caller's model.
    m = model if dtype is None else copy.deepcopy(model).to(dtype)
    kw = {"max_shard_size": shard_size} if shard_size else {}
    m.save_pretrained(folder, safe_serialization=True, **kw)
    return folder


@torch.no_grad()
def outputs(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The model's final output: logits for a causal LM, last hidden state for an encoder."""
    out = model(input_ids=input_ids)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def probe_ids(vocab: int = 97, batch: int = 3, length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


@torch.no_grad()
def planted_checkpoint(name: str, folder: str | Path, seed: int = 0, noise: float = 0.0,
                       dtype: torch.dtype = torch.float64, **overrides: Any):
    """Save a tiny model whose layer k+1 is a random *exact* gauge transform of layer k
    (plus optional relative Gaussian ``noise``), so that every consecutive pair is identical
    up to gauge. Returns (folder, model, records): records[k] is the GaugeRecord that maps
    layer k to layer k+1."""
    from .canonical import LayerReader, layer_state_dict
    from .checkpoint import Checkpoint
    from .gauge import random_gauge

    model = tiny_model(name, seed=seed, dtype=dtype, **overrides)
    folder = save(model, folder)
    reader = LayerReader(Checkpoint.open(folder), dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    layer = reader.read(0)
    records = []
    for k in range(1, reader.n_layers):
        layer, rec = random_gauge(layer, gen)
        layer.index = k
        if noise:
            layer = layer.map(lambda t: t + noise * t.std() * torch.randn(t.shape, generator=gen, dtype=t.dtype))
        records.append(rec)
        sd = layer_state_dict(layer, reader)
        model.load_state_dict(sd, strict=False)
    reader.ckpt.close()
    save(model, folder)
    return folder, model, records
