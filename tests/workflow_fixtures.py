"""Workflow specs shared by the runtime and ingest tests."""

# retrieve -> answer -> review -> revise: four node spans per execution, all children of the root.
QA_REVIEWED = {
    "id": "qa-reviewed",
    "version": "1.2.0",
    "model": "sim-1",
    "input_schema": {"question": {"type": "string"}},
    "entry": "search",
    "output": "revise",
    "nodes": {
        "search": {"kind": "retrieve", "retriever": "kb_search", "inputs": {"query": "input.question"}},
        "answer": {"kind": "llm", "inputs": {"question": "input.question", "context": "search"}},
        "review": {"kind": "review", "inputs": {"question": "input.question", "answer": "answer"}},
        "revise": {
            "kind": "revise",
            "inputs": {"question": "input.question", "answer": "answer", "review": "review"},
        },
    },
    "edges": [
        {"source": "search", "target": "answer"},
        {"source": "answer", "target": "review"},
        {"source": "review", "target": "revise"},
    ],
}
