"""End-to-end: the response cache (`caching:`) with the real proxy in front of a real mock backend.

Upstream requests are counted by the mock (its log of POSTs); the proxy's side is read from its response headers
(x-llmproxy-cache), its usage records and its metrics.
"""

from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor

from tests.redis_server import RedisServer
from tests.support import (
    GUIDE_CACHING,
    assert_idle,
    metric_value,
    mock_posts,
    post_count,
    send_request,
    start_proxy,
    usage_config,
    usage_records,
    wait_for,
)

CHAT_PATH = "/v1/chat/completions"
PRICING = {"m": {"input_per_million": 1.0, "output_per_million": 2.0}}
KEY_A = "sk-test-cache-a-0123456789abcdef"
KEY_B = "sk-test-cache-b-fedcba9876543210"
KEY_C = "sk-test-cache-c-0011223344556677"


def chat(content: str = "hi", temperature: float = 0.0, stream: bool = True) -> dict:
    return {"model": "m", "stream": stream, "temperature": temperature,
            "messages": [{"role": "user", "content": content}]}


def cached(port: int, body: dict, headers: dict | None = None) -> tuple[str, bytes]:
    """One request: (its x-llmproxy-cache, its body), which must be a whole 200."""
    reader, data, complete = send_request(port, body, headers)
    assert reader.status == 200 and complete, (reader.status, data)
    return reader.headers.get("x-llmproxy-cache", ""), data


def records_of(directory, count: int) -> list[dict]:
    """The usage records once there are `count` of them."""
    return wait_for(lambda: len(records := usage_records(directory)) == count and records)


def caching(ttl: float = 3600, **options: object) -> dict:
    return {"enabled": True, "strategies": [{"id": "det", "ttl_seconds": ttl,
                                             "match": {"path": CHAT_PATH, "json_body": {"temperature": 0.0}}}],
            **options}


def test_guide_config_caches_deterministic_requests_and_replays_their_bytes(new_mock, metered_proxy, tmp_path):
    mock = new_mock("vllm", "--tokens", "12")
    proxy = metered_proxy([{"name": "a", "url": mock.url}], caching=GUIDE_CACHING, pricing=PRICING)
    for stream in (True, False):
        first = cached(proxy.port, chat(stream=stream))
        again = cached(proxy.port, chat(stream=stream))
        assert (first[0], again[0]) == ("miss", "hit")
        assert again[1] == first[1]  # a streamed hit's events are the original stream's bytes
    assert post_count(mock) == 2  # one upstream request per shape: streamed and whole are kept apart
    for _ in range(2):  # not deterministic: never cached
        assert cached(proxy.port, chat(temperature=0.7))[0] == "bypass"
    assert cached(proxy.port, chat(), {"Cache-Control": "no-cache"})[0] == "bypass"
    assert post_count(mock) == 5
    records = records_of(tmp_path, 7)
    hits = [r for r in records if r["cached"]]
    assert len(hits) == 2
    for hit in hits:
        original = next(r for r in records if not r["cached"] and r["is_stream"] == hit["is_stream"])
        assert (hit["prompt_tokens"], hit["completion_tokens"]) == (original["prompt_tokens"],
                                                                    original["completion_tokens"])
        assert hit["cost_usd"] == 0.0 < original["cost_usd"]
        assert not hit["deduplicated"]
    assert metric_value(proxy, "llmproxy_cache_requests_total", 'result="hit"') == 2
    assert metric_value(proxy, "llmproxy_cache_requests_total", 'result="miss"') == 2
    assert metric_value(proxy, "llmproxy_cache_requests_total", 'result="bypass"') == 3
    assert_idle(proxy)


def test_one_keys_answer_never_reaches_another_key(new_mock, new_proxy):
    mock = new_mock("vllm")
    proxy = new_proxy([{"name": "a", "url": mock.url}], caching=caching(),
                      auth={"enabled": True, "keys": [{"key": KEY_A}, {"key": KEY_B}]})
    as_a, as_b = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}
    assert cached(proxy.port, chat(), as_a)[0] == "miss"
    assert cached(proxy.port, chat(), as_b)[0] == "miss"  # per_key (the default): B gets its own answer
    assert cached(proxy.port, chat(), as_a)[0] == "hit"
    assert cached(proxy.port, chat(), as_b)[0] == "hit"
    assert post_count(mock) == 2
    reader, _, _ = send_request(proxy.port, chat())  # authentication comes first, hit or not
    assert reader.status == 401


def test_an_answer_expires_after_its_ttl_and_bill_hits_charges_the_original_cost(new_mock, metered_proxy,
                                                                                 tmp_path):
    mock = new_mock("vllm")
    proxy = metered_proxy([{"name": "a", "url": mock.url}], caching=caching(ttl=1, bill_hits=True),
                          pricing=PRICING)
    assert cached(proxy.port, chat())[0] == "miss"
    assert cached(proxy.port, chat())[0] == "hit"
    time.sleep(1.3)
    assert cached(proxy.port, chat())[0] == "miss"
    assert post_count(mock) == 2
    records = records_of(tmp_path, 3)
    assert [r["cached"] for r in records] == [False, True, False]
    assert records[1]["cost_usd"] == records[0]["cost_usd"] > 0


def test_the_size_bound_holds_under_10000_distinct_answers(new_mock, new_proxy):
    mock = new_mock("vllm", "--tokens", "1")
    max_bytes = 256 * 1024
    proxy = new_proxy([{"name": "a", "url": mock.url}], caching=caching(max_size_mb=0.25, max_entry_kb=4))
    total, workers = 10_000, 8

    def run(worker: int) -> list[str]:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        seen = []
        for i in range(worker, total, workers):
            conn.request("POST", CHAT_PATH, json.dumps(chat(f"q{i}", stream=False)),
                         {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            seen.append(response.getheader("x-llmproxy-cache"))
        conn.close()
        return seen

    with ThreadPoolExecutor(workers) as pool:
        results = [seen for part in pool.map(run, range(workers)) for seen in part]
    assert results.count("miss") == total
    stored = metric_value(proxy, "llmproxy_cache_bytes_total", 'op="stored"')
    dropped = (metric_value(proxy, "llmproxy_cache_bytes_total", 'op="evicted"')
               + metric_value(proxy, "llmproxy_cache_bytes_total", 'op="expired"'))
    assert 0 < stored - dropped <= max_bytes
    assert metric_value(proxy, "llmproxy_cache_evictions_total") > total // 2
    assert cached(proxy.port, chat(f"q{total - 1}", stream=False))[0] == "hit"  # the most recent stay
    assert cached(proxy.port, chat("q0", stream=False))[0] == "miss"  # the least recent went


def test_the_redis_store_is_shared_by_two_proxies(new_mock, tmp_path, procs):
    mock = new_mock("vllm")
    with RedisServer() as redis_server:
        options = caching(store="redis", redis_url=redis_server.url)
        (tmp_path / "one").mkdir()
        (tmp_path / "two").mkdir()
        first = start_proxy(tmp_path / "one", [{"name": "a", "url": mock.url}], caching=options,
                            usage={"metering": False})
        procs.append(first)
        # The second meters usage, the first does not: its answers are stored without usage.
        second = start_proxy(tmp_path / "two", [{"name": "a", "url": mock.url}], caching=options,
                             usage=usage_config(tmp_path / "two"))
        procs.append(second)
        miss = cached(first.port, chat())
        assert miss[0] == "miss"
        wait_for(lambda: metric_value(first, "llmproxy_cache_bytes_total", 'op="stored"') > 0)
        hit = cached(second.port, chat())
        assert hit == ("hit", miss[1])
        assert post_count(mock) == 1
        assert [r["path"] for r in mock_posts(mock)] == [CHAT_PATH]
        # Exactly one record per client, even for an answer stored unmetered: nothing counted, but recorded.
        [record] = records_of(tmp_path / "two", 1)
        assert record["cached"] and record["usage_source"] == "none" and record["completion_tokens"] == 0


def test_a_hit_counts_as_a_request_but_not_its_tokens_against_the_limits(new_mock, new_proxy):
    mock = new_mock("vllm", "--tokens", "20")
    proxy = new_proxy([{"name": "a", "url": mock.url}], caching=caching(),
                      auth={"enabled": True, "keys": [{"key": KEY_A}]},
                      rate_limit={"enabled": True, "per_key": {"requests_per_minute": 600, "burst": 100,
                                                               "tokens_per_minute": 1000}})
    as_a = {"Authorization": f"Bearer {KEY_A}"}

    def remaining() -> tuple[int, int, str]:
        reader, _, complete = send_request(proxy.port, chat(), as_a)
        assert reader.status == 200 and complete
        return (int(reader.headers["x-ratelimit-remaining-requests"]),
                int(reader.headers["x-ratelimit-remaining-tokens"]), reader.headers["x-llmproxy-cache"])

    requests_0, tokens_0, result = remaining()
    assert result == "miss"
    requests_1, tokens_1, result = wait_for(lambda: (found := remaining()) and found[1] < tokens_0 and found)
    assert result == "hit" and requests_1 < requests_0  # the miss's tokens were charged once it ended
    requests_2, tokens_2, result = remaining()
    # A hit is a request, but costs no tokens: the bucket only refills (about 17 a second) meanwhile.
    assert result == "hit" and requests_2 < requests_1 and tokens_2 >= tokens_1
    assert post_count(mock) == 1


def test_a_cacheable_request_asks_the_backend_for_an_uncompressed_answer(new_mock, new_proxy):
    # A stored answer keeps no content-encoding: a gzipped body would reach clients that never asked for gzip.
    mock = new_mock("vllm")
    proxy = new_proxy([{"name": "a", "url": mock.url}], caching=caching())
    gzip_ok = {"Accept-Encoding": "gzip"}
    assert cached(proxy.port, chat(), gzip_ok)[0] == "miss"
    assert cached(proxy.port, chat(temperature=1.0), gzip_ok)[0] == "bypass"
    cacheable, uncacheable = ({name for name, _ in post["headers"]} for post in mock_posts(mock))
    assert "accept-encoding" not in cacheable
    assert "accept-encoding" in uncacheable  # only what may be stored loses it


def test_byok_requests_bypass_the_cache_and_a_refused_tenant_never_gets_anothers_answer(new_mock, tmp_path, procs):
    mock, other = new_mock("vllm"), new_mock("vllm", "--model", "other")  # "m" is served by backend a only
    backends = [{"name": "a", "url": mock.url}, {"name": "b", "url": other.url}]
    as_a, as_b, as_c = ({"Authorization": f"Bearer {key}"} for key in (KEY_A, KEY_B, KEY_C))
    for byok_missing in ("fallback", "refuse"):
        (tmp_path / byok_missing).mkdir()
        proxy = start_proxy(tmp_path / byok_missing, backends, caching=caching(per_key=False),
                            auth={"enabled": True, "byok_missing": byok_missing,
                                  "keys": [{"key": KEY_A, "backend_keys": {"a": "sk-a-own-provider-key"}},
                                           {"key": KEY_B, "backend_keys": {"b": "sk-b-own-provider-key"}},
                                           {"key": KEY_C}]})
        procs.append(proxy)
        assert cached(proxy.port, chat(), as_a)[0] == "bypass"  # paid with A's own key: never shared
        if byok_missing == "fallback":
            assert [cached(proxy.port, chat(), as_c)[0] for _ in range(2)] == ["miss", "hit"]
            assert cached(proxy.port, chat(), as_a)[0] == "bypass"  # nor is A served what others paid for
        else:  # B has no key of its own for a: refused, whatever is stored or in flight
            reader, data, _ = send_request(proxy.port, chat(), as_b)
            assert reader.status == 403 and b"backend_credential_missing" in data
            assert reader.headers["x-llmproxy-cache"] == "bypass"


def test_the_query_and_the_anthropic_headers_keep_answers_apart(new_mock, new_proxy):
    mock = new_mock("vllm")
    proxy = new_proxy([{"name": "a", "url": mock.url}],
                      caching=caching(strategies=[{"id": "all", "match": {"json_body": {"temperature": 0.0}}}]))

    def result(path: str, headers: dict | None = None) -> str:
        reader, data, complete = send_request(proxy.port, chat(), headers, path=path)
        assert reader.status == 200 and complete, data
        return reader.headers["x-llmproxy-cache"]

    assert [result(CHAT_PATH), result(CHAT_PATH + "?api-version=1"), result(CHAT_PATH + "?api-version=1")] \
        == ["miss", "miss", "hit"]
    beta = {"anthropic-beta": "feature-1"}
    assert [result(CHAT_PATH, beta), result(CHAT_PATH, beta), result(CHAT_PATH)] == ["miss", "hit", "hit"]
    assert post_count(mock) == 3


def test_an_unreadable_redis_entry_is_a_miss_and_is_replaced(new_mock, new_proxy):
    import redis

    mock = new_mock("vllm")
    with RedisServer() as redis_server:
        proxy = new_proxy([{"name": "a", "url": mock.url}], caching=caching(store="redis", redis_url=redis_server.url))
        client = redis.Redis.from_url(redis_server.url)
        try:
            assert cached(proxy.port, chat(stream=False))[0] == "miss"
            [key] = wait_for(lambda: client.keys("llmproxy:cache:*"))
            bad = [b'{"s": 200}\nbody',  # another version's (an AttributeError/KeyError was a 500 for the TTL)
                   b'{"v": 2, "s": 200, "t": "a/b\\r\\nset-cookie: x=1", "st": false, "u": null, "b": "a"}\nbody']
            for value in bad:
                client.set(key, value)
                reader, data, complete = send_request(proxy.port, chat(stream=False))
                assert reader.status == 200 and complete and b'"choices"' in data, data
                assert reader.headers["x-llmproxy-cache"] == "miss" and "set-cookie" not in reader.headers
                wait_for(lambda v=value: client.get(key) not in (None, v))  # deleted, stored again
            assert cached(proxy.port, chat(stream=False))[0] == "hit"
            assert post_count(mock) == 3
        finally:
            client.close()


def test_a_stream_that_ends_with_an_in_band_error_is_not_stored(new_mock, new_proxy):
    mock = new_mock("vllm")
    proxy = new_proxy([{"name": "a", "url": mock.url}], caching=caching())
    for _ in range(2):  # a 200 whole at the HTTP level, but the backend failed midway: not an answer to keep
        result, data = cached(proxy.port, chat(), {"x-mock-error-after": "3"})
        assert result == "miss" and b'"error"' in data
    assert post_count(mock) == 2
    assert [cached(proxy.port, chat())[0] for _ in range(2)] == ["miss", "hit"]  # a whole one is
