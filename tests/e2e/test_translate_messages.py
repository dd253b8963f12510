"""Claude Code on a chat-only backend: the real `anthropic` SDK against the real proxy, its Messages requests
translated to Chat Completions (llmproxy/translate/messages.py) for three backends that serve no Messages:
a vLLM declared `apis: [chat]`, TGI, and a generic OpenAI-compatible server (a vLLM mock behind `type: openai`).

Each feature is sent to those AND to a vLLM that serves Messages natively, with the same content: the SDK's
final message must agree (text, tool_use blocks, stop_reason, counts), and every count must be the mock's own
(llmproxy.mockbackend.textgen) for the body the backend received. Then the wire: event order, usage in
message_start, nothing buffered, pings while the backend is silent, a cut stream visibly cut, a client that
leaves or stops reading. One proxy for the module (routing by model), its pings every 0.3 s.
"""

from __future__ import annotations

import base64
import contextlib
import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from llmproxy.mockbackend import TEMPLATES, anthropic_tool_calls, completion_text, prompt_tokens
from llmproxy.mockbackend.textgen import tool_call_completion_tokens
from tests.e2e.anthropic_setup import Setup, mock_request, mock_requests, record_for, tagged
from tests.support import (
    NO_PERIODIC_PROBES,
    Proc,
    ResponseReader,
    assert_idle,
    http_get,
    http_post,
    mock_posts,
    mock_stats,
    post_request,
    raw_connect,
    rss_kib,
    start_mock,
    start_proxy,
    usage_config,
    wait_for,
)

pytestmark = pytest.mark.timeout(60)

# The backends, by the model the proxy routes to each. "native" serves Messages itself: the reference.
CHAT_BACKENDS = ("vllm-chat", "openai-chat", "tgi-chat")
MODELS = {"vllm-chat": "claude-vllm-chat", "openai-chat": "claude-openai-chat", "tgi-chat": "claude-tgi-chat",
          "native": "claude-native"}
DIALECTS = {"vllm-chat": "vllm", "openai-chat": "vllm", "tgi-chat": "tgi", "native": "vllm"}
PING_INTERVAL = 0.3
CLIENT_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    directory = tmp_path_factory.mktemp("translate-messages")
    started: list[Proc] = []
    try:
        mocks = {}
        for name, model in MODELS.items():
            mocks[name] = start_mock(DIALECTS[name], "--model", model)
            started.append(mocks[name])
        backends = [
            {"url": mocks["vllm-chat"].url, "name": "vllm-chat", "type": "vllm", "apis": ["chat"]},
            {"url": mocks["tgi-chat"].url, "name": "tgi-chat", "type": "tgi"},
            {"url": mocks["openai-chat"].url, "name": "openai-chat", "type": "openai", "apis": ["chat"]},
            {"url": mocks["native"].url, "name": "native", "type": "vllm"},
        ]
        for backend in backends:  # given, not discovered: the first request needs no probe to have answered
            backend["models"] = [MODELS[backend["name"]]]
        started.append(start_proxy(directory, backends, usage=usage_config(directory),
                                   health_check=NO_PERIODIC_PROBES,
                                   translation={"ping_interval": f"{PING_INTERVAL}s"}))
        yield Setup(started[-1], mocks, directory)
    finally:
        for proc in reversed(started):
            proc.stop()


def claude(setup: Setup) -> anthropic.Anthropic:
    """The SDK pointed at the proxy; the mocks end a text answer with EOS ("stop"), as a model does."""
    return anthropic.Anthropic(base_url=setup.proxy.url, api_key="unused", max_retries=0, timeout=CLIENT_TIMEOUT,
                               default_headers={"x-mock-eos": "1"})


# --- what one request did ----------------------------------------------------------------------------------


def received(setup: Setup, backend: str, rid: str) -> dict:
    """The body the backend got for the request with this X-Request-Id (the mock logs its first 4 KiB)."""
    logged = mock_request(setup.mocks[backend], rid)
    assert len(logged["body"]) < 4096, "the mock logs 4 KiB: the body must be smaller to be read back"
    expected_path = "/v1/messages" if backend == "native" else "/v1/chat/completions"
    assert logged["path"] == expected_path
    return json.loads(logged["body"])


def engine_prompt(setup: Setup, backend: str, rid: str) -> int:
    """The prompt tokens of what the backend received, as its engine's chat template counts them (the mock's
    model): a Messages body for the native backend, the translated chat body for the others."""
    return prompt_tokens(received(setup, backend, rid), TEMPLATES[DIALECTS[backend]])


def streamed(setup: Setup, backend: str, body: dict, **headers: str) -> tuple[anthropic.types.Message, str]:
    """messages.stream() of `body` on `backend`'s model: the SDK's final message and the request's id."""
    rid, tag = tagged()
    with claude(setup).messages.stream(**{**body, "model": MODELS[backend]},
                                       extra_headers={**tag, **headers}) as stream:
        message = stream.get_final_message()
    return message, rid


def tool_uses(message: anthropic.types.Message) -> list[tuple[str, dict]]:
    return [(block.name, block.input) for block in message.content if block.type == "tool_use"]


def text_of(message: anthropic.types.Message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def assert_recorded(setup: Setup, backend: str, rid: str, prompt: int, completion: int) -> None:
    """Exactly one record, with the backend's own counts and the two APIs."""
    record = record_for(setup, rid)
    assert (record["prompt_tokens"], record["completion_tokens"], record["usage_source"]) == (
        prompt, completion, "reported"), record
    assert (record["client_api"], record["backend_api"]) == ("messages", "messages" if backend == "native"
                                                              else "chat"), record
    assert (record["backend"], record["status"], record["termination"], record["endpoint"]) == (
        backend, 200, "--", "/v1/messages"), record


# --- the features: each on a chat-only backend and on the native one -------------------------------------

SYSTEM_BLOCKS = [{"type": "text", "text": "You are a terse assistant."},
                 {"type": "text", "text": "Answer in one sentence.", "cache_control": {"type": "ephemeral"}}]
QUESTION = {"role": "user", "content": "What is the capital of France?"}
WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}
CLOCK = {"name": "get_time", "input_schema": {"type": "object", "properties": {"tz": {"type": "string"}}}}
# A 1x1 transparent PNG.
PIXEL = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d49444154789c6360000002"
    "0000050001e226059b0000000049454e44ae426082")).decode()

FEATURES: dict[str, tuple[dict, int]] = {  # name: (body, x-mock-tokens)
    "plain": ({"max_tokens": 64, "messages": [QUESTION]}, 5),
    "system-string": ({"max_tokens": 64, "system": "You are a terse assistant.", "messages": [QUESTION]}, 4),
    "system-blocks": ({"max_tokens": 64, "system": SYSTEM_BLOCKS, "messages": [QUESTION]}, 4),
    "image": ({"max_tokens": 64, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PIXEL}}]}]}, 3),
    "max-tokens": ({"max_tokens": 3, "messages": [QUESTION]}, 8),
}


@pytest.mark.parametrize("backend", CHAT_BACKENDS)
@pytest.mark.parametrize("feature", FEATURES)
def test_a_text_feature_gives_the_sdk_what_the_native_backend_gives(setup: Setup, feature: str, backend: str) -> None:
    body, tokens = FEATURES[feature]
    knobs = {"x-mock-tokens": str(tokens)}
    native, native_rid = streamed(setup, "native", body, **knobs)
    message, rid = streamed(setup, backend, body, **knobs)
    generated = min(tokens, body["max_tokens"])
    assert text_of(message) == text_of(native) == completion_text(generated)
    assert [block.type for block in message.content] == [block.type for block in native.content] == ["text"]
    # The mock's TGI always stops on its budget ("length"), whatever the model would say: max_tokens there.
    cut = body["max_tokens"] < tokens
    assert native.stop_reason == ("max_tokens" if cut else "end_turn")
    assert message.stop_reason == ("max_tokens" if cut or backend == "tgi-chat" else "end_turn")
    assert message.stop_sequence is None and message.role == "assistant" and message.model == MODELS[backend]
    # Each counts the prompt it received with its template: the native vLLM the Messages body, the others the
    # chat body the proxy made of it.
    prompt = engine_prompt(setup, backend, rid)
    assert (message.usage.input_tokens, message.usage.output_tokens) == (prompt, generated)
    assert (native.usage.input_tokens, native.usage.output_tokens) == (engine_prompt(setup, "native", native_rid),
                                                                       generated)
    if DIALECTS[backend] == "vllm" and feature != "system-blocks":
        # Same model, same template, same text: the same count. System blocks legitimately differ: the chat body
        # joins them with a newline (one system message), the native engine's template concatenates them.
        assert message.usage.input_tokens == native.usage.input_tokens
    assert_recorded(setup, backend, rid, prompt, generated)
    assert_recorded(setup, "native", native_rid, native.usage.input_tokens, generated)


@pytest.mark.parametrize("backend", CHAT_BACKENDS)
def test_the_system_prompt_and_the_image_reach_the_chat_backend_in_chat_form(setup: Setup, backend: str) -> None:
    body = {"max_tokens": 16, "system": SYSTEM_BLOCKS, "messages": [FEATURES["image"][0]["messages"][0]]}
    _, rid = streamed(setup, backend, body, **{"x-mock-tokens": "2"})
    sent = received(setup, backend, rid)
    assert sent["messages"] == [
        {"role": "system", "content": "You are a terse assistant.\nAnswer in one sentence."},
        {"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                     {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}}]}]
    continuous = {"include_usage": True, "continuous_usage_stats": True}
    assert sent["stream"] is True and sent["stream_options"] == (
        continuous if backend == "vllm-chat" else {"include_usage": True})  # only vLLM takes continuous usage
    assert (sent["model"], sent["max_tokens"]) == (MODELS[backend], 16)


FIRST_TURN = {"max_tokens": 256, "tools": [WEATHER, CLOCK],
              "messages": [{"role": "user", "content": "Weather in Paris, and the time there?"}]}


def tool_result_turn(first: dict, message: anthropic.types.Message) -> dict:
    """The follow-up of a tool_use answer: the calls echoed, a tool_result for each, and tool_choice none (the
    mock answers with text, as a model does once it has what it asked for)."""
    calls = [{"type": "tool_use", "id": b.id, "name": b.name, "input": b.input}
             for b in message.content if b.type == "tool_use"]
    results = [{"type": "tool_result", "tool_use_id": c["id"], "content": f"{c['name']}: 21 degrees"} for c in calls]
    return {**first, "tool_choice": {"type": "none"}, "messages": [
        *first["messages"], {"role": "assistant", "content": calls}, {"role": "user", "content": results}]}


@pytest.mark.parametrize("backend", ["vllm-chat", "openai-chat"])  # the TGI mock makes no tool calls
def test_a_two_step_tool_use_conversation_gives_the_sdk_what_the_native_backend_gives(setup: Setup,
                                                                                      backend: str) -> None:
    expected_calls = [(name, json.loads(arguments)) for name, arguments in anthropic_tool_calls(FIRST_TURN)]
    assert len(expected_calls) == 2
    native, native_rid = streamed(setup, "native", FIRST_TURN)
    message, rid = streamed(setup, backend, FIRST_TURN)
    # The input_json_delta fragments accumulated by the SDK into each block's input.
    assert tool_uses(message) == tool_uses(native) == expected_calls
    assert [b.type for b in message.content] == [b.type for b in native.content] == ["tool_use", "tool_use"]
    assert message.stop_reason == native.stop_reason == "tool_use"
    output = tool_call_completion_tokens(anthropic_tool_calls(FIRST_TURN))
    assert message.usage.output_tokens == native.usage.output_tokens == output
    assert message.usage.input_tokens == engine_prompt(setup, backend, rid)
    assert native.usage.input_tokens == engine_prompt(setup, "native", native_rid)
    assert_recorded(setup, backend, rid, message.usage.input_tokens, output)
    sent = received(setup, backend, rid)
    assert [tool["function"]["name"] for tool in sent["tools"]] == ["get_weather", "get_time"]

    second = tool_result_turn(FIRST_TURN, message)
    answer, rid = streamed(setup, backend, second, **{"x-mock-tokens": "6"})
    native_answer, native_rid = streamed(setup, "native", tool_result_turn(FIRST_TURN, native),
                                         **{"x-mock-tokens": "6"})
    assert text_of(answer) == text_of(native_answer) == completion_text(6)
    assert answer.stop_reason == native_answer.stop_reason == "end_turn"
    assert answer.usage.output_tokens == native_answer.usage.output_tokens == 6
    # The calls and their results reached the chat backend as tool_calls and tool messages answering them.
    sent = received(setup, backend, rid)
    ids = [b.id for b in message.content]
    assert [call["id"] for call in sent["messages"][1]["tool_calls"]] == ids
    assert [(m["role"], m["tool_call_id"]) for m in sent["messages"][2:]] == [("tool", i) for i in ids]
    assert sent["tool_choice"] == "none"
    # Input counts differ from the native engine's here, legitimately: the chat template renders the calls as
    # tool_calls JSON and each result as a message of its own; the native one renders the blocks' text. Each is
    # exact for what its engine received.
    assert answer.usage.input_tokens == engine_prompt(setup, backend, rid) > message.usage.input_tokens
    assert native_answer.usage.input_tokens == engine_prompt(setup, "native", native_rid)
    assert_recorded(setup, backend, rid, answer.usage.input_tokens, 6)


@pytest.mark.parametrize("backend", ["vllm-chat", "openai-chat"])  # the mock's TGI ignores stop strings
def test_a_stop_sequence_ends_the_answer_with_stop_reason_stop_sequence(setup: Setup, backend: str) -> None:
    body = {"max_tokens": 64, "stop_sequences": ["never", "tok3"], "messages": [QUESTION]}
    message, rid = streamed(setup, backend, body, **{"x-mock-tokens": "8"})
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "tok3")
    assert text_of(message) == completion_text(3)  # the mock stops before the token holding the string
    assert received(setup, backend, rid)["stop"] == ["never", "tok3"]
    assert_recorded(setup, backend, rid, engine_prompt(setup, backend, rid), 3)


# --- the wire ----------------------------------------------------------------------------------------------


def sse_blocks(data: bytes) -> list[tuple[str, dict]]:
    """The complete events of a Messages stream as (event name, data); an unfinished last one is left out."""
    events = []
    for block in data.decode("utf-8", "replace").split("\n\n")[:-1]:
        fields = dict(line.split(": ", 1) for line in block.split("\n") if line)
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def raw_stream(setup: Setup, backend: str, body: dict, **headers: str) -> tuple[httpx.Response, bytes, str,
                                                                                   Exception | None]:
    """The raw bytes of a streamed Messages request (httpx, read as they come): the response, the body, the
    request's id and the error that ended the read, if any."""
    rid, tag = tagged()
    chunks: list[bytes] = []
    error = None
    with httpx.Client(timeout=CLIENT_TIMEOUT) as client, client.stream(
            "POST", f"{setup.proxy.url}/v1/messages", json={**body, "model": MODELS[backend], "stream": True},
            headers={"x-mock-eos": "1", "anthropic-version": "2023-06-01", **tag, **headers}) as response:
        try:
            for data in response.iter_raw():
                chunks.append(data)
        except httpx.HTTPError as exc:
            error = exc
    return response, b"".join(chunks), rid, error


def without_pings(events: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    return [(name, data) for name, data in events if name != "ping"]


@pytest.mark.parametrize("backend", CHAT_BACKENDS)
def test_the_raw_stream_is_in_messages_order_with_the_prompt_count_where_the_engine_gives_it_early(
        setup: Setup, backend: str) -> None:
    response, data, rid, error = raw_stream(setup, backend, {"max_tokens": 64, "messages": [QUESTION]},
                                            **{"x-mock-tokens": "4"})
    assert error is None and response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    events = without_pings(sse_blocks(data))
    assert [name for name, _ in events] == ["message_start", "content_block_start", *["content_block_delta"] * 4,
                                            "content_block_stop", "message_delta", "message_stop"]
    prompt = engine_prompt(setup, backend, rid)
    start, delta = events[0][1]["message"], events[-2][1]
    # vLLM is asked for usage on every chunk (continuous_usage_stats): its role chunk has the prompt's count.
    # TGI and a generic server give it only at the end: message_start says 0, message_delta the real count.
    early = prompt if backend == "vllm-chat" else 0
    assert start["usage"] == {"input_tokens": early, "output_tokens": 0}
    assert (start["role"], start["content"], start["stop_reason"], start["model"]) == (
        "assistant", [], None, MODELS[backend])
    assert delta["usage"] == {"input_tokens": prompt, "output_tokens": 4}
    assert [e["index"] for name, e in events if name.startswith("content_block")] == [0] * 6
    assert "".join(e["delta"]["text"] for name, e in events if name == "content_block_delta") == completion_text(4)


def test_tool_arguments_stream_as_input_json_deltas_on_their_own_block(setup: Setup) -> None:
    response, data, _, error = raw_stream(setup, "vllm-chat", FIRST_TURN)
    assert error is None and response.status_code == 200
    events = without_pings(sse_blocks(data))
    starts = [e for name, e in events if name == "content_block_start"]
    assert [(s["index"], s["content_block"]["type"], s["content_block"]["name"]) for s in starts] == [
        (0, "tool_use", "get_weather"), (1, "tool_use", "get_time")]
    for index, (_, arguments) in enumerate(anthropic_tool_calls(FIRST_TURN)):
        fragments = [e["delta"]["partial_json"] for name, e in events
                     if name == "content_block_delta" and e["index"] == index]
        assert len(fragments) > 1, "the arguments come in pieces, as the engine streams them"
        assert json.loads("".join(fragments)) == json.loads(arguments)
    # Each block closes before the next opens.
    order = [(name, e.get("index")) for name, e in events if name in ("content_block_start", "content_block_stop")]
    assert order == [("content_block_start", 0), ("content_block_stop", 0), ("content_block_start", 1),
                     ("content_block_stop", 1)]
    assert events[-2][1]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}


# How each chat backend's stream of n tokens comes out of the gate (the first event is free, each next one needs a
# release): what the client gets for the free event, then for each release ([] for the usage-only chunk, which
# becomes no event of its own: its counts go in message_delta, once [DONE] ends the stream).
def gated_schedule(backend: str, n: int) -> list[list[str]]:
    delta, stop = ["content_block_delta"], ["content_block_stop", "message_delta", "message_stop"]
    if backend == "tgi-chat":  # TGI has no role chunk: its first token opens the message
        return [["message_start", "content_block_start", *delta], *[delta] * (n - 1), [], stop]
    return [["message_start"], ["content_block_start", *delta], *[delta] * (n - 1), [], stop]


def read_events(reader: ResponseReader) -> list[str]:
    """The names of the events of the next HTTP chunk that is not only pings (b"" at the end of the body)."""
    while True:
        chunk = reader.read_chunk()
        assert chunk is not None, "stream truncated"
        names = [name for name, _ in without_pings(sse_blocks(chunk))]
        if names or chunk == b"":
            return names


def quiet(sock: socket.socket, seconds: float) -> bool:
    """Nothing but pings arrives for `seconds` (bytes already buffered by the reader are not looked at)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            return True
        data = sock.recv(65536, socket.MSG_PEEK)
        if b"event: ping" not in data or b"content_block" in data or b"message_" in data:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.parametrize("backend", ["vllm-chat", "tgi-chat"])
def test_each_translated_event_reaches_the_client_while_the_backend_holds_the_next(setup: Setup,
                                                                                  backend: str) -> None:
    rid, tag = tagged()
    gate = f"hold-{rid}"
    mock = setup.mocks[backend]
    body = json.dumps({"model": MODELS[backend], "max_tokens": 64, "stream": True, "messages": [QUESTION]}).encode()
    schedule = gated_schedule(backend, 3)
    with raw_connect(setup.proxy.port, timeout=5.0) as sock:
        sock.sendall(post_request("/v1/messages", body, {**tag, "x-mock-gate": gate, "x-mock-tokens": "3"}))
        reader = ResponseReader(sock).read_head()
        assert reader.status == 200
        for step, expected in enumerate(schedule):
            if step:
                http_post(f"{mock.url}/_mock/release/{gate}")
            if not expected:  # an event that maps to nothing: the client gets nothing for it
                assert quiet(sock, 0.15), f"release {step}: the usage-only chunk gave the client an event"
                continue
            # A proxy that buffered would time this read out: the backend sends nothing more until released.
            assert read_events(reader) == expected, f"release {step}"
            if step < len(schedule) - 1:
                assert mock_request(mock, rid)["outcome"] is None, "the engine is still holding the rest"
        assert read_events(reader) == []  # the end of the chunked body
    wait_for(lambda: mock_request(mock, rid)["outcome"] == "complete")


@pytest.mark.parametrize("backend", CHAT_BACKENDS)
def test_a_backend_silent_between_events_gets_pings_and_the_sdk_reads_through_them(setup: Setup,
                                                                                  backend: str) -> None:
    # Each event after the first comes after 0.6 s of silence: a ping is due 0.3 s (and a sweeper tick) into it.
    knobs = {"x-mock-tokens": "1", "x-mock-delay-ms": "600"}
    response, data, rid, error = raw_stream(setup, backend, {"max_tokens": 64, "messages": [QUESTION]}, **knobs)
    assert error is None and response.status_code == 200
    events = sse_blocks(data)
    names = [name for name, _ in events]
    assert names.count("ping") >= 2, names
    assert names[0] == "message_start" and names[-1] == "message_stop", "pings only inside the message"
    assert all(data == {"type": "ping"} for name, data in events if name == "ping")
    assert [name for name, _ in without_pings(events)] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
        "message_stop"]
    assert data.count(b"event: ping\ndata: ") == names.count("ping")  # well-formed as events, nothing else
    assert record_for(setup, rid)["completion_tokens"] == 1
    message, _ = streamed(setup, backend, {"max_tokens": 64, "messages": [QUESTION]}, **knobs)
    assert text_of(message) == completion_text(1)


@pytest.mark.parametrize("backend", CHAT_BACKENDS)
def test_a_backend_silent_after_its_head_gets_message_start_and_pings_until_the_client_leaves(
        setup: Setup, backend: str) -> None:
    rid, tag = tagged()
    mock = setup.mocks[backend]
    body = json.dumps({"model": MODELS[backend], "max_tokens": 64, "stream": True, "messages": [QUESTION]}).encode()
    with raw_connect(setup.proxy.port) as sock:
        # The head, then nothing (a long prefill): the client must hear from the proxy all the same.
        sock.sendall(post_request("/v1/messages", body, {**tag, "x-mock-stall-after": "0"}))
        reader = ResponseReader(sock).read_head()
        assert reader.status == 200
        first = sse_blocks(reader.read_chunk())
        assert [name for name, _ in first] == ["message_start", "ping"]
        assert first[0][1]["message"]["model"] == MODELS[backend]
        assert first[0][1]["message"]["usage"] == {"input_tokens": 0, "output_tokens": 0}  # nothing counted yet
        assert [name for name, _ in sse_blocks(reader.read_chunk())] == ["ping"]
        assert mock_request(mock, rid)["outcome"] is None
    wait_for(lambda: mock_request(mock, rid)["outcome"] == "client_disconnect", timeout=1.0)
    assert record_for(setup, rid)["termination"] == "CD"


@pytest.mark.parametrize("backend", CHAT_BACKENDS)
def test_a_plain_create_gives_the_sdk_what_the_native_backend_gives(setup: Setup, backend: str) -> None:
    results = {}
    for name in ("native", backend):
        rid, tag = tagged()
        message = claude(setup).messages.create(model=MODELS[name], max_tokens=64, messages=[QUESTION],
                                                extra_headers={**tag, "x-mock-tokens": "5"})
        results[name] = message, rid
    (native, native_rid), (message, rid) = results["native"], results[backend]
    assert text_of(message) == text_of(native) == completion_text(5)
    assert message.stop_reason == ("max_tokens" if backend == "tgi-chat" else native.stop_reason)
    assert message.type == "message" and message.id.startswith("msg_") and message.model == MODELS[backend]
    prompt = engine_prompt(setup, backend, rid)
    assert (message.usage.input_tokens, message.usage.output_tokens) == (prompt, 5)
    assert native.usage.input_tokens == engine_prompt(setup, "native", native_rid)
    if DIALECTS[backend] == "vllm":
        assert message.usage.input_tokens == native.usage.input_tokens
    assert "stream" not in received(setup, backend, rid)
    assert_recorded(setup, backend, rid, prompt, 5)
    assert record_for(setup, rid)["is_stream"] is False


@pytest.mark.parametrize("backend", ["vllm-chat", "openai-chat"])
def test_a_plain_create_with_tools_gives_the_same_tool_use_blocks(setup: Setup, backend: str) -> None:
    native = claude(setup).messages.create(**{**FIRST_TURN, "model": MODELS["native"]})
    message = claude(setup).messages.create(**{**FIRST_TURN, "model": MODELS[backend]})
    assert tool_uses(message) == tool_uses(native) == [
        (name, json.loads(arguments)) for name, arguments in anthropic_tool_calls(FIRST_TURN)]
    assert message.stop_reason == native.stop_reason == "tool_use"
    assert message.usage.output_tokens == native.usage.output_tokens


# --- failures --------------------------------------------------------------------------------------------

ERRORS = {400: anthropic.BadRequestError, 500: anthropic.InternalServerError}


@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "create"])
@pytest.mark.parametrize("status", ERRORS)
@pytest.mark.parametrize("backend", CHAT_BACKENDS)
def test_a_backend_error_reaches_the_sdk_as_its_class_with_the_backends_status_and_message(
        setup: Setup, backend: str, status: int, streaming: bool) -> None:
    rid, tag = tagged()
    body = {"model": MODELS[backend], "max_tokens": 64, "messages": [QUESTION]}
    headers = {**tag, "x-mock-status": str(status)}
    with pytest.raises(ERRORS[status]) as raised:
        if streaming:
            with claude(setup).messages.stream(**body, extra_headers=headers) as stream:
                stream.until_done()
        else:
            claude(setup).messages.create(**body, extra_headers=headers)
    error = raised.value
    assert error.status_code == status
    phrase = {400: "Bad Request", 500: "Internal Server Error"}[status]
    # The backend's message, in Anthropic's envelope (vLLM says it in an OpenAI error object, TGI as a string).
    assert error.body == {"type": "error", "error": {
        "type": "invalid_request_error" if status == 400 else "api_error", "message": f"{phrase} (x-mock-status)"}}
    assert len(mock_requests(setup.mocks[backend], rid)) == 1, "an error status is not retried"
    record = record_for(setup, rid)
    assert (record["status"], record["usage_source"], record["prompt_tokens"]) == (status, "none", 0)


UNTRANSLATABLE = {
    "document": ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Summarize this."},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "A short text."}}]}]},
        "`messages[0].content[1]`"),
    "web-search": ({"messages": [QUESTION], "tools": [
        WEATHER, {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]}, "`tools[1].type`"),
}


@pytest.mark.parametrize("backend", CHAT_BACKENDS)
@pytest.mark.parametrize("case", UNTRANSLATABLE)
def test_an_untranslatable_request_is_a_400_naming_the_field_and_reaches_no_backend(setup: Setup, case: str,
                                                                                    backend: str) -> None:
    body, field = UNTRANSLATABLE[case]
    rid, tag = tagged()
    with pytest.raises(anthropic.BadRequestError) as raised, claude(setup).messages.stream(
            model=MODELS[backend], max_tokens=64, **body, extra_headers=tag) as stream:
        stream.until_done()
    assert raised.value.status_code == 400
    assert raised.value.body["type"] == "error"
    assert raised.value.body["error"]["type"] == "invalid_request_error"
    assert raised.value.body["error"]["message"].startswith(field)
    assert not any(mock_requests(mock, rid) for mock in setup.mocks.values())


@pytest.mark.parametrize("backend", CHAT_BACKENDS)
def test_a_stream_reset_midway_ends_without_message_stop_and_is_still_recorded(setup: Setup, backend: str) -> None:
    knobs = {"x-mock-tokens": "30", "x-mock-reset-after-bytes": "1500"}
    response, data, rid, error = raw_stream(setup, backend, {"max_tokens": 64, "messages": [QUESTION]}, **knobs)
    assert response.status_code == 200 and isinstance(error, httpx.RemoteProtocolError)
    events = without_pings(sse_blocks(data))
    names = [name for name, _ in events]
    assert names[0] == "message_start" and "message_stop" not in names and "message_delta" not in names
    deltas = names.count("content_block_delta")
    assert 0 < deltas < 30
    record = record_for(setup, rid)
    assert (record["status"], record["termination"]) == (200, "SD")
    # vLLM's running counts (continuous usage) are the backend's own; the others reported nothing yet: estimated,
    # the output being the deltas relayed. Either way the output is what the client got.
    assert record["usage_source"] == ("reported" if backend == "vllm-chat" else "estimated")
    assert record["completion_tokens"] == deltas and record["prompt_tokens"] > 0
    with pytest.raises(anthropic.APIConnectionError):
        streamed(setup, backend, {"max_tokens": 64, "messages": [QUESTION]}, **knobs)


@pytest.mark.parametrize("backend", CHAT_BACKENDS)
def test_an_error_inside_the_stream_is_an_error_event_the_sdk_raises(setup: Setup, backend: str) -> None:
    knobs = {"x-mock-tokens": "30", "x-mock-error-after": "3"}
    response, data, rid, error = raw_stream(setup, backend, {"max_tokens": 64, "messages": [QUESTION]}, **knobs)
    assert error is None and response.status_code == 200
    events = without_pings(sse_blocks(data))
    assert events[-1][0] == "error" and events[-1][1]["type"] == "error"
    assert "message_stop" not in [name for name, _ in events]
    record_for(setup, rid)
    with pytest.raises(anthropic.APIStatusError) as raised:
        streamed(setup, backend, {"max_tokens": 64, "messages": [QUESTION]}, **knobs)
    assert raised.value.body["type"] == "error"


@pytest.mark.parametrize("backend", CHAT_BACKENDS)
def test_a_client_that_leaves_midstream_closes_the_backends_stream_within_a_second(setup: Setup,
                                                                                 backend: str) -> None:
    rid, tag = tagged()
    mock = setup.mocks[backend]
    body = json.dumps({"model": MODELS[backend], "max_tokens": 4000, "stream": True, "messages": [QUESTION]}).encode()
    sock = raw_connect(setup.proxy.port)
    try:
        sock.sendall(post_request("/v1/messages", body, {**tag, "x-mock-tokens": "2000", "x-mock-delay-ms": "50"}))
        reader = ResponseReader(sock).read_head()
        while "content_block_delta" not in read_events(reader):
            pass
    finally:
        sock.close()
    left_at = time.monotonic()
    wait_for(lambda: mock_request(mock, rid)["outcome"] == "client_disconnect", timeout=1.0)
    assert mock_stats(mock)["last_disconnect_monotonic"] - left_at < 1.0
    record = record_for(setup, rid)
    assert record["termination"] == "CD" and 0 < record["completion_tokens"] < 2000
    assert_idle(setup.proxy)


def test_a_client_that_stops_reading_keeps_the_proxys_memory_bounded(setup: Setup) -> None:
    # On TGI: at ab20b57 the vLLM mock's chat route takes time quadratic in x-mock-tokens before it answers.
    rid, tag = tagged()
    mock = setup.mocks["tgi-chat"]
    rss_before = rss_kib(setup.proxy.pid)
    body = json.dumps({"model": MODELS["tgi-chat"], "max_tokens": 1_000_000, "stream": True,
                       "messages": [QUESTION]}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    try:
        sock.settimeout(5.0)
        sock.connect(("127.0.0.1", setup.proxy.port))
        # ~500 000 chunks of ~250 bytes (over 100 MB) offered as fast as the backend can; the client reads nothing.
        sock.sendall(post_request("/v1/messages", body, {**tag, "x-mock-tokens": "500000"}))
        time.sleep(3.0)
        growth_mib = (rss_kib(setup.proxy.pid) - rss_before) / 1024
        assert mock_request(mock, rid)["outcome"] is None, "the backend must still be held back"
        reader = ResponseReader(sock).read_head()
        assert reader.status == 200 and "message_start" in read_events(reader), "it must really be streaming"
    finally:
        sock.close()
    assert growth_mib < 50, f"proxy RSS grew {growth_mib:.1f} MiB while the client did not read"
    wait_for(lambda: mock_request(mock, rid)["outcome"] == "client_disconnect", timeout=2.0)
    assert_idle(setup.proxy)


def test_the_proxy_is_idle_after_the_module(setup: Setup) -> None:
    assert_idle(setup.proxy)
    assert http_get(setup.proxy.url + "/health")[0] == 200


# --- hand-made chat streams, replayed by a mock of their own ------------------------------------------------

HUGE = 9 << 20  # one SSE event larger than the translator follows (translate/events.py MAX_EVENT, 8 MiB)
# Two parallel calls as Ollama's OpenAI-compatible stream sends them: each whole, each numbered 0 (#15457).
OLLAMA_CALLS = [("get_weather", '{"city":"Paris","days":2}'), ("get_time", '{"tz":"Europe/Paris"}')]
THOUGHTS = 12  # chunks of a reasoning model's thinking (vLLM --reasoning-parser: delta.reasoning_content)


@pytest.fixture(scope="module")
def odd_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Proc]]:
    """A vLLM mock replaying hand-made chat streams (x-mock-fixture) behind a proxy of its own, chat only."""
    directory = tmp_path_factory.mktemp("odd-streams")
    fixtures = directory / "fixtures"
    fixtures.mkdir()
    base = {"id": "chatcmpl-odd", "object": "chat.completion.chunk", "created": 1, "model": "claude-odd"}

    def event(delta: dict, finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return b"data: " + json.dumps({**base, "choices": [choice]}).encode() + b"\n\n"

    huge = event({"role": "assistant", "content": ""}) + event({"content": "x" * HUGE}) + event({}, "stop") \
        + b"data: [DONE]\n\n"
    write_fixture(fixtures, "huge_event.sse", huge)
    write_fixture(fixtures, "reused_index.sse", event({"role": "assistant", "content": ""}) + b"".join(
        event({"tool_calls": [{"id": f"call_{i}", "index": 0, "type": "function",
                               "function": {"name": name, "arguments": arguments}}]})
        for i, (name, arguments) in enumerate(OLLAMA_CALLS)) + event({}, "tool_calls") + b"data: [DONE]\n\n")
    write_fixture(fixtures, "thinking.sse", event({"role": "assistant", "content": ""}) + b"".join(
        event({"reasoning_content": f" thought{i}"}) for i in range(THOUGHTS)) + event({"content": "Paris."}, "stop")
        + b"data: [DONE]\n\n")
    mock = Proc(["mock-backend", "--dialect", "vllm", "--listen", "127.0.0.1:0", "--model", "claude-odd"],
                env={"LLMPROXY_FIXTURES_DIR": str(fixtures)}).wait_listening()
    try:
        proxy = start_proxy(directory, [{"url": mock.url, "name": "odd", "type": "vllm", "apis": ["chat"],
                                         "models": ["claude-odd"]}], health_check=NO_PERIODIC_PROBES,
                             translation={"ping_interval": f"{PING_INTERVAL}s"})
        try:
            yield mock, proxy
        finally:
            proxy.stop()
    finally:
        mock.stop()


def write_fixture(directory: Path, name: str, data: bytes) -> None:
    (directory / name).write_bytes(data)
    meta: dict[str, Any] = {"http": {"status": 200, "headers": {"content-type": "text/event-stream"}}}
    (directory / name).with_suffix(".json").write_text(json.dumps(meta))


def test_parallel_calls_all_numbered_0_reach_the_sdk_as_one_tool_use_block_each(odd_backend) -> None:
    _, proxy = odd_backend
    sdk = anthropic.Anthropic(base_url=proxy.url, api_key="unused", max_retries=0, timeout=CLIENT_TIMEOUT)
    with sdk.messages.stream(model="claude-odd", max_tokens=64, messages=[QUESTION], tools=[WEATHER, CLOCK],
                             extra_headers={"x-mock-fixture": "reused_index.sse"}) as stream:
        message = stream.get_final_message()
    assert [(b.id, b.name, b.input) for b in message.content] == [
        (f"call_{i}", name, json.loads(arguments)) for i, (name, arguments) in enumerate(OLLAMA_CALLS)]
    assert message.stop_reason == "tool_use"


# --- defects found outside the translator, fixed ------------------------------------------------------------


def test_a_translator_failure_never_passes_chat_chunks_to_a_messages_client(odd_backend) -> None:
    _, proxy = odd_backend
    chunks: list[bytes] = []
    with httpx.Client(timeout=CLIENT_TIMEOUT) as client, client.stream(
            "POST", f"{proxy.url}/v1/messages", headers={"x-mock-fixture": "huge_event.sse"},
            json={"model": "claude-odd", "max_tokens": 64, "stream": True, "messages": [QUESTION]}) as response:
        try:
            for data in response.iter_raw():
                chunks.append(data)
        except httpx.HTTPError:
            pass  # a cut is an acceptable end here
    data = b"".join(chunks)
    assert response.status_code == 200 and data.startswith(b"event: message_start")
    assert b"chat.completion.chunk" not in data and b"[DONE]" not in data


def test_a_client_hears_a_ping_every_interval_while_the_backend_streams_what_maps_to_nothing(odd_backend) -> None:
    _, proxy = odd_backend
    body = {"model": "claude-odd", "max_tokens": 64, "stream": True, "messages": [QUESTION]}
    # One thinking chunk every 0.15 s for 1.8 s: the backend is never silent for a ping interval (0.3 s).
    with httpx.Client(timeout=CLIENT_TIMEOUT) as client, client.stream(
            "POST", f"{proxy.url}/v1/messages", json=body,
            headers={"x-mock-fixture": "thinking.sse", "x-mock-delay-ms": "150"}) as response:
        data = b"".join(response.iter_raw())
    events = [name for name, _ in sse_blocks(data)]
    assert events[0] == "message_start" and events[-1] == "message_stop"
    thinking = events[:events.index("content_block_start")]
    assert thinking.count("ping") >= 3, f"the client heard {thinking} in {THOUGHTS * 0.15:.1f} s of thinking"


def test_a_retry_from_a_translated_backend_to_a_native_one_relays_the_native_stream(setup: Setup,
                                                                                     tmp_path: Path) -> None:
    # routing.translate always: a chat-capable backend is translated to, a Messages-only one is not.
    loading = start_mock("vllm", "--model", MODELS["native"])
    try:
        proxy = start_proxy(tmp_path, [
            {"url": loading.url, "name": "chat", "type": "vllm", "apis": ["chat"], "models": [MODELS["native"]]},
            {"url": setup.mocks["native"].url, "name": "native", "type": "vllm", "apis": ["messages"],
             "models": [MODELS["native"]]},
        ], usage={"metering": False}, routing={"translate": "always"}, health_check=NO_PERIODIC_PROBES)
        try:
            http_post(f"{loading.url}/_mock/loading/1")  # it answers 503 (retried elsewhere) from now on
            sdk = anthropic.Anthropic(base_url=proxy.url, api_key="unused", max_retries=0, timeout=CLIENT_TIMEOUT)
            answers = []
            for _ in range(2):  # round robin: one of them goes to the 503 backend first
                with sdk.messages.stream(model=MODELS["native"], max_tokens=64, messages=[QUESTION],
                                         extra_headers={"x-mock-tokens": "3"}) as stream:
                    answers.append(stream.get_final_message())
            assert mock_posts(loading), "no attempt was retried"
        finally:
            proxy.stop()
    finally:
        loading.stop()
    assert [(text_of(m), m.stop_reason) for m in answers] == [(completion_text(3), "end_turn")] * 2


def test_count_tokens_for_a_model_on_a_chat_only_backend_is_not_sent_to_it(setup: Setup) -> None:
    rid, tag = tagged()
    with contextlib.suppress(anthropic.NotFoundError):  # a 404 of the proxy's own is one acceptable end
        claude(setup).messages.count_tokens(model=MODELS["vllm-chat"], messages=[QUESTION], extra_headers=tag)
    assert not [r for r in mock_requests(setup.mocks["vllm-chat"], rid) if r["path"].startswith("/v1/messages")]
