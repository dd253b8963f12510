"""The backends and how requests are spread over them, as one unit that a reload (SIGHUP) swaps whole, as does
a change of the backends a discovery entry found (discovery/).

A request takes the fleet current when it starts and keeps it to its end, so a reload never changes the
rules under a request in flight (its route table included); backends kept across a reload keep their pool,
health and latency state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from llmproxy.config.discovery import Endpoint
from llmproxy.config.model import BackendConfig, Config, RoutingConfig
from llmproxy.discovery.members import expand
from llmproxy.fleet.backend import Backend
from llmproxy.fleet.balancer import KV_AWARE, Balancer
from llmproxy.fleet.health import HealthEvents, HealthMonitor
from llmproxy.fleet.prefix import AffinityKeys
from llmproxy.fleet.router import Router
from llmproxy.fleet.routes import RouteTable, build_routes

log = logging.getLogger("llmproxy")
RETIRE_POLL = 0.2  # seconds between checks that a removed backend's last request has ended


@dataclass(eq=False)
class Fleet:
    backends: list[Backend]
    router: Router
    balancer: Balancer
    health: HealthMonitor
    routing: RoutingConfig
    retry_on: frozenset[str]
    retry_statuses: frozenset[int]  # backend statuses held back from the client to retry elsewhere
    routes: RouteTable | None = None  # `routes:`; None without any, so a request pays one attribute test

    def stop(self) -> None:
        self.health.stop()

    def backend_named(self, name: str) -> Backend | None:
        for backend in self.backends:  # a few entries: a dict would cost more to keep than to scan
            if backend.name == name:
                return backend
        return None


async def build_fleet(config: Config, events: HealthEvents | None, previous: Fleet | None = None,
                      discovered: Mapping[str, tuple[Endpoint, ...]] | None = None,
                      probe_kept: bool = True) -> Fleet:
    """Build (and probe once) the fleet `config` describes, reusing `previous`'s backends where unchanged.

    A discovery entry of `config.backends` stands for its members in `discovered` (by entry name); a member new
    to the fleet starts unhealthy when probes are on, so it takes no request before its first probe passes.
    Without `probe_kept` (a discovery change) the first probe round asks only the backends new to the fleet.
    """
    kept = {b.name: b for b in previous.backends} if previous is not None else {}
    configured = {backend.name for backend in config.backends}
    backends, new = [], []
    for backend_config in expand(config.backends, discovered or {}):
        old = kept.get(backend_config.name)
        backend = _reuse_or_create(backend_config, config, old)
        if backend is not old:
            new.append(backend)
            if backend.name not in configured and config.health_check.enabled:
                backend.healthy = False  # a discovered member: its first probe (discover, below) decides
        backends.append(backend)
    routing = config.routing
    health = HealthMonitor(backends, config.health_check, routing.load_balance in KV_AWARE, events)
    await health.discover(None if probe_kept else new)
    health.start()
    retry_on = frozenset(routing.retry_on)
    router = Router(backends, routing.model_aliases)
    return Fleet(
        backends=backends,
        router=router,
        balancer=_balancer(routing, backends),
        health=health,
        routing=routing,
        retry_on=retry_on,
        retry_statuses=frozenset(int(c) for c in retry_on if c.isdigit()),
        routes=build_routes(config.routes, backends, router, routing.translate, config.pricing),
    )


def _balancer(routing: RoutingConfig, backends: list[Backend]) -> Balancer:
    affinity = routing.prefix_affinity
    return Balancer(routing.load_balance, backends, kv_threshold=routing.kv_cache_threshold,
                    keys=AffinityKeys(affinity.key_chars, affinity.session_header), epsilon=affinity.epsilon)


def _reuse_or_create(config: BackendConfig, server: Config, old: Backend | None) -> Backend:
    # Same backend but for its weight or prices: keep the object, with its warm pool and what we learned about it.
    if old is not None and dataclasses.replace(
            old.config, weight=config.weight, cost_per_million_input_tokens=config.cost_per_million_input_tokens,
            cost_per_million_output_tokens=config.cost_per_million_output_tokens) == config:
        old.config = config
        old.weight = config.weight
        return old
    return Backend.create(config, server)


def retire_removed(old: Fleet, new: Fleet) -> None:
    """Close the pools of backends the new fleet dropped, once their last request has ended."""
    old.stop()
    remaining = {id(b) for b in new.backends}
    for backend in old.backends:
        if id(backend) not in remaining:
            asyncio.get_running_loop().create_task(_close_when_idle(backend))


async def _close_when_idle(backend: Backend) -> None:
    while backend.in_flight:
        await asyncio.sleep(RETIRE_POLL)
    backend.pool.close()
    log.info("backend %s removed", backend.name)
