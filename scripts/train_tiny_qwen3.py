#!/usr/bin/env python
"""Train the tiny Qwen3 that ships with drift (``drift/data/tiny_qwen3/``), and fine-tune it.

    OMP_NUM_THREADS=1 python scripts/train_tiny_qwen3.py            # writes drift/data/tiny_qwen3/
    OMP_NUM_THREADS=1 python scripts/train_tiny_qwen3.py --out /tmp/tq

The model is a real Qwen3 (``transformers.Qwen3ForCausalLM``): RoPE, grouped-query attention
(4 query heads share 2 key/value heads, d_head 32), RMS q/k-norm per head, SwiGLU MLP, tied
embeddings; 6 layers, hidden 128, d_ff 384, about 1.2 M parameters. Its tokenizer is the
identity on bytes: token id = byte value (0..255), plus ``<|endoftext|>`` (256) and
``<|pad|>`` (257).

Two runs, one after the other:

1. **Pre-training** on English prose: CPython's own documentation as shipped in
   ``pydoc_data.topics`` (a dict topic -> text). Topics are sorted by name and joined, each
   followed by ``<|endoftext|>``; the shortest suffix of the sorted topics that holds at least
   5% of the bytes is held out (whole topics, so no held-out sentence is half-seen).
   Saved at step 0 (the initialisation), at a few later steps and at the end (``final``).
2. **Fine-tuning** of the saved ``final`` (bf16 weights read back, so the fine-tune can be
   re-run from the committed folder alone) on Python source: a fixed list of standard-library
   files, the last one held out. Saved as ``finetune_stdlib``: a base / fine-tune pair.

Data order is a pure function of (seed, step): the batch of step ``s`` is ``BATCH`` windows of
``SEQ_LEN + 1`` tokens at offsets drawn by a generator seeded with ``seed * 1_000_003 + s``, so
any step's batch can be rebuilt without replaying the ones before it. Learning rate: linear
warm-up, then cosine decay to 10%; AdamW; gradient norm clipped at 1.

Reproducibility: on CPU with one thread (``torch.set_num_threads(1)``, which this script sets)
and the same torch and Python versions, two runs give the same float32 weights. The corpus is
the running Python's ``pydoc_data`` and standard library, which change between Python
releases: ``training.json`` records the Python version and a SHA-256 of every corpus, and
``tests/test_tiny_qwen3.py`` re-runs the first steps and compares them with the committed
``step20`` only when the corpus hash matches.

The committed run took 21 minutes on one thread of a shared machine (1128 s pre-training,
141 s fine-tuning; ``wall_s`` in ``training.json``).

Checkpoints are ordinary Hugging Face folders (``config.json``, ``model.safetensors``,
``tokenizer.json``, ...) stored in **bfloat16** to keep the package small (about 2.4 MB a
folder); training itself is float32. ``training.json`` holds the settings, the loss curve
(train loss averaged over every ``LOG_EVERY`` steps; held-out loss at every saved step), and a
byte-bigram baseline (add-one smoothing, fitted on the train split) scored on exactly the same
held-out predictions as the model. Losses are in nats per token, i.e. per byte (the rare
``<|endoftext|>`` counts as one token).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "drift" / "data" / "tiny_qwen3"

EOS, PAD = 256, 257
SPECIALS = {"<|endoftext|>": EOS, "<|pad|>": PAD}
VOCAB = 258

MODEL = dict(
    vocab_size=VOCAB, hidden_size=128, intermediate_size=384, num_hidden_layers=6,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, hidden_act="silu",
    max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    attention_bias=False, attention_dropout=0.0, use_sliding_window=False,
    bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD,
)
"""Every Qwen3Config override, passed to its constructor (nothing is set afterwards)."""

SEQ_LEN = 128
BATCH = 16
LOG_EVERY = 10

PRETRAIN = dict(seed=0, steps=1800, lr=2e-3, warmup=100, min_lr_ratio=0.1, weight_decay=0.1,
                betas=(0.9, 0.95), clip=1.0, save_at=(0, 20, 200, 900))
"""Pre-training: the final step is saved as ``final``, the others as ``step<N>``."""

FINETUNE = dict(seed=1, steps=300, lr=5e-4, warmup=20, min_lr_ratio=0.1, weight_decay=0.1,
                betas=(0.9, 0.95), clip=1.0, save_at=())

STDLIB_FILES = (
    "bisect.py", "heapq.py", "textwrap.py", "string.py", "fnmatch.py", "shlex.py",
    "functools.py", "dataclasses.py", "json/decoder.py", "json/encoder.py",
    "collections/__init__.py", "argparse.py", "contextlib.py",
)
"""Fine-tuning corpus, files under the standard library's folder; the last one is held out."""

HELDOUT_FRACTION = 0.05


# --------------------------------------------------------------------------- tokenizer and data

def byte_tokenizer():
    """A ``PreTrainedTokenizerFast`` whose ids are the UTF-8 bytes of the text (plus specials).

    Built with ``tokenizers``: the ByteLevel pre-tokenizer maps each byte to one printable
    character (GPT-2's table, without its regex split or prefix space) and a BPE model with
    those 256 characters as its vocabulary and *no merges* maps each character back to its
    byte value. ``tok(text).input_ids == list(text.encode())``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_char = pre_tokenizers.ByteLevel.alphabet()  # 256 characters, one per byte
    table = _bytes_to_unicode()
    assert sorted(table.values()) == sorted(byte_char)
    vocab = {table[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    assert all(tok.token_to_id(s) == i for s, i in SPECIALS.items())
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|pad|>",
                                   model_max_length=MODEL["max_position_embeddings"])


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the one ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _join(docs: list[str]) -> torch.Tensor:
    """Documents as one token stream, each followed by ``<|endoftext|>``. Shape (N,), int64."""
    ids: list[int] = []
    for d in docs:
        ids.extend(d.encode("utf-8"))
        ids.append(EOS)
    return torch.tensor(ids, dtype=torch.long)


def _sha(parts: list[str]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def docs_corpus() -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(train ids, held-out ids, description) of CPython's documentation topics."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    sizes = [len(topics[n].encode("utf-8")) for n in names]
    cut, held = len(names), 0
    while held < HELDOUT_FRACTION * sum(sizes):  # shortest suffix with >= 5% of the bytes
        cut -= 1
        held += sizes[cut]
    train, heldout = _join([topics[n] for n in names[:cut]]), _join([topics[n] for n in names[cut:]])
    meta = dict(source="pydoc_data.topics", sha256=_sha([f"{n}\0{topics[n]}" for n in names]),
                n_topics=len(names), heldout_topics=names[cut:],
                train_tokens=len(train), heldout_tokens=len(heldout))
    return train, heldout, meta


def stdlib_corpus() -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(train ids, held-out ids, description) of ``STDLIB_FILES``; the last file is held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [(root / f).read_text(encoding="utf-8") for f in STDLIB_FILES]
    train, heldout = _join(texts[:-1]), _join(texts[-1:])
    meta = dict(source="the standard library of the running Python", files=list(STDLIB_FILES),
                heldout_files=list(STDLIB_FILES[-1:]), sha256=_sha(texts),
                train_tokens=len(train), heldout_tokens=len(heldout))
    return train, heldout, meta


def batch_at(ids: torch.Tensor, seed: int, step: int) -> torch.Tensor:
    """The training batch of ``step``: BATCH windows of SEQ_LEN + 1 tokens. Shape (B, T+1).

    A pure function of (seed, step), so a run can resume at any step without replaying.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(ids) - SEQ_LEN - 1, (BATCH,), generator=g)  # (B,)
    return torch.stack([ids[s:s + SEQ_LEN + 1] for s in starts.tolist()])  # (B, T+1)


def heldout_windows(ids: torch.Tensor) -> torch.Tensor:
    """Non-overlapping windows of SEQ_LEN + 1 tokens over ``ids`` (the tail that does not
    fill one is dropped). Shape (n_windows, T+1). Each window's first SEQ_LEN tokens predict
    its last SEQ_LEN: the same predictions for the model and the bigram baseline."""
    n = (len(ids) - 1) // SEQ_LEN
    return torch.stack([ids[i * SEQ_LEN:(i + 1) * SEQ_LEN + 1] for i in range(n)])


# --------------------------------------------------------------------------- model, loss, baseline

def new_model(seed: int):
    """A freshly initialised Qwen3ForCausalLM (Hugging Face's init under ``torch.manual_seed``)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**MODEL)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg).float()


def lm_loss(model, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of ``windows`` (B, T+1)."""
    x, y = windows[:, :-1], windows[:, 1:]  # (B, T), (B, T)
    logits = model(input_ids=x).logits  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def heldout_loss(model, ids: torch.Tensor, chunk: int = 32) -> float:
    """Mean cross-entropy (nats/token) over the held-out windows, in eval mode."""
    was_training = model.training
    model.eval()
    w = heldout_windows(ids)  # (n, T+1)
    total = 0.0
    for i in range(0, len(w), chunk):
        total += lm_loss(model, w[i:i + chunk]).item() * len(w[i:i + chunk])
    model.train(was_training)
    return total / len(w)


def bigram_loss(train: torch.Tensor, heldout: torch.Tensor) -> float:
    """Cross-entropy (nats/token) of an add-one-smoothed token bigram model fitted on ``train``,
    on the held-out windows' predictions (the model's first prediction per window, from one
    token of context, is the bigram's too)."""
    counts = torch.ones(VOCAB, VOCAB, dtype=torch.float64)  # (prev, next), add-one
    counts.index_put_((train[:-1], train[1:]), torch.ones(len(train) - 1, dtype=torch.float64),
                      accumulate=True)
    logp = counts.log() - counts.sum(1, keepdim=True).log()  # (V, V), rows sum to 1 in prob
    w = heldout_windows(heldout)  # (n, T+1)
    return -logp[w[:, :-1].reshape(-1), w[:, 1:].reshape(-1)].mean().item()


def lr_at(step: int, run: dict[str, Any]) -> float:
    """Learning rate of the update made at ``step`` (0-based): linear warm-up, cosine to
    ``min_lr_ratio * lr`` at the last step."""
    lr, warm, total = run["lr"], run["warmup"], run["steps"]
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm - 1)
    return lr * (run["min_lr_ratio"] + (1 - run["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * t)))


def train(model, ids: torch.Tensor, run: dict[str, Any], stop: int | None = None,
          on_save: Callable[[int, Any], None] | None = None,
          on_log: Callable[[int, float], None] | None = None):
    """Run ``run["steps"]`` AdamW updates of ``model`` on ``ids`` (or only the first ``stop``,
    with the same schedule). ``on_save(step, model)`` is called after ``step`` updates for each
    step in ``run["save_at"]`` (0: before any); ``on_log(step, mean loss)`` every LOG_EVERY."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]  # norm gains
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": run["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=run["lr"], betas=run["betas"])
    model.train()
    last = run["steps"] if stop is None else stop
    window: list[float] = []
    if 0 in run["save_at"] and on_save:
        on_save(0, model)
    for step in range(last):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, run)
        loss = lm_loss(model, batch_at(ids, run["seed"], step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), run["clip"])
        opt.step()
        window.append(loss.item())
        done = step + 1
        if done % LOG_EVERY == 0 and on_log:
            on_log(done, sum(window) / len(window))
            window = []
        if done in run["save_at"] and on_save:
            on_save(done, model)
    return model


def pretrain_first(stop: int):
    """The pre-training run's model after its first ``stop`` updates (for the reproducibility
    test; no files written). Runs on one thread, as the committed run did (how matmuls split
    their sums depends on the thread count), and restores the caller's setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_ids, _, _ = docs_corpus()
        return train(new_model(PRETRAIN["seed"]), train_ids, PRETRAIN, stop=stop)
    finally:
        torch.set_num_threads(threads)


def save(model, folder: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """An ordinary Hugging Face folder: config, bf16 safetensors weights, the byte tokenizer."""
    import copy

    folder.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(model).to(dtype).save_pretrained(folder, safe_serialization=True)
    byte_tokenizer().save_pretrained(folder)
    # transformers 5 writes its own class name ("TokenizersBackend"), unknown to 4.x; the
    # generic fast class loads the same tokenizer.json in both.
    tc = folder / "tokenizer_config.json"
    tc.write_text(json.dumps({**json.loads(tc.read_text()),
                              "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")
    for f in folder.iterdir():
        f.chmod(0o644)  # safetensors writes 0600; package data must be world-readable


# --------------------------------------------------------------------------- the two runs

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT})")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out: Path = args.out
    t0 = time.perf_counter()

    def stamp(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    train_ids, held_ids, docs = docs_corpus()
    record: dict[str, Any] = dict(
        model=MODEL, seq_len=SEQ_LEN, batch=BATCH, log_every=LOG_EVERY, units="nats per token (byte)",
        saved_dtype="bfloat16", trained_dtype="float32",
        environment=dict(python=platform.python_version(), torch=torch.__version__,
                         transformers=__import__("transformers").__version__, threads=1),
        data_order="batch of step s = BATCH windows at offsets torch.randint(0, N-T-1, (BATCH,)) "
                   "from torch.Generator().manual_seed(seed * 1_000_003 + s)",
        lr_schedule="linear warm-up over `warmup` updates, then cosine to min_lr_ratio * lr",
    )
    bigram = bigram_loss(train_ids, held_ids)
    stamp(f"docs: {len(train_ids)} train / {len(held_ids)} held-out tokens; bigram {bigram:.4f}")

    curve: list[dict[str, float]] = []
    heldout: dict[str, float] = {}

    def on_log(step: int, loss: float) -> None:
        curve.append({"step": step, "train_loss": round(loss, 5)})
        if step % 100 == 0:
            stamp(f"step {step}: train {loss:.4f}")

    def on_save(step: int, model) -> None:
        name = "final" if step == PRETRAIN["steps"] else f"step{step}"
        heldout[name] = round(heldout_loss(model, held_ids), 5)
        save(model, out / name)
        stamp(f"saved {name} (step {step}): held-out {heldout[name]:.4f}")

    pre = dict(PRETRAIN, save_at=tuple(PRETRAIN["save_at"]) + (PRETRAIN["steps"],))
    model = train(new_model(PRETRAIN["seed"]), train_ids, pre, on_save=on_save, on_log=on_log)
    t_pre = time.perf_counter() - t0
    record["pretrain"] = dict(run={k: v for k, v in PRETRAIN.items()}, corpus=docs,
                              saved={n: (PRETRAIN["steps"] if n == "final" else int(n[4:]))
                                     for n in heldout},
                              train_curve=curve, heldout_loss=heldout,
                              final_heldout_loss=heldout["final"], bigram_heldout_loss=round(bigram, 5),
                              wall_s=round(t_pre, 1))

    # Fine-tune what was saved (bf16 read back), so the committed `final` alone reproduces it.
    from transformers import Qwen3ForCausalLM

    ft_train, ft_held, code = stdlib_corpus()
    base = Qwen3ForCausalLM.from_pretrained(out / "final", dtype=torch.float32, local_files_only=True)
    before = dict(stdlib=heldout_loss(base, ft_held), docs=heldout_loss(base, held_ids))
    ft_curve: list[dict[str, float]] = []
    train(base, ft_train, FINETUNE,
          on_log=lambda s, l: ft_curve.append({"step": s, "train_loss": round(l, 5)}))
    save(base, out / "finetune_stdlib")
    saved_ft = Qwen3ForCausalLM.from_pretrained(out / "finetune_stdlib", dtype=torch.float32,
                                                local_files_only=True)
    after = dict(stdlib=heldout_loss(saved_ft, ft_held), docs=heldout_loss(saved_ft, held_ids))
    record["finetune"] = dict(
        run=FINETUNE, start="final (bf16 weights as saved)", corpus=code, train_curve=ft_curve,
        heldout_loss_before={k: round(v, 5) for k, v in before.items()},
        heldout_loss_after={k: round(v, 5) for k, v in after.items()},
        bigram_heldout_loss=round(bigram_loss(ft_train, ft_held), 5),
        wall_s=round(time.perf_counter() - t0 - t_pre, 1))
    record["wall_s"] = round(time.perf_counter() - t0, 1)
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    stamp(f"fine-tune: stdlib held-out {before['stdlib']:.4f} -> {after['stdlib']:.4f}, "
          f"docs held-out {before['docs']:.4f} -> {after['docs']:.4f}")
    stamp(f"done; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
