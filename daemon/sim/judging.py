"""How the simulated world's judge speaks: in the families' own words, in paraphrase, or with a bare
pass/fail; and how reliable it is (a share of verdicts flipped).

The families explain a failed verdict with a label and details ("calculation error in step 2: ...",
"format violation: ...", "hallucination: ..."). Those labels are words a keyword rule can map to an
operator, which makes a benchmark on them easy for keyword rules. `paraphrased` says what went wrong
in one of several phrasings per label, none of which names a mechanism or an operator; `labels`
says only whether the output passed. A flipped verdict is drawn per (input, seed, output): the same
execution is judged the same way every time, and a changed output is judged afresh.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from cegraph.daemon.sim.core import unit

Critiques = Literal["worded", "paraphrased", "labels"]

# What a failed verdict's label becomes, in several phrasings; none names the mechanism's usual
# words (tests/daemon/sim/test_simllm.py checks them against the rule proposer's and the refiner
# model's words).
PARAPHRASES: dict[str, tuple[str, ...]] = {
    "calculation error": (
        "one of the intermediate steps comes out different from what the operands give",
        "the running total drifts away somewhere in the middle",
        "a step combines its two numbers into the wrong figure",
        "the worked steps do not hold up when redone by hand",
    ),
    "misread number": (
        "a quantity used in the working is not one the problem states",
        "the working starts from a figure the problem never mentions",
        "one of the inputs to the working was copied down differently",
    ),
    "wrong result": (
        "the final figure is off",
        "the reply lands on a different total",
        "the end value disagrees with the reference",
    ),
    "missing answer": (
        "the reply stops before it gets to a conclusion",
        "there is no final line stating the result",
        "the reply trails off without committing to a value",
    ),
    "format violation": (
        "the reply is not laid out the way the consumer expects",
        "the downstream reader could not take the reply as given",
        "the structure of the reply is off",
    ),
    "wrong field": (
        "some of the extracted values disagree with the message",
        "a detail pulled from the message is not what it says",
        "the order details do not all match the e-mail",
    ),
    "hallucination": (
        "the reply names something that does not exist",
        "the named item is made up",
        "nothing by that name is on record",
    ),
    "wrong entity": (
        "the reply names a real item, but not the one asked about",
        "the chain of facts ends at the wrong item",
        "a real name, the wrong one",
    ),
    "no output": (
        "the run ended without a reply",
        "nothing came back",
    ),
}
GENERIC = (
    "the reply does not look right",
    "the reviewer is not satisfied with this reply",
    "this reply was marked as failing",
)
PASSED = "looks right"


@dataclass(frozen=True)
class Judging:
    """`critiques`: how failed verdicts are explained; `flip`: the share of verdicts turned over."""

    critiques: Critiques = "worded"
    flip: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.flip < 0.5:
            raise ValueError(
                f"a judge that flips {self.flip} of its verdicts says nothing: keep it below 0.5"
            )

    def verdict(
        self, passed: bool, explanation: str, task_input: dict, seed: int, output: str | None
    ) -> tuple[bool, str]:
        """The verdict and explanation the judge gives for the family's (`passed`, `explanation`)."""
        draw = (json.dumps(task_input, sort_keys=True), seed, output)
        flipped = self.flip > 0 and unit("flip", *draw) < self.flip
        if flipped:
            passed, explanation = not passed, _pick(GENERIC, draw)
        if passed:
            return True, PASSED if flipped else explanation
        if self.critiques == "labels":
            return False, "failed"
        if self.critiques == "worded" or flipped:
            return False, explanation
        label = explanation.split(":", 1)[0].strip()
        known = next((key for key in PARAPHRASES if label.startswith(key)), None)
        return False, _pick(PARAPHRASES[known] if known else GENERIC, draw)


def _pick(options: tuple[str, ...], draw: tuple) -> str:
    return options[int(unit("phrase", *draw) * len(options))]
