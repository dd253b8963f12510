"""Estimates for a request whose response reported no usage (cut off, failed, or a backend that does not say)."""

from __future__ import annotations

import math
from typing import Any

CHARS_PER_TOKEN = 4


def estimate_prompt_tokens(body: Any) -> int:
    """Estimate prompt tokens from a request body (OpenAI, TGI or Ollama shape) at 4 characters a token."""
    if not isinstance(body, dict):
        return 0
    chars = 0
    pending = [body.get(key) for key in ("messages", "prompt", "input", "inputs", "system", "suffix")]
    while pending:  # iterative: a hostile body may nest a million levels deep
        value = pending.pop()
        if isinstance(value, str):
            chars += len(value)
        elif isinstance(value, list):
            pending.extend(value)
        elif isinstance(value, dict):
            # A chat message or a content part: count what the model reads, not the JSON around it.
            pending.extend(value.get(key) for key in ("content", "text", "input_text"))
    return math.ceil(chars / CHARS_PER_TOKEN)
