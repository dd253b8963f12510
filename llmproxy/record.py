"""The usage record: built once when a request ends, from the usage its metering session yields.

Exactly one record per POST request that was sent to a backend, whatever the ending (completed, client gone,
backend died, timed out). Its counts are the backend's own (`"usage_source": "reported"`) or, when the
response carried none, the session's estimate (`"estimated"`; see metering/session.py).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from llmproxy.accesslog import milliseconds, rfc3339

TOKENIZED = "tokenized"  # usage_source of a record whose prompt the backend's tokenizer counted

if TYPE_CHECKING:
    from llmproxy.config.model import PriceConfig
    from llmproxy.context import RequestContext
    from llmproxy.metering.session import MeteredUsage


def cost_usd(price: PriceConfig, prompt: int, completion: int, cache_read: int | None = None,
             cache_write: int | None = None) -> float:
    """The cost of one request. `prompt` counts every prompt token; cache reads and writes are at their own
    prices where configured (else the input price):

        (prompt - reads - writes) * input + reads * cached_input + writes * cache_write + completion * output
    """
    read = min(cache_read or 0, prompt)
    write = min(cache_write or 0, prompt - read)
    read_price = price.input_per_million if price.cached_input_per_million is None else price.cached_input_per_million
    write_price = price.input_per_million if price.cache_write_per_million is None else price.cache_write_per_million
    usd = ((prompt - read - write) * price.input_per_million + read * read_price + write * write_price
           + completion * price.output_per_million)
    return round(usd / 1_000_000, 10)


def build_record(ctx: RequestContext, usage: MeteredUsage, duration: float, ttft: float | None,
                 prices: dict[str, PriceConfig]) -> dict[str, Any]:
    """Return the usage record for a finished request."""
    prompt, completion, cache_read, cache_write, source = usage
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
        # The API the client spoke and the one the backend was sent: they differ for a translated request.
        "client_api": ctx.endpoint.family or ctx.endpoint.api,
        "backend_api": ctx.backend_api,
        "status": ctx.status,
        "termination": ctx.termination,
        "usage_source": source,
        "cached": False,  # a hit of the response cache (caching.py sets these two)
        "deduplicated": False,  # followed an identical request in flight: one upstream request for both
        "ttft_ms": None if ttft is None else milliseconds(ttft),
        "duration_ms": milliseconds(duration),
    }
    if ctx.route_id is not None:
        record["route"] = ctx.route_id
    if ctx.model_requested is not None:
        record["model_requested"] = ctx.model_requested  # "auto"; `model` is the one the rules chose
    if cache_read is not None:
        record["cache_read_tokens"] = cache_read
    if cache_write is not None:
        record["cache_write_tokens"] = cache_write
    price = prices.get(ctx.model or "")
    if price is not None:
        record["cost_usd"] = cost_usd(price, prompt, completion, cache_read, cache_write)
    return record


def recount(record: dict[str, Any], prompt_tokens: int, prices: dict[str, PriceConfig]) -> None:
    """Put the backend tokenizer's count of the prompt into an estimated record (recount.py), cost included."""
    record["prompt_tokens"] = prompt_tokens
    record["total_tokens"] = prompt_tokens + record["completion_tokens"]
    record["usage_source"] = TOKENIZED
    price = prices.get(record["model"] or "")
    if price is not None:
        record["cost_usd"] = cost_usd(price, prompt_tokens, record["completion_tokens"],
                                      record.get("cache_read_tokens"), record.get("cache_write_tokens"))
