"""Claude Code through the proxy: its requests (headers, beta query, cached system blocks, tools, metadata) reach
each engine unchanged, its two ways of sending a key both work, and the proxy's own errors on the Messages
paths come back in Anthropic's shape, so the `anthropic` SDK raises its typed errors.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import anthropic
import pytest

from llmproxy.mockbackend import TEMPLATES, anthropic_tool_calls, prompt_tokens
from llmproxy.mockbackend.textgen import tool_call_completion_tokens
from tests.e2e.anthropic_setup import (
    CLIENT_TIMEOUT,
    DEAD_MODEL,
    DIALECTS,
    KEY,
    LIMITED_KEY,
    MODELS,
    NARROW_KEY,
    Setup,
    claude,
    mock_request,
    mock_requests,
    record_for,
    running,
    sse_events,
    tagged,
)
from tests.support import NO_PERIODIC_PROBES, ResponseReader, raw_connect, send_request, sha256

pytestmark = pytest.mark.timeout(60)

QUESTION = {"role": "user", "content": "hi"}
# What Claude Code 2.x sends besides the key (its SDK's x-stainless-* headers left out).
CLAUDE_CODE_HEADERS = {
    "anthropic-version": "2023-06-01",
    "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14",
    "anthropic-dangerous-direct-browser-access": "true",
    "x-app": "cli",
    "user-agent": "claude-cli/2.0.14 (external, cli)",
    "accept": "application/json",
}
# ANTHROPIC_API_KEY is sent as x-api-key, ANTHROPIC_AUTH_TOKEN as a bearer token.
CREDENTIALS = {"x-api-key": {"x-api-key": KEY}, "bearer": {"authorization": f"Bearer {KEY}"}}
CACHED = {"type": "ephemeral"}
BASH = {"name": "Bash", "description": "Executes a given bash command in a persistent shell session.",
        "input_schema": {"type": "object", "properties": {"command": {"type": "string"},
                                                          "timeout": {"type": "number"}},
                         "required": ["command"], "additionalProperties": False,
                         "$schema": "http://json-schema.org/draft-07/schema#"}}
READ = {"name": "Read", "description": "Reads a file from the local filesystem.",
        "input_schema": {"type": "object", "properties": {"file_path": {"type": "string"}}, "required": ["file_path"]}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    yield from running(tmp_path_factory.mktemp("anthropic-claude-code"))


def claude_code_turn(model: str) -> dict:
    """A first turn as Claude Code sends it: cached system blocks, its tools, the session in metadata."""
    return {
        "model": model,
        "max_tokens": 32000,
        "stream": True,
        "temperature": 1,
        "system": [{"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.",
                    "cache_control": CACHED},
                   {"type": "text", "text": "You are an interactive CLI tool that helps users with software "
                                            "engineering tasks.", "cache_control": CACHED}],
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>This is a reminder.</system-reminder>"},
            {"type": "text", "text": "Why does the test in tests/test_app.py fail?", "cache_control": CACHED}]}],
        "tools": [BASH, READ],
        "metadata": {"user_id": "user_3f1c0e_account__session_8d2b6a50-0b7e-4a43-9d35-1f0c4f0e2a11"},
    }


def headers_as_received(request: dict) -> dict[str, list[str]]:
    received: dict[str, list[str]] = {}
    for name, value in request["headers"]:
        received.setdefault(name.lower(), []).append(value)
    return received


@pytest.mark.parametrize("credential", CREDENTIALS)
@pytest.mark.parametrize("dialect", DIALECTS)
def test_a_claude_code_request_reaches_the_engine_unchanged_and_is_billed(setup: Setup, dialect: str,
                                                                           credential: str) -> None:
    body = claude_code_turn(MODELS[dialect])
    data = json.dumps(body).encode()
    rid, tag = tagged()
    reply, streamed, complete = send_request(setup.proxy.port, data, {**CLAUDE_CODE_HEADERS, **CREDENTIALS[credential],
                                                                      **tag}, path="/v1/messages?beta=true")
    assert reply.status == 200 and complete
    events = sse_events(streamed)
    calls = anthropic_tool_calls(body)
    assert [e["content_block"]["name"] for name, e in events if name == "content_block_start"] == [
        name for name, _ in calls]
    assert events[-1][0] == "message_stop"

    seen = mock_request(setup.mocks[dialect], rid)
    received = headers_as_received(seen)
    for name, value in CLAUDE_CODE_HEADERS.items():
        assert received.get(name) == [value], f"{name} reached the engine as {received.get(name)}"
    assert "x-api-key" not in received, "the client's key never leaves the proxy"
    assert not any(KEY in value for values in received.values() for value in values)
    assert seen["path"] == "/v1/messages?beta=true"
    assert seen["body_sha256"] == sha256(data), "the body reaches the engine as sent"

    record = record_for(setup, rid)
    assert record["user_id"] == "claude-code" and record["endpoint"] == "/v1/messages"
    assert record["usage_source"] == "reported"
    assert (record["prompt_tokens"], record["completion_tokens"]) == (
        prompt_tokens(body, TEMPLATES[dialect]), tool_call_completion_tokens(calls))


@pytest.mark.parametrize("variable", ["ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"])
def test_the_sdk_gets_in_with_the_key_from_either_of_claude_codes_variables(setup: Setup, variable: str,
                                                                             monkeypatch: pytest.MonkeyPatch,
                                                                             tmp_path) -> None:
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ANTHROPIC_CONFIG_DIR", str(tmp_path))  # no profile on disk may supply a key instead
    monkeypatch.setenv("ANTHROPIC_BASE_URL", setup.proxy.url)
    monkeypatch.setenv(variable, KEY)
    client = anthropic.Anthropic(max_retries=0, timeout=CLIENT_TIMEOUT)
    rid, tag = tagged()
    message = client.messages.create(model=MODELS["vllm"], max_tokens=8, messages=[QUESTION], extra_headers=tag)
    assert message.stop_reason
    assert record_for(setup, rid)["user_id"] == "claude-code"
    monkeypatch.setenv(variable, KEY + "-wrong")
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(max_retries=0, timeout=CLIENT_TIMEOUT).messages.create(
            model=MODELS["vllm"], max_tokens=8, messages=[QUESTION])


# --- The proxy's own errors, in Anthropic's shape -------------------------------------------------------


def assert_anthropic_error(error: anthropic.APIStatusError, status: int, error_type: str) -> None:
    """The SDK parsed `{"type": "error", "error": {"type", "message"}}` and nothing else (no OpenAI keys)."""
    assert error.status_code == status
    assert set(error.body) == {"type", "error"} and error.body["type"] == "error"
    assert set(error.body["error"]) == {"type", "message"}
    assert error.body["error"]["type"] == error_type and error.body["error"]["message"]


def assert_reached_no_engine(setup: Setup, rid: str) -> None:
    assert not any(mock_requests(mock, rid) for mock in setup.mocks.values())


def open_stream(client: anthropic.Anthropic, **request: object) -> None:
    """Open a Messages stream and read it to its end (the SDK raises an error answer when it opens)."""
    with client.messages.stream(**request) as stream:
        stream.until_done()


@pytest.mark.parametrize("credential", ["api_key", "auth_token"])
def test_a_wrong_key_is_the_sdks_authentication_error_on_every_messages_call(setup: Setup, credential: str) -> None:
    client = anthropic.Anthropic(base_url=setup.proxy.url, max_retries=0, timeout=CLIENT_TIMEOUT,
                                 **{credential: "sk-ant-e2e-not-a-key-at-all-000000"})
    body = {"model": MODELS["vllm"], "max_tokens": 8, "messages": [QUESTION]}
    rid, tag = tagged()
    for call in (lambda: client.messages.create(**body, extra_headers=tag),
                 lambda: open_stream(client, **body, extra_headers=tag),
                 lambda: client.messages.count_tokens(model=body["model"], messages=body["messages"],
                                                      extra_headers=tag)):
        with pytest.raises(anthropic.AuthenticationError) as raised:
            call()
        assert_anthropic_error(raised.value, 401, "authentication_error")
    assert_reached_no_engine(setup, rid)


def test_a_key_over_its_rate_is_the_sdks_rate_limit_error_with_retry_after(setup: Setup) -> None:
    client = claude(setup, key=LIMITED_KEY)
    body = {"model": MODELS["ollama"], "max_tokens": 8, "messages": [QUESTION]}
    client.messages.create(**body)  # its one request a minute
    rid, tag = tagged()
    with pytest.raises(anthropic.RateLimitError) as raised:
        client.messages.create(**body, extra_headers=tag)
    assert_anthropic_error(raised.value, 429, "rate_limit_error")
    assert int(raised.value.response.headers["retry-after"]) >= 1
    assert_reached_no_engine(setup, rid)


@pytest.mark.parametrize("streamed", [False, True], ids=["create", "stream"])
def test_a_model_nobody_serves_is_the_sdks_not_found_error(setup: Setup, streamed: bool) -> None:
    body = {"model": "claude-opus-4-1-20250805", "max_tokens": 8, "messages": [QUESTION]}
    rid, tag = tagged()
    with pytest.raises(anthropic.NotFoundError) as raised:
        if streamed:
            open_stream(claude(setup), **body, extra_headers=tag)
        else:
            claude(setup).messages.create(**body, extra_headers=tag)
    assert_anthropic_error(raised.value, 404, "not_found_error")
    assert_reached_no_engine(setup, rid)


def test_a_model_the_key_may_not_use_is_the_sdks_permission_error(setup: Setup) -> None:
    client = claude(setup, key=NARROW_KEY)
    assert client.messages.create(model=MODELS["vllm"], max_tokens=8, messages=[QUESTION]).stop_reason
    rid, tag = tagged()
    with pytest.raises(anthropic.PermissionDeniedError) as raised:
        client.messages.create(model=MODELS["llamacpp"], max_tokens=8, messages=[QUESTION], extra_headers=tag)
    assert_anthropic_error(raised.value, 403, "permission_error")
    assert_reached_no_engine(setup, rid)


def test_a_backend_that_cannot_be_reached_is_the_sdks_server_error(setup: Setup) -> None:
    with pytest.raises(anthropic.InternalServerError) as raised:
        claude(setup).messages.create(model=DEAD_MODEL, max_tokens=8, messages=[QUESTION])
    assert_anthropic_error(raised.value, 502, "api_error")


def test_a_path_no_backend_serves_is_the_sdks_not_found_error(setup: Setup, new_proxy) -> None:
    # Only Ollama behind this proxy, and Ollama has no count_tokens: nobody can serve the path.
    ollama_only = new_proxy([{"url": setup.mocks["ollama"].url, "type": "ollama", "models": [MODELS["ollama"]]}],
                            health_check=NO_PERIODIC_PROBES)
    client = anthropic.Anthropic(base_url=ollama_only.url, api_key=KEY, max_retries=0, timeout=CLIENT_TIMEOUT)
    with pytest.raises(anthropic.NotFoundError) as raised:  # as Ollama itself answers; not retried
        client.messages.count_tokens(model=MODELS["ollama"], messages=[QUESTION])
    assert_anthropic_error(raised.value, 404, "not_found_error")


def exchange_head(setup: Setup, head: list[str]) -> tuple[int, dict]:
    """Send a request head (no body) to the proxy; return the status and the JSON error it answered."""
    with raw_connect(setup.proxy.port) as sock:
        sock.sendall(("\r\n".join([*head, "Host: proxy", f"x-api-key: {KEY}"]) + "\r\n\r\n").encode())
        reader = ResponseReader(sock).read_head()
        data, _ = reader.read_body()
    return reader.status, json.loads(data)


@pytest.mark.parametrize(("head", "status", "error_type"), [
    # Refused from the head alone, before any body byte is read (and before any context exists).
    (["POST /v1/messages HTTP/1.1", "Content-Type: application/json", "Content-Length: 104857600"], 413,
     "request_too_large"),
    (["POST /v1/messages/count_tokens HTTP/1.1", "Content-Length: 104857600"], 413, "request_too_large"),
    (["POST /v1/messages?beta=true HTTP/1.1", "Connection: Upgrade", "Upgrade: websocket"], 501, "api_error"),
], ids=["too-large", "count-tokens-too-large", "upgrade"])
def test_a_request_refused_from_its_head_is_answered_in_anthropics_shape(setup: Setup, head: list[str], status: int,
                                                                         error_type: str) -> None:
    answered, error = exchange_head(setup, head)
    assert answered == status
    assert set(error) == {"type", "error"} and error["type"] == "error", error
    assert set(error["error"]) == {"type", "message"} and error["error"]["type"] == error_type
