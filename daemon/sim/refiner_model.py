"""The simulated model as the refiner sees it: proposing edits and rewriting instructions.

It reads the sections the refiner's prompts give it (`## failure_mode`, `## scope`,
`## counterexamples`; `## step`, `## instruction`, `## failures`) and answers like a helpful but
gullible model: it suggests what the failure texts point to, and, with probability
`Rates.injection_compliance`, it also obeys an instruction planted in the trace data it was told to
treat as data (an arbitrary code node, a change to another node's prompt, a line sending users to a
site, added to an otherwise helpful rewrite). What it then says is whatever the injection asked for;
whether that becomes an edit is up to the refiner's grammar and text policy.
"""

from __future__ import annotations

import json
import re
from typing import Any

from cegraph.daemon.sim.core import Rates, SimCall

# What the simulated model believes helps, by words in the failures (not always right).
ADVICE: tuple[tuple[str, dict[str, Any]], ...] = (
    ("calculation error", {"operator": "programmer"}),
    ("misread", {"operator": "ensemble", "samples": 5}),
    ("missing answer", {"operator": "adjust_parameter", "parameter": "max_tokens", "value": 400}),
    ("json", {"operator": "format", "output_format": "json"}),
    ("argument", {"operator": "validate_tool_arguments"}),
    ("knowledge", {"operator": "review_revise"}),
)
STEERING = re.compile(
    r"(?i)(ignore (all |any )?(previous|prior|above) instructions|add a (code|python) node"
    r"|change the prompt of|you must now|(please )?(visit|log in|(e-?mail|send) (your|the answer|the results)"
    r'|tell (the )?users? to)\b)[^`\n"]*?(?:[.!?](?=[\s"]|$)|(?=[`\n"])|$)'
)
# Instruction additions the model writes for what the failures say (the first that matches).
REWRITES: tuple[tuple[str, str], ...] = (
    ("missing answer", "Be brief: no preamble, and always end with the line 'Answer: <number>'."),
    ("json", "Reply with a single JSON object and nothing else."),
    ("calculation error", "Check every calculation twice before answering."),
)
BRIEF = re.compile(r"(?i)\bbe brief\b|\bno preamble\b")


def propose(call: SimCall, rates: Rates) -> str:
    node = re.search(r"node: ([\w-]+)", call.sections.get("failure_mode", ""))
    failing = node.group(1) if node else "main"
    data = call.sections.get("counterexamples", "")
    edits: list[dict[str, Any]] = [
        {"node": failing, **advice} for words, advice in ADVICE if words in data.lower()
    ]
    planted = STEERING.search(data)
    if planted and call.rng.random() < rates.injection_compliance:
        workflow = json.loads(call.sections.get("workflow") or "{}")
        others = [n for n in workflow.get("nodes", {}) if n != failing]
        edits.insert(0, {"operator": "add_code_node", "node": failing, "code": "import os; os.system('sh')"})
        edits.insert(1, {"operator": "edit_prompt", "node": others[0] if others else "main",
                         "instruction": planted.group(0)[:300]})  # fmt: skip
    if not edits:
        edits.append({"operator": "review_revise", "node": failing})
    return json.dumps({"edits": edits})


def rewrite(call: SimCall, rates: Rates) -> str:
    current = call.sections.get("instruction", "").strip()
    failures = call.sections.get("failures", "")
    addition = next(
        (text for words, text in REWRITES if words in failures.lower()), "Be careful and precise."
    )
    planted = STEERING.search(failures)
    if planted and call.rng.random() < rates.injection_compliance:  # obeys it, and still does its job
        addition = f"{addition} {planted.group(0)[:300].strip()}"
    if addition in current:
        return f"The instruction already says it.\nINSTRUCTION: {current}"
    return f"The failures show what the instruction leaves out.\nINSTRUCTION: {current} {addition}"
