"""The mock's anthropic dialect: Anthropic's own API, driven by the real anthropic SDK (docs/protocols.md §13).

Each test starts the mock in its own event loop on 127.0.0.1 and talks to it with anthropic.AsyncAnthropic (no
retries) or, for what the SDK would not send, raw httpx; every scenario is bounded by asyncio.wait_for.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import anthropic
import httpx
import pytest

from llmproxy.mockbackend import TEMPLATES, MockBackend, MockOptions, completion_text, prompt_tokens, start_mock_backend
from llmproxy.mockbackend.textgen import anthropic_tool_calls, tool_call_completion_tokens, word

TIMEOUT = 5.0
KEYS = ("key-a", "key-b")
MODEL = "claude-sonnet-4-5"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Zürich"]},
                                                             "days": {"type": "integer"}}}}
# the API's own required headers, for raw requests
HEADERS = {"x-api-key": "key-a", "anthropic-version": "2023-06-01"}
PNG_1X1 = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082")).decode()


def run(scenario: Coroutine[Any, Any, None], timeout: float = 15.0) -> None:
    asyncio.run(asyncio.wait_for(scenario, timeout))


@asynccontextmanager
async def serving(**options: Any) -> AsyncIterator[MockBackend]:
    mock = await start_mock_backend(MockOptions(dialect="anthropic", **{"api_keys": KEYS, **options}))
    try:
        yield mock
    finally:
        await mock.close()


def claude(mock: MockBackend, key: str = "key-a") -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=mock.url, api_key=key, max_retries=0, timeout=TIMEOUT)


def raw(mock: MockBackend) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=mock.url, timeout=TIMEOUT)


def events(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    """The (event name, data) pairs of an SSE body; each event's data type must repeat its name."""
    out = []
    for block in body.decode().split("\n\n"):
        if block:
            lines = dict(line.split(": ", 1) for line in block.split("\n"))
            data = json.loads(lines["data"])
            assert data["type"] == lines["event"]
            out.append((lines["event"], data))
    return out


def expected_prompt(body: dict[str, Any]) -> int:
    return prompt_tokens(body, TEMPLATES["anthropic"])


def error_type(error: anthropic.APIStatusError) -> str:
    body = error.body
    assert isinstance(body, dict)
    return str(body["error"]["type"])


async def stats(mock: MockBackend) -> dict[str, Any]:
    async with raw(mock) as http:
        return (await http.get("/_mock/stats")).json()


# --- generation ----------------------------------------------------------------------------------------


def test_streamed_text_reaches_the_sdk_as_the_final_message_with_usage_and_stop_reason() -> None:
    body = {"model": MODEL, "max_tokens": 8, "messages": MESSAGES, "system": "Answer in one word."}

    async def scenario() -> None:
        async with serving() as mock, claude(mock) as client:
            async with client.messages.stream(**body) as stream:
                final = await stream.get_final_message()
            assert stream.request_id and stream.request_id.startswith("req_011C")
            assert final.id.startswith("msg_01") and final.model == MODEL and final.role == "assistant"
            assert [b.type for b in final.content] == ["text"] and final.content[0].text == completion_text(8)
            assert final.stop_reason == "max_tokens" and final.stop_sequence is None  # 16 tokens cut at 8
            assert final.usage.input_tokens == expected_prompt(body) and final.usage.output_tokens == 8
            assert final.usage.cache_read_input_tokens == final.usage.cache_creation_input_tokens == 0

            short = await client.messages.create(**body, extra_headers={"x-mock-tokens": "3"})
            again = await client.messages.create(**body, extra_headers={"x-mock-tokens": "3"})
            assert short.content[0].text == completion_text(3) and short.stop_reason == "end_turn"
            assert short.usage.output_tokens == 3 and short.id == again.id  # the same body, the same bytes

    run(scenario())


def test_stream_events_come_in_the_apis_order_with_a_ping_after_the_first_block_opens() -> None:
    body = {"model": MODEL, "max_tokens": 64, "stream": True, "messages": MESSAGES}

    async def scenario() -> None:
        async with serving() as mock, raw(mock) as http:
            resp = await http.post("/v1/messages", json=body, headers={**HEADERS, "x-mock-tokens": "3"})
        assert resp.status_code == 200 and resp.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert resp.headers["request-id"].startswith("req_011C")
        assert resp.headers["anthropic-ratelimit-requests-remaining"] == "3999"
        got = events(resp.content)
        assert [name for name, _ in got] == ["message_start", "content_block_start", "ping", "content_block_delta",
                                             "content_block_delta", "content_block_delta", "content_block_stop",
                                             "message_delta", "message_stop"]
        message = got[0][1]["message"]
        assert list(message) == ["model", "id", "type", "role", "content", "stop_reason", "stop_sequence", "usage"]
        assert message["content"] == [] and message["stop_reason"] is None and message["usage"]["output_tokens"] == 1
        assert [d["delta"]["text"] for _, d in got[3:6]] == [word(0), word(1), word(2)]
        assert got[7][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
        prompt = expected_prompt(body)
        assert got[7][1]["usage"] == {"input_tokens": prompt, "cache_creation_input_tokens": 0,
                                      "cache_read_input_tokens": 0, "output_tokens": 3}

    run(scenario())


def test_streamed_tool_use_input_json_deltas_accumulate_to_the_calls_arguments() -> None:
    body = {"model": MODEL, "max_tokens": 256, "messages": MESSAGES, "tools": [WEATHER]}
    (name, args), = anthropic_tool_calls(body)

    async def scenario() -> None:
        async with serving() as mock, claude(mock) as client:
            async with client.messages.stream(**body) as stream:
                final = await stream.get_final_message()
            async with raw(mock) as http:
                resp = await http.post("/v1/messages", json={**body, "stream": True}, headers=HEADERS)
        (block,) = final.content
        assert block.type == "tool_use" and block.name == name == "get_weather"
        assert block.input == json.loads(args) == {"city": "Paris", "days": 1} and block.id.startswith("toolu_01")
        assert final.stop_reason == "tool_use"
        assert final.usage.output_tokens == tool_call_completion_tokens([(name, args)])
        fragments = [d["delta"]["partial_json"] for n, d in events(resp.content) if n == "content_block_delta"]
        assert fragments[0] == "" and len(fragments) > 3 and "".join(fragments) == args  # a token at a time

    run(scenario())


@pytest.mark.parametrize(("stops", "max_tokens", "text", "reason", "sequence", "output"), [
    ([" tok3"], 64, completion_text(3), "stop_sequence", " tok3", 4),
    (["k5", "tok2"], 64, " tok0 tok1 ", "stop_sequence", "tok2", 3),  # the sequence completed first wins
    (["ok1 t"], 64, " tok0 t", "stop_sequence", "ok1 t", 3),  # ends inside token 2: three were generated
    ([" tok9"], 5, completion_text(5), "max_tokens", None, 5),  # beyond the max_tokens cut: never generated
])
def test_stop_sequences_end_the_text_before_the_sequence(stops: list[str], max_tokens: int, text: str, reason: str,
                                                         sequence: str | None, output: int) -> None:
    body = {"model": MODEL, "max_tokens": max_tokens, "messages": MESSAGES, "stop_sequences": stops}

    async def scenario() -> None:
        async with serving() as mock, claude(mock) as client:
            async with client.messages.stream(**body) as stream:
                streamed = await stream.get_final_message()
            whole = await client.messages.create(**body)
        for message in (streamed, whole):
            assert message.content[0].text == text
            assert (message.stop_reason, message.stop_sequence) == (reason, sequence)
            assert message.usage.output_tokens == output

    run(scenario())


def test_cache_knobs_split_the_prompt_in_message_start_message_delta_and_the_final_usage() -> None:
    body = {"model": MODEL, "max_tokens": 4, "messages": MESSAGES, "system": "Be brief. " * 20}
    knobs = {"x-mock-cache-read": "30", "x-mock-cache-write": "12"}
    prompt = expected_prompt(body)

    async def scenario() -> None:
        async with serving() as mock, claude(mock) as client:
            async with client.messages.stream(**body, extra_headers=knobs) as stream:
                final = await stream.get_final_message()
            async with raw(mock) as http:
                resp = await http.post("/v1/messages", json={**body, "stream": True}, headers={**HEADERS, **knobs})
        usage = final.usage
        assert (usage.input_tokens, usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (
            prompt - 42, 30, 12)
        assert usage.cache_creation and usage.cache_creation.ephemeral_5m_input_tokens == 12
        got = dict(events(resp.content))
        assert got["message_start"]["message"]["usage"]["cache_read_input_tokens"] == 30
        assert got["message_delta"]["usage"] == {"input_tokens": prompt - 42, "cache_creation_input_tokens": 12,
                                                 "cache_read_input_tokens": 30, "output_tokens": 4}

    run(scenario())


def test_images_are_accepted_and_counted_and_count_tokens_agrees_with_the_usage() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_1X1}}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": "What is this?"}]}]
    body = {"model": MODEL, "max_tokens": 4, "messages": messages, "tools": [WEATHER],
            "tool_choice": {"type": "none"}}

    async def scenario() -> None:
        async with serving() as mock, claude(mock) as client:
            counted = await client.messages.count_tokens(model=MODEL, messages=messages, tools=[WEATHER])
            reply = await client.messages.create(**body)
        text_only = expected_prompt({**body, "messages": [{"role": "user", "content": "What is this?"}]})
        assert counted.input_tokens == reply.usage.input_tokens == expected_prompt(body) == text_only + 1589
        assert reply.content[0].type == "text"  # tool_choice none: tools defined, none called

    run(scenario())


# --- the knobs ---------------------------------------------------------------------------------------------


def test_error_after_ends_the_stream_with_an_overloaded_error_event_the_sdk_raises() -> None:
    body = {"model": MODEL, "max_tokens": 64, "messages": MESSAGES}

    async def scenario() -> None:
        async with serving() as mock, claude(mock) as client:
            with pytest.raises(anthropic.APIStatusError) as info:
                async with client.messages.stream(**body, extra_headers={"x-mock-error-after": "5"}) as stream:
                    await stream.get_final_message()
            async with raw(mock) as http:
                resp = await http.post("/v1/messages", json={**body, "stream": True},
                                       headers={**HEADERS, "x-mock-error-after": "5"})
        assert error_type(info.value) == "overloaded_error" and info.value.status_code == 200  # in band, after the head
        names = [name for name, _ in events(resp.content)]
        assert len(names) == 6 and names[-1] == "error" and "message_stop" not in names

    run(scenario())


def test_status_and_pacing_knobs_apply_as_in_the_other_dialects() -> None:
    body = {"model": MODEL, "max_tokens": 64, "messages": MESSAGES}

    async def scenario() -> None:
        async with serving() as mock, claude(mock) as client:
            with pytest.raises(anthropic.InternalServerError) as info:  # OverloadedError in recent SDKs
                await client.messages.create(**body, extra_headers={"x-mock-status": "529", "x-mock-retry-after": "3"})
            assert info.value.status_code == 529 and error_type(info.value) == "overloaded_error"
            assert info.value.response.headers["retry-after"] == "3"
            assert info.value.request_id == info.value.body["request_id"]
            started = time.monotonic()
            async with client.messages.stream(**body, extra_headers={"x-mock-tokens": "4",
                                                                     "x-mock-delay-ms": "20"}) as stream:
                final = await stream.get_final_message()
            # 10 events (start, block start, ping, 4 deltas, block stop, delta, stop): 9 pauses of 20 ms
            assert time.monotonic() - started >= 0.18 and final.usage.output_tokens == 4

    run(scenario())


# --- keys, versions and limits ---------------------------------------------------------------------------


def test_a_key_not_accepted_is_an_authentication_error_and_bearer_or_x_api_key_both_carry_keys() -> None:
    async def scenario() -> None:
        async with serving() as mock:
            async with claude(mock, key="not-a-key") as client:
                with pytest.raises(anthropic.AuthenticationError) as info:
                    await client.messages.create(model=MODEL, max_tokens=4, messages=MESSAGES)
            assert info.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                                  "message": "invalid x-api-key"},
                                       "request_id": info.value.request_id}
            body = {"model": MODEL, "max_tokens": 4, "messages": MESSAGES}
            version = {"anthropic-version": "2023-06-01"}
            async with raw(mock) as http:
                missing = await http.post("/v1/messages", json=body, headers=version)
                bearer = await http.post("/v1/messages", json=body, headers={**version,
                                                                              "authorization": "Bearer key-b"})
                both = await http.post("/v1/messages", json=body, headers={**version, "x-api-key": "nope",
                                                                            "authorization": "Bearer key-b"})
            assert missing.status_code == 401
            assert missing.json()["error"]["message"] == "x-api-key header is required"
            assert bearer.status_code == 200  # what anthropic-python 2.x sends
            assert both.status_code == 401  # x-api-key wins when both are there
            records = (await stats(mock))["requests"]
            assert [r["api_key"] for r in records] == ["not-a-key", None, "key-b", "nope"]

    run(scenario())


def test_any_non_empty_key_passes_when_the_mock_has_no_key_list() -> None:
    async def scenario() -> None:
        async with serving(api_keys=()) as mock, claude(mock, key="whatever") as client:
            assert (await client.messages.create(model=MODEL, max_tokens=2, messages=MESSAGES)).usage.output_tokens == 2

    run(scenario())


@pytest.mark.parametrize(("headers", "message"), [
    ({"x-api-key": "key-a"}, "anthropic-version: header is required"),
    ({"x-api-key": "key-a", "anthropic-version": "2024-01-01"},
     'anthropic-version: "2024-01-01" is not a valid version'),
])
def test_anthropic_version_is_required_and_checked(headers: dict[str, str], message: str) -> None:
    async def scenario() -> None:
        async with serving() as mock, raw(mock) as http:
            resp = await http.post("/v1/messages", json={"model": MODEL, "max_tokens": 4, "messages": MESSAGES},
                                   headers=headers)
        assert resp.status_code == 400 and resp.headers["content-type"] == "application/json"
        assert resp.json() == {"type": "error", "error": {"type": "invalid_request_error", "message": message},
                               "request_id": resp.headers["request-id"]}

    run(scenario())


def test_a_throttled_key_gets_rate_limit_errors_with_retry_after_while_another_key_goes_through() -> None:
    body = {"model": MODEL, "max_tokens": 2, "messages": MESSAGES}

    async def scenario() -> None:
        async with serving() as mock, raw(mock) as http, claude(mock, "key-a") as a, claude(mock, "key-b") as b:
            assert (await http.post("/_mock/throttle?key=key-a&seconds=30")).json() == {"key": "key-a", "seconds": 30}
            with pytest.raises(anthropic.RateLimitError) as info:
                await a.messages.create(**body)
            headers = info.value.response.headers
            assert headers["retry-after"] == "30" and error_type(info.value) == "rate_limit_error"
            assert headers["anthropic-ratelimit-requests-remaining"] == "0"
            assert (await b.messages.create(**body)).stop_reason == "max_tokens"
            await http.post("/_mock/throttle?key=key-a&seconds=0")  # lifted at once
            assert (await a.messages.create(**body)).usage.output_tokens == 2
            await http.post("/_mock/throttle?key=key-b&seconds=1")  # and a throttle ends by itself
            with pytest.raises(anthropic.RateLimitError):
                await b.messages.create(**body)
            await asyncio.sleep(1.05)
            assert (await b.messages.create(**body)).usage.output_tokens == 2
            log = [(r["api_key"], r["status"]) for r in (await stats(mock))["requests"]]
            assert log == [("key-a", 429), ("key-b", 200), ("key-a", 200), ("key-b", 429), ("key-b", 200)]
            refused = await http.post("/_mock/throttle?key=key-a&seconds=soon")
            assert refused.status_code == 400

    run(scenario())


# --- validation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "status", "message"), [
    ({"max_tokens": None}, 400, "max_tokens: Field required"),
    ({"max_tokens": 100_000}, 400, "max_tokens: 100000 > 64000, which is the maximum allowed number of output "
                                   "tokens for claude-sonnet-4-5"),
    ({"model": None}, 400, "model: Field required"),
    ({"messages": None}, 400, "messages: Field required"),
    ({"messages": []}, 400, "messages: at least one message is required"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, 400, "messages.0.role: Input should be 'user' or 'assistant'"),
    ({"messages": [{"role": "system", "content": "hi"}]}, 400, 'messages: Unexpected role "system". The Messages API '
                                                               'accepts a top-level `system` parameter, not "system" '
                                                               'as an input message role.'),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/tiff", "data": PNG_1X1}}]}]}, 400,
     "messages.0.content.0.image.source.base64.media_type: Input should be 'image/jpeg', 'image/png', 'image/gif' or "
     "'image/webp'"),
    ({"stop_sequences": ["  "]}, 400, "stop_sequences: each stop sequence must contain non-whitespace"),
    ({"temperature": 1.0}, 400, "temperature: Extra inputs are not permitted"),  # under 2026-10-21 only
])
def test_requests_the_api_refuses(change: dict[str, Any], status: int, message: str) -> None:
    body = {key: value for key, value in {"model": MODEL, "max_tokens": 4, "messages": MESSAGES, **change}.items()
            if value is not None}

    async def scenario() -> None:
        async with serving() as mock, raw(mock) as http:
            resp = await http.post("/v1/messages", json=body, headers={**HEADERS, "anthropic-version": "2026-10-21"})
            if "temperature" in change:  # the older version still takes sampling parameters
                assert (await http.post("/v1/messages", json=body, headers=HEADERS)).status_code == 200
        assert resp.status_code == status and resp.json()["error"] == {"type": "invalid_request_error",
                                                                      "message": message}

    run(scenario())


def test_strict_models_refuse_an_unserved_model_after_the_key_check() -> None:
    async def scenario() -> None:
        async with serving(strict_models=True) as mock, raw(mock) as http:
            body = {"model": "claude-nonexistent", "max_tokens": 4, "messages": MESSAGES}
            unknown = await http.post("/v1/messages", json=body, headers=HEADERS)
            unauthenticated = await http.post("/v1/messages", json=body, headers={**HEADERS, "x-api-key": "x"})
        assert unknown.status_code == 404 and unknown.json()["error"] == {"type": "not_found_error",
                                                                          "message": "model: claude-nonexistent"}
        assert unauthenticated.status_code == 401

    run(scenario())


# --- models --------------------------------------------------------------------------------------------


def test_models_list_and_retrieve_in_anthropics_shape() -> None:
    served = "claude-sonnet-4-5,claude-haiku-4-5-20251001"

    async def scenario() -> None:
        async with serving(model=served) as mock, claude(mock) as client:
            page = await client.models.list()
            one = await client.models.retrieve("claude-haiku-4-5-20251001")
            with pytest.raises(anthropic.NotFoundError) as info:
                await client.models.retrieve("claude-2")
            async with raw(mock) as http:
                listing = (await http.get("/v1/models", headers=HEADERS)).json()
                await http.post("/_mock/health/529")
            with pytest.raises(anthropic.InternalServerError) as overloaded:  # /_mock/health steers the probe route
                await client.models.list()
            assert overloaded.value.status_code == 529
        assert [m.id for m in page.data] == served.split(",") and page.has_more is False
        assert [m.display_name for m in page.data] == ["Claude Sonnet 4.5", "Claude Haiku 4.5"]
        assert one.created_at.isoformat() == "2025-10-01T00:00:00+00:00" and one.type == "model"
        assert info.value.body["error"] == {"type": "not_found_error", "message": "model: claude-2"}
        assert listing["first_id"] == "claude-sonnet-4-5" and listing["last_id"] == "claude-haiku-4-5-20251001"
        assert listing["data"][0]["created_at"] == "2025-09-29T00:00:00Z"

    run(scenario())


def test_an_empty_api_key_is_refused_at_startup() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        MockOptions(dialect="anthropic", api_keys=("key-a", ""))
