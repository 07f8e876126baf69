"""Modes and stats end to end: traces through the real broker into the daemon, then `cegraph modes`
and `cegraph stats` through the daemon's API while it runs and from the DuckDB file after it
stopped, and the ingest and mass metrics on /metrics."""

from __future__ import annotations

import json
import os
import subprocess

import httpx
from daemon_proc import Scenario
from otel_traces import make_traces, to_messages

from cegraph.daemon.demo.process import CEGRAPH


def cli_json(command: str, env: dict[str, str]):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CEGRAPH_")}
    result = subprocess.run(
        [CEGRAPH, command, "--json"], env=clean | env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_modes_from_the_daemon_and_from_the_file(kafka_bootstrap, tmp_path):
    traces = make_traces(1_500, seed=17)
    scenario = Scenario(kafka_bootstrap, tmp_path)
    scenario.produce(to_messages(traces, seed=1))
    scenario.daemon.start()
    try:
        scenario.daemon.wait_for(lambda s: s["executions"]["total"] >= len(traces))
        live = cli_json("modes", scenario.daemon.env)
        live_stats = cli_json("stats", scenario.daemon.env)
        metrics = httpx.get(f"{scenario.daemon.url}/metrics", timeout=10).text
    finally:
        scenario.daemon.stop()
    assert live, "no modes found"
    assert all(row["workflow_id"] == "support-bot" and row["support"] > 0 for row in live)
    assert 'cegraph_failure_mass{mode="' in metrics and "cegraph_expected_failure_mass" in metrics
    assert "cegraph_ingest_spans_total" in metrics and "cegraph_store_commit_seconds_bucket" in metrics
    file_only = {"CEGRAPH_STORE__PATH": scenario.daemon.env["CEGRAPH_STORE__PATH"], "CEGRAPH_HTTP__PORT": "1"}
    offline = cli_json("modes", file_only)
    assert [(r["mode"], r["mass"]) for r in offline] == [(r["mode"], r["mass"]) for r in live]
    offline_stats = cli_json("stats", file_only)
    expected = {"complete": 1_500, "incomplete": 0, "total": 1_500}
    assert offline_stats["executions"] == live_stats["executions"] == expected
    assert offline_stats["spans"] == live_stats["spans"] == sum(t.span_count for t in traces)
