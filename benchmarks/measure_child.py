"""Run one command and print its wall time, CPU time and peak RSS as one JSON line.

    python -S benchmarks/measure_child.py --log LOG [--timeout S] -- CMD ARG...

Why a separate, stdlib-only wrapper process per measured run: Linux reports in a child's
``ru_maxrss`` the high-water mark of the address space it was forked from (``exec`` keeps
the old one's peak; with ``vfork`` that is the parent's *peak*, not its current size). A
harness that imported torch or built a checkpoint would pass hundreds of MB to every child
it measures. This wrapper starts small (about 10 MB, far below anything measured), so the
``ru_maxrss`` that ``os.wait4`` returns for its child is the child's own peak. ``os.wait4`` is
the per-child form of ``getrusage(RUSAGE_CHILDREN)``: the kernel's exact high-water mark, no
polling, and it includes any processes the child itself waited for.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--log", required=True, help="file for the child's stdout and stderr")
    ap.add_argument("--timeout", type=float, default=0, help="kill the child after this many seconds")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no command given")

    timed_out = False
    with open(args.log, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

        def on_alarm(signum, frame):
            nonlocal timed_out
            timed_out = True
            proc.kill()

        if args.timeout > 0:
            signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, args.timeout)
        while True:
            try:
                _, status, ru = os.wait4(proc.pid, 0)
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for clarity
                continue
        signal.setitimer(signal.ITIMER_REAL, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen.wait
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    json.dump({
        "rc": proc.returncode,
        "timed_out": timed_out,
        "wall_s": wall,
        "cpu_user_s": ru.ru_utime,
        "cpu_sys_s": ru.ru_stime,
        "peak_rss_bytes": ru.ru_maxrss * scale,
        # What this wrapper could have passed on to the child: its own address space's peak.
        "wrapper_vmhwm_bytes": _vmhwm(),
    }, sys.stdout)
    print()
    return 0


def _vmhwm():
    """VmHWM (peak RSS of this process's current address space) in bytes; None off Linux.

    Not ``getrusage(RUSAGE_SELF)``: that would include the peak of whatever this wrapper
    was forked from, which the wrapper's own child does not inherit.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


if __name__ == "__main__":
    sys.exit(main())
