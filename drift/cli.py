"""``drift`` command line: ``drift analyze|function|tie --model MODEL ...`` (also ``python -m drift``).

``drift analyze`` does what the reference script did (same flags, same JSON keys) with correct
alignment, a null baseline and rho; ``drift function`` compares layers by their activations on
text, ``drift tie`` tests sharing a family across a block (:mod:`drift.function`). Bad input of any kind (flags, paths, checkpoints, the output file,
an OS error) prints one line ``drift: <message>`` and exits with status 2; the output path is
checked before the work starts. SIGINT, SIGTERM and SIGHUP stop the work cleanly (worker
processes end, temporary files are removed) and exit with 128 + the signal number.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__
from .analysis import PAIRS
from .errors import DriftError
from .function import cli as function_cli
from .methods import METHODS


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one ``drift:`` line (exit status 2) instead of usage + message."""

    def error(self, message: str):
        hint = ""
        if message.endswith("expected one argument"):  # a value such as -1:2 reads as a flag
            flag = message.split(":")[0].replace("argument ", "").split("/")[-1].strip()
            hint = f" (if the value starts with '-', give it as {flag}=VALUE)"
        self.exit(2, f"drift: {message}{hint} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="drift", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"drift {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    a = sub.add_parser(
        "analyze", help="per-family drift between layer pairs, after removing gauge symmetries",
        description="Per-family drift between layers of a checkpoint. residual: unit-normalised "
                    "Frobenius distance after alignment; null: the same method against a "
                    "structure-preserving unrelated partner; rho = residual / null.")
    a.add_argument("--model", default="minilm",
                   help="checkpoint folder, a repo id already in the local HF cache, or the bundled "
                        "'minilm' (default). Never downloads.")
    a.add_argument("--other", default=None,
                   help="a second model of the same architecture and shapes (same kinds as --model, "
                        "e.g. org/name@revision): layer i of --model against layer j of --other")
    a.add_argument("--block-start", type=int, default=None, help="first layer (default 0)")
    a.add_argument("--block-end", type=int, default=None, help="last layer, inclusive (default: last)")
    a.add_argument("--pairs", choices=list(dict.fromkeys(PAIRS[False] + PAIRS[True])), default=None,
                   help="one model: consecutive (default) or all (i < j); with --other: diagonal "
                        "(default; layer i of both) or all (every i of --model with every j of --other)")
    a.add_argument("--method", choices=list(METHODS), default="exact",
                   help="; ".join(f"{m.name}: {m.about}" for m in METHODS.values()))
    a.add_argument("--out", default=None,
                   help="JSON output path (default: drift_<model>_<method>.json here, never over an "
                        "earlier file: -2, -3, ... are appended). Refused inside the model folder.")
    a.add_argument("--force", action="store_true", help="replace --out even if it is not a drift result")
    a.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto: a GPU when present)")
    a.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    a.add_argument("--seed", type=int, default=0, help="seed of the null's random rotations (default 0)")
    a.add_argument("--n-null", type=int, default=1,
                   help="null draws per pair (averaged); 0: no null and no rho, the reference's work "
                        "at about half the cost")
    a.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="run the layer pairs on the Dask cluster at ADDRESS (tcp://host:port), one task "
                        "per pair; every worker opens --model (and --other) itself, so they must name the "
                        "same checkpoint there. Same numbers as a local run. Needs the cluster extra "
                        "(pip install 'gauge-drift[cluster]')")
    a.add_argument("--quiet", action="store_true", help="no progress bar, no table")
    function_cli.add_parser(sub)
    function_cli.add_tie_parser(sub)
    p.commands = sub.choices  # command name -> its parser
    return p


def _format_table(result) -> str:
    s = result.summary()
    has_null = bool(s["rho_mean"].notna().any())
    key, key_name = ("rho_mean", "mean rho") if has_null else ("mean", "mean residual; no null computed")
    s = s.sort_values(key)
    meta = result.meta
    layers = meta["layers"]
    raw = meta["method"] == "raw"
    other = f" vs {meta['other']['model']}" if meta.get("other") else ""
    lines = [
        f"=== drift: {meta['model']}{other} ({meta['architecture']}), layers {layers[0]}..{layers[-1]}, "
        f"{meta['pairs']} pairs, method={meta['method']}"
        + ("" if raw or not meta.get("approximate") else " (APPROXIMATE: not a symmetry of the model)") + " ===",
        ("  residual: unit-normalised Frobenius distance of the weights as stored (no alignment)" if raw else
         "  residual: unit-normalised Frobenius distance after alignment (0 = identical up to gauge)"),
        ("  null: same method vs layer_b with its residual stream rotated (a gain: its entries shuffled); "
         "rho = residual / null (1 = unrelated)" if has_null else "  null, rho: not computed (--n-null 0)"),
        "  over each family's pairs: residual mean, min, max, std (population); mean null; mean of the pairs' rho",
        "  * = not gauge-invariant (raw gain vector or approximate alignment)",
        "",
        f"  {'family':>14}  {'mean':>8}  {'min':>8}  {'max':>8}  {'std':>8}  {'null':>8}  {'rho':>6}  n",
    ]
    for fam, r in s.iterrows():
        star = " " if r["invariant"] else "*"
        lines.append(f"  {fam:>13}{star}  {r['mean']:>8.4f}  {r['min']:>8.4f}  {r['max']:>8.4f}  "
                     f"{r['std']:>8.4f}  {r['null_mean']:>8.4f}  {r['rho_mean']:>6.3f}  {int(r['n'])}")
    lines += ["", f"  Families ranked least-to-most variation (by {key_name}):"]
    for i, (fam, r) in enumerate(s.iterrows()):
        rho = f"rho {r['rho_mean']:.3f}, " if has_null else ""
        lines.append(f"    {i + 1}. {fam}  ({rho}mean residual {r['mean']:.4f})")
    return "\n".join(lines)


def analyze_command(args: argparse.Namespace) -> int:
    from .analysis import analyze
    from .canonical import open_layers

    import torch

    from .output import check_output, free_name

    function_cli.check_out(args.out)
    if args.scheduler is not None:  # a bad address or no distributed, named before any checkpoint is read
        from . import cluster

        cluster.check(args.scheduler, (args.model, args.other))
    if args.other is None and args.pairs == "diagonal":
        raise DriftError("--pairs diagonal compares layer i of --model with layer i of --other: give --other")
    if args.other is not None and args.pairs == "consecutive":
        raise DriftError("--pairs consecutive compares layers of one model: with --other use diagonal or all")
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    reader = open_layers(args.model, dtype)
    if args.other is not None and not str(args.other).strip():
        raise DriftError(f"--other {args.other!r} is an empty name: give the second model, or leave --other out")
    other = open_layers(args.other, dtype) if args.other is not None else None
    n = reader.n_layers
    start = 0 if args.block_start is None else args.block_start
    end = n - 1 if args.block_end is None else args.block_end
    for flag, v in (("--block-start", start), ("--block-end", end)):
        if not 0 <= v < n:
            raise DriftError(f"{flag} {v} is out of range: the model has {n} layers (0..{n - 1})")
    if end < start:
        raise DriftError(f"--block-end {end} is before --block-start {start}")
    folders = [reader.ckpt.folder] + ([other.ckpt.folder] if other is not None else [])  # nor inside either
    if args.out:
        out = check_output(args.out, folders, args.force)
    else:
        vs = f"_vs_{Path(args.other).name or 'other'}" if other is not None else ""
        out = check_output(free_name(Path(f"drift_{Path(args.model).name or 'model'}{vs}_{args.method}.json")),
                           folders, label="the default --out")
    if args.scheduler is not None:  # the workers open the checkpoints themselves, by name
        for r in (reader, other):
            if r is not None:
                r.ckpt.close()
        reader, other = args.model, args.other
    result = analyze(reader, layers=range(start, end + 1), pairs=args.pairs, method=args.method,
                     seed=args.seed, n_null=args.n_null, dtype=args.dtype, device=args.device,
                     progress=not args.quiet, other=other, scheduler=args.scheduler)
    result.meta["model"] = args.model
    if other is not None:
        result.meta["other"]["model"] = args.other
    result.to_json(out, force=True)  # checked before the work (check_output, --force)
    if not args.quiet:
        print(_format_table(result))
        print(f"\nSaved: {out}")
    return 0


class Terminated(BaseException):
    """SIGTERM or SIGHUP: unwinds like Ctrl-C, so that every ``with`` and ``finally`` runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, frame):
    raise Terminated(signum)


def main(argv: list[str] | None = None) -> int:
    import signal

    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the command's parser, so that the line points to its --help
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.WARNING, format="drift: %(message)s")
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        if args.command == "analyze":
            return analyze_command(args)
        if args.command == "function":
            return function_cli.command(args)
        if args.command == "tie":
            return function_cli.tie_command(args)
    except DriftError as e:
        print(f"drift: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"drift: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("drift: interrupted", file=sys.stderr)
        return 130
    except Terminated as t:
        print(f"drift: stopped by {signal.Signals(t.signum).name}", file=sys.stderr)
        return 128 + t.signum
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 1  # pragma: no cover - argparse enforces a command


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
