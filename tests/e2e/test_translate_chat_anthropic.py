"""A Chat Completions client on Anthropic's own API (`type: anthropic`), end to end: the real `openai` SDK through
the real proxy to the Anthropic-API mock, which checks keys and versions as the API does and logs what it got.

What the client sees (chat completions, chunks, finish reasons, tool calls, errors as the SDK's exceptions),
what Anthropic receives (a Messages body, the proxy's key as x-api-key, an anthropic-version), the rotation of
the backend's keys around 429s, and the usage records with Anthropic's counts and their cost. A Messages client
(the real `anthropic` SDK) on the same backend passes through untranslated.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import anthropic
import openai
import pytest

from llmproxy.mockbackend.textgen import TEMPLATES, anthropic_tool_calls, prompt_tokens, word
from tests.support import (
    NO_PERIODIC_PROBES,
    Proc,
    access_log,
    assert_idle,
    http_post,
    mock_posts,
    mock_stats,
    send_request,
    start_mock,
    start_proxy,
    upstreams,
    usage_config,
    usage_record,
    usage_records,
    wait_for,
)

KEYS = ("ka", "kb")  # the backend's keys, the only ones the mock accepts
CLIENT_KEY = "sk-client-not-for-anthropic"  # what the client sends the proxy (auth is off): never forwarded
MODEL = "m"
PRICE = {"input_per_million": 1, "output_per_million": 2, "cached_input_per_million": 0.1,
         "cache_write_per_million": 1.25}
DEFAULT_MAX_TOKENS = 321  # translation.default_max_tokens: not the built-in 4096, so its use shows
MOCK_TOKENS = 16  # the mock's answer: word(0) .. word(15)
TIMEOUT = 10.0  # every client call
HELLO = [{"role": "user", "content": "Hello there, what will the weather be like in Oslo this week?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}, "utc_offset": {"type": "integer"}},
                   "required": ["zone"]}}}
# A 1x1 transparent PNG.
PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==")


@dataclass
class Setup:
    proxy: Proc
    mock: Proc
    directory: Path  # the proxy's config, access log and usage records


def start_pair(directory: Path, keys: tuple[str, ...] = KEYS, health_check: dict | None = None,
               **backend: object) -> Setup:
    """The Anthropic-API mock accepting `keys` and a metered proxy in front of it, rotating them (`backend`: more
    settings of the backend). Passive ejection is off: the error tests' 5xx answers must not take the only
    backend out."""
    mock = start_mock("anthropic", *(arg for key in keys for arg in ("--api-key", key)))
    backend = {"url": mock.url, "name": "anthropic", "type": "anthropic", "api_keys": list(keys), "models": [MODEL],
               **backend}
    try:
        proxy = start_proxy(directory, [backend], usage=usage_config(directory),
                            pricing={MODEL: PRICE}, translation={"default_max_tokens": DEFAULT_MAX_TOKENS},
                            health_check=health_check or {**NO_PERIODIC_PROBES, "passive": {"enabled": False}})
    except Exception:
        mock.stop()
        raise
    return Setup(proxy, mock, directory)


def stop_pair(setup: Setup) -> None:
    setup.proxy.stop()
    setup.mock.stop()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Iterator[Setup]:
    """One pair for the module. Tests that rest a key (a 429) have their own: a resting key changes the rotation."""
    shared = start_pair(tmp_path_factory.mktemp("chat-anthropic"))
    yield shared
    stop_pair(shared)


@pytest.fixture
def pair(tmp_path) -> Iterator[Setup]:
    """A pair of this test's own, idle at the end of the test (see idle_after)."""
    own = start_pair(tmp_path)
    try:
        yield own
        assert_idle(own.proxy)
    finally:
        stop_pair(own)


@pytest.fixture(autouse=True)
def idle_after(request):
    """After each test on the module's pair, its proxy holds nothing: no request in flight, no connection out."""
    yield
    if "setup" in request.fixturenames:
        assert_idle(request.getfixturevalue("setup").proxy)


def client(setup: Setup) -> openai.OpenAI:
    """The SDK pointed at the proxy. No retries: a failure must show, not be papered over."""
    return openai.OpenAI(base_url=f"{setup.proxy.url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=TIMEOUT)


def request_id(response) -> str:
    """The proxy's id of a request, from its response (raw, or a stream's httpx response)."""
    headers = response.headers if hasattr(response, "headers") else response.response.headers
    return headers["x-request-id"]


def received(setup: Setup, rid: str) -> list[dict]:
    """What the mock logged of the attempts of request `rid` (the proxy forwards its X-Request-Id, or the client's)."""
    return [r for r in mock_stats(setup.mock)["requests"] if ["x-request-id", rid] in r["headers"]]


def received_one(setup: Setup, rid: str) -> tuple[dict, dict]:
    """The one attempt of request `rid` the mock got: (its headers, its JSON body)."""
    attempts = received(setup, rid)
    assert len(attempts) == 1, attempts
    return dict(attempts[0]["headers"]), json.loads(attempts[0]["body"])


def mock_prompt(body: dict) -> int:
    """The mock's count of a Messages prompt, cached tokens included (what Anthropic's three input counts sum to)."""
    return prompt_tokens(body, TEMPLATES["anthropic"])


def text(n: int) -> str:
    return "".join(word(i) for i in range(n))


def cost(prompt: int, reads: int, writes: int, completion: int) -> float:
    """README "Usage metering": the price of a record's counts."""
    return ((prompt - reads - writes) * PRICE["input_per_million"] + reads * PRICE["cached_input_per_million"]
            + writes * PRICE["cache_write_per_million"] + completion * PRICE["output_per_million"]) / 1e6


def assert_charged(record: dict, prompt: int, completion: int, reads: int = 0, writes: int = 0) -> None:
    assert (record["client_api"], record["backend_api"], record["usage_source"]) == ("chat", "messages", "reported")
    assert (record["prompt_tokens"], record["completion_tokens"], record["total_tokens"]) == (
        prompt, completion, prompt + completion)
    assert (record["cache_read_tokens"], record["cache_write_tokens"]) == (reads, writes)
    assert record["cost_usd"] == pytest.approx(cost(prompt, reads, writes, completion), rel=1e-9)


def assert_refused(record: dict, status: int) -> None:
    """A request the backend refused: recorded, charged nothing."""
    assert (record["status"], record["usage_source"], record["cost_usd"]) == (status, "none", 0)
    assert (record["prompt_tokens"], record["completion_tokens"]) == (0, 0)
    assert (record["client_api"], record["backend_api"]) == ("chat", "messages")


# --- chat completions --------------------------------------------------------------------------------------


def test_a_completion_is_answered_from_messages_with_anthropics_counts_and_recorded_at_their_price(setup):
    cache = {"x-mock-cache-read": "5", "x-mock-cache-write": "3"}
    raw = client(setup).chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, extra_headers=cache)
    completion = raw.parse()
    rid = request_id(raw)
    _, body = received_one(setup, rid)
    prompt = mock_prompt(body)
    (choice,) = completion.choices
    assert (choice.message.role, choice.message.content, choice.finish_reason) == (
        "assistant", text(MOCK_TOKENS), "stop")
    assert completion.object == "chat.completion" and completion.model == MODEL
    usage = completion.usage
    # The prompt is Anthropic's three input counts together: input_tokens + cache reads + cache writes.
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        prompt, MOCK_TOKENS, prompt + MOCK_TOKENS)
    assert usage.prompt_tokens_details.cached_tokens == 5
    record = usage_record(setup.directory, rid)
    assert_charged(record, prompt, MOCK_TOKENS, reads=5, writes=3)
    assert (record["status"], record["is_stream"], record["endpoint"]) == (200, False, "/v1/chat/completions")


def test_a_stream_without_stream_options_has_no_usage_chunk_yet_its_record_has_the_usage(setup):
    stream = client(setup).chat.completions.create(model=MODEL, messages=HELLO, stream=True,
                                                   extra_headers={"x-mock-cache-read": "2"})
    chunks = list(stream)
    assert all(chunk.usage is None and len(chunk.choices) == 1 for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text(MOCK_TOKENS)
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
    assert len({c.id for c in chunks}) == 1
    rid = request_id(stream)
    _, body = received_one(setup, rid)
    assert "stream_options" not in body and body["stream"] is True
    record = usage_record(setup.directory, rid)
    assert_charged(record, mock_prompt(body), MOCK_TOKENS, reads=2)
    assert record["is_stream"] is True


def test_include_usage_ends_the_stream_with_a_usage_chunk_of_anthropics_counts(setup):
    stream = client(setup).chat.completions.create(
        model=MODEL, messages=HELLO, stream=True, stream_options={"include_usage": True},
        extra_headers={"x-mock-cache-read": "4", "x-mock-cache-write": "1"})
    chunks = list(stream)
    *content, last = chunks
    assert all(chunk.usage is None for chunk in content)
    assert last.choices == [] and last.usage is not None
    rid = request_id(stream)
    _, body = received_one(setup, rid)
    prompt = mock_prompt(body)
    # Anthropic sent input_tokens = prompt - 4 - 1, cache_read_input_tokens 4, cache_creation_input_tokens 1.
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
        prompt, MOCK_TOKENS, prompt + MOCK_TOKENS)
    assert last.usage.prompt_tokens_details.cached_tokens == 4
    assert_charged(usage_record(setup.directory, rid), prompt, MOCK_TOKENS, reads=4, writes=1)


def test_a_streamed_tool_call_accumulates_to_the_function_and_its_json_arguments_then_the_result_goes_back(setup):
    sdk = client(setup)
    asked = [{"role": "user", "content": "What is the weather in Oslo, and the time there?"}]
    tag = f"tools-{uuid.uuid4().hex}"  # the helper's stream does not show its response: the request is tagged
    with sdk.chat.completions.stream(model=MODEL, messages=asked, tools=[WEATHER, CLOCK],
                                     extra_headers={"x-request-id": tag}) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    _, body = received_one(setup, tag)
    assert [tool["name"] for tool in body["tools"]] == ["get_weather", "get_time"]
    assert body["tools"][0]["input_schema"] == WEATHER["function"]["parameters"]
    (choice,) = final.choices
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    # What the mock's model called, as Anthropic's tool_use blocks said it, streamed as input_json_delta pieces.
    expected = anthropic_tool_calls(body)
    assert [(call.function.name, json.loads(call.function.arguments)) for call in calls] == [
        (name, json.loads(arguments)) for name, arguments in expected]
    assert len(expected) == 2 and all(call.id.startswith("toolu_") for call in calls)
    # The arguments came in pieces, each call's in order, and the helper saw each call end whole.
    pieces = [e for e in events if e.type == "tool_calls.function.arguments.delta"]
    assert len(pieces) > len(calls)
    for index, call in enumerate(calls):
        assert "".join(p.arguments_delta for p in pieces if p.index == index) == call.function.arguments
    done = [(e.name, e.arguments) for e in events if e.type == "tool_calls.function.arguments.done"]
    assert done == [(call.function.name, call.function.arguments) for call in calls]
    (record,) = wait_for(lambda: [r for r in usage_records(setup.directory) if r["client_request_id"] == tag])
    assert record["usage_source"] == "reported"

    # The follow-up: the assistant's tool calls and their results go back as tool_use and tool_result blocks.
    results = [{"role": "tool", "tool_call_id": call.id, "content": f"result of {call.function.name}"}
               for call in calls]
    follow_up = [*asked, choice.message.model_dump(include={"role", "content", "tool_calls"}), *results]
    raw = sdk.chat.completions.with_raw_response.create(model=MODEL, messages=follow_up, tools=[WEATHER, CLOCK],
                                                        tool_choice="none")
    answer = raw.parse().choices[0]
    assert (answer.message.content, answer.finish_reason) == (text(MOCK_TOKENS), "stop")
    _, body = received_one(setup, request_id(raw))
    assert [message["role"] for message in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][1]["content"] == [
        {"type": "tool_use", "id": call.id, "name": call.function.name, "input": json.loads(call.function.arguments)}
        for call in calls]
    assert body["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": call.id, "content": f"result of {call.function.name}"}
        for call in calls]
    assert body["tool_choice"] == {"type": "none"}


def test_parallel_tool_calls_false_makes_one_call(setup):
    completion = client(setup).chat.completions.create(model=MODEL, messages=HELLO, tools=[WEATHER, CLOCK],
                                                       parallel_tool_calls=False)
    (call,) = completion.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and completion.choices[0].finish_reason == "tool_calls"
    assert completion.choices[0].message.content is None


@pytest.mark.parametrize(("tool_choice", "sent"), [
    ("auto", {"type": "auto", "disable_parallel_tool_use": True}),
    ("required", {"type": "any", "disable_parallel_tool_use": True}),
    ({"type": "function", "function": {"name": "get_time"}},
     {"type": "tool", "name": "get_time", "disable_parallel_tool_use": True}),
    # Anthropic's tool_choice "none" has no disable_parallel_tool_use (ToolChoiceNone: `type` only; the API
    # refuses extra inputs), and with no tool use there is nothing to make sequential.
    ("none", {"type": "none"}),
])
def test_parallel_tool_calls_false_goes_with_each_tool_choice_that_allows_it(setup, tool_choice, sent):
    raw = client(setup).chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, tools=[WEATHER, CLOCK], tool_choice=tool_choice, parallel_tool_calls=False)
    raw.parse()
    _, body = received_one(setup, request_id(raw))
    assert body["tool_choice"] == sent


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize(("options", "content", "finish_reason", "sent"), [
    ({}, text(MOCK_TOKENS), "stop", {"max_tokens": DEFAULT_MAX_TOKENS}),
    ({"max_tokens": 4}, text(4), "length", {"max_tokens": 4}),
    ({"max_completion_tokens": 5}, text(5), "length", {"max_tokens": 5}),
    ({"stop": [word(3)]}, text(3), "stop", {"stop_sequences": [word(3)]}),
    ({"stop": word(7), "max_tokens": 9}, text(7), "stop", {"stop_sequences": [word(7)], "max_tokens": 9}),
], ids=["end_turn", "max_tokens", "max_completion_tokens", "stop_sequence", "stop_string"])
def test_finish_reasons_follow_anthropics_stop_reason(setup, stream, options, content, finish_reason, sent):
    sdk = client(setup)
    if stream:
        chunks = sdk.chat.completions.create(model=MODEL, messages=HELLO, stream=True, **options)
        got = list(chunks)
        answer = "".join(c.choices[0].delta.content or "" for c in got)
        finish = [c.choices[0].finish_reason for c in got if c.choices[0].finish_reason]
        rid = request_id(chunks)
    else:
        raw = sdk.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, **options)
        (choice,) = raw.parse().choices
        answer, finish, rid = choice.message.content, [choice.finish_reason], request_id(raw)
    assert (answer, finish) == (content, [finish_reason])
    _, body = received_one(setup, rid)
    assert {name: body.get(name) for name in sent} == sent


def test_system_and_developer_messages_become_the_system_parameter(setup):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
                {"role": "user", "content": "Hello"}]
    raw = client(setup).chat.completions.with_raw_response.create(model=MODEL, messages=messages, temperature=1.7,
                                                                  top_p=0.9, user="user-7")
    assert raw.parse().choices[0].message.content == text(MOCK_TOKENS)
    _, body = received_one(setup, request_id(raw))
    assert body["system"] == "You are terse.\n\nAnswer in French."
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]
    # OpenAI's temperature goes to 2, Anthropic's to 1.
    assert (body["temperature"], body["top_p"], body["metadata"]) == (1.0, 0.9, {"user_id": "user-7"})


def test_an_image_data_url_reaches_anthropic_as_a_base64_image_block(setup):
    content = [{"type": "text", "text": "What is in this picture?"},
               {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]
    raw = client(setup).chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": content}])
    assert raw.parse().choices[0].message.content == text(MOCK_TOKENS)
    _, body = received_one(setup, request_id(raw))
    assert body["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]}]


# --- what Anthropic receives --------------------------------------------------------------------------------


def test_anthropic_gets_a_messages_body_with_the_proxys_key_and_version_and_never_the_clients_key(setup):
    raw = client(setup).chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, stream=False)
    raw.parse()
    (attempt,) = received(setup, request_id(raw))
    headers = dict(attempt["headers"])
    assert (attempt["method"], attempt["path"]) == ("POST", "/v1/messages")
    assert headers["x-api-key"] in KEYS and attempt["api_key"] in KEYS
    assert headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in headers
    assert not any(CLIENT_KEY in value for _, value in attempt["headers"])
    body = json.loads(attempt["body"])
    assert body == {"model": MODEL, "max_tokens": DEFAULT_MAX_TOKENS,
                    "messages": [{"role": "user", "content": [{"type": "text", "text": HELLO[0]["content"]}]}]}


def test_anthropic_version_in_the_config_is_the_one_sent(tmp_path):
    own = start_pair(tmp_path, anthropic_version="2023-01-01")
    try:
        raw = client(own).chat.completions.with_raw_response.create(model=MODEL, messages=HELLO)
        assert raw.parse().choices[0].message.content == text(MOCK_TOKENS)
        headers, _ = received_one(own, request_id(raw))
        assert headers["anthropic-version"] == "2023-01-01"
    finally:
        stop_pair(own)


# --- the backend's keys -------------------------------------------------------------------------------------


def keys_used(setup: Setup) -> list[tuple[str, int]]:
    """(key, status) of each Messages request the mock got, in order."""
    return [(r["api_key"], r["status"]) for r in mock_posts(setup.mock) if r["path"] == "/v1/messages"]


def throttle(setup: Setup, key: str, seconds: int) -> None:
    assert http_post(f"{setup.mock.url}/_mock/throttle?key={key}&seconds={seconds}")[0] == 200


def reset_stats(setup: Setup) -> None:
    assert http_post(setup.mock.url + "/_mock/reset-stats")[0] == 200


def ask(setup: Setup, count: int) -> list[str]:
    """`count` chat requests, each answered 200; their request ids."""
    ids = []
    for _ in range(count):
        raw = client(setup).chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, max_tokens=2)
        assert raw.parse().choices[0].message.content == text(2)
        ids.append(request_id(raw))
    return ids


def test_requests_take_the_keys_in_turn(setup):
    reset_stats(setup)
    ask(setup, 6)
    used = [key for key, _ in keys_used(setup)]
    assert sorted(set(used)) == list(KEYS) and len(used) == 6
    assert all(a != b for a, b in itertools.pairwise(used)), used


def test_a_throttled_key_rests_and_every_request_succeeds_on_the_other(pair):
    throttle(pair, "ka", 30)
    reset_stats(pair)
    ids = ask(pair, 8)
    # ka was tried once, got its 429, and rests its 30 s: the request it failed went on to kb at once.
    assert keys_used(pair).count(("ka", 429)) == 1
    assert [key for key, status in keys_used(pair) if status == 200] == ["kb"] * 8
    for rid in ids:
        record = usage_record(pair.directory, rid)
        assert (record["status"], record["usage_source"]) == (200, "reported")
    # The mock no longer refuses ka, but its rest is the proxy's own: ka is not used before it ends.
    throttle(pair, "ka", 0)
    reset_stats(pair)
    ask(pair, 4)
    assert keys_used(pair) == [("kb", 200)] * 4


def test_with_every_key_throttled_the_client_gets_the_429_and_the_keys_come_back_after_their_rest(pair):
    for key in KEYS:
        throttle(pair, key, 2)
    reset_stats(pair)
    sdk = client(pair)
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.chat.completions.create(model=MODEL, messages=HELLO)
    refused = time.monotonic()
    error = caught.value
    # Anthropic's status, message and retry-after, in OpenAI's shape.
    assert error.status_code == 429 and error.response.headers["retry-after"] in ("1", "2")
    assert error.body["message"].startswith("This request would exceed your organization's rate limit")
    # Each key was tried once: the first 429 was retried with the other key, the second relayed.
    assert sorted(keys_used(pair)) == [("ka", 429), ("kb", 429)]
    assert_refused(usage_record(pair.directory, request_id(error.response)), 429)
    for key in KEYS:
        throttle(pair, key, 0)
    time.sleep(max(0.0, refused + 2.2 - time.monotonic()))  # past the retry-after both keys rest for
    reset_stats(pair)
    ask(pair, 4)
    used = keys_used(pair)
    assert sorted(used) == [("ka", 200), ("ka", 200), ("kb", 200), ("kb", 200)], used


def test_a_429_without_retry_after_rests_the_key_too(pair):
    reset_stats(pair)
    with pytest.raises(openai.RateLimitError):  # every attempt refused, whichever key
        client(pair).chat.completions.create(model=MODEL, messages=HELLO, extra_headers={"x-mock-status": "429"})
    # Each key tried once: the first 429 rests its key (credentials.DEFAULT_REST) and is retried with the other,
    # whose 429 is relayed since no key is left. Today ka is tried twice: ka, kb, ka.
    assert sorted(keys_used(pair)) == [("ka", 429), ("kb", 429)]


def test_a_free_key_is_found_whatever_the_number_of_throttled_ones(tmp_path):
    keys = ("ka", "kb", "kc", "kd")
    own = start_pair(tmp_path, keys=keys)
    try:
        for key in keys[:3]:
            throttle(own, key, 30)
        # README: "a 429 reaches the client only when every key rests".
        ask(own, 1)
    finally:
        stop_pair(own)


def test_a_throttled_key_is_swapped_for_another_of_the_same_backend_not_for_another_backend(tmp_path):
    mocks = [start_mock("anthropic", "--api-key", "ka", "--api-key", "kb") for _ in range(2)]
    try:
        proxy = start_proxy(tmp_path, [{"url": mock.url, "name": f"anthropic-{i}", "type": "anthropic",
                                        "api_keys": ["ka", "kb"], "models": [MODEL]} for i, mock in enumerate(mocks)],
                            routing={"load_balance": "round_robin"}, health_check=NO_PERIODIC_PROBES)
        try:
            for mock in mocks:
                http_post(f"{mock.url}/_mock/throttle?key=ka&seconds=30")
            sdk = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=TIMEOUT)
            for _ in range(2):  # round robin: one request to each backend, each starting on its key ka
                sdk.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
            for mock in mocks:  # each backend saw its own ka refused, then kb: no request crossed over
                assert [(r["api_key"], r["status"]) for r in mock_stats(mock)["requests"]
                        if r["path"] == "/v1/messages"] == [("ka", 429), ("kb", 200)]
        finally:
            proxy.stop()
    finally:
        for mock in mocks:
            mock.stop()


# --- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "exception", "error_type"), [
    (400, openai.BadRequestError, "invalid_request_error"),
    (401, openai.AuthenticationError, "invalid_request_error"),
    (404, openai.NotFoundError, "invalid_request_error"),
    (500, openai.InternalServerError, "api_error"),
    (529, openai.InternalServerError, "api_error"),
])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_an_anthropic_error_reaches_the_client_as_the_sdks_exception_in_openais_shape(setup, status, exception,
                                                                                        error_type, stream):
    with pytest.raises(exception) as caught:
        client(setup).chat.completions.create(model=MODEL, messages=HELLO, stream=stream,
                                              extra_headers={"x-mock-status": str(status)})
    error = caught.value
    phrase = HTTPStatus(status).phrase if status != 529 else f"status {status}"
    assert error.status_code == status
    assert error.response.json() == {"error": {"message": f"{phrase} (x-mock-status)", "type": error_type,
                                               "param": None, "code": None}}
    assert_refused(usage_record(setup.directory, request_id(error.response)), status)


@pytest.mark.parametrize(("options", "field"), [
    ({"n": 2}, "`n`"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
     "`response_format`"),
    ({"response_format": {"type": "json_object"}}, "`response_format`"),
    ({"tools": [{"type": "custom", "custom": {"name": "apply_patch"}}]}, "`tools[0].type`"),
    ({"tools": [WEATHER, {"type": "custom", "custom": {"name": "apply_patch"}}]}, "`tools[1].type`"),
])
def test_what_messages_cannot_express_is_a_400_naming_the_field_and_nothing_goes_upstream(setup, options, field):
    reset_stats(setup)
    with pytest.raises(openai.BadRequestError) as caught:
        client(setup).chat.completions.create(model=MODEL, messages=HELLO, **options)
    error = caught.value
    assert error.body["message"].startswith(field + ":"), error.body
    assert (error.body["type"], error.body["code"]) == ("invalid_request_error", "untranslatable")
    assert mock_posts(setup.mock) == []
    # Refused before any backend saw it: logged, not metered (README "Usage metering").
    rid = request_id(error.response)
    wait_for(lambda: any(line.get("request_id") == rid and line.get("status") == 400
                         for line in access_log(setup.directory)))
    assert not [r for r in usage_records(setup.directory) if r["request_id"] == rid]


@pytest.mark.parametrize(("options", "field"), [
    ({"temperature": "warm"}, "`temperature`"),
    ({"temperature": [0.5]}, "`temperature`"),
    ({"tools": 5}, "`tools`"),
    ({"messages": [*HELLO, {"role": "assistant", "tool_calls": 5}]}, "`messages[1].tool_calls`"),
])
def test_a_value_of_the_wrong_type_is_a_400_naming_the_field_not_a_500(setup, options, field):
    reset_stats(setup)
    with pytest.raises(openai.BadRequestError) as caught:
        client(setup).chat.completions.create(model=MODEL, messages=HELLO, extra_body=options)
    assert caught.value.body["message"].startswith(field + ":"), caught.value.body
    assert mock_posts(setup.mock) == []


def test_an_error_event_mid_stream_makes_the_sdk_raise_and_the_stream_has_no_done(setup):
    stream = client(setup).chat.completions.create(model=MODEL, messages=HELLO, stream=True,
                                                   extra_headers={"x-mock-error-after": "5"})
    chunks = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            chunks.append(chunk)
    assert "Overloaded" in str(caught.value)
    # message_start, content_block_start, ping, two deltas: the text got so far, then the error.
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text(2)
    assert not [c for c in chunks if c.choices and c.choices[0].finish_reason]
    record = usage_record(setup.directory, request_id(stream))
    assert (record["status"], record["usage_source"], record["completion_tokens"]) == (200, "estimated", 2)
    # The bytes: the error as OpenAI streams one, and no [DONE] after it.
    body = {"model": MODEL, "messages": HELLO, "stream": True}
    _, data, complete = send_request(setup.proxy.port, body, {"x-mock-error-after": "5"}, timeout=TIMEOUT)
    events = [block for block in data.decode().split("\n\n") if block]
    assert complete and "data: [DONE]" not in events
    assert json.loads(events[-1].removeprefix("data: ")) == {"error": {
        "message": "Overloaded", "type": "overloaded_error", "param": None, "code": None}}


# --- models and health --------------------------------------------------------------------------------------


def test_the_model_list_has_the_configured_models_without_asking_anthropic(setup):
    reset_stats(setup)
    sdk = client(setup)
    assert [model.id for model in sdk.models.list()] == [MODEL]
    assert sdk.models.retrieve(MODEL).id == MODEL
    assert mock_stats(setup.mock)["requests"] == []


def test_the_model_cards_are_openais_models(setup):
    for card in client(setup).models.with_raw_response.list().http_response.json()["data"]:
        openai.types.Model.model_validate(card)  # created: int, owned_by: str, object: "model"


def test_the_probe_sends_the_key_and_marks_the_backend_healthy_until_the_api_fails(tmp_path):
    probing = {"interval": "100ms", "timeout": "1s", "unhealthy_threshold": 1, "healthy_threshold": 1,
               "models_interval": 3600}
    own = start_pair(tmp_path, health_check=probing)
    try:
        wait_for(lambda: upstreams(own.proxy)["anthropic"]["healthy"])
        probes = [r for r in mock_stats(own.mock)["requests"] if r["method"] == "GET"]
        assert probes and all(r["path"] == "/v1/models" and r["status"] == 200 for r in probes)
        headers = dict(probes[-1]["headers"])
        assert (headers["x-api-key"], headers["anthropic-version"]) == ("ka", "2023-06-01")
        assert "authorization" not in headers
        assert http_post(own.mock.url + "/_mock/health/500")[0] == 200
        state = wait_for(lambda: (lambda u: u if not u["healthy"] else None)(upstreams(own.proxy)["anthropic"]))
        assert state["last_error"] == "status 500"
        assert http_post(own.mock.url + "/_mock/health/200")[0] == 200
        wait_for(lambda: upstreams(own.proxy)["anthropic"]["healthy"])
    finally:
        stop_pair(own)


def test_a_backend_whose_key_anthropic_refuses_is_unhealthy(tmp_path):
    own = start_pair(tmp_path, api_keys=["not-a-key"])
    try:
        state = upstreams(own.proxy)["anthropic"]  # the first probe, before the proxy listened
        assert (state["healthy"], state["last_error"]) == (False, "status 401")
    finally:
        stop_pair(own)


# --- streaming as it comes ----------------------------------------------------------------------------------


def release(setup: Setup, token: str, times: int = 1) -> None:
    for _ in range(times):
        assert http_post(f"{setup.mock.url}/_mock/release/{token}")[0] == 200


def test_each_translated_chunk_reaches_the_client_before_anthropic_sends_its_next_event(setup):
    # The mock sends the first event, then one more per release of the gate.
    token = f"gate-{time.monotonic_ns()}"
    stream = client(setup).chat.completions.create(model=MODEL, messages=HELLO, stream=True,
                                                   extra_headers={"x-mock-gate": token, "x-mock-tokens": "3"})
    chunks = iter(stream)
    assert next(chunks).choices[0].delta.role == "assistant"  # message_start; the mock holds the rest
    release(setup, token, 3)  # content_block_start and ping (no chunk of their own), the first text delta
    assert next(chunks).choices[0].delta.content == word(0)  # while the mock holds the second delta
    release(setup, token)
    assert next(chunks).choices[0].delta.content == word(1)
    release(setup, token, 4)  # the last delta, content_block_stop, message_delta, message_stop
    rest = list(chunks)
    assert [c.choices[0].delta.content for c in rest[:1]] == [word(2)]
    assert rest[-1].choices[0].finish_reason == "stop"


def test_a_client_that_leaves_mid_stream_closes_anthropics_stream_and_is_recorded_with_its_prompt(setup):
    token = f"gate-{time.monotonic_ns()}"
    stream = client(setup).chat.completions.create(model=MODEL, messages=HELLO, stream=True,
                                                   extra_headers={"x-mock-gate": token, "x-mock-cache-read": "3"})
    chunks = iter(stream)
    next(chunks)
    release(setup, token, 3)
    assert next(chunks).choices[0].delta.content == word(0)
    rid = request_id(stream)
    stream.close()  # while the mock holds the rest
    (attempt,) = wait_for(lambda: [r for r in received(setup, rid) if r["outcome"] == "client_disconnect"])
    record = usage_record(setup.directory, rid)
    # message_start's prompt (input + cache reads), the one delta relayed as the output.
    assert (record["usage_source"], record["prompt_tokens"], record["cache_read_tokens"]) == (
        "estimated", mock_prompt(json.loads(attempt["body"])), 3)
    assert (record["completion_tokens"], record["termination"]) == (1, "CD")  # the client, in the data


# --- a Messages client passes through -----------------------------------------------------------------------


def test_an_anthropic_sdk_client_reaches_the_messages_api_untranslated_with_its_version_and_betas(setup):
    claude = anthropic.Anthropic(base_url=setup.proxy.url, api_key=CLIENT_KEY, max_retries=0, timeout=TIMEOUT)
    version = claude.default_headers["anthropic-version"]
    params = {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "Hello"}]}
    raw = claude.messages.with_raw_response.create(
        **params, extra_headers={"anthropic-beta": "prompt-caching-2024-07-31", "x-mock-cache-read": "2"})
    message = raw.parse()
    assert (message.stop_reason, message.content[0].text) == ("max_tokens", text(10))
    (attempt,) = received(setup, request_id(raw))
    headers = dict(attempt["headers"])
    assert attempt["path"] == "/v1/messages" and json.loads(attempt["body"]) == params
    assert (headers["anthropic-version"], headers["anthropic-beta"]) == (version, "prompt-caching-2024-07-31")
    assert headers["x-api-key"] in KEYS and "authorization" not in headers
    assert not any(CLIENT_KEY in value for _, value in attempt["headers"])
    record = usage_record(setup.directory, request_id(raw))
    assert (record["client_api"], record["backend_api"], record["endpoint"]) == ("messages", "messages",
                                                                                 "/v1/messages")
    usage = message.usage
    prompt = usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens
    assert (record["prompt_tokens"], record["completion_tokens"], record["cache_read_tokens"]) == (
        prompt, usage.output_tokens, 2)
    assert record["cost_usd"] == pytest.approx(cost(prompt, 2, 0, usage.output_tokens), rel=1e-9)

