"""llmproxy: a zero-buffer streaming reverse proxy for LLM inference servers."""

__version__ = "0.1.0"
