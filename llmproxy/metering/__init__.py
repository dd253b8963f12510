"""Token usage read off a response as the relay forwards it (docs/protocols.md §5).

The relay makes one meter per metered response and calls `feed` with every upstream body chunk (transfer
framing already removed), forwarding what it returns, then `finish` once at the end:

    meter = meter_for(endpoint.dialect_on(backend.kind), strip_usage_event=injected)
    ... write(meter.feed(chunk)) ...            # usually `chunk` itself, untouched
    write(meter.finish()); record(meter.usage or estimate_from(meter.content_events))

Meters are built for the hot path: a chunk that cannot carry usage is only scanned with C-level byte
searches, never parsed, and goes on as the same bytes object. They never raise on what the upstream sends:
malformed lines are ignored. The last usage seen wins (never a sum).
"""

from __future__ import annotations

from typing import Protocol

import orjson

from llmproxy.metering.dialects import (
    ANTHROPIC_MESSAGES_SSE,
    DIALECTS,
    LLAMACPP_COMPLETION_SSE,
    OLLAMA_NDJSON,
    OPENAI_CHAT_SSE,
    OPENAI_COMPLETIONS_SSE,
    OPENAI_EMBEDDINGS,
    OPENAI_RESPONSES_SSE,
    SGLANG_GENERATE_SSE,
    SPECS,
    STRIPPABLE,
    TGI_GENERATE_SSE,
    resolve,
)
from llmproxy.metering.ndjson import NDJSONMeter
from llmproxy.metering.sse import SSEMeter
from llmproxy.metering.usage import Usage, response_model

__all__ = [
    "ANTHROPIC_MESSAGES_SSE",
    "DEFAULT_MAX_LINE",
    "DIALECTS",
    "LLAMACPP_COMPLETION_SSE",
    "OLLAMA_NDJSON",
    "OPENAI_CHAT_SSE",
    "OPENAI_COMPLETIONS_SSE",
    "OPENAI_EMBEDDINGS",
    "OPENAI_RESPONSES_SSE",
    "SGLANG_GENERATE_SSE",
    "STRIPPABLE",
    "TGI_GENERATE_SSE",
    "Meter",
    "Usage",
    "meter_for",
    "meter_for_json_body",
    "read_json_body",
]

DEFAULT_MAX_LINE = 1 << 20


class Meter(Protocol):
    usage: Usage | None  # the usage seen so far, merged over the events that carried it (None if none)
    content_events: int  # events that carried generated content: an estimate when no usage arrives
    overflowed: bool  # a line exceeded the cap: metering stopped for this stream (bytes still flow)
    response_id: str | None  # the stored response's id, read with the usage (Responses API), else None
    response_model: str | None  # the model the event that carried the usage names, else None

    def feed(self, data: bytes) -> bytes:
        """Read one upstream chunk; return the bytes to forward (usually `data` itself)."""
        ...

    def finish(self) -> bytes:
        """End of stream; return any held-back bytes to forward (usually b"")."""
        ...


def meter_for(dialect: str, *, strip_usage_event: bool = False, max_line: int = DEFAULT_MAX_LINE) -> Meter:
    """Return a fresh meter for one streamed response in `dialect` (a name from DIALECTS, or an alias).

    `strip_usage_event` (openai-chat-sse and openai-completions-sse only) removes the usage-only event
    (`choices` empty, `usage` an object) from the forwarded bytes: for a client that did not ask for it when
    the proxy injected `stream_options.include_usage`. While stripping, an incomplete trailing event is held
    back until its blank line arrives (or `finish`). `max_line` caps the bytes kept for one line or event.
    Raises ValueError for an unknown dialect, or stripping asked of a dialect that has no such event.
    """
    name = resolve(dialect)
    if strip_usage_event and name not in STRIPPABLE:
        raise ValueError(f"{name} has no usage-only event to strip")
    if name == OLLAMA_NDJSON:
        return NDJSONMeter(SPECS[name], max_line)
    return SSEMeter(SPECS[name], strip_usage_event, max_line)


def meter_for_json_body(body: bytes, dialect: str) -> Usage | None:
    """Return the usage of a complete (non-streamed) JSON response in `dialect`, or None if it has none.

    OpenAI chat/completions/embeddings: `usage` (embeddings report prompt tokens only); Responses API:
    `usage.input_tokens/output_tokens`; TGI /generate (or `/`):
    `details` (present only with parameters.details); Ollama native: `prompt_eval_count`/`eval_count`; Anthropic
    Messages: `usage.input_tokens` (+ cache reads and writes) / `output_tokens`; llama.cpp /completion:
    `tokens_evaluated` / `tokens_predicted` (+ `timings.cache_n`); SGLang /generate: `meta_info`.
    Never raises on the body; raises ValueError for an unknown dialect.
    """
    return read_json_body(body, dialect)[0]


def read_json_body(body: bytes, dialect: str) -> tuple[Usage | None, str | None, str | None]:
    """The usage of a complete JSON response in `dialect` (see meter_for_json_body), the id of the response
    the backend stored (Responses API) and the model that generated it, each None when the body does not say."""
    spec = SPECS[resolve(dialect)]
    try:
        obj = orjson.loads(body)
    except ValueError:
        return None, None, None
    return spec.body_usage(obj), spec.identify(obj) if spec.identify is not None else None, response_model(obj)
