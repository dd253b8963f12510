"""What the proxy reads from a request body, and the one change it may make to it.

Read: `model` and `stream` (for logs, routing and metering) and the parsed JSON (kept for estimating
prompt tokens if the backend reports none). Changed: a model alias (routing.model_aliases) is replaced by
its target; for a streaming OpenAI-style request whose client did not ask for usage,
`stream_options.include_usage` is added so the backend reports it (the relay then strips that usage-only
event again before the client sees it). Otherwise the body is forwarded byte for byte.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from llmproxy.catalogue import STREAMS_ALWAYS, STREAMS_UNLESS_DECLINED

if TYPE_CHECKING:
    from llmproxy.context import RequestContext

_JSON_START = (b"{", b" ", b"\t", b"\r", b"\n")
_USAGE_OPTION = b'"stream_options":{"include_usage":true},'  # spliced in as the body's first key
# What the backends' lax validators (pydantic, serde-ish) also take for true: a client must not dodge
# usage injection by writing "stream": 1 while the backend streams anyway.
_TRUE_STRINGS = frozenset({"true", "1", "yes", "on", "t", "y"})


def inspect_body(ctx: RequestContext, body: bytes) -> None:
    """Fill ctx.model, is_stream and body_data from the request body; never fails the request."""
    streams = ctx.endpoint.streams
    data = None
    if body[:1] in _JSON_START:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = None  # the backend answers malformed JSON in its own words
    if not isinstance(data, dict):
        ctx.is_stream = streams == STREAMS_ALWAYS
        return
    ctx.body_data = data
    model = data.get("model")
    ctx.model = model if isinstance(model, str) else None
    stream = data.get("stream", streams == STREAMS_UNLESS_DECLINED)
    ctx.is_stream = _truthy(stream) or streams == STREAMS_ALWAYS


def body_for_backend(ctx: RequestContext, body: bytes, inject_usage: bool) -> bytes:
    """The body to send: a model alias resolved, `stream_options.include_usage` added when `inject_usage`
    (the metering session asked for it); otherwise `body` itself, byte for byte."""
    changes = {"model": ctx.model} if ctx.model_aliased else {}
    if inject_usage:
        if not changes and ctx.body_data and "stream_options" not in ctx.body_data:
            return _with_usage_option(body)
        options = ctx.body_data.get("stream_options")
        changes["stream_options"] = {**options, "include_usage": True} if isinstance(options, dict) \
            else {"include_usage": True}
    return orjson.dumps({**ctx.body_data, **changes}) if changes else body


def _with_usage_option(body: bytes) -> bytes:
    """The body with `stream_options.include_usage` added as its first key, every other byte as sent.

    The usual streaming request: splicing costs a copy, where re-serialising would cost a second pass over
    a prompt that may be hundreds of kilobytes (and would reorder nothing the backend cares about anyway).
    Only called for a non-empty JSON object without the key, so the comma is right and no key is doubled.
    """
    brace = body.index(b"{") + 1
    return b"".join((body[:brace], _USAGE_OPTION, body[brace:]))


def _truthy(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value == 1
    return isinstance(value, str) and value.strip().lower() in _TRUE_STRINGS
