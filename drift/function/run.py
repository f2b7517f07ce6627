"""``activation_similarity``: run a checkpoint through ``transformers`` and reduce its hidden
states, batch by batch, into the two measures of :mod:`drift.function` for every layer pair."""

from __future__ import annotations

import logging
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

import torch

from .. import __version__, families
from ..analysis import _progress_bar, _dtype, _layers, layer_pairs, resolve_device
from ..archs import find_arch
from ..canonical import n_layers_of
from ..checkpoint import Checkpoint, read_config, resolve_model
from ..config import _int
from ..errors import CheckpointError, DriftError
from ..null import check_seed
from ..result import AnalysisResult
from .measures import CrossCovariances, angular_distance
from .text import check_reading, first_line, reading, require_transformers

log = logging.getLogger(__name__)

N_SEQ, SEQ_LEN, BATCH_SIZE = 64, 128, 8
"""Defaults: 64 sequences of 128 tokens (8,192 positions), 8 sequences per forward pass."""


# --------------------------------------------------------------------------- the model

class _Stop(Exception):
    """Raised by the hook of the last layer compared: nothing after it is needed."""


def _load_model(folder: Path, model: str, dtype: torch.dtype, dev: torch.device, quiet: bool,
                causal: bool = False):
    """The checkpoint as a ``transformers`` model (``AutoModelForCausalLM`` when ``causal``:
    its logits; else ``AutoModel``), local files only, refused if any weight is missing or
    has another shape than config.json gives it."""
    transformers = require_transformers()
    _check_stored(folder, model)
    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    tlog = transformers.utils.logging
    shown, verbosity = tlog.is_progress_bar_enabled(), tlog.get_verbosity()
    if quiet:
        tlog.disable_progress_bar()  # transformers' own "Loading weights" bar
    tlog.set_verbosity_error()  # no multi-line load report: what matters in it is refused below, in one line
    try:
        # ignore_mismatched_sizes: a weight of another shape than config.json's is listed, not raised after the report
        net, info = cls.from_pretrained(folder, local_files_only=True, trust_remote_code=False, dtype=dtype,
                                        output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as e:  # noqa: BLE001 - any failure of a third-party loader is the checkpoint's
        where = "" if Path(model) == folder else f" (from {folder})"
        raise CheckpointError(f"{model}{where}: transformers cannot load it ({first_line(e)})") from None
    finally:
        tlog.set_verbosity(verbosity)
        if shown:
            tlog.enable_progress_bar()
    mismatched = sorted(info["mismatched_keys"])  # (name, checkpoint shape, shape from config.json)
    if mismatched:
        name, got, want = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise CheckpointError(f"{model}: {name} has shape {tuple(got)}, expected {tuple(want)} from "
                              f"config.json{more}")
    # Never run with weights transformers had to invent. BERT's pooler (absent from
    # BertForMaskedLM checkpoints) runs after every layer, so no hidden state read here uses it.
    missing = sorted(k for k in info["missing_keys"] if not k.startswith("pooler."))
    if missing:
        raise CheckpointError(f"{model}: {len(missing)} weights missing from the checkpoint "
                              f"(e.g. {', '.join(missing[:3])}); transformers would initialise them at random")
    for name, p in net.named_parameters():  # as the weights path refuses them (drift.canonical)
        if p.numel() and not math.isfinite(float(torch.linalg.vector_norm(p.detach(), 1))):
            if not bool(torch.isfinite(p).all()):
                raise CheckpointError(f"{model}: weight {name!r} has NaN or Inf values")
    return net.to(dev).eval()


MIN_TOKENS = 3
"""Fewest tokens :func:`activation_similarity` compares layers on: two centred tokens span one
direction, and the CKA of any two such updates is 1."""


def _check_stored(folder: Path, model: str) -> None:
    """Refuse weights stored as integers (int8 and the like: a quantised checkpoint, which
    transformers would cast to floats as they are). Read from the safetensors headers only."""
    from ..checkpoint import ShardIndex

    index = ShardIndex.of(folder)
    if index.format != "safetensors":
        return
    from safetensors import safe_open

    names: dict[str, list[str]] = {}
    for name, fname in index.weight_map.items():
        names.setdefault(fname, []).append(name)
    for fname, these in names.items():
        try:
            with safe_open(str(folder / fname), framework="pt") as f:
                kinds = {name: f.get_slice(name).get_dtype() for name in these if name.endswith(".weight")}
        except Exception as e:  # noqa: BLE001 - safetensors' own error types
            raise CheckpointError(f"{folder / fname}: corrupt or truncated safetensors file ({first_line(e)})") from None
        for name, kind in kinds.items():
            if kind not in ("F16", "BF16", "F32", "F64"):
                raise CheckpointError(f"{model}: tensor {name!r} is stored as {kind}, not as floats "
                                      "(a quantised checkpoint? dequantise it first)")


class _Taps:
    """Forward hooks on the compared layers (modules ``template.format(i=L)`` of the HF model,
    as the architecture registry names them). ``run`` returns each layer's input h_L and output
    h_(L+1), both (B, T, d); the forward stops after the last compared layer."""

    def __init__(self, net, template: str, layers: list[int], model: str):
        self.net, self.layers, self.last = net, set(layers), max(layers)
        self.h_in: dict[int, torch.Tensor] = {}
        self.h_out: dict[int, torch.Tensor] = {}
        self.handles = []
        for L in layers:
            try:
                mod = net.get_submodule(template.format(i=L))
            except AttributeError:
                self.close()
                raise CheckpointError(f"{model}: transformers built a {type(net).__name__} without the "
                                      f"module {template.format(i=L)!r} that drift's registry names") from None
            self.handles += [mod.register_forward_pre_hook(self._pre(L), with_kwargs=True),
                             mod.register_forward_hook(self._post(L))]

    def _pre(self, L: int):
        def hook(mod, args, kwargs):
            self.h_in[L] = args[0] if args else kwargs["hidden_states"]  # (B, T, d)
        return hook

    def _post(self, L: int):
        def hook(mod, args, out):
            self.h_out[L] = out[0] if isinstance(out, tuple) else out  # (B, T, d)
            if L == self.last:
                raise _Stop
        return hook

    def run(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        self.h_in, self.h_out = {}, {}  # the previous batch's states are dropped here
        with torch.inference_mode():
            try:
                self.net(input_ids=ids, attention_mask=mask)
            except _Stop:
                pass
        B, T = ids.shape
        assert set(self.h_in) == set(self.h_out) == self.layers, (sorted(self.h_out), sorted(self.layers))
        assert all(self.h_in[L].shape[:2] == self.h_out[L].shape[:2] == (B, T) for L in self.layers)
        return self.h_in, self.h_out

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def __enter__(self) -> "_Taps":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _batches(seqs: list[list[int]], size: int, pad: int):
    """(input_ids, attention_mask), both (B, T), right-padded with ``pad``."""
    for b in range(0, len(seqs), size):
        chunk = seqs[b:b + size]
        T = max(map(len, chunk))
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for r, s in enumerate(chunk):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
        yield ids, mask




def setup(model: str, layers, seed, dtype, device):
    """What every run on text starts from, checked: ``(seed, dtype, device, folder, config,
    architecture spec, layers)``."""
    seed = check_seed(seed)
    tdtype, dev = _dtype(dtype), resolve_device(device)
    folder = resolve_model(model)
    config = read_config(folder)
    return seed, tdtype, dev, folder, config, find_arch(config), _layers(layers, n_layers_of(config))


def _reduce(net, template: str, layers: list[int], plist, batches, dev, model: str, bar):
    """Run every batch; reduce its hidden states into the angle sums (per pair), the
    updates' cross-covariances and the token count, then drop them."""
    moments = CrossCovariances(plist)
    angle = {p: 0.0 for p in plist}  # pair -> sum over tokens of the angular distance
    n_tok = 0
    with _Taps(net, template, layers, model) as taps:
        for ids, mask in batches:
            h_in, h_out = taps.run(ids.to(dev), mask.to(dev))  # each layer: (B, T, d)
            keep = mask.reshape(-1).bool().to(dev)  # (B*T,): padding out
            d = h_out[layers[0]].shape[-1]
            out = {L: h_out[L].reshape(-1, d)[keep].to(torch.float64) for L in layers}  # (N, d)
            delta = {L: out[L] - h_in[L].reshape(-1, d)[keep].to(torch.float64) for L in layers}  # (N, d)
            for i, j in plist:
                angle[i, j] += float(angular_distance(out[i], out[j]).sum())
            moments.add(delta)
            n_tok += int(keep.sum())
            bar.update(1)
    return angle, moments, n_tok


# --------------------------------------------------------------------------- the analysis

def activation_similarity(model: str | Path, layers: Iterable[int] | None = None, pairs: str = "consecutive",
                          text: str | Path | None = None, tokens: str = "text", n_seq: int = N_SEQ,
                          seq_len: int = SEQ_LEN, seed: int = 0, batch_size: int = BATCH_SIZE,
                          dtype: str | torch.dtype = "float32", device: str | torch.device = "auto",
                          progress: bool | Callable[[int, int], None] = True) -> AnalysisResult:
    """Activation similarity between pairs of layers of ``model`` (see the module docstring).

    Args:
        model: a local checkpoint folder, a repo id in the local HF cache, or ``"minilm"``.
            Loaded with ``transformers.AutoModel`` from local files only, never remote code.
        layers, pairs: as :func:`drift.analyze` (default all layers; ``"consecutive"`` or ``"all"``).
        text: a UTF-8 text file; default :func:`default_text` (English prose).
        tokens: ``"text"`` (tokenize ``text`` with the checkpoint's tokenizer) or ``"random"``
            (``n_seq × seq_len`` token ids uniform over the vocabulary: not text, for checkpoints
            without a tokenizer; the metadata says so).
        n_seq, seq_len: number and length (in tokens, special tokens included) of the sequences.
        seed: which windows of the text (or which random ids) are used.
        batch_size: sequences per forward pass.
        dtype: the model's ``float32`` (default) or ``float64``; the sums are float64 always.
        device: ``auto`` (default: the GPU when there is one, as :func:`drift.analyze`) | ``cpu`` | ``cuda``.
        progress: a tqdm bar over batches, or ``progress(done, total)`` called per batch.

    Returns:
        An :class:`AnalysisResult` with rows (family ``residual_angle`` | ``update_cka``,
        layer_a, layer_b, residual = the number), ``null``/``rho`` NaN, ``kind="activation"``,
        ``space="activations"``; the metadata says what each number means and what was read.

    Raises:
        DriftError: bad arguments, layers out of range, fewer than two layers, no tokenizer
            (without ``tokens="random"``), an empty or non-UTF-8 text file, sequences longer
            than the model's positions, or any checkpoint problem.
    """
    n_seq, seq_len, batch_size = check_reading(n_seq, seq_len, batch_size, tokens, text)
    if pairs not in ("consecutive", "all"):  # layer_pairs' other choices compare two models
        raise DriftError(f"pairs must be 'consecutive' or 'all', not {pairs!r}")
    seed, tdtype, dev, folder, config, spec, layers = setup(model, layers, seed, dtype, device)
    plist = layer_pairs(layers, pairs)
    seqs, pad, source = reading(folder, str(model), config, text, tokens, n_seq, seq_len, seed)
    n_pos = _int(config, "max_position_embeddings", "n_positions", default=sys.maxsize)
    if seq_len > n_pos:
        raise DriftError(f"seq_len {seq_len} exceeds the model's {n_pos} positions")
    if len(seqs) < n_seq:
        sizes = sorted(Counter(map(len, seqs)).items(), reverse=True)  # (length, count): full windows, the tail
        got = " and ".join(f"{n} sequence{'s' * (n != 1)} of {L} tokens" for L, n in sizes)
        log.warning("the text gives %s, not the %d asked for", got, n_seq)
    counted, width = sum(map(len, seqs)), _int(config, "hidden_size", "n_embd", "d_model", default=0)
    if counted < MIN_TOKENS:
        raise DriftError(f"{counted} token{'s' * (counted != 1)} to compare the layers on: the update CKA needs "
                         f"at least {MIN_TOKENS} (of 2 it is 1 whatever the layers); give more text or longer sequences")

    net = _load_model(folder, str(model), tdtype, dev, quiet=not progress)
    if counted < width:  # said once the model is known to load: a refusal stays one line
        log.warning("the update CKA from %d tokens, fewer than the model's width (%d): with so few it reads "
                    "closer to 1 than the layers are alike", counted, width)
    bar = _progress_bar(progress, -(-len(seqs) // batch_size), "drift function", "batch")
    try:
        angle, moments, n_tok = _reduce(net, spec.layers, layers, plist, _batches(seqs, batch_size, pad), dev,
                                        str(model), bar)
    finally:
        bar.close()

    values = {"residual_angle": {p: a / n_tok for p, a in angle.items()},
              "update_cka": {p: moments.cka(*p) for p in plist}}
    rows = [dict(family=f, layer_a=i, layer_b=j, residual=v[i, j], null=float("nan"), rho=float("nan"),
                 invariant=families.invariant("activations", None, f), kind=families.kind(f),
                 space="activations")
            for f, v in values.items() for i, j in plist]
    import pandas as pd

    meta = dict(
        model=str(model), identity=Checkpoint.open(folder).identity(), architecture=spec.name,
        method="activations", space="activations",
        pairs=pairs, layers=layers, seed=seed, dtype=str(tdtype).replace("torch.", ""), device=str(dev),
        drift_version=__version__, tokens=tokens, text=source, n_seq=len(seqs), seq_len=seq_len,
        n_tokens=n_tok, batch_size=batch_size, config=dict(n_layers=n_layers_of(config)),
        hidden_states=("h_l = input of layer l, h_(l+1) = output of layer l (the residual stream after "
                       "layer l), read by hooks on the layer modules; HF output_hidden_states[l+1] for "
                       "every layer but the last of a model with a final norm, where HF gives the normed state"),
        tokens_counted="every non-padding position of every sequence, special tokens included",
        residual_angle=("distance in [0, 1]: mean over tokens of arccos(cos(h_(i+1), h_(j+1)))/pi, the states "
                        "after layer i and after layer j at the same token (0: same direction, 0.5: orthogonal); "
                        "Gromov et al. 2024, arXiv:2403.17887"),
        update_cka=("similarity in [0, 1]: linear CKA over tokens of the updates D_l = h_(l+1) - h_l of layers "
                    "i and j, from centred d x d cross-covariances (1: equal up to rotation and scale, "
                    "0: uncorrelated); Kornblith et al. 2019"),
        residual="the row's number: a distance for residual_angle, a similarity for update_cka",
        null="not computed: null and rho are NaN",
    )
    return AnalysisResult(pd.DataFrame(rows), meta)
