"""Wall time and peak memory of drift against the reference script, on real-size checkpoints.

Runs, in one session and on the same synthetic checkpoint (``benchmarks/synth.py``):

* the reference script ``shared/reference/seed_layer_variation.py`` (loads the whole model
  in fp32 with transformers, then copies every layer to numpy);
* ``python -m drift analyze`` once per ``--methods`` entry.

Each run is a fresh child process, started by a fresh stdlib-only wrapper
(``measure_child.py``). Its peak resident set size is the kernel's high-water mark for that
child, returned by ``os.wait4`` (the per-child form of ``getrusage(RUSAGE_CHILDREN)``: exact,
no polling, and it includes any processes the child itself waited for); the wrapper keeps
this harness's own memory out of it. Wall time is measured around the child, so it
includes interpreter start-up and imports (what a user waits for). Before timing, the
checkpoint files are read once so that both tools find them in the page cache, and each run
waits (``--idle-wait``) for other processes to leave the CPUs idle; the CPU time others took
anyway is reported beside each run.

Writes ``results.json`` (every number) and ``results.md`` (the table) into ``--out-dir``
and prints the table.

Usage::

    python benchmarks/run.py                                   # 0.6B shape, block 10..13
    python benchmarks/run.py --shape 4b --methods rotation
    python benchmarks/run.py --skip-reference --pairs all
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import synth  # noqa: E402  (sibling module; benchmarks/ is not a package)

REPO = HERE.parent
DEFAULT_REFERENCE = REPO.parent / "shared" / "reference" / "seed_layer_variation.py"
DRIFT_FLAGS = ("--model", "--block-start", "--block-end", "--method", "--out", "--device", "--pairs")
GiB = 2**30


# --------------------------------------------------------------------------- measuring

def measure(cmd: list[str], log_path: Path, *, env: dict[str, str], cwd: Path,
            timeout: float | None, poll: float = 0.2) -> dict:
    """Run ``cmd`` under ``measure_child.py``; return its exit code, wall/CPU time and peak RSS.

    stdout and stderr go to ``log_path``. ``peak_rss_bytes`` is the child's ``ru_maxrss``
    (see ``measure_child.py`` for why a fresh wrapper per run). It counts every resident
    page, file-backed ones included: pages of an mmap'd safetensors shard that the child
    touched count, even though the kernel could drop them. ``tree_peak_pss_bytes`` is the
    largest summed PSS of the child and its descendants, sampled every ``poll`` s (the
    footprint when the child runs workers concurrently). ``others_cpu_s`` is the CPU time
    that other processes used meanwhile.
    """
    wrapper = [sys.executable, "-S", str(HERE / "measure_child.py"), "--log", str(log_path),
               "--timeout", str(timeout or 0), "--poll", str(poll), "--"]
    busy0 = cpu_busy_s()
    p = subprocess.run(wrapper + cmd, env=env, cwd=cwd, capture_output=True, text=True)
    busy1 = cpu_busy_s()
    if p.returncode != 0:
        raise RuntimeError(f"measure_child.py failed ({p.returncode}): {p.stderr.strip()}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    child_cpu = r["cpu_user_s"] + r["cpu_sys_s"]
    r["others_cpu_s"] = None if busy0 is None or busy1 is None else max(0.0, busy1 - busy0 - child_cpu)
    return r


def cpu_busy_s() -> float | None:
    """CPU seconds all processes (and the hypervisor, as steal) have used since boot.

    Read before and after a run; the difference minus the child's own CPU time is what
    *other* processes took meanwhile. On a shared 2-core box this is the first thing to
    check when a timing looks odd. None off Linux.
    """
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_for_idle(max_wait: float, *, busy_cores: float = 0.25, sample: float = 2.0) -> float:
    """Wait (at most ``max_wait`` s) until others use under ``busy_cores`` cores; return the load seen."""
    deadline = time.monotonic() + max_wait
    while True:
        b0 = cpu_busy_s()
        if b0 is None:
            return 0.0
        time.sleep(sample)
        load = (cpu_busy_s() - b0) / sample
        if load < busy_cores or time.monotonic() >= deadline:
            return load


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def warm_cache(folder: Path) -> int:
    """Read every file in ``folder`` once (into the page cache); return the bytes read."""
    total = 0
    for f in sorted(folder.iterdir()):
        if f.is_file():
            with open(f, "rb") as fh:
                while chunk := fh.read(16 * 2**20):
                    total += len(chunk)
    return total


def mem_available() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None off Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------- the two tools

def drift_cli_problem(env: dict[str, str], extra_flags: tuple[str, ...] = ()) -> str | None:
    """Why ``python -m drift analyze`` cannot be benchmarked, or None when it can."""
    cmd = [sys.executable, "-m", "drift", "analyze", "--help"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    except subprocess.TimeoutExpired:
        return "`python -m drift analyze --help` did not finish in 300 s"
    if p.returncode != 0:
        last = (p.stderr.strip() or p.stdout.strip()).splitlines()[-1:] or ["(no output)"]
        return f"`python -m drift analyze --help` exited {p.returncode}: {last[0]}"
    missing = [f for f in DRIFT_FLAGS + extra_flags if f not in p.stdout]
    if missing:
        return f"`python -m drift analyze --help` does not list {', '.join(missing)}"
    return None


MATMUL = """
import sys, time, torch
f, d = int(sys.argv[1]), int(sys.argv[2])
a, b = torch.randn(f, d), torch.randn(d, f)
a @ b
best = float("inf")
for _ in range(3):
    t0 = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - t0)
print(best)
"""


def time_matmul(shape, env: dict[str, str]) -> float:
    """Seconds for one float32 (d_ff × d_model)·(d_model × d_ff) torch matmul, best of 3, in a
    child with the runs' environment: the unit the issue's wall-time targets are given in."""
    p = subprocess.run([sys.executable, "-c", MATMUL, str(shape.d_ff), str(shape.hidden)], env=env,
                       capture_output=True, text=True, check=True)
    return float(p.stdout.strip().splitlines()[-1])


def reference_cmd(ref: Path, ckpt: Path, a: int, b: int, out: Path) -> list[str]:
    return [sys.executable, str(ref), "--model", str(ckpt), "--block-start", str(a),
            "--block-end", str(b), "--out", str(out)]


def drift_cmd(ckpt: Path, a: int, b: int, method: str, pairs: str, device: str, out: Path,
              n_null: int = 1) -> list[str]:
    return [sys.executable, "-m", "drift", "analyze", "--model", str(ckpt), "--block-start", str(a),
            "--block-end", str(b), "--method", method, "--pairs", pairs, "--out", str(out),
            "--device", device, "--n-null", str(n_null)]


def drift_run_name(method: str, n_null: int) -> str:
    """``drift exact`` with the default null; ``drift exact, no null`` is the reference's work."""
    return f"drift {method}" + ("" if n_null == 1 else ", no null" if n_null == 0 else f", n_null={n_null}")


FLOORS = {
    # What each tool costs before it reads a single weight: its imports.
    "reference": [sys.executable, "-c", "import numpy, torch; from transformers import AutoModelForCausalLM"],
    "drift": [sys.executable, "-m", "drift", "analyze", "--help"],
}


def reference_peak_estimate(n_params: int) -> int:
    """The reference holds the fp32 model and an fp32 numpy copy of every layer at once."""
    return 2 * 4 * n_params + GiB // 2  # + interpreter, torch, transformers


# --------------------------------------------------------------------------- report

CLEAN = 0.25  # a run is "clean" when other processes used under this many cores meanwhile


def summarize(runs: list[dict]) -> list[dict]:
    """One row per tool/method: median wall and CPU time, max peak memory, ratios to the reference.

    Times are medians over the *clean* successful runs (others used < ``CLEAN`` cores) when
    there are any, else over all successful runs; memory is the max over all successful runs
    (it does not depend on contention).
    """
    rows: list[dict] = []
    for name in dict.fromkeys(r["name"] for r in runs):
        rs = [r for r in runs if r["name"] == name]
        ok = [r for r in rs if r["rc"] == 0]
        clean = [r for r in ok if (r.get("others_cores") or 0.0) < CLEAN]
        timed = clean or ok
        row = {"name": name, "kind": rs[0]["kind"], "method": rs[0]["method"], "n": len(rs),
               "n_ok": len(ok), "n_clean": len(clean), "rc": [r["rc"] for r in rs]}
        if ok:
            row["wall_s"] = statistics.median(r["wall_s"] for r in timed)
            row["cpu_s"] = statistics.median(r["cpu_user_s"] + r["cpu_sys_s"] for r in timed)
            row["others_cores"] = max((r.get("others_cores") or 0.0) for r in timed)
            row["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in ok)
            pss = [r["tree_peak_pss_bytes"] for r in ok if r.get("tree_peak_pss_bytes")]
            row["tree_peak_pss_bytes"] = max(pss) if pss else None
            row["tree_max_procs"] = max((r.get("tree_max_procs") or 0) for r in ok)
        rows.append(row)
    ref = next((r for r in rows if r["name"] == "reference" and "wall_s" in r), None)
    for row in rows:
        if ref is not None and "wall_s" in row and row["kind"] != "floor":
            row["wall_ratio"] = row["wall_s"] / ref["wall_s"]
            row["rss_ratio"] = row["peak_rss_bytes"] / ref["peak_rss_bytes"]
            if row["tree_peak_pss_bytes"] and ref["tree_peak_pss_bytes"]:
                row["pss_ratio"] = row["tree_peak_pss_bytes"] / ref["tree_peak_pss_bytes"]
    return rows


def markdown(meta: dict, rows: list[dict], skipped: dict[str, str]) -> str:
    m = meta
    lines = [
        f"**{m['shape']}-shaped synthetic checkpoint**, {m['layers']} layers, block "
        f"{m['block_start']}..{m['block_end']} ({m['n_pairs']} {m['pairs']} pair(s) for drift; "
        f"the reference always does {m['block_end'] - m['block_start']} consecutive pair(s)), "
        f"drift device `{m['device']}`; {m['cpu_count']} cores, {m['mem_total_gib']:.0f} GiB RAM; "
        f"{m['repeat']} run(s) each: times are medians over the clean runs (others' cores "
        f"< {CLEAN}) when there are any, memory the max over all.",
        "",
        "| run | wall s | CPU s | peak RSS GiB | tree PSS GiB (procs) | wall ÷ ref | RSS ÷ ref "
        "| PSS ÷ ref | wall ÷ matmul | others' cores | clean | exit |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    dash = " – |" * 10
    for r in rows:
        rc = ",".join(map(str, r["rc"]))
        if "wall_s" not in r:
            lines.append(f"| {r['name']} |{dash} failed: {rc} |")
            continue
        pss = (f"{r['tree_peak_pss_bytes'] / GiB:.2f} ({r['tree_max_procs']})"
               if r["tree_peak_pss_bytes"] else "–")
        ratios = " | ".join(f"{r[k]:.2f}" if k in r else "–"
                            for k in ("wall_ratio", "rss_ratio", "pss_ratio", "matmul_ratio"))
        lines.append(f"| {r['name']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
                     f"{r['peak_rss_bytes'] / GiB:.2f} | {pss} | {ratios} | {r['others_cores']:.2f} | "
                     f"{r['n_clean']}/{r['n']} | {rc} |")
    for what, why in skipped.items():
        lines.append(f"| {what} |{dash} skipped: {why} |")
    if m.get("matmul_s"):
        lines += ["", "wall ÷ matmul: wall time over one float32 (d_ff × d_model)·(d_model × d_ff) "
                      "torch matmul timed before and after the runs (best of 3 each: "
                      + ", ".join(f"{t:.2f}" for t in m["matmul_s"]) + " s)."]
    if any(r.get("others_cores", 0) >= CLEAN for r in rows if r["kind"] != "floor"):
        lines += ["", f"**Warning:** no clean run for some rows: other processes used ≥ {CLEAN} "
                      "cores meanwhile (column *others' cores*, the worst timed run), so their "
                      "times are inflated. Rerun with a larger --repeat or --idle-wait."]
    return "\n".join(lines) + "\n"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "accelerate", "safetensors", "numpy", "gauge-drift"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _git() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "drift"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty(drift/)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(synth.SHAPES), default="0.6b")
    ap.add_argument("--layers", type=int, default=None,
                    help="layers in the checkpoint (default: all for 0.6b; block-end + 1 for 4b, "
                         "since the reference needs 2 x fp32 of every layer and a full 4B does not "
                         "fit in 24 GB)")
    ap.add_argument("--block-start", type=int, default=10)
    ap.add_argument("--block-end", type=int, default=13, help="inclusive")
    ap.add_argument("--pairs", choices=("consecutive", "all"), default="consecutive",
                    help="passed to drift (the reference only does consecutive pairs)")
    ap.add_argument("--methods", default="exact,rotation",
                    help="comma-separated drift methods, each run separately")
    ap.add_argument("--n-null", default="0,1",
                    help="comma-separated drift --n-null values, one run each per method (0: no null, "
                         "the same work as the reference; 1: drift's default)")
    ap.add_argument("--device", default="cpu", help="passed to drift (the reference runs on CPU)")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--skip-drift", action="store_true")
    ap.add_argument("--force-reference", action="store_true",
                    help="run the reference even if its estimated peak exceeds MemAvailable")
    ap.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE,
                    help=f"the reference script (default {DEFAULT_REFERENCE})")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool (report: median wall, max RSS)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per run before it is killed")
    ap.add_argument("--root", type=Path, default=synth.DEFAULT_ROOT, help="checkpoint cache folder")
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="where outputs, logs and results go (default ROOT/runs/<shape>-<time>)")
    ap.add_argument("--no-floor", action="store_true",
                    help="skip the import-floor runs (each tool's imports alone, no work)")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="only re-render the table of an earlier results.json (no runs)")
    ap.add_argument("--no-warm-cache", action="store_true", help="do not pre-read the checkpoint")
    ap.add_argument("--poll", type=float, default=0.2,
                    help="seconds between samples of each run's process-tree PSS (0: off)")
    ap.add_argument("--threads", type=int, default=None,
                    help="set OMP/OPENBLAS/MKL_NUM_THREADS for every child (default: inherit)")
    ap.add_argument("--idle-wait", type=float, default=60,
                    help="before each run, wait up to this many seconds for other processes to "
                         "leave the CPUs idle (0: do not wait)")
    args = ap.parse_args(argv)

    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        print(markdown(saved["meta"], summarize(saved["runs"]), saved.get("skipped", {})))
        return 0

    shape = synth.SHAPES[args.shape]
    a, b = args.block_start, args.block_end
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    n_nulls = [int(x) for x in args.n_null.split(",") if x.strip()]
    layers = args.layers or (shape.n_layers if args.shape == "0.6b" else b + 1)
    if not 0 <= a < b < layers:
        ap.error(f"block {a}..{b} must satisfy 0 <= start < end < layers ({layers})")
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")

    def say(*parts):
        print(*parts, file=sys.stderr, flush=True)

    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    if args.threads:
        env.update({v: str(args.threads) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    n_params = synth.n_params(shape, layers, 1024)
    skipped: dict[str, str] = {}

    todo: list[tuple[str, str, str | None]] = []  # (name, kind, method)
    if args.skip_reference:
        skipped["reference"] = "--skip-reference"
    elif not args.reference.is_file():
        ap.error(f"reference script not found at {args.reference} (use --reference PATH or --skip-reference)")
    else:
        need, avail = reference_peak_estimate(n_params), mem_available()
        if avail is not None and need > avail and not args.force_reference:
            skipped["reference"] = (f"estimated peak {need / GiB:.1f} GiB > MemAvailable "
                                    f"{avail / GiB:.1f} GiB (use fewer --layers or --force-reference)")
        else:
            todo.append(("reference", "reference", None))
    if args.skip_drift:
        skipped["drift"] = "--skip-drift"
    else:
        problem = drift_cli_problem(env, ("--n-null",))
        if problem:
            skipped["drift"] = problem
        else:
            todo += [(drift_run_name(m, k), "drift", (m, k)) for m in methods for k in n_nulls]
    for what, why in skipped.items():
        say(f"SKIP {what}: {why}")

    # Decide what runs before building: a 4B checkpoint is not written for nothing.
    ckpt = synth.build(shape, layers, root=args.root, log=say) if todo else synth.checkpoint_dir(
        shape, layers, 1024, 0, args.root)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = args.out_dir or args.root / "runs" / f"{args.shape}-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)

    if todo and not args.no_floor:
        kinds = {kind for _, kind, _ in todo}
        todo += [(f"{k} import floor", "floor", k) for k in ("reference", "drift") if k in kinds]
    if todo and not args.no_warm_cache:
        t0 = time.perf_counter()
        nbytes = warm_cache(ckpt)
        subprocess.run([sys.executable, "-c", "import torch, transformers, safetensors"], env=env,
                       capture_output=True)
        say(f"warmed page cache: {nbytes / GiB:.2f} GiB + imports in {time.perf_counter() - t0:.1f} s")

    git_start = _git()  # drift may change under a long session; record both ends
    matmul_s = [time_matmul(shape, env)] if todo else []
    runs: list[dict] = []
    for rep in range(args.repeat):
        for name, kind, method in todo:
            stem = name.replace(", ", "-").replace(" ", "-").replace("=", "") + (f"-r{rep}" if args.repeat > 1 else "")
            out, log = out_dir / f"{stem}.json", out_dir / f"{stem}.log"
            if kind == "reference":
                cmd = reference_cmd(args.reference, ckpt, a, b, out)
            elif kind == "drift":
                cmd = drift_cmd(ckpt, a, b, method[0], args.pairs, args.device, out, n_null=method[1])
            else:
                cmd = FLOORS[method]
            # A fresh, empty result cache per run: a cache hit must never pass for a timing.
            run_env = dict(env, DRIFT_CACHE_DIR=str(out_dir / f"cache-{stem}"))
            if args.idle_wait > 0:
                load = wait_for_idle(args.idle_wait)
                if load >= 0.25:
                    say(f"note: other processes are using {load:.1f} cores; timing anyway")
            say(f"run {name} [{rep + 1}/{args.repeat}]: {' '.join(cmd)}")
            r = measure(cmd, log, env=run_env, cwd=REPO, timeout=args.timeout, poll=args.poll)
            r.update(name=name, kind=kind, method=method, repeat=rep, cmd=cmd, log=str(log),
                     output=None if kind == "floor" else str(out), output_written=out.is_file())
            if r["timed_out"]:
                r["rc"] = "timeout"
            elif r["rc"] == 0 and kind != "floor" and not r["output_written"]:
                r["rc"] = "no-output"
            runs.append(r)
            r["others_cores"] = None if r["others_cpu_s"] is None else r["others_cpu_s"] / r["wall_s"]
            say(f"    exit {r['rc']}, {r['wall_s']:.1f} s wall, {r['cpu_user_s'] + r['cpu_sys_s']:.1f} s CPU, "
                f"peak RSS {r['peak_rss_bytes'] / GiB:.2f} GiB, other processes used "
                f"{r['others_cores'] or 0:.2f} cores meanwhile")
            if r["rc"] != 0:
                say(f"    last lines of {log}:\n" + tail(log))

    if todo:
        matmul_s.append(time_matmul(shape, env))
    n_block = b - a + 1
    meta = {
        "time": stamp, "shape": args.shape, "checkpoint": str(ckpt), "layers": layers,
        "n_params": n_params, "block_start": a, "block_end": b, "pairs": args.pairs,
        "n_pairs": n_block - 1 if args.pairs == "consecutive" else n_block * (n_block - 1) // 2,
        "methods": methods, "n_null": n_nulls, "device": args.device, "repeat": args.repeat,
        "reference": str(args.reference), "warm_cache": not args.no_warm_cache,
        "matmul_s": matmul_s, "threads": args.threads, "cpu_count": os.cpu_count(), "mem_total_gib": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GiB,
        "platform": platform.platform(), "versions": _versions(), "git_start": git_start, "git_end": _git(),
        "rss_method": ("ru_maxrss from os.wait4 in a fresh stdlib-only wrapper per run "
                       "(kernel high-water mark; includes file-backed pages)"),
    }
    rows = summarize(runs)
    if matmul_s:
        for row in rows:
            if "wall_s" in row and row["kind"] != "floor":
                row["matmul_ratio"] = row["wall_s"] / statistics.mean(matmul_s)
    table = markdown(meta, rows, skipped)
    (out_dir / "results.json").write_text(json.dumps(
        {"meta": meta, "summary": rows, "runs": runs, "skipped": skipped}, indent=2) + "\n")
    (out_dir / "results.md").write_text(table)
    print(table)
    say(f"wrote {out_dir / 'results.json'} and {out_dir / 'results.md'}")
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
