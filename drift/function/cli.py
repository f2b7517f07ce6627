"""``drift function`` (activation similarity between layers) and ``drift tie`` (the
shared-operator test), each as a table and a JSON result.

Wired into :mod:`drift.cli` (``add_parser`` when the parser is built, ``command`` to run), whose
error conventions it shares: bad input raises a DriftError, printed as one ``drift:`` line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import DriftError
from .tie import N_SEQ as TIE_N_SEQ, SEQ_LEN as TIE_SEQ_LEN, tie
from .run import N_SEQ, SEQ_LEN


def add_parser(sub) -> argparse.ArgumentParser:
    f = sub.add_parser(
        "function", help="activation similarity between layer pairs (runs the model on text)",
        description="Runs the checkpoint through transformers on text and compares layers by what they "
                    "compute: residual_angle, the angular distance of the residual streams after the two "
                    "layers (0 = same direction, 0.5 = orthogonal), and update_cka, the linear CKA of the "
                    "two layers' updates h_(l+1) - h_l (1 = alike up to rotation and scale, 0 = unrelated).")
    f.add_argument("--model", default="minilm",
                   help="checkpoint folder, a repo id already in the local HF cache, or the bundled 'minilm' "
                        "(default). Never downloads, never runs code from the checkpoint.")
    f.add_argument("--layers", default=None, metavar="A:B",
                   help="first:last layer, both inclusive (default: all; either side may be left out)")
    f.add_argument("--pairs", choices=["consecutive", "all"], default="consecutive")
    _reading_args(f, N_SEQ, SEQ_LEN, "which windows of the text (or random ids) are read")
    _output_args(f, "drift_<model>_function.json")
    return f


def _reading_args(p: argparse.ArgumentParser, n_seq: int, seq_len: int, seed_help: str) -> None:
    """What the model reads, for ``drift function`` and ``drift tie`` alike."""
    p.add_argument("--text", default=None, metavar="FILE",
                   help="a UTF-8 text file (default: CPython's documentation topics, English prose)")
    p.add_argument("--tokens", choices=["text", "random"], default="text",
                   help="random: uniform random token ids instead of text (for checkpoints without a tokenizer)")
    p.add_argument("--n-seq", type=int, default=n_seq, help=f"number of sequences (default {n_seq})")
    p.add_argument("--seq-len", type=int, default=seq_len,
                   help=f"tokens per sequence, special tokens included (default {seq_len})")
    p.add_argument("--seed", type=int, default=0, help=seed_help)


def _output_args(p: argparse.ArgumentParser, default_name: str) -> None:
    p.add_argument("--out", default=None,
                   help=f"JSON output path (default: {default_name} here, never over an earlier file). "
                        "Refused inside the model folder.")
    p.add_argument("--force", action="store_true", help="replace --out even if it is not a drift result")
    p.add_argument("--device", default="auto", help="auto (default: the GPU when there is one, as drift analyze) | cpu | cuda")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no table")


def parse_layers(spec: str | None, n_layers: int) -> range | None:
    """``"a:b"`` -> range(a, b + 1); either side may be empty (0, the last layer). Both must be
    layers of the model: the error quotes ``spec`` as given."""
    if spec is None:
        return None
    a, sep, b = spec.partition(":")
    try:
        first = int(a) if a.strip() else 0
        last = int(b) if b.strip() else n_layers - 1
    except ValueError:
        first = last = None
    if not sep or first is None:
        raise DriftError(f"--layers must be FIRST:LAST (both inclusive, e.g. 0:{n_layers - 1}), not {spec!r}")
    if last < first:
        raise DriftError(f"--layers {spec}: the last layer {last} is before the first {first}")
    outside = [L for L in (first, max(first, n_layers)) if L <= last and not 0 <= L < n_layers]
    if outside:  # the range's first layer that the model lacks
        raise DriftError(f"--layers {spec}: layer {outside[0]} is out of range: the model has {n_layers} layers "
                         f"(0..{n_layers - 1})")
    return range(first, last + 1)


def check_out(out: str | None) -> None:
    """Refuse an empty ``--out`` (``--out ""``, as an unset variable gives), which would
    otherwise be taken for no ``--out`` and write the default name."""
    if out is not None and not out.strip():
        raise DriftError(f"--out {out!r} is empty: give a file path, or leave --out off for the default name")


def format_table(result) -> str:
    meta = result.meta
    layers = meta["layers"]
    angle = result.df[result.df["family"] == "residual_angle"].set_index(["layer_a", "layer_b"])["residual"]
    cka = result.df[result.df["family"] == "update_cka"].set_index(["layer_a", "layer_b"])["residual"]
    lines = [
        f"=== drift function: {meta['model']} ({meta['architecture']}), layers {layers[0]}..{layers[-1]}, "
        f"{meta['pairs']} pairs, {meta['n_seq']} sequences x {meta['seq_len']} tokens "
        f"({meta['n_tokens']} counted), {meta['dtype']} ===",
        f"  text: {meta['text']}",
        "  angle: angular distance of the residual streams after layer a and after layer b "
        "(0 = same direction, 0.5 = orthogonal)",
        "  cka:   linear CKA of the layers' updates h_(l+1) - h_l (1 = alike up to rotation and scale, 0 = unrelated)",
        "",
        f"  {'a':>3}  {'b':>3}  {'angle':>7}  {'cka':>7}",
    ]
    for (a, b), v in angle.items():
        lines.append(f"  {a:>3}  {b:>3}  {v:>7.4f}  {cka[a, b]:>7.4f}")
    return "\n".join(lines)


def command(args: argparse.Namespace) -> int:
    from ..archs import find_arch
    from ..canonical import n_layers_of
    from ..checkpoint import read_config, resolve_model
    from ..output import check_output, free_name
    from .run import activation_similarity

    check_out(args.out)
    folder = resolve_model(args.model)
    config = read_config(folder)
    find_arch(config)  # an unsupported architecture is named before its layer count is looked for
    layers = parse_layers(args.layers, n_layers_of(config))
    if args.out:
        out = check_output(args.out, [folder], args.force)
    else:
        out = check_output(free_name(Path(f"drift_{Path(args.model).name or 'model'}_function.json")), [folder],
                           label="the default --out")
    result = activation_similarity(args.model, layers=layers, pairs=args.pairs, text=args.text,
                                   tokens=args.tokens, n_seq=args.n_seq, seq_len=args.seq_len, seed=args.seed,
                                   dtype=args.dtype, device=args.device, progress=not args.quiet)
    result.to_json(out, force=True)  # checked before the work (check_output, --force)
    if not args.quiet:
        print(format_table(result))
        print(f"\nSaved: {out}")
    return 0


def add_tie_parser(sub) -> argparse.ArgumentParser:
    from ..methods import METHODS

    t = sub.add_parser(
        "tie", help="the shared-operator test: tie a family across a block, measure the outputs' change",
        description="Each layer of the block gets FAMILY from its reference layer (its predecessor, or "
                    "--reference L), carried into its own coordinates by the method's fitted alignment, "
                    "all other weights untouched; the change of the model's outputs on text is the damage "
                    "(causal LM: KL of next-token distributions, nats/token; encoder: relative change of the "
                    "final hidden states), next to a null tie from an unrelated, residual-rotated partner.")
    t.add_argument("--model", default="minilm", help="as for drift analyze (default: the bundled 'minilm')")
    t.add_argument("--family", default="all",
                   help="q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, attention, mlp, a "
                        "comma-separated list of them, or all (default)")
    t.add_argument("--layers", default=None, metavar="A:B", help="first:last layer of the block, inclusive")
    t.add_argument("--method", choices=list(METHODS), default="exact",
                   help="the alignment that carries the reference's family (exact: a symmetry of the model)")
    t.add_argument("--reference", default="previous", help="previous (default) or an anchor layer of the block")
    _reading_args(t, TIE_N_SEQ, TIE_SEQ_LEN, "the text windows (or random ids) and the null's rotations")
    _output_args(t, "drift_<model>_tie_<method>.json")
    return t


def format_tie_table(result) -> str:
    meta = result.meta
    second = "ce_change" if meta["measure"] == "kl" else "embedding_cos"
    unit = "KL nats/token" if meta["measure"] == "kl" else "relative change"
    lines = [f"=== drift tie: {meta['model']} ({meta['architecture']}), layers {meta['layers'][0]}.."
             f"{meta['layers'][-1]}, method={meta['method']}, reference={meta['reference']}, "
             f"{meta['n_seq']} sequences x {meta['seq_len']} tokens ===",
             f"  {meta['residual']}", f"  null:   {meta['null']}", "",  # the first begins "damage: "
             f"  {'family':<11} {'ref':>3} {'layer':>5}  {'damage':>10}  {'null':>10}  {'rho':>7}  {second:>13}"]
    for r in result.df.itertuples(index=False):
        lines.append(f"  {r.family:<11} {r.layer_a:>3} {r.layer_b:>5}  {r.residual:>10.3g}  {r.null:>10.3g}  "
                     f"{r.rho:>7.3f}  {getattr(r, second):>13.4f}")
    lines += ["", f"  whole block tied at once ({unit}):"]
    for f, v in meta["block"].items():
        lines.append(f"  {f:<11} {'':>3} {'all':>5}  {v['damage']:>10.3g}  {v['null']:>10.3g}  {v['rho']:>7.3f}  "
                     f"{v[second]:>13.4f}")
    return "\n".join(lines)


def tie_command(args: argparse.Namespace) -> int:
    from ..archs import find_arch
    from ..canonical import n_layers_of
    from ..checkpoint import read_config, resolve_model
    from ..output import check_output, free_name

    check_out(args.out)
    folder = resolve_model(args.model)
    config = read_config(folder)
    find_arch(config)  # an unsupported architecture is named before its layer count is looked for
    layers = parse_layers(args.layers, n_layers_of(config))
    reference = args.reference
    if reference != "previous":
        try:
            reference = int(reference)
        except ValueError:
            raise DriftError(f"--reference must be 'previous' or a layer number, not {reference!r}") from None
    family = args.family if args.family == "all" else [f.strip() for f in args.family.split(",") if f.strip()]
    if args.out:
        out = check_output(args.out, [folder], args.force)
    else:
        name = f"drift_{Path(args.model).name or 'model'}_tie_{args.method}.json"
        out = check_output(free_name(Path(name)), [folder], label="the default --out")
    result = tie(args.model, family=family, layers=layers, method=args.method, reference=reference,
                 text=args.text, tokens=args.tokens, n_seq=args.n_seq, seq_len=args.seq_len,
                 seed=args.seed, dtype=args.dtype, device=args.device, progress=not args.quiet)
    result.to_json(out, force=True)  # checked before the work (check_output, --force)
    if not args.quiet:
        print(format_tie_table(result))
        print(f"\nSaved: {out}")
    return 0

