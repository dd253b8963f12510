"""The Responses API end to end (Codex CLI's only API): the openai SDK through the real proxy to vLLM mocks.

A record equals the usage of the stream's response.completed; a follow-up naming previous_response_id goes to
the backend that stored that response, among three (another one would answer 404, as vLLM does).
"""

from __future__ import annotations

import openai
import pytest

from llmproxy.mockbackend import TEMPLATES
from llmproxy.mockbackend.textgen import responses_prompt_tokens
from tests.support import Proc, http_post, mock_posts, start_mock, start_proxy, usage_config, usage_record

BACKENDS = ("a", "b", "c")
QWEN = "Qwen/Qwen2.5-7B-Instruct"
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Three vLLM mocks behind one metered proxy (round robin) whose records go to `records_dir`."""
    records_dir = tmp_path_factory.mktemp("responses")
    mocks = {name: start_mock("vllm") for name in BACKENDS}
    proxy = start_proxy(records_dir, [{"url": mock.url, "name": name} for name, mock in mocks.items()],
                        usage=usage_config(records_dir))
    yield proxy, mocks, records_dir
    proxy.stop()
    for mock in mocks.values():
        mock.stop()


def client(proxy: Proc) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


def record_of(records_dir, response) -> dict:
    return usage_record(records_dir, response.headers["x-request-id"])


def test_a_streamed_response_is_recorded_with_the_usage_of_response_completed(fleet):
    proxy, _, records_dir = fleet
    body = {"model": QWEN, "instructions": "Answer briefly.", "input": "What is the capital of France?"}
    stream = client(proxy).responses.create(**body, stream=True, extra_headers={"x-mock-cache-read": "6"})
    events = list(stream)
    completed = events[-1]
    assert completed.type == "response.completed"
    usage = completed.response.usage
    # The backend's counts, which the mock derives from its own tokenizer: not something the proxy computed.
    assert usage.input_tokens == responses_prompt_tokens(body, TEMPLATES["vllm"])
    record = record_of(records_dir, stream.response)
    assert (record["prompt_tokens"], record["completion_tokens"], record["cache_read_tokens"]) == (
        usage.input_tokens, usage.output_tokens, usage.input_tokens_details.cached_tokens) == (
        usage.input_tokens, usage.output_tokens, 6)
    assert (record["usage_source"], record["is_stream"], record["endpoint"]) == ("reported", True, "/v1/responses")
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == completed.response.output_text


def test_a_response_not_streamed_is_recorded_with_its_usage(fleet):
    proxy, _, records_dir = fleet
    raw = client(proxy).responses.with_raw_response.create(model=QWEN, input="Hello there", max_output_tokens=4)
    response = raw.parse()
    assert response.status == "incomplete"  # max_output_tokens cut the mock's 16-token answer
    record = record_of(records_dir, raw)
    assert (record["prompt_tokens"], record["completion_tokens"]) == (response.usage.input_tokens, 4)
    assert record["usage_source"] == "reported" and record["is_stream"] is False


def test_follow_ups_land_on_the_backend_that_stored_the_previous_response(fleet):
    proxy, _, records_dir = fleet
    sdk = client(proxy)
    # Without a previous response the proxy balances: round robin over three spreads six conversations.
    openers = []
    for i in range(6):
        raw = sdk.responses.with_raw_response.create(model=QWEN, input=f"Conversation {i}: hello")
        openers.append((raw.parse().id, record_of(records_dir, raw)["backend"]))
    assert len({backend for _, backend in openers}) == 3
    # Each conversation goes on for three turns, streamed, chained by previous_response_id; any backend but
    # the one that stored the previous response would answer 404.
    for previous, home in openers:
        for turn in range(3):
            stream = sdk.responses.create(model=QWEN, input=f"Turn {turn}", previous_response_id=previous,
                                          stream=True)
            completed = list(stream)[-1]
            assert completed.type == "response.completed"
            assert record_of(records_dir, stream.response)["backend"] == home
            previous = completed.response.id


def test_an_unknown_previous_response_is_balanced_and_the_backends_404_reaches_the_client(fleet):
    proxy, _, records_dir = fleet
    with pytest.raises(openai.NotFoundError) as caught:
        client(proxy).responses.create(model=QWEN, input="Hi", previous_response_id="resp_never_made")
    record = record_of(records_dir, caught.value.response)
    assert (record["status"], record["usage_source"], record["prompt_tokens"]) == (404, "none", 0)


# What Codex CLI sends (codex-rs/core/src/client.rs): stateless (store false, the whole conversation each
# turn), streamed, reasoning asked with its encrypted content, several kinds of tools.
CODEX_HEADERS = {"originator": "codex_cli_rs", "user-agent": "codex_cli_rs/0.63.0 (Linux 6.8; x86_64) xterm",
                 "openai-beta": "responses=experimental", "session_id": "0199a7c1-5f6e-7d40-9d2b-3c1f0f7c9e11",
                 "conversation_id": "0199a7c1-5f6e-7d40-9d2b-3c1f0f7c9e11"}
CODEX_TOOLS = [
    {"type": "function", "name": "shell", "description": "Runs a shell command and returns its output.",
     "strict": False, "parameters": {"type": "object", "properties": {
         "command": {"type": "array", "items": {"type": "string"}}, "workdir": {"type": "string"},
         "timeout_ms": {"type": "number"}}, "required": ["command"], "additionalProperties": False}},
    {"type": "function", "name": "update_plan", "description": "Updates the task plan.", "strict": False,
     "parameters": {"type": "object", "properties": {"plan": {"type": "array", "items": {"type": "object"}}},
                    "required": ["plan"], "additionalProperties": False}},
    {"type": "custom", "name": "apply_patch", "description": "Edits files with a patch.",
     "format": {"type": "grammar", "syntax": "lark", "definition": "start: begin_patch hunk+ end_patch"}},
    {"type": "web_search"},
]


def test_a_codex_shaped_request_is_forwarded_whole_and_metered(fleet):
    proxy, mocks, records_dir = fleet
    for mock in mocks.values():
        assert http_post(mock.url + "/_mock/reset-stats")[0] == 200
    body = {
        "model": QWEN, "instructions": "You are a coding agent running in the Codex CLI.",
        "input": [{"type": "message", "role": "user",
                   "content": [{"type": "input_text", "text": "List the files in this repository."}]}],
        "tools": CODEX_TOOLS, "tool_choice": "auto", "parallel_tool_calls": False,
        "reasoning": {"effort": "medium", "summary": "auto"}, "store": False,
        "include": ["reasoning.encrypted_content"], "prompt_cache_key": "0199a7c1-5f6e-7d40-9d2b-3c1f0f7c9e11",
        "max_output_tokens": 2048,
    }
    stream = client(proxy).responses.create(**body, stream=True, extra_headers=CODEX_HEADERS)
    events = list(stream)
    completed = events[-1]
    assert completed.type == "response.completed"
    calls = [item for item in completed.response.output if item.type == "function_call"]
    assert [call.name for call in calls] == ["shell"]  # parallel_tool_calls false: the first function tool
    record = record_of(records_dir, stream.response)
    usage = completed.response.usage
    assert (record["prompt_tokens"], record["completion_tokens"]) == (usage.input_tokens, usage.output_tokens)
    assert record["usage_source"] == "reported"
    (sent,) = [post for mock in mocks.values() for post in mock_posts(mock)]
    headers = dict(sent["headers"])
    assert {name: headers.get(name) for name in CODEX_HEADERS} == CODEX_HEADERS

