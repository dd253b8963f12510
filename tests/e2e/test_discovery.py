"""backends[].discovery: backends found by DNS or in a watched endpoints file join and leave under load.

The "pods" are mock backends on 127.0.0.2, 127.0.0.3, ... (all loopback on Linux) sharing one port number,
as the pods of a Kubernetes headless Service do; the DNS server runs in the test process (tests/dns_server.py).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.dns_server import TestDnsServer
from tests.support import (
    STREAM_CHAT,
    TEST_MODELS,
    Proc,
    http_get,
    metric_value,
    owned,
    send_request,
    sighup,
    start_proxy,
    upstreams,
    wait_for,
)

STREAMS = 200
FAST_LOOKS = {"interval": "200ms"}
PROBES = {"interval": "300ms", "timeout": "2s"}


def _port_free_on(hosts: list[str]) -> int:
    """A port number free on every one of `hosts`."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind((hosts[0], 0))
            port = sock.getsockname()[1]
        try:
            for host in hosts[1:]:
                with socket.socket() as sock:
                    sock.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no port free on all of {hosts}")


def _start_pod(host: str, port: int, procs: list[Proc]) -> Proc:
    """A mock vLLM whose streams last about a second: 20 events 50 ms apart (stopped with `procs`)."""
    pod = Proc(["mock-backend", "--dialect", "vllm", "--listen", f"{host}:{port}", "--model", ",".join(TEST_MODELS),
                "--tokens", "20", "--delay-ms", "50"])
    procs.append(pod)
    pod.wait_listening()
    pod.host = host
    return pod


def _stats(pod: Proc) -> dict:
    return json.loads(http_get(f"http://{pod.host}:{pod.port}/_mock/stats")[1])


def _streams_served(pod: Proc) -> int:
    """Client streams the pod has answered (each is 20 tokens; the proxy's probes generate none)."""
    return _stats(pod)["generation_tokens_total"] // 20


def _posted(pod: Proc) -> bool:
    return any(request["method"] == "POST" for request in _stats(pod)["requests"])


def _first_post_after_a_probe(pod: Proc) -> bool:
    """The pod got the proxy's probe (a GET) before its first client request (a POST). Called as soon as the
    first POSTs arrive, so the pod's record of its last 100 requests still starts at its first."""
    requests = _stats(pod)["requests"]
    assert requests[0]["id"] == 1, "asked too late: the first requests are no longer recorded"
    methods = [request["method"] for request in requests]
    return "POST" in methods and "GET" in methods[:methods.index("POST")]


class StreamLoad:
    """`count` clients, each streaming one chat completion after another until stop(); every outcome kept."""

    def __init__(self, port: int, count: int = STREAMS) -> None:
        self.port = port
        self.outcomes: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(count)]

    def __enter__(self) -> StreamLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _client(self) -> None:
        while not self._stop.is_set():
            try:
                reader, body, complete = send_request(self.port, STREAM_CHAT, timeout=30)
                ok = reader.status == 200 and complete and body.rstrip().endswith(b"data: [DONE]")
                outcome = "ok" if ok else f"{reader.status} complete={complete} {body[-200:]!r}"
            except OSError as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self.outcomes[outcome] += 1

    def ok(self) -> int:
        with self._lock:
            return self.outcomes["ok"]

    def stop(self) -> Counter[str]:
        """Let every client finish its stream; returns the outcomes."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in self._threads)
        return self.outcomes


@pytest.fixture
def procs():
    """What a test starts (pods, the proxy): each stopped when it ends, however it ends."""
    yield from owned(Proc.stop)


@pytest.fixture
def dns():
    server = TestDnsServer().start()
    yield server
    server.stop()


def test_dns_records_added_and_removed_under_200_streams_lose_no_request(tmp_path, dns, procs):
    hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    port = _port_free_on(hosts)
    pods = {host: _start_pod(host, port, procs) for host in hosts}
    dns.set("vllm.test.svc", hosts[:2])
    proxy = start_proxy(tmp_path, [{"name": "vllm", "type": "vllm", "discovery": {
        "dns": "vllm.test.svc", "port": port, "resolver": dns.address, **FAST_LOOKS}}],
        health_check=PROBES, metrics={"enabled": True})
    added, removed = f"vllm@127.0.0.4:{port}", f"vllm@127.0.0.2:{port}"
    procs.insert(0, proxy)  # stopped first
    assert list(upstreams(proxy)) == [f"vllm@127.0.0.2:{port}", f"vllm@127.0.0.3:{port}"]
    with StreamLoad(proxy.port) as load:
        wait_for(lambda: load.ok() >= STREAMS, timeout=20)
        dns.set("vllm.test.svc", hosts)  # a pod is added...
        wait_for(lambda: _posted(pods["127.0.0.4"]), timeout=15, interval=0.01)
        assert _first_post_after_a_probe(pods["127.0.0.4"])
        wait_for(lambda: _streams_served(pods["127.0.0.4"]) >= 10, timeout=15)
        dns.set("vllm.test.svc", hosts[1:])  # ...and one removed, with streams in flight on it
        wait_for(lambda: removed not in upstreams(proxy), timeout=10)
        in_flight_when_removed = _stats(pods["127.0.0.2"])["requests_running"]
        time.sleep(1.5)  # past the end of every stream it had when it was removed
        requests_to_removed = _stats(pods["127.0.0.2"])["requests_total"]
        done_before = load.ok()
        wait_for(lambda: load.ok() >= done_before + STREAMS, timeout=20)
        assert _stats(pods["127.0.0.2"])["requests_total"] == requests_to_removed  # none since, not a probe
        assert _stats(pods["127.0.0.2"])["requests_running"] == 0
    outcomes = load.stop()
    assert set(outcomes) == {"ok"}, outcomes.most_common(5)  # zero client errors, every stream whole
    assert in_flight_when_removed > 0  # it was removed with streams in flight, and they ended whole
    assert list(upstreams(proxy)) == [f"vllm@127.0.0.3:{port}", added]
    assert metric_value(proxy, "llmproxy_discovery_changes_total", 'entry="vllm"') == 3  # start, +1, -1
    assert "backend " + removed + " removed" in proxy.text()


def test_a_dns_outage_keeps_the_known_backends(tmp_path, dns, procs):
    port = _port_free_on(["127.0.0.2"])
    _start_pod("127.0.0.2", port, procs)
    dns.set("vllm.test.svc", ["127.0.0.2"])
    proxy = start_proxy(tmp_path, [{"name": "vllm", "discovery": {
        "dns": "vllm.test.svc", "port": port, "resolver": dns.address, **FAST_LOOKS}}],
        health_check=PROBES, metrics={"enabled": True})
    procs.insert(0, proxy)  # stopped first
    dns.fail()  # SERVFAIL for every query
    wait_for(lambda: metric_value(proxy, "llmproxy_discovery_errors_total", 'entry="vllm"') >= 3, timeout=10)
    dns.set("vllm.test.svc", [])
    dns.fail(False)  # a name with no address now: as much a hiccup, for all we know
    wait_for(lambda: metric_value(proxy, "llmproxy_discovery_errors_total", 'entry="vllm"') >= 6, timeout=10)
    assert list(upstreams(proxy)) == [f"vllm@127.0.0.2:{port}"]
    reader, _, complete = send_request(proxy.port, STREAM_CHAT, timeout=30)
    assert reader.status == 200 and complete
    assert proxy.text().count("keeping its 1 known backends") == 1  # said once, not every 200 ms
    config = tmp_path / "config.yaml"  # a reload during the outage, the entry looking slower now
    doc = yaml.safe_load(config.read_text())
    doc["backends"][0]["discovery"]["interval"] = "300ms"
    config.write_text(yaml.safe_dump(doc))
    sighup(proxy)
    assert list(upstreams(proxy)) == [f"vllm@127.0.0.2:{port}"]  # its set stays through the reload
    assert send_request(proxy.port, STREAM_CHAT, timeout=30)[0].status == 200


def _write_endpoints(path: Path, endpoints: list[dict]) -> None:
    # Written aside and renamed in, as a careful writer (and a ConfigMap update) does.
    partial = path.with_suffix(".tmp")
    partial.write_text(yaml.safe_dump({"endpoints": endpoints}))
    partial.replace(path)


def test_endpoints_file_changes_under_load_lose_no_request(tmp_path, procs):
    hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    port = _port_free_on(hosts)
    pods = {host: _start_pod(host, port, procs) for host in hosts}
    endpoints = tmp_path / "endpoints.yaml"
    _write_endpoints(endpoints, [{"name": "vllm-0", "address": "127.0.0.2", "port": str(port)},
                                 {"name": "vllm-1", "address": "127.0.0.3", "port": str(port)}])
    proxy = start_proxy(tmp_path, [{"name": "fleet", "type": "vllm", "discovery": {"file": "endpoints.yaml",
                                                                                   **FAST_LOOKS}}],
                        health_check=PROBES, routing={"load_balance": "weighted"})
    name = {host: f"fleet@{host}:{port}" for host in hosts}
    procs.insert(0, proxy)  # stopped first
    assert list(upstreams(proxy)) == [name["127.0.0.2"], name["127.0.0.3"]]
    with StreamLoad(proxy.port, count=50) as load:
        wait_for(lambda: load.ok() >= 50, timeout=20)
        _write_endpoints(endpoints, [  # one added, one reweighted and given a model list
            {"name": "vllm-0", "address": "127.0.0.2", "port": str(port)},
            {"name": "vllm-1", "address": "127.0.0.3", "port": port, "weight": 3, "models": ["m"]},
            {"name": "vllm-2", "address": "127.0.0.4", "port": str(port), "labels": {"zone": "b"}}])
        wait_for(lambda: len(upstreams(proxy)) == 3, timeout=10)
        wait_for(lambda: _posted(pods["127.0.0.4"]), timeout=15, interval=0.01)
        assert _first_post_after_a_probe(pods["127.0.0.4"])
        wait_for(lambda: _streams_served(pods["127.0.0.4"]) >= 5, timeout=15)
        shown = upstreams(proxy)
        assert shown[name["127.0.0.3"]]["weight"] == 3 and shown[name["127.0.0.3"]]["models"] == ["m"]
        assert shown[name["127.0.0.2"]]["weight"] == 1
        endpoints.write_text("endpoints:\n  - name: vllm-0\n    address: 127.0.0.2\n    port: not-a-port\n")
        wait_for(lambda: "discovery for backend fleet:" in proxy.text() and "port: must be" in proxy.text(),
                 timeout=10)
        assert len(upstreams(proxy)) == 3  # a broken file changes nothing
        _write_endpoints(endpoints, [{"name": "vllm-2", "address": "127.0.0.4", "port": str(port)}])
        wait_for(lambda: list(upstreams(proxy)) == [name["127.0.0.4"]], timeout=10)
        done_before = load.ok()
        wait_for(lambda: load.ok() >= done_before + 50, timeout=20)
    outcomes = load.stop()
    assert set(outcomes) == {"ok"}, outcomes.most_common(5)


def test_a_bad_discovery_block_refuses_to_start_naming_the_key(tmp_path):
    (tmp_path / "endpoints.yaml").write_text("endpoints:\n  - address: 10.0.0.1\n    port: 8000\n    weight: 0\n")
    for discovery, key in [({"dns": "vllm.svc"}, "backends[0].discovery.port"),
                           ({"file": "endpoints.yaml"}, "backends[0].discovery.file"),
                           ({"file": "missing.yaml"}, "backends[0].discovery.file")]:
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump({"server": {"listen": "127.0.0.1:0"},
                                          "backends": [{"name": "vllm", "discovery": discovery}]}))
        proc = Proc(["serve", "--config", str(config)])
        assert proc.popen.wait(timeout=15) == 1
        assert f"{key}: " in proc.text(), proc.text()
