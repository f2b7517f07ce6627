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

But ``ru_maxrss`` of a process *tree* is the peak of its largest member, not of the sum.
When the child runs worker processes at the same time (drift forks workers for large
assignment problems), the wrapper also polls the tree every ``--poll`` seconds and records
the largest sum of PSS (proportional set size: shared pages divided among the processes that
share them, so forked copy-on-write pages are not counted twice) and of RSS over the tree,
read from ``/proc/PID/smaps_rollup``. Polling can miss a peak shorter than the interval;
``ru_maxrss`` cannot, but sees one process at a time. Report both.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--log", required=True, help="file for the child's stdout and stderr")
    ap.add_argument("--timeout", type=float, default=0, help="kill the child after this many seconds")
    ap.add_argument("--poll", type=float, default=0.2,
                    help="seconds between samples of the process tree's memory (0: do not poll)")
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
        tree = TreePoller(proc.pid, args.poll)
        if args.poll > 0:
            tree.start()
        while True:
            try:
                _, status, ru = os.wait4(proc.pid, 0)
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for clarity
                continue
        signal.setitimer(signal.ITIMER_REAL, 0)
        wall = time.perf_counter() - t0
        tree.stop.set()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen.wait
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    json.dump({
        "rc": proc.returncode,
        "timed_out": timed_out,
        "wall_s": wall,
        "cpu_user_s": ru.ru_utime,
        "cpu_sys_s": ru.ru_stime,
        "peak_rss_bytes": ru.ru_maxrss * scale,
        "tree_peak_pss_bytes": tree.peak_pss if args.poll > 0 else None,
        "tree_peak_rss_bytes": tree.peak_rss if args.poll > 0 else None,
        "tree_max_procs": tree.max_procs if args.poll > 0 else None,
        "tree_samples": tree.samples,
        # What this wrapper could have passed on to the child: its own address space's peak.
        "wrapper_vmhwm_bytes": _vmhwm(),
    }, sys.stdout)
    print()
    return 0


class TreePoller(threading.Thread):
    """Samples the summed PSS and RSS of ``root`` and all its descendants until ``stop``."""

    def __init__(self, root: int, interval: float):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.stop = threading.Event()
        self.peak_pss = self.peak_rss = self.max_procs = self.samples = 0

    def run(self) -> None:
        while not self.stop.is_set():
            pids = _tree(self.root)
            pss = rss = n = 0
            for pid in pids:
                m = _rollup(pid)
                if m is not None:
                    pss, rss, n = pss + m[0], rss + m[1], n + 1
            if n:
                self.samples += 1
                self.peak_pss = max(self.peak_pss, pss)
                self.peak_rss = max(self.peak_rss, rss)
                self.max_procs = max(self.max_procs, n)
            self.stop.wait(self.interval)


def _tree(root: int) -> list[int]:
    """``root`` and its live descendants, from /proc/PID/task/TID/children."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:  # exited meanwhile
            continue
    return out


def _rollup(pid: int):
    """(PSS, RSS) of ``pid`` in bytes, or None if it is gone or unreadable."""
    pss = rss = None
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
    except OSError:
        return None
    return None if pss is None or rss is None else (pss, rss)


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
