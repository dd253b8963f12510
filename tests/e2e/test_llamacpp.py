"""llama.cpp (llama-server) behind the real proxy, end to end (docs/protocols.md §10).

One proxy for the module, metering every request to a file, in front of a llama.cpp mock and an SGLang mock
(both `type: auto`; the SGLang one serves a model of its own, so it only adds to the model list). What must
hold: a llama.cpp is detected, even one still loading its model when the proxy starts; every generation path
of llama.cpp is metered exactly as the mock counted it, in one record per request; what llama.cpp does not
report (native embeddings, batches too, a stream its client left) is counted afterwards by its own
/apply-template and /tokenize, except an infill, which is estimated; its own routes are forwarded to it and
never to the SGLang beside it; and the connection llama-server closes after every streamed response never
costs a retry or an ejection.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from llmproxy.mockbackend import TEMPLATES, prompt_tokens
from tests.support import (
    NO_PERIODIC_PROBES,
    Proc,
    ResponseReader,
    assert_idle,
    http_get,
    http_post,
    metric_value,
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

TEMPLATE = TEMPLATES["llamacpp"]
SGLANG_ONLY_MODEL = "sglang-only-model"
PROMPT = "Write a haiku about the river Danube, please."
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name three rivers of Europe, one per line."}]
FIM_MARKERS = 3  # the mock's /infill adds FIM prefix, suffix and middle tokens (mockbackend/llamacpp.py)
STREAMS = 1000  # streamed requests over connections llama-server closes after each
STREAM_CONCURRENCY = 4
STREAM_BUDGET_S = 20.0
STREAM_ID = "closed-after-stream-"  # the client request ids of those streams, numbered


@pytest.fixture(scope="module")
def llama() -> Iterator[Proc]:
    mock = start_mock("llamacpp")
    yield mock
    mock.stop()


@pytest.fixture(scope="module")
def sglang() -> Iterator[Proc]:
    mock = start_mock("sglang", "--model", SGLANG_ONLY_MODEL)
    yield mock
    mock.stop()


@pytest.fixture(scope="module")
def usage_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("llamacpp")


@pytest.fixture(scope="module")
def proxy(llama, sglang, usage_dir) -> Iterator[Proc]:
    # No periodic probes: after start-up, the mocks' request logs move only with the tests' own traffic (and
    # the proxy's recounts).
    proc = start_proxy(usage_dir, [{"url": llama.url, "name": "llama"}, {"url": sglang.url, "name": "sglang"}],
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


def _record_of_client_id(usage_dir: Path, client_id: str, timeout: float = 10.0) -> dict:
    """The one record of the request the client sent with X-Request-Id: client_id."""
    found = wait_for(lambda: [r for r in usage_records(usage_dir) if r["client_request_id"] == client_id],
                     timeout=timeout)
    assert len(found) == 1, f"exactly one record per request, got {found}"
    return found[0]


def _proxy_posts(mock: Proc, since_id: int) -> list[str]:
    """The paths the proxy itself POSTed to the mock (its recounts: User-Agent llmproxy-...) after request
    `since_id` of the mock's log."""
    return [r["path"] for r in mock_stats(mock)["requests"] if r["id"] > since_id and r["method"] == "POST"
            and any(name == "user-agent" and value.startswith("llmproxy-") for name, value in r["headers"])]


def _last_request_id(mock: Proc) -> int:
    requests = mock_stats(mock)["requests"]
    return requests[-1]["id"] if requests else 0


# 1. kinds ---------------------------------------------------------------------------------------------

def test_auto_detects_llamacpp_and_sglang(proxy):
    found = upstreams(proxy)
    assert (found["llama"]["type"], found["sglang"]["type"]) == ("llamacpp", "sglang"), found


def test_a_llamacpp_still_loading_its_model_at_start_is_detected_once_it_has(new_mock, new_proxy):
    # llama-server answers every path 503 "Loading model" until its model is loaded: no kind can be told yet,
    # and settling on the generic one would leave /completion unserved for good.
    loading = new_mock("llamacpp")
    assert http_post(loading.url + "/_mock/loading/1")[0] == 200
    proxy = new_proxy([{"url": loading.url, "name": "loading"}], health_check={"interval": 0.2})
    state = upstreams(proxy)["loading"]
    assert (state["type"], state["available"]) == ("auto", False), state
    assert "503" in state["last_error"]

    assert http_post(loading.url + "/_mock/loading/0")[0] == 200
    state = wait_for(lambda: (u := upstreams(proxy)["loading"])["available"] and u, timeout=10)
    assert state["type"] == "llamacpp", state
    reader, data, complete = send_request(proxy.port, {"prompt": PROMPT, "stream": True}, {"x-mock-tokens": "2"},
                                          path="/completion")
    assert (reader.status, complete) == (200, True), data[:300]
    assert_idle(proxy)


# 2. every generation path metered as llama.cpp counted it --------------------------------------------

# (path, body, what the mock counts as its prompt): native completion and infill, then the OpenAI routes.
GENERATIONS = [
    ("/completion", {"prompt": PROMPT}, prompt_tokens({"prompt": PROMPT}, TEMPLATE)),
    ("/completion", {"prompt": PROMPT, "stream": True}, prompt_tokens({"prompt": PROMPT}, TEMPLATE)),
    ("/completions", {"prompt": PROMPT}, prompt_tokens({"prompt": PROMPT}, TEMPLATE)),
    ("/completions", {"prompt": PROMPT, "stream": True}, prompt_tokens({"prompt": PROMPT}, TEMPLATE)),
    ("/infill", {"input_prefix": "def area(r):\n    return ", "input_suffix": "\n", "prompt": ""},
     prompt_tokens({"prompt": "def area(r):\n    return \n"}, TEMPLATE) + FIM_MARKERS),
    ("/infill", {"input_prefix": "x = ", "input_suffix": ";", "prompt": "", "stream": True},
     prompt_tokens({"prompt": "x = ;"}, TEMPLATE) + FIM_MARKERS),
    ("/v1/chat/completions", {"model": "m", "messages": MESSAGES}, prompt_tokens({"messages": MESSAGES}, TEMPLATE)),
    ("/v1/chat/completions", {"model": "m", "messages": MESSAGES, "stream": True},
     prompt_tokens({"messages": MESSAGES}, TEMPLATE)),
    ("/chat/completions", {"model": "m", "messages": MESSAGES, "stream": True},
     prompt_tokens({"messages": MESSAGES}, TEMPLATE)),
    ("/v1/completions", {"model": "m", "prompt": PROMPT}, prompt_tokens({"prompt": PROMPT}, TEMPLATE)),
    ("/v1/completions", {"model": "m", "prompt": PROMPT, "stream": True}, prompt_tokens({"prompt": PROMPT}, TEMPLATE)),
]


@pytest.mark.parametrize(("path", "body", "prompt"), GENERATIONS,
                         ids=[f"{p}{'-stream' if b.get('stream') else ''}" for p, b, _ in GENERATIONS])
def test_generation_is_metered_exactly_from_llamacpps_own_counts(proxy, usage_dir, path, body, prompt):
    reader, data, complete = send_request(proxy.port, body, {"x-mock-tokens": "7"}, path=path)
    assert reader.status == 200 and complete, data[:300]
    record = _record(usage_dir, reader)
    assert record["usage_source"] == "reported", record
    assert (record["prompt_tokens"], record["completion_tokens"]) == (prompt, 7), record
    assert record["endpoint"] == path and record["backend"] == "llama"
    assert record["is_stream"] is bool(body.get("stream"))
    if path in ("/completion", "/completions", "/infill") and not body.get("stream"):
        assert json.loads(data)["tokens_evaluated"] == prompt  # the mock agrees with the count above


def test_v1_embeddings_are_metered_from_the_reported_usage(proxy, usage_dir):
    body = {"model": "m", "input": ["The Danube flows east.", "The Rhine flows north, mostly."]}
    reader, data, complete = send_request(proxy.port, body, path="/v1/embeddings")
    assert reader.status == 200 and complete and len(json.loads(data)["data"]) == 2
    record = _record(usage_dir, reader)
    assert record["usage_source"] == "reported"
    assert (record["prompt_tokens"], record["completion_tokens"]) == (prompt_tokens(body, TEMPLATE), 0)


@pytest.mark.parametrize("stream", [False, True])
def test_openai_sdk_without_v1_in_its_base_url_is_metered(proxy, usage_dir, stream):
    client = openai.OpenAI(base_url=proxy.url, api_key="unused", max_retries=0, timeout=10)
    client_id = f"sdk-unversioned-{stream}"
    headers = {"X-Request-Id": client_id, "x-mock-tokens": "6"}
    if stream:
        chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, stream=True,
                                                     extra_headers=headers))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(
            f" tok{i}" for i in range(6))
    else:
        reply = client.chat.completions.create(model="m", messages=MESSAGES, extra_headers=headers)
        assert reply.usage.completion_tokens == 6
    record = _record_of_client_id(usage_dir, client_id)
    assert record["endpoint"] == "/chat/completions" and record["usage_source"] == "reported"
    assert (record["prompt_tokens"], record["completion_tokens"]) == (prompt_tokens({"messages": MESSAGES}, TEMPLATE),
                                                                      6), record


# 3. the prefix cache: timings.cache_n and cached_tokens --------------------------------------------

@pytest.mark.parametrize(("path", "body"), [
    ("/completion", {"prompt": PROMPT}),
    ("/completion", {"prompt": PROMPT, "stream": True}),
    ("/v1/chat/completions", {"model": "m", "messages": MESSAGES}),
    ("/v1/chat/completions", {"model": "m", "messages": MESSAGES, "stream": True}),
    ("/v1/completions", {"model": "m", "prompt": PROMPT, "stream": True}),
], ids=["completion", "completion-stream", "chat", "chat-stream", "v1-completions-stream"])
def test_cached_prompt_tokens_are_recorded_as_cache_reads(proxy, usage_dir, path, body):
    cached = 4
    reader, _, complete = send_request(proxy.port, body, {"x-mock-tokens": "3", "x-mock-cache-read": str(cached)},
                                       path=path)
    assert reader.status == 200 and complete
    record = _record(usage_dir, reader)
    assert record["usage_source"] == "reported"
    assert record["cache_read_tokens"] == cached, record
    assert record["prompt_tokens"] == prompt_tokens(body, TEMPLATE)  # the whole prompt, its cached part included


# 4. what llama.cpp does not report is counted by its own tokenizer afterwards ------------------------

@pytest.mark.parametrize(("path", "body"), [
    ("/embedding", {"content": "The Danube flows east."}),
    ("/embeddings", {"input": "The Rhine flows north, mostly."}),
    ("/embedding", {"content": ["The Danube flows east.", "The Rhine flows north, mostly.", "Short."]}),
    ("/embedding", {"content": [[11, 12, 13], [14, 15]]}),
], ids=["embedding", "embeddings", "embedding-batch", "embedding-token-ids"])
def test_native_embeddings_are_counted_by_llamacpps_tokenizer(proxy, llama, usage_dir, path, body):
    before = _last_request_id(llama)
    reader, data, complete = send_request(proxy.port, body, path=path)
    assert reader.status == 200 and complete and "usage" not in data.decode()  # llama.cpp reported nothing
    record = _record(usage_dir, reader)
    texts = body.get("content", body.get("input"))
    assert record["usage_source"] == "tokenized", record
    assert record["prompt_tokens"] == prompt_tokens({"input": texts}, TEMPLATE), record
    texts_to_count = [text for text in (texts if isinstance(texts, list) else [texts]) if isinstance(text, str)]
    assert _proxy_posts(llama, before) == ["/tokenize"] * len(texts_to_count)  # token ids need no asking


def _leave_after_first_event(port: int, path: str, body: dict, client_id: str) -> None:
    with raw_connect(port) as sock:
        sock.sendall(post_request(path, json.dumps(body).encode(),
                                  {"X-Request-Id": client_id, "x-mock-tokens": "50", "x-mock-delay-ms": "20"}))
        reader = ResponseReader(sock).read_head()
        assert reader.status == 200 and reader.read_chunk()  # one event, then the client leaves


# (path, body, the proxy's requests to llama.cpp's tokenizer that count its prompt)
LEFT_STREAMS = [
    ("/v1/chat/completions", {"model": "m", "stream": True, "messages": MESSAGES}, ["/apply-template", "/tokenize"]),
    ("/completion", {"prompt": PROMPT, "stream": True}, ["/tokenize"]),
    ("/v1/completions", {"model": "m", "prompt": PROMPT, "stream": True}, ["/tokenize"]),
]


@pytest.mark.parametrize(("path", "body", "asked"), LEFT_STREAMS, ids=[path for path, _, _ in LEFT_STREAMS])
def test_a_stream_its_client_left_is_counted_by_llamacpps_tokenizer(proxy, llama, usage_dir, path, body, asked):
    before = _last_request_id(llama)
    client_id = f"left{path.replace('/', '-')}"
    _leave_after_first_event(proxy.port, path, body, client_id)
    record = _record_of_client_id(usage_dir, client_id)
    assert (record["termination"], record["usage_source"]) == ("CD", "tokenized"), record
    assert record["prompt_tokens"] == prompt_tokens(body, TEMPLATE)  # what llama.cpp would have reported
    assert 1 <= record["completion_tokens"] < 50
    assert _proxy_posts(llama, before) == asked


def test_an_infill_stream_its_client_left_is_estimated_not_counted_from_its_empty_prompt(proxy, llama, usage_dir):
    # An editor plugin sends the code around the cursor as input_prefix/input_suffix and "prompt": "". /tokenize
    # of `prompt` would say 0 tokens, "tokenized"; the FIM-framed prompt is not countable that way: estimated.
    body = {"input_prefix": "def area(radius):\n    return 3.14159 * ", "input_suffix": "\n\nprint(area(2))\n",
            "prompt": "", "stream": True}
    exact = prompt_tokens({"prompt": body["input_prefix"] + body["input_suffix"]}, TEMPLATE) + FIM_MARKERS
    before = _last_request_id(llama)
    _leave_after_first_event(proxy.port, "/infill", body, "left-infill")
    record = _record_of_client_id(usage_dir, "left-infill")
    assert (record["termination"], record["usage_source"]) == ("CD", "estimated"), record
    assert abs(record["prompt_tokens"] - exact) <= exact / 2, (record["prompt_tokens"], exact)
    assert _proxy_posts(llama, before) == []


# 5. llama.cpp's own routes are forwarded to it -------------------------------------------------------

def _client_paths(mock: Proc, since_id: int) -> list[str]:
    return [r["path"] for r in mock_stats(mock)["requests"] if r["id"] > since_id
            and not any(name == "user-agent" and value.startswith("llmproxy-") for name, value in r["headers"])]


def test_tokenizer_routes_are_forwarded_to_llamacpp(proxy, llama):
    before = _last_request_id(llama)
    status, body = http_post(proxy.url + "/tokenize", json.dumps({"content": PROMPT}).encode())
    assert status == 200 and len(json.loads(body)["tokens"]) == prompt_tokens({"prompt": PROMPT}, TEMPLATE)
    status, body = http_post(proxy.url + "/detokenize", json.dumps({"tokens": [1000, 1001, 1002]}).encode())
    assert (status, json.loads(body)) == (200, {"content": " tok0 tok1 tok2"})
    status, body = http_post(proxy.url + "/apply-template", json.dumps({"messages": MESSAGES}).encode())
    assert status == 200 and json.loads(body)["prompt"].endswith("<|im_start|>assistant\n")
    assert _client_paths(llama, before) == ["/tokenize", "/detokenize", "/apply-template"]


def test_props_and_slots_are_forwarded_to_llamacpp(proxy, llama):
    before = _last_request_id(llama)
    status, body = http_get(proxy.url + "/props")
    assert status == 200 and "default_generation_settings" in json.loads(body)
    status, body = http_get(proxy.url + "/slots")
    assert status == 200 and [slot["id"] for slot in json.loads(body)] == [0, 1, 2, 3]
    assert _client_paths(llama, before) == ["/props", "/slots"]


def test_slot_actions_and_lora_adapters_go_to_llamacpp_not_to_the_sglang_beside_it(proxy, llama, sglang):
    # Paths only llama.cpp serves, which its mock does not implement (it answers its own 404): what matters is
    # that none of them is balanced onto the SGLang backend.
    llama_before, sglang_before = _last_request_id(llama), _last_request_id(sglang)
    for _ in range(3):
        http_post(proxy.url + "/slots/0?action=erase", b"{}")
        http_get(proxy.url + "/lora-adapters")
    assert _client_paths(llama, llama_before) == ["/slots/0?action=erase", "/lora-adapters"] * 3
    assert _client_paths(sglang, sglang_before) == []


@pytest.mark.parametrize("path", ["/models", "/v1/models"])
def test_model_lists_are_the_union_of_both_backends(proxy, llama, sglang, path):
    status, body = http_get(proxy.url + path)
    assert status == 200
    served = {card["id"] for card in json.loads(body)["data"]}
    llama_models = {card["id"] for card in json.loads(http_get(llama.url + "/v1/models")[1])["data"]}
    sglang_models = {card["id"] for card in json.loads(http_get(sglang.url + "/v1/models")[1])["data"]}
    assert sglang_models == {SGLANG_ONLY_MODEL} and SGLANG_ONLY_MODEL not in llama_models
    assert served == llama_models | sglang_models


# 6. connections llama-server closes after every streamed response -----------------------------------

async def _stream_once(port: int, request: bytes) -> tuple[int, bool]:
    """One request on its own connection; (status, whole chunked body read to its last chunk)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status = int(head.split(" ", 2)[1])
        if "transfer-encoding: chunked" not in head.lower():
            return status, False
        while size := int((await reader.readline()).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        return status, await reader.readline() == b"\r\n"
    finally:
        writer.close()


async def _streams(port: int, requests: list[bytes], concurrency: int) -> list[tuple[int, bool]]:
    queue = list(reversed(requests))
    results: list[tuple[int, bool]] = []

    async def worker() -> None:
        while queue:
            results.append(await _stream_once(port, queue.pop()))

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), STREAM_BUDGET_S * 2)
    return results


def _stream_requests(total: int) -> list[bytes]:
    """Streamed requests over llama.cpp's native and OpenAI paths, in turn."""
    bodies = [("/completion", {"prompt": PROMPT, "stream": True}),
              ("/v1/chat/completions", {"model": "m", "messages": MESSAGES, "stream": True}),
              ("/chat/completions", {"model": "m", "messages": MESSAGES, "stream": True}),
              ("/v1/completions", {"model": "m", "prompt": PROMPT, "stream": True})]
    return [post_request(path, json.dumps(body).encode(), {"x-mock-tokens": "3", "X-Request-Id": f"{STREAM_ID}{i}"})
            for i, (path, body) in enumerate(bodies[i % len(bodies)] for i in range(total))]


def test_a_thousand_streams_over_connections_closed_after_each_cost_no_retry(proxy, llama, usage_dir):
    assert http_post(llama.url + "/_mock/reset-stats")[0] == 200
    served_before = metric_value(proxy, "llmproxy_requests_total", 'backend="llama",status="200"')
    retries_before = metric_value(proxy, "llmproxy_upstream_retries_total")
    terminations_before = metric_value(proxy, "llmproxy_terminations_total")  # abnormal endings only
    _, page = http_get(proxy.url + "/metrics")
    for family in ("llmproxy_upstream_retries_total", "llmproxy_backend_ejections_total"):
        assert f"# HELP {family} ".encode() in page  # the counters read below exist under these names

    started = time.monotonic()
    results = asyncio.run(_streams(proxy.port, _stream_requests(STREAMS), STREAM_CONCURRENCY))
    elapsed = time.monotonic() - started
    print(f"\n{STREAMS} streams to llama.cpp, {STREAM_CONCURRENCY} at a time: {elapsed:.2f} s "
          f"({STREAMS / elapsed:.0f}/s)")

    assert results == [(200, True)] * STREAMS
    assert elapsed < STREAM_BUDGET_S
    stats = mock_stats(llama)
    assert stats["requests_total"] == STREAMS  # not one replayed
    assert stats["connections_total"] >= STREAMS  # the mock did close every streamed connection
    assert metric_value(proxy, "llmproxy_requests_total", 'backend="llama",status="200"') - served_before == STREAMS
    assert metric_value(proxy, "llmproxy_upstream_retries_total") == retries_before
    assert metric_value(proxy, "llmproxy_backend_ejections_total") == 0
    assert metric_value(proxy, "llmproxy_terminations_total") == terminations_before
    state = upstreams(proxy)["llama"]
    assert state["healthy"] and state["available"] and state["consecutive_failures"] == 0, state
    def stream_records() -> list[dict]:
        return [r for r in usage_records(usage_dir) if (r["client_request_id"] or "").startswith(STREAM_ID)]
    records = wait_for(lambda: len(r := stream_records()) >= STREAMS and r, timeout=15)
    assert len({r["client_request_id"] for r in records}) == len(records) == STREAMS
    assert all(r["usage_source"] == "reported" and r["completion_tokens"] == 3
                                           for r in records)
