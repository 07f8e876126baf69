"""`cegraph demo` end to end on the embedded default (`make demo`): the whole loop converges, as
issue #8 asks. Over a real broker: test_demo_kafka.py; a seed's run repeated: test_demo_repeats.py."""

from __future__ import annotations

import pytest
from demo_runs import check_the_loop_converged, run_demo

pytestmark = pytest.mark.long(minutes=3)


def test_the_demo_finds_and_patches_every_planted_mode_and_halves_the_failure_mass(tmp_path):
    out = tmp_path / "out"
    check_the_loop_converged(out, run_demo(out))
