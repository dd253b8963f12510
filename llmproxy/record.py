"""The usage record: built once when a request ends, from what the meter read or, failing that, an estimate.

Exactly one record per POST request that was sent to a backend, whatever the ending (completed, client gone,
backend died, timed out). When the stream carried no usage (client disconnected before the usage event,
backend error, a backend that does not report it, an overlong line) the record is estimated: completion
tokens from the number of content events relayed, prompt tokens from the request text at 4 characters a
token, and it says `"usage_source": "estimated"`.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from llmproxy.accesslog import rfc3339

if TYPE_CHECKING:
    from llmproxy.config.model import PriceConfig
    from llmproxy.context import RequestContext

CHARS_PER_TOKEN = 4


def cost_usd(price: PriceConfig, prompt: int, completion: int, cached: int | None) -> float:
    """Return the cost of one request; cached prompt tokens at their own price when one is configured."""
    cached = min(cached or 0, prompt) if price.cached_input_per_million is not None else 0
    usd = (prompt - cached) * price.input_per_million + completion * price.output_per_million
    if cached:
        usd += cached * price.cached_input_per_million
    return round(usd / 1_000_000, 10)


def build_record(ctx: RequestContext, duration: float, ttft: float | None,
                 prices: dict[str, PriceConfig]) -> dict[str, Any]:
    """Return the usage record for a finished request."""
    usage = ctx.usage
    if usage is not None:
        prompt, completion, cached, source = usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, \
            "reported"
    else:
        prompt, completion, cached, source = estimate_prompt_tokens(ctx.body_data), ctx.content_events, None, \
            "estimated"
    record: dict[str, Any] = {
        "request_id": ctx.request_id,
        "client_request_id": ctx.client_request_id,
        "user_id": ctx.user_id,
        "key_id": ctx.key_id,
        "model": ctx.model,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "is_stream": ctx.is_stream,
        "timestamp": rfc3339(time.time() - duration),
        "backend": ctx.backend,
        "endpoint": ctx.path,
        "status": ctx.status,
        "termination": ctx.termination,
        "usage_source": source,
        "ttft_ms": None if ttft is None else round(ttft * 1000.0, 3),
        "duration_ms": round(duration * 1000.0, 3),
    }
    if cached is not None:
        record["cached_tokens"] = cached
    price = prices.get(ctx.model or "")
    if price is not None:
        record["cost_usd"] = cost_usd(price, prompt, completion, cached)
    return record


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

