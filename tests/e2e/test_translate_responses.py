"""Codex CLI's API on chat-only backends: the openai SDK's Responses calls through the real proxy, translated to
Chat Completions for a vLLM that serves only chat (`apis: [chat]`), a TGI (chat is all it serves of the two)
and a generic OpenAI-compatible server declared with `apis: [chat]`.

What a client sees is checked with the SDK's own stream accumulator; what the backend got, with the mocks'
/_mock/stats (its chat request, and its own token counts, which the response's usage and the usage record
must equal). The vLLM mock ends with EOS ("stop") when told `x-mock-eos: 1`, so its answers complete; the TGI
mock always runs out of tokens ("length"), so its answers are incomplete, as TGI's would be.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from llmproxy.mockbackend import TEMPLATES, completion_text, prompt_tokens, word
from llmproxy.mockbackend.textgen import tool_call_completion_tokens, tool_calls
from tests.e2e.test_responses import CODEX_HEADERS, CODEX_TOOLS
from tests.support import (
    NO_PERIODIC_PROBES,
    Proc,
    assert_idle,
    http_post,
    mock_posts,
    mock_stats,
    send_request,
    start_mock,
    start_proxy,
    usage_config,
    usage_record,
    usage_records,
    wait_for,
)

TIMEOUT = 10.0
MODELS = {"vllm": "coder-vllm", "tgi": "coder-tgi", "openai": "coder-openai"}  # one per backend: routed by it
DIALECTS = {"vllm": "vllm", "tgi": "tgi", "openai": "vllm"}  # the mock behind each backend
EOS = {"x-mock-eos": "1"}


@dataclass
class Setup:
    proxy: Proc
    mocks: dict[str, Proc]  # by backend name
    directory: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    directory = tmp_path_factory.mktemp("translate-responses")
    mocks: dict[str, Proc] = {}
    try:
        for name, model in MODELS.items():
            mocks[name] = start_mock(DIALECTS[name], "--model", model)
        backends = [{"url": mocks["vllm"].url, "name": "vllm", "type": "vllm", "apis": ["chat"],
                     "models": [MODELS["vllm"]]},
                    {"url": mocks["tgi"].url, "name": "tgi", "type": "tgi", "models": [MODELS["tgi"]]},
                    {"url": mocks["openai"].url, "name": "openai", "type": "openai", "apis": ["chat"],
                     "models": [MODELS["openai"]]}]
        # No retries and no ejection: each error a test provokes reaches the client as the backend answered it.
        proxy = start_proxy(directory, backends, usage=usage_config(directory), routing={"retries": 0},
                            health_check={**NO_PERIODIC_PROBES, "passive": {"enabled": False}})
        yield Setup(proxy, mocks, directory)
        proxy.stop()
    finally:
        for mock in mocks.values():
            mock.stop()


@pytest.fixture(autouse=True)
def _idle_after(request):
    """After each test that used the module's proxy, nothing is left in flight or checked out."""
    yield
    if "setup" in request.fixturenames:
        assert_idle(request.getfixturevalue("setup").proxy)


def client(setup: Setup, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{setup.proxy.url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT,
                         default_headers={**EOS, **headers})


class Counts:
    """What a mock counted between its creation and `taken()`: its own prompt and generated tokens."""

    def __init__(self, mock: Proc) -> None:
        self.mock = mock
        self.before = self._now()

    def _now(self) -> tuple[int, int, int]:
        stats = mock_stats(self.mock)
        return stats["prompt_tokens_total"], stats["generation_tokens_total"], len(mock_posts(self.mock))

    def taken(self) -> tuple[int, int]:
        """(prompt, completion) the backend counted for the one request sent since."""
        prompt, completion, posts = (now - before for now, before in zip(self._now(), self.before, strict=True))
        assert posts == 1, f"the backend got {posts} requests, not one"
        return prompt, completion


def last_request(mock: Proc) -> tuple[str, dict]:
    """The path and the JSON body of the last request a client sent the mock."""
    sent = mock_posts(mock)[-1]
    return sent["path"], json.loads(sent["body"])


def record_of(setup: Setup, client_request_id: str) -> dict:
    """The one usage record of the request the client sent with this X-Request-Id."""
    found = wait_for(lambda: [r for r in usage_records(setup.directory)
                              if r["client_request_id"] == client_request_id])
    assert len(found) == 1, found
    return found[0]


def posts_everywhere(setup: Setup) -> int:
    return sum(len(mock_posts(mock)) for mock in setup.mocks.values())


# --- text, streamed and whole -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["vllm", "openai"])
def test_a_stream_on_a_chat_only_backend_completes_with_its_text_and_the_backends_usage(setup, backend):
    counts = Counts(setup.mocks[backend])
    with client(setup).responses.stream(model=MODELS[backend], instructions="Answer briefly.",
                                        input="What is the capital of France?") as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    prompt, completion = counts.taken()
    assert final.status == "completed" and final.model == MODELS[backend]
    assert final.output_text == "".join(deltas) == completion_text(16)
    assert (final.usage.input_tokens, final.usage.output_tokens, final.usage.total_tokens) == (
        prompt, completion, prompt + completion)
    assert completion == 16
    path, sent = last_request(setup.mocks[backend])
    assert path == "/v1/chat/completions"
    assert sent["messages"] == [{"role": "system", "content": "Answer briefly."},
                                {"role": "user", "content": "What is the capital of France?"}]
    assert prompt == prompt_tokens(sent, TEMPLATES["vllm"])  # the mock's count is of what it was sent


def test_a_stream_on_tgi_carries_its_text_and_usage_and_ends_incomplete_as_tgi_stops_at_its_budget(setup):
    counts = Counts(setup.mocks["tgi"])
    with client(setup).responses.stream(model=MODELS["tgi"], instructions="Answer briefly.",
                                        input="What is the capital of France?") as stream:
        events = list(stream)
    prompt, completion = counts.taken()
    last = events[-1]
    # The SDK's get_final_response() wants response.completed; an incomplete response comes as this event.
    assert last.type == "response.incomplete"
    assert last.response.incomplete_details.reason == "max_output_tokens"
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert last.response.output_text == "".join(deltas) == completion_text(16)
    assert (last.response.usage.input_tokens, last.response.usage.output_tokens) == (prompt, completion)
    assert last_request(setup.mocks["tgi"])[0] == "/v1/chat/completions"


@pytest.mark.parametrize(("backend", "status"), [("vllm", "completed"), ("openai", "completed"),
                                                 ("tgi", "incomplete")])
def test_a_response_not_streamed_has_the_text_and_the_backends_usage(setup, backend, status):
    counts = Counts(setup.mocks[backend])
    response = client(setup).responses.create(model=MODELS[backend], input="Hello there")
    prompt, completion = counts.taken()
    assert response.object == "response" and response.status == status
    assert response.output_text == completion_text(16)
    assert (response.usage.input_tokens, response.usage.output_tokens) == (prompt, completion)
    path, sent = last_request(setup.mocks[backend])
    assert path == "/v1/chat/completions" and "stream" not in sent


@pytest.mark.parametrize("stream", [True, False])
def test_max_output_tokens_cuts_the_answer_and_the_response_is_incomplete(setup, stream):
    counts = Counts(setup.mocks["vllm"])
    sdk = client(setup)
    if stream:
        events = list(sdk.responses.create(model=MODELS["vllm"], input="Tell me a story", max_output_tokens=5,
                                           stream=True))
        assert events[-1].type == "response.incomplete"
        response = events[-1].response
    else:
        response = sdk.responses.create(model=MODELS["vllm"], input="Tell me a story", max_output_tokens=5)
    prompt, completion = counts.taken()
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == completion_text(5)
    assert (response.usage.input_tokens, response.usage.output_tokens, completion) == (prompt, 5, 5)
    assert last_request(setup.mocks["vllm"])[1]["max_tokens"] == 5


# --- Codex CLI: function tools, history, stateless ------------------------------------------------------

CODEX_FUNCTIONS = [tool for tool in CODEX_TOOLS if tool["type"] == "function"]  # shell, update_plan
LS_ARGS = '{"command":["ls"],"workdir":"/repo"}'
PLAN_ARGS = '{"plan":[{"step":"read","status":"in_progress"}]}'
CODEX_BODY = {
    "instructions": "You are a coding agent running in the Codex CLI.",
    "input": [
        {"type": "message", "role": "developer",
         "content": [{"type": "input_text", "text": "<permissions>workspace-write</permissions>"}]},
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": "<environment_context>cwd: /repo</environment_context>"}]},
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": "List the files, then plan."}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAAAB-opaque"},
        {"type": "function_call", "call_id": "call_ls", "name": "shell", "arguments": LS_ARGS},
        {"type": "function_call", "call_id": "call_plan", "name": "update_plan", "arguments": PLAN_ARGS},
        {"type": "function_call_output", "call_id": "call_ls", "output": "README.md\nllmproxy\ntests"},
        {"type": "function_call_output", "call_id": "call_plan", "output": "Plan updated"},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "Three entries; plan set."}]},
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": "Now read the README and update the plan."}]},
    ],
    "tools": CODEX_FUNCTIONS, "tool_choice": "auto", "parallel_tool_calls": True,
    "reasoning": {"effort": "medium", "summary": "auto"}, "store": False, "stream": True,
    "include": ["reasoning.encrypted_content"], "prompt_cache_key": "0199a7c1-5f6e-7d40-9d2b-3c1f0f7c9e11",
}


def test_a_codex_request_gets_function_calls_streamed_and_assembled(setup):
    counts = Counts(setup.mocks["vllm"])
    stream = client(setup).responses.create(model=MODELS["vllm"], **CODEX_BODY, extra_headers=CODEX_HEADERS)
    events = list(stream)
    prompt, completion = counts.taken()
    path, sent = last_request(setup.mocks["vllm"])
    expected = tool_calls(sent)  # what the "model" calls for these tools: shell, then update_plan
    assert [name for name, _ in expected] == ["shell", "update_plan"]

    completed = events[-1]
    assert completed.type == "response.completed"
    calls = completed.response.output
    assert [(call.type, call.name, call.status) for call in calls] == [
        ("function_call", "shell", "completed"), ("function_call", "update_plan", "completed")]
    for index, (call, (_, arguments)) in enumerate(zip(calls, expected, strict=True)):
        deltas = [e.delta for e in events
                  if e.type == "response.function_call_arguments.delta" and e.output_index == index]
        (done,) = [e for e in events if e.type == "response.function_call_arguments.done" and e.output_index == index]
        (item_done,) = [e for e in events if e.type == "response.output_item.done" and e.output_index == index]
        assert len(deltas) > 1  # streamed in pieces, as the backend streamed them
        assert "".join(deltas) == done.arguments == item_done.item.arguments == call.arguments == arguments
        assert json.loads(call.arguments) == json.loads(arguments)
        assert done.item_id == item_done.item.id == call.id
        assert call.call_id.startswith("chatcmpl-tool-")  # the backend's call id, for the next turn's output
    assert (completed.response.usage.input_tokens, completed.response.usage.output_tokens) == (prompt, completion)
    assert completion == tool_call_completion_tokens(expected)

    # What the backend got: one chat request with the conversation, the tools in chat's shape, nothing stored.
    assert path == "/v1/chat/completions"
    assert sent["messages"] == [
        # instructions and the developer item: one system message (many templates take only one)
        {"role": "system", "content": "You are a coding agent running in the Codex CLI.\n\n"
                                      "<permissions>workspace-write</permissions>"},
        {"role": "user", "content": "<environment_context>cwd: /repo</environment_context>"},
        {"role": "user", "content": "List the files, then plan."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_ls", "type": "function", "function": {"name": "shell", "arguments": LS_ARGS}},
            {"id": "call_plan", "type": "function", "function": {"name": "update_plan", "arguments": PLAN_ARGS}}]},
        {"role": "tool", "tool_call_id": "call_ls", "content": "README.md\nllmproxy\ntests"},
        {"role": "tool", "tool_call_id": "call_plan", "content": "Plan updated"},
        {"role": "assistant", "content": "Three entries; plan set."},
        {"role": "user", "content": "Now read the README and update the plan."}]
    assert sent["tools"] == [{"type": "function", "function": {
        "name": tool["name"], "parameters": tool["parameters"], "description": tool["description"],
        "strict": tool["strict"]}} for tool in CODEX_FUNCTIONS]
    assert (sent["tool_choice"], sent["parallel_tool_calls"], sent["stream"], sent["stream_options"]) == (
        "auto", True, True, {"include_usage": True})
    assert not {"input", "instructions", "store", "reasoning", "include", "prompt_cache_key"} & set(sent)
    headers = dict(mock_posts(setup.mocks["vllm"])[-1]["headers"])
    assert {name: headers.get(name) for name in CODEX_HEADERS} == CODEX_HEADERS


def test_parallel_tool_calls_false_reaches_the_backend_and_one_call_comes_back(setup):
    body = {**CODEX_BODY, "parallel_tool_calls": False}
    events = list(client(setup).responses.create(model=MODELS["vllm"], **body, extra_headers=CODEX_HEADERS))
    assert [item.name for item in events[-1].response.output] == ["shell"]
    assert last_request(setup.mocks["vllm"])[1]["parallel_tool_calls"] is False


# --- refused before anything is sent ----------------------------------------------------------------------

REFUSED = [
    ({"store": True}, "`store`"),
    ({"previous_response_id": "resp_0123456789"}, "`previous_response_id`"),
    ({"tools": [*CODEX_FUNCTIONS, {"type": "web_search"}]}, "`tools[2].type`"),
    ({"tools": [tool for tool in CODEX_TOOLS if tool["type"] == "custom"]}, "`tools[0].type`"),
    ({"tools": [{"type": "local_shell"}]}, "`tools[0].type`"),
    ({"input": [{"role": "user", "content": "Hi"}, {"type": "item_reference", "id": "msg_0123"}]},
     "`input[1].type`"),
]


@pytest.mark.parametrize(("fields", "field"), REFUSED, ids=[field for _, field in REFUSED])
def test_what_chat_cannot_express_is_a_400_naming_the_field_and_nothing_is_sent(setup, fields, field):
    before = posts_everywhere(setup)
    body = {"model": MODELS["vllm"], "input": "Hi", "stream": True, **fields}
    with pytest.raises(openai.BadRequestError) as caught:
        client(setup).responses.create(**body)
    error = caught.value
    assert error.status_code == 400 and error.code == "untranslatable" and error.type == "invalid_request_error"
    assert error.body["message"].startswith(field)
    assert posts_everywhere(setup) == before


# --- the backend's errors, in OpenAI's shape ------------------------------------------------------------

ERRORS = {400: (openai.BadRequestError, "Bad Request", "invalid_request_error"),
          500: (openai.InternalServerError, "Internal Server Error", "api_error"),
          503: (openai.InternalServerError, "Service Unavailable", "api_error")}


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("status", sorted(ERRORS))
@pytest.mark.parametrize("backend", ["vllm", "tgi"])
def test_a_backend_error_reaches_the_sdk_with_its_status_and_message(setup, backend, status, stream):
    error_class, phrase, kind = ERRORS[status]
    counts = Counts(setup.mocks[backend])
    with pytest.raises(error_class) as caught:
        client(setup, **{"x-mock-status": str(status)}).responses.create(model=MODELS[backend], input="Hi",
                                                                         stream=stream)
    assert caught.value.status_code == status
    assert caught.value.body == {"message": f"{phrase} (x-mock-status)", "type": kind, "param": None,
                                 "code": None}
    assert caught.value.response.headers["content-type"] == "application/json"
    assert counts.taken() == (0, 0)  # one request, refused by the backend: it counted nothing


# --- usage records ------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("backend", ["vllm", "tgi"])
def test_each_request_has_one_record_with_both_apis_and_the_backends_counts(setup, backend, stream):
    counts = Counts(setup.mocks[backend])
    sdk = client(setup)
    if stream:
        response = sdk.responses.create(model=MODELS[backend], input="Count me", stream=True)
        usage = list(response)[-1].response.usage
        headers = response.response.headers
    else:
        raw = sdk.responses.with_raw_response.create(model=MODELS[backend], input="Count me")
        usage, headers = raw.parse().usage, raw.headers
    prompt, completion = counts.taken()
    record = usage_record(setup.directory, headers["x-request-id"])
    assert (record["client_api"], record["backend_api"], record["endpoint"], record["backend"]) == (
        "responses", "chat", "/v1/responses", backend)
    assert (record["prompt_tokens"], record["completion_tokens"], record["usage_source"]) == (
        prompt, completion, "reported")
    assert (usage.input_tokens, usage.output_tokens) == (prompt, completion)
    assert record["is_stream"] is stream and record["status"] == 200


# --- streaming as it comes ----------------------------------------------------------------------------

def test_each_translated_event_reaches_the_client_before_the_backend_sends_the_next(setup):
    mock = setup.mocks["vllm"]
    token = uuid.uuid4().hex
    stream = client(setup, **{"x-mock-gate": token, "x-mock-tokens": "3"}).responses.create(
        model=MODELS["vllm"], input="Hi", stream=True)
    events = iter(stream)

    def next_of(kind: str):
        for event in events:
            if event.type == kind:
                return event
        raise AssertionError(f"the stream ended before {kind}")

    try:
        # The backend sent its role chunk and waits at the gate: response.created came from that chunk alone.
        assert next_of("response.in_progress").response.status == "in_progress"
        for i in range(3):
            assert mock_posts(mock)[-1]["outcome"] is None  # the backend has not finished
            assert http_post(f"{mock.url}/_mock/release/{token}")[0] == 200  # one more chunk: token i
            assert next_of("response.output_text.delta").delta == word(i)
        for _ in range(2):  # the usage chunk, then [DONE]
            assert http_post(f"{mock.url}/_mock/release/{token}")[0] == 200
        completed = next_of("response.completed")
        assert completed.response.output_text == completion_text(3)
        assert completed.response.usage.output_tokens == 3
    finally:
        stream.close()


# --- failures in the middle of a stream ---------------------------------------------------------------

@pytest.mark.parametrize("after", [0, 3])
@pytest.mark.parametrize(("backend", "message"), [
    ("vllm", "Internal server error"),
    ("tgi", "Request failed during generation: mock generation failure (x-mock-error-after)")])
def test_an_in_band_error_is_an_error_event_after_response_created_then_response_failed(setup, backend, message,
                                                                                     after):
    # Codex retries a stream that ends without a terminal event, losing the message: response.failed ends it.
    with client(setup, **{"x-mock-error-after": str(after)}).responses.stream(
            model=MODELS[backend], input="Hi") as stream:
        events = list(stream)  # the SDK's accumulator takes every event: none comes before response.created
    assert events[0].type == "response.created"
    assert (events[-2].type, events[-2].message) == ("error", message)
    assert events[-1].type == "response.failed" and events[-1].response.error.message == message
    assert "response.completed" not in {event.type for event in events}


def test_a_stream_cut_by_the_backend_is_cut_for_the_client_without_response_completed(setup):
    seen = []
    request_id = f"cut-{uuid.uuid4().hex}"
    sdk = client(setup, **{"x-mock-reset-after-bytes": "700", "x-request-id": request_id})
    with pytest.raises(openai.APIConnectionError):
        stream = sdk.responses.create(model=MODELS["vllm"], input="Hi", stream=True)
        seen.extend(event.type for event in stream)
    assert "response.output_text.delta" in seen and "response.completed" not in seen
    record = record_of(setup, request_id)
    assert (record["termination"], record["usage_source"], record["client_api"]) == ("SD", "estimated", "responses")
    assert record["completion_tokens"] == seen.count("response.output_text.delta")  # what was relayed


def test_a_client_that_hangs_up_stops_the_backend_at_once(setup):
    mock = setup.mocks["vllm"]
    token = uuid.uuid4().hex
    request_id = f"gone-{uuid.uuid4().hex}"
    before = mock_stats(mock)["client_disconnects_midstream"]
    stream = client(setup, **{"x-mock-gate": token, "x-request-id": request_id}).responses.create(
        model=MODELS["vllm"], input="Hi", stream=True)
    events = iter(stream)
    assert next(events).type == "response.created"
    stream.close()  # the backend is held at its gate: only the proxy's close can end its response
    wait_for(lambda: mock_stats(mock)["client_disconnects_midstream"] > before)
    assert mock_posts(mock)[-1]["outcome"] == "client_disconnect"
    record = record_of(setup, request_id)
    assert (record["termination"], record["backend_api"]) == ("CD", "chat")


def test_a_stream_the_translator_cannot_follow_is_cut_not_passed_on_in_the_backends_api(tmp_path, procs, new_proxy):
    fixtures = tmp_path / "fixtures"
    fixtures.mkdir()
    role = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    huge = {**role, "choices": [{"index": 0, "delta": {"content": "a" * (9 << 20)}, "finish_reason": "stop"}]}
    (fixtures / "huge_chat.sse").write_bytes(b"".join(b"data: %b\n\n" % json.dumps(c).encode() for c in (role, huge))
                                             + b"data: [DONE]\n\n")
    (fixtures / "huge_chat.json").write_text(json.dumps({"http": {"headers": {"content-type": "text/event-stream"}}}))
    mock = Proc(["mock-backend", "--dialect", "vllm", "--listen", "127.0.0.1:0", "--model", "m"],
                env={"LLMPROXY_FIXTURES_DIR": str(fixtures)})
    procs.append(mock)
    mock.wait_listening()
    proxy = new_proxy([{"url": mock.url, "type": "vllm", "apis": ["chat"]}], health_check=NO_PERIODIC_PROBES)
    reader, body, complete = send_request(proxy.port, {"model": "m", "input": "Hi", "stream": True},
                                          {"x-mock-fixture": "huge_chat.sse"}, path="/v1/responses", timeout=TIMEOUT)
    assert reader.status == 200 and body.startswith(b"event: response.created\n")
    assert b"chat.completion.chunk" not in body and b"[DONE]" not in body
    assert not complete  # cut: the client must not take it for a whole response
