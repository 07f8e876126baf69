"""`make demo-kafka`: the demo's loop converges over a real Kafka broker, with `cegraph run` and
`cegraph simulate` as processes (a file of its own, so a test worker runs it beside the others)."""

from __future__ import annotations

import pytest
from demo_runs import check_the_loop_converged, run_demo

pytestmark = pytest.mark.long(minutes=8)


def test_the_demo_over_kafka_ends_the_same_way(kafka_bootstrap, tmp_path):
    out = tmp_path / "demo-kafka"
    check_the_loop_converged(out, run_demo(out, "--kafka", kafka_bootstrap), promoted=False)
    assert (out / "daemon.log").exists() and (out / "traffic.log").exists()
