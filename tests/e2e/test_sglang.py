"""SGLang behind the real proxy, end to end (docs/protocols.md §11), beside a TGI backend.

SGLang's native /generate shares its path with TGI's, not its format: each answer must be read in its own
backend's format (SGLang's `meta_info`, TGI's `details` and headers). One proxy for the module, both backends
`type: auto`, each serving only its own model, so a request's `model` says which one answers it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmproxy.mockbackend import DEFAULT_MODELS, TEMPLATES, prompt_tokens
from tests.support import (
    NO_PERIODIC_PROBES,
    Proc,
    ResponseReader,
    assert_idle,
    http_get,
    mock_stats,
    post_request,
    raw_connect,
    send_request,
    start_mock,
    start_proxy,
    upstreams,
    usage_config,
    usage_record,
    usage_records,
    wait_for,
)

SGLANG_MODEL, TGI_MODEL = DEFAULT_MODELS["sglang"], DEFAULT_MODELS["tgi"]
TEXT = "The Danube rises in the Black Forest and flows"
MESSAGES = [{"role": "user", "content": "Name three rivers of Europe, one per line."}]


@pytest.fixture(scope="module")
def sglang() -> Iterator[Proc]:
    mock = start_mock("sglang", "--model", SGLANG_MODEL)
    yield mock
    mock.stop()


@pytest.fixture(scope="module")
def tgi() -> Iterator[Proc]:
    mock = start_mock("tgi", "--model", TGI_MODEL)
    yield mock
    mock.stop()


@pytest.fixture(scope="module")
def usage_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sglang")


@pytest.fixture(scope="module")
def proxy(sglang, tgi, usage_dir) -> Iterator[Proc]:
    proc = start_proxy(usage_dir, [{"url": sglang.url, "name": "sglang"}, {"url": tgi.url, "name": "tgi"}],
                       usage=usage_config(usage_dir), health_check=NO_PERIODIC_PROBES)
    wait_for(lambda: all(u["available"] and u["models"] for u in upstreams(proc).values()), timeout=10)
    yield proc
    proc.stop()


@pytest.fixture(autouse=True)
def idle_after(proxy):
    yield
    assert_idle(proxy)


def _record(usage_dir: Path, reader: ResponseReader) -> dict:
    return usage_record(usage_dir, reader.headers["x-request-id"])


def _sse_events(data: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in data.decode().splitlines() if line.startswith("data: {")]


def test_auto_detects_sglang_and_tgi(proxy):
    found = upstreams(proxy)
    assert (found["sglang"]["type"], found["tgi"]["type"]) == ("sglang", "tgi"), found


# SGLang's /generate: meta_info -----------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("cached", [0, 5])
def test_sglang_generate_is_metered_from_meta_info(proxy, usage_dir, stream, cached):
    body = {"model": SGLANG_MODEL, "text": TEXT, "sampling_params": {"max_new_tokens": 64}, "stream": stream}
    reader, data, complete = send_request(proxy.port, body, {"x-mock-tokens": "6", "x-mock-cache-read": str(cached)},
                                          path="/generate")
    assert reader.status == 200 and complete
    final = _sse_events(data)[-1] if stream else json.loads(data)
    assert final["text"] == "".join(f" tok{i}" for i in range(6))  # cumulative: the last chunk holds it all
    record = _record(usage_dir, reader)
    assert (record["backend"], record["endpoint"], record["is_stream"]) == ("sglang", "/generate", stream)
    assert record["usage_source"] == "reported", record
    assert (record["prompt_tokens"], record["completion_tokens"]) == (
        prompt_tokens({"prompt": TEXT}, TEMPLATES["sglang"]), 6), record
    assert record["cache_read_tokens"] == cached


def test_sglang_generate_from_token_ids(proxy, usage_dir):
    ids = [101, 2023, 2003, 1037, 3231, 102]
    reader, _, complete = send_request(proxy.port, {"model": SGLANG_MODEL, "input_ids": ids, "stream": True},
                                       {"x-mock-tokens": "2"}, path="/generate")
    assert reader.status == 200 and complete
    record = _record(usage_dir, reader)
    assert (record["prompt_tokens"], record["completion_tokens"], record["usage_source"]) == (len(ids), 2,
                                                                                            "reported")


def test_max_new_tokens_caps_the_metered_completion(proxy, usage_dir):
    body = {"model": SGLANG_MODEL, "text": TEXT, "sampling_params": {"max_new_tokens": 3}, "stream": True}
    reader, _, complete = send_request(proxy.port, body, {"x-mock-tokens": "20"}, path="/generate")
    assert reader.status == 200 and complete
    assert _record(usage_dir, reader)["completion_tokens"] == 3


def test_a_generate_stream_its_client_left_is_recorded_once_as_estimated(proxy, usage_dir):
    # SGLang has no tokenizer endpoint to count the prompt afterwards: the record is an estimate (its
    # completion is the chunks relayed), and it must say so, not pass for SGLang's own counts.
    body = {"model": SGLANG_MODEL, "text": TEXT, "stream": True}
    with raw_connect(proxy.port) as sock:
        sock.sendall(post_request("/generate", json.dumps(body).encode(),
                                  {"X-Request-Id": "left-generate", "x-mock-tokens": "50", "x-mock-delay-ms": "20"}))
        reader = ResponseReader(sock).read_head()
        assert reader.status == 200 and reader.read_chunk()
    found = wait_for(lambda: [r for r in usage_records(usage_dir) if r["client_request_id"] == "left-generate"])
    time.sleep(0.3)  # a second record would be written by now
    records = [r for r in usage_records(usage_dir) if r["client_request_id"] == "left-generate"]
    assert records == found and len(records) == 1, records
    record = records[0]
    assert (record["termination"], record["usage_source"], record["backend"]) == ("CD", "estimated", "sglang")
    assert 1 <= record["completion_tokens"] < 50 and record["prompt_tokens"] > 0, record


# SGLang's OpenAI routes ------------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"model": SGLANG_MODEL, "messages": MESSAGES}),
    ("/v1/chat/completions", {"model": SGLANG_MODEL, "messages": MESSAGES, "stream": True}),
    ("/v1/completions", {"model": SGLANG_MODEL, "prompt": TEXT, "stream": True}),
], ids=["chat", "chat-stream", "completions-stream"])
def test_sglang_openai_routes_are_metered_from_their_usage(proxy, usage_dir, path, body):
    reader, data, complete = send_request(proxy.port, body, {"x-mock-tokens": "5"}, path=path)
    assert reader.status == 200 and complete
    if body.get("stream"):
        assert not any(event.get("usage") for event in _sse_events(data))  # the usage the proxy asked for is not
    record = _record(usage_dir, reader)  # passed on to a client that did not ask for it
    assert (record["backend"], record["usage_source"]) == ("sglang", "reported"), record
    assert (record["prompt_tokens"], record["completion_tokens"]) == (prompt_tokens(body, TEMPLATES["sglang"]), 5)


# TGI's /generate beside it -----------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "details"), [("/generate", False), ("/generate", True),
                                               ("/generate_stream", True)])
def test_tgi_generate_beside_sglang_is_still_read_as_tgi(proxy, usage_dir, path, details):
    body = {"model": TGI_MODEL, "inputs": TEXT, "parameters": {"max_new_tokens": 4, "details": details}}
    reader, data, complete = send_request(proxy.port, body, {"x-mock-tokens": "9"}, path=path)
    assert reader.status == 200 and complete
    if path == "/generate":
        assert json.loads(data)["generated_text"] == " tok0 tok1 tok2 tok3"
    record = _record(usage_dir, reader)
    assert (record["backend"], record["endpoint"], record["usage_source"]) == ("tgi", path, "reported"), record
    assert (record["prompt_tokens"], record["completion_tokens"]) == (prompt_tokens(body, TEMPLATES["tgi"]), 4)


# SGLang's own routes ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "key"), [("/get_model_info", "model_path"), ("/get_server_info", "version")])
def test_sglang_information_routes_are_forwarded_to_it(proxy, sglang, path, key):
    before = mock_stats(sglang)["requests_total"]
    status, body = http_get(proxy.url + path)
    assert status == 200 and key in json.loads(body)
    assert mock_stats(sglang)["requests_total"] == before + 1
