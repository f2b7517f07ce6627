"""Synthetic Qwen3 checkpoints with real layer shapes and random weights.

Benchmarks need checkpoints of real size, but this machine has no network and no model
weights. What decides speed and memory is the *shapes* (hidden size, d_ff, heads, number of
layers) and the on-disk format (bf16, sharded safetensors, an index JSON), not the values, so
this module writes exactly that: a folder that looks like a Hugging Face Qwen3 snapshot and
that ``transformers.Qwen3ForCausalLM.from_pretrained`` loads.

Tensors are written shard by shard with ``safetensors.torch.save_file``; no model is ever
instantiated, so building the 4B-shaped checkpoint (about 7 GB of bf16) holds at most one
shard (``--shard-size``, default 512 MiB) in memory.

What is *not* real:

* the vocabulary is tiny (``--vocab``, default 1024) so the embedding does not dominate;
  the tokenizer is absent (nothing here runs text through the model);
* the weights are i.i.d. normal (std 0.02; norm gains 1 + 0.05·N(0, 1)); anything whose
  cost depends on the *values* (an iterative solver's iteration count) may behave
  differently on trained weights;
* ``--layers N`` writes only layers ``0..N-1`` and sets ``num_hidden_layers = N`` so that the
  folder stays self-consistent (transformers would otherwise initialise the missing layers).

Checkpoints are cached under ``$DRIFT_BENCH_DIR`` (default ``/tmp/drift-bench``), one folder
per (shape, layers, vocab, seed); a folder is renamed into place only once complete, so an
interrupted build is never mistaken for a cached one.

Usage::

    python benchmarks/synth.py --shape 0.6b              # prints the checkpoint folder
    python benchmarks/synth.py --shape 4b --layers 14
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ROOT = Path(os.environ.get("DRIFT_BENCH_DIR", "/tmp/drift-bench"))
BYTES_PER_WEIGHT = 2  # bf16; torch is imported only to write, so that importing this is cheap
FORMAT_VERSION = 1  # bump when the files written here change, to invalidate caches


@dataclass(frozen=True)
class Shape:
    """The config facts of one Qwen3 size that decide tensor shapes."""

    name: str
    hidden: int
    d_ff: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_theta: float
    max_position_embeddings: int


SHAPES: dict[str, Shape] = {
    # From the published config.json of Qwen/Qwen3-0.6B and Qwen/Qwen3-4B.
    "0.6b": Shape("qwen3-0.6b", hidden=1024, d_ff=3072, n_layers=28, n_heads=16,
                  n_kv_heads=8, head_dim=128, rope_theta=1_000_000.0,
                  max_position_embeddings=40960),
    "4b": Shape("qwen3-4b", hidden=2560, d_ff=9728, n_layers=36, n_heads=32,
                n_kv_heads=8, head_dim=128, rope_theta=1_000_000.0,
                max_position_embeddings=40960),
}


def tensor_specs(shape: Shape, n_layers: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, in file order, with Hugging Face Qwen3 names.

    ``nn.Linear`` weights are (out, in). The embedding is tied (no ``lm_head.weight``),
    as in both real checkpoints.
    """
    d, f, hd = shape.hidden, shape.d_ff, shape.head_dim
    q_out, kv_out = shape.n_heads * hd, shape.n_kv_heads * hd
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, d))]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (d,)),
            (p + "self_attn.q_proj.weight", (q_out, d)),    # (n_heads*hd, d)
            (p + "self_attn.k_proj.weight", (kv_out, d)),   # (n_kv*hd, d)
            (p + "self_attn.v_proj.weight", (kv_out, d)),   # (n_kv*hd, d)
            (p + "self_attn.o_proj.weight", (d, q_out)),    # (d, n_heads*hd)
            (p + "self_attn.q_norm.weight", (hd,)),
            (p + "self_attn.k_norm.weight", (hd,)),
            (p + "post_attention_layernorm.weight", (d,)),
            (p + "mlp.gate_proj.weight", (f, d)),
            (p + "mlp.up_proj.weight", (f, d)),
            (p + "mlp.down_proj.weight", (d, f)),
        ]
    specs.append(("model.norm.weight", (d,)))
    return specs


def plan_shards(specs: list[tuple[str, tuple[int, ...]]], max_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split ``specs`` greedily, in order, into shards of at most ``max_bytes`` (bf16).

    A tensor larger than ``max_bytes`` gets a shard of its own, as in ``save_pretrained``.
    """
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shp in specs:
        nbytes = math.prod(shp) * BYTES_PER_WEIGHT
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shp))
        used += nbytes
    return shards


def make_tensor(name: str, shp: tuple[int, ...], seed: int):
    """The random bf16 tensor ``name``; depends only on (name, shape, seed), not on sharding."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    x = torch.randn(shp, generator=g, dtype=torch.float32)
    if len(shp) == 1:  # a norm gain: around 1, as trained RMSNorm weights are
        x = 1.0 + 0.05 * x
    else:
        x = 0.02 * x
    return x.to(torch.bfloat16)


def config_json(shape: Shape, n_layers: int, vocab: int) -> dict:
    """A config.json in the style of the published Qwen3 configs (so drift parses a real one)."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "hidden_size": shape.hidden,
        "initializer_range": 0.02,
        "intermediate_size": shape.d_ff,
        "max_position_embeddings": shape.max_position_embeddings,
        "max_window_layers": n_layers,
        "model_type": "qwen3",
        "num_attention_heads": shape.n_heads,
        "num_hidden_layers": n_layers,
        "num_key_value_heads": shape.n_kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": shape.rope_theta,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab,
    }


def checkpoint_dir(shape: Shape, n_layers: int, vocab: int, seed: int, root: Path = DEFAULT_ROOT) -> Path:
    return Path(root) / f"{shape.name}-L{n_layers}-V{vocab}-s{seed}-f{FORMAT_VERSION}"


def build(shape: Shape | str, n_layers: int | None = None, *, vocab: int = 1024, seed: int = 0,
          root: Path | str = DEFAULT_ROOT, shard_bytes: int = 512 * 2**20, force: bool = False,
          log=None) -> Path:
    """Write (or find cached) a synthetic checkpoint and return its folder.

    Args:
        shape: a :data:`SHAPES` key or a :class:`Shape`.
        n_layers: layers to write (``0..n_layers-1``); default all of the shape's layers.
        vocab: vocabulary size of the (tied) embedding.
        seed: weights depend only on (seed, tensor name, tensor shape).
        root: cache folder.
        shard_bytes: the largest shard, in bytes.
        force: rebuild even when cached.
        log: a ``print``-like callable for progress, or None for silence.

    Raises:
        ValueError: unknown shape name, or ``n_layers`` outside ``1..shape.n_layers``.
    """
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
        shape = SHAPES[shape]
    n_layers = shape.n_layers if n_layers is None else n_layers
    if not 1 <= n_layers <= shape.n_layers:
        raise ValueError(f"--layers {n_layers}: {shape.name} has 1..{shape.n_layers} layers")
    log = log or (lambda *a, **k: None)

    final = checkpoint_dir(shape, n_layers, vocab, seed, Path(root))
    if final.is_dir() and not force:
        log(f"cached: {final}")
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    from safetensors.torch import save_file

    specs = tensor_specs(shape, n_layers, vocab)
    shards = plan_shards(specs, shard_bytes)
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    t0 = time.perf_counter()
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        tensors = {name: make_tensor(name, shp, seed) for name, shp in shard}
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        total += nbytes
        weight_map.update({name: fname for name in tensors})
        del tensors
        log(f"  {fname}: {len(shard)} tensors, {nbytes / 2**20:.0f} MiB "
            f"({time.perf_counter() - t0:.0f} s)")

    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(config_json(shape, n_layers, vocab), indent=2) + "\n")
    # Provenance beside, not inside, config.json: a reader may rightly refuse unknown config keys.
    (tmp / "synthetic.json").write_text(json.dumps(
        {"built_by": "benchmarks/synth.py", "format_version": FORMAT_VERSION, "shape": shape.name,
         "layers": n_layers, "vocab": vocab, "seed": seed, "weights": "random"}, indent=2) + "\n")
    if final.exists():  # --force
        shutil.rmtree(final)
    os.rename(tmp, final)
    log(f"built: {final} ({total / 2**30:.2f} GiB in {n} shards, {time.perf_counter() - t0:.0f} s)")
    return final


def n_params(shape: Shape, n_layers: int, vocab: int) -> int:
    """Number of weights in the checkpoint (for memory estimates)."""
    return sum(math.prod(s) for _, s in tensor_specs(shape, n_layers, vocab))


def _parse_size(s: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    s = s.strip().lower().removesuffix("ib").removesuffix("b")
    if s and s[-1] in units:
        return int(float(s[:-1]) * units[s[-1]])
    return int(s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.6b")
    ap.add_argument("--layers", type=int, default=None,
                    help="write layers 0..N-1 only (config num_hidden_layers = N); default: all")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT,
                    help="cache folder (default $DRIFT_BENCH_DIR or /tmp/drift-bench)")
    ap.add_argument("--shard-size", default="512MiB", help="largest shard, e.g. 512MiB, 2GB")
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = ap.parse_args(argv)
    try:
        path = build(args.shape, args.layers, vocab=args.vocab, seed=args.seed, root=args.root,
                     shard_bytes=_parse_size(args.shard_size), force=args.force,
                     log=lambda *a: print(*a, file=sys.stderr, flush=True))
    except ValueError as e:
        ap.error(str(e))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
