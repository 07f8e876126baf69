"""The LLM a process talks to, and how its executions are judged, from `CEGRAPH_LLM__*` and
`CEGRAPH_EVALUATION__*`: one place, so the daemon, `cegraph simulate` and the benchmarks point at a
real endpoint (OpenAI, vLLM, Ollama, a llama.cpp server) by configuration alone.

The simulated world is imported only when the settings ask for it (the sim backend, or the task
families' ground truth as references).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cegraph.connectors.http.evaluator import http_judges
from cegraph.connectors.llm.openai import OpenAIChatBackend
from cegraph.connectors.shadow.runtime import EvaluatorFor, reference_evaluator_for, sim_evaluator_for
from cegraph.daemon.settings import Settings
from cegraph.daemon.workflows.evaluators import Evaluation
from cegraph.daemon.workflows.llm import LLMBackend
from cegraph.daemon.workflows.tools import Retriever, Tool

if TYPE_CHECKING:
    from cegraph.daemon.sim import SimWorld


def openai_backend(settings: Settings) -> OpenAIChatBackend:
    llm = settings.llm
    key = llm.api_key.get_secret_value() if llm.api_key else None
    return OpenAIChatBackend(
        llm.base_url, api_key=key, timeout_s=llm.timeout_s, model=llm.model, max_tokens=llm.max_tokens
    )


def evaluation(settings: Settings, llm: LLMBackend) -> Evaluation:
    """The spec evaluators' runner: LLM judges on `llm`, HTTP evaluators with the configured timeout."""
    return Evaluation(llm=llm, http=http_judges(settings.evaluation.http_timeout_s))


def task_families(settings: Settings) -> SimWorld | None:
    """The simulated task families, when a real endpoint answers them (`references` has task_families)."""
    if "task_families" not in settings.evaluation.references:
        return None
    from cegraph.daemon.sim import SimWorld

    return SimWorld(settings.llm.sim_seed)


def shadow_llm(settings: Settings) -> tuple[LLMBackend, dict[str, Tool | Retriever], EvaluatorFor]:
    """The LLM of shadow runs and proposers, the tools shadow runs may call, and how a replayed input
    is judged: by the simulated world itself (sim), or by the spec's evaluators against the input's
    reference (openai)."""
    if settings.llm.backend == "sim":
        from cegraph.daemon.sim import SimWorld

        world = SimWorld(settings.llm.sim_seed)
        return world.llm(), world.tools(), sim_evaluator_for(world)
    llm = openai_backend(settings)
    world = task_families(settings)
    return (
        llm,
        world.tools() if world else {},
        reference_evaluator_for(
            evaluation(settings, llm),
            world.reference_for if world else None,
            feedback="feedback" in settings.evaluation.references,
        ),
    )
