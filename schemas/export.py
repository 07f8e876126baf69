"""JSON Schemas of the Kafka message contracts, checked in beside their models for other languages'
producers and consumers. `python -m cegraph.schemas.export` rewrites them; a test keeps them equal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from cegraph.schemas.feedback import Feedback
from cegraph.schemas.patch import WorkflowPatch
from cegraph.schemas.rollout import RolloutDecision

CONTRACTS: dict[str, type[BaseModel]] = {
    "feedback": Feedback,
    "patch": WorkflowPatch,
    "rollout": RolloutDecision,
}


def schema_path(name: str) -> Path:
    return Path(__file__).with_name(f"{name}.schema.json")


def json_schema(name: str) -> dict[str, Any]:
    schema = CONTRACTS[name].model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": f"cegraph/{name}", **schema}


if __name__ == "__main__":
    for contract in CONTRACTS:
        schema_path(contract).write_text(json.dumps(json_schema(contract), indent=2) + "\n")
