"""fleet/tokenizer.py: how a llama.cpp backend is asked to count a prompt, against a fake of its routes."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

import llmproxy.fleet.tokenizer as tokenizer
from llmproxy.config.model import BackendConfig
from llmproxy.fleet.probe import ProbeResponse

BOS = 1  # the fake model adds one BOS token to every text it tokenizes with add_special


class FakeLlamaServer:
    """/tokenize (a token per word, plus BOS) and /apply-template, recording what was asked."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, dict[str, Any]]] = []

    async def post(self, backend: BackendConfig, path: str, request: dict[str, Any], timeout: float) -> ProbeResponse:
        self.asked.append((path, request))
        if path == "/apply-template":
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in request["messages"])
            answer: dict[str, Any] = {"prompt": text + "<|im_start|>assistant\n"}
        else:
            words = request["content"].split()
            answer = {"tokens": list(range(BOS * request["add_special"] + len(words)))}
        return ProbeResponse(200, orjson.dumps(answer), {})


@pytest.fixture
def server(monkeypatch) -> FakeLlamaServer:
    fake = FakeLlamaServer()
    monkeypatch.setattr(tokenizer, "probe_post", fake.post)
    return fake


def count(api: str, body: dict[str, Any]) -> int | None:
    backend = BackendConfig(url="http://llama:8080")
    return asyncio.run(asyncio.wait_for(tokenizer.count_prompt_tokens(backend, "llamacpp", api, body, 1.0), 5))


def test_one_text_is_one_tokenize(server):
    assert count("llamacpp-embedding", {"content": "the Danube flows east"}) == BOS + 4
    assert [path for path, _ in server.asked] == ["/tokenize"]


def test_a_batch_of_texts_is_counted_text_by_text_each_with_its_special_tokens(server):
    # llama-server tokenizes each prompt of a batch on its own: one BOS each, not one for the batch.
    body = {"content": ["the Danube flows east", "the Rhine", "short"]}
    assert count("llamacpp-embedding", body) == 3 * BOS + 4 + 2 + 1
    assert [request["content"] for _, request in server.asked] == body["content"]


def test_token_ids_are_counted_without_asking(server):
    assert count("llamacpp-embedding", {"content": [11, 12, 13]}) == 3
    assert count("openai-embeddings", {"input": [[11, 12, 13], [14, 15]]}) == 5
    assert server.asked == []


def test_a_batch_mixing_texts_and_token_ids(server):
    assert count("openai-completions", {"prompt": ["once upon a time", [7, 8]]}) == BOS + 4 + 2
    assert len(server.asked) == 1


@pytest.mark.parametrize("prompt", [[{"text": "not a prompt"}], ["fine", 3.5], [None]])
def test_a_batch_with_anything_else_is_not_counted(server, prompt):
    assert count("llamacpp-embedding", {"content": prompt}) is None


def test_a_batch_larger_than_the_cap_is_left_to_its_estimate(server):
    assert count("llamacpp-embedding", {"content": ["word"] * (tokenizer.LLAMACPP_MAX_PROMPTS + 1)}) is None
    assert server.asked == []
    assert count("llamacpp-embedding", {"content": ["word"] * tokenizer.LLAMACPP_MAX_PROMPTS}) == (
        tokenizer.LLAMACPP_MAX_PROMPTS * (BOS + 1))


def test_chat_is_rendered_by_apply_template_then_tokenized(server):
    body = {"messages": [{"role": "user", "content": "name three rivers"}]}
    rendered = ["<|im_start|>user", "name", "three", "rivers<|im_end|>", "<|im_start|>assistant"]  # as split
    assert count("openai-chat", body) == BOS + len(rendered)
    assert [path for path, _ in server.asked] == ["/apply-template", "/tokenize"]
