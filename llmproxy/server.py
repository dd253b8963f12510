"""The proxy server: the listening socket, signals, configuration reload and graceful drain.

It builds the Services of each configuration generation (services.py) and hands the current one to the
client connections (connection.Clients); a reload builds the next generation and swaps it in one
assignment. Requests never see the server: they get their Services snapshot when they start.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from typing import Any

from llmproxy.config import ConfigError, config_warnings, load_config
from llmproxy.config.model import Config
from llmproxy.connection import Clients, ClientSettings
from llmproxy.discovery.watch import Discovery
from llmproxy.fleet.fleet import retire_removed
from llmproxy.metrics import Metrics
from llmproxy.services import Services, build_lasting, build_services, with_new_fleet
from llmproxy.upstream.queue import ConcurrencyQueue

log = logging.getLogger("llmproxy")
GC_YOUNG_THRESHOLD = 10_000  # net allocations between young-generation collections (CPython: 700); see settle_heap
DRAIN_POLL = 0.05  # seconds between checks that the last request in flight has ended


class ProxyServer:
    def __init__(self, config: Config, config_path: str | None = None, spool_dir: str | None = None) -> None:
        """`spool_dir` overrides usage.spool_dir (a worker of several has its own)."""
        self.config = config  # as started: its server, logging, metrics and usage sections are the ones running
        self.config_path = config_path  # re-read on SIGHUP
        self.loop = asyncio.get_running_loop()
        self.lasting = build_lasting(config, self.loop, self._live_state, spool_dir=spool_dir)
        self.settings = ClientSettings.from_config(config.server)
        self.clients: Clients | None = None  # with the first Services, by start_services()
        self._server: asyncio.AbstractServer | None = None
        self._reload_lock = asyncio.Lock()
        # Backends found at run time (backends[].discovery): a change builds the next fleet (_swap_fleets).
        self.discovery = Discovery(self._discovery_changed, self.lasting.metrics)
        self._refleet: asyncio.Task | None = None  # building the next fleet for a discovery change
        self._fleet_stale = False  # discovery changed since the fleet was built
        self._stop: asyncio.Future[None] = self.loop.create_future()  # set by SIGTERM/SIGINT
        self.port = 0

    # Lifecycle ------------------------------------------------------------------------------------

    @property
    def services(self) -> Services:
        """The current generation (what a request starting now gets)."""
        assert self.clients is not None, "start_services() first"
        return self.clients.services

    @property
    def metrics(self) -> Metrics | None:
        return self.lasting.metrics

    async def start_services(self) -> None:
        """Build the first generation: the backends probed once (kinds, models, health), so routing is right
        from the first request."""
        await self.discovery.configure(self.config.backends)
        services = await build_services(self.config, self.lasting, discovered=self.discovery.members())
        self.clients = Clients(self.settings, services, self.loop)

    async def start(self, host: str, port: int, reuse_port: bool = False) -> None:
        """Listen on host:port; `reuse_port` lets several worker processes share it (SO_REUSEPORT)."""
        self.lasting.outbox.start()  # before accepting: records left undelivered by a previous run go out first
        await self.start_services()
        self._handle_signals()
        settle_heap()
        self._server = await self.loop.create_server(
            self.clients, host, port, backlog=4096, reuse_address=True, reuse_port=reuse_port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def run_until_signalled(self) -> None:
        """Serve until SIGTERM/SIGINT; then answer /ready with 503 and serve on for shutdown_delay, then drain
        in-flight requests (up to shutdown_timeout).

        SIGHUP re-reads the config file and swaps in the next generation of services (see reload()).
        """
        await self._stop
        self.lasting.traffic.leaving = True  # /ready says so at once
        delay = self.config.server.shutdown_delay
        if delay:
            log.info("stopping: /ready answers 503; serving on for %gs (server.shutdown_delay)", delay)
            await asyncio.sleep(delay)
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
        """Re-read the config: a valid one swaps in a new generation of services at once (requests in flight
        finish on the one they started with); an invalid one changes nothing."""
        async with self._reload_lock:  # two quick SIGHUPs: the second builds on what the first swapped in
            return await self._reload()

    async def _reload(self) -> bool:
        try:
            config = load_config(self.config_path)
        except ConfigError as error:
            log.error("reload refused, keeping the running config: %s: %s", self.config_path, error)
            return False
        for warning in config_warnings(config):
            log.warning("reload: %s", warning)
        old = self.services
        await self.discovery.configure(config.backends)
        services = await build_services(config, self.lasting, previous=old, discovered=self.discovery.members())
        if not self._swap_in(old, services):
            return False
        for section in ("server", "logging", "metrics", "usage", "tracing", "caching"):
            if getattr(config, section) != getattr(self.config, section):
                log.warning("reload: changes to %s need a restart; they are not applied", section)
        log.info("reloaded %s: %d backends, %s", self.config_path, len(services.fleet.backends),
                 config.routing.load_balance)
        return True

    def _swap_in(self, old: Services, services: Services) -> bool:
        """Make `services` the generation every request from now on starts with (a reload's, or a fleet that
        discovery changed), retiring the backends `old` had and it has not; False, and `services` stopped, if
        the proxy began draining while they were built."""
        if self.lasting.traffic.draining:
            services.fleet.stop()
            return False
        self.clients.services = services
        retire_removed(old.fleet, services.fleet)
        gc.unfreeze()  # the old fleet was frozen with the start-up heap: let a full pass free what it left
        settle_heap()
        return True

    def _discovery_changed(self) -> None:
        self._fleet_stale = True
        if self._refleet is None or self._refleet.done():  # else the running one builds again when done
            self._refleet = self.loop.create_task(self._swap_fleets())

    async def _swap_fleets(self) -> None:
        """Swap in the fleet of the members discovery has now, as a reload swaps its: kept backends keep
        their state, new ones start once probed, removed ones finish their requests. Again while a change
        came during the build; several changes at once make one new fleet."""
        async with self._reload_lock:  # after a reload in progress, on the generation it swapped in
            while self._fleet_stale and not self.lasting.traffic.draining:
                self._fleet_stale = False
                old = self.services
                services = await with_new_fleet(old, self.discovery.members())
                if not self._swap_in(old, services):
                    return
                log.info("discovery: the fleet has %d backends now", len(services.fleet.backends))

    async def drain(self) -> None:
        """Stop accepting, let in-flight requests finish, then close everything."""
        traffic = self.lasting.traffic
        traffic.draining = True
        self.discovery.stop()
        if self._server is not None:
            self._server.close()
        clients = self.clients
        if clients is not None:
            clients.close_idle()
        deadline = self.loop.time() + self.config.server.shutdown_timeout
        while traffic.inflight and self.loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL)
        if clients is not None:
            clients.abort_all()
            services = clients.services
            for backend in services.fleet.backends:
                backend.pool.close()
            services.fleet.stop()
            if services.limiter is not None:
                await services.limiter.close()
            services.keys.close()
        if self.lasting.cache is not None:
            await self.lasting.cache.close()
        self.lasting.relay.sweeper.close()
        await self.lasting.recounter.close()  # records waiting for a prompt count go out (counted or not)
        await self.lasting.outbox.close()  # every record of every finished request is on disk before we exit
        if self.lasting.tracing is not None:  # the spans of the last requests go out (up to export_timeout)
            await self.loop.run_in_executor(None, self.lasting.tracing.shutdown)
        self.lasting.access_log.close()
        if self.metrics is not None:
            self.metrics.flush()  # multiprocess: the last second's overhead counts reach the shared files

    def _live_state(self) -> dict:
        clients = self.clients
        if clients is None:
            return {"inflight": 0, "streams": 0, "connections": 0, "ratelimit_held": 0, "backends": {}}
        services = clients.services
        now = self.loop.time()
        limiter = services.limiter
        return {
            "inflight": self.lasting.traffic.inflight,
            "streams": clients.streams_in_flight(),
            "connections": len(clients.connections),
            "ratelimit_held": limiter.held if limiter is not None else 0,
            **({"outbox_pending": self.metrics.outbox_pending} if self.lasting.outbox.enabled else {}),
            "backends": {
                b.name: {"checked_out": b.pool.checked_out, "idle": b.pool.idle_count, "inflight": b.in_flight,
                         "healthy": b.available(now), "ttft_ewma": b.ttft_ewma, "queue_depth": b.queue_depth,
                         "kv_cache": b.kv_cache_usage, **_queue_state(b.pool.queue)}
                for b in services.fleet.backends
            },
        }


def _queue_state(queue: ConcurrencyQueue | None) -> dict[str, Any]:
    """A backend's max_concurrent queue for the live gauges: its length, and its waits for the histogram."""
    return {"queued": None, "queue_wait": None} if queue is None else {"queued": queue.queued,
                                                                        "queue_wait": queue.waits}


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
