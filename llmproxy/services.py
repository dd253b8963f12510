"""What a request needs, as one configuration generation: built at start and by every reload, then read-only.

A request takes the current Services once, when it starts, and uses that snapshot to its end: a reload
that lands mid-stream changes the next request, never this one (its backends, keys, limits, prices,
header rules). What must outlive a generation (metrics, the access log, the record outbox, the deadline
sweeper, the overhead counters, traffic counts; the rate-limit store with its counters) is handed on
from each generation to the next; those sections need a restart to change.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmproxy.accesslog import AccessLog
from llmproxy.auth import KeyRing
from llmproxy.cache import ResponseCache
from llmproxy.config.discovery import Endpoint
from llmproxy.config.model import Config, PriceConfig, TranslationConfig
from llmproxy.deadlines import DeadlineSweeper, tick_for
from llmproxy.delivery import DeliveryService
from llmproxy.fleet.affinity import ResponseAffinity
from llmproxy.fleet.auto import AutoRules
from llmproxy.fleet.fleet import Fleet, build_fleet
from llmproxy.http11.headers import HeaderRules
from llmproxy.iprules import IpList, IpRules
from llmproxy.metrics import Metrics
from llmproxy.overhead import ProxyOverhead
from llmproxy.ratelimit import Limiter, open_store
from llmproxy.recount import Recounter
from llmproxy.traffic import Traffic

if TYPE_CHECKING:
    from llmproxy.tracing import Tracing

log = logging.getLogger("llmproxy")


@dataclass(frozen=True, slots=True)
class RelaySettings:
    """What every exchange (relay.py) of a process shares."""

    loop: asyncio.AbstractEventLoop  # given, not looked up: Python 3.11's get_running_loop() is a getpid syscall
    sweeper: DeadlineSweeper  # first-byte and stream-idle deadlines
    overhead: ProxyOverhead  # the proxy's own time per read, counted in place
    write_timeout: float  # a client that reads nothing for this long is cut
    traffic: Traffic  # draining: responses tell the client the connection closes
    ping_interval: float = 10.0  # translation.ping_interval: a translated Messages stream's keep-alive


@dataclass(frozen=True, slots=True, eq=False)
class Lasting:
    """The parts of Services that live as long as the process (their config sections need a restart)."""

    metrics: Metrics | None
    access_log: AccessLog
    outbox: DeliveryService  # every finished request's usage record goes here
    relay: RelaySettings
    traffic: Traffic
    clock: Callable[[], float]  # the event loop's time: health and ejection deadlines are in it
    trusted_proxies: tuple[str, ...]  # server.trusted_proxies
    recounter: Recounter  # exact prompt counts of estimated records, from the backends' tokenizers
    affinity: ResponseAffinity  # which backend stored which Responses API response
    tracing: Tracing | None = None  # None: tracing disabled (and opentelemetry never imported)
    cache: ResponseCache | None = None  # None: caching disabled


@dataclass(frozen=True, slots=True, eq=False)
class Services:
    generation: int  # 1 at start, +1 per reload
    config: Config
    fleet: Fleet
    keys: KeyRing
    limiter: Limiter | None  # None: rate_limit disabled
    prices: dict[str, PriceConfig]
    metering: bool  # usage.metering: responses are metered and every request sent upstream gets a record
    translation: TranslationConfig  # how requests in an API their backend does not serve are translated
    auto: AutoRules | None  # routing.auto: the rules that pick the model of a request for "auto"
    headers: HeaderRules
    ip_rules: IpRules | None  # security.ip_whitelist / ip_blacklist; None: every address is let in
    trusted_proxies: IpList  # server.trusted_proxies: whose X-Forwarded-For names the client
    # Handed on from generation to generation (see Lasting), flat here: the request path reads them often.
    metrics: Metrics | None
    access_log: AccessLog
    outbox: DeliveryService
    relay: RelaySettings
    traffic: Traffic
    clock: Callable[[], float]
    recounter: Recounter
    lasting: Lasting
    tracing: Tracing | None = None
    cache: ResponseCache | None = None  # caching.enabled; the section needs a restart to change


def build_lasting(config: Config, loop: asyncio.AbstractEventLoop, live_state: Callable[[], dict[str, Any]], *,
                  spool_dir: str | None = None, access_log: AccessLog | None = None,
                  outbox: DeliveryService | None = None) -> Lasting:
    """The parts that live as long as the process, as `config` (the one started with) describes them.

    `live_state` gives the gauges read at scrape time; `spool_dir` overrides usage.spool_dir (a worker of
    several has its own spool); `access_log` and `outbox` replace the configured ones (tests record in memory).
    """
    overhead = ProxyOverhead()  # the relay counts into it; exported when metrics are enabled
    metrics = Metrics(live_state, overhead) if config.metrics.enabled else None
    traffic = Traffic()
    return Lasting(
        metrics=metrics,
        access_log=access_log if access_log is not None else AccessLog(config.logging.access_log),
        outbox=outbox if outbox is not None else DeliveryService(
            dataclasses.replace(config.usage, spool_dir=spool_dir) if spool_dir else config.usage, metrics),
        relay=RelaySettings(loop=loop, sweeper=DeadlineSweeper(loop, tick_for(_deadlines(config))), overhead=overhead,
                            write_timeout=config.server.timeouts.write, traffic=traffic,
                            ping_interval=config.translation.ping_interval),
        traffic=traffic,
        clock=loop.time,
        trusted_proxies=tuple(config.server.trusted_proxies),
        recounter=Recounter(config.usage.recount),
        affinity=ResponseAffinity(),
        tracing=_tracing(config),
        cache=ResponseCache(config.caching, metrics, loop.time) if config.caching.enabled else None,
    )


def _tracing(config: Config) -> Tracing | None:
    """The process's tracer and exporter when tracing is enabled; only then is opentelemetry imported."""
    if not config.tracing.enabled:
        return None
    from llmproxy.tracing import Tracing

    return Tracing(config.tracing)


async def build_services(config: Config, lasting: Lasting, previous: Services | None = None,
                         discovered: Mapping[str, tuple[Endpoint, ...]] | None = None) -> Services:
    """The services `config` describes; with `previous`, the next generation after it: backends kept with
    the same settings keep their pools and what was learned of them, and the limiter keeps its store.
    `discovered` holds the members each discovery entry has now, by entry name."""
    keys = KeyRing(config.auth, config.rate_limit, previous.keys if previous is not None else None)
    await keys.start()
    security = config.security
    trusted_proxies = IpList(lasting.trusted_proxies)  # one list (and one lookup cache) for the gate and the rules
    fleet = await build_fleet(config, lasting.metrics, previous=previous.fleet if previous is not None else None,
                              discovered=discovered)
    return Services(
        generation=previous.generation + 1 if previous is not None else 1,
        config=config,
        fleet=fleet,
        keys=keys,
        limiter=_limiter(config, lasting.metrics, previous.limiter if previous is not None else None),
        prices=config.pricing,
        metering=config.usage.metering,
        translation=config.translation,
        auto=AutoRules(config.routing.auto) if config.routing.auto else None,
        headers=HeaderRules(frozenset(keys.header_names), lasting.trusted_proxies),
        ip_rules=IpRules(security.ip_whitelist, security.ip_blacklist, trusted_proxies)
        if security.ip_whitelist or security.ip_blacklist else None,
        trusted_proxies=trusted_proxies,
        metrics=lasting.metrics,
        access_log=lasting.access_log,
        outbox=lasting.outbox,
        relay=lasting.relay,
        traffic=lasting.traffic,
        clock=lasting.clock,
        recounter=lasting.recounter,
        lasting=lasting,
        tracing=lasting.tracing,
        cache=lasting.cache,
    )


async def with_new_fleet(services: Services, discovered: Mapping[str, tuple[Endpoint, ...]]) -> Services:
    """The same generation with the fleet its config and `discovered` (new members found) describe: kept
    backends keep their state, as on a reload; the rest of the services is shared, unchanged."""
    fleet = await build_fleet(services.config, services.metrics, previous=services.fleet, discovered=discovered,
                              probe_kept=False)  # what the periodic probes said of the others stands
    return dataclasses.replace(services, fleet=fleet)


def _deadlines(config: Config) -> list[float]:
    """Every first-byte and stream-idle timeout in use: the sweeper ticks often enough for the shortest."""
    timeouts = config.server.timeouts
    return [config.translation.ping_interval] + [
        t for b in config.backends for t in (b.timeouts.first_byte or timeouts.first_byte,
                                             b.timeouts.stream_idle or timeouts.stream_idle)]


def _limiter(config: Config, metrics: Metrics | None, old: Limiter | None) -> Limiter | None:
    """The limiter of `config`; it keeps the old one's store (and so its counters) unless that must change."""
    rate, per_key_labels = config.rate_limit, config.auth.metrics_per_key
    if not rate.enabled:
        return None
    if old is None:
        limiter = Limiter(rate, open_store(rate), metrics, per_key_labels)
        limiter.prepare()
        return limiter
    if (old.config.store, old.config.redis_url, old.config.cluster) != (rate.store, rate.redis_url, rate.cluster):
        log.warning("reload: rate_limit.store, redis_url and cluster changes need a restart; they are not applied")
        rate = dataclasses.replace(rate, store=old.config.store, redis_url=old.config.redis_url,
                                   cluster=old.config.cluster)
    return Limiter(rate, old.store, metrics, per_key_labels, previous=old)
