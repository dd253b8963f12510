"""Prometheus metrics, written once per request when it ends (never per chunk).

With one process, the per-request counters and histograms are counted in plain Python numbers
(overhead.Tally, DeferredHistogram) and added to their Prometheus children when the registry is collected:
prometheus_client's own `inc` and `observe` (a lock, several calls, a walk over the buckets) cost more per
request than the rest of the bookkeeping together. With several, they go to the shared files at once, so
that a worker killed between scrapes loses none.

Live gauges (in-flight requests, client connections, pool state) are read from the proxy's own
counters at scrape time by a collector, so the request path pays nothing for them.

With several worker processes (`server.workers`, see workers.py) the supervisor sets
PROMETHEUS_MULTIPROC_DIR before any worker imports prometheus_client: every worker then writes its
counters and histograms to memory-mapped files there, and whichever worker gets the scrape merges all
of them (MultiProcessCollector). A scrape cannot read another process's counters, so there each worker
publishes its live gauges into those files once a second instead; the process_* metrics are not
available in that mode.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.process_collector import ProcessCollector

from llmproxy.overhead import DeferredHistogram, OverheadExporter, ProxyOverhead, Tally
from llmproxy.upstream.queue import QUEUE_WAIT_BUCKETS

log = logging.getLogger("llmproxy")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LIVE_REFRESH_INTERVAL = 1.0  # multiprocess mode: how stale a worker's live gauges may be in a scrape
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

LATENCY_MS_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000)
TTFT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
DURATION_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self, live_gauges: Callable[[], dict[str, Any]], overhead: ProxyOverhead) -> None:
        self.multiprocess = multiprocess_dir() is not None
        self._live_gauges = live_gauges
        self._shared_live: _SharedLiveGauges | None = None
        registry: CollectorRegistry | None = None
        if self.multiprocess:
            # The metrics below go to the shared files, not to a registry; a scrape merges every worker's.
            self.registry = CollectorRegistry()
            MultiProcessCollector(self.registry)
            self._shared_live = _SharedLiveGauges(live_gauges, self.flush)
        else:
            self.registry = registry = CollectorRegistry(auto_describe=True)
            registry.register(_FlushFirst(self.flush))  # whoever collects sees the deferred counts
            ProcessCollector(registry=self.registry)
            self.registry.register(_LiveCollector(live_gauges))
        # Counted by the relay in plain lists, copied into these at scrape time (and on the tick).
        self._overhead = OverheadExporter(overhead, registry)
        self._overhead_failed = False
        if self._shared_live is not None:
            self._shared_live.start()
        self.requests_total = Counter(
            "llmproxy_requests_total", "Requests handled, by backend and status code.",
            ["backend", "status"], registry=registry)
        self.latency_ms = Histogram(
            "llmproxy_latency_ms", "Request latency in milliseconds, from request head to response end.",
            ["backend"], buckets=LATENCY_MS_BUCKETS, registry=registry)
        self.ttft = Histogram(
            "llmproxy_time_to_first_token_seconds",
            "Time from the request head to the first response body byte sent to the client.",
            ["backend"], buckets=TTFT_BUCKETS, registry=registry)
        self.duration = Histogram(
            "llmproxy_request_duration_seconds", "Request duration from request head to response end.",
            ["backend"], buckets=DURATION_BUCKETS, registry=registry)
        self.terminations = Counter(
            "llmproxy_terminations_total", "Requests by termination code (see README: termination codes).",
            ["termination"], registry=registry)
        self.usage_tokens = Counter(
            "llmproxy_usage_tokens_total", "Tokens metered, by type (prompt|completion), requested model and key "
            "(key_id only when auth.metrics_per_key).", ["type", "model", "key_id"], registry=registry)
        self.usage_records = Counter(
            "llmproxy_usage_records_total", "Usage records built, by usage_source (reported|estimated).",
            ["usage_source"], registry=registry)
        self.cost = Counter(
            "llmproxy_estimated_cost_usd_total", "Cost of metered tokens at the configured prices, by model and "
            "key (key_id only when auth.metrics_per_key).", ["model", "key_id"], registry=registry)
        self.webhook_success_total = Counter(
            "llmproxy_webhook_success_total", "Usage records delivered, by reporter.", ["reporter"],
            registry=registry)
        self.webhook_failure_total = Counter(
            "llmproxy_webhook_failure_total", "Failed delivery attempts (then retried or dead-lettered).",
            ["reporter", "reason"], registry=registry)
        self.dead_letters_total = Counter(
            "llmproxy_usage_dead_letters_total", "Deliveries given up on, by reporter and reason.",
            ["reporter", "reason"], registry=registry)
        self.retries = Counter(
            "llmproxy_upstream_retries_total",
            "Attempts on another backend after a failure before any byte reached the client, by condition.",
            ["reason"], registry=registry)
        self.ejections = Counter(
            "llmproxy_backend_ejections_total", "Backends ejected by passive health checks.", ["backend"],
            registry=registry)
        self.ratelimited = Counter(
            "llmproxy_ratelimited_total", "Requests refused by a rate limit or budget, by reason "
            "(requests, tokens, concurrency, budget) and key (key_id only when auth.metrics_per_key).",
            ["reason", "key_id"], registry=registry)
        self.auth_failures = Counter(
            "llmproxy_auth_failures_total", "Requests refused for their credential, by reason (missing, "
            "unknown_key, ambiguous; a tenant JWT's expired, signature, audience, issuer...).", ["reason"],
            registry=registry)
        self.ip_denied = Counter(
            "llmproxy_ip_denied_total", "Clients refused by address: at accept, by the client a trusted proxy "
            "forwards for, or by a key's allowed_ips.", ["check"], registry=registry)
        self.store_errors = Counter(
            "llmproxy_ratelimit_store_errors_total",
            "Rate-limit store calls that failed (Redis unreachable), answered per rate_limit.on_store_error.",
            registry=registry)
        self.discovery_errors = Counter(
            "llmproxy_discovery_errors_total", "Discovery looks that failed (no DNS answer or address, an "
            "unreadable or broken endpoints file): the last known backends stay.", ["entry"], registry=registry)
        self.discovery_changes = Counter(
            "llmproxy_discovery_changes_total", "Changes of the backends a discovery entry found.", ["entry"],
            registry=registry)
        self.cache_requests = Counter(
            "llmproxy_cache_requests_total", "Requests by what the response cache did: hit (served from it), miss "
            "(sent upstream, or followed one in flight), bypass (not cacheable, or the client said no-cache).",
            ["result"], registry=registry)
        self.cache_bytes = Counter(
            "llmproxy_cache_bytes_total", "Bytes of answers stored, evicted (LRU), expired and served from the cache.",
            ["op"], registry=registry)
        self.cache_evictions = Counter(
            "llmproxy_cache_evictions_total", "Answers the memory store evicted to stay within max_size_mb.",
            registry=registry)
        self.dedup_followers = Counter(
            "llmproxy_dedup_followers_total", "Requests that followed an identical one in flight, by how their "
            "stream ended (complete, cut, truncated, gone, fallback).", ["outcome"], registry=registry)
        self.queue_wait = Histogram(
            "llmproxy_backend_queue_wait_seconds", "Time requests waited in the proxy for a slot of a backend's "
            "max_concurrent (backends with one only; 0 for those admitted at once).", ["backend"],
            buckets=QUEUE_WAIT_BUCKETS, registry=registry)
        self.outbox_pending = 0  # set after each group commit; exported by the live collector
        # Label children are looked up once per label set, then counted into by deferred tallies.
        self._deferred: list[Tally | DeferredHistogram] = []  # every one made, for flush
        self._request_children: dict[tuple[str, int], Tally] = {}
        self._backend_children: dict[str, tuple[DeferredHistogram, DeferredHistogram, DeferredHistogram]] = {}
        self._termination_children: dict[str, Tally] = {}
        self._cache_children: dict[str, Tally] = {}
        self._usage_children: dict[tuple[str, str], tuple[Tally, Tally]] = {}  # (model, key_id): prompt, completion
        self._source_children: dict[str, Tally] = {}

    def observe_request(self, backend: str, status: int, termination: str, duration: float,
                        ttft: float | None) -> None:
        """Record one finished request."""
        key = (backend, status)
        counter = self._request_children.get(key)
        if counter is None:
            counter = self._request_children[key] = self._tally(self.requests_total.labels(backend, str(status)))
        counter.n += 1
        children = self._backend_children.get(backend)
        if children is None:
            children = self._backend_children[backend] = (
                self._histogram(self.latency_ms.labels(backend), LATENCY_MS_BUCKETS),
                self._histogram(self.duration.labels(backend), DURATION_BUCKETS),
                self._histogram(self.ttft.labels(backend), TTFT_BUCKETS))
        latency_ms, duration_s, ttft_s = children
        latency_ms.observe(duration * 1000.0)
        duration_s.observe(duration)
        if ttft is not None:
            ttft_s.observe(ttft)
        if termination != "--":
            term = self._termination_children.get(termination)
            if term is None:
                term = self._termination_children[termination] = self._tally(self.terminations.labels(termination))
            term.n += 1
        if self.multiprocess:
            self._flush_deferred()  # to the shared files now: a worker killed before its tick loses nothing

    def discovery_failed(self, entry: str) -> None:
        self.discovery_errors.labels(entry).inc()

    def discovery_changed(self, entry: str) -> None:
        self.discovery_changes.labels(entry).inc()

    def observe_usage(self, record: dict[str, Any], key_id: str = "") -> None:
        """Count one usage record's tokens (and cost, when priced); `key_id` labels them ("" when not per key)."""
        model = record["model"] or ""
        key = (model, key_id)
        children = self._usage_children.get(key)
        if children is None:
            children = self._usage_children[key] = (self._tally(self.usage_tokens.labels("prompt", model, key_id)),
                                                    self._tally(self.usage_tokens.labels("completion", model, key_id)))
        prompt, completion = children
        prompt.n += record["prompt_tokens"]
        completion.n += record["completion_tokens"]
        source = record["usage_source"]
        records = self._source_children.get(source)
        if records is None:
            records = self._source_children[source] = self._tally(self.usage_records.labels(source))
        records.n += 1
        cost = record.get("cost_usd")
        if cost:
            self.cost.labels(model, key_id).inc(cost)
        if self.multiprocess:
            self._flush_deferred()

    def observe_cache(self, result: str) -> None:
        """One proxied request's cache result (hit, miss, bypass): on every request while caching is on."""
        counter = self._cache_children.get(result)
        if counter is None:
            counter = self._cache_children[result] = self._tally(self.cache_requests.labels(result))
        counter.n += 1
        if self.multiprocess:
            self._flush_deferred()

    def cache_bytes_counted(self, op: str, size: int) -> None:
        self.cache_bytes.labels(op).inc(size)
        if op == "evicted":
            self.cache_evictions.inc()

    def observe_follower(self, outcome: str) -> None:
        self.dedup_followers.labels(outcome).inc()

    def observe_retry(self, reason: str) -> None:
        self.retries.labels(reason).inc()

    def backend_ejected(self, backend: str) -> None:
        self.ejections.labels(backend).inc()

    def observe_ratelimited(self, reason: str, key_id: str = "") -> None:
        self.ratelimited.labels(reason, key_id).inc()

    def observe_auth_failure(self, reason: str) -> None:
        self.auth_failures.labels(reason).inc()

    def observe_ip_denied(self, check: str) -> None:
        self.ip_denied.labels(check).inc()

    def observe_store_error(self) -> None:
        self.store_errors.inc()

    # The hooks usage delivery calls (llmproxy.delivery.metrics.UsageMetrics).
    def webhook_success(self, reporter: str) -> None:
        self.webhook_success_total.labels(reporter).inc()

    def webhook_failure(self, reporter: str, reason: str) -> None:
        self.webhook_failure_total.labels(reporter, reason).inc()

    def outbox_depth(self, n: int) -> None:
        self.outbox_pending = n

    def dead_letter(self, reporter: str, reason: str) -> None:
        self.dead_letters_total.labels(reporter, reason).inc()

    def flush(self) -> None:
        """Copy the deferred counts, and the overhead and queue-wait histograms' new counts, into the exported
        ones (never fails a scrape)."""
        self._flush_deferred()
        try:
            self._overhead.flush()
            for name, backend in self._live_gauges()["backends"].items():
                waits = backend.get("queue_wait")  # counted in place by the backend's queue (upstream/queue.py)
                if waits is not None:
                    waits.flush(self.queue_wait.labels(name))
        except Exception:  # e.g. a prometheus_client whose Histogram internals changed: say it once
            if not self._overhead_failed:
                log.exception("exporting the overhead and queue-wait histograms failed")
            self._overhead_failed = True

    def _flush_deferred(self) -> None:
        for deferred in self._deferred:
            deferred.flush()

    def _tally(self, child: Any) -> Tally:
        tally = Tally(child)
        self._deferred.append(tally)
        return tally

    def _histogram(self, child: Any, buckets: tuple[float, ...]) -> DeferredHistogram:
        histogram = DeferredHistogram(child, buckets)
        self._deferred.append(histogram)
        return histogram

    def render(self) -> bytes:
        if self._shared_live is not None:  # one process's own registry flushes when collected (_FlushFirst)
            self.flush()
            self._shared_live.refresh()  # this worker's own gauges as of now; the others' are at most 1 s old
        return generate_latest(self.registry)


class _FlushFirst:
    """Registered first, so collected first: the deferred counts reach their metrics before these are read."""

    def __init__(self, flush: Callable[[], None]) -> None:
        self._flush = flush

    def collect(self) -> Iterator[Any]:
        self._flush()
        return iter(())

    def describe(self) -> list[Any]:
        return []


def multiprocess_dir() -> str | None:
    """The directory of multiprocess mode (set by the supervisor of several workers), or None."""
    return os.environ.get(MULTIPROC_ENV) or None


# The live gauges: (key in the state dict, name, help, multiprocess mode). Across workers the counts are
# summed; a backend is reported healthy only if every worker sends it traffic (min), and the latency and
# queue estimates each worker keeps are reported at their worst (max).
_PROCESS_GAUGES = (
    ("inflight", "llmproxy_inflight_requests", "Requests in progress.", "livesum"),
    ("streams", "llmproxy_inflight_streams", "Requests in progress that stream their response.", "livesum"),
    ("connections", "llmproxy_client_connections", "Open client connections.", "livesum"),
    ("ratelimit_held", "llmproxy_ratelimit_admissions_held",
     "Admitted requests holding rate-limit slots until they end (0 when nothing is in flight).", "livesum"),
)
_BACKEND_GAUGES = (
    ("checked_out", "llmproxy_upstream_connections_checked_out", "Upstream connections in use by a request.",
     "livesum"),
    ("idle", "llmproxy_upstream_connections_idle", "Idle pooled upstream connections.", "livesum"),
    ("inflight", "llmproxy_backend_inflight_requests", "Requests in progress per backend.", "livesum"),
    ("queued", "llmproxy_backend_queued_requests",
     "Requests waiting in the proxy for a slot of the backend's max_concurrent (backends with one only).", "livesum"),
    ("healthy", "llmproxy_backend_healthy", "1 if the backend gets traffic (healthy and not ejected), else 0.",
     "livemin"),
    ("ttft_ewma", "llmproxy_backend_ttft_ewma_seconds",
     "Peak-EWMA of time to first token, as latency_based balancing sees it.", "livemax"),
    ("queue_depth", "llmproxy_backend_queue_depth",
     "Requests waiting + running as the backend last reported (queue_depth).", "livemax"),
    ("kv_cache", "llmproxy_backend_kv_cache_usage",
     "KV-cache use (0..1) as the backend last reported it (vLLM, SGLang, or its metrics: kv_cache).", "livemax"),
)
_OUTBOX_GAUGE = ("outbox_pending", "llmproxy_usage_outbox_pending", "Usage deliveries waiting in the outbox.",
                 "livesum")


class _LiveCollector:
    """Gauges computed at scrape time from the server's counters (one process)."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = self._read()
        for key, name, help_text, _ in _PROCESS_GAUGES:
            yield GaugeMetricFamily(name, help_text, value=state[key])
        families = [(key, GaugeMetricFamily(name, help_text, labels=["backend"]))
                    for key, name, help_text, _ in _BACKEND_GAUGES]
        for backend_name, backend in state["backends"].items():
            for key, family in families:
                if backend.get(key) is not None:  # queue_depth: None until reported; queued: no queue
                    family.add_metric([backend_name], float(backend[key]))
        for _, family in families:
            yield family
        key, name, help_text, _ = _OUTBOX_GAUGE
        if key in state:
            yield GaugeMetricFamily(name, help_text, value=state[key])


class _SharedLiveGauges:
    """Multiprocess mode: this worker's live gauges, written to the shared files every second.

    "live" modes: the supervisor drops a worker's values when it exits (mark_process_dead). A periodic
    copy, not an update per request: the request path keeps paying nothing for gauges.
    """

    def __init__(self, read: Callable[[], dict[str, Any]], flush: Callable[[], None]) -> None:
        self._read = read
        self._flush = flush  # this worker's counted-in-place histograms (handles its own failures)
        self._process = [(key, Gauge(name, help_text, multiprocess_mode=mode, registry=None))
                         for key, name, help_text, mode in _PROCESS_GAUGES]
        self._backend = [(key, Gauge(name, help_text, ["backend"], multiprocess_mode=mode, registry=None))
                         for key, name, help_text, mode in _BACKEND_GAUGES]
        self._outbox: Gauge | None = None  # created when first seen: absent without usage delivery, as in one process
        self._backends: set[str] = set()
        self._failed = False

    def start(self) -> None:
        """Refresh every LIVE_REFRESH_INTERVAL on the running loop (a timer handle, not a task); no loop, no timer."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        loop.call_later(LIVE_REFRESH_INTERVAL, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self.refresh()
        loop.call_later(LIVE_REFRESH_INTERVAL, self._tick, loop)

    def refresh(self) -> None:
        self._flush()
        try:
            self._publish(self._read())
        except Exception:  # the gauges must never take the worker down; say it once, not every second
            if not self._failed:
                log.exception("publishing live gauges failed")
            self._failed = True

    def _publish(self, state: dict[str, Any]) -> None:
        for key, gauge in self._process:
            gauge.set(state[key])
        backends = state["backends"]
        for gone in self._backends - backends.keys():
            # Removed by a reload: the shared files cannot forget a label set, so it reads 0 from now on.
            for _, gauge in self._backend:
                gauge.labels(gone).set(0)
        self._backends = set(backends)
        for backend_name, backend in backends.items():
            for key, gauge in self._backend:
                if backend.get(key) is not None:
                    gauge.labels(backend_name).set(float(backend[key]))
        key, name, help_text, mode = _OUTBOX_GAUGE
        if key in state:
            if self._outbox is None:
                self._outbox = Gauge(name, help_text, multiprocess_mode=mode, registry=None)
            self._outbox.set(state[key])


