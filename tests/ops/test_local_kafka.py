"""The local broker harness leaves no JVM behind: not when its owner is killed, not on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import shared_services
from needs import alive, unavailable, wait_gone

from local_kafka import random_cluster_id

ROOT = Path(__file__).resolve().parents[2]


def _java_available() -> None:
    import shutil

    if shutil.which("java") is None or shutil.which("mvn") is None:
        unavailable("local Kafka broker", "java and mvn are needed")


def test_cluster_id_is_kafka_uuid_text():
    ids = [random_cluster_id() for _ in range(2_000)]  # about 1 in 64 would start with "-" unfiltered
    assert all(len(cluster_id) == 22 and "=" not in cluster_id for cluster_id in ids)
    assert not any(cluster_id.startswith("-") for cluster_id in ids)


def test_broker_dies_when_its_owner_is_killed(tmp_path):
    _java_available()
    script = textwrap.dedent(
        """
        import sys, time
        sys.path.insert(0, sys.argv[1])
        from local_kafka import LocalKafka
        broker = LocalKafka()
        broker.start()
        print(broker.process.pid, flush=True)
        time.sleep(300)
        """
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script, str(ROOT / "ops" / "kafka")], stdout=subprocess.PIPE, text=True
    )
    try:
        java_pid = int(owner.stdout.readline())
        assert alive(java_pid)
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=10)
        assert wait_gone(java_pid), f"broker {java_pid} outlived its killed owner"
    finally:
        owner.kill()


def test_interrupted_test_run_stops_its_broker(tmp_path):
    _java_available()
    (tmp_path / "test_sleeps.py").write_text(
        "import time\n\n\ndef test_sleeps(kafka_bootstrap):\n"
        "    print('READY', flush=True)\n    time.sleep(300)\n"
    )
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    outer = {"KAFKA_BOOTSTRAP_SERVERS", shared_services.ENVIRONMENT}  # the inner run starts its own
    env = {k: v for k, v in os.environ.items() if k not in outer}
    paths = ("ops/kafka", "ops/llm", "tests/fixtures")
    env["PYTHONPATH"] = os.pathsep.join(str(ROOT / part) for part in paths)
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-s", "-p", "no:cacheprovider", str(tmp_path / "test_sleeps.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
        # Ctrl-C's signal as a terminal delivers it: a run started in the background (`make test &`)
        # inherits SIGINT ignored, and Python then raises no KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        for line in run.stdout:
            if "READY" in line:
                break
        children = subprocess.run(["pgrep", "-P", str(run.pid), "java"], capture_output=True, text=True)
        java_pids = [int(pid) for pid in children.stdout.split()]
        assert java_pids, "the inner run did not start a broker"
        run.send_signal(signal.SIGINT)
        try:  # read what it prints while it stops: a full pipe would hold it
            rest, _ = run.communicate(timeout=300)
        except subprocess.TimeoutExpired as expired:
            raise AssertionError(f"the interrupted run did not end; it printed:\n{expired.output}") from None
        assert run.returncode != 0, rest
        assert all(wait_gone(pid) for pid in java_pids)
    finally:
        run.kill()
