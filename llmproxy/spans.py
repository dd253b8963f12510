"""The span of a request (tracing.py), in the GenAI semantic conventions: begun when the request first goes
upstream, ended in finish from the same facts as the usage record.

Only generations have spans (an endpoint with a metering dialect: chat, completions, Responses, Messages,
embeddings and the engines' native generate APIs); any other path's traceparent goes upstream as the client
sent it. A generation's upstream request carries the proxy span's traceparent instead of the client's (its
tracestate is passed on unchanged), so the backend's own spans are children of the proxy's.

A request refused before any backend was chosen (401, 429...) gets its span in finish, with its error.
Span kind CLIENT: the span describes the call to the inference server (its `server.address`), as a GenAI
client span does; the proxy's time in front of it is inside, from the request head's arrival.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmproxy.context import RequestContext
    from llmproxy.fleet.backend import Backend
    from llmproxy.tracing import Tracing

# gen_ai.operation.name by the client's API (its family, else its endpoint's api).
OPERATIONS = {
    "chat": "chat", "responses": "chat", "messages": "chat", "openai-chat": "chat", "ollama-chat": "chat",
    "completions": "text_completion", "openai-completions": "text_completion", "tgi-generate": "text_completion",
    "ollama-generate": "text_completion", "llamacpp-completion": "text_completion",
    "llamacpp-infill": "text_completion", "sglang-generate": "text_completion",
    "embeddings": "embeddings", "openai-embeddings": "embeddings", "llamacpp-embedding": "embeddings",
}
# gen_ai.provider.name by the API the backend was sent: the API's maker, as the conventions ask of a client
# that cannot know what serves it; an engine's native API is named by the engine (backend type).
PROVIDERS = {"chat": "openai", "completions": "openai", "responses": "openai", "embeddings": "openai",
             "messages": "anthropic", "openai-chat": "openai", "openai-completions": "openai",
             "openai-embeddings": "openai", "openai-responses": "openai", "anthropic-messages": "anthropic"}
# error.type of a request cut after its response began, by termination code (errors.py).
ABORTS = {"CD": "client_closed", "CH": "client_closed", "CR": "client_closed", "SD": "upstream_closed",
          "sD": "stream_idle_timeout", "cD": "client_write_timeout", "PD": "translation_failed"}


def traced(ctx: RequestContext) -> bool:
    """Whether the request is a generation, the only kind of request that has a span."""
    return ctx.endpoint.dialect is not None


def upstream_traceparent(tracing: Tracing, ctx: RequestContext) -> bytes:
    """The traceparent header line for this attempt's upstream request (b"" when there is no trace to
    continue), the request's span begun if this is its first attempt. Only its ids are needed now: it is
    described when it ends, off the way to the first token."""
    span = ctx.span
    if span is None:
        span = ctx.span = tracing.start(span_name(ctx), ctx.head.headers, ctx.t_start)
    return tracing.traceparent_line(span)


def end_span(tracing: Tracing, ctx: RequestContext, record: dict[str, Any] | None, ended: float,
             backend: Backend | None) -> None:
    """End the request's span (begun now if it never went upstream) with what the request did; `record` is its
    usage record, if it has one, `backend` the last one it was sent to (None: none)."""
    span = ctx.span
    if span is None:
        span = ctx.span = tracing.start(span_name(ctx), ctx.head.headers, ctx.t_start)
    if not tracing.recording(span):
        return  # never sampled: nothing to describe, nothing to export
    first_token = ctx.t_first_byte if ctx.is_stream and ctx.t_first_byte else None
    ttft = {"gen_ai.response.time_to_first_chunk": first_token - ctx.t_start} if first_token else None
    error = error_type(ctx)
    tracing.end(span, attributes(ctx, record, backend, ttft, error), ended, first_token, ttft,
                None if error is None else ctx.error_message or error)


def span_name(ctx: RequestContext) -> str:
    """`{gen_ai.operation.name} {gen_ai.request.model}`, as the conventions name a GenAI span."""
    operation = operation_name(ctx)
    return f"{operation} {ctx.model}" if ctx.model else operation


def operation_name(ctx: RequestContext) -> str:
    endpoint = ctx.endpoint
    return OPERATIONS.get(endpoint.family or endpoint.api, "text_completion")


def provider(api: str, kind: str | None) -> str:
    """gen_ai.provider.name of a request in `api` to a backend of `kind` (None: no backend was chosen)."""
    name = PROVIDERS.get(api)
    if name is not None:
        return name
    return kind if kind and kind != "auto" else "openai"


def error_type(ctx: RequestContext) -> str | None:
    """error.type: the code of the proxy's own error reply, else how the request was cut, else the status of
    a backend's error response; None for a success."""
    if ctx.error_type:
        return ctx.error_type
    aborted = ABORTS.get(ctx.termination)
    if aborted is not None:
        return aborted
    return str(ctx.status) if ctx.status >= 400 else None


def attributes(ctx: RequestContext, record: dict[str, Any] | None, backend: Backend | None,
               ttft: dict[str, float] | None, error: str | None) -> dict[str, Any]:
    """The span's attributes at its end."""
    endpoint = ctx.endpoint
    out: dict[str, Any] = {"gen_ai.operation.name": operation_name(ctx),
                           "http.response.status_code": ctx.status,
                           "llmproxy.request_id": ctx.request_id, "llmproxy.termination": ctx.termination}
    if backend is not None:
        out["gen_ai.provider.name"] = out["gen_ai.system"] = provider(ctx.backend_api, backend.kind)
        out["server.address"], out["server.port"] = backend.config.host, backend.config.port
        out["llmproxy.backend"] = backend.name
    else:  # refused before a backend was chosen: the provider of the API the client spoke
        out["gen_ai.provider.name"] = out["gen_ai.system"] = provider(endpoint.family or endpoint.api, None)
    if ctx.model:
        out["gen_ai.request.model"] = ctx.model
    response_model = ctx.meter.response_model if ctx.meter is not None else None
    if response_model:
        out["gen_ai.response.model"] = response_model
    if ctx.is_stream:
        out["gen_ai.request.stream"] = True
    if record is not None and record["usage_source"] != "none":
        out["gen_ai.usage.input_tokens"] = record["prompt_tokens"]
        out["gen_ai.usage.output_tokens"] = record["completion_tokens"]
        out["llmproxy.usage_source"] = record["usage_source"]
    if ttft is not None:
        out.update(ttft)
    if error is not None:
        out["error.type"] = error
    return out
