"""End-to-end: `routes:` with the real proxy in front of real mock backends.

Which backend served each request is read proxy-side: `llmproxy_requests_total{backend=...}` for counts, the
access log for the backend, retries and request id of each request (the mocks' own counts would include the
proxy's probes).
"""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from llmproxy.fleet.routes import request_point
from tests.support import (
    REPO,
    Proc,
    access_log,
    assert_idle,
    metric_value,
    mock_posts,
    sighup,
    start_mock,
    start_proxy,
    upstreams,
    wait_for,
)

CHAT_PATH = "/v1/chat/completions"
# The example of OpenClaw's guide (issue 16), exactly as written there; only the backends are ours.
GUIDE_ROUTES = yaml.safe_load("""
routes:
  - id: default_chat_route
    match:
      path: "/v1/chat/completions"
    strategy:
      type: round_robin
      upstreams: ["openai-gpt4", "anthropic-claude"]
  - id: specific_gpt4_route
    match:
      path: "/v1/chat/completions"
      json_body:
        model: "gpt-4"
    strategy:
      type: weighted_random
      upstreams:
        - name: "openai-gpt4"
          weight: 100
""")["routes"]


@pytest.fixture
def procs():
    """What a test starts; proxies are checked idle, then everything is stopped, whatever happened."""
    started: list[Proc] = []
    yield started
    try:
        for proc in started:
            if proc.args[0] == "serve" and proc.popen.poll() is None:
                assert_idle(proc)
    finally:
        for proc in started:
            proc.stop()


def _mock(procs: list[Proc], *models: str) -> Proc:
    mock = start_mock("vllm", "--model", ",".join(models or ("m",)))
    procs.append(mock)
    return mock


def _proxy(procs: list[Proc], tmp_path: Path, backends: list[dict], routes: list[dict], **sections) -> Proc:
    proxy = start_proxy(tmp_path, backends, routes=routes, **sections)
    procs.append(proxy)
    # Every backend known (kind and models probed) before any traffic: no request races the first probe.
    wait_for(lambda: all(u["available"] and u["models"] for u in upstreams(proxy).values()), timeout=10)
    return proxy


def _chat(model: str) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()


def _post_all(proxy: Proc, bodies: list[bytes], connections: int = 8) -> list[int]:
    """POST each body to the chat path over `connections` keep-alive connections; the statuses, in order."""
    def worker(share: list[tuple[int, bytes]]) -> list[tuple[int, int]]:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        try:
            done = []
            for index, body in share:
                conn.request("POST", CHAT_PATH, body, {"content-type": "application/json", "x-mock-tokens": "1"})
                response = conn.getresponse()
                response.read()
                done.append((index, response.status))
            return done
        finally:
            conn.close()

    numbered = list(enumerate(bodies))
    with ThreadPoolExecutor(connections) as pool:
        results = pool.map(worker, [numbered[i::connections] for i in range(connections)])
    return [status for _, status in sorted(pair for part in results for pair in part)]


def _served(proxy: Proc, *names: str) -> dict[str, int]:
    return {name: int(metric_value(proxy, "llmproxy_requests_total", f'backend="{name}"')) for name in names}


def _logged(tmp_path: Path, count: int) -> list[dict]:
    """The access log's chat requests, once there are `count` of them."""
    return wait_for(lambda: (lines := [r for r in access_log(tmp_path) if r["path"] == CHAT_PATH])
                    and len(lines) >= count and lines)


def test_the_guides_example_sends_gpt_4_to_its_route_and_round_robins_the_other_chats(procs, tmp_path):
    # Both serve gpt-4 too: only the route keeps gpt-4 requests off anthropic-claude.
    gpt4, claude = _mock(procs, "gpt-4", "m"), _mock(procs, "claude-sonnet-4-5", "gpt-4", "m")
    proxy = _proxy(procs, tmp_path, [{"url": gpt4.url, "name": "openai-gpt4"},
                                     {"url": claude.url, "name": "anthropic-claude"}], GUIDE_ROUTES)
    assert _post_all(proxy, [_chat("gpt-4")] * 40) == [200] * 40
    assert _served(proxy, "openai-gpt4", "anthropic-claude") == {"openai-gpt4": 40, "anthropic-claude": 0}
    assert _post_all(proxy, [_chat("m")] * 20, connections=1) == [200] * 20
    logged = _logged(tmp_path, 60)
    picks = [r["backend"] for r in logged[40:]]
    assert picks == ["openai-gpt4", "anthropic-claude"] * 10  # round robin: one each, in turn
    # The access log says which route chose: the more specific one for gpt-4, though listed second.
    assert {r["route"] for r in logged[:40]} == {"specific_gpt4_route"}
    assert {r["route"] for r in logged[40:]} == {"default_chat_route"}
    # A model only anthropic-claude serves goes there alone: the router's candidates narrow the route's.
    assert _post_all(proxy, [_chat("claude-sonnet-4-5")] * 10) == [200] * 10
    assert _served(proxy, "openai-gpt4", "anthropic-claude") == {"openai-gpt4": 50, "anthropic-claude": 20}
    assert sorted(json.loads(p["body"])["model"] for p in mock_posts(gpt4)) == ["gpt-4"] * 40 + ["m"] * 10


def test_a_failover_route_moves_down_its_list_when_its_first_upstream_is_killed(procs, tmp_path):
    primary, fallback, bystander = _mock(procs), _mock(procs), _mock(procs)
    proxy = _proxy(procs, tmp_path, [{"url": bystander.url, "name": "bystander"},
                                     {"url": primary.url, "name": "primary"},
                                     {"url": fallback.url, "name": "fallback"}],
                   [{"id": "chain", "match": {"path": CHAT_PATH},
                     "strategy": {"type": "failover", "upstreams": ["primary", "fallback"]}}])
    assert _post_all(proxy, [_chat("m")] * 10, connections=2) == [200] * 10
    assert _served(proxy, "primary", "fallback", "bystander") == {"primary": 10, "fallback": 0, "bystander": 0}
    primary.stop(signal.SIGKILL)
    assert _post_all(proxy, [_chat("m")] * 20, connections=1) == [200] * 20  # no client sees the failure
    after = _logged(tmp_path, 30)[10:]
    assert {r["backend"] for r in after} == {"fallback"}
    assert after[0]["retries"] == 1  # refused by primary, retried on the next of the list
    assert _served(proxy, "bystander")["bystander"] == 0  # never a backend the route does not name
    assert metric_value(proxy, "llmproxy_upstream_retries_total", 'reason="connect_error"') >= 1


def test_a_canary_splits_requests_by_their_request_id(procs, tmp_path):
    stable, experimental = _mock(procs), _mock(procs)
    proxy = _proxy(procs, tmp_path, [{"url": stable.url, "name": "gpt4-stable"},
                                     {"url": experimental.url, "name": "gpt4-experimental"}],
                   [{"id": "canary", "match": {"path": CHAT_PATH},
                     "strategy": {"type": "canary", "upstreams": [{"name": "gpt4-stable", "percentage": 90},
                                                                  {"name": "gpt4-experimental", "percentage": 10}]}}])
    total = 2000
    assert _post_all(proxy, [_chat("m")] * total) == [200] * total
    logged = _logged(tmp_path, total)
    for record in logged:  # each request on the side its request id hashes to
        expected = "gpt4-stable" if request_point(record["request_id"]) < 0.90 else "gpt4-experimental"
        assert record["backend"] == expected, record
    share = _served(proxy, "gpt4-experimental")["gpt4-experimental"] / total
    assert abs(share - 0.10) < 0.025, share  # 10,000 ids within 2 %: tests/unit/test_routes.py


def test_a_reload_swaps_the_routes_whole_and_a_bad_route_is_refused_naming_its_key(procs, tmp_path):
    a, b = _mock(procs), _mock(procs)
    proxy = _proxy(procs, tmp_path, [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}],
                   [{"id": "chain", "match": {}, "strategy": {"type": "failover", "upstreams": ["a", "b"]}}])
    assert _post_all(proxy, [_chat("m")] * 4, connections=1) == [200] * 4
    config = tmp_path / "config.yaml"
    doc = yaml.safe_load(config.read_text())
    doc["routes"][0]["strategy"]["upstreams"] = ["b", "a"]
    config.write_text(yaml.safe_dump(doc))
    sighup(proxy)
    assert _post_all(proxy, [_chat("m")] * 4, connections=1) == [200] * 4
    assert _served(proxy, "a", "b") == {"a": 4, "b": 4}
    doc["routes"][0]["strategy"]["upstreams"] = ["x"]
    config.write_text(yaml.safe_dump(doc))
    sighup(proxy, "reload refused")
    assert 'routes[0].strategy.upstreams[0]: no backend named "x"' in proxy.text()
    assert _post_all(proxy, [_chat("m")] * 2, connections=1) == [200] * 2
    assert _served(proxy, "a", "b") == {"a": 4, "b": 6}


def test_a_bad_route_stops_the_proxy_from_starting(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({
        "backends": [{"url": "http://127.0.0.1:9", "name": "a"}],
        "routes": [{"id": "r", "match": {}, "strategy": {"type": "canary", "upstreams": [
            {"name": "a", "percentage": 95}]}}]}))
    result = subprocess.run([sys.executable, "-m", "llmproxy", "serve", "--config", str(config), "--listen",
                             "127.0.0.1:0"], capture_output=True, text=True, cwd=REPO, timeout=30,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert "routes[0].strategy.upstreams: canary percentages must sum to 100, got 95" in result.stderr
    assert "listening on" not in result.stdout
