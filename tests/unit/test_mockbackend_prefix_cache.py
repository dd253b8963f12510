"""The mock's prefix-cache model (llmproxy/mockbackend/prefixcache.py), over real HTTP against in-process mocks.

A prompt whose beginning was seen recently finds its whole 16-token blocks cached (at most all but its last token,
as vLLM computes the last one for its logits): its first byte comes after base + per-token cost x uncached tokens,
and each engine reports the hit its own way. Prompts are built from distinct short words, one token each, so a
prompt's token count is its word count.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator

import pytest

from llmproxy.mockbackend import TEMPLATES, MockOptions, main, prompt_tokens
from llmproxy.mockbackend.prefixcache import BLOCK_TOKENS, PrefixCache
from llmproxy.mockbackend.textgen import prompt_sequence, responses_prompt_tokens
from tests.unit.test_mockbackend import Backend, Client, control, metric, request

HIT_HEADER = "x-mock-prefix-cache-hit-tokens"
WORDS = ["".join(w) for w in itertools.product("abcdefghij", repeat=3)]  # 1,000 one-token words


def words(start: int, count: int) -> str:
    """`count` distinct words: `count` tokens as a completion prompt (the templates add no BOS)."""
    return " ".join(WORDS[start:start + count])


def whole_blocks_before_last(prompt: int) -> int:
    """What an identical second request finds cached: whole blocks, the last token always computed."""
    return (prompt - 1) // BLOCK_TOKENS * BLOCK_TOKENS


@pytest.fixture
def fresh() -> Iterator[list[Backend]]:
    started: list[Backend] = []
    yield started
    for backend in started:
        backend.close()


def start(fresh: list[Backend], **kwargs: object) -> Backend:
    options = {"prefix_cache_tokens": 100_000, "prefill_us_per_token": 0.0, "base_ttft_ms": 0.0, **kwargs}
    backend = Backend(MockOptions(**options))  # type: ignore[arg-type]
    fresh.append(backend)
    return backend


def complete(port: int, prompt: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """A vLLM completion: (the hit header, the usage)."""
    resp = request(port, "POST", "/v1/completions", {"prompt": prompt}, headers)
    assert resp.status == 200
    return int(resp.headers[HIT_HEADER]), json.loads(resp.body)["usage"]


def time_to_head(port: int, path: str, body: dict) -> tuple[float, dict[str, str], bytes]:
    client = Client(port)
    try:
        began = time.perf_counter()
        client.send("POST", path, body)
        status, headers = client.head()
        elapsed = time.perf_counter() - began
        assert status == 200
        chunks = []
        while (piece := client.chunk()) is not None:
            chunks.append(piece)
        return elapsed, headers, b"".join(chunks)
    finally:
        client.close()


# --- hits and time to first byte --------------------------------------------------------------------------


def test_a_repeated_prompt_reports_its_cached_blocks_and_its_first_byte_comes_sooner(fresh: list[Backend]) -> None:
    # 400 us per uncached token: the 200-token prompt waits ~82 ms cold, at most ~9 ms once its blocks are cached
    port = start(fresh, prefill_us_per_token=400.0, base_ttft_ms=2.0).port
    body = {"messages": [{"role": "system", "content": words(0, 150)}, {"role": "user", "content": words(500, 20)}]}
    p = prompt_tokens(body, TEMPLATES["vllm"])
    assert p % BLOCK_TOKENS  # a partial last block: the hit is every whole block
    cold, cold_headers, cold_body = time_to_head(port, "/v1/chat/completions", body)
    warm, warm_headers, warm_body = time_to_head(port, "/v1/chat/completions", body)
    assert cold_headers[HIT_HEADER] == "0" and json.loads(cold_body)["usage"]["prompt_tokens_details"] is None
    hit = p // BLOCK_TOKENS * BLOCK_TOKENS
    assert int(warm_headers[HIT_HEADER]) == hit
    assert json.loads(warm_body)["usage"]["prompt_tokens_details"] == {"cached_tokens": hit}
    assert cold >= (2 + 0.4 * p) / 1000 * 0.95
    uncached = p - hit
    assert warm < (2 + 0.4 * uncached) / 1000 + 0.030 and cold - warm > 0.050


def test_a_prompt_of_whole_blocks_computes_its_last_block_again(fresh: list[Backend]) -> None:
    port = start(fresh).port
    prompt = words(0, 3 * BLOCK_TOKENS)
    assert complete(port, prompt)[0] == 0
    hit, usage = complete(port, prompt)
    assert hit == whole_blocks_before_last(3 * BLOCK_TOKENS) == 2 * BLOCK_TOKENS  # vLLM: num_tokens - 1
    assert usage["prompt_tokens_details"] == {"cached_tokens": hit}


def test_the_first_byte_delay_knob_adds_to_the_prefill_delay(fresh: list[Backend]) -> None:
    port = start(fresh, prefill_us_per_token=1000.0, base_ttft_ms=10.0).port
    client = Client(port)
    try:
        began = time.perf_counter()
        client.send("POST", "/v1/completions", {"prompt": words(0, 20)}, {"x-mock-first-byte-delay-ms": "40"})
        client.head()
        assert time.perf_counter() - began >= (10 + 20 + 40) / 1000 * 0.95
    finally:
        client.close()


# --- what each engine reports --------------------------------------------------------------------------------

CHAT_TURN = [{"role": "system", "content": words(0, 60)}, {"role": "user", "content": words(300, 13)}]


def vllm_cached(body: bytes) -> int:
    details = json.loads(body)["usage"]["prompt_tokens_details"]
    return details["cached_tokens"] if details else 0


def sglang_generate_cached(body: bytes) -> int:
    return json.loads(body)["meta_info"]["cached_tokens"]


def llamacpp_cached(body: bytes) -> int:
    reply = json.loads(body)
    timings = reply["timings"]
    assert timings["cache_n"] + timings["prompt_n"] == reply.get("tokens_evaluated", reply.get("usage", {}).get(
        "prompt_tokens"))
    return timings["cache_n"]


def llamacpp_chat_cached(body: bytes) -> int:
    assert json.loads(body)["usage"]["prompt_tokens_details"]["cached_tokens"] == llamacpp_cached(body)
    return llamacpp_cached(body)


REPORTS = [  # dialect, route, body, what the engine reports as cached
    ("vllm", "/v1/chat/completions", {"messages": CHAT_TURN}, vllm_cached),
    ("vllm", "/v1/completions", {"prompt": words(0, 70)}, vllm_cached),
    ("sglang", "/generate", {"text": words(0, 70)}, sglang_generate_cached),
    ("sglang", "/v1/chat/completions", {"messages": CHAT_TURN}, vllm_cached),
    ("sglang", "/v1/completions", {"prompt": words(0, 70)}, vllm_cached),
    ("llamacpp", "/completion", {"prompt": words(0, 70)}, llamacpp_cached),
    ("llamacpp", "/v1/chat/completions", {"messages": CHAT_TURN}, llamacpp_chat_cached),
]


@pytest.mark.parametrize("dialect,path,body,cached", REPORTS, ids=[f"{d}{p}" for d, p, _, _ in REPORTS])
def test_each_engine_reports_the_hit_where_it_does(fresh: list[Backend], dialect: str, path: str, body: dict,
                                                   cached: object) -> None:
    port = start(fresh, dialect=dialect).port
    p = len(prompt_sequence(body if "text" not in body else {"prompt": body["text"]}, TEMPLATES[dialect]))
    first = request(port, "POST", path, body)
    second = request(port, "POST", path, body)
    assert (first.headers[HIT_HEADER], cached(first.body)) == ("0", 0)  # type: ignore[operator]
    assert int(second.headers[HIT_HEADER]) == cached(second.body) == whole_blocks_before_last(p) > 0  # type: ignore[operator]


def test_llamacpp_messages_and_vllm_responses_report_the_hit_vllm_messages_do_not(fresh: list[Backend]) -> None:
    messages = {"model": "m", "max_tokens": 4, "system": words(0, 40), "messages": [
        {"role": "user", "content": words(100, 30)}]}
    llamacpp = start(fresh, dialect="llamacpp").port
    request(llamacpp, "POST", "/v1/messages", messages)
    reply = request(llamacpp, "POST", "/v1/messages", messages)
    hit = int(reply.headers[HIT_HEADER])
    assert hit == whole_blocks_before_last(prompt_tokens(messages, TEMPLATES["llamacpp"])) > 0
    assert json.loads(reply.body)["usage"]["cache_read_input_tokens"] == hit
    vllm = start(fresh).port
    request(vllm, "POST", "/v1/messages", messages)
    reply = request(vllm, "POST", "/v1/messages", messages)
    assert int(reply.headers[HIT_HEADER]) > 0 and "cache_read_input_tokens" not in json.loads(reply.body)["usage"]
    # the Responses API: a follow-up by previous_response_id finds the stored conversation cached
    first_body = {"model": "m", "instructions": words(0, 50), "input": words(200, 10)}
    first = json.loads(request(vllm, "POST", "/v1/responses", first_body).body)
    p1 = responses_prompt_tokens(first_body, TEMPLATES["vllm"])
    follow = json.loads(request(vllm, "POST", "/v1/responses", {
        "model": "m", "previous_response_id": first["id"], "input": words(400, 10)}).body)
    assert follow["usage"]["input_tokens_details"]["cached_tokens"] == p1 // BLOCK_TOKENS * BLOCK_TOKENS


def test_the_cache_read_knob_overrides_what_the_body_reports_not_the_model(fresh: list[Backend]) -> None:
    port = start(fresh).port
    prompt = words(0, 40)
    complete(port, prompt)
    hit, usage = complete(port, prompt, {"x-mock-cache-read": "5"})
    assert (hit, usage["prompt_tokens_details"]) == (32, {"cached_tokens": 5})
    hit, usage = complete(port, prompt, {"x-mock-cache-read": "0"})
    assert (hit, usage["prompt_tokens_details"]) == (32, None)


# --- which prompts hit -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["vllm", "sglang", "llamacpp"])
def test_a_conversation_growing_turn_by_turn_hits_the_previous_turns_prompt(fresh: list[Backend],
                                                                           dialect: str) -> None:
    port = start(fresh, dialect=dialect).port
    conversation = [{"role": "system", "content": words(0, 30)}]
    previous = 0
    for turn in range(4):
        conversation.append({"role": "user", "content": words(100 + 40 * turn, 7 + turn)})
        body = {"messages": conversation, "max_tokens": 5}
        reply = request(port, "POST", "/v1/chat/completions", body)
        # the previous turn's prompt, its generation prompt included, is a prefix of this one
        assert int(reply.headers[HIT_HEADER]) == previous // BLOCK_TOKENS * BLOCK_TOKENS
        previous = prompt_tokens(body, TEMPLATES[dialect])
        answer = json.loads(reply.body)["choices"][0]["message"]["content"]
        conversation.append({"role": "assistant", "content": answer})


def test_a_different_system_prompt_misses_while_a_shared_one_hits(fresh: list[Backend]) -> None:
    port = start(fresh).port

    def chat(system: str, user: str) -> int:
        body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
        return int(request(port, "POST", "/v1/chat/completions", body).headers[HIT_HEADER])

    assert chat(words(0, 64), words(500, 10)) == 0
    assert chat(words(64, 64), words(500, 10)) == 0  # another system prompt, the same question: nothing shared
    shared = chat(words(0, 64), words(700, 10))  # the first system prompt again, another question
    assert 64 <= shared < 64 + 16
    # Qwen's template adds its own system prompt to a request without one: two strangers share it
    plain = [{"role": "user", "content": words(800, 5)}], [{"role": "user", "content": words(900, 5)}]
    hits = [int(request(port, "POST", "/v1/chat/completions", {"messages": m}).headers[HIT_HEADER]) for m in plain]
    assert hits[0] == 0 and hits[1] > 0


def test_capacity_evicts_the_least_recently_used_blocks(fresh: list[Backend]) -> None:
    port = start(fresh, prefix_cache_tokens=4 * BLOCK_TOKENS).port  # room for two 40-token prompts' blocks
    a, b, c = words(0, 40), words(100, 40), words(200, 40)
    assert [complete(port, x)[0] for x in (a, b)] == [0, 0]
    assert complete(port, a)[0] == 32  # a is now the most recently used
    assert complete(port, c)[0] == 0  # c's two blocks push out b's
    assert [complete(port, x)[0] for x in (a, c, b)] == [32, 32, 0]  # and b's return pushes out a's
    assert complete(port, a)[0] == 0


def test_a_long_prompt_evicts_its_own_tail_not_its_head() -> None:
    cache = PrefixCache(4 * BLOCK_TOKENS)
    tokens = [f"t{i}" for i in range(10 * BLOCK_TOKENS + 3)]
    cache.release(cache.admit(cache.lookup(tokens), 0))
    assert cache.lookup(tokens).hit == 4 * BLOCK_TOKENS  # the first four blocks stayed
    shorter = tokens[:2 * BLOCK_TOKENS + 1]
    assert cache.lookup(shorter).hit == 2 * BLOCK_TOKENS


def test_the_same_requests_give_the_same_hits(fresh: list[Backend]) -> None:
    # four prefixes, prompts of several lengths on each, in a cache too small for all: hits and evictions
    prompts = [words(200 * (i % 4), 20 + i * 13 % 50) for i in range(40)]
    runs = []
    for _ in range(2):
        port = start(fresh, prefix_cache_tokens=150).port
        runs.append([complete(port, prompt)[0] for prompt in prompts])
    assert runs[0] == runs[1]
    assert 0 < runs[0].count(0) < len(prompts)


# --- metrics, stats, flush ----------------------------------------------------------------------------------------


def test_vllm_metrics_count_queries_and_hits_in_tokens_and_kv_use_follows_requests_in_flight(
        fresh: list[Backend]) -> None:
    port = start(fresh, prefix_cache_tokens=100 * BLOCK_TOKENS).port
    prompt = words(0, 40)
    complete(port, prompt)
    complete(port, prompt)
    assert (metric(port, "vllm:prefix_cache_queries_total"), metric(port, "vllm:prefix_cache_hits_total")) == (80, 32)
    assert metric(port, "vllm:kv_cache_usage_perc") == 0.0  # cached blocks nobody holds are free, as in vLLM
    clients = []
    try:
        for _ in range(2):  # two streams held after their first event: both hold the shared prompt blocks
            client = Client(port)
            client.send("POST", "/v1/completions", {"prompt": prompt, "stream": True},
                        {"x-mock-gate": "kv", "x-mock-tokens": "8"})
            client.head()
            client.chunk()
            clients.append(client)
        # 2 shared cached blocks + per stream ceil((8-token tail + 8 generated) / 16) = 1 block
        assert metric(port, "vllm:kv_cache_usage_perc") == pytest.approx(4 / 100)
        control(port, "/_mock/gauges?kv=0.5")
        assert metric(port, "vllm:kv_cache_usage_perc") == 0.5  # a pin still wins
        control(port, "/_mock/gauges")
    finally:
        for client in clients:
            client.close()
    deadline = time.monotonic() + 5
    while metric(port, "vllm:kv_cache_usage_perc") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert metric(port, "vllm:kv_cache_usage_perc") == 0.0


def test_sglang_metrics_report_the_last_hit_rate_and_token_usage(fresh: list[Backend]) -> None:
    port = start(fresh, dialect="sglang").port
    assert (metric(port, "sglang:cache_hit_rate"), metric(port, "sglang:token_usage")) == (0.0, 0.0)
    body = {"text": words(0, 40)}
    request(port, "POST", "/generate", body)
    request(port, "POST", "/generate", body)
    assert metric(port, "sglang:cache_hit_rate") == 32 / 40
    request(port, "POST", "/generate", {"text": words(500, 40)})
    assert metric(port, "sglang:cache_hit_rate") == 0.0
    assert "sglang:prefix" not in request(port, "GET", "/metrics").body.decode()


def test_stats_show_the_totals_reset_stats_keeps_the_cache_and_flush_cache_empties_it(
        fresh: list[Backend]) -> None:
    backend = start(fresh)
    port = backend.port
    prompt = words(0, 40)
    complete(port, prompt)
    stats = backend.stats()
    assert (stats["prefix_cache_queries_total"], stats["prefix_cache_hits_total"]) == (40, 0)
    assert stats["prefix_cache"]["cached_tokens"] == 32 and stats["prefix_cache"]["capacity_tokens"] == 100_000
    control(port, "/_mock/reset-stats")
    assert complete(port, prompt)[0] == 32  # the cache survived
    stats = backend.stats()
    assert (stats["prefix_cache_queries_total"], stats["prefix_cache_hits_total"]) == (40, 32)
    assert control(port, "/_mock/flush-cache") == (200, {"flushed_tokens": 32, "cached_tokens": 0})
    assert complete(port, prompt)[0] == 0


def test_sglang_flush_cache_empties_it_unless_requests_are_in_flight(fresh: list[Backend]) -> None:
    port = start(fresh, dialect="sglang").port
    body = {"text": words(0, 40)}
    request(port, "POST", "/generate", body)
    client = Client(port)
    try:
        client.send("POST", "/generate", {**body, "stream": True}, {"x-mock-gate": "flush", "x-mock-tokens": "3"})
        client.head()
        refused = request(port, "POST", "/flush_cache")
        assert (refused.status, refused.body) == (400, b"Flush cache failed.\n")
    finally:
        client.close()
    deadline = time.monotonic() + 5
    while (flushed := request(port, "GET", "/flush_cache")).status != 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert flushed.status == 200 and flushed.body.startswith(b"Cache flushed.\n")
    assert "content-type" not in flushed.headers
    assert request(port, "POST", "/generate", body).headers[HIT_HEADER] == "0"


# --- off by default ------------------------------------------------------------------------------------------------


def test_the_model_is_off_by_default_and_changes_nothing(fresh: list[Backend]) -> None:
    assert MockOptions().prefix_cache_tokens == 0
    backend = Backend(MockOptions())
    fresh.append(backend)
    port = backend.port
    prompt = words(0, 40)
    for _ in range(2):
        resp = request(port, "POST", "/v1/completions", {"prompt": prompt})
        assert HIT_HEADER not in resp.headers
        assert json.loads(resp.body)["usage"]["prompt_tokens_details"] is None
    text = request(port, "GET", "/metrics").body.decode()
    assert "prefix_cache" not in text
    assert "prefix_cache" not in backend.stats()
    assert control(port, "/_mock/flush-cache") == (200, {"flushed_tokens": 0, "cached_tokens": 0})


@pytest.mark.parametrize("dialect", ["tgi", "ollama", "anthropic"])
def test_the_model_is_refused_for_engines_it_does_not_model(dialect: str) -> None:
    with pytest.raises(ValueError, match="prefix-cache"):
        MockOptions(dialect=dialect, prefix_cache_tokens=1024)
    assert main(["--dialect", dialect, "--prefix-cache-tokens", "1024"]) == 2


def test_a_long_prompt_is_looked_up_in_a_few_milliseconds() -> None:
    # ~100,000 characters, ~29,000 tokens: the lookup hashes 16 tokens at a time, chained, and stops at a miss
    body = {"messages": [{"role": "user", "content": " ".join(WORDS[i % 1000] for i in range(25_000))}]}
    tokens = prompt_sequence(body, TEMPLATES["vllm"])
    cache = PrefixCache(1_000_000)
    cache.release(cache.admit(cache.lookup(tokens), 16))
    best = min(_timed(lambda: cache.lookup(tokens)) for _ in range(3))
    assert cache.lookup(tokens).hit == whole_blocks_before_last(len(tokens))
    assert best < 0.025  # 2.6 ms when written; the bound only catches a lookup gone quadratic


def _timed(action: object) -> float:
    began = time.perf_counter()
    action()  # type: ignore[operator]
    return time.perf_counter() - began
