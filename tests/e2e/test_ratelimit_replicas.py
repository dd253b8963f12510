"""Rate limits on a replicated Redis: a real 3-master Redis Cluster and a real Sentinel set-up on loopback.

Two proxies share one store. From idle they admit exactly `burst` requests across 50 connections (on a
cluster of Valkey servers too). A master
killed mid-run is replaced by its replica, found by the client on its own (Cluster slot map, Sentinel), and
admissions stay within the limit plus the documented bound: replication is asynchronous, so a promoted
replica may lack the last admissions, which can then be made again - at most one `burst` per scope and
failover. With fail_closed, the requests that arrive while no master answers get 503.

The last test loses those writes on purpose (the replica is cut off while a burst is admitted, then the
master is killed) to show that the bound is reached and not exceeded.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.e2e.test_ratelimit import Reply, assert_refused, backend, call, hammer, launch, make_key, posts, wave
from tests.redis_cluster import SentinelSetup, admin
from tests.support import Proc, assert_idle, wait_for

pytestmark = pytest.mark.timeout(120)

TAG = "{llmproxy}"  # every key of the store is under this hash tag on a Cluster: one slot, one master
WAVE, SUSTAINED, LOST = make_key("replicas-wave"), make_key("replicas-sustained"), make_key("replicas-lost")
WARM = make_key("replicas-warm")
BURST, PER_MINUTE = 10, 60
KEYS = {WAVE: {"requests_per_minute": 1, "burst": BURST},  # no refill during a wave: exactly the burst
        SUSTAINED: {"requests_per_minute": PER_MINUTE, "burst": BURST},
        LOST: {"requests_per_minute": 1, "burst": BURST},
        WARM: {"requests_per_minute": 6000, "burst": 1000}}


@dataclass
class Topology:
    """A replicated store as the tests see it: where it is, and how to make its master fail."""

    name: str
    url: str
    cluster: bool
    master: Callable[[], object]  # the RedisServer holding the limiter's keys now
    wait_failover: Callable[[object], float]  # after that master was killed: seconds until a replica took over
    revive: Callable[[object], None]  # the killed server back, as a replica in sync
    node: Callable[[int], object]  # the RedisServer on a port

    def settings(self, **extra) -> dict:
        return {"store": "redis", "redis_url": self.url, "cluster": self.cluster, **extra}


@pytest.fixture(scope="module")
def sentinel_setup():
    with SentinelSetup() as setup:
        yield setup


@pytest.fixture(params=["cluster", "sentinel"])
def topology(request) -> Topology:
    if request.param in ("cluster", "valkey-cluster"):
        cluster = request.getfixturevalue("redis_cluster" if request.param == "cluster" else "valkey_cluster")
        cluster.flushall()
        return Topology(request.param, cluster.url, True, lambda: cluster.master_of(TAG),
                        lambda killed: cluster.wait_failover(killed, TAG), cluster.revive, cluster.node)
    setup = request.getfixturevalue("sentinel_setup")
    setup.flushall()
    return Topology("sentinel", setup.url, False, setup.master, setup.wait_failover, setup.revive,
                    lambda port: next(s for s in setup.servers if s.port == port))


def two_proxies(tmp_path, procs, mock, topology: Topology, **settings) -> list[Proc]:
    return [launch(tmp_path / f"p{i}", procs, [backend(mock)], KEYS, **topology.settings(**settings))
            for i in (1, 2)]


def wait_store_answers(ports: list[int]) -> None:
    """Until both proxies reach the (new) master: a request of a roomy key is admitted, not 503."""
    for port in ports:
        wait_for(lambda port=port: call(port, WARM).status == 200, timeout=15, interval=0.1)


def assert_wave_admits_exactly_the_burst(ports: list[int], key: str) -> None:
    replies = wave(ports, key, 50)
    assert Counter(r.status for r in replies) == {200: BURST, 429: 50 - BURST}
    for reply in replies:
        if reply.status == 429:
            assert_refused(reply, "requests")


@pytest.mark.parametrize("topology", ["cluster", "sentinel", "valkey-cluster"], indirect=True)
def test_two_proxies_admit_exactly_the_burst_from_idle_across_50_connections(tmp_path, procs, new_mock, topology):
    mock = new_mock()
    ports = [proxy.port for proxy in two_proxies(tmp_path, procs, mock, topology)]
    before = posts(mock)
    assert_wave_admits_exactly_the_burst(ports, WAVE)
    assert posts(mock) == before + BURST  # the refused ones never reached the backend


def check_failover_run(replies: list[Reply], elapsed: float) -> tuple[int, int]:
    """Every reply is 200, a proper 429, or fail_closed's 503; returns (admitted, admitted beyond the limit)."""
    statuses = Counter(r.status for r in replies)
    assert set(statuses) <= {200, 429, 503}, statuses
    for reply in replies:
        if reply.status == 429:
            assert_refused(reply, "requests")
        elif reply.status == 503:
            assert reply.error["code"] == "rate_limit_store_unavailable"
    limit = BURST + PER_MINUTE / 60 * elapsed + 1  # GCRA: the burst, then the rate (+1 for the edges)
    return statuses[200], max(0, int(statuses[200] - limit))


def test_master_killed_mid_run_replica_takes_over_within_the_bound(tmp_path, procs, new_mock, topology):
    mock = new_mock()
    proxies = two_proxies(tmp_path, procs, mock, topology, on_store_error="fail_closed")
    ports = [proxy.port for proxy in proxies]
    killed, failover = topology.master(), []

    def kill_mid_run() -> None:
        time.sleep(1.5)
        killed.kill()
        failover.append(topology.wait_failover(killed))

    killer = threading.Thread(target=kill_mid_run, daemon=True)
    before = posts(mock)
    killer.start()
    try:
        replies, elapsed = hammer(ports, SUSTAINED, threads=20, duration=6.0)
    finally:
        killer.join(30)
    try:
        assert failover, "no replica took over"
        admitted, beyond = check_failover_run(replies, elapsed)
        print(f"{topology.name}: failover {failover[0]:.2f}s, {len(replies)} requests in {elapsed:.2f}s: "
              f"{admitted} admitted, {beyond} beyond the limit, {Counter(r.status for r in replies)[503]} x 503")
        assert beyond <= BURST  # the documented bound: one burst per scope and failover
        assert Counter(r.status for r in replies)[503] > 0  # while no master answered, fail_closed applied
        assert posts(mock) == before + admitted
        # The promoted replica now enforces the limits, exactly.
        wait_store_answers(ports)
        assert_wave_admits_exactly_the_burst(ports, WAVE)
    finally:
        topology.revive(killed)
    for proxy in proxies:
        assert_idle(proxy)


def test_a_cluster_master_not_holding_the_keys_killed_mid_run_costs_no_admission(tmp_path, procs, new_mock,
                                                                                 redis_cluster):
    """With cluster-require-full-coverage no, the slots of a dead master do not stop the store's slot."""
    redis_cluster.flushall()
    mock = new_mock()
    topology = Topology("cluster", redis_cluster.url, True, lambda: None, lambda killed: 0.0, redis_cluster.revive,
                        redis_cluster.node)
    proxies = two_proxies(tmp_path, procs, mock, topology, on_store_error="fail_closed")
    other, failover = redis_cluster.other_master(TAG), []

    def kill_mid_run() -> None:
        time.sleep(1.0)
        other.kill()
        with_key = next(k for k in map(str, range(100000)) if redis_cluster.master_of(k) is other)
        failover.append(redis_cluster.wait_failover(other, with_key))

    killer = threading.Thread(target=kill_mid_run, daemon=True)
    killer.start()
    try:
        replies, elapsed = hammer([p.port for p in proxies], SUSTAINED, threads=20, duration=4.0)
    finally:
        killer.join(30)
    try:
        assert failover, "no replica took over"
        admitted, beyond = check_failover_run(replies, elapsed)
        assert Counter(r.status for r in replies)[503] == 0
        assert beyond == 0 and admitted >= BURST
    finally:
        redis_cluster.revive(other)


def test_lost_writes_admit_at_most_one_more_burst(tmp_path, procs, new_mock, topology):
    """The bound reached: a burst admitted while the replica was cut off is forgotten by the failover."""
    mock = new_mock()
    ports = [proxy.port for proxy in two_proxies(tmp_path, procs, mock, topology, on_store_error="fail_closed")]
    wait_store_answers(ports)
    master = topology.master()
    with admin(master.port) as client:
        replica_ports = [r["port"] for r in client.info("replication").values() if isinstance(r, dict)]
    assert len(replica_ports) == 1
    replica = topology.node(replica_ports[0])
    replica.pause()  # SIGSTOP: it cannot reconnect ...
    try:
        with admin(master.port) as client:
            client.client_kill_filter(_type="replica")  # ... once its replication link is cut
        assert_wave_admits_exactly_the_burst(ports, LOST)  # written to the master only
        master.kill()
    finally:
        replica.popen.send_signal(signal.SIGCONT)
    try:
        topology.wait_failover(master)
        wait_store_answers(ports)
        # The replica never saw that burst: after the failover the key is idle again, and one more burst
        # passes - but not more, whatever is lost.
        replies = wave(ports, LOST, 50)
        assert Counter(r.status for r in replies)[200] <= BURST
        assert Counter(r.status for r in replies)[200] == BURST, "the writes were not lost after all"
    finally:
        topology.revive(master)
