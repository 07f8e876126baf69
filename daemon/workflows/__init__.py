"""Workflow specs at work: the runtime, its LLM protocol, tools, sandbox, evaluators, registry."""
