"""Discovery without the proxy: the backends an entry stands for, the fleets built from them, and the watchers
that keep each entry's set (a dnslib server in this process, endpoints files in tmp_path)."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from pathlib import Path

import pytest

from llmproxy.config import parse_config
from llmproxy.config.discovery import Endpoint
from llmproxy.config.model import BackendConfig, DiscoveryConfig
from llmproxy.discovery.members import expand
from llmproxy.discovery.resolve import resolve
from llmproxy.discovery.watch import Discovery
from llmproxy.fleet.fleet import build_fleet
from llmproxy.fleet.health import HealthMonitor
from tests.dns_server import TestDnsServer


def in_loop(test):
    """Run an async test in a fresh event loop (the tests' way here: no pytest plugin for it)."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))
    return run


# --- members ------------------------------------------------------------------------------------------------


def test_an_entry_stands_for_its_members_with_its_settings_and_the_files_weights_and_models():
    config = parse_config({"backends": [
        {"url": "http://static:8000", "name": "static"},
        {"name": "vllm", "type": "vllm", "weight": 2, "models": ["m"], "api_key": "k",
         "discovery": {"dns": "vllm.svc", "port": 8000}}]})
    members = {"vllm": (Endpoint("10.0.0.1", 8000), Endpoint("fd00::1", 8000, weight=5, models=("x",)))}
    static, first, second = expand(config.backends, members)
    assert static is config.backends[0]
    assert (first.name, first.url, first.host, first.port, first.weight, first.models, first.type, first.api_key) == (
        "vllm@10.0.0.1:8000", "http://10.0.0.1:8000", "10.0.0.1", 8000, 2, ["m"], "vllm", "k")
    assert (second.name, second.url, second.weight, second.models) == (
        "vllm@[fd00::1]:8000", "http://[fd00::1]:8000", 5, ["x"])
    assert first.discovery is None and expand(config.backends, {}) == [static]


# --- fleets built from members -------------------------------------------------------------------------------


async def no_probes(self: HealthMonitor, only: list | None = None) -> None:
    """A first probe round that never answers in time: what start-up state alone decides."""


@in_loop
async def test_new_members_start_unhealthy_and_kept_ones_keep_their_state(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(HealthMonitor, "discover", no_probes)
    config = parse_config({"backends": [{"url": "http://127.0.0.1:9", "name": "static"},
                                        {"name": "vllm", "type": "vllm", "discovery": {"dns": "v.svc", "port": 9}}],
                           "health_check": {"interval": 3600}})
    a, b, c = (Endpoint(f"127.0.0.{i}", 9) for i in (2, 3, 4))
    first = await build_fleet(config, None, discovered={"vllm": (a, b)})
    assert [(x.name, x.healthy) for x in first.backends] == [
        ("static", True), ("vllm@127.0.0.2:9", False), ("vllm@127.0.0.3:9", False)]
    kept = first.backend_named("vllm@127.0.0.3:9")
    kept.healthy, kept.ttft_ewma = True, 0.25  # what the probes and traffic taught us since
    second = await build_fleet(config, None, previous=first, discovered={"vllm": (b, c)})
    assert [x.name for x in second.backends] == ["static", "vllm@127.0.0.3:9", "vllm@127.0.0.4:9"]
    assert second.backend_named("vllm@127.0.0.3:9") is kept and kept.healthy and kept.ttft_ewma == 0.25
    assert not second.backend_named("vllm@127.0.0.4:9").healthy  # no traffic before its first probe passes
    for fleet in (first, second):
        fleet.stop()


@in_loop
async def test_a_discovery_change_probes_only_the_new_backends_first(monkeypatch: pytest.MonkeyPatch):
    probed: list[list[str]] = []

    async def record(self: HealthMonitor, only: list | None = None) -> None:
        probed.append([b.name for b in (self.backends if only is None else only)])
    monkeypatch.setattr(HealthMonitor, "discover", record)
    config = parse_config({"backends": [{"url": "http://127.0.0.1:9", "name": "static"},
                                        {"name": "vllm", "type": "vllm", "discovery": {"dns": "v.svc", "port": 9}}],
                           "health_check": {"interval": 3600}})
    a, b = Endpoint("127.0.0.2", 9), Endpoint("127.0.0.3", 9)
    first = await build_fleet(config, None, discovered={"vllm": (a,)})
    second = await build_fleet(config, None, previous=first, discovered={"vllm": (a, b)}, probe_kept=False)
    assert probed == [["static", "vllm@127.0.0.2:9"], ["vllm@127.0.0.3:9"]]  # the others' state stands
    for fleet in (first, second):
        fleet.stop()


@in_loop
async def test_with_probes_off_new_members_are_taken_as_healthy(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(HealthMonitor, "discover", no_probes)
    config = parse_config({"backends": [{"name": "vllm", "type": "vllm", "discovery": {"dns": "v.svc", "port": 9}}],
                           "health_check": {"enabled": False}})
    fleet = await build_fleet(config, None, discovered={"vllm": (Endpoint("127.0.0.2", 9),)})
    assert fleet.backends[0].healthy  # nothing would ever say otherwise
    fleet.stop()


# --- watchers ------------------------------------------------------------------------------------------------


class Events:
    def __init__(self) -> None:
        self.failed: list[str] = []
        self.changed: list[str] = []

    def discovery_failed(self, entry: str) -> None:
        self.failed.append(entry)

    def discovery_changed(self, entry: str) -> None:
        self.changed.append(entry)


def dns_entry(server: TestDnsServer, name: str = "vllm") -> BackendConfig:
    return BackendConfig(url="", name=name, discovery=DiscoveryConfig(
        dns="vllm.svc", port=8000, interval=0.05, resolver=server.address))


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.fixture
def dns():
    server = TestDnsServer().start(tcp=True)
    yield server
    server.stop()


@in_loop
async def test_a_dns_watcher_follows_the_records_and_keeps_them_through_failures(dns, caplog):
    caplog.set_level(logging.INFO, "llmproxy")
    dns.set("vllm.svc", ["10.0.0.2", "10.0.0.1"])
    changes, events = [], Events()
    discovery = Discovery(lambda: changes.append(1), events)
    await discovery.configure([dns_entry(dns)])
    try:
        assert discovery.members() == {"vllm": (Endpoint("10.0.0.1", 8000), Endpoint("10.0.0.2", 8000))}
        assert changes == []  # the first set is the start's, not a change to act on
        dns.set("vllm.svc", ["10.0.0.2", "fd00::3"])
        await until(lambda: changes)
        assert discovery.members()["vllm"] == (Endpoint("10.0.0.2", 8000), Endpoint("fd00::3", 8000))
        dns.fail()
        await until(lambda: len(events.failed) >= 3)
        dns.set("vllm.svc", [])
        dns.fail(False)
        await until(lambda: len(events.failed) >= 6)
        assert discovery.members()["vllm"] == (Endpoint("10.0.0.2", 8000), Endpoint("fd00::3", 8000))
        assert len(changes) == 1 and events.changed == ["vllm", "vllm"]
        assert caplog.text.count("keeping its 2 known backends") == 1
        dns.set("vllm.svc", [f"10.1.{i // 200}.{i % 200 + 1}" for i in range(300)])  # over TCP: too many for UDP
        await until(lambda: len(changes) == 2)
        assert len(discovery.members()["vllm"]) == 300 and "works again" in caplog.text
    finally:
        discovery.stop()


@in_loop
async def test_a_reload_keeps_an_unchanged_entrys_watcher_and_drops_a_removed_one(dns):
    dns.set("vllm.svc", ["10.0.0.1"])
    changes: list[int] = []
    discovery = Discovery(lambda: changes.append(1))
    await discovery.configure([dns_entry(dns)])
    try:
        watcher = discovery._watchers["vllm"]
        await discovery.configure([dns_entry(dns), dns_entry(dns, "other")])
        assert discovery._watchers["vllm"] is watcher and set(discovery.members()) == {"vllm", "other"}
        await discovery.configure([dns_entry(dns, "other")])
        assert set(discovery.members()) == {"other"} and watcher._task is None
        dns.fail()  # a new interval during an outage: the set stays, for the name and port are the same
        slower = dns_entry(dns, "other")
        slower.discovery.interval = 0.5
        await discovery.configure([slower])
        assert discovery.members()["other"] == (Endpoint("10.0.0.1", 8000),)
    finally:
        discovery.stop()


@in_loop
async def test_without_a_resolver_the_system_one_answers():
    assert "127.0.0.1" in await resolve("localhost", 8000, None)  # /etc/hosts, as getaddrinfo reads it


def write(path: Path, text: str) -> None:
    partial = path.with_suffix(".tmp")
    partial.write_text(text)
    partial.replace(path)


@in_loop
async def test_a_file_watcher_reads_changes_and_keeps_its_set_when_the_file_breaks(tmp_path: Path, caplog):
    endpoints = tmp_path / "endpoints.yaml"
    write(endpoints, "endpoints:\n  - {address: 10.0.0.1, port: '8000'}\n")
    changes: list[int] = []
    events = Events()
    discovery = Discovery(lambda: changes.append(1), events)
    entry = BackendConfig(url="", name="metal", discovery=DiscoveryConfig(file=str(endpoints), interval=0.05))
    await discovery.configure([entry])
    try:
        assert discovery.members() == {"metal": (Endpoint("10.0.0.1", 8000),)}
        write(endpoints, "endpoints:\n  - {address: 10.0.0.1, port: '8000', weight: 4}\n")
        await until(lambda: changes)
        assert discovery.members()["metal"] == (Endpoint("10.0.0.1", 8000, weight=4),)
        endpoints.write_text("")  # caught half-written
        await until(lambda: events.failed)
        os.remove(endpoints)
        await until(lambda: len(events.failed) >= 3)
        assert discovery.members()["metal"] == (Endpoint("10.0.0.1", 8000, weight=4),) and len(changes) == 1
        write(endpoints, "endpoints: []\n")  # emptied on purpose: that is a change like any other
        await until(lambda: len(changes) == 2)
        assert discovery.members()["metal"] == ()
    finally:
        discovery.stop()
