"""What the local services of tests and manual use share (ops/kafka/local_kafka.py, ops/llm/local_llm.py):
a free port, a child that dies with its parent, stopping by PID, and the state file of a detached one.

A service started by a Python process dies with that process, even when it is killed (Linux
`PR_SET_PDEATHSIG`); one started detached (its own session) records its PID in a state file that
`stop_recorded` reads.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Self


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def die_with_parent() -> None:
    """Runs in the child before exec: the kernel sends SIGKILL when the parent process dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def stop_pid(pid: int, grace_s: float = 15.0) -> None:
    """SIGTERM (a clean shutdown), then SIGKILL if the process is still there after the grace time."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if not alive(pid):
                return
            time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "\nState:\tZ" in status.read_text())


def running(state_file: Path) -> dict[str, Any] | None:
    """The state of the detached service whose PID is alive, if any."""
    if not state_file.exists():
        return None
    state = json.loads(state_file.read_text())
    return state if alive(state["pid"]) else None


def stop_recorded(state_file: Path) -> dict[str, Any] | None:
    """Stop the detached service of the state file by PID and forget it; its state, or None."""
    if not state_file.exists():
        return None
    state = json.loads(state_file.read_text())
    stop_pid(state["pid"])
    state_file.unlink(missing_ok=True)
    return state


class LocalProcess:
    """A service run as a child process with a work folder of its own (its config and logs): stopped
    by PID, the folder removed unless asked to keep it. Subclasses start it."""

    workdir: Path | None
    process: subprocess.Popen[bytes] | None

    def start(self) -> object:
        raise NotImplementedError

    def stop(self, *, keep_logs: bool = False) -> None:
        if self.process is not None and self.process.poll() is None:
            stop_pid(self.process.pid)
            self.process.wait(timeout=30)
        self.process = None
        if self.workdir is not None and not keep_logs:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
