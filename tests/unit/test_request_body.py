"""What the proxy reads from a request body and the usage option it injects."""

from __future__ import annotations

from types import SimpleNamespace

import orjson
import pytest

from llmproxy.catalogue import ALL_FAMILIES, lookup
from llmproxy.config.model import BackendConfig, RoutingConfig, TranslationConfig
from llmproxy.context import RequestContext, new_context
from llmproxy.http11.request import RequestHead
from llmproxy.pipeline import prepare_attempt
from llmproxy.request_body import inspect_body


def _ctx(target: bytes) -> RequestContext:
    head = RequestHead(b"POST", target, "1.1", [], b"h", None, False, True, False)
    ctx = new_context(SimpleNamespace(), head, "r1", True)
    ctx.endpoint = lookup(ctx.path)
    return ctx


def _backend(**options):
    config = BackendConfig(url="http://b", **options)
    # Only what an attempt's plan reads of it: a backend of unknown kind serves every API natively.
    return SimpleNamespace(config=config, kind=config.type, apis=ALL_FAMILIES, serves_endpoint=lambda endpoint: True)


def prepare_for_backend(ctx: RequestContext, backend, body: bytes) -> bytes:
    """What the pipeline sends `backend` on an attempt (metering on)."""
    services = SimpleNamespace(metering=True, fleet=SimpleNamespace(routing=RoutingConfig()),
                               translation=TranslationConfig())
    return prepare_attempt(services, ctx, backend, body)


def _prepare(target: bytes, body: dict, **backend) -> tuple[object, dict]:
    ctx = _ctx(target)
    raw = orjson.dumps(body)
    inspect_body(ctx, raw)
    sent = prepare_for_backend(ctx, _backend(**backend), raw)
    return ctx, orjson.loads(sent)


def test_streaming_chat_without_stream_options_gets_include_usage_and_a_stripping_meter():
    ctx, sent = _prepare(b"/v1/chat/completions?x=1", {"model": "m", "stream": True, "messages": []})
    assert ctx.path == "/v1/chat/completions" and ctx.model == "m" and ctx.is_stream
    assert sent["stream_options"] == {"include_usage": True}
    assert ctx.meter is not None
    assert sent["messages"] == [] and sent["model"] == "m"


def test_the_usage_option_is_spliced_in_and_every_other_byte_is_forwarded_as_sent():
    # Key order, spacing and escapes as the client wrote them: the body is not re-serialised.
    raw = b' \n{ "messages": [{"role": "user", "content": "caf\\u00e9 \\"q\\""}],\n  "stream": true, "model": "m"}'
    ctx = _ctx(b"/v1/chat/completions")
    inspect_body(ctx, raw)
    sent = prepare_for_backend(ctx, _backend(), raw)
    assert sent == raw.replace(b"{", b'{"stream_options":{"include_usage":true},', 1)
    assert orjson.loads(sent) == {**orjson.loads(raw), "stream_options": {"include_usage": True}}


def test_a_null_stream_options_is_replaced_not_doubled():
    raw = b'{"stream": true, "stream_options": null, "model": "m"}'
    ctx = _ctx(b"/v1/chat/completions")
    inspect_body(ctx, raw)
    sent = prepare_for_backend(ctx, _backend(), raw)
    assert sent.count(b"stream_options") == 1
    assert orjson.loads(sent)["stream_options"] == {"include_usage": True}


def test_other_stream_options_are_kept():
    _, sent = _prepare(b"/v1/chat/completions", {"stream": True, "stream_options": {"continuous_usage_stats": True}})
    assert sent["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}


@pytest.mark.parametrize(("target", "body", "backend"), [
    (b"/v1/chat/completions", {"stream": True, "stream_options": {"include_usage": True}}, {}),  # client asked
    (b"/v1/chat/completions", {"stream": False}, {}),  # vLLM rejects stream_options without stream
    (b"/v1/chat/completions", {"stream": True}, {"inject_usage": False}),
    (b"/api/chat", {"model": "llama3.2"}, {}),  # Ollama native reports usage by itself
    (b"/v1/embeddings", {"input": "x"}, {}),
])
def test_body_is_left_alone(target, body, backend):
    ctx = _ctx(target)
    raw = orjson.dumps(body)
    inspect_body(ctx, raw)
    assert prepare_for_backend(ctx, _backend(**backend), raw) is raw


def test_native_paths_stream_by_default_and_malformed_json_is_not_our_business():
    ctx, _ = _prepare(b"/api/chat", {"model": "llama3.2"})
    assert ctx.is_stream and ctx.meter is not None
    ctx = _ctx(b"/v1/chat/completions")
    inspect_body(ctx, b"{not json")
    assert ctx.body_data is None and not ctx.is_stream
    assert prepare_for_backend(ctx, _backend(), b"{not json") == b"{not json"
    ctx = _ctx(b"/generate_stream")
    inspect_body(ctx, b"")
    assert ctx.is_stream
