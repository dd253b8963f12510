"""`routing.load_balance: queue_depth` over llama.cpp, SGLang and a generic OpenAI-compatible kind whose gauges
are named in its `metrics:` section: the proxy polls each backend's GET /metrics every health interval and
sends new requests to the shorter queue (docs/protocols.md §10.4, §11.1; README, load balancing).

Each case starts a pair of mocks, "busy" (its gauges pinned by POST /_mock/gauges) and "idle" (its gauges
following its live count), and a proxy of its own. Shares are counted proxy-side
(`llmproxy_requests_total{backend=...}`), so the proxy's own probes never blur them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support import (
    CHAT,
    Proc,
    assert_idle,
    http_get,
    http_post,
    metric_value,
    mock_stats,
    start_mock,
    start_proxy,
    upstreams,
    wait_for,
)

POLL_INTERVAL = 0.2  # health_check.interval: how often /metrics is read
REQUESTS, CONCURRENCY = 200, 4
BUSY_WAITING, BUSY_RUNNING, BUSY_KV = 8, 4, 0.75
MIN_IDLE_SHARE = 0.9
VLLM_GAUGES = {"queued": ["vllm:num_requests_waiting"], "running": ["vllm:num_requests_running"],
               "kv_cache": "vllm:kv_cache_usage_perc"}
# case: (the mocks' command line, what each backend's config adds, whether it reports a KV-cache gauge)
CASES = {
    "llamacpp": (("llamacpp", "--metrics"), {}, False),
    "sglang": (("sglang",), {}, True),
    "vllm": (("vllm",), {}, True),  # its built-in gauges, beside the same names given to a generic kind below
    "openai-with-metrics-names": (("vllm",), {"type": "openai", "metrics": VLLM_GAUGES}, True),
}


@pytest.fixture
def started(procs) -> Iterator[list[Proc]]:
    """What a test starts (mocks, its proxy), stopped at its end; the proxy is checked idle first."""
    yield procs
    for proc in procs:
        if proc.args[0] == "serve" and proc.popen.poll() is None:
            assert_idle(proc)


def _proxy(started: list[Proc], tmp_path, backends: list[dict]) -> Proc:
    proxy = start_proxy(tmp_path, backends, routing={"load_balance": "queue_depth", "retries": 0},
                        health_check={"interval": POLL_INTERVAL, "models_interval": 3600})
    started.append(proxy)
    return proxy


def _send(proxy: Proc, total: int) -> list[int]:
    """`total` chat completions, CONCURRENCY at a time; their statuses."""
    def one(_: int) -> int:
        return http_post(proxy.url + "/v1/chat/completions", CHAT, timeout=10)[0]
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return list(pool.map(one, range(total)))


def _served(proxy: Proc, name: str) -> int:
    return int(metric_value(proxy, "llmproxy_requests_total", f'backend="{name}",status="200"'))


def _backend_gauge(proxy: Proc, family: str, backend: str) -> float | None:
    """The proxy's per-backend gauge `family`, or None when it has no sample for that backend."""
    prefix = f'{family}{{backend="{backend}"}} '
    lines = [line for line in http_get(proxy.url + "/metrics")[1].decode().splitlines() if line.startswith(prefix)]
    return float(lines[0][len(prefix):]) if lines else None


@pytest.mark.parametrize("case", list(CASES))
def test_new_requests_go_to_the_backend_whose_own_queue_is_shorter(case, started, tmp_path):
    mock_args, extra, reports_kv = CASES[case]
    busy, idle = (start_mock(*mock_args) for _ in range(2))
    started += [busy, idle]
    pinned = f"/_mock/gauges?waiting={BUSY_WAITING}&running={BUSY_RUNNING}&kv={BUSY_KV}"
    assert http_post(busy.url + pinned)[0] == 200
    proxy = _proxy(started, tmp_path, [{"url": busy.url, "name": "busy", **extra},
                                       {"url": idle.url, "name": "idle", **extra}])
    found = wait_for(lambda: (u := upstreams(proxy))["busy"]["queue_depth"] is not None
                     and u["idle"]["queue_depth"] is not None and u, timeout=10)
    assert found["busy"]["queue_depth"] == BUSY_WAITING + BUSY_RUNNING, found["busy"]
    assert found["idle"]["queue_depth"] < BUSY_WAITING + BUSY_RUNNING, found["idle"]
    assert _backend_gauge(proxy, "llmproxy_backend_queue_depth", "busy") == BUSY_WAITING + BUSY_RUNNING

    assert _send(proxy, REQUESTS) == [200] * REQUESTS
    busy_share = _served(proxy, "busy") / REQUESTS
    assert _served(proxy, "idle") + _served(proxy, "busy") == REQUESTS
    print(f"\n{case}: {1 - busy_share:.1%} of {REQUESTS} requests to the idle backend")
    assert 1 - busy_share >= MIN_IDLE_SHARE, f"busy got {busy_share:.0%}"
    kv = _backend_gauge(proxy, "llmproxy_backend_kv_cache_usage", "busy")
    assert kv == (BUSY_KV if reports_kv else None)  # llama.cpp exports no KV-cache gauge


def test_the_queue_follows_the_gauges_when_they_change(started, tmp_path):
    """The other way round once the busy one drains and the idle one fills: the polls are read, not the first."""
    first, second = (start_mock("llamacpp", "--metrics") for _ in range(2))
    started += [first, second]
    assert http_post(first.url + f"/_mock/gauges?waiting={BUSY_WAITING}&running={BUSY_RUNNING}")[0] == 200
    proxy = _proxy(started, tmp_path, [{"url": first.url, "name": "first"}, {"url": second.url, "name": "second"}])
    wait_for(lambda: upstreams(proxy)["first"]["queue_depth"] == BUSY_WAITING + BUSY_RUNNING, timeout=10)
    assert http_post(first.url + "/_mock/gauges")[0] == 200  # back to its live count
    assert http_post(second.url + f"/_mock/gauges?waiting={BUSY_WAITING}&running={BUSY_RUNNING}")[0] == 200
    wait_for(lambda: (u := upstreams(proxy))["second"]["queue_depth"] == BUSY_WAITING + BUSY_RUNNING
             and u["first"]["queue_depth"] is not None and u["first"]["queue_depth"] < BUSY_WAITING, timeout=10)
    assert _send(proxy, REQUESTS) == [200] * REQUESTS
    assert _served(proxy, "first") / REQUESTS >= MIN_IDLE_SHARE


def test_llamacpp_without_metrics_is_warned_about_once_and_still_served(started, tmp_path):
    plain = start_mock("llamacpp")  # no --metrics: its GET /metrics answers 501
    started.append(plain)
    proxy = _proxy(started, tmp_path, [{"url": plain.url, "name": "plain"}])

    def metrics_polls() -> int:
        return sum(1 for r in mock_stats(plain)["requests"] if r["path"] == "/metrics")
    wait_for(lambda: metrics_polls() >= 5, timeout=10)  # polled, and refused, again and again

    warnings = [line for line in proxy.text().splitlines() if "llama.cpp needs --metrics" in line]
    assert len(warnings) == 1, warnings
    assert "backend plain serves no /metrics" in warnings[0]
    state = upstreams(proxy)["plain"]
    assert state["type"] == "llamacpp" and state["queue_depth"] is None and state["healthy"], state
    assert _send(proxy, 20) == [200] * 20
    assert _served(proxy, "plain") == 20
    assert json.loads(http_get(plain.url + "/metrics")[1])["error"]["code"] == 501  # the mock did refuse
