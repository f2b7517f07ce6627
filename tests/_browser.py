"""Helpers for tests/test_browser.py: a private JupyterLab server and a headless chromium.

System chromium + chromedriver only (``Service(executable_path=...)``: selenium-manager never
downloads anything). The server listens on 127.0.0.1, a free port, with a token; it and every
process below it (kernels run in their own sessions) are killed on exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMEDRIVER = ("/usr/bin/chromedriver",)

# Console messages that are noise, not failures; each explicitly listed.
CONSOLE_IGNORED = (
    "favicon.ico",
    "Failed to load resource: the server responded with a status of 404",
)


def missing_tools() -> list[str]:
    """What the browser test needs and this machine lacks (empty: all there)."""
    missing = []
    if not any(os.access(p, os.X_OK) for p in CHROMIUM):
        missing.append("chromium (" + " or ".join(CHROMIUM) + ")")
    if not any(os.access(p, os.X_OK) for p in CHROMEDRIVER):
        missing.append("chromedriver (" + CHROMEDRIVER[0] + ")")
    for mod in ("selenium", "jupyterlab", "psutil"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(f"python package {mod}")
    return missing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """A running JupyterLab; ``url(path)`` opens a notebook with the token."""

    def __init__(self, root: Path, cache_dir: Path, home: Path):
        self.root, self.cache_dir, self.home = root, cache_dir, home
        self.port, self.token = _free_port(), secrets.token_hex(16)
        self.log_path = home / "jupyterlab.log"
        self.proc: subprocess.Popen | None = None

    def api(self, path: str, method: str = "GET", timeout: float = 5):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body else None

    def url(self, notebook: str) -> str:
        return f"http://127.0.0.1:{self.port}/lab/tree/{notebook}?token={self.token}"

    def start(self, timeout: float = 60) -> None:
        settings = self.home / "lab-settings"
        for rel, value in {
            # every cell in the DOM, so widgets below the fold exist for selenium
            "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
            # no news / update pop-ups over the toolbar
            "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
                {"fetchNews": "false", "checkForUpdates": False},
        }.items():
            p = settings / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(value))
        env = {**os.environ, "DRIFT_CACHE_DIR": str(self.cache_dir),
               "JUPYTERLAB_SETTINGS_DIR": str(settings),
               "JUPYTERLAB_WORKSPACES_DIR": str(self.home / "lab-workspaces"),
               "JUPYTER_RUNTIME_DIR": str(self.home / "runtime"),
               "JUPYTER_CONFIG_DIR": str(self.home / "config"),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.open_browser=False",
               "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}"]
        if os.geteuid() == 0:
            cmd.append("--allow-root")
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyterlab exited ({self.proc.returncode}):\n{self.log_tail()}")
            with contextlib.suppress(OSError, ValueError):
                self.api("/api/status", timeout=2)
                return
            time.sleep(0.3)
        raise RuntimeError(f"jupyterlab did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-n:]
        return ""

    def kernels(self) -> list[dict]:
        return self.api("/api/kernels")

    def stop(self) -> None:
        """Kernels (REST shutdown, then kill), the server and its process group. No survivors."""
        import psutil

        if self.proc is None:
            return
        procs = []
        with contextlib.suppress(psutil.Error):
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        with contextlib.suppress(Exception):
            for k in self.kernels():
                with contextlib.suppress(Exception):
                    self.api(f"/api/kernels/{k['id']}", method="DELETE", timeout=5)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    p.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
                gone, alive = psutil.wait_procs(procs, timeout=5)
                if not alive:
                    break
            except subprocess.TimeoutExpired:
                continue
        self.proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers left in the group


def make_driver(width: int = 1400, height: int = 2000):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = next(p for p in CHROMIUM if os.access(p, os.X_OK))
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              f"--window-size={width},{height}", "--no-first-run", "--disable-extensions",
              "--disable-background-networking"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=next(p for p in CHROMEDRIVER if os.access(p, os.X_OK)))
    return webdriver.Chrome(service=service, options=opts)


def screens_dir(default: Path) -> Path:
    d = Path(os.environ.get("DRIFT_SCREENSHOTS") or default)
    d.mkdir(parents=True, exist_ok=True)
    return d


def copy_notebook(src: Path, dst_dir: Path) -> str:
    shutil.copy(src, dst_dir / src.name)
    return src.name
