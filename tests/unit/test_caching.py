"""The cache phase (llmproxy/caching.py): which answers that ended cleanly at the HTTP level are whole enough to
store (ended_whole), fed through a real metering session."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from llmproxy.caching import ended_whole
from llmproxy.catalogue import ENDPOINTS
from llmproxy.metering.session import MeteringSession

CHAT_USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n'
CHAT_CONTENT = b'data: {"choices":[{"index":0,"delta":{"content":"hi event: error"}}]}\n\n'
DONE = b"data: [DONE]\n\n"
CHAT_ERROR = b'data: {"error":{"message":"Internal server error","code":500}}\n\n'
MESSAGES = (b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":3,'
            b'"output_tokens":0}}}\n\n',
            b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":2}}\n\n',
            b'event: message_stop\ndata: {"type":"message_stop"}\n\n')


def whole(path: str, dialect: str, streaming: bool, chunks: list[bytes]) -> bool:
    meter = MeteringSession.plan(dialect, inject_allowed=False, is_stream=streaming, body={"messages": []})
    feed = meter.response_started(200, streaming)
    body = b"".join(feed(chunk) for chunk in chunks) + meter.response_ended()
    ctx = SimpleNamespace(meter=meter, backend_status=200, endpoint=ENDPOINTS[path])
    return ended_whole(ctx, streaming, body)


@pytest.mark.parametrize(("chunks", "stored"), [
    ([CHAT_CONTENT, CHAT_USAGE, DONE], True),
    ([CHAT_CONTENT, CHAT_USAGE], False),  # no [DONE]: cut by a clean close
    ([CHAT_CONTENT, DONE], False),  # no usage reported
    ([CHAT_CONTENT, CHAT_ERROR, DONE], False),  # an in-band error
    ([CHAT_CONTENT, CHAT_USAGE, CHAT_ERROR, DONE], False),
    ([CHAT_USAGE.replace(b"\n", b"\r\n"), DONE.replace(b"\n", b"\r\n")], True),
])
def test_a_chat_stream_is_whole_with_its_usage_and_its_done_and_no_error(chunks: list[bytes], stored: bool) -> None:
    assert whole("/v1/chat/completions", "openai-chat-sse", True, chunks) is stored


@pytest.mark.parametrize(("chunks", "stored"), [
    (list(MESSAGES), True),
    (list(MESSAGES[:2]), False),  # no message_stop
    ([MESSAGES[0], MESSAGES[2]], False),  # the input count only: the output was never reported
    ([MESSAGES[0], b'event: error\ndata: {"type":"error"}\n\n', MESSAGES[1], MESSAGES[2]], False),
])
def test_a_messages_stream_is_whole_with_its_message_stop(chunks: list[bytes], stored: bool) -> None:
    assert whole("/v1/messages", "anthropic-messages-sse", True, chunks) is stored


@pytest.mark.parametrize(("body", "stored"), [
    (b'{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}', True),
    (b'{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tok', False),  # a clean close cut it
    (b'{"choices":[]}', False),
])
def test_a_json_body_is_whole_when_it_parses_with_its_usage(body: bytes, stored: bool) -> None:
    assert whole("/v1/chat/completions", "openai-chat-sse", False, [body]) is stored


def test_an_answer_that_was_not_metered_is_not_stored() -> None:
    ctx = SimpleNamespace(meter=None, backend_status=200, endpoint=ENDPOINTS["/v1/chat/completions"])
    assert not ended_whole(ctx, False, b"{}")
