"""The tokens a model is run on: English prose by default, a text file, or random ids.

A text is tokenized once, without special tokens, and cut into windows; each window gets the
tokenizer's own special tokens around it. Nothing is downloaded: the tokenizer is read from the
checkpoint's folder (``local_files_only``, never remote code).
"""

from __future__ import annotations

import operator
from pathlib import Path

import numpy as np
import torch

from ..config import _int
from ..errors import DriftError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                   "tokenizer.model", "spiece.model")
"""A folder with none of these has no tokenizer to load."""


def default_text() -> str:
    """English prose: CPython's documentation topics shipped with Python (``pydoc_data.topics``),
    in sorted key order, joined by blank lines."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it from their Python
        raise DriftError("this Python lacks pydoc_data (the default text): give a text file") from None
    return "\n\n".join(topics[k] for k in sorted(topics))


def token_sequences(tokenizer, text: str, n_seq: int, seq_len: int, seed: int) -> list[list[int]]:
    """``n_seq`` sequences of ``seq_len`` token ids cut from ``text``, chosen with ``seed``.

    The text is tokenized once, without special tokens, and cut into consecutive windows of
    ``seq_len − k`` tokens (k: the tokenizer's special tokens per sequence, e.g. [CLS] and
    [SEP]), which are then added around each window. ``n_seq`` windows are drawn without
    replacement and kept in text order; a text with fewer full windows gives all of them and
    its shorter tail (the batches pad it; padding is masked out of every sum).
    """
    head, tail = _special_frame(tokenizer)
    k = len(head) + len(tail)
    w = seq_len - k
    if w < 1:
        raise DriftError(f"seq_len {seq_len} leaves no room for text next to the tokenizer's {k} special tokens")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if not ids or len(ids) + k < 2:
        raise DriftError(f"the text gives {len(ids)} token{'s' * (len(ids) != 1)}; at least 2 are needed")
    full = [ids[s:s + w] for s in range(0, len(ids) - w + 1, w)]
    if len(full) < n_seq:
        rest = ids[len(full) * w:]
        chosen = full + ([rest] if rest else [])
    else:
        pick = np.sort(np.random.default_rng(seed).choice(len(full), n_seq, replace=False))
        chosen = [full[i] for i in pick]
    return [head + c + tail for c in chosen]


def _special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special token ids the tokenizer puts before and after a text (BERT: [CLS], [SEP])."""
    plain = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello", add_special_tokens=True)["input_ids"]
    at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
    if at is None:
        raise DriftError(f"cannot tell the special tokens of the tokenizer {type(tokenizer).__name__} "
                         f"({full} around {plain})")
    return full[:at], full[at + len(plain):]


def tokenizer_of(folder: Path, model: str):
    """The checkpoint's tokenizer (``AutoTokenizer``, local files only), or a DriftError saying why not."""
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise DriftError(f"{model}: no tokenizer in {folder} (none of {', '.join(TOKENIZER_FILES)}); "
                         "use a checkpoint with one, or tokens='random' (CLI: --tokens random) for random token ids")
    transformers = require_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - any failure of a third-party loader is the checkpoint's
        raise DriftError(f"{model}: cannot load the tokenizer in {folder} ({first_line(e)})") from None


def require_transformers():
    """The ``transformers`` module (imported here, on first use), or a DriftError saying how to get it."""
    try:
        import transformers
    except ImportError:
        raise DriftError("running a model needs transformers, which is not installed: "
                         "pip install 'transformers>=4.45'") from None
    return transformers


def first_line(e: BaseException) -> str:
    """``Type: first line of the message`` (third-party errors can run to many lines)."""
    msg = str(e).strip()
    return f"{type(e).__name__}: {msg.splitlines()[0]}" if msg else type(e).__name__


MAX_TEXT_BYTES = 1 << 30
"""The most a text file may hold (1 GiB; CPython's documentation is about 1 MB): past it, a
device like /dev/zero or a wrong file, not text to read whole."""


def read_text(path: str | Path) -> str:
    """A UTF-8 text file's content; a DriftError when it cannot be read, is not UTF-8, holds
    no text or is larger than :data:`MAX_TEXT_BYTES`. A pipe (``<(...)``) is read too."""
    if isinstance(path, bytes) or not isinstance(path, (str, Path)) and not hasattr(path, "__fspath__"):
        raise DriftError(f"text must be the path of a text file, not {path!r}")
    if not str(path).strip():
        raise DriftError(f"text file {str(path)!r}: an empty name")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TEXT_BYTES + 1)
    except OSError as e:
        raise DriftError(f"text file {path}: {e.strerror or e}") from None
    if len(data) > MAX_TEXT_BYTES:
        raise DriftError(f"text file {path}: more than {MAX_TEXT_BYTES >> 20} MiB, not a text to read whole")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DriftError(f"text file {path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text mode reads it
    if not text.strip():
        raise DriftError(f"text file {path} holds no text")
    return text


def random_tokens(vocab: int, n_seq: int, seq_len: int, seed: int) -> list[list[int]]:
    """``n_seq`` sequences of ``seq_len`` ids uniform over ``0..vocab-1`` (not text)."""
    g = torch.Generator().manual_seed(seed)
    try:
        return torch.randint(0, vocab, (n_seq, seq_len), generator=g).tolist()  # (n_seq, seq_len)
    except (RuntimeError, MemoryError):  # torch's "can't allocate", Python's list
        raise DriftError(f"n_seq × seq_len = {n_seq} × {seq_len} random tokens do not fit in memory") from None


def check_reading(n_seq, seq_len, batch_size, tokens: str, text) -> tuple[int, int, int]:
    """The arguments of what a model reads, checked before anything is opened: returns
    ``(n_seq, seq_len, batch_size)`` as Python ints (numpy's integers are accepted too)."""
    out = []
    for name, v in (("n_seq", n_seq), ("seq_len", seq_len), ("batch_size", batch_size)):
        try:
            i = None if isinstance(v, (bool, np.bool_)) else operator.index(v)
        except TypeError:
            i = None
        if i is None or i < 1:
            raise DriftError(f"{name} must be a positive integer, not {v!r}")
        out.append(i)
    if tokens not in ("text", "random"):
        raise DriftError(f"tokens must be 'text' or 'random', not {tokens!r}")
    if tokens == "random" and text is not None:
        raise DriftError("tokens='random' reads no text: give a text file or random tokens, not both")
    return tuple(out)


def reading(folder: Path, model: str, config: dict, text, tokens: str, n_seq: int, seq_len: int,
            seed: int) -> tuple[list[list[int]], int, str]:
    """What the model reads: ``(sequences, padding id, a line saying what they are)``."""
    if tokens == "random":
        vocab = _int(config, "vocab_size")
        return (random_tokens(vocab, n_seq, seq_len, seed), 0,
                f"random token ids, uniform over the vocabulary 0..{vocab - 1} (not text)")
    tok = tokenizer_of(folder, model)
    seqs = token_sequences(tok, default_text() if text is None else read_text(text), n_seq, seq_len, seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    vocab = _int(config, "vocab_size", default=0)  # 0: not given, nothing to check against
    top = max((max(s) for s in seqs if s), default=-1)
    if len({len(s) for s in seqs}) > 1:  # some sequence is padded
        top = max(top, pad)
    if vocab and top >= vocab:
        raise DriftError(f"{model}: its tokenizer gives token id {top}, but the model has {vocab} "
                         "(vocab_size): the tokenizer is not the model's")
    source = (f"text file {Path(text).resolve()}" if text is not None else
              "pydoc_data.topics (CPython's documentation topics, English prose), sorted keys")
    return seqs, pad, source

