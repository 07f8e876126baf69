"""The simulated LLM world of DESIGN section 7: task families with ground truth, real evaluators and
failure mechanisms that respond to the workflow's structure (docs/simulation.md)."""

from cegraph.daemon.sim.core import Rates, Task
from cegraph.daemon.sim.llm import SimLLM
from cegraph.daemon.sim.world import SimWorld, TaskEvaluator

__all__ = ["Rates", "SimLLM", "SimWorld", "Task", "TaskEvaluator"]
