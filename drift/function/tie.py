"""The shared-operator test: does tying a family across a block keep what the model computes?

Weight-space drift says how far apart two layers' matrices are once the gauge is removed. A
small distance does not by itself license sharing one operator; this module tests it. For a
family (``q_proj`` … ``down_proj``, or ``attention``, ``mlp``) and a block of layers, each
target layer gets that family from a reference layer (its predecessor, or one anchor layer),
carried into the target's coordinates by the method's fitted alignment
(:meth:`drift.methods.Method.fit`):

* ``exact``: the exact gauge element, so the reference layer's family is expressed in the
  target's basis and nothing but the family changes;
* ``rotation``: the reference script's rotations (not a symmetry: the carried family is
  already distorted);
* ``raw``: no alignment, the reference's tensors as stored.

Every other weight is untouched. The damage is measured on text: for a causal LM the mean KL
divergence of next-token distributions, KL(p_original ‖ p_tied) in nats per token, and the
change of next-token cross-entropy; for an encoder (MiniLM) the relative change of the final
hidden states ‖h′ − h‖/‖h‖ and the mean cosine between the original and tied mean-pooled
sentence embeddings. A null tie calibrates it: the family taken from an unrelated partner (the
reference layer with its residual stream rotated at random, fitted onto the target the same
way), so ``rho = damage / null`` reads like the weight view's ρ: ~0 harmless, ~1 as bad as a
random operator of the same statistics.

Two scopes: per layer (only that target tied; rows of the result) and the whole block at
once (``meta["block"]``).

A caveat for post-LN models (BERT, MiniLM): their LayerNorm gains scale the residual stream,
so they are genuine parameters that no alignment moves, and the reader and writer mean
directions the exact element adjusts are invisible only under the reference's own norm. In
the target, next to the target's norm, the carried family then differs from the reference's
by those directions as well: tying a whole sublayer under ``exact`` and under ``raw`` gives
close but not equal damage there (MiniLM, MLP into layer 1: 0.655 and 0.696). Pre-norm
models fold their gains, and the carried family is exactly the reference's in the target's
basis.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from .. import __version__
from ..align import random_orthogonal
from ..analysis import _progress_bar
from ..canonical import CanonicalLayer, LayerReader, layer_state_dict
from ..checkpoint import Checkpoint
from ..errors import CheckpointError, DriftError
from ..methods import get as get_method
from ..result import AnalysisResult

Tensor = torch.Tensor

FAMILY_TENSORS: dict[str, tuple[str, ...]] = {
    "q_proj": ("W_Q", "b_Q"), "k_proj": ("W_K", "b_K"), "v_proj": ("W_V", "b_V"), "o_proj": ("W_O", "b_O"),
    "gate_proj": ("W_gate", "b_gate"), "up_proj": ("W_up", "b_up"), "down_proj": ("W_down", "b_down"),
}
"""Family -> the CanonicalLayer tensors it ties (bias with its matrix)."""

GROUPS = {"attention": ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"),
          "mlp": ("gate_proj", "up_proj", "down_proj")}
"""Whole sublayers; ``attention`` takes Qwen3's q/k-norm gains too (they act inside it)."""

N_SEQ, SEQ_LEN, BATCH_SIZE = 16, 64, 8
"""Defaults: 16 sequences of 64 tokens (1,024 positions), 8 per forward pass. Every tie
variant runs the whole text, so this is smaller than :mod:`drift.function`'s default."""


def families_of(sym, family: str | Iterable[str] = "all") -> list[str]:
    """The families to tie, checked against the architecture (a GLU gate only where there is one)."""
    have = [f for f in FAMILY_TENSORS if f != "gate_proj" or sym.is_glu] + list(GROUPS)
    if family == "all":
        return have
    try:
        asked = [family] if isinstance(family, str) else list(family)
    except TypeError:
        asked = None
    if asked is None or not all(isinstance(f, str) for f in asked):
        raise DriftError(f"family must be 'all', a family name or a list of them, not {family!r}")
    for i, f in enumerate(asked):
        if f in asked[:i]:
            raise DriftError(f"family {f!r} is given twice")
        if f not in have:
            why = "has no GLU gate" if f == "gate_proj" else f"ties {', '.join(have)}"
            raise DriftError(f"family {f!r} cannot be tied here: {sym.arch} {why}")
    if not asked:
        raise DriftError("no family to tie")
    return asked


def tied(target: CanonicalLayer, source: CanonicalLayer, family: str) -> CanonicalLayer:
    """``target`` with ``family``'s tensors (and, for ``attention``, q/k-norm gains) from ``source``."""
    parts = GROUPS.get(family, (family,))
    kw = {t: getattr(source, t) for f in parts for t in FAMILY_TENSORS.get(f, ())}
    norms = dict(target.norms)
    for role in ("q_norm", "k_norm"):
        if role in parts and role in target.norms:
            norms[role] = source.norms[role]
    return replace(target, **kw, norms=norms)


def null_partner(layer: CanonicalLayer, gen: torch.Generator) -> CanonicalLayer:
    """``layer`` with its residual stream rotated at random (readers W Rᵀ, writers R W, their
    biases R b): an unrelated partner with the same spectra, as the weight null (gauge-spec §5)."""
    R = random_orthogonal(layer.sym.d_model, gen).to(layer.W_Q.dtype)
    out = layer.clone()
    for name in ("W_Q", "W_K", "W_V", "W_gate", "W_up"):
        if getattr(out, name) is not None:
            setattr(out, name, getattr(out, name) @ R.T)
    out.W_O, out.W_down = R @ out.W_O, R @ out.W_down
    for name in ("b_O", "b_down"):
        if getattr(out, name) is not None:
            setattr(out, name, R @ getattr(out, name))
    return out


def _reference(reference):
    """``reference`` with numpy's integers taken as Python ints (as counts are everywhere)."""
    if isinstance(reference, (str, bool, np.bool_)) or not hasattr(reference, "__index__"):
        return reference
    try:
        return operator.index(reference)
    except TypeError:  # an array
        return reference


def reference_pairs(layers: list[int], reference: str | int) -> list[tuple[int, int]]:
    """(reference, target) per target layer: ``"previous"`` or one anchor layer of the block."""
    reference = _reference(reference)
    if isinstance(reference, str) and reference == "previous":
        return list(zip(layers[:-1], layers[1:]))
    if isinstance(reference, bool) or not isinstance(reference, int) or reference not in layers:
        raise DriftError(f"reference must be 'previous' or a layer of the block {layers[0]}..{layers[-1]}, "
                         f"not {reference!r}")
    return [(reference, t) for t in layers if t != reference]


@dataclass
class Carried:
    """For one (reference, target) pair: the reference in the target's coordinates, and the
    null partner likewise."""

    reference: int
    target: int
    moved: CanonicalLayer
    null: CanonicalLayer


def carry(reader: LayerReader, pairs: list[tuple[int, int]], method: str, seed: int) -> list[Carried]:
    """Fit every reference onto its target (and a null partner of it), float64."""
    m = get_method(method)
    gen = torch.Generator().manual_seed(seed)
    cache: dict[int, CanonicalLayer] = {}

    def layer(i: int) -> CanonicalLayer:
        if i not in cache:
            cache[i] = reader.read(i).map(lambda t: t.double())
        return cache[i]

    out = []
    for a, b in pairs:
        partner = null_partner(layer(a), gen)
        out.append(Carried(a, b, m.fit(layer(a), layer(b)).apply(layer(a)),
                           m.fit(partner, layer(b)).apply(partner)))
    return out


# --------------------------------------------------------------------------- measuring


class Damage:
    """Running sums of how far a tied model's outputs are from the original's, per variant."""

    def __init__(self, causal: bool):
        self.causal = causal
        self.sums: dict[object, list[float]] = {}

    def add(self, key, base: Tensor, new: Tensor, mask: Tensor, ids: Tensor) -> None:
        s = self.sums.setdefault(key, [0.0, 0.0, 0.0, 0.0])  # primary, its count, secondary, its count
        keep = mask.bool()
        if self.causal:  # base/new: (B, T, V) logits
            lp, lq = base.double().log_softmax(-1), new.double().log_softmax(-1)
            kl = (lp.exp() * (lp - lq)).sum(-1)  # (B, T)
            s[0] += float(kl[keep].sum())
            s[1] += int(keep.sum())
            nxt = keep[:, 1:] & keep[:, :-1]  # positions that predict a real next token
            tgt = ids[:, 1:, None]
            ce = lq[:, :-1].gather(-1, tgt)[..., 0] - lp[:, :-1].gather(-1, tgt)[..., 0]  # −ΔCE per token
            s[2] += -float(ce[nxt].sum())
            s[3] += int(nxt.sum())
        else:  # base/new: (B, T, d) final hidden states
            d = (new.double() - base.double())[keep]
            s[0] += float((d ** 2).sum())
            s[1] += float((base.double()[keep] ** 2).sum())
            w = keep[..., None].double()
            pa, pb = (base.double() * w).sum(1) / w.sum(1), (new.double() * w).sum(1) / w.sum(1)
            s[2] += float(torch.nn.functional.cosine_similarity(pa, pb, dim=-1).sum())
            s[3] += base.shape[0]

    def value(self, key) -> tuple[float, float]:
        """(primary, secondary): (KL, ΔCE) for a causal LM, (relative change, embedding cosine) else."""
        p, n, q, m = self.sums[key]
        if self.causal:
            return p / max(n, 1), q / max(m, 1)
        return math.sqrt(p / max(n, 1e-300)), q / max(m, 1)


def _is_causal(config: dict) -> bool:
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.get("architectures") or [])


def _places(net, model: str):
    """``place(state)``: tensors named as in the checkpoint, renamed as ``net``'s own (a
    ``BertForMaskedLM`` checkpoint's ``bert.encoder...`` is a ``BertModel``'s ``encoder...``;
    a headless checkpoint's ``h.0...`` is ``transformer.h.0...`` of a ``GPT2LMHeadModel``).
    A tensor with no place in ``net`` is refused: left out, the tie would not happen and its
    damage would read 0."""
    have = set(net.state_dict())
    prefix = getattr(net, "base_model_prefix", "") or ""

    def name(k: str) -> str:
        for cand in (k, k.removeprefix(prefix + "."), f"{prefix}.{k}"):
            if cand in have:
                return cand
        raise CheckpointError(f"{model}: tensor {k!r} has no place in the {type(net).__name__} that "
                              "transformers built from config.json (architectures)")

    return lambda state: {name(k): v for k, v in state.items()}


def _outputs(net, ids: Tensor, mask: Tensor, causal: bool) -> Tensor:
    with torch.inference_mode():
        out = net(input_ids=ids, attention_mask=mask)
    return out.logits if causal else out.last_hidden_state


# --------------------------------------------------------------------------- the test

def tie(model: str, family: str | Iterable[str] = "all", layers: Iterable[int] | None = None,
        method: str = "exact", reference: str | int = "previous", text: str | Path | None = None,
        tokens: str = "text", n_seq: int = N_SEQ, seq_len: int = SEQ_LEN, seed: int = 0,
        batch_size: int = BATCH_SIZE, dtype: str | torch.dtype = "float32", device: str | torch.device = "auto",
        progress: bool | Callable[[int, int], None] = True) -> AnalysisResult:
    """The shared-operator test for ``family`` over a block of ``model`` (see the module docstring).

    Args:
        model: a local checkpoint folder, a repo id in the local HF cache, or a bundled name.
        family: a family (``q_proj`` … ``down_proj``, ``attention``, ``mlp``), a list of them,
            or ``"all"`` (default: every one the architecture has).
        layers: the block (default all layers; at least two).
        method: the alignment that carries the reference's family (``exact``, ``rotation``, ``raw``).
        reference: ``"previous"`` (each layer from its predecessor) or an anchor layer of the block.
        text, tokens, n_seq, seq_len, seed, batch_size: what the model reads, as
            :func:`drift.function.activation_similarity` (``seed`` also draws the null rotations).
        dtype: the model's ``float32`` (default) or ``float64``; fits are float64 always.
        device: ``auto`` (default: the GPU when there is one, as :func:`drift.analyze`) | ``cpu`` | ``cuda``.
        progress: a tqdm bar, or ``progress(done, total)``.

    Returns:
        An :class:`AnalysisResult`: a row per family and target layer (layer_a = its reference,
        layer_b = the target, only that layer tied): ``residual`` the damage (causal LM: KL in
        nats per token; encoder: relative change of the final hidden states), ``null`` the null
        tie's, ``rho`` their ratio, and ``ce_change`` (causal) or ``embedding_cos`` (encoder);
        ``meta["block"]`` the same numbers with every target of the block tied at once.
    """
    from .run import _batches, _load_model, setup
    from .text import check_reading, reading

    n_seq, seq_len, batch_size = check_reading(n_seq, seq_len, batch_size, tokens, text)
    m = get_method(method)
    seed, tdtype, dev, folder, config, spec, layers = setup(model, layers, seed, dtype, device)
    reference = _reference(reference)
    pairs = reference_pairs(layers, reference)
    reader = LayerReader(Checkpoint.open(folder), torch.float64)
    fams = families_of(reader.read(layers[0]).sym, family)
    seqs, pad, source = reading(folder, str(model), config, text, tokens, n_seq, seq_len, seed)
    causal = _is_causal(config)

    variants = [(f, scope, null) for f in fams for scope in [*(t for _, t in pairs), "block"] for null in (False, True)]
    bar = _progress_bar(progress, len(pairs) + len(variants), "drift tie", "step")
    try:
        carried = []
        for p in pairs:
            carried += carry(reader, [p], method, seed * 1000 + p[1])
            bar.update(1)
        net = _load_model(folder, str(model), tdtype, dev, quiet=not progress, causal=causal)
        batches = [(ids.to(dev), mask.to(dev)) for ids, mask in _batches(seqs, batch_size, pad)]
        base = [_outputs(net, ids, mask, causal) for ids, mask in batches]
        original = {c.target: reader.read(c.target) for c in carried}
        place = _places(net, str(model))
        restore = place({k: v.to(tdtype) for c in carried
                         for k, v in layer_state_dict(original[c.target], reader).items()})
        damage = Damage(causal)
        for f, scope, null in variants:
            chosen = [c for c in carried if scope in ("block", c.target)]
            state = {}
            for c in chosen:
                new = tied(original[c.target], c.null if null else c.moved, f)
                state.update({k: v.to(tdtype) for k, v in layer_state_dict(new, reader).items()})
            net.load_state_dict(place(state), strict=False)  # every tensor has its place (_places)
            for (ids, mask), b in zip(batches, base):
                damage.add((f, scope, null), b, _outputs(net, ids, mask, causal), mask, ids)
            net.load_state_dict(restore, strict=False)
            bar.update(1)
    finally:
        bar.close()
    return _result(damage, fams, carried, causal, dict(
        model=str(model), identity=reader.ckpt.identity(), architecture=spec.name, method=m.name, space="tie",
        reference=reference,
        layers=layers, families=fams, seed=seed, dtype=str(tdtype).replace("torch.", ""), device=str(dev),
        drift_version=__version__, tokens=tokens, text=source, n_seq=len(seqs), seq_len=seq_len,
        n_tokens=int(sum(int(mask.sum()) for _, mask in batches)), batch_size=batch_size,
        function_preserving_alignment=not m.approximate))


def _result(damage: Damage, fams: list[str], carried: list[Carried], causal: bool, meta: dict) -> AnalysisResult:
    import pandas as pd

    second = "ce_change" if causal else "embedding_cos"
    rows, block = [], {}
    for f in fams:
        for c in carried:
            (d, d2), (n, n2) = damage.value((f, c.target, False)), damage.value((f, c.target, True))
            rows.append(dict(family=f, layer_a=c.reference, layer_b=c.target, residual=d, null=n,
                             rho=d / n if n > 0 else float("nan"), invariant=meta["function_preserving_alignment"],
                             kind="tie", space="tie", **{second: d2, f"null_{second}": n2}))
        (d, d2), (n, n2) = damage.value((f, "block", False)), damage.value((f, "block", True))
        block[f] = {"damage": d, "null": n, "rho": d / n if n > 0 else float("nan"), second: d2, f"null_{second}": n2}
    meta.update(
        block=block, measure=("kl" if causal else "relative_change"),
        residual=("damage: mean KL(p_original || p_tied) of next-token distributions, nats per token"
                  if causal else "damage: relative change of the final hidden states, ||h_tied - h|| / ||h|| "
                  "over non-padding tokens"),
        null=("the same damage when the family comes from an unrelated partner: the reference layer with "
              "its residual stream rotated at random, fitted onto the target by the same method"),
        rho="residual / null: ~0 the tie is harmless, ~1 as damaging as an unrelated operator",
        **{second: ("change of next-token cross-entropy (tied - original), nats per token" if causal else
                    "mean cosine between original and tied mean-pooled sentence embeddings (1: unchanged)")})
    return AnalysisResult(pd.DataFrame(rows), meta)
