"""Which backend gets a request in an API some backends serve natively and others only through a translation
(routing.translate and backends[].apis), seen from the mocks' own logs of what they were sent.

A vLLM backend serves Responses natively (its type's default APIs); a second vLLM declared `apis: [chat]` and a
TGI serve only Chat Completions, so a Responses request reaches them translated to /v1/chat/completions.
"""

from __future__ import annotations

import json
import subprocess
import sys

import openai
import pytest

from tests.support import (
    NO_PERIODIC_PROBES,
    REPO,
    Proc,
    http_post,
    mock_posts,
    send_request,
    start_mock,
    upstreams,
    wait_for,
)

TIMEOUT = 10.0
ONLY_CHAT = "only-on-chat"  # a model only the chat-only vLLM serves


@pytest.fixture(scope="module")
def mocks():
    started: dict[str, Proc] = {}
    try:
        started["native"] = start_mock("vllm", "--model", "m")
        started["chat"] = start_mock("vllm", "--model", f"m,{ONLY_CHAT}")
        started["tgi"] = start_mock("tgi", "--model", "m")
        yield started
    finally:
        for mock in started.values():
            mock.stop()


@pytest.fixture
def fresh(mocks):
    """The mocks, their logs of requests emptied."""
    for mock in mocks.values():
        assert http_post(mock.url + "/_mock/reset-stats")[0] == 200
    return mocks


def backend(mocks: dict[str, Proc], name: str, **fields) -> dict:
    kinds = {"native": "vllm", "chat": "vllm", "tgi": "tgi"}
    config = {"url": mocks[name].url, "name": name, "type": kinds[name], **fields}
    if name == "chat" and "apis" not in fields:
        config["apis"] = ["chat"]
    return config


def proxy_with(new_proxy, backends: list[dict], translate: str | None = None) -> Proc:
    routing = {"load_balance": "round_robin"}
    if translate is not None:
        routing["translate"] = translate
    return new_proxy(backends, routing=routing, health_check=NO_PERIODIC_PROBES)


def sdk(proxy: Proc) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT,
                         default_headers={"x-mock-eos": "1"})


def paths(mock: Proc) -> list[str]:
    """The paths of the requests clients sent the mock through the proxy, in order."""
    return [post["path"] for post in mock_posts(mock)]


def ask_responses(proxy: Proc, model: str = "m", times: int = 4) -> None:
    """`times` Responses requests, streamed and not in turn, each answered completely."""
    client = sdk(proxy)
    for i in range(times):
        if i % 2:
            assert client.responses.create(model=model, input=f"Hi {i}").status == "completed"
        else:
            assert list(client.responses.create(model=model, input=f"Hi {i}", stream=True))[-1].type == \
                "response.completed"


@pytest.mark.parametrize("translate", [None, "when_needed", "never"])
def test_responses_go_to_the_native_backend_unless_translation_is_forced(new_proxy, fresh, translate):
    proxy = proxy_with(new_proxy, [backend(fresh, "native"), backend(fresh, "chat")], translate)
    ask_responses(proxy)
    assert paths(fresh["native"]) == ["/v1/responses"] * 4
    assert paths(fresh["chat"]) == []
    # Chat requests go to both: the chat-only backend was a candidate, the Responses routing chose.
    for _ in range(4):
        sdk(proxy).chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}])
    assert paths(fresh["chat"]) == ["/v1/chat/completions"] * 2


def test_when_needed_translates_for_a_model_no_native_backend_serves(new_proxy, fresh):
    proxy = proxy_with(new_proxy, [backend(fresh, "native"), backend(fresh, "chat")])
    ask_responses(proxy, model=ONLY_CHAT, times=2)
    assert paths(fresh["chat"]) == ["/v1/chat/completions"] * 2
    assert paths(fresh["native"]) == []


def test_always_translates_even_for_a_backend_that_serves_responses(new_proxy, fresh):
    proxy = proxy_with(new_proxy, [backend(fresh, "native"), backend(fresh, "chat")], "always")
    ask_responses(proxy)
    assert paths(fresh["native"]) == ["/v1/chat/completions"] * 2
    assert paths(fresh["chat"]) == ["/v1/chat/completions"] * 2
    assert all("messages" in json.loads(post["body"]) for post in mock_posts(fresh["native"]))


def test_never_with_only_chat_backends_answers_404_path_not_served(new_proxy, fresh):
    proxy = proxy_with(new_proxy, [backend(fresh, "chat"), backend(fresh, "tgi")], "never")
    for stream in (True, False):
        with pytest.raises(openai.NotFoundError) as caught:
            sdk(proxy).responses.create(model="m", input="Hi", stream=stream)
        assert caught.value.code == "path_not_served"
        assert "/v1/responses" in caught.value.body["message"]
    assert paths(fresh["chat"]) == paths(fresh["tgi"]) == []
    sdk(proxy).chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}])  # served


def test_never_does_not_translate_for_a_model_only_a_chat_backend_serves(new_proxy, fresh):
    proxy = proxy_with(new_proxy, [backend(fresh, "native"), backend(fresh, "chat")], "never")
    with pytest.raises(openai.NotFoundError) as caught:
        sdk(proxy).responses.create(model=ONLY_CHAT, input="Hi")
    assert caught.value.code == "model_not_found"
    assert paths(fresh["chat"]) == paths(fresh["native"]) == []


def test_apis_makes_tgi_serve_chat_alone(new_proxy, fresh):
    default = proxy_with(new_proxy, [backend(fresh, "tgi")])
    assert sdk(default).completions.create(model="m", prompt="Hi").choices  # TGI's type serves completions
    narrowed = proxy_with(new_proxy, [backend(fresh, "tgi", apis=["chat"])])
    for path, body in (("/v1/completions", {"model": "m", "prompt": "Hi"}),
                       ("/v1/embeddings", {"model": "m", "input": "Hi"})):
        reader, raw, _ = send_request(narrowed.port, body, path=path)
        assert reader.status == 404 and json.loads(raw)["error"]["code"] == "path_not_served"
    assert sdk(narrowed).chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}]).choices
    assert sdk(narrowed).responses.create(model="m", input="Hi").output_text  # translated: TGI gets chat
    assert paths(fresh["tgi"]) == ["/v1/completions", "/v1/chat/completions", "/v1/chat/completions"]


def test_no_backend_serving_chat_means_no_translation_and_404(new_proxy, fresh):
    proxy = proxy_with(new_proxy, [backend(fresh, "chat", apis=["completions"])])
    messages = {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "Hi"}]}
    reader, raw, _ = send_request(proxy.port, messages, {"anthropic-version": "2023-06-01"}, path="/v1/messages")
    assert reader.status == 404
    assert json.loads(raw) == {"type": "error", "error": {"type": "not_found_error",
                                                           "message": "no backend of this proxy serves /v1/messages"}}
    for path, body in (("/v1/responses", {"model": "m", "input": "Hi"}),
                       ("/v1/chat/completions", {"model": "m", "messages": messages["messages"]})):
        reader, raw, _ = send_request(proxy.port, body, path=path)
        assert reader.status == 404 and json.loads(raw)["error"]["code"] == "path_not_served"
    assert paths(fresh["chat"]) == []
    assert sdk(proxy).completions.create(model="m", prompt="Hi").choices  # what it does serve
    assert paths(fresh["chat"]) == ["/v1/completions"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmproxy", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=30, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize(("text", "message"), [
    ('backends:\n  - url: "http://127.0.0.1:9"\n    apis: [chat, grpc]\n',
     'backends[0].apis[1]: unknown API "grpc"; expected some of chat, completions, responses, messages, embeddings'),
    ('backends:\n  - url: "http://127.0.0.1:9"\n    apis: chat\n', "backends[0].apis"),
    ('backends:\n  - url: "http://127.0.0.1:9"\nrouting:\n  translate: sometimes\n',
     'routing.translate: must be one of when_needed, always, never, got "sometimes"'),
], ids=["unknown-api", "apis-not-a-list", "unknown-translate-mode"])
def test_an_unknown_api_or_translate_mode_refuses_to_start_naming_the_key(tmp_path, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    for args in (("check-config", str(config)), ("serve", "--config", str(config), "--listen", "127.0.0.1:0")):
        result = _run(*args)
        assert result.returncode == 1, result.stdout
        assert message in result.stderr
        assert "listening on" not in result.stdout


@pytest.mark.parametrize("metering", [True, False],
                         ids=["metered", "not-metered"])
def test_a_failover_from_a_translated_attempt_to_a_native_one_relays_the_native_response(new_proxy, fresh, metering):
    # Every request is translated where it can be; the chat-only backend answers 503 (loading), and the one
    # that serves only Responses gets the retry natively.
    proxy = new_proxy([backend(fresh, "chat"), backend(fresh, "native", apis=["responses"])],
                      routing={"load_balance": "round_robin", "translate": "always", "retries": 1,
                               "retry_on": ["503"], "retry_backoff": "0s"},
                      health_check={**NO_PERIODIC_PROBES, "passive": {"enabled": False}},
                      usage={"metering": metering})
    assert http_post(fresh["chat"].url + "/_mock/loading/1")[0] == 200
    try:
        for stream in (True, True, False, False):  # round robin: some requests start on the chat-only backend
            if stream:
                response = list(sdk(proxy).responses.create(model="m", input="Hi", stream=True))[-1].response
            else:
                response = sdk(proxy).responses.create(model="m", input="Hi")
            assert response.status == "completed" and response.output_text
    finally:
        assert http_post(fresh["chat"].url + "/_mock/loading/0")[0] == 200
    assert "/v1/chat/completions" in paths(fresh["chat"])  # a translated attempt was made, and failed over
    assert paths(fresh["native"]) == ["/v1/responses"] * 4


def test_when_the_native_backend_is_down_responses_are_translated_for_one_that_is_up(new_proxy, fresh):
    proxy = new_proxy([backend(fresh, "native"), backend(fresh, "chat")],
                      health_check={"interval": "0.1s", "unhealthy_threshold": 1, "healthy_threshold": 1,
                                    "models_interval": 3600})
    assert http_post(fresh["native"].url + "/_mock/health/503")[0] == 200  # its probes fail; it would still answer
    try:
        wait_for(lambda: not upstreams(proxy)["native"]["available"])
        ask_responses(proxy, times=2)
    finally:
        assert http_post(fresh["native"].url + "/_mock/health/200")[0] == 200
    assert paths(fresh["chat"]) == ["/v1/chat/completions"] * 2
    assert paths(fresh["native"]) == []
    wait_for(lambda: upstreams(proxy)["native"]["available"])
    ask_responses(proxy, times=2)  # back up: native again
    assert paths(fresh["native"]) == ["/v1/responses"] * 2
