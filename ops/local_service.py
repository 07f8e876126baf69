"""What the local services of tests and manual use share (ops/kafka/local_kafka.py, ops/llm/local_llm.py,
ops/otel-collector/local_collector.py): a free port, a child that dies with its parent, waiting until
it answers, stopping by PID, and the `up --detach` / `down` of a detached one and its state file.

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
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Self


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
    by PID, the folder removed unless asked to keep it. Subclasses start it and say what it is."""

    name: ClassVar[str]  # how errors name it: "the broker"
    start_error: ClassVar[type[RuntimeError]]
    workdir: Path | None
    process: subprocess.Popen[bytes] | None
    startup_timeout_s: float

    def start(self) -> str:
        """Start it and return its address once it answers."""
        raise NotImplementedError

    def log_tail(self, lines: int = 40) -> str:
        raise NotImplementedError

    def wait_ready(
        self,
        answers: Callable[[], bool],
        *,
        retry_on: tuple[type[BaseException], ...],
        unanswered: str,
        interval_s: float = 0.5,
    ) -> None:
        """Ready means `answers()` said so (a real request answered, not an open port). A process that
        exits, or one that has not answered within the start-up time, is a `start_error` with its log."""
        deadline = time.monotonic() + self.startup_timeout_s
        last = ""
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise self.start_error(
                    f"{self.name} exited with code {self.process.returncode}; log:\n{self.log_tail()}"
                )
            try:
                if answers():
                    return
            except retry_on as error:
                last = str(error)
            time.sleep(interval_s)
        raise self.start_error(
            f"{self.name} {unanswered} within {self.startup_timeout_s:g}s ({last}); log:\n{self.log_tail()}"
        )

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


def run_up(service: LocalProcess, state_file: Path, *, detach: bool, tool: str, down: str) -> int:
    """`up`: print the address of the running detached service, or start one. Detached, it outlives
    this process and its state file says how `down` finds it; else it runs until Ctrl-C."""
    if state := running(state_file):
        print(state["address"])
        print(f"{tool}: already running (pid {state['pid']})", file=sys.stderr)
        return 0
    address = service.start()
    assert service.process is not None and service.workdir is not None
    pid = service.process.pid
    state_file.write_text(json.dumps({"pid": pid, "address": address, "workdir": str(service.workdir)}))
    print(address, flush=True)
    if detach:
        print(f"{tool}: {service.name} is pid {pid} (logs in {service.workdir}); stop it with `{down}`",
              file=sys.stderr)  # fmt: skip
        return 0
    print(f"{tool}: running in the foreground, Ctrl-C stops it", file=sys.stderr)
    try:
        service.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        service.stop()
        state_file.unlink(missing_ok=True)
    return 0


def run_down(state_file: Path, *, tool: str, name: str) -> int:
    """`down`: stop the detached service by PID and remove its work folder."""
    state = stop_recorded(state_file)
    if state is None:
        print(f"{tool}: {name} is not running", file=sys.stderr)
        return 0
    if "workdir" in state:  # a state file written before the services had one has none
        shutil.rmtree(state["workdir"], ignore_errors=True)
    print(f"{tool}: stopped {name}, pid {state['pid']}", file=sys.stderr)
    return 0
