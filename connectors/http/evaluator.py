"""The HTTP evaluator: your own service judges an execution (`"kind": "http"` in a spec's evaluators).

One request per execution:

    POST <url>
    {"evaluator": "<name>", "workflow_id": "...", "workflow_version": "...", "trace_id": "...",
     "input": {...}, "output": "...", "reference": <the reference, or null>}

and the answer is `{"passed": true|false, "score": 0.0-1.0 (optional), "explanation": "..."}` (200,
JSON, nothing else). The answer is untrusted: a status other than 200, a body that is not exactly
that object, or a timeout is no verdict (with the reason), never a pass or a fail.
"""

from __future__ import annotations

from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cegraph.connectors.llm.loop_client import LoopClient
from cegraph.daemon.workflows.evaluators import HttpJudgeFactory
from cegraph.daemon.workflows.runtime import EvaluationResult, ExecutionResult
from cegraph.schemas.workflow import HttpEvaluator

MAX_EXPLANATION = 2_000


class HttpVerdict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    passed: bool
    score: float | None = Field(None, ge=0.0, le=1.0)
    explanation: str = Field("", max_length=MAX_EXPLANATION)


class HttpJudge:
    def __init__(self, spec: HttpEvaluator, client: LoopClient) -> None:
        self.spec = spec
        self.client = client

    async def judge(self, result: ExecutionResult, reference: Any) -> EvaluationResult:
        name, url = self.spec.name, self.spec.url
        body = {
            "evaluator": name,
            "workflow_id": result.workflow_id,
            "workflow_version": result.workflow_version,
            "trace_id": result.trace_id,
            "input": result.input,
            "output": result.output,
            "reference": reference,
        }
        try:
            response = await self.client.get().post(url, json=body)
        except httpx.HTTPError as error:
            return _no_verdict(name, "http_unreachable", f"{url}: {type(error).__name__}: {error}")
        if response.status_code != 200:
            return _no_verdict(name, "http_status", f"{url} answered {response.status_code}")
        try:
            verdict = HttpVerdict.model_validate_json(response.content)
        except ValidationError as error:
            problem = error.errors()[0]
            where = ".".join(map(str, problem["loc"])) or "body"
            return _no_verdict(
                name, "http_bad_verdict", f"{url} answered no verdict: {where}: {problem['msg']}"
            )
        return EvaluationResult(
            name=name,
            passed=verdict.passed,
            score=verdict.score if verdict.score is not None else float(verdict.passed),
            explanation=verdict.explanation,
        )


def _no_verdict(name: str, error_type: str, explanation: str) -> EvaluationResult:
    return EvaluationResult(name=name, passed=None, error_type=error_type, explanation=explanation[:500])


def http_judges(timeout_s: float) -> HttpJudgeFactory:
    """The factory of a process's HTTP evaluators; they share one client per event loop."""
    client = LoopClient(timeout=timeout_s)
    return lambda spec: HttpJudge(spec, client)
