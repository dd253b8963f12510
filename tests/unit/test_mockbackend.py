"""The mock backend: byte-faithful replays, SDK-parsable generated streams, fault knobs and stats.

The backend runs in-process on its own event loop thread (one per dialect per module), so the tests
can use blocking clients: the real openai SDK, and a small h11-based client that sees HTTP chunks.
Every socket read has a timeout.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import h11
import openai
import pytest
import uvloop

from llmproxy.mockbackend import TEMPLATES, MockOptions, completion_text, prompt_tokens, start_mock_backend
from llmproxy.mockbackend.fixtures import default_fixtures_dir, split_events
from llmproxy.mockbackend.textgen import tool_call_completion_tokens, tool_calls

TIMEOUT = 5.0
REPO = Path(__file__).resolve().parents[2]
FIXTURES = default_fixtures_dir()
CHAT = {"model": "m", "messages": [{"role": "user", "content": "What is the capital of France?"}]}


class Backend:
    """A mock backend serving from a daemon thread's event loop (uvloop, as in production)."""

    def __init__(self, options: MockOptions) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        started = asyncio.run_coroutine_threadsafe(start_mock_backend(options), self.loop)
        self.backend = started.result(TIMEOUT)
        self.port = self.backend.port

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.backend.close(), self.loop).result(TIMEOUT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()

    def stats(self) -> dict:
        return json.loads(request(self.port, "GET", "/_mock/stats").body)

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="x", max_retries=0,
                             timeout=TIMEOUT)


@pytest.fixture(scope="module")
def backends() -> Iterator[dict[str, Backend]]:
    started = {d: Backend(MockOptions(dialect=d)) for d in ("vllm", "tgi", "ollama")}
    yield started
    for backend in started.values():
        backend.close()


@pytest.fixture
def vllm(backends: dict[str, Backend]) -> Backend:
    return backends["vllm"]


class Response:
    def __init__(self, status: int, headers: dict[str, str], chunks: list[bytes]) -> None:
        self.status, self.headers, self.chunks = status, headers, chunks

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


class Client:
    """One HTTP/1.1 connection parsed by h11, the strict reference peer; exposes chunk boundaries."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.h11 = h11.Connection(h11.CLIENT)
        self._chunked = False

    def send(self, method: str, path: str, body: bytes | dict | None = None,
             headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode() if isinstance(body, dict) else body or b""
        fields = [("host", "mock"), ("content-length", str(len(data))), *(headers or {}).items()]
        out = self.h11.send(h11.Request(method=method, target=path, headers=fields))
        self.sock.sendall(out + self.h11.send(h11.Data(data=data)) + self.h11.send(h11.EndOfMessage()))

    def _event(self) -> object:
        while (event := self.h11.next_event()) is h11.NEED_DATA:
            self.h11.receive_data(self.sock.recv(65536))
        return event

    def head(self) -> tuple[int, dict[str, str]]:
        event = self._event()
        assert isinstance(event, h11.Response), event
        headers = {k.decode(): v.decode() for k, v in event.headers}
        self._chunked = headers.get("transfer-encoding") == "chunked"
        return event.status_code, headers

    def chunk(self) -> bytes | None:
        """The next whole HTTP chunk (any body piece if not chunked); None at the end of the message."""
        piece = b""
        while not isinstance(event := self._event(), h11.EndOfMessage):
            assert isinstance(event, h11.Data), event
            piece += event.data
            if event.chunk_end or not self._chunked:
                return piece
        return piece or None

    def response(self) -> Response:
        status, headers = self.head()
        chunks = []
        while (piece := self.chunk()) is not None:
            chunks.append(piece)
        return Response(status, headers, chunks)

    def close(self) -> None:
        self.sock.close()


def request(port: int, method: str, path: str, body: bytes | dict | None = None,
            headers: dict[str, str] | None = None) -> Response:
    client = Client(port)
    try:
        client.send(method, path, body, headers)
        return client.response()
    finally:
        client.close()


def sse_payloads(body: bytes) -> list[str]:
    return [e[len("data: "):] for e in body.decode().split("\n\n") if e.startswith("data: ")]


# --- fixtures replay ------------------------------------------------------------------------------

FIXTURE_NAMES = sorted(p.name for p in FIXTURES.glob("*") if p.suffix in (".sse", ".ndjson"))


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_replay_is_byte_identical_with_one_chunk_per_event(vllm: Backend, name: str) -> None:
    recorded = (FIXTURES / name).read_bytes()
    meta = json.loads((FIXTURES / name).with_suffix(".json").read_text())["http"]
    resp = request(vllm.port, "POST", "/anything", b"{}", {"x-mock-fixture": name})
    assert resp.status == meta["status"]
    assert resp.headers["content-type"] == meta["headers"]["content-type"]
    assert resp.headers["transfer-encoding"] == "chunked"
    assert resp.body == recorded
    assert resp.chunks == split_events(recorded, name)
    assert len(resp.chunks) > 3


# a traversal out of the fixtures directory must be refused, not served
@pytest.mark.parametrize("name", ["../record.py", "a/b.sse", "..", "missing.sse"])
def test_bad_fixture_names_are_refused(vllm: Backend, name: str) -> None:
    resp = request(vllm.port, "POST", "/v1/chat/completions", CHAT, {"x-mock-fixture": name})
    assert resp.status in (400, 404)
    assert "fixture" in json.loads(resp.body)["error"]["message"]


# --- generated responses through the real openai SDK -----------------------------------------------

@pytest.mark.parametrize("dialect", ["vllm", "tgi", "ollama"])
@pytest.mark.parametrize("include_usage", [False, True])
def test_sdk_parses_chat_stream_and_usage_chunk_only_when_asked(backends: dict[str, Backend], dialect: str,
                                                                 include_usage: bool) -> None:
    client = backends[dialect].openai()
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = list(client.chat.completions.create(model="m", messages=CHAT["messages"], stream=True,
                                                 extra_headers={"x-mock-tokens": "5"}, **extra))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == completion_text(5)
    usage_chunks = [c for c in chunks if not c.choices]
    if include_usage:
        assert len(usage_chunks) == 1 and chunks[-1] is usage_chunks[0]
        assert usage_chunks[0].usage.completion_tokens == 5
        assert usage_chunks[0].usage.prompt_tokens == prompt_tokens(CHAT, TEMPLATES[dialect])
    else:
        assert usage_chunks == []
        assert all(c.usage is None for c in chunks)


@pytest.mark.parametrize("dialect", ["vllm", "tgi", "ollama"])
def test_sdk_parses_non_streaming_chat_completions_and_models(backends: dict[str, Backend],
                                                               dialect: str) -> None:
    client = backends[dialect].openai()
    chat = client.chat.completions.create(model="m", messages=CHAT["messages"], max_tokens=7)
    assert chat.choices[0].message.content == completion_text(7)
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (prompt_tokens(CHAT, TEMPLATES[dialect]), 7)
    text = client.completions.create(model="m", prompt="The capital of France is")
    assert text.choices[0].text == completion_text(16)
    assert text.usage.prompt_tokens == prompt_tokens({"prompt": "The capital of France is"}, TEMPLATES[dialect])
    stream = list(client.completions.create(model="m", prompt="x", stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in stream if c.choices) == completion_text(16)
    assert stream[-1].usage.completion_tokens == 16
    assert len(client.models.list().data) == 1


@pytest.mark.parametrize("dialect", ["vllm", "ollama"])
def test_sdk_parses_embeddings_in_float_and_base64(backends: dict[str, Backend], dialect: str) -> None:
    client = backends[dialect].openai()
    default = client.embeddings.create(model="m", input=["a", "b"])  # the SDK asks for base64
    floats = client.embeddings.create(model="m", input=["a", "b"], encoding_format="float")
    assert [e.embedding for e in default.data] == [e.embedding for e in floats.data]
    assert len(floats.data) == 2 and len(floats.data[0].embedding) == 8
    assert floats.data[0].embedding != floats.data[1].embedding


def test_vllm_models_report_max_model_len(vllm: Backend) -> None:
    card = json.loads(request(vllm.port, "GET", "/v1/models").body)["data"][0]
    assert card["id"] == "Qwen/Qwen2.5-7B-Instruct" and card["max_model_len"] > 0


def test_vllm_continuous_usage_is_cumulative_on_every_chunk(vllm: Backend) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    payloads = sse_payloads(request(vllm.port, "POST", "/v1/chat/completions", body,
                                    {"x-mock-tokens": "3"}).body)
    assert payloads[-1] == "[DONE]"
    completions = [json.loads(p)["usage"]["completion_tokens"] for p in payloads[:-1]]
    assert completions == [0, 1, 2, 3, 3]


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Zürich", "Genève"]},
                                     "days": {"type": "integer"}}}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string"}}}}}


def test_vllm_streams_tool_calls_like_the_hermes_parser_and_counts_the_markup(vllm: Backend) -> None:
    body = {**CHAT, "tools": [WEATHER, CLOCK]}
    expected = tool_calls(body)
    assert expected == [("get_weather", '{"city": "Zürich", "days": 1}'), ("get_time", '{"tz": "tok0"}')]
    chunks = list(vllm.openai().chat.completions.create(model="m", messages=CHAT["messages"], tools=body["tools"],
                                                        stream=True, stream_options={"include_usage": True},
                                                        extra_headers={"x-mock-tokens": "2"}))
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = calls.setdefault(delta.index, {"ids": [], "name": None, "arguments": ""})
            if delta.id:  # id, type and name come once, on a call's first delta
                call["ids"].append(delta.id)
                call["name"] = delta.function.name
                assert delta.type == "function" and delta.function.arguments is None
            else:
                assert delta.function.name is None
                call["arguments"] += delta.function.arguments
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == expected
    assert all(len(c["ids"]) == 1 and c["ids"][0].startswith("chatcmpl-tool-") for c in calls.values())
    finish = chunks[-2].choices[0]
    assert (finish.finish_reason, finish.delta.content, finish.delta.tool_calls) == ("tool_calls", None, None)
    n = tool_call_completion_tokens(expected)
    assert chunks[-1].usage.completion_tokens == n > len(chunks)  # markup tokens send no chunk
    single = vllm.openai().chat.completions.create(model="m", messages=CHAT["messages"], tools=body["tools"])
    assert single.choices[0].finish_reason == "tool_calls" and single.usage.completion_tokens == n
    assert [(c.function.name, c.function.arguments) for c in single.choices[0].message.tool_calls] == expected


@pytest.mark.parametrize("extra,calls", [({"tool_choice": "none"}, 0), ({"parallel_tool_calls": False}, 1),
                                         ({"tool_choice": "required"}, 2)])
def test_vllm_tool_choice_none_answers_text_and_parallel_false_keeps_one_call(vllm: Backend, extra: dict,
                                                                              calls: int) -> None:
    body = {**CHAT, "tools": [WEATHER, CLOCK], **extra}
    message = json.loads(request(vllm.port, "POST", "/v1/chat/completions", body).body)["choices"][0]["message"]
    assert len(message["tool_calls"]) == calls == len(tool_calls(body))
    assert (message["content"] is None) == (calls > 0)


def test_vllm_continuous_usage_follows_the_tokens_of_a_tool_call_stream(vllm: Backend) -> None:
    body = {**CHAT, "tools": [CLOCK], "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    payloads = [json.loads(p) for p in sse_payloads(request(vllm.port, "POST", "/v1/chat/completions", body).body)[:-1]]
    counts = [p["usage"]["completion_tokens"] for p in payloads]
    n = tool_call_completion_tokens(tool_calls(body))
    assert counts[0] == 0 and counts[-2:] == [n, n] and counts == sorted(counts)
    assert len(set(counts)) == len(counts) - 1  # one chunk per token that produced a delta, then the usage chunk


@pytest.mark.parametrize("dialect,path,body,error_at,tail", [
    ("vllm", "/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": True}}, 3,
     [b'data: {"error": {"message": "Internal server error", "type": "InternalServerError", "param": null, '
      b'"code": 500}}\n\n', b"data: [DONE]\n\n"]),
    ("vllm", "/v1/completions", {"prompt": "x", "stream": True}, 2, [b'"code": 500}}\n\n', b"data: [DONE]\n\n"]),
    ("tgi", "/generate_stream", {"inputs": "x", "parameters": {"details": True}}, 2,
     [b'"error_type":"generation"}\n\n']),
    ("tgi", "/v1/chat/completions", {**CHAT, "stream": True}, 1,
     [b'"http_status_code":422}}\n\n', b"data: [DONE]\n\n"]),
    ("ollama", "/api/chat", CHAT, 4, [b'(x-mock-error-after)"}\n']),
    ("ollama", "/api/generate", {"prompt": "x"}, 0, [b'(x-mock-error-after)"}\n']),
])
def test_error_after_sends_n_events_then_the_dialects_in_band_error(backends: dict[str, Backend], dialect: str,
                                                                     path: str, body: dict, error_at: int,
                                                                     tail: list[bytes]) -> None:
    port = backends[dialect].port
    whole = request(port, "POST", path, body, {"x-mock-tokens": "6"})
    failed = request(port, "POST", path, body, {"x-mock-tokens": "6", "x-mock-error-after": str(error_at)})
    assert failed.status == whole.status == 200
    assert failed.chunks[:error_at] == whole.chunks[:error_at]  # the same events up to the failure...
    assert len(failed.chunks) == error_at + len(tail)  # ...then only the error (and the terminator)
    assert all(chunk.endswith(end) for chunk, end in zip(failed.chunks[error_at:], tail, strict=True))
    assert b"usage" not in b"".join(failed.chunks[error_at:])
    # a stream that ends before the N-th event is sent whole
    assert request(port, "POST", path, body, {"x-mock-tokens": "6", "x-mock-error-after": "1000"}).body == whole.body


def test_sdk_raises_on_vllm_in_band_error_after_the_content_it_got(vllm: Backend) -> None:
    text = ""
    with pytest.raises(openai.APIError, match="Internal server error"):
        for chunk in vllm.openai().chat.completions.create(model="m", messages=CHAT["messages"], stream=True,
                                                           extra_headers={"x-mock-error-after": "3"}):
            text += chunk.choices[0].delta.content or ""
    assert text == completion_text(2)  # role chunk, tok0, tok1, then the error


def test_vllm_rejects_stream_options_without_stream(vllm: Backend) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        vllm.openai().chat.completions.create(model="m", messages=CHAT["messages"],
                                              stream_options={"include_usage": True})
    assert info.value.body["code"] == 400 and "stream=True" in info.value.body["message"]


def test_vllm_tokenize_health_version_and_request_id(vllm: Backend) -> None:
    tokens = json.loads(request(vllm.port, "POST", "/tokenize", CHAT).body)
    assert tokens["count"] == prompt_tokens(CHAT, TEMPLATES["vllm"]) == len(tokens["tokens"])
    health = request(vllm.port, "GET", "/health")
    assert (health.status, health.body) == (200, b"")
    assert "version" in json.loads(request(vllm.port, "GET", "/version").body)
    resp = request(vllm.port, "POST", "/v1/chat/completions", CHAT, {"x-request-id": "req-42"})
    assert resp.headers["x-request-id"] == "req-42"
    assert json.loads(resp.body)["id"] == "chatcmpl-req-42"


# --- dialect specifics ----------------------------------------------------------------------------

@pytest.mark.parametrize("path,field", [("/api/chat", "message"), ("/api/generate", "response")])
def test_ollama_ndjson_ends_with_done_line_carrying_counts(backends: dict[str, Backend], path: str,
                                                           field: str) -> None:
    port = backends["ollama"].port
    body = {"model": "llama3.2", "prompt": "Why is the sky blue?", "messages": CHAT["messages"]}
    resp = request(port, "POST", path, body, {"x-mock-tokens": "4"})
    assert resp.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in resp.body.decode().splitlines()]
    assert len(resp.chunks) == len(lines) == 5
    assert [line["done"] for line in lines] == [False] * 4 + [True]
    done = lines[-1]
    assert (done["prompt_eval_count"], done["eval_count"]) == (prompt_tokens(body, TEMPLATES["ollama"]), 4)
    assert done["model"] == "llama3.2"
    single = json.loads(request(port, "POST", path, {**body, "stream": False}).body)
    assert single["done"] is True and single["eval_count"] == 16
    text = single[field]["content"] if field == "message" else single[field]
    assert text == completion_text(16)


def test_ollama_misc_endpoints_and_error_shapes(backends: dict[str, Backend]) -> None:
    port = backends["ollama"].port
    assert request(port, "GET", "/").body == b"Ollama is running"
    head = request(port, "HEAD", "/")  # the Go client's heartbeat
    assert (head.status, head.body, head.headers["content-length"]) == (200, b"", "17")
    assert json.loads(request(port, "GET", "/api/tags").body)["models"][0]["name"] == "llama3.2:latest"
    assert "version" in json.loads(request(port, "GET", "/api/version").body)
    assert "details" in json.loads(request(port, "POST", "/api/show", {"model": "x"}).body)
    assert len(json.loads(request(port, "POST", "/api/embed", {"input": ["a"]}).body)["embeddings"]) == 1
    native = request(port, "POST", "/api/chat", CHAT, {"x-mock-status": "503"})
    assert native.status == 503 and isinstance(json.loads(native.body)["error"], str)
    compat = json.loads(request(port, "POST", "/v1/chat/completions", CHAT, {"x-mock-status": "500"}).body)
    assert compat["error"]["type"] == "api_error" and compat["error"]["code"] is None


@pytest.mark.parametrize("details", [False, True])
def test_tgi_generate_stream_has_details_only_when_asked(backends: dict[str, Backend], details: bool) -> None:
    body = {"inputs": "What is Deep Learning?", "parameters": {"max_new_tokens": 3, "details": details}}
    resp = request(backends["tgi"].port, "POST", "/generate_stream", body)
    assert resp.headers["x-accel-buffering"] == "no"
    events = [json.loads(p) for p in sse_payloads(resp.body)]  # no [DONE] on the native route
    assert [e["index"] for e in events] == [1, 2, 3]
    assert all(e["details"] is None and e["generated_text"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == completion_text(3)
    if details:
        assert events[-1]["details"] == {"finish_reason": "length", "generated_tokens": 3, "seed": None,
                                         "input_length": prompt_tokens(body, TEMPLATES["tgi"])}
    else:
        assert events[-1]["details"] is None


def test_tgi_chat_chunk_shape_and_generate(backends: dict[str, Backend]) -> None:
    port = backends["tgi"].port
    body = {**CHAT, "model": "tgi", "stream": True}
    payloads = sse_payloads(request(port, "POST", "/v1/chat/completions", body).body)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(list(c)[:2] == ["object", "id"] and c["id"] == "" and c["usage"] is None for c in chunks)
    assert all(c["choices"][0]["delta"]["role"] == "assistant" for c in chunks)
    assert chunks[0]["model"] == "HuggingFaceH4/zephyr-7b-beta"
    generated = request(port, "POST", "/generate", {"inputs": "hi", "parameters": {"details": True}})
    assert json.loads(generated.body)["details"]["generated_tokens"] == 16
    assert generated.headers["x-generated-tokens"] == "16"
    assert json.loads(request(port, "GET", "/info").body)["model_id"] == "HuggingFaceH4/zephyr-7b-beta"
    tokens = json.loads(request(port, "POST", "/tokenize", {"inputs": "internationalisation"}).body)
    assert "".join(t["text"] for t in tokens) == "internationalisation" and len(tokens) == 3  # 8 + 8 + 4
    chat = json.loads(request(port, "POST", "/chat_tokenize", CHAT).body)
    assert len(chat["tokenize_response"]) == prompt_tokens(CHAT, TEMPLATES["tgi"]) > len(tokens)


@pytest.mark.parametrize("dialect,shape", [("vllm", dict), ("tgi", str), ("ollama", str)])
def test_unknown_path_is_404_in_dialect_error_shape(backends: dict[str, Backend], dialect: str,
                                                    shape: type) -> None:
    resp = request(backends[dialect].port, "GET", "/nope")
    assert resp.status == 404
    assert isinstance(json.loads(resp.body)["error"], shape)


# --- fault knobs ----------------------------------------------------------------------------------

STREAM = {**CHAT, "stream": True}


def test_status_knob_answers_error_with_retry_after_before_any_body(vllm: Backend) -> None:
    resp = request(vllm.port, "POST", "/v1/chat/completions", STREAM,
                   {"x-mock-status": "503", "x-mock-retry-after": "2"})
    assert (resp.status, resp.headers["retry-after"]) == (503, "2")
    assert json.loads(resp.body)["error"]["code"] == 503
    with pytest.raises(openai.RateLimitError):
        vllm.openai().chat.completions.create(model="m", messages=CHAT["messages"],
                                              extra_headers={"x-mock-status": "429"})


def test_stall_sends_n_events_then_nothing_and_counts_the_client_disconnect(vllm: Backend) -> None:
    before = vllm.stats()["client_disconnects_midstream"]
    client = Client(vllm.port)
    client.send("POST", "/v1/chat/completions", STREAM, {"x-mock-stall-after": "2"})
    assert client.head()[0] == 200
    assert b"assistant" in client.chunk() and b"tok0" in client.chunk()
    client.sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        client.chunk()
    assert vllm.stats()["requests_running"] >= 1
    t_close = time.monotonic()
    client.close()
    deadline = time.monotonic() + TIMEOUT
    while (stats := vllm.stats())["client_disconnects_midstream"] == before:
        assert time.monotonic() < deadline, "disconnect never noticed"
        time.sleep(0.01)
    assert stats["last_disconnect_monotonic"] >= t_close - 0.001
    # control endpoints are not logged, so the stalled request is still the last entry
    assert stats["requests"][-1]["outcome"] == "client_disconnect"


@pytest.mark.parametrize("stream,limit", [(True, 700), (False, 100), (True, 0)])
def test_reset_after_bytes_delivers_exactly_n_body_bytes_then_rst(vllm: Backend, stream: bool,
                                                                  limit: int) -> None:
    client = Client(vllm.port)
    client.send("POST", "/v1/chat/completions", {**CHAT, "stream": stream},
                {"x-mock-reset-after-bytes": str(limit)})
    client.head()
    received = b""
    with pytest.raises(ConnectionResetError):
        while (piece := client.chunk()) is not None:
            received += piece
    client.close()
    assert len(received) == limit
    full = request(vllm.port, "POST", "/v1/chat/completions", {**CHAT, "stream": stream}).body
    assert full.startswith(received) and len(full) > limit


def test_close_delimited_body_has_no_length_and_ends_with_close(vllm: Backend) -> None:
    normal = request(vllm.port, "POST", "/v1/chat/completions", STREAM)
    resp = request(vllm.port, "POST", "/v1/chat/completions", STREAM, {"x-mock-close-delimited": "1"})
    assert "content-length" not in resp.headers and "transfer-encoding" not in resp.headers
    assert resp.headers["connection"] == "close"
    assert resp.body == normal.body


def test_gate_holds_each_event_until_released_and_counts_early_releases(vllm: Backend) -> None:
    token = uuid.uuid4().hex
    client = Client(vllm.port)
    client.send("POST", "/v1/chat/completions", STREAM, {"x-mock-gate": token, "x-mock-tokens": "3"})
    client.head()
    assert b'"role":"assistant"' in client.chunk()  # the first event is never gated
    client.sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        client.chunk()
    client.sock.settimeout(TIMEOUT)
    request(vllm.port, "POST", f"/_mock/release/{token}")
    assert b"tok0" in client.chunk()
    for _ in range(10):  # releases made before the stream waits are kept, not lost
        request(vllm.port, "POST", f"/_mock/release/{token}")
    rest = []
    while (piece := client.chunk()) is not None:
        rest.append(piece)
    assert [b"tok1" in rest[0], b"tok2" in rest[1], rest[-1]] == [True, True, b"data: [DONE]\n\n"]
    client.close()


def test_gate_releases_made_before_the_request_are_counted(vllm: Backend) -> None:
    token = uuid.uuid4().hex
    for _ in range(2):
        request(vllm.port, "POST", f"/_mock/release/{token}")
    resp = request(vllm.port, "POST", "/v1/chat/completions", STREAM,
                   {"x-mock-gate": token, "x-mock-tokens": "1"})
    assert len(resp.chunks) == 3  # role, tok0 (release 1), [DONE] (release 2)


def test_delays_pace_the_head_and_each_event(vllm: Backend) -> None:
    client = Client(vllm.port)
    start = time.monotonic()
    client.send("POST", "/v1/chat/completions", STREAM,
                {"x-mock-first-byte-delay-ms": "150", "x-mock-delay-ms": "40", "x-mock-tokens": "2"})
    client.head()
    client.chunk()
    first = time.monotonic() - start
    arrivals = []
    while client.chunk() is not None:
        arrivals.append(time.monotonic() - start)
    end = time.monotonic() - start
    client.close()
    assert 0.14 <= first < 1.0
    # role, tok0, tok1, [DONE]: three paced gaps after the first event
    assert len(arrivals) == 3 and arrivals[-1] - first >= 3 * 0.04 - 0.005
    assert all(b - a >= 0.03 for a, b in zip([first, *arrivals], arrivals, strict=False))
    assert end - arrivals[-1] < 0.03  # the end of the body is not paced like an event


def test_metrics_gauges_follow_live_requests(vllm: Backend) -> None:
    def gauge(name: str) -> float:
        text = request(vllm.port, "GET", "/metrics").body.decode()
        return float(re.search(rf"^vllm:{name}\{{[^}}]*\}} (\S+)$", text, re.M).group(1))

    waiting, running = Client(vllm.port), Client(vllm.port)
    waiting.send("POST", "/v1/chat/completions", STREAM, {"x-mock-first-byte-delay-ms": "60000"})
    running.send("POST", "/v1/chat/completions", STREAM, {"x-mock-stall-after": "1"})
    running.head()
    assert (gauge("num_requests_waiting"), gauge("num_requests_running")) == (1.0, 1.0)
    waiting.close()
    running.close()
    deadline = time.monotonic() + TIMEOUT
    while gauge("num_requests_waiting") + gauge("num_requests_running"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert vllm.stats()["client_disconnects_before_response"] >= 1


# --- connection handling and stats ----------------------------------------------------------------

def test_keep_alive_pipelining_and_connection_close(vllm: Backend) -> None:
    client = Client(vllm.port)
    raw = (b"GET /health HTTP/1.1\r\nhost: m\r\n\r\n"
           b"POST /v1/chat/completions HTTP/1.1\r\nhost: m\r\ncontent-length: %d\r\n\r\n%b"
           b"GET /v1/models HTTP/1.1\r\nhost: m\r\nconnection: close\r\n\r\n"
           b"GET /health HTTP/1.1\r\nhost: m\r\n\r\n") % (len(json.dumps(CHAT)), json.dumps(CHAT).encode())
    client.sock.sendall(raw)
    data = b""
    while chunk := client.sock.recv(65536):  # the server closes after the third response
        data += chunk
    client.close()
    assert data.count(b"HTTP/1.1 200 OK") == 3
    assert data.index(b"content-length: 0") < data.index(b"chat.completion") < data.index(b"max_model_len")
    assert data.rstrip().endswith(b"}]}]}")


def test_stats_log_requests_with_body_and_response_hashes(backends: dict[str, Backend]) -> None:
    backend = backends["tgi"]
    request(backend.port, "POST", "/_mock/reset-stats")
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 2}}
    resp = request(backend.port, "POST", "/generate", body, {"x-custom": "Value"})
    request(backend.port, "GET", "/info")
    stats = backend.stats()
    assert stats["requests_total"] == 2 and stats["connections_total"] >= 2
    entry = stats["requests"][0]
    assert (entry["method"], entry["path"], entry["status"], entry["outcome"]) == ("POST", "/generate", 200,
                                                                                  "complete")
    assert ["x-custom", "Value"] in entry["headers"]
    assert entry["body"] == json.dumps(body)
    assert entry["body_sha256"] == hashlib.sha256(json.dumps(body).encode()).hexdigest()
    assert entry["response_body_sha256"] == hashlib.sha256(resp.body).hexdigest()
    request(backend.port, "POST", "/_mock/reset-stats")
    assert backend.stats()["requests_total"] == 0


def test_many_concurrent_slow_streams_are_paced_by_timers(vllm: Backend) -> None:
    async def one(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = json.dumps(STREAM).encode()
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: m\r\nconnection: close\r\n"
                     b"x-mock-delay-ms: 20\r\nx-mock-tokens: 10\r\n"
                     b"content-length: %d\r\n\r\n%b" % (len(body), body))
        data = await reader.read()
        writer.close()
        return data

    async def many() -> list[bytes]:
        return await asyncio.wait_for(asyncio.gather(*(one(vllm.port) for _ in range(300))), 20)

    start = time.monotonic()
    results = asyncio.run(many())
    assert all(r.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n") for r in results)
    assert time.monotonic() - start < 5  # 12 paced gaps of 20 ms each, run side by side


# --- health control, pinned gauges, several models ----------------------------------------------

@pytest.fixture
def fresh() -> Iterator[list[Backend]]:
    """Backends a test reconfigures, so a failure cannot leave the shared ones unhealthy or pinned."""
    started: list[Backend] = []
    yield started
    for backend in started:
        backend.close()


def start(fresh: list[Backend], **options: object) -> Backend:
    backend = Backend(MockOptions(**options))  # type: ignore[arg-type]
    fresh.append(backend)
    return backend


def control(port: int, path: str) -> tuple[int, dict]:
    resp = request(port, "POST", path)
    assert resp.headers["content-type"] == "application/json"
    return resp.status, json.loads(resp.body)


HEALTH_PATHS = {"vllm": ["/health", "/ping"], "tgi": ["/health", "/ping"], "ollama": ["/api/version", "/"]}


@pytest.mark.parametrize("dialect", ["vllm", "tgi", "ollama"])
def test_health_control_switches_every_health_route_and_survives_reset(fresh: list[Backend],
                                                                       dialect: str) -> None:
    port = start(fresh, dialect=dialect).port
    assert control(port, "/_mock/health/503") == (200, {"health": 503})
    request(port, "POST", "/_mock/reset-stats")  # must not heal the backend
    for path in HEALTH_PATHS[dialect]:
        resp = request(port, "GET", path)
        assert resp.status == 503
        if dialect == "vllm":  # a bare status, like vLLM's dead-engine answer
            assert resp.body == b"" and "content-type" not in resp.headers
        elif dialect == "tgi":
            assert json.loads(resp.body) == {"error": "unhealthy", "error_type": "healthcheck"}
        else:
            assert isinstance(json.loads(resp.body)["error"], str)
    assert control(port, "/_mock/health/200") == (200, {"health": 200})
    assert all(request(port, "GET", path).status == 200 for path in HEALTH_PATHS[dialect])


def test_health_status_is_answered_verbatim_and_counted_like_any_request(fresh: list[Backend]) -> None:
    backend = start(fresh, dialect="ollama")
    control(backend.port, "/_mock/health/500")
    head = request(backend.port, "HEAD", "/")  # the Go client's heartbeat fails too
    assert (head.status, head.body) == (500, b"")
    assert request(backend.port, "POST", "/api/chat", CHAT, {"x-mock-tokens": "1"}).status == 200
    control(backend.port, "/_mock/health/200")
    assert request(backend.port, "GET", "/api/version").status == 200
    stats = backend.stats()
    assert [(r["method"], r["path"], r["status"]) for r in stats["requests"]] == [
        ("HEAD", "/", 500), ("POST", "/api/chat", 200), ("GET", "/api/version", 200)]


def test_loading_control_answers_every_route_503_but_the_model_lists_and_survives_reset(fresh: list[Backend]) -> None:
    port = start(fresh, dialect="llamacpp").port
    assert control(port, "/_mock/loading/1") == (200, {"loading": True})
    request(port, "POST", "/_mock/reset-stats")  # must not end the loading
    for method, path in [("GET", "/props"), ("GET", "/health"), ("POST", "/completion"), ("GET", "/info"),
                         ("GET", "/api/version")]:  # unknown paths too: llama-server answers before routing
        resp = request(port, method, path, {"prompt": "hi"} if method == "POST" else None)
        assert resp.status == 503, path
        assert json.loads(resp.body)["error"]["message"] == "Loading model", path
    assert request(port, "GET", "/v1/models").status == 200
    assert control(port, "/_mock/loading/0") == (200, {"loading": False})
    assert request(port, "GET", "/props").status == 200
    assert control(port, "/_mock/loading/2")[0] == 400


@pytest.mark.parametrize("status", ["199", "600", "abc", "", "+503", "5031"])
def test_health_control_refuses_bad_statuses(fresh: list[Backend], status: str) -> None:
    port = start(fresh, dialect="vllm").port
    code, body = control(port, f"/_mock/health/{status}")
    assert code == 400 and "health status" in body["error"]
    assert request(port, "GET", "/health").status == 200


def metric(port: int, name: str) -> float:
    text = request(port, "GET", "/metrics").body.decode()
    return float(re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M).group(1))


GENERATE_PATHS = {"vllm": "/v1/chat/completions", "tgi": "/generate_stream", "llamacpp": "/completion",
                  "sglang": "/generate"}


@pytest.mark.parametrize("dialect,waiting,running", [
    ("vllm", "vllm:num_requests_waiting", "vllm:num_requests_running"),
    ("tgi", "tgi_queue_size", "tgi_batch_current_size"),
    ("llamacpp", "llamacpp:requests_deferred", "llamacpp:requests_processing"),
    ("sglang", "sglang:num_queue_reqs", "sglang:num_running_reqs"),
])
def test_gauge_pins_replace_live_counts_until_cleared(fresh: list[Backend], dialect: str, waiting: str,
                                                      running: str) -> None:
    port = start(fresh, dialect=dialect, metrics=True).port
    assert control(port, "/_mock/gauges?waiting=7&running=3") == (200, {"waiting": 7, "running": 3, "kv": None})
    request(port, "POST", "/_mock/reset-stats")  # pins are configuration, not stats
    assert (metric(port, waiting), metric(port, running)) == (7.0, 3.0)
    assert control(port, "/_mock/gauges?waiting=2") == (200, {"waiting": 2, "running": None, "kv": None})
    body = {**STREAM, "inputs": "x", "parameters": {"max_new_tokens": 3}, "prompt": "x", "text": "x"}
    path = GENERATE_PATHS[dialect]
    stalled = Client(port)
    try:
        stalled.send("POST", path, body, {"x-mock-stall-after": "1"})
        stalled.head()
        assert (metric(port, waiting), metric(port, running)) == (2.0, 1.0)  # running is live again
    finally:
        stalled.close()
    assert control(port, "/_mock/gauges") == (200, {"waiting": None, "running": None, "kv": None})
    deadline = time.monotonic() + TIMEOUT
    while metric(port, running):
        assert time.monotonic() < deadline, "the stalled stream never left the running gauge"
        time.sleep(0.01)
    assert metric(port, waiting) == 0.0


@pytest.mark.parametrize("query", ["waiting=-1", "waiting=x", "waiting=", "running=1.5", "queue=1",
                                   "waiting=1&waiting=2", "running", "waiting=99999999999"])
def test_gauge_pins_refuse_bad_values_and_keep_the_old_pins(fresh: list[Backend], query: str) -> None:
    port = start(fresh, dialect="vllm").port
    control(port, "/_mock/gauges?waiting=5")
    code, body = control(port, f"/_mock/gauges?{query}")
    assert code == 400 and isinstance(body["error"], str)
    assert metric(port, "vllm:num_requests_waiting") == 5.0


def test_several_models_are_listed_in_each_dialects_shape(fresh: list[Backend]) -> None:
    names = ["qwen-coder", "qwen-chat"]
    for dialect in ("vllm", "tgi", "ollama"):
        backend = start(fresh, dialect=dialect, model=" qwen-coder, qwen-chat ,qwen-coder")
        assert [m.id for m in backend.openai().models.list().data] == names
        cards = json.loads(request(backend.port, "GET", "/v1/models").body)["data"]
        if dialect == "vllm":
            assert [(c["root"], c["max_model_len"], c["owned_by"]) for c in cards] == [
                (n, cards[0]["max_model_len"], "vllm") for n in names]
        if dialect == "tgi":
            assert [(c["owned_by"], c["created"]) for c in cards] == [(n, 0) for n in names]
    tags = json.loads(request(fresh[-1].port, "GET", "/api/tags").body)["models"]
    assert [(t["name"], t["model"]) for t in tags] == [(n, n) for n in names]


@pytest.mark.parametrize("dialect", ["vllm", "tgi", "ollama"])
def test_first_model_is_the_default_and_names_pass_through_without_strict(fresh: list[Backend],
                                                                            dialect: str) -> None:
    client = start(fresh, dialect=dialect, model="qwen-coder,qwen-chat").openai()
    unnamed = client.chat.completions.create(model="", messages=CHAT["messages"], max_tokens=1)
    assert unnamed.model == "qwen-coder"
    other = client.chat.completions.create(model="elsewhere", messages=CHAT["messages"], max_tokens=1)
    assert other.model == "elsewhere"


def test_strict_vllm_answers_unknown_model_like_vllm(fresh: list[Backend]) -> None:
    backend = start(fresh, dialect="vllm", model="qwen-coder,qwen-chat", strict_models=True)
    resp = request(backend.port, "POST", "/v1/chat/completions", {**CHAT, "model": "gpt-4"})
    assert resp.status == 404
    assert json.loads(resp.body) == {"error": {"message": "The model `gpt-4` does not exist.",
                                               "type": "NotFoundError", "param": "model", "code": 404}}
    with pytest.raises(openai.NotFoundError):
        backend.openai().completions.create(model="qwen", prompt="x")
    chat = backend.openai().chat.completions.create(model="qwen-chat", messages=CHAT["messages"], max_tokens=1)
    assert chat.model == "qwen-chat"
    unnamed = request(backend.port, "POST", "/v1/completions", {"prompt": "x"})
    assert (unnamed.status, json.loads(unnamed.body)["model"]) == (200, "qwen-coder")
    assert backend.stats()["requests"][0]["status"] == 404  # refusals are logged like any answer


def test_strict_ollama_answers_unknown_model_natively_and_openai_style(fresh: list[Backend]) -> None:
    backend = start(fresh, dialect="ollama", model="qwen-coder:latest,qwen-chat:7b", strict_models=True)
    native = request(backend.port, "POST", "/api/chat", {**CHAT, "model": "llama3.2"})
    assert native.status == 404
    assert json.loads(native.body) == {"error": 'model "llama3.2" not found, try pulling it first'}
    compat = request(backend.port, "POST", "/v1/chat/completions", {**CHAT, "model": "qwen-chat"})
    assert compat.status == 404  # only qwen-chat:7b is served; the implied tag is :latest
    assert json.loads(compat.body)["error"] == {"message": 'model "qwen-chat" not found, try pulling it first',
                                                "type": "not_found_error", "param": None, "code": None}
    for name in ("qwen-coder", "qwen-coder:latest", "qwen-chat:7b"):  # Ollama fills in ":latest"
        assert request(backend.port, "POST", "/api/generate", {"model": name, "stream": False}).status == 200
    assert request(backend.port, "POST", "/api/show", {"model": "nope"}).status == 404


def test_strict_tgi_stays_lenient_because_tgi_ignores_model_names(fresh: list[Backend]) -> None:
    backend = start(fresh, dialect="tgi", model="zephyr", strict_models=True)
    chat = backend.openai().chat.completions.create(model="anything", messages=CHAT["messages"], max_tokens=1)
    assert chat.choices[0].message.content == completion_text(1)


def test_model_option_parsing() -> None:
    assert MockOptions(dialect="tgi").models == ("HuggingFaceH4/zephyr-7b-beta",)
    options = MockOptions(model="a, b,a,")
    assert (options.models, options.model_name, options.strict_models) == (("a", "b"), "a", False)
    assert MockOptions(model="").model_name == "Qwen/Qwen2.5-7B-Instruct"
    with pytest.raises(ValueError, match="names no model"):
        MockOptions(model=" , ")


# --- the process --------------------------------------------------------------------------------

def test_module_entry_point_prints_listening_line_and_exits_0_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmproxy.mockbackend", "--dialect", "ollama", "--listen", "127.0.0.1:0",
         "--tokens", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        assert ready, "no listening line"
        line = proc.stdout.readline().decode()
        match = re.fullmatch(r"mock-backend \(ollama\) listening on http://127\.0\.0\.1:(\d+)\n", line)
        assert match, line
        port = int(match.group(1))
        assert request(port, "GET", "/").body == b"Ollama is running"
        lines = request(port, "POST", "/api/generate", {"prompt": "x"}).body.splitlines()
        assert json.loads(lines[-1])["eval_count"] == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_process_takes_a_model_list_and_strict_models() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmproxy.mockbackend", "--model", "qwen-coder,qwen-chat", "--strict-models"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        assert ready, "no listening line"
        port = int(proc.stdout.readline().decode().rsplit(":", 1)[1])
        models = json.loads(request(port, "GET", "/v1/models").body)["data"]
        assert [m["id"] for m in models] == ["qwen-coder", "qwen-chat"]
        assert request(port, "POST", "/v1/completions", {"model": "x", "prompt": "p"}).status == 404
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
