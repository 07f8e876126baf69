"""`bench/results.json`: every benchmark merges its figures under its own key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def report(result: dict[str, Any], key: str, out: Path | None) -> None:
    print(json.dumps(result, indent=2))
    if out is not None:
        existing = json.loads(out.read_text()) if out.exists() else {}
        existing[key] = result
        out.write_text(json.dumps(existing, indent=2) + "\n")
