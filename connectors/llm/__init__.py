"""LLM endpoints: the OpenAI-compatible backend and the settings that choose one."""
