#!/usr/bin/env bash
# The GPU benchmark, as one command for a lent H100/H200 machine (see benchmarks/README.md):
#   1. CPU vs CUDA agreement of `drift analyze` on a 0.6B-shaped 3-layer checkpoint;
#   2. all 35 consecutive pairs of a 36-layer Qwen3-4B-shaped checkpoint (exact, CUDA);
#   3. consecutive vs all pairs over layers 0..7 of it (cost per pair, all-pairs scaling);
#      skipped with ONLY_CONSECUTIVE=1.
# Writes timings (measure_child.py JSON lines) and results under ${OUT:-/tmp/drift-gpu}.
set -uo pipefail
OUT="${OUT:-/tmp/drift-gpu}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD" DRIFT_BENCH_DIR="${DRIFT_BENCH_DIR:-/tmp/drift-bench}"
PY="${PYTHON:-python3}"
log() { echo "== $(date +%T) $*" | tee -a "$OUT/timings.txt"; }
measure() {  # name, then the drift arguments
  local name=$1; shift
  $PY -S benchmarks/measure_child.py --log "$OUT/$name.log" -- $PY -m drift analyze --quiet "$@" \
    --out "$OUT/$name.json" | tee -a "$OUT/timings.txt"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/timings.txt"
$PY -c "import torch, os; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'cpus', os.cpu_count())" | tee -a "$OUT/timings.txt"

log "build 0.6b x3"; CK6=$($PY benchmarks/synth.py --shape 0.6b --layers 3 | tail -1)
log "agreement"
measure agree_cpu --model "$CK6" --device cpu
measure agree_cuda --model "$CK6" --device cuda
[[ -s "$OUT/agree_cuda.json" ]] || { tail -20 "$OUT/agree_cuda.log"; exit 1; }
$PY - "$OUT" <<'PY' | tee -a "$OUT/timings.txt"
import json, sys
import numpy as np
out = sys.argv[1]
a, b = (json.load(open(f"{out}/agree_{d}.json")) for d in ("cpu", "cuda"))
worst = 0.0
for key in ("family_residuals", "null_residuals"):
    for fam, vals in a[key].items():
        worst = max(worst, float(np.max(np.abs(np.array(vals) - np.array(b[key][fam])))))
print(f"cpu vs cuda: max |difference| over residuals and nulls = {worst:.2e}")
PY
log "build 4b x36"; CK4=$($PY benchmarks/synth.py --shape 4b | tail -1)
log "4b consecutive 0..35 (35 pairs)"
measure cons36 --model "$CK4" --device cuda
$PY -c "import json, sys; print('assignments:', json.load(open(sys.argv[1])).get('assignment'))" \
  "$OUT/cons36.json" | tee -a "$OUT/timings.txt"  # the certified path's rounds, fallbacks, gap
[[ -n "${ONLY_CONSECUTIVE:-}" ]] && { log "done"; exit 0; }
log "4b consecutive 0..7 (7 pairs)"
measure cons8 --model "$CK4" --device cuda --block-start 0 --block-end 7
log "4b all pairs 0..7 (28 pairs)"
measure all8 --model "$CK4" --device cuda --block-start 0 --block-end 7 --pairs all
log "done"
