"""Interrupting an analysis from a notebook's interrupt button, wherever it runs.

ipykernel handles SIGINT only around the messages of its main thread and ignores it
otherwise. A widget callback runs either there (ipykernel 6) or, with JupyterLab ≥ 4.4 and
ipykernel 7, in a kernel *subshell* thread, where no signal ever arrives (the explorer's
interrupt failed there: tests/test_kernel_interrupt.py). :func:`interruptible` covers both.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading


@contextlib.contextmanager
def interruptible():
    """Let the notebook's interrupt button (a SIGINT to the kernel) raise KeyboardInterrupt in
    the analysis that a control started.

    ipykernel handles SIGINT only around the messages of its main thread; it ignores it
    otherwise. A widget callback runs either there (ipykernel 6) or, with JupyterLab ≥ 4.4
    and ipykernel 7, in a *subshell* thread, where no signal ever arrives. In the first case
    the default handler is installed for the duration; in the second, the main thread's event
    loop installs a handler that raises KeyboardInterrupt asynchronously in this thread (it
    lands at the next Python instruction: waits on assignment workers poll, see
    :func:`drift.assign.wait`). Outside a kernel, or off the main thread elsewhere, it does
    nothing."""
    if threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGINT)
        if previous is None:  # installed outside Python: leave it alone
            yield
            return
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
        return
    loop = _kernel_loop()
    if loop is None:
        yield
        return
    target, lock, armed, saved = threading.get_ident(), threading.Lock(), [True], []
    installed = threading.Event()

    def on_sigint(signum, frame):
        with lock:
            if armed[0]:
                _raise_in(target, KeyboardInterrupt)

    def install():
        saved.append(signal.signal(signal.SIGINT, on_sigint))
        installed.set()

    def restore():  # runs after install: the loop's callbacks are first in, first out
        if signal.getsignal(signal.SIGINT) is on_sigint:
            signal.signal(signal.SIGINT, saved[0])

    loop.add_callback(install)
    installed.wait(1.0)  # the main thread is idle between cells; if it is not, go on anyway
    try:
        yield
    finally:
        with lock:
            armed[0] = False
            _raise_in(target, None)  # an interrupt that came too late is dropped, not raised later
        loop.add_callback(restore)


def _kernel_loop():
    """The event loop of the IPython kernel's main thread (thread-safe ``add_callback``), or None."""
    ip = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return getattr(getattr(ip, "kernel", None), "io_loop", None)


def _raise_in(thread_id: int, exc: type[BaseException] | None) -> None:
    """Make ``exc`` raise in the thread ``thread_id`` at its next instruction (None: cancel)."""
    import ctypes

    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                               ctypes.py_object(exc) if exc else None)
