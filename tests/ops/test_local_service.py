"""What the local services share (ops/local_service.py): start-up fails with the service's own error and
its log, whether the process exits or never answers, and a detached service is found, reported and
stopped through its state file."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from needs import wait_gone

from local_service import LocalProcess, run_down, run_up


class ToyError(RuntimeError):
    pass


class Toy(LocalProcess):
    """A Python child that prints a line, then sleeps, or exits with a code. The start-up bound is
    long: only the test of a child that never answers waits it out."""

    name = "the toy"
    start_error = ToyError

    def __init__(self, code: str, *, answers: bool, startup_timeout_s: float = 120.0) -> None:
        self.code, self.answering = code, answers
        self.startup_timeout_s = startup_timeout_s
        self.workdir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        self.workdir = Path(tempfile.mkdtemp(prefix="cegraph-toy-"))
        with (self.workdir / "log").open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", self.code], stdout=log, start_new_session=True
            )
        while not self.log_tail() and self.process.poll() is None:  # its first line, however slow the start
            time.sleep(0.01)
        try:
            self.wait_ready(self._answers, retry_on=(OSError,), unanswered="did not answer", interval_s=0.05)
        except BaseException:
            self.stop(keep_logs=True)
            raise
        return "toy://here"

    def _answers(self) -> bool:
        if not self.answering:
            raise OSError("connection refused")
        return "up" in self.log_tail()

    def log_tail(self, lines: int = 40) -> str:
        assert self.workdir is not None
        return (self.workdir / "log").read_text()


def test_a_process_that_exits_is_the_services_error_with_its_log():
    toy = Toy("print('bad config: port', flush=True); raise SystemExit(3)", answers=True)
    with pytest.raises(ToyError, match=r"the toy exited with code 3; log:\nbad config: port"):
        toy.start()
    assert toy.process is None and toy.workdir is not None and toy.workdir.exists()  # the log is kept


def test_one_that_never_answers_names_the_last_error_and_stops_the_process():
    toy = Toy(
        "import time; print('listening', flush=True); time.sleep(60)", answers=False, startup_timeout_s=0.5
    )
    with pytest.raises(
        ToyError, match=r"the toy did not answer within 0.5s \(connection refused\); log:\nlistening"
    ):
        toy.start()
    assert toy.process is None


def test_up_detached_is_found_again_and_down_stops_it(tmp_path, capsys):
    state = tmp_path / "state.json"
    toy = Toy("import time; print('up', flush=True); time.sleep(600)", answers=True)
    try:
        assert run_up(toy, state, detach=True, tool="toy", down="make toy-down") == 0
        assert toy.process is not None
        pid, workdir = toy.process.pid, toy.workdir
        assert run_up(Toy("raise SystemExit(9)", answers=True), state, detach=True, tool="toy", down="-") == 0
        out, err = capsys.readouterr()
        assert out.splitlines() == ["toy://here", "toy://here"]  # the second `up` started nothing
        assert (
            f"the toy is pid {pid}" in err
            and "make toy-down" in err
            and f"already running (pid {pid})" in err
        )
        assert run_down(state, tool="toy", name="the toy") == 0
        assert wait_gone(pid) and not state.exists() and workdir is not None and not workdir.exists()
        assert run_down(state, tool="toy", name="the toy") == 0
        assert "the toy is not running" in capsys.readouterr().err
    finally:
        toy.stop()
