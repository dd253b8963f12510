"""SIGHUP: the config file is read again; a valid one is swapped in whole, a broken one changes nothing."""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path

import yaml

from tests.support import (
    CHAT,
    ResponseReader,
    assert_idle,
    http_post,
    mock_stats,
    post_count,
    post_request,
    raw_connect,
    sighup,
    start_mock,
    start_proxy,
    upstreams,
    usage_config,
    usage_records,
    wait_for,
)


def _rewrite(config: Path, change) -> None:
    doc = yaml.safe_load(config.read_text())
    change(doc)
    config.write_text(yaml.safe_dump(doc))


def test_reload_that_adds_a_backend_starts_using_it(tmp_path):
    a, b = start_mock("vllm"), start_mock("vllm")
    proxy = start_proxy(tmp_path, [{"url": a.url, "name": "a"}], routing={"load_balance": "round_robin"})
    try:
        for _ in range(4):
            assert http_post(proxy.url + "/v1/chat/completions", CHAT)[0] == 200
        assert post_count(b) == 0
        _rewrite(tmp_path / "config.yaml", lambda doc: doc["backends"].append({"url": b.url, "name": "b"}))
        sighup(proxy)
        assert list(upstreams(proxy)) == ["a", "b"]
        for _ in range(10):
            assert http_post(proxy.url + "/v1/chat/completions", CHAT)[0] == 200
        assert post_count(b) == 5 and post_count(a) == 4 + 5
    finally:
        for proc in (proxy, a, b):
            proc.stop()


def test_a_broken_config_is_refused_and_traffic_continues(tmp_path):
    a = start_mock("vllm")
    proxy = start_proxy(tmp_path, [{"url": a.url, "name": "a"}])
    try:
        config = tmp_path / "config.yaml"
        good = config.read_text()
        _rewrite(config, lambda doc: doc["backends"][0].update(weight="heavy"))
        sighup(proxy, "reload refused")
        assert "backends[0].weight: must be a positive integer" in proxy.text()
        config.write_text(good + "\nnot: [valid")  # and YAML that does not even parse
        sighup(proxy, "reload refused")
        assert proxy.popen.poll() is None
        assert list(upstreams(proxy)) == ["a"]
        assert http_post(proxy.url + "/v1/chat/completions", CHAT)[0] == 200
    finally:
        proxy.stop()
        a.stop()


def test_streams_in_flight_finish_on_a_backend_the_reload_removed(tmp_path):
    old, new = start_mock("vllm"), start_mock("vllm")
    proxy = start_proxy(tmp_path, [{"url": old.url, "name": "old"}])
    try:
        # A stream held open by a gate on the old backend...
        sock = raw_connect(proxy.port)
        body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\n"
                     b"x-mock-tokens: 5\r\nx-mock-gate: reload\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        reader = ResponseReader(sock)
        reader.read_head()
        # ...while the config moves all traffic to the new backend.
        _rewrite(tmp_path / "config.yaml", lambda doc: doc.update(backends=[{"url": new.url, "name": "new"}]))
        sighup(proxy)
        assert list(upstreams(proxy)) == ["new"]
        assert http_post(proxy.url + "/v1/chat/completions", CHAT)[0] == 200
        assert post_count(new) == 1
        for _ in range(10):  # one release per further event
            assert http_post(old.url + "/_mock/release/reload")[0] == 200
        rest, complete = reader.read_body()
        assert complete and b"data: [DONE]" in rest
        sock.close()
        assert post_count(old) == 1
        assert_idle(proxy)
        wait_for(lambda: "backend old removed" in proxy.text(), timeout=5)
        # Its pool was closed: the only connection left open is the one asking for these stats.
        wait_for(lambda: mock_stats(old)["open_connections"] == 1, timeout=5)
    finally:
        for proc in (proxy, old, new):
            proc.stop()


def test_weights_and_strategy_change_without_restart(tmp_path):
    a, b = start_mock("vllm"), start_mock("vllm")
    proxy = start_proxy(tmp_path, [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}],
                        routing={"load_balance": "round_robin"})
    try:
        def send(n: int) -> None:
            for _ in range(n):
                assert http_post(proxy.url + "/v1/chat/completions", CHAT)[0] == 200

        send(20)
        assert (post_count(a), post_count(b)) == (10, 10)
        for mock in (a, b):
            http_post(mock.url + "/_mock/reset-stats")

        def reweigh(doc: dict) -> None:
            doc["backends"][0]["weight"] = 3
            doc["routing"]["load_balance"] = "weighted"

        _rewrite(tmp_path / "config.yaml", reweigh)
        sighup(proxy)
        send(40)
        assert abs(post_count(a) - 30) <= 1 and abs(post_count(b) - 10) <= 1
    finally:
        for proc in (proxy, a, b):
            proc.stop()


def test_reload_while_requests_flow_drops_none(tmp_path):
    a, b = start_mock("vllm"), start_mock("vllm")
    proxy = start_proxy(tmp_path, [{"url": a.url, "name": "a"}], routing={"load_balance": "round_robin"})
    failures: list[int] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            status = http_post(proxy.url + "/v1/chat/completions", CHAT)[0]
            if status != 200:
                failures.append(status)

    threads = [threading.Thread(target=client) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        config = tmp_path / "config.yaml"
        for i in range(6):  # flip between {a} and {a, b}
            if i % 2 == 0:
                _rewrite(config, lambda doc: doc["backends"].append({"url": b.url, "name": "b"}))
            else:
                _rewrite(config, lambda doc: doc.update(backends=doc["backends"][:1]))
            sighup(proxy)
        stop.set()
        for t in threads:
            t.join(10)
        assert failures == []
        assert post_count(a) > 0 and post_count(b) > 0
    finally:
        stop.set()
        for proc in (proxy, a, b):
            proc.stop()


KEY = "sk-reload-test-key-0123456789"
OLD_PRICE = {"input_per_million": 1.0, "output_per_million": 2.0}
NEW_PRICE = {"input_per_million": 100.0, "output_per_million": 300.0}


def _cost(record: dict, price: dict) -> float:
    return round((record["prompt_tokens"] * price["input_per_million"]
                  + record["completion_tokens"] * price["output_per_million"]) / 1e6, 10)


def test_a_stream_keeps_its_generation_across_a_reload_and_the_next_request_gets_the_new_one(tmp_path):
    """A reload mid-stream changes the key's user and limits and the model's price: the stream's record is
    built with what its own generation said, the next request's with the new one."""
    mock = start_mock("vllm")
    proxy = start_proxy(
        tmp_path, [{"url": mock.url, "name": "a", "models": ["m"]}],
        auth={"enabled": True, "keys": [{"key": KEY, "user_id": "team-old",
                                         "rate_limit": {"requests_per_minute": 600, "burst": 50}}]},
        rate_limit={"enabled": True},
        pricing={"m": OLD_PRICE},
        usage=usage_config(tmp_path))
    try:
        body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
        sock = raw_connect(proxy.port)
        sock.sendall(post_request("/v1/chat/completions", body, {
            "Authorization": f"Bearer {KEY}", "X-Request-Id": "held-stream", "x-mock-tokens": "4",
            "x-mock-gate": "gen"}))
        reader = ResponseReader(sock).read_head()
        assert reader.status == 200 and reader.headers["x-ratelimit-limit-requests"] == "600"

        def next_generation(doc: dict) -> None:
            doc["auth"]["keys"][0].update(user_id="team-new", rate_limit={"requests_per_minute": 300, "burst": 7})
            doc["pricing"]["m"] = NEW_PRICE

        _rewrite(tmp_path / "config.yaml", next_generation)
        sighup(proxy)
        request = urllib.request.Request(proxy.url + "/v1/chat/completions", data=CHAT, headers={
            "Authorization": f"Bearer {KEY}", "X-Request-Id": "after-reload", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200 and response.headers["x-ratelimit-limit-requests"] == "300"
            response.read()
        for _ in range(10):  # one release per further event
            assert http_post(mock.url + "/_mock/release/gen")[0] == 200
        rest, complete = reader.read_body()
        assert complete and b"data: [DONE]" in rest
        sock.close()

        both = wait_for(lambda: len(usage_records(tmp_path)) == 2 and usage_records(tmp_path))
        records = {r["client_request_id"]: r for r in both}
        held, after = records["held-stream"], records["after-reload"]
        assert held["usage_source"] == after["usage_source"] == "reported"
        assert held["user_id"] == "team-old" and held["cost_usd"] == _cost(held, OLD_PRICE) > 0
        assert after["user_id"] == "team-new" and after["cost_usd"] == _cost(after, NEW_PRICE) > 0
        assert_idle(proxy)
    finally:
        proxy.stop()
        mock.stop()
