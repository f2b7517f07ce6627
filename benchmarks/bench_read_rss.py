"""Peak memory of reading every layer of a large checkpoint with drift's lazy LayerReader.

Writes a synthetic, sharded, bf16 safetensors checkpoint with Qwen3-4B layer shapes (hidden
2560, d_ff 9728, 32 query / 8 KV heads of 128; small vocabulary) and, by default, 6 layers:
about 1.2 GB. Tensors are written shard by shard with ``safetensors.torch.save_file`` plus a
``model.safetensors.index.json``; no model is ever instantiated. Shards are cut by size, not
at layer boundaries, so some layers straddle two files, as in real checkpoints.

Then a *fresh* Python process opens the checkpoint, reads every layer in float32 (the default), touches every tensor, and drops it
before the next one. It reports its peak resident set size (``ru_maxrss``) against the size
of the checkpoint and of one layer in float32. A reader that loaded the whole checkpoint
would peak at about the checkpoint size (more in float32); a lazy one at a small multiple of
one layer.

Writer and reader each run in their own subprocess of a parent that imports nothing heavy:
Linux carries the parent's peak RSS over ``fork`` + ``exec`` into the child's ``ru_maxrss``,
so a reader forked from the writer would report the writer's peak. ``VmHWM`` from
``/proc/self/status`` (the high-water mark of the reader's own address space) is printed as a
cross-check.

    python benchmarks/bench_read_rss.py                 # writes to a temp dir, removes it after
    python benchmarks/bench_read_rss.py --layers 12 --dir /data/bench --keep
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=2560,
    intermediate_size=9728, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    vocab_size=1024, max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1e6,
    hidden_act="silu", tie_word_embeddings=True, attention_bias=False, torch_dtype="bfloat16",
)
MiB = 2 ** 20


def layer_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Tensor name (relative to ``model.layers.{i}.``) -> shape, for one Qwen3 layer."""
    H, F, dh = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nq, nkv = cfg["num_attention_heads"] * dh, cfg["num_key_value_heads"] * dh
    return {
        "self_attn.q_proj.weight": (nq, H), "self_attn.k_proj.weight": (nkv, H),
        "self_attn.v_proj.weight": (nkv, H), "self_attn.o_proj.weight": (H, nq),
        "self_attn.q_norm.weight": (dh,), "self_attn.k_norm.weight": (dh,),
        "mlp.gate_proj.weight": (F, H), "mlp.up_proj.weight": (F, H), "mlp.down_proj.weight": (H, F),
        "input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
    }


def write_checkpoint(folder: Path, n_layers: int, shard_bytes: int) -> int:
    """Write config.json, the shards and the index; returns the bytes of tensor data written."""
    import torch
    from safetensors.torch import save_file

    cfg = dict(CONFIG, num_hidden_layers=n_layers)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))

    H, V = cfg["hidden_size"], cfg["vocab_size"]
    names = [("model.embed_tokens.weight", (V, H))]
    for i in range(n_layers):
        names += [(f"model.layers.{i}.{k}", s) for k, s in layer_shapes(cfg).items()]
    names.append(("model.norm.weight", (H,)))

    # Greedy size-based sharding, like save_pretrained(max_shard_size=...).
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in names:
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes

    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            if len(shape) == 1:  # norm gains
                t = 1 + 0.1 * torch.randn(shape, generator=g)
            else:  # W ~ N(0, 1/fan_in)
                t = torch.randn(shape, generator=g) / shape[-1] ** 0.5
            tensors[name] = t.to(torch.bfloat16)  # (out, in) or (n,), bf16
            weight_map[name] = fname
            total += 2 * t.numel()
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def read_all_layers(folder: Path) -> dict:
    """In this (fresh) process: read every layer, touch every tensor; report peak RSS."""
    import torch

    import drift

    def peak_mib() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

    def status_mib(key: str) -> float:
        """A field of /proc/self/status: VmHWM (peak RSS), RssAnon (heap), RssFile (mapped files)."""
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return round(int(line.split()[1]) / 1024, 1)
        return float("nan")

    baseline = peak_mib()  # interpreter + torch + drift
    baseline_split = (status_mib("RssAnon"), status_mib("RssFile"))
    reader = drift.open_layers(str(folder))  # float32
    t0 = time.perf_counter()
    per_layer, layer_bytes, checksum = [], 0, 0.0
    for layer in reader:
        checksum += sum(float(t.float().square().sum()) for _, t in layer.tensors())  # touch every element
        layer_bytes = sum(t.numel() * t.element_size() for _, t in layer.tensors())
        per_layer.append((round(peak_mib(), 1), status_mib("RssAnon"), status_mib("RssFile")))
        del layer
    seconds = time.perf_counter() - t0
    reader.ckpt.close()
    return dict(baseline_mib=round(baseline, 1), baseline_anon_file_mib=baseline_split, peak_mib=round(peak_mib(), 1), vm_hwm_mib=status_mib("VmHWM"),
                peak_after_layer_mib=per_layer, layer_fp32_mib=round(layer_bytes / MiB, 1),
                n_layers=reader.n_layers, shards_opened=len(reader.ckpt.opened),
                read_seconds=round(seconds, 2), checksum_finite=bool(torch.isfinite(torch.tensor(checksum))))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=6, help="number of layers (6 -> about 1.2 GB)")
    p.add_argument("--shard-mb", type=int, default=500, help="maximum shard size in MB")
    p.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    p.add_argument("--read", type=Path, default=None, help=argparse.SUPPRESS)  # child modes
    p.add_argument("--write", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.read is not None:
        print(json.dumps(read_all_layers(args.read)))
        return
    if args.write is not None:
        print(json.dumps(write_checkpoint(args.write, args.layers, args.shard_mb * 10 ** 6)))
        return

    root = args.dir or Path(tempfile.mkdtemp(prefix="drift-bench-rss-"))
    folder = root / "qwen3-synthetic"
    try:
        t0 = time.perf_counter()
        total = json.loads(_child("--write", folder, "--layers", args.layers, "--shard-mb", args.shard_mb))
        n_shards = len(list(folder.glob("*.safetensors")))
        print(f"wrote {total / 1e9:.2f} GB ({total / MiB:.0f} MiB) bf16 in {n_shards} shards, "
              f"{args.layers} layers, in {time.perf_counter() - t0:.1f} s: {folder}")
        r = json.loads(_child("--read", folder))
    finally:
        if not args.keep:
            shutil.rmtree(root if args.dir is None else folder, ignore_errors=True)

    ckpt_mib, layer_mib = total / MiB, r["layer_fp32_mib"]
    above = r["peak_mib"] - r["baseline_mib"]
    print(f"read {r['n_layers']} layers as float32 in {r['read_seconds']} s, "
          f"opening {r['shards_opened']} shard files (with re-opens)")
    print(f"  checkpoint on disk (bf16)     {ckpt_mib:8.0f} MiB")
    print(f"  one layer in float32          {layer_mib:8.0f} MiB")
    anon0, file0 = r["baseline_anon_file_mib"]
    print(f"  peak RSS after imports        {r['baseline_mib']:8.0f} MiB   (anonymous {anon0:.0f}, mapped files {file0:.0f})")
    print(f"  peak RSS while reading        {r['peak_mib']:8.0f} MiB   (VmHWM {r['vm_hwm_mib']:.0f} MiB)")
    print(f"  peak RSS above imports        {above:8.0f} MiB = {above / ckpt_mib:.2f} x checkpoint"
          f" = {above / layer_mib:.2f} x one fp32 layer")
    print("  while holding layer i:  peak RSS / anonymous (heap) / mapped-file pages, MiB")
    for i, (peak, anon, file) in enumerate(r["peak_after_layer_mib"]):
        print(f"    layer {i:2d}   {peak:8.0f} {anon:8.0f} {file:8.0f}")
    assert r["checksum_finite"]


def _child(*args) -> str:
    """Run this script in a fresh interpreter; its last stdout line."""
    out = subprocess.run([sys.executable, __file__, *map(str, args)], check=True,
                         capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


if __name__ == "__main__":
    main()
