"""What a test does when a real thing it needs (a broker, a model server, a data set) is missing:
under `CI=true` it fails, elsewhere it is skipped with the reason."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import NoReturn

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def unavailable(what: str, reason: str) -> NoReturn:
    if IN_CI:
        pytest.fail(f"no {what} under CI=true: {reason}", pytrace=False)
    pytest.skip(f"no {what}: {reason}")


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie (read from /proc, not from the code under test)."""
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "\nState:\tZ" not in status.read_text()


def wait_gone(pid: int, timeout: float = 60.0) -> bool:
    """Whether the process is gone within `timeout` (a bound on a wait for a condition, not a pace)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.2)
    return False
