"""Anthropic Messages end to end: the real `anthropic` SDK against the real proxy, in front of mocks of vLLM,
Ollama and llama.cpp as each serves /v1/messages (docs/protocols.md §8).

For each engine: streamed and plain turns, count_tokens, a tool-use round trip and a stream left early come
through the SDK intact; the bytes relayed are the backend's; nothing is buffered; and each request gets exactly
one usage record whose counts are the engine's own. Expected counts come from the mock's model
(llmproxy.mockbackend.textgen), never from the proxy's metering. Claude Code's own requests and the proxy's
own errors on these paths are in test_anthropic_claude_code.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import anthropic
import pytest

from llmproxy.mockbackend import TEMPLATES, anthropic_tool_calls, completion_text, prompt_tokens
from llmproxy.mockbackend.textgen import ollama_estimated_input_tokens, tool_call_completion_tokens
from tests.e2e.anthropic_setup import (
    DIALECTS,
    MODELS,
    Setup,
    claude,
    mock_request,
    mock_requests,
    record_for,
    running,
    sse_events,
    tagged,
)
from tests.support import (
    ResponseReader,
    assert_idle,
    http_post,
    post_request,
    raw_connect,
    send_request,
    sha256,
    usage_records,
    wait_for,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    yield from running(tmp_path_factory.mktemp("anthropic-messages"))


SYSTEM = [{"type": "text", "text": "You are a terse assistant. Answer in one sentence."}]
QUESTION = {"role": "user", "content": "What is the capital of France?"}
WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}
CLOCK = {"name": "get_time", "input_schema": {"type": "object", "properties": {"tz": {"type": "string"}}}}


def text_turn(dialect: str, max_tokens: int = 64) -> dict:
    return {"model": MODELS[dialect], "max_tokens": max_tokens, "system": SYSTEM, "messages": [QUESTION]}


def engine_prompt(body: dict, dialect: str) -> int:
    """The prompt tokens of a Messages body as the engine's chat template counts them (the mock's model)."""
    return prompt_tokens(body, TEMPLATES[dialect])


def assert_billed(record: dict, prompt: int, completion: int, source: str = "reported") -> None:
    assert (record["prompt_tokens"], record["completion_tokens"]) == (prompt, completion), record
    assert record["total_tokens"] == prompt + completion
    assert record["usage_source"] == source


# --- The SDK's calls, each engine ------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", DIALECTS)
def test_streamed_text_reaches_the_sdk_and_is_billed_with_the_engines_counts(setup: Setup, dialect: str) -> None:
    body = text_turn(dialect)
    rid, headers = tagged()
    with claude(setup).messages.stream(**body, extra_headers={**headers, "x-mock-tokens": "5"}) as stream:
        texts = list(stream.text_stream)
        message = stream.get_final_message()
    assert "".join(texts) == completion_text(5) and len(texts) == 5
    assert message.stop_reason == "end_turn" and message.usage.output_tokens == 5
    record = record_for(setup, rid)
    assert_billed(record, engine_prompt(body, dialect), 5)
    assert record["is_stream"] is True and record["endpoint"] == "/v1/messages"
    assert (record["backend"], record["model"], record["status"], record["termination"]) == (
        dialect, MODELS[dialect], 200, "--")
    # No cache knob: only llama.cpp reports a (zero) cache read; nobody a cache write (docs/protocols.md §8.1).
    assert record.get("cache_read_tokens") == (0 if dialect == "llamacpp" else None)
    assert "cache_write_tokens" not in record


@pytest.mark.parametrize("dialect", DIALECTS)
def test_plain_create_reaches_the_sdk_and_is_billed_with_the_engines_counts(setup: Setup, dialect: str) -> None:
    body = text_turn(dialect, max_tokens=3)
    rid, headers = tagged()
    message = claude(setup).messages.create(**body, extra_headers={**headers, "x-mock-tokens": "8"})
    assert message.content[0].text == completion_text(3)  # max_tokens cut the answer
    assert message.stop_reason == "max_tokens"
    record = record_for(setup, rid)
    assert_billed(record, engine_prompt(body, dialect), 3)
    assert record["is_stream"] is False and record["status"] == 200


@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("dialect", DIALECTS)
def test_cache_reads_and_writes_are_set_apart_and_not_counted_twice(setup: Setup, dialect: str,
                                                                     streamed: bool) -> None:
    body = text_turn(dialect)
    prompt, read, write = engine_prompt(body, dialect), 7, 5
    assert prompt > read + write, "the knobs must leave some uncached input"
    rid, headers = tagged()
    knobs = {**headers, "x-mock-tokens": "4", "x-mock-cache-read": str(read), "x-mock-cache-write": str(write)}
    if streamed:
        with claude(setup).messages.stream(**body, extra_headers=knobs) as stream:
            stream.until_done()
    else:
        claude(setup).messages.create(**body, extra_headers=knobs)
    record = record_for(setup, rid)
    # Anthropic's input_tokens excludes both, so the prompt is input + reads + writes, each counted once.
    assert_billed(record, prompt, 4)
    assert record["cache_read_tokens"] == read
    # llama.cpp has no cache-write count (its input_tokens keeps those tokens): nothing to set apart.
    assert record.get("cache_write_tokens") == (None if dialect == "llamacpp" else write)


@pytest.mark.parametrize("dialect", ["vllm", "llamacpp"])
def test_count_tokens_answers_the_engines_count_and_bills_nothing(setup: Setup, dialect: str) -> None:
    body = {"model": MODELS[dialect], "system": SYSTEM, "messages": [QUESTION], "tools": [WEATHER]}
    rid, headers = tagged()
    counted = claude(setup).messages.count_tokens(**body, extra_headers=headers)
    assert counted.input_tokens == engine_prompt(body, dialect)
    record = record_for(setup, rid)
    assert_billed(record, 0, 0, source="none")  # it generated nothing
    assert record["status"] == 200 and record["endpoint"] == "/v1/messages/count_tokens"
    assert "cost_usd" not in record


def test_count_tokens_for_an_ollama_model_is_the_sdks_not_found_and_reaches_no_engine(setup: Setup) -> None:
    body = {"model": MODELS["ollama"], "messages": [QUESTION]}
    rid, headers = tagged()
    with pytest.raises(anthropic.NotFoundError) as raised:  # Ollama has no such route (docs/protocols.md §8.3)
        claude(setup).messages.count_tokens(**body, extra_headers=headers)
    assert raised.value.body["type"] == "error" and raised.value.body["error"]["type"] == "not_found_error"
    assert not any(mock_requests(mock, rid) for mock in setup.mocks.values())
    # The proxy answered it itself: no record. Another request's record, written after, shows none is coming.
    later, later_headers = tagged()
    claude(setup).messages.count_tokens(**{**body, "model": MODELS["vllm"]}, extra_headers=later_headers)
    record_for(setup, later)
    assert not [r for r in usage_records(setup.directory) if r.get("client_request_id") == rid]


def tool_result_turn(first: dict, message: anthropic.types.Message) -> dict:
    """The next request after a tool_use answer: the calls echoed back, a tool_result for each, and the model
    told to answer in text (tool_choice none) as it would once it has what it asked for."""
    calls = [{"type": "tool_use", "id": b.id, "name": b.name, "input": b.input}
             for b in message.content if b.type == "tool_use"]
    results = [{"type": "tool_result", "tool_use_id": call["id"], "content": f"{call['name']}: 21 degrees"}
               for call in calls]
    return {**first, "tool_choice": {"type": "none"}, "messages": [
        *first["messages"], {"role": "assistant", "content": calls}, {"role": "user", "content": results}]}


@pytest.mark.parametrize("dialect", DIALECTS)
def test_a_tool_use_round_trip_is_relayed_and_each_turn_billed(setup: Setup, dialect: str) -> None:
    first = {"model": MODELS[dialect], "max_tokens": 256, "tools": [WEATHER, CLOCK],
             "messages": [{"role": "user", "content": "Weather in Paris, and the time there?"}]}
    expected_calls = anthropic_tool_calls(first)
    assert len(expected_calls) == 2
    rid, headers = tagged()
    with claude(setup).messages.stream(**first, extra_headers=headers) as stream:
        message = stream.get_final_message()
    assert message.stop_reason == "tool_use"
    assert [(b.name, b.input) for b in message.content if b.type == "tool_use"] == [
        (name, json.loads(args)) for name, args in expected_calls]
    assert_billed(record_for(setup, rid), engine_prompt(first, dialect), tool_call_completion_tokens(expected_calls))

    second = tool_result_turn(first, message)
    rid, headers = tagged()
    with claude(setup).messages.stream(**second, extra_headers={**headers, "x-mock-tokens": "6"}) as stream:
        answer = stream.get_final_message()
    assert answer.stop_reason == "end_turn" and answer.content[0].text == completion_text(6)
    assert engine_prompt(second, dialect) > engine_prompt(first, dialect)  # the results are part of the prompt
    assert_billed(record_for(setup, rid), engine_prompt(second, dialect), 6)


# How many gated events each engine sends before its first text delta, message_start being free: vLLM and
# Ollama send one event per chunk, llama.cpp sends message_start, the block start and the first delta as one
# chunk (docs/protocols.md §8.4).
RELEASES_UNTIL_FIRST_DELTA = {"vllm": 2, "ollama": 2, "llamacpp": 0}


@pytest.mark.parametrize("dialect", DIALECTS)
def test_a_stream_left_after_the_first_delta_is_billed_as_far_as_it_went(setup: Setup, dialect: str) -> None:
    body = text_turn(dialect)
    rid, headers = tagged()
    gate = f"leave-{rid}"
    mock = setup.mocks[dialect]
    for _ in range(RELEASES_UNTIL_FIRST_DELTA[dialect]):  # the rest stays held: exactly one delta is relayed
        http_post(f"{mock.url}/_mock/release/{gate}")
    with claude(setup).messages.stream(**body, extra_headers={**headers, "x-mock-gate": gate,
                                                              "x-mock-tokens": "50"}) as stream:
        first = next(event for event in stream if event.type == "content_block_delta")
    assert first.delta.text == completion_text(1)
    # The proxy let the engine go as soon as the client did.
    wait_for(lambda: mock_request(mock, rid)["outcome"] == "client_disconnect")
    record = record_for(setup, rid)
    assert record["termination"] == "CD"
    # The prompt is what message_start said: vLLM's and llama.cpp's real count, Ollama's own len/4 estimate
    # (its real count only comes in message_delta); the output is the one delta relayed.
    started_with = ollama_estimated_input_tokens(body) if dialect == "ollama" else engine_prompt(body, dialect)
    assert_billed(record, started_with, 1, source="estimated")
    assert_idle(setup.proxy)


# --- The bytes on the wire -------------------------------------------------------------------------------


@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("dialect", DIALECTS)
def test_the_body_relayed_is_the_engines_byte_for_byte(setup: Setup, dialect: str, streamed: bool) -> None:
    body = json.dumps({**text_turn(dialect), "stream": streamed}).encode()
    rid, headers = tagged()  # the same id both ways: vLLM's message id is made from it
    headers["x-mock-tokens"] = "6"
    direct, direct_body, direct_complete = send_request(setup.mocks[dialect].port, body, headers,
                                                        path="/v1/messages")
    proxied, proxied_body, proxied_complete = send_request(setup.proxy.port, body, {**headers, "x-api-key": setup.key},
                                                           path="/v1/messages")
    assert direct.status == proxied.status == 200 and direct_complete and proxied_complete
    assert sha256(proxied_body) == sha256(direct_body)
    assert proxied.headers["content-type"] == direct.headers["content-type"]
    if streamed:
        assert sse_events(proxied_body)[-1][0] == "message_stop"
    assert_billed(record_for(setup, rid), engine_prompt(json.loads(body), dialect), 6)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_each_event_reaches_the_client_while_the_engine_still_holds_the_next(setup: Setup, dialect: str) -> None:
    rid, headers = tagged()
    gate = f"hold-{rid}"
    mock = setup.mocks[dialect]
    body = json.dumps({**text_turn(dialect), "stream": True}).encode()
    with raw_connect(setup.proxy.port) as sock:
        sock.sendall(post_request("/v1/messages", body, {**headers, "x-api-key": setup.key, "x-mock-gate": gate,
                                                         "x-mock-tokens": "3"}))
        reader = ResponseReader(sock).read_head()
        assert reader.status == 200
        first = reader.read_chunk()  # a proxy that buffered would make this time out
        assert first and sse_events(first)[0][0] == "message_start"
        assert mock_request(mock, rid)["outcome"] is None, "the engine is still holding the rest"
        received = [first]
        while True:  # then one event per release, each read before the next is let go
            http_post(f"{mock.url}/_mock/release/{gate}")
            chunk = reader.read_chunk()
            assert chunk is not None, "stream truncated"
            if chunk == b"":
                break
            received.append(chunk)
    events = sse_events(b"".join(received))
    assert [name for name, _ in events][-2:] == ["message_delta", "message_stop"]
    assert "".join(e["delta"]["text"] for name, e in events if name == "content_block_delta") == completion_text(3)
