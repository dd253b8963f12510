"""The proxy server: long-lived singletons, the listening socket, graceful drain."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import ipaddress
import logging
import os
import signal
from functools import lru_cache
from time import perf_counter

from llmproxy.accesslog import AccessLog
from llmproxy.auth import KeyRing
from llmproxy.config import ConfigError, load_config
from llmproxy.config.model import Config
from llmproxy.connection import ClientConnection
from llmproxy.context import RequestContext, valid_client_request_id
from llmproxy.deadlines import DeadlineSweeper, tick_for
from llmproxy.delivery.dispatch import DeliveryService
from llmproxy.fleet.backend import Backend
from llmproxy.fleet.fleet import Fleet, build_fleet, retire_removed
from llmproxy.http11.request import CodecLimits, ProtocolError, RequestHead
from llmproxy.metrics import Metrics
from llmproxy.overhead import ProxyOverhead
from llmproxy.pipeline import handle_request
from llmproxy.ratelimit import Limiter, open_store

log = logging.getLogger("llmproxy")
GC_YOUNG_THRESHOLD = 10_000  # net allocations between young-generation collections (CPython: 700); see settle_heap


class ProxyServer:
    def __init__(self, config: Config, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path  # re-read on SIGHUP
        self.loop = asyncio.get_running_loop()
        self.timeouts = config.server.timeouts
        self.codec_limits = CodecLimits(
            max_header_size=config.server.max_header_size,
            max_request_line=config.server.max_request_line,
            max_body_size=config.server.max_body_size,
        )
        self.fleet: Fleet | None = None  # built (and probed once) by start()
        self.overhead = ProxyOverhead()  # the relay counts into it; exported when metrics are enabled
        self.metrics = Metrics(self._live_state, self.overhead) if config.metrics.enabled else None
        self.keys = KeyRing(config.auth, config.rate_limit)
        self.credential_headers = frozenset(self.keys.header_names)  # never forwarded upstream
        self.limiter = Limiter(config.rate_limit, open_store(config.rate_limit), self.metrics,
                               config.auth.metrics_per_key) if config.rate_limit.enabled else None
        self.access_log = AccessLog(config.logging.access_log)
        self.prices = config.pricing
        self.metering = config.usage.metering
        self.usage = DeliveryService(config.usage, self.metrics)
        self.sweeper = DeadlineSweeper(self.loop, tick_for(_backend_timeouts(config)))
        self.connections: set[ClientConnection] = set()
        self.inflight = 0
        self.draining = False
        self._trusted = [ipaddress.ip_network(n, strict=False) for n in config.server.trusted_proxies]
        self._id_prefix = os.urandom(6).hex()
        self._id_counter = 0
        self._server: asyncio.AbstractServer | None = None
        self._reload_lock = asyncio.Lock()
        self._stop: asyncio.Future[None] = self.loop.create_future()  # set by SIGTERM/SIGINT
        self.port = 0

    # Lifecycle ------------------------------------------------------------------------------------

    @property
    def backends(self) -> list[Backend]:
        return self.fleet.backends if self.fleet is not None else []

    async def start_fleet(self) -> None:
        """Build the backends and probe them once (kinds, models, health), so routing is right at once."""
        self.fleet = await build_fleet(self.config, self.metrics)

    async def start(self, host: str, port: int, reuse_port: bool = False) -> None:
        """Listen on host:port; `reuse_port` lets several worker processes share it (SO_REUSEPORT)."""
        self.usage.start()  # before accepting: records left undelivered by a previous run go out first
        await self.start_fleet()
        self._handle_signals()
        settle_heap()
        self._server = await self.loop.create_server(
            lambda: ClientConnection(self), host, port, backlog=4096, reuse_address=True, reuse_port=reuse_port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def run_until_signalled(self) -> None:
        """Serve until SIGTERM/SIGINT, then drain in-flight requests (up to shutdown_timeout).

        SIGHUP re-reads the config file and swaps in its backends and routing (see reload()).
        """
        await self._stop
        await self.drain()

    def _handle_signals(self) -> None:
        # Before the port opens (and "listening on" is printed): a SIGHUP sent by anyone who saw the port
        # must reload, not kill the process with the default action.
        stop = self._stop
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
        if self.config_path is not None:
            self.loop.add_signal_handler(signal.SIGHUP, lambda: self.loop.create_task(self.reload()))

    async def reload(self) -> bool:
        """Re-read the config: a valid one swaps backends, weights, routing, health checks and prices
        atomically (requests in flight finish on what they started with); an invalid one changes nothing."""
        async with self._reload_lock:  # two quick SIGHUPs: the second builds on what the first swapped in
            return await self._reload()

    async def _reload(self) -> bool:
        try:
            config = load_config(self.config_path)
        except ConfigError as error:
            log.error("reload refused, keeping the running config: %s: %s", self.config_path, error)
            return False
        old = self.fleet
        fleet = await build_fleet(config, self.metrics, previous=old)
        if self.draining:
            fleet.stop()
            return False
        self.fleet = fleet
        if old is not None:
            retire_removed(old, fleet)
        self.prices = config.pricing
        self._reload_access(config)
        gc.unfreeze()  # the old fleet was frozen with the start-up heap: let a full pass free what it left
        settle_heap()
        for section in ("server", "logging", "metrics", "usage"):
            if getattr(config, section) != getattr(self.config, section):
                log.warning("reload: changes to %s need a restart; they are not applied", section)
        log.warning("reloaded %s: %d backends, %s", self.config_path, len(fleet.backends),
                    config.routing.load_balance)
        return True

    def _reload_access(self, config: Config) -> None:
        """New keys and limits; the limiter keeps its store (and so the counters) unless it must change."""
        self.keys = KeyRing(config.auth, config.rate_limit)
        self.credential_headers = frozenset(self.keys.header_names)
        rate, old = config.rate_limit, self.limiter
        if not rate.enabled:
            self.limiter = None
        elif old is not None and (old.config.store, old.config.redis_url) == (rate.store, rate.redis_url):
            self.limiter = Limiter(rate, old.store, self.metrics, config.auth.metrics_per_key, previous=old)
        elif old is not None:
            log.warning("reload: rate_limit.store and redis_url changes need a restart; they are not applied")
            self.limiter = Limiter(dataclasses.replace(rate, store=old.config.store, redis_url=old.config.redis_url),
                                   old.store, self.metrics, config.auth.metrics_per_key, previous=old)
        else:
            self.limiter = Limiter(rate, open_store(rate), self.metrics, config.auth.metrics_per_key)

    async def drain(self) -> None:
        """Stop accepting, let in-flight requests finish, then close everything."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close_if_idle()
        deadline = self.loop.time() + self.config.server.shutdown_timeout
        while self.inflight and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort()
        for backend in self.backends:
            backend.pool.close()
        if self.fleet is not None:
            self.fleet.stop()
        self.sweeper.close()
        await self.usage.close()  # every record of every finished request is on disk before we exit
        if self.limiter is not None:
            await self.limiter.close()
        self.access_log.close()
        if self.metrics is not None:
            self.metrics.flush()  # multiprocess: the last second's overhead counts reach the shared files

    # Per request ----------------------------------------------------------------------------------

    def new_context(self, conn: ClientConnection, head: RequestHead) -> RequestContext:
        request_id = self._request_id()
        supplied = valid_client_request_id(head)  # checked once per request, not at every use
        target = head.target
        return RequestContext(
            conn=conn,
            head=head,
            request_id=request_id,
            t_start=perf_counter(),
            keep_alive=head.keep_alive and not self.draining,
            forwarded_request_id=supplied or request_id.encode(),
            client_request_id=None if supplied is None else supplied.decode(),
            path=(target.split(b"?", 1)[0] if b"?" in target else target).decode("latin-1"),
        )

    def handle(self, ctx: RequestContext):
        return handle_request(self, ctx)

    def record_usage(self, record: dict) -> None:
        """Count a finished request's usage record and hand it to the durable outbox."""
        if self.metrics is not None:
            self.metrics.observe_usage(record)
        self.usage.append(record)

    def is_trusted_proxy(self, peer: str) -> bool:
        return bool(self._trusted) and _in_networks(peer, tuple(self._trusted))

    def log_protocol_error(self, conn: ClientConnection, error: ProtocolError) -> None:
        """Record a request rejected before it had a context (malformed head)."""
        self.access_log.write_rejected(conn.peer, error.spec.status, error.spec.termination, error.message)
        if self.metrics is not None:
            self.metrics.observe_request("", error.spec.status, error.spec.termination, 0.0, None)

    def _request_id(self) -> str:
        # Always ours, even when the client sends an X-Request-Id (that one is forwarded, see context.py):
        # a client reusing its id must not make its usage records look like duplicates of each other.
        self._id_counter += 1
        return f"{self._id_prefix}{self._id_counter:08x}"

    def _live_state(self) -> dict:
        now = self.loop.time()
        return {
            "inflight": self.inflight,
            "connections": len(self.connections),
            "ratelimit_held": self.limiter.held if self.limiter is not None else 0,
            **({"outbox_pending": self.metrics.outbox_pending} if self.usage.enabled else {}),
            "backends": {
                b.name: {"checked_out": b.pool.checked_out, "idle": b.pool.idle_count, "inflight": b.in_flight,
                         "healthy": b.available(now), "ttft_ewma": b.ttft_ewma, "queue_depth": b.queue_depth}
                for b in self.backends
            },
        }


def _backend_timeouts(config: Config) -> list[float]:
    timeouts = config.server.timeouts
    return [t for b in config.backends for t in (b.timeouts.first_byte or timeouts.first_byte,
                                                    b.timeouts.stream_idle or timeouts.stream_idle)]


@lru_cache(maxsize=4096)
def _in_networks(peer: str, networks: tuple) -> bool:
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in network for network in networks)


def settle_heap() -> None:
    """Tune the cyclic garbage collector for serving, once start-up is done.

    gc.freeze() moves everything built so far (imports, config, fleet: ~100k objects) out of the collector's
    sight, so a full collection walks only what requests allocate. CPython's young-generation threshold of 700
    net allocations makes a proxy with hundreds of streams in flight collect every few requests (about 250 us
    each, with the middle generation's ~1.5 ms passes landing on whichever chunk is in flight); at 10,000 it
    collects fifteen times less often and spends a third of the time in all (bench.ttft at c=512). Requests
    make almost no reference cycles (a closed connection and its parser are one), so little waits longer.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
