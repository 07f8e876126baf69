"""Refinement jobs and their ends as messages of the jobs and job-results topics.

A job message carries everything the job reads (`JobInputs`: the base spec, the replay sample, the
recorded failures and counterexamples, the registered versions) and the frozen modes of its workflow
(`FailureDetector.frozen`), so a refine worker needs no store of its own. Arrays travel as their raw
bytes, so the worker's classifier is the detector's to the bit. An end message carries the job's
steps on the way and its end, the patch unsigned: only the process that holds the log signs.
Both are JSON, zlib-compressed (a job's frozen modes are most of its size).
"""

from __future__ import annotations

import base64
import zlib
from dataclasses import asdict
from typing import Any

import numpy as np
import orjson

from cegraph.daemon.events import Event
from cegraph.daemon.refine.jobs import EndedJob
from cegraph.daemon.refine.proposers import Counterexample, Facts
from cegraph.daemon.refine.refiner import Job, JobEnd, JobInputs
from cegraph.daemon.refine.replay import ReplayItem, ReplaySample
from cegraph.schemas.patch import WorkflowPatch
from cegraph.schemas.workflow import parse_spec

_ARRAY = "__ndarray__"


class JobMessageError(ValueError):
    """A message of the jobs or job-results topic that cannot be read."""


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        data = base64.b64encode(np.ascontiguousarray(value).tobytes()).decode()
        return {_ARRAY: value.dtype.str, "shape": list(value.shape), "data": data}
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _arrays(value: Any) -> Any:
    if isinstance(value, dict):
        if _ARRAY in value:
            flat = np.frombuffer(base64.b64decode(value["data"]), dtype=np.dtype(value[_ARRAY]))
            return flat.reshape(value["shape"]).copy()
        return {key: _arrays(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_arrays(item) for item in value]
    return value


def _pack(data: dict[str, Any]) -> bytes:
    return zlib.compress(orjson.dumps(data))


def _unpack(message: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(zlib.decompress(message))
    except (zlib.error, orjson.JSONDecodeError) as error:
        raise JobMessageError(f"not a cegraph job message: {error}") from None
    if not isinstance(data, dict):
        raise JobMessageError("not a cegraph job message: not an object")
    return data


def job_message(job: Job, inputs: JobInputs, frozen: dict[str, Any]) -> bytes:
    return _pack({
        "job": asdict(job),
        "inputs": {
            "base": inputs.base.canonical() if inputs.base is not None else None,
            "sample": _sample(inputs.sample),
            "fresh": _sample(inputs.fresh),
            "target": inputs.target,
            "failures": inputs.failures,
            "counterexamples": [asdict(example) for example in inputs.counterexamples],
            "versions": inputs.versions,
            "missing": inputs.missing,
            "cost_so_far": inputs.cost_so_far,
        },
        "modes": _plain(frozen),  # only here: arrays are never read back out of traced text
    })  # fmt: skip


def _sample(sample: ReplaySample) -> dict[str, Any]:
    return {
        "items": [asdict(item) for item in sample.items],
        "population": sample.population,
        "unreplayable": sample.unreplayable,
    }


def _read_sample(raw: dict[str, Any]) -> ReplaySample:
    return ReplaySample([ReplayItem(**item) for item in raw["items"]], raw["population"], raw["unreplayable"])


def read_job(message: bytes) -> tuple[Job, JobInputs, dict[str, Any]]:
    data = _unpack(message)
    try:
        raw = data["inputs"]
        inputs = JobInputs(
            base=parse_spec(raw["base"]) if raw["base"] is not None else None,
            sample=_read_sample(raw["sample"]),
            fresh=_read_sample(raw["fresh"]),
            target=raw["target"],
            failures=[(trace, node) for trace, node in raw["failures"]],
            counterexamples=[
                Counterexample(**(example | {"facts": Facts(**example["facts"])}))
                for example in raw["counterexamples"]
            ],
            versions=raw["versions"],
            missing=raw["missing"],
            cost_so_far=float(raw.get("cost_so_far", 1.0)),  # absent in messages of earlier versions
        )
        return Job.of(data["job"]), inputs, _arrays(data["modes"])
    except (KeyError, TypeError, ValueError) as error:
        raise JobMessageError(f"malformed job message: {type(error).__name__}: {error}") from None


def unreadable_job(message: bytes) -> Job | None:
    """The job of a message `read_job` refused, when at least that can be read: it is answered with
    a failed end rather than left to wait for ever."""
    try:
        return Job.of(_unpack(message)["job"])
    except (JobMessageError, KeyError, TypeError):
        return None


def end_message(job_id: str, steps: list[Event], end: JobEnd) -> bytes:
    return _pack({
        "job_id": job_id,
        "steps": [{"type": e.type, "key": e.key, "payload": e.payload} for e in steps],
        "finished": end.finished,
        "patch": end.patch.model_dump(mode="json", by_alias=True) if end.patch is not None else None,
        "spec": end.spec.canonical() if end.spec is not None else None,
    })  # fmt: skip


def read_end(message: bytes) -> EndedJob:
    data = _unpack(message)
    try:
        patch = WorkflowPatch.model_validate(data["patch"]) if data["patch"] is not None else None
        spec = parse_spec(data["spec"]) if data["spec"] is not None else None
        steps = [Event(step["type"], step["key"], step["payload"]) for step in data["steps"]]
        return EndedJob(data["job_id"], steps, JobEnd(data["finished"], patch, spec))
    except (KeyError, TypeError, ValueError) as error:
        raise JobMessageError(f"malformed job end message: {type(error).__name__}: {error}") from None
