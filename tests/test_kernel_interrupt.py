"""The notebook's interrupt button stops an analysis that an explorer control started.

A real ipykernel, driven over its protocol as JupyterLab drives it: the block slider's change
arrives as a comm message, the interrupt as a SIGINT to the kernel's process group. JupyterLab
≥ 4.4 with ipykernel 7 handles widget messages in a *subshell* thread, where no signal arrives;
the explorer must stop anyway, cache nothing, keep the previous figures, and leave the kernel's
SIGINT handling and the assignment workers as they were. (The same path in a real browser:
tests/test_browser.py.)
"""

from __future__ import annotations

import json
import time

import pytest

jupyter_client = pytest.importorskip("jupyter_client")

SETUP = """
import signal, threading
from drift.widgets import Explorer
ex = Explorer(model="minilm", block=(0, 1), method="exact", pairs="all")
ex.refresh()
threads = {}
_refresh = ex.refresh
def _spy():
    threads["refresh"] = threading.current_thread().name
    return _refresh()
ex.refresh = _spy
print(ex._block.model_id)
"""


class Kernel:
    def __init__(self, env: dict):
        self.km = jupyter_client.KernelManager(kernel_name="python3")
        self.km.start_kernel(env=env)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def run(self, code: str, timeout: float = 120, subshell: str | None = None) -> str:
        """Execute ``code`` (on the main shell, or in ``subshell``); its stdout."""
        msg = self.kc.session.msg("execute_request", {
            "code": code, "silent": False, "store_history": False, "user_expressions": {},
            "allow_stdin": False, "stop_on_error": True})
        if subshell:
            msg["header"]["subshell_id"] = subshell
        self.kc.shell_channel.send(msg)
        out, t_end = [], time.monotonic() + timeout
        while time.monotonic() < t_end:
            m = self.kc.get_iopub_msg(timeout=timeout)
            if m["parent_header"].get("msg_id") != msg["header"]["msg_id"]:
                continue
            if m["msg_type"] == "stream":
                out.append(m["content"]["text"])
            elif m["msg_type"] == "error":
                raise AssertionError("\n".join(m["content"]["traceback"]))
            elif m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                return "".join(out).strip()
        raise AssertionError(f"no answer to {code!r} within {timeout} s")

    def subshell(self) -> str | None:
        self.kc.control_channel.send(self.kc.session.msg("create_subshell_request", {}))
        reply = self.kc.control_channel.get_msg(timeout=10)["content"]
        return reply.get("subshell_id") if reply.get("status") == "ok" else None

    def widget_update(self, comm_id: str, state: dict, subshell: str | None) -> None:
        """What the browser sends when a control changes."""
        msg = self.kc.session.msg("comm_msg", {"comm_id": comm_id, "data": {
            "method": "update", "state": state, "buffer_paths": []}})
        if subshell:
            msg["header"]["subshell_id"] = subshell
        self.kc.shell_channel.send(msg)

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


@pytest.fixture
def kernel(tmp_path):
    import os

    k = Kernel({**os.environ, "DRIFT_CACHE_DIR": str(tmp_path / "cache"),
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    yield k
    k.close()


def _state(kernel: Kernel) -> dict:
    return json.loads(kernel.run(
        "import json, re\n"
        "m = re.search(r'data-drift-state=\"(\\w+)\"', ex._status.value)\n"
        "print(json.dumps({'state': m and m.group(1), 'shown': ex.shown_setting,"
        " 'tag': ex.setting_tag(), 'thread': threads.get('refresh'),"
        " 'entries': len(list(ex.cache.directory.rglob('*.json')))}))"))


def test_interrupt_button_stops_an_analysis_started_by_a_control(kernel):
    block_id = kernel.run(SETUP, timeout=180)
    before = _state(kernel)
    assert before["state"] == "done", before
    # As JupyterLab does: the widget's messages are handled in a subshell (ipykernel 7), which
    # a comm follows once it has published from there.
    sub = kernel.subshell()
    if sub:
        kernel.run("ex._block.send_state()", subshell=sub)
    kernel.widget_update(block_id, {"value": [1, 5]}, sub)  # 10 pairs: ~8 s uninterrupted here
    t_end = time.monotonic() + 30
    while (s := _state(kernel))["state"] != "running":
        assert time.monotonic() < t_end, f"the analysis did not start: {s}"
        time.sleep(0.1)
    if sub:
        assert s["thread"] != "MainThread", s  # the case that failed in the browser
    time.sleep(1.0)
    t0 = time.monotonic()
    kernel.km.interrupt_kernel()
    while (s := _state(kernel))["state"] == "running":
        assert time.monotonic() - t0 < 20, "the interrupt did not stop the analysis"
        time.sleep(0.1)
    stopped_s = time.monotonic() - t0
    assert s["state"] == "interrupted", s
    assert stopped_s < 3.0, f"the analysis took {stopped_s:.1f} s to stop"
    assert s["entries"] == before["entries"], "an interrupted analysis was cached"
    assert s["shown"] == before["shown"], "the figures are not the previous setting's"
    # The kernel ignores SIGINT between messages again (what it saved before this cell) ...
    assert kernel.run("print(get_ipython().kernel.saved_sigint_handler == signal.SIG_IGN)") == "True"
    # ... and the same setting, asked again, is computed to the end.
    assert kernel.run("r = ex.refresh(); print(r is not None, ex.interrupted)", timeout=120) == "True False"
    assert _state(kernel)["state"] == "done"
