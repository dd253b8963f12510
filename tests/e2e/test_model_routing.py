"""Model routing: requests land on a backend that serves their model, whatever its kind.

Backends are real mock processes run with --strict-models, so a request sent to the wrong one would be
answered 404 by the backend itself; the proxy's own 404 is recognisable by its `model_not_found` code.
"""

from __future__ import annotations

import json

import openai
import pytest

from tests.support import (
    Proc,
    http_get,
    http_post,
    mock_posts,
    start_mock,
    start_proxy,
)


def _models_of(posts: list[dict]) -> list[str]:
    return [json.loads(r["body"])["model"] for r in posts if r.get("body")]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A vLLM backend serving two coder models, an Ollama backend serving llama3.2, one proxy in front."""
    vllm = start_mock("vllm", "--model", "qwen-coder,qwen-chat", "--strict-models")
    ollama = start_mock("ollama", "--model", "llama3.2:latest,nomic-embed-text:latest", "--strict-models")
    tmp = tmp_path_factory.mktemp("model-routing")
    proxy = start_proxy(tmp, [{"url": vllm.url, "name": "gpu-vllm"}, {"url": ollama.url, "name": "ollama"}],
                        routing={"load_balance": "round_robin", "model_aliases": {"gpt-4o": "qwen-coder"}})
    try:
        yield proxy, vllm, ollama
    finally:
        for proc in (proxy, vllm, ollama):
            proc.stop()


def _client(proxy: Proc) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=10)


def test_types_are_detected_and_models_discovered(fleet):
    proxy, _, _ = fleet
    status, body = http_get(proxy.url + "/health")
    upstreams = {u["name"]: u for u in json.loads(body)["upstreams"]}
    assert status == 200
    assert upstreams["gpu-vllm"]["type"] == "vllm" and upstreams["ollama"]["type"] == "ollama"
    assert upstreams["gpu-vllm"]["models"] == ["qwen-chat", "qwen-coder"]
    assert upstreams["ollama"]["models"] == ["llama3.2:latest", "nomic-embed-text:latest"]


def test_each_request_lands_on_the_backend_serving_its_model(fleet):
    proxy, vllm, ollama = fleet
    client = _client(proxy)
    for model in ["qwen-coder", "qwen-chat", "llama3.2", "llama3.2:latest", "qwen-coder"] * 3:
        text = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model=model, stream=True, messages=[{"role": "user", "content": "hi"}]) if chunk.choices)
        assert text
    assert sorted(_models_of(mock_posts(vllm))).count("qwen-coder") >= 3
    vllm_models = set(_models_of(mock_posts(vllm)))
    ollama_models = set(_models_of(mock_posts(ollama)))
    assert vllm_models <= {"qwen-coder", "qwen-chat"} and {"qwen-coder", "qwen-chat"} <= vllm_models
    assert ollama_models == {"llama3.2", "llama3.2:latest"}


def test_native_ollama_path_goes_to_ollama(fleet):
    proxy, _, ollama = fleet
    before = len(mock_posts(ollama))
    status, body = http_post(proxy.url + "/api/chat", json.dumps(
        {"model": "llama3.2", "stream": False, "messages": [{"role": "user", "content": "hi"}]}).encode())
    assert status == 200, body
    assert json.loads(body)["done"] is True
    assert len(mock_posts(ollama)) == before + 1


def test_unknown_model_is_a_404_model_not_found_and_reaches_no_backend(fleet):
    proxy, vllm, ollama = fleet
    before = len(mock_posts(vllm)) + len(mock_posts(ollama))
    with pytest.raises(openai.NotFoundError) as error:
        _client(proxy).chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert error.value.status_code == 404
    assert error.value.body["code"] == "model_not_found"
    assert "no-such-model" in error.value.body["message"]
    assert len(mock_posts(vllm)) + len(mock_posts(ollama)) == before


def test_models_lists_the_union_and_aliases_through_the_sdk(fleet):
    proxy, _, _ = fleet
    models = {m.id: m for m in _client(proxy).models.list()}
    assert set(models) == {"qwen-coder", "qwen-chat", "llama3.2:latest", "nomic-embed-text:latest", "gpt-4o"}
    # vLLM's card survives (Continue reads max_model_len); the alias carries its target's card.
    assert models["qwen-coder"].model_extra["max_model_len"] > 0
    assert models["gpt-4o"].model_extra["root"] == "qwen-coder"
    assert models["gpt-4o"].model_extra["max_model_len"] == models["qwen-coder"].model_extra["max_model_len"]
    assert _client(proxy).models.retrieve("qwen-chat").id == "qwen-chat"
    with pytest.raises(openai.NotFoundError):
        _client(proxy).models.retrieve("nope")


def test_an_alias_is_rewritten_before_forwarding(fleet):
    proxy, vllm, _ = fleet
    before = len(mock_posts(vllm))
    reply = _client(proxy).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
    sent = mock_posts(vllm)[before:]
    assert len(sent) == 1 and json.loads(sent[0]["body"])["model"] == "qwen-coder"


def test_a_request_without_model_on_a_native_path_goes_to_a_backend_of_that_kind(tmp_path):
    tgi = start_mock("tgi")
    vllm = start_mock("vllm", "--strict-models")
    proxy = None
    try:
        proxy = start_proxy(tmp_path, [{"url": vllm.url}, {"url": tgi.url}], routing={"load_balance": "round_robin"})
        for _ in range(4):
            status, body = http_post(proxy.url + "/generate_stream", b'{"inputs": "hi"}')
            assert status == 200 and b"data:" in body
        assert len(mock_posts(tgi)) == 4
        assert mock_posts(vllm) == []
    finally:
        for proc in (proxy, vllm, tgi):
            if proc is not None:
                proc.stop()


def test_configured_models_restrict_what_a_backend_gets(tmp_path):
    """`models:` in the config wins over what the backend reports (e.g. keep a big model off a small GPU)."""
    a = start_mock("vllm", "--model", "shared,only-a")
    b = start_mock("vllm", "--model", "shared,only-a")
    proxy = None
    try:
        proxy = start_proxy(tmp_path, [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b", "models": ["shared"]}],
                            routing={"load_balance": "round_robin"})
        for model in ["only-a"] * 4 + ["shared"] * 4:
            status, _ = http_post(proxy.url + "/v1/completions", json.dumps({"model": model, "prompt": "x"}).encode())
            assert status == 200
        assert _models_of(mock_posts(b)) == ["shared"] * 2
        assert sorted(_models_of(mock_posts(a))) == ["only-a"] * 4 + ["shared"] * 2
    finally:
        for proc in (proxy, a, b):
            if proc is not None:
                proc.stop()
