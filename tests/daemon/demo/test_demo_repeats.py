"""A seed's demo logs the same events in another process: nothing the daemon decides may follow the
order of a set of strings (PYTHONHASHSEED) or the machine's pace."""

from __future__ import annotations

import pytest
from demo_runs import events, run_demo

pytestmark = pytest.mark.long(minutes=3)

# Through the first mode's detection, refinement, patch and canary, and into the second phase
# (scenario.PHASES): every kind of decision the full run makes, at a third of its cost.
EXECUTIONS = "3000"


def test_a_seed_logs_the_same_events_in_another_process_whatever_its_string_hashes(tmp_path):
    first, again = tmp_path / "first", tmp_path / "again"
    run_demo(first, "--max-executions", EXECUTIONS, hash_seed="1")
    run_demo(again, "--max-executions", EXECUTIONS, hash_seed="2")
    logged, relogged = events(first), events(again)
    assert {"ModeMassCrossed", "PatchPublished", "CanaryDecided"} <= {event["type"] for event in logged}
    assert len(logged) == len(relogged)
    for one, other in zip(logged, relogged, strict=True):
        assert one == other
