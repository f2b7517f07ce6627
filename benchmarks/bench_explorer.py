"""The explorer's cache, measured: going back to a setting must feel instant.

MiniLM, all 6 layers, exact (seconds to compute). First visit: computed and drawn. Second
visit in the same explorer: the result and its figures from memory. A new explorer on the
same cache folder: the result from disk, figures drawn anew (only the time to the result
is compared). Ratios are of runs in this process; exit status 1 if either is below 10×.

    .venv/bin/python benchmarks/bench_explorer.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from drift.cache import Cache
from drift.widgets import Explorer

FEW = ["q_proj", "up_proj", "input_ln"]


def main() -> int:
    cache = Cache(Path(tempfile.mkdtemp(prefix="drift-bench-cache-")))
    ex = Explorer(model="minilm", cache=cache, progress=False, families=FEW).set(block=(0, 5), method="exact")
    ex.refresh()
    first = dict(ex.timing)
    ex.set(block=(0, 2)).refresh()  # elsewhere (a small analysis) ...
    ex.set(block=(0, 5)).refresh()  # ... and back
    revisit = dict(ex.timing)
    fresh = Explorer(model="minilm", cache=cache, progress=False, families=FEW).set(block=(0, 5), method="exact")
    fresh.refresh()
    out = {"first_total_s": first["total_s"], "revisit_total_s": revisit["total_s"],
           "new_explorer_result_s": fresh.timing["result_s"],
           "revisit_speedup": first["total_s"] / revisit["total_s"],
           "disk_speedup": first["result_s"] / fresh.timing["result_s"]}
    print(json.dumps({k: round(v, 4) for k, v in out.items()}, indent=1))
    return 0 if out["revisit_speedup"] >= 10 and out["disk_speedup"] >= 10 else 1


if __name__ == "__main__":
    sys.exit(main())
