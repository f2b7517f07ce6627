#!/usr/bin/env bash
# The GPU benchmark, as one command for a lent H100/H200 machine (see benchmarks/README.md):
#   0. one float32 and one bfloat16 (9728×2560)·(2560×9728) product on the device (the yardstick);
#   1. CPU vs device agreement of `drift analyze` on a 0.6B-shaped 3-layer checkpoint, then
#      the certified path's sparse rounds from 16 threads, in the threads or in worker processes
#      (benchmarks/bench_rounds.py, CPU only; SKIP_ROUNDS=1 skips it);
#   2. all 35 consecutive pairs of a 36-layer Qwen3-4B-shaped checkpoint (exact, default null);
#   3. a profile of the driving thread over 7 consecutive pairs (cProfile: where the driving
#      thread waits on the assignments' threads; SKIP_PROFILE=1 skips it);
#   4. all pairs with the null: every layer (630 pairs) when the consecutive run's time per
#      comparison says it fits in what is left of BUDGET_S, else the most layers that fit.
# Writes timings (measure_child.py JSON lines) and results under ${OUT:-/tmp/drift-gpu}.
# A dry run on the CPU: DEV=cpu SHAPE=0.6b NL=4 BUDGET_S=300 bash benchmarks/gpu.sh
set -uo pipefail
OUT="${OUT:-/tmp/drift-gpu}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD" DRIFT_BENCH_DIR="${DRIFT_BENCH_DIR:-/tmp/drift-bench}"
PY="${PYTHON:-python3}"; DEV="${DEV:-cuda}"; SHAPE="${SHAPE:-4b}"; NL="${NL:-36}"; BUDGET_S="${BUDGET_S:-500}"
T0=$SECONDS
log() { echo "== $(date +%T) +$((SECONDS - T0))s $*" | tee -a "$OUT/timings.txt"; }
measure() {  # name, then the drift arguments
  local name=$1; shift
  $PY -S benchmarks/measure_child.py --log "$OUT/$name.log" -- $PY -m drift analyze --quiet "$@" \
    --out "$OUT/$name.json" | tee -a "$OUT/timings.txt" > "$OUT/$name.time"
  cat "$OUT/$name.time"
}
wall() { $PY -c "import json, sys; print(json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])['wall_s'])" "$1"; }
summary() {  # the certified path's rounds, fallbacks, gap
  $PY -c "import json, sys; print(sys.argv[2], 'assignments:', json.load(open(sys.argv[1])).get('assignment'))" \
    "$OUT/$1.json" "$1" | tee -a "$OUT/timings.txt"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee -a "$OUT/timings.txt"
$PY - "$DEV" <<'PY' | tee -a "$OUT/timings.txt"
import os, sys, time, torch
dev = torch.device(sys.argv[1])
print("torch", torch.__version__, "device", dev, "cpus", os.cpu_count())
a, b = torch.randn(9728, 2560, device=dev), torch.randn(2560, 9728, device=dev)
for dt in (torch.float32, torch.bfloat16):
    x, y = a.to(dt), b.to(dt)
    for _ in range(3):
        x @ y
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync(); t = time.perf_counter()
    for _ in range(10):
        x @ y
    sync()
    print(f"matmul (9728x2560)@(2560x9728) {dt}: {(time.perf_counter() - t) / 10 * 1e3:.2f} ms")
PY

log "build 0.6b x3"; CK6=$($PY benchmarks/synth.py --shape 0.6b --layers 3 | tail -1)
log "agreement"
measure agree_cpu --model "$CK6" --device cpu
measure agree_dev --model "$CK6" --device "$DEV"
[[ -s "$OUT/agree_dev.json" ]] || { tail -20 "$OUT/agree_dev.log"; exit 1; }
summary agree_dev
$PY - "$OUT" <<'PY' | tee -a "$OUT/timings.txt"
import json, sys
import numpy as np
out = sys.argv[1]
a, b = (json.load(open(f"{out}/agree_{d}.json")) for d in ("cpu", "dev"))
worst = 0.0
for key in ("family_residuals", "null_residuals"):
    for fam, vals in a[key].items():
        x, y = (np.array([np.nan if v is None else v for v in r], float) for r in (vals, b[key][fam]))
        assert (np.isnan(x) == np.isnan(y)).all(), (key, fam)
        worst = max(worst, float(np.nanmax(np.abs(x - y), initial=0.0)))
print(f"cpu vs device: max |difference| over residuals and nulls = {worst:.2e}")
PY
log "sparse rounds from 16 threads: in the threads vs in worker processes (CPU only)"
[[ -n "${SKIP_ROUNDS:-}" ]] || $PY benchmarks/bench_rounds.py --threads 16 --problems 16 --repeat 1 | tee -a "$OUT/timings.txt"
log "build $SHAPE x$NL"; CK=$($PY benchmarks/synth.py --shape "$SHAPE" --layers "$NL" | tail -1)
log "consecutive 0..$((NL - 1)) ($((NL - 1)) pairs)"
measure cons --model "$CK" --device "$DEV" --block-start 0 --block-end $((NL - 1))
summary cons
P=$(( NL < 8 ? NL - 1 : 7 )); [[ -n "${SKIP_PROFILE:-}" ]] && P=0
(( P > 0 )) && {
log "profile: consecutive 0..$P"
$PY -m cProfile -o "$OUT/cons8.prof" -m drift analyze --quiet --model "$CK" --device "$DEV" \
  --block-start 0 --block-end $P --out "$OUT/cons8.json" > "$OUT/cons8.log" 2>&1
for key in cumulative tottime; do
  $PY -c "import pstats, sys; pstats.Stats(sys.argv[1]).sort_stats(sys.argv[2]).print_stats(18)" "$OUT/cons8.prof" $key \
    2>&1 | grep -v '^$' | tail -19 | cut -c1-140 | sed 's|/[^ ]*/drift/|drift/|' | tee -a "$OUT/timings.txt"
done
}
# all pairs: 2 comparisons per pair (observed, null); the consecutive run's seconds per comparison
per=$($PY -c "print($(wall "$OUT/cons.time") / (2 * ($NL - 1)))")
left=$((BUDGET_S - (SECONDS - T0)))
m=$($PY -c "
import math
per, left, nl = $per, $left, $NL
fits = lambda m: 1.3 * per * m * (m - 1) + 20 < left
print(max([m for m in range(2, nl + 1) if fits(m)], default=0))")
log "seconds per comparison $per; ${left}s left: all pairs over $m of $NL layers"
if (( m >= 2 )); then
  measure all$m --model "$CK" --device "$DEV" --block-start 0 --block-end $((m - 1)) --pairs all
  summary all$m
fi
log "done"
