"""A really full disk under `cegraph run`, against the real broker: nothing lost, nothing doubled.

The store lives on a small tmpfs of its own (mounting needs root, as on the CI machines; elsewhere
the test is skipped, and under CI=true it fails). A ballast file fills the disk while the daemon
ingests; `/readyz` must turn 503 and the failure be counted; once the ballast is gone ingest resumes
by itself, and after a restart the store holds every produced execution exactly once, with no seq
shared by two events.
"""

from __future__ import annotations

import os
import subprocess
import time

import httpx
import pytest
from conftest import IN_CI
from daemon_proc import Scenario, assert_stored_exactly_once
from otel_traces import make_traces, to_messages

from cegraph.daemon.store import EventStore

pytestmark = pytest.mark.kafka


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if result.returncode != 0:
        reason = f"cannot mount a tmpfs (needs root): {result.stderr.strip()}"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk, keep_bytes: int) -> None:
    stat = os.statvfs(disk)
    free = stat.f_bavail * stat.f_frsize
    with open(disk / "ballast", "wb") as ballast:
        chunk = b"\0" * (1 << 20)
        remaining = max(0, free - keep_bytes)
        while remaining > 0:
            remaining -= ballast.write(chunk[:remaining])


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name)]
    return sum(values)


def wait_until(condition, what: str, *, polls: int = 600, interval: float = 0.5) -> None:
    for _ in range(polls):
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"never happened: {what}")


def readyz(url: str) -> int:
    try:
        return httpx.get(f"{url}/readyz", timeout=10).status_code
    except httpx.TransportError:
        return 0


def test_a_full_disk_mid_ingest_loses_nothing_and_doubles_no_seq(kafka_bootstrap, tmp_path, small_disk):
    traces = make_traces(3_000, seed=61)
    messages = to_messages(traces, one_trace_per_message=False, spans_per_message=6, seed=2)
    backoff = {"CEGRAPH_INGEST__RECOVERY_INITIAL_S": "0.2", "CEGRAPH_INGEST__RECOVERY_MAX_S": "1"}
    scenario = Scenario(kafka_bootstrap, tmp_path, **backoff)
    scenario.store_path = small_disk / "cegraph.duckdb"
    scenario.daemon.env["CEGRAPH_STORE__PATH"] = str(scenario.store_path)
    daemon = scenario.daemon
    daemon.start()
    try:
        scenario.produce(messages[:100])
        daemon.wait_for(lambda s: s["executions"]["total"] > 0)
        fill(small_disk, keep_bytes=256 << 10)
        scenario.produce(messages[100:])
        wait_until(lambda: readyz(daemon.url) == 503, "/readyz 503 while the disk is full")
        assert daemon.alive()
        assert metric(daemon.url, "cegraph_ingest_store_failures_total") >= 1
        (small_disk / "ballast").unlink()
        wait_until(lambda: readyz(daemon.url) == 200, "/readyz 200 once the disk has room again")
        assert metric(daemon.url, 'cegraph_ingest_recoveries_total{result="succeeded"}') >= 1
        daemon.wait_for(lambda s: scenario.all_consumed(s) and s["executions"]["total"] >= len(traces))
    finally:
        daemon.stop()
    daemon.start()  # and once more from the file alone
    try:
        stats = daemon.wait_for(scenario.all_consumed)
    finally:
        daemon.stop()

    assert stats["executions"]["total"] == len(traces)
    assert_stored_exactly_once(scenario.store_path, traces)
    store = EventStore(scenario.store_path, read_only=True)
    try:
        assert store.query("SELECT seq FROM events GROUP BY seq HAVING count(*) > 1") == []
    finally:
        store.close()
