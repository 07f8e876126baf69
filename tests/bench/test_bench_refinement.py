"""The refinement benchmark repeats itself: the same arguments give the same numbers, in another
process with another hash seed (River, set and dict order, derived trace ids, the replay draws)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.long(minutes=1.5)

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--scenarios", "noisy judge", "--seeds", "1", "--jobs", "1", "--budgets", "500,3000",
         "--recorded", "800", "--validation", "30", "--test", "60"]  # fmt: skip


def _without_wall_time(value):
    if isinstance(value, dict):
        return {k: _without_wall_time(v) for k, v in value.items() if k != "wall_s"}
    if isinstance(value, list):
        return [_without_wall_time(v) for v in value]
    return value


def _run(out: Path, hash_seed: str) -> dict:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_refinement.py"), *SMALL, "--out", str(out)],
        check=True, env=env, cwd=ROOT, capture_output=True,
    )  # fmt: skip
    return json.loads(out.read_text())["refinement"]


def test_the_same_seed_gives_the_same_curves_twice(tmp_path):
    first, second = _run(tmp_path / "a.json", "1"), _run(tmp_path / "b.json", "2")
    methods = first["per_seed"]["noisy judge"]["0"]["methods"]
    assert methods["cegraph"]["adopted_at"], "cegraph patched nothing: the comparison would say little"
    assert any(m["adopted_at"] for name, m in methods.items() if name != "cegraph")
    assert _without_wall_time(first) == _without_wall_time(second)
