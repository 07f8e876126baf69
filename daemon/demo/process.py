"""`cegraph run` as a child process, for `cegraph demo --kafka` and for the tests that kill, restart and
watch the daemon: started with its settings as `CEGRAPH_*` variables (none inherited from the parent),
ready when `/readyz` says so, stopped with SIGTERM, or killed with SIGKILL as in a crash.

Children die with their parent, even when it is killed by SIGKILL (Linux `PR_SET_PDEATHSIG`): so no
daemon or traffic process outlives a demo or a test. The kernel sends SIGKILL, not SIGTERM, because a
process paused with SIGSTOP (the demo's traffic while a refinement job runs) would keep a SIGTERM
pending forever; the daemon loses nothing to it (its offsets are committed with its events).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from cegraph.daemon.settings import ENV_PREFIX

CEGRAPH = str(Path(sys.executable).parent / "cegraph")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def die_with_parent() -> None:
    """Runs in the child before exec: the kernel sends it SIGKILL when the parent process dies."""
    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


class DaemonProcess:
    """One `cegraph run`; `settings` are `CEGRAPH_*` variables over a free HTTP port and log level WARNING.

    `env` (the whole environment of the child) may be changed between a stop and the next start.
    """

    def __init__(self, settings: dict[str, str], log_path: Path) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        defaults = {f"{ENV_PREFIX}HTTP__PORT": str(free_port()), f"{ENV_PREFIX}LOG_LEVEL": "WARNING"}
        self.env = {**base, **defaults, **settings}
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.env[f'{ENV_PREFIX}HTTP__PORT']}"

    def start(self, timeout: float = 90) -> None:
        """Start it and wait until it is ready."""
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start it without waiting: several processes then boot side by side."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [CEGRAPH, "run"], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,
            )  # fmt: skip
        self.starts += 1

    def wait_ready(self, timeout: float = 90) -> None:
        """An exit or no readiness within `timeout` is an error that shows the end of its log."""
        assert self.process is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"cegraph run exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"cegraph run was not ready within {timeout} s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, as in a crash."""
        if self.process is not None and self.alive():
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM, a clean shutdown; SIGKILL if it has not ended within a minute."""
        if self.process is not None and self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()

    def get(self, path: str) -> Any:
        """An endpoint of its HTTP API: JSON, or the text of `/metrics`."""
        response = httpx.get(self.url + path, timeout=10)
        response.raise_for_status()
        return response.text if path == "/metrics" else response.json()

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
