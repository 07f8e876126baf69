"""`cegraph run` as a child process (daemon/demo/process.py, the demo's and the tests'): no daemon or
traffic process outlives the process that started it, not even one paused with SIGSTOP."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import uuid

from needs import alive, wait_gone


def _owner(script: str, *args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-c", textwrap.dedent(script), *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def test_a_paused_child_dies_with_its_killed_parent():
    """What the demo's traffic is while a refinement job runs: SIGSTOPped. A stopped process keeps a
    SIGTERM pending, so only a SIGKILL on the parent's death ends it."""
    owner = _owner(
        """
        import subprocess, time
        from cegraph.daemon.demo.process import die_with_parent
        child = subprocess.Popen(["sleep", "300"], preexec_fn=die_with_parent)
        print(child.pid, flush=True)
        time.sleep(300)
        """
    )
    try:
        child = int(owner.stdout.readline())
        assert alive(child)
        subprocess.run(["kill", "-STOP", str(child)], check=True)
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=10)
        assert wait_gone(child), f"paused child {child} outlived its killed parent"
    finally:
        owner.kill()


def test_the_daemon_dies_with_the_process_that_started_it(kafka_bootstrap, tmp_path):
    suffix = uuid.uuid4().hex[:8]
    owner = _owner(
        """
        import sys, time
        from pathlib import Path
        from cegraph.daemon.demo.process import DaemonProcess
        bootstrap, folder, suffix = sys.argv[1:]
        daemon = DaemonProcess(
            {
                "CEGRAPH_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
                "CEGRAPH_KAFKA__SPANS_TOPIC": f"spans-{suffix}",
                "CEGRAPH_KAFKA__GROUP_ID": f"group-{suffix}",
                "CEGRAPH_STORE__PATH": f"{folder}/cegraph.duckdb",
            },
            Path(folder) / "daemon.log",
        )
        daemon.start()
        print(daemon.process.pid, flush=True)
        time.sleep(300)
        """,
        kafka_bootstrap,
        str(tmp_path),
        suffix,
    )
    try:
        line = owner.stdout.readline()
        assert line, f"the owner ended before its daemon was ready:\n{(tmp_path / 'daemon.log').read_text()}"
        daemon = int(line)
        assert alive(daemon)
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=10)
        assert wait_gone(daemon), f"cegraph run {daemon} outlived the process that started it"
    finally:
        owner.kill()
