"""TRAIL's error taxonomy (Patronus AI, arXiv 2505.08638, figure 2): its 20 leaves, and the spellings of
them the gold annotations use.

Scoring only: categories never reach the daemon (`labels.py` keeps them apart from the feedback).
"""

from __future__ import annotations

# The 20 leaves of the TRAIL taxonomy (paper, figure 2), each with its top-level class and parent.
TAXONOMY: dict[str, tuple[str, str]] = {
    "Language-only": ("Reasoning Errors", "Hallucinations"),
    "Tool-related": ("Reasoning Errors", "Hallucinations"),
    "Poor Information Retrieval": ("Reasoning Errors", "Information Processing"),
    "Tool Output Misinterpretation": ("Reasoning Errors", "Information Processing"),
    "Incorrect Problem Identification": ("Reasoning Errors", "Decision Making"),
    "Tool Selection Errors": ("Reasoning Errors", "Decision Making"),
    "Formatting Errors": ("Reasoning Errors", "Output Generation"),
    "Instruction Non-compliance": ("Reasoning Errors", "Output Generation"),
    "Tool Definition Issues": ("System Execution Errors", "Configuration"),
    "Environment Setup Errors": ("System Execution Errors", "Configuration"),
    "Rate Limiting": ("System Execution Errors", "API Issues"),
    "Authentication Errors": ("System Execution Errors", "API Issues"),
    "Service Errors": ("System Execution Errors", "API Issues"),
    "Resource Not Found": ("System Execution Errors", "API Issues"),
    "Resource Exhaustion": ("System Execution Errors", "Resource Management"),
    "Timeout Issues": ("System Execution Errors", "Resource Management"),
    "Context Handling Failures": ("Planning and Coordination Errors", "Context Management"),
    "Resource Abuse": ("Planning and Coordination Errors", "Context Management"),
    "Goal Deviation": ("Planning and Coordination Errors", "Task Management"),
    "Task Orchestration": ("Planning and Coordination Errors", "Task Management"),
}
LEAF_CATEGORIES: tuple[str, ...] = tuple(TAXONOMY)

# Spelling variants found in the gold files. Case and surrounding or repeated whitespace are folded
# before lookup, so "Goal deviation" and " Incorrect Problem Identification" need no entry.
CATEGORY_VARIANTS: dict[str, str] = {
    "Context Handling Failure": "Context Handling Failures",
    "Task Orchestration Errors": "Task Orchestration",
    "Tool Selection": "Tool Selection Errors",
}


def _category_key(name: str) -> str:
    return " ".join(name.split()).casefold()


_CATEGORY_LOOKUP = {
    _category_key(name): leaf
    for name, leaf in [*((leaf, leaf) for leaf in TAXONOMY), *CATEGORY_VARIANTS.items()]
}


def fold_category(name: str) -> str | None:
    """The taxonomy leaf a gold category string means, or None when it is not a known spelling."""
    return _CATEGORY_LOOKUP.get(_category_key(name))
