"""The mock's Anthropic Messages and OpenAI Responses routes, and its llama.cpp and SGLang dialects.

The real `anthropic` and `openai` SDKs parse what the mock sends; the counts are those of the mock's model
(llmproxy.mockbackend.textgen), and each engine's own way of reporting them is checked (docs/protocols.md §8-11).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator

import anthropic
import openai
import pytest

from llmproxy.mockbackend import TEMPLATES, MockOptions, completion_text, prompt_tokens
from llmproxy.mockbackend.textgen import (
    anthropic_tool_calls,
    ollama_estimated_input_tokens,
    responses_prompt_tokens,
    responses_tool_calls,
    tool_call_completion_tokens,
)
from tests.unit.test_mockbackend import REPO, Backend, Client, control, metric, request

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
SYSTEM = [{"type": "text", "text": "Answer in one word."}]
WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Zürich"]},
                                                             "days": {"type": "integer"}}}}
CLOCK = {"name": "get_time", "input_schema": {"type": "object", "properties": {"tz": {"type": "string"}}}}
ANTHROPIC_DIALECTS = ["vllm", "ollama", "llamacpp"]


@pytest.fixture(scope="module")
def backends() -> Iterator[dict[str, Backend]]:
    started = {d: Backend(MockOptions(dialect=d, metrics=True)) for d in ("vllm", "ollama", "llamacpp", "sglang")}
    yield started
    for backend in started.values():
        backend.close()


def claude(backend: Backend) -> anthropic.Anthropic:
    # llama.cpp closes the connection after each stream while announcing keep-alive, so a pooled connection
    # can be dead when the next request takes it: the SDK's retry on connection errors covers that, as it
    # does against the real server
    retries = 2 if backend.backend._state.options.dialect == "llamacpp" else 0
    return anthropic.Anthropic(base_url=f"http://127.0.0.1:{backend.port}", api_key="x", max_retries=retries,
                               timeout=5.0)


def events(body: bytes) -> list[tuple[str, dict]]:
    out = []
    for block in body.decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n") if line)
        if lines:
            out.append((lines["event"], json.loads(lines["data"])))
    return out


STREAMS = REPO / "tests" / "fixtures" / "streams"
NEW_DIALECT_RECORDINGS = ("vllm_messages_stream.sse", "vllm_messages_tool_use_stream.sse",
                          "ollama_messages_stream.sse", "llamacpp_messages_stream.sse",
                          "llamacpp_completion_stream.sse", "sglang_generate_stream.sse")


def test_recordings_of_these_dialects_replay_byte_for_byte() -> None:
    backend = Backend(MockOptions(fixtures_dir=str(STREAMS)))
    try:
        for name in NEW_DIALECT_RECORDINGS:
            resp = request(backend.port, "POST", "/anything", b"{}", {"x-mock-fixture": name})
            assert resp.body == (STREAMS / name).read_bytes()
            meta = json.loads((STREAMS / name).with_suffix(".json").read_text())
            assert resp.headers["content-type"] == meta["http"]["headers"]["content-type"]
    finally:
        backend.close()


# --- Anthropic Messages -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dialect", ANTHROPIC_DIALECTS)
def test_anthropic_sdk_parses_messages_create_and_stream_with_the_models_counts(backends: dict[str, Backend],
                                                                               dialect: str) -> None:
    client = claude(backends[dialect])
    body = {"model": "m", "max_tokens": 64, "system": SYSTEM, "messages": MESSAGES}
    p = prompt_tokens(body, TEMPLATES[dialect])
    message = client.messages.create(**body, extra_headers={"x-mock-tokens": "5"})
    assert message.content[0].text == completion_text(5)
    assert (message.stop_reason, message.usage.input_tokens, message.usage.output_tokens) == ("end_turn", p, 5)
    with client.messages.stream(**body, extra_headers={"x-mock-tokens": "4"}) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == completion_text(4) == final.content[0].text
    assert (final.stop_reason, final.usage.input_tokens, final.usage.output_tokens) == ("end_turn", p, 4)
    cut = client.messages.create(**{**body, "max_tokens": 2}, extra_headers={"x-mock-tokens": "5"})
    assert (cut.stop_reason, cut.usage.output_tokens) == ("max_tokens", 2)


@pytest.mark.parametrize("dialect", ANTHROPIC_DIALECTS)
def test_anthropic_sdk_accumulates_a_streamed_tool_use_turn(backends: dict[str, Backend], dialect: str) -> None:
    body = {"model": "m", "max_tokens": 256, "messages": MESSAGES, "tools": [WEATHER, CLOCK]}
    calls = anthropic_tool_calls(body)
    assert calls == [("get_weather", '{"city": "Paris", "days": 1}'), ("get_time", '{"tz": "tok0"}')]
    with claude(backends[dialect]).messages.stream(**body) as stream:
        final = stream.get_final_message()
    blocks = [(b.type, b.name, b.input) for b in final.content]
    assert blocks == [("tool_use", name, json.loads(args)) for name, args in calls]
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == tool_call_completion_tokens(calls)
    assert len({b.id for b in final.content}) == 2
    single = claude(backends[dialect]).messages.create(**body, tool_choice={"type": "tool", "name": "get_time"})
    assert [(b.type, b.name) for b in single.content] == [("tool_use", "get_time")]
    none = claude(backends[dialect]).messages.create(**body, tool_choice={"type": "none"},
                                                     extra_headers={"x-mock-tokens": "2"})
    assert [b.type for b in none.content] == ["text"] and none.stop_reason == "end_turn"


def test_messages_event_order_and_where_each_engine_puts_the_counts(backends: dict[str, Backend]) -> None:
    body = {"model": "m", "max_tokens": 64, "stream": True, "system": "Be brief.", "messages": MESSAGES}
    kinds = ["message_start", "content_block_start", "content_block_delta", "content_block_delta",
             "content_block_stop", "message_delta", "message_stop"]
    for dialect in ANTHROPIC_DIALECTS:
        resp = request(backends[dialect].port, "POST", "/v1/messages", body, {"x-mock-tokens": "2"})
        got = events(resp.body)
        assert [e for e, _ in got] == kinds and all(e == d["type"] for e, d in got)
        start, delta = got[0][1]["message"]["usage"], got[-2][1]["usage"]
        p = prompt_tokens(body, TEMPLATES[dialect])
        if dialect == "vllm":  # the real count at once, cumulative counts at the end
            assert start == {"input_tokens": p, "output_tokens": 0} and delta == {"input_tokens": p,
                                                                                  "output_tokens": 2}
        elif dialect == "ollama":  # an estimate first (len/4), the real counts at the end
            estimate = ollama_estimated_input_tokens(body)
            assert estimate != p and start == {"input_tokens": estimate, "output_tokens": 0}
            assert delta == {"input_tokens": p, "output_tokens": 2}
        else:  # llama.cpp: input counts only in message_start, output only in message_delta
            assert start == {"cache_read_input_tokens": 0, "input_tokens": p, "output_tokens": 0}
            assert delta == {"output_tokens": 2}
            assert len(resp.chunks) == 3  # one HTTP chunk per token, the closing events together


def test_cache_knobs_split_the_prompt_as_anthropic_does(backends: dict[str, Backend]) -> None:
    body = {"model": "m", "max_tokens": 64, "messages": MESSAGES}
    p = prompt_tokens(body, TEMPLATES["vllm"])
    message = claude(backends["vllm"]).messages.create(
        **body, extra_headers={"x-mock-cache-read": "10", "x-mock-cache-write": "3", "x-mock-tokens": "1"})
    usage = message.usage
    assert (usage.input_tokens, usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (p - 13, 10, 3)
    with claude(backends["llamacpp"]).messages.stream(**body, extra_headers={"x-mock-cache-read": "8"}) as stream:
        final = stream.get_final_message()
    assert (final.usage.input_tokens, final.usage.cache_read_input_tokens) == (p - 8, 8)


@pytest.mark.parametrize("dialect", ["vllm", "llamacpp"])
def test_count_tokens_counts_system_messages_and_tools(backends: dict[str, Backend], dialect: str) -> None:
    body = {"model": "m", "system": SYSTEM, "messages": MESSAGES, "tools": [WEATHER]}
    counted = claude(backends[dialect]).messages.count_tokens(**body)
    assert counted.input_tokens == prompt_tokens(body, TEMPLATES[dialect]) > prompt_tokens(
        {**body, "tools": []}, TEMPLATES[dialect])


def test_messages_errors_and_headers_in_each_engines_shape(backends: dict[str, Backend]) -> None:
    body = {"model": "m", "max_tokens": 8, "messages": MESSAGES}
    with pytest.raises(anthropic.RateLimitError) as info:
        claude(backends["vllm"]).messages.create(**body, extra_headers={"x-mock-status": "429"})
    assert info.value.body["type"] == "error" and set(info.value.body["error"]) == {"type", "message"}
    ollama = request(backends["ollama"].port, "POST", "/v1/messages", body, {"x-mock-status": "503"})
    error = json.loads(ollama.body)
    assert ollama.status == 503 and error["error"]["type"] == "overloaded_error"
    assert error["request_id"].startswith("req_") and ollama.body.endswith(b"}\n")
    missing = request(backends["vllm"].port, "POST", "/v1/messages", {"model": "m", "messages": MESSAGES})
    assert missing.status == 400 and json.loads(missing.body)["type"] == "error"
    assert request(backends["ollama"].port, "POST", "/v1/messages/count_tokens", body).status == 404
    request(backends["vllm"].port, "POST", "/_mock/reset-stats")
    claude(backends["vllm"]).messages.create(**body, extra_headers={"anthropic-beta": "prompt-caching-2024-07-31"})
    headers = dict(backends["vllm"].stats()["requests"][-1]["headers"])
    assert headers["anthropic-version"] and headers["anthropic-beta"] == "prompt-caching-2024-07-31"


def test_vllm_messages_in_band_error_ends_the_stream_with_an_error_event(backends: dict[str, Backend]) -> None:
    body = {"model": "m", "max_tokens": 64, "stream": True, "messages": MESSAGES}
    resp = request(backends["vllm"].port, "POST", "/v1/messages", body, {"x-mock-error-after": "3"})
    got = events(resp.body)
    assert [e for e, _ in got] == ["message_start", "content_block_start", "content_block_delta", "error"]
    assert got[-1][1]["error"]["type"] == "internal_error"
    unstreamed = {k: v for k, v in body.items() if k != "stream"}
    with (pytest.raises(anthropic.APIStatusError),
          claude(backends["vllm"]).messages.stream(**unstreamed, extra_headers={"x-mock-error-after": "3"}) as stream):
        stream.get_final_message()


# --- OpenAI Responses ------------------------------------------------------------------------------------

def oai(backend: Backend) -> openai.OpenAI:
    return backend.openai()


@pytest.mark.parametrize("dialect", ["vllm", "ollama"])
def test_openai_sdk_parses_responses_create_and_stream(backends: dict[str, Backend], dialect: str) -> None:
    client = oai(backends[dialect])
    p = responses_prompt_tokens({"input": "Hello", "instructions": "Be brief."}, TEMPLATES[dialect])
    resp = client.responses.create(model="m", input="Hello", instructions="Be brief.",
                                   extra_headers={"x-mock-tokens": "5"})
    assert resp.output_text == completion_text(5) and resp.status == "completed"
    assert (resp.usage.input_tokens, resp.usage.output_tokens, resp.usage.total_tokens) == (p, 5, p + 5)
    assert resp.usage.input_tokens_details.cached_tokens == 0
    assert resp.usage.output_tokens_details.reasoning_tokens == 0
    with client.responses.stream(model="m", input="Hello", instructions="Be brief.",
                                 extra_headers={"x-mock-tokens": "3"}) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * 3, "response.output_text.done",
                     "response.content_part.done", "response.output_item.done", "response.completed"]
    assert final.output_text == completion_text(3) and final.usage.output_tokens == 3
    raw = list(client.responses.create(model="m", input="Hello", stream=True, store=False,
                                       extra_headers={"x-mock-tokens": "2"}))
    assert [e.sequence_number for e in raw] == list(range(len(raw)))
    assert raw[-1].response.usage.output_tokens == 2


@pytest.mark.parametrize("dialect", ["vllm", "ollama"])
def test_responses_function_calls_stream_their_arguments(backends: dict[str, Backend], dialect: str) -> None:
    tools = [{"type": "function", "name": "get_time", "parameters": CLOCK["input_schema"]}]
    calls = responses_tool_calls({"tools": tools})
    with oai(backends[dialect]).responses.stream(model="m", input="What time is it?", tools=tools) as stream:
        deltas = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    item = final.output[0]
    assert (item.type, item.name, item.arguments) == ("function_call", "get_time", calls[0][1])
    assert "".join(deltas) == calls[0][1]
    assert final.usage.output_tokens == tool_call_completion_tokens(calls)


def test_vllm_max_output_tokens_marks_the_response_incomplete(backends: dict[str, Backend]) -> None:
    resp = oai(backends["vllm"]).responses.create(model="m", input="Hello", max_output_tokens=3,
                                                  extra_headers={"x-mock-tokens": "9"})
    assert (resp.status, resp.incomplete_details.reason, resp.usage.output_tokens) == ("incomplete",
                                                                                      "max_output_tokens", 3)
    raw = list(oai(backends["vllm"]).responses.create(model="m", input="Hello", max_output_tokens=3, stream=True,
                                                      extra_headers={"x-mock-tokens": "9"}))
    assert raw[-1].type == "response.completed" and raw[-1].response.status == "incomplete"


@pytest.mark.parametrize("dialect", ["vllm", "ollama"])
def test_previous_response_id_must_be_known_to_this_process(backends: dict[str, Backend], dialect: str) -> None:
    client = oai(backends[dialect])
    first = client.responses.create(model="m", input="My name is Ada.", extra_headers={"x-mock-tokens": "2"})
    follow = client.responses.create(model="m", input="What is my name?", previous_response_id=first.id,
                                     extra_headers={"x-mock-tokens": "2"})
    history = [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": completion_text(2)}]
    assert follow.usage.input_tokens == responses_prompt_tokens({"input": "What is my name?"}, TEMPLATES[dialect],
                                                                history)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="m", input="Hi", previous_response_id="resp_unknown")
    unstored = client.responses.create(model="m", input="Forget me.", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="m", input="Hi", previous_response_id=unstored.id)
    other = Backend(MockOptions(dialect=dialect))  # another backend, as a misrouting proxy would pick
    try:
        with pytest.raises(openai.NotFoundError) as info:
            oai(other).responses.create(model="m", input="Hi", previous_response_id=first.id)
        if dialect == "vllm":
            assert info.value.body["param"] == "response_id" and first.id in info.value.body["message"]
    finally:
        other.close()


# --- llama.cpp ------------------------------------------------------------------------------------------

def test_llamacpp_native_completion_stream_reports_tokens_and_timings(backends: dict[str, Backend]) -> None:
    port = backends["llamacpp"].port
    body = {"prompt": "The capital of France is", "n_predict": 3, "stream": True}
    resp = request(port, "POST", "/completion", body, {"x-mock-tokens": "5", "x-mock-cache-read": "2"})
    chunks = [json.loads(c[len(b"data: "):]) for c in resp.chunks]
    p = prompt_tokens({"prompt": "The capital of France is"}, TEMPLATES["llamacpp"])
    assert [c["content"] for c in chunks] == [" tok0", " tok1", " tok2", ""] and b"[DONE]" not in resp.body
    final = chunks[-1]
    assert (final["stop"], final["tokens_predicted"], final["tokens_evaluated"], final["stop_type"]) == (
        True, 3, p, "limit")
    assert (final["timings"]["cache_n"], final["timings"]["prompt_n"], final["timings"]["predicted_n"]) == (2, p - 2, 3)
    assert resp.headers["keep-alive"] == "timeout=5, max=100" and resp.headers["server"] == "llama.cpp"


def test_llamacpp_closes_the_connection_after_a_stream_despite_keep_alive(backends: dict[str, Backend]) -> None:
    client = Client(backends["llamacpp"].port)
    try:
        client.send("POST", "/completion", {"prompt": "x", "stream": True}, {"x-mock-tokens": "2"})
        resp = client.response()
        assert "connection" not in resp.headers and resp.headers["keep-alive"]
        client.sock.settimeout(2)
        assert client.sock.recv(1) == b""  # closed by the server
    finally:
        client.close()
    keep = Client(backends["llamacpp"].port)
    try:
        for _ in range(2):  # sized answers keep the connection
            keep.send("POST", "/completion", {"prompt": "x"}, {"x-mock-tokens": "1"})
            assert keep.response().status == 200
            keep.h11.start_next_cycle()
    finally:
        keep.close()


def test_llamacpp_openai_routes_carry_timings_and_sdk_parses_them(backends: dict[str, Backend]) -> None:
    backend = backends["llamacpp"]
    chunks = list(backend.openai().chat.completions.create(
        model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True},
        extra_headers={"x-mock-tokens": "3"}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == completion_text(3)
    p = prompt_tokens({"messages": MESSAGES}, TEMPLATES["llamacpp"])
    assert chunks[-1].usage.prompt_tokens == p and chunks[-1].timings["predicted_n"] == 3
    plain = openai.OpenAI(base_url=f"http://127.0.0.1:{backend.port}", api_key="x", max_retries=0)
    chat = plain.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2)  # /chat/completions
    assert chat.choices[0].message.content == completion_text(2) and chat.timings["prompt_n"] == p
    text = backend.openai().completions.create(model="m", prompt="Hi", max_tokens=2)
    assert text.choices[0].text == completion_text(2) and text.timings["predicted_n"] == 2
    assert len(backend.openai().embeddings.create(model="m", input=["a", "b"]).data) == 2


def test_llamacpp_props_health_metrics_and_helpers(backends: dict[str, Backend]) -> None:
    port = backends["llamacpp"].port
    props = json.loads(request(port, "GET", "/props").body)
    assert props["total_slots"] == 4 and props["build_info"] and "default_generation_settings" in props
    assert json.loads(request(port, "GET", "/health").body) == {"status": "ok"}
    assert len(json.loads(request(port, "GET", "/slots").body)) == 4
    assert json.loads(request(port, "GET", "/models").body)["data"][0]["owned_by"] == "llamacpp"
    ids = json.loads(request(port, "POST", "/tokenize", {"content": "hello world"}).body)["tokens"]
    assert len(ids) == 2
    assert json.loads(request(port, "POST", "/detokenize", {"tokens": [1000, 1001]}).body) == {
        "content": completion_text(2)}
    assert "<|im_start|>assistant" in json.loads(request(port, "POST", "/apply-template",
                                                         {"messages": MESSAGES}).body)["prompt"]
    native = json.loads(request(port, "POST", "/embedding", {"content": "x"}).body)
    assert native[0]["index"] == 0 and len(native[0]["embedding"][0]) == 8
    assert request(port, "POST", "/infill", {"input_prefix": "a", "input_suffix": "b"}).status == 200
    control(port, "/_mock/gauges?waiting=4&running=2")
    try:
        assert (metric(port, "llamacpp:requests_deferred"), metric(port, "llamacpp:requests_processing")) == (4, 2)
    finally:
        control(port, "/_mock/gauges")
    missing = request(port, "GET", "/nope")
    assert json.loads(missing.body) == {"error": {"message": "File Not Found", "type": "not_found_error",
                                                  "code": 404}}


def test_llamacpp_metrics_need_the_metrics_option() -> None:
    backend = Backend(MockOptions(dialect="llamacpp"))
    try:
        resp = request(backend.port, "GET", "/metrics")
        assert resp.status == 501 and json.loads(resp.body)["error"]["type"] == "not_supported_error"
    finally:
        backend.close()


# --- SGLang ---------------------------------------------------------------------------------------------

def test_sglang_generate_stream_has_cumulative_text_and_meta_info(backends: dict[str, Backend]) -> None:
    port = backends["sglang"].port
    body = {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 3}, "stream": True}
    resp = request(port, "POST", "/generate", body, {"x-mock-tokens": "8", "x-mock-cache-read": "4"})
    payloads = [c[len(b"data: "):-2] for c in resp.chunks]
    assert payloads[-1] == b"[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert [c["text"] for c in chunks] == [completion_text(i) for i in (1, 2, 3)]
    meta = chunks[-1]["meta_info"]
    p = prompt_tokens({"prompt": body["text"]}, TEMPLATES["sglang"])
    assert (meta["prompt_tokens"], meta["completion_tokens"], meta["cached_tokens"]) == (p, 3, 4)
    assert meta["finish_reason"] == {"type": "length", "length": 3}
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    single = json.loads(request(port, "POST", "/generate", {"text": "x"}).body)
    assert single["text"] == completion_text(16) and single["meta_info"]["completion_tokens"] == 16


def test_sglang_info_openai_routes_and_gauges(backends: dict[str, Backend]) -> None:
    backend = backends["sglang"]
    port = backend.port
    assert json.loads(request(port, "GET", "/get_model_info").body)["is_generation"] is True
    assert "internal_states" in json.loads(request(port, "GET", "/get_server_info").body)
    chunks = list(backend.openai().chat.completions.create(model="m", messages=MESSAGES, stream=True,
                                                           stream_options={"include_usage": True},
                                                           extra_headers={"x-mock-tokens": "3"}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == completion_text(3)
    assert chunks[-1].usage.completion_tokens == 3
    control(port, "/_mock/gauges?waiting=5&running=2&kv=0.75")
    try:
        assert (metric(port, "sglang:num_queue_reqs"), metric(port, "sglang:num_running_reqs"),
                metric(port, "sglang:token_usage")) == (5, 2, 0.75)
    finally:
        control(port, "/_mock/gauges")
    assert metric(port, "sglang:token_usage") == 0.0


def test_kv_pin_reaches_vllm_and_refuses_bad_fractions(backends: dict[str, Backend]) -> None:
    port = backends["vllm"].port
    assert control(port, "/_mock/gauges?kv=0.5") == (200, {"waiting": None, "running": None, "kv": 0.5})
    try:
        assert metric(port, "vllm:kv_cache_usage_perc") == 0.5
        for bad in ("1.5", "-0.1", "nan", "", "1e-3"):
            code, body = control(port, f"/_mock/gauges?kv={bad}")
            assert code == 400 and "kv" in body["error"]
        assert metric(port, "vllm:kv_cache_usage_perc") == 0.5
    finally:
        control(port, "/_mock/gauges")


def test_llamacpp_messages_stream_fails_with_an_error_event(backends: dict[str, Backend]) -> None:
    body = {"model": "m", "max_tokens": 64, "stream": True, "messages": MESSAGES}
    resp = request(backends["llamacpp"].port, "POST", "/v1/messages", body, {"x-mock-error-after": "2"})
    got = events(resp.body)
    assert got[-1] == ("error", {"code": 500, "message": "mock generation failure (x-mock-error-after)",
                                 "type": "server_error"})
    assert "message_stop" not in [e for e, _ in got]


def test_process_serves_llamacpp_metrics_with_the_metrics_option() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "llmproxy", "mock-backend", "--dialect", "llamacpp", "--metrics"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        assert ready, "no listening line"
        line = proc.stdout.readline().decode()
        assert line.startswith("mock-backend (llamacpp) listening on http://127.0.0.1:")
        port = int(line.rsplit(":", 1)[1])
        assert b"llamacpp:requests_processing 0\n" in request(port, "GET", "/metrics").body
        assert json.loads(request(port, "GET", "/props").body)["endpoint_metrics"] is True
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


@pytest.mark.parametrize("dialect", ["llamacpp", "sglang"])
def test_new_dialects_take_the_fault_knobs(backends: dict[str, Backend], dialect: str) -> None:
    port = backends[dialect].port
    path, body = {"llamacpp": ("/completion", {"prompt": "x", "stream": True}),
                  "sglang": ("/generate", {"text": "x", "stream": True})}[dialect]
    refused = request(port, "POST", path, body, {"x-mock-status": "503", "x-mock-retry-after": "1"})
    assert refused.status == 503 and refused.headers["retry-after"] == "1" and "error" in json.loads(refused.body)
    whole = request(port, "POST", path, body, {"x-mock-tokens": "4"})
    failed = request(port, "POST", path, body, {"x-mock-tokens": "4", "x-mock-error-after": "2"})
    assert failed.chunks[:2] == whole.chunks[:2] and b'"error"' in failed.chunks[2]
    control(port, "/_mock/health/503")
    try:
        assert request(port, "GET", "/health").status == 503
    finally:
        control(port, "/_mock/health/200")
    assert request(port, "GET", "/health").status == 200
