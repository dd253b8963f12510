"""A stream the client leaves before its usage event: the backend's tokenizer counts the prompt after the
fact where it has one (vLLM, TGI), else the prompt is estimated as a chat template renders it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmproxy.metering.estimate import estimate_prompt_tokens
from llmproxy.mockbackend import TEMPLATES, prompt_tokens
from tests.support import ResponseReader, post_request, raw_connect, start_mock, start_proxy, wait_for

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name three rivers of Europe, one per line, and nothing else."}]
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Look a river up.",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]


def _abort_after_first_event(port: int, body: dict, rid: str) -> None:
    with raw_connect(port) as sock:
        sock.sendall(post_request("/v1/chat/completions", json.dumps(body).encode(),
                                  {"X-Request-Id": rid, "x-mock-tokens": "50", "x-mock-delay-ms": "20"}))
        reader = ResponseReader(sock).read_head()
        assert reader.status == 200 and reader.read_chunk()  # one event, then the client leaves


def _records(path: Path) -> dict[str, dict]:
    lines = path.read_text().splitlines() if path.exists() else []
    return {record["client_request_id"]: record for record in map(json.loads, lines)}


@pytest.mark.parametrize(("dialect", "source"), [("vllm", "tokenized"), ("tgi", "tokenized"),
                                                 ("ollama", "estimated")])
@pytest.mark.parametrize("tools", [False, True])
def test_an_aborted_streams_prompt_is_counted_by_the_backend_or_estimated(tmp_path, dialect, source, tools):
    mock = start_mock(dialect)
    usage = tmp_path / "usage.jsonl"
    proxy = start_proxy(tmp_path, [{"url": mock.url, "name": dialect, "type": dialect}],
                        usage={"enabled": True, "spool_dir": str(tmp_path / "spool"),
                               "reporters": [{"name": "f", "type": "file", "file": {"path": str(usage)}}]},
                        pricing={"m": {"input_per_million": 1.0, "output_per_million": 2.0}})
    try:
        body = {"model": "m", "stream": True, "messages": MESSAGES, **({"tools": TOOLS} if tools else {})}
        _abort_after_first_event(proxy.port, body, "left")
        record = wait_for(lambda: _records(usage).get("left"), timeout=10)
        assert (record["termination"], record["usage_source"]) == ("CD", source), record
        exact = prompt_tokens(body, TEMPLATES[dialect])  # as the backend's own model counts it
        if source == "tokenized":
            assert record["prompt_tokens"] == exact
        else:
            assert record["prompt_tokens"] == estimate_prompt_tokens(body)
            assert abs(record["prompt_tokens"] - exact) <= 0.35 * exact, (record["prompt_tokens"], exact)
        assert record["cost_usd"] == round((record["prompt_tokens"] + 2 * record["completion_tokens"]) / 1e6, 10)
    finally:
        proxy.stop()
        mock.stop()


def test_with_recounts_off_the_estimate_stands(tmp_path):
    mock = start_mock("vllm")
    usage = tmp_path / "usage.jsonl"
    proxy = start_proxy(tmp_path, [{"url": mock.url, "name": "vllm", "type": "vllm"}],
                        usage={"enabled": True, "spool_dir": str(tmp_path / "spool"), "recount": {"enabled": False},
                               "reporters": [{"name": "f", "type": "file", "file": {"path": str(usage)}}]})
    try:
        body = {"model": "m", "stream": True, "messages": MESSAGES}
        _abort_after_first_event(proxy.port, body, "off")
        record = wait_for(lambda: _records(usage).get("off"), timeout=10)
        assert record["usage_source"] == "estimated" and record["prompt_tokens"] == estimate_prompt_tokens(body)
    finally:
        proxy.stop()
        mock.stop()
