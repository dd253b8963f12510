"""Prometheus metrics, written once per request when it ends (never per chunk).

Live gauges (in-flight requests, client connections, pool state) are read from the proxy's own
counters at scrape time by a collector, so the request path pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

LATENCY_MS_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000)
TTFT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
DURATION_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self, live_gauges: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self.registry.register(_LiveCollector(live_gauges))
        self.requests_total = Counter(
            "llmproxy_requests_total", "Requests handled, by backend and status code.",
            ["backend", "status"], registry=self.registry)
        self.latency_ms = Histogram(
            "llmproxy_latency_ms", "Request latency in milliseconds, from request head to response end.",
            ["backend"], buckets=LATENCY_MS_BUCKETS, registry=self.registry)
        self.ttft = Histogram(
            "llmproxy_time_to_first_token_seconds",
            "Time from the request head to the first response body byte sent to the client.",
            ["backend"], buckets=TTFT_BUCKETS, registry=self.registry)
        self.duration = Histogram(
            "llmproxy_request_duration_seconds", "Request duration from request head to response end.",
            ["backend"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.terminations = Counter(
            "llmproxy_terminations_total", "Requests by termination code (see README: termination codes).",
            ["termination"], registry=self.registry)
        self.usage_tokens = Counter(
            "llmproxy_usage_tokens_total", "Tokens metered, by type (prompt|completion) and requested model.",
            ["type", "model"], registry=self.registry)
        self.usage_records = Counter(
            "llmproxy_usage_records_total", "Usage records built, by usage_source (reported|estimated).",
            ["usage_source"], registry=self.registry)
        self.cost = Counter(
            "llmproxy_estimated_cost_usd_total", "Cost of metered tokens at the configured prices.",
            ["model"], registry=self.registry)
        self.webhook_success_total = Counter(
            "llmproxy_webhook_success_total", "Usage records delivered, by reporter.", ["reporter"],
            registry=self.registry)
        self.webhook_failure_total = Counter(
            "llmproxy_webhook_failure_total", "Failed delivery attempts (then retried or dead-lettered).",
            ["reporter", "reason"], registry=self.registry)
        self.dead_letters_total = Counter(
            "llmproxy_usage_dead_letters_total", "Deliveries given up on, by reporter and reason.",
            ["reporter", "reason"], registry=self.registry)
        self.retries = Counter(
            "llmproxy_upstream_retries_total",
            "Attempts on another backend after a failure before any byte reached the client, by condition.",
            ["reason"], registry=self.registry)
        self.ejections = Counter(
            "llmproxy_backend_ejections_total", "Backends ejected by passive health checks.", ["backend"],
            registry=self.registry)
        self.ratelimited = Counter(
            "llmproxy_ratelimited_total", "Requests refused by a rate limit or budget, by reason "
            "(requests, tokens, concurrency, budget) and key (key_id only when auth.metrics_per_key).",
            ["reason", "key_id"], registry=self.registry)
        self.auth_failures = Counter(
            "llmproxy_auth_failures_total", "Requests refused for a missing, unknown or ambiguous API key.",
            registry=self.registry)
        self.store_errors = Counter(
            "llmproxy_ratelimit_store_errors_total",
            "Rate-limit store calls that failed (Redis unreachable), answered per rate_limit.on_store_error.",
            registry=self.registry)
        self.outbox_pending = 0  # set after each group commit; exported by the live collector
        # Label children are looked up once per label set, then reused.
        self._request_children: dict[tuple[str, int], Any] = {}
        self._backend_children: dict[str, tuple[Any, Any, Any]] = {}
        self._termination_children: dict[str, Any] = {}

    def observe_request(self, backend: str, status: int, termination: str, duration: float,
                        ttft: float | None) -> None:
        """Record one finished request."""
        key = (backend, status)
        counter = self._request_children.get(key)
        if counter is None:
            counter = self._request_children[key] = self.requests_total.labels(backend, str(status))
        counter.inc()
        children = self._backend_children.get(backend)
        if children is None:
            children = self._backend_children[backend] = (
                self.latency_ms.labels(backend), self.duration.labels(backend), self.ttft.labels(backend))
        latency_ms, duration_s, ttft_s = children
        latency_ms.observe(duration * 1000.0)
        duration_s.observe(duration)
        if ttft is not None:
            ttft_s.observe(ttft)
        if termination != "--":
            term = self._termination_children.get(termination)
            if term is None:
                term = self._termination_children[termination] = self.terminations.labels(termination)
            term.inc()

    def observe_usage(self, record: dict[str, Any]) -> None:
        """Count one usage record's tokens (and cost, when priced)."""
        model = record["model"] or ""
        self.usage_tokens.labels("prompt", model).inc(record["prompt_tokens"])
        self.usage_tokens.labels("completion", model).inc(record["completion_tokens"])
        self.usage_records.labels(record["usage_source"]).inc()
        cost = record.get("cost_usd")
        if cost:
            self.cost.labels(model).inc(cost)

    def observe_retry(self, reason: str) -> None:
        self.retries.labels(reason).inc()

    def backend_ejected(self, backend: str) -> None:
        self.ejections.labels(backend).inc()

    def observe_ratelimited(self, reason: str, key_id: str = "") -> None:
        self.ratelimited.labels(reason, key_id).inc()

    def observe_auth_failure(self) -> None:
        self.auth_failures.inc()

    def observe_store_error(self) -> None:
        self.store_errors.inc()

    # The hooks usage delivery calls (llmproxy.usage.metrics.UsageMetrics).
    def webhook_success(self, reporter: str) -> None:
        self.webhook_success_total.labels(reporter).inc()

    def webhook_failure(self, reporter: str, reason: str) -> None:
        self.webhook_failure_total.labels(reporter, reason).inc()

    def outbox_depth(self, n: int) -> None:
        self.outbox_pending = n

    def dead_letter(self, reporter: str, reason: str) -> None:
        self.dead_letters_total.labels(reporter, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector:
    """Gauges computed at scrape time from the server's counters."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = self._read()
        yield GaugeMetricFamily("llmproxy_inflight_requests", "Requests in progress.",
                                value=state["inflight"])
        yield GaugeMetricFamily("llmproxy_client_connections", "Open client connections.",
                                value=state["connections"])
        checked_out = GaugeMetricFamily("llmproxy_upstream_connections_checked_out",
                                        "Upstream connections in use by a request.", labels=["backend"])
        idle = GaugeMetricFamily("llmproxy_upstream_connections_idle", "Idle pooled upstream connections.",
                                 labels=["backend"])
        backend_inflight = GaugeMetricFamily("llmproxy_backend_inflight_requests",
                                             "Requests in progress per backend.", labels=["backend"])
        healthy = GaugeMetricFamily("llmproxy_backend_healthy",
                                    "1 if the backend gets traffic (healthy and not ejected), else 0.",
                                    labels=["backend"])
        ttft = GaugeMetricFamily("llmproxy_backend_ttft_ewma_seconds",
                                 "Peak-EWMA of time to first token, as latency_based balancing sees it.",
                                 labels=["backend"])
        queue = GaugeMetricFamily("llmproxy_backend_queue_depth",
                                  "Requests waiting + running as the backend last reported (queue_depth).",
                                  labels=["backend"])
        for name, backend in state["backends"].items():
            checked_out.add_metric([name], backend["checked_out"])
            idle.add_metric([name], backend["idle"])
            backend_inflight.add_metric([name], backend["inflight"])
            healthy.add_metric([name], 1 if backend["healthy"] else 0)
            ttft.add_metric([name], backend["ttft_ewma"])
            if backend["queue_depth"] is not None:
                queue.add_metric([name], backend["queue_depth"])
        yield from (checked_out, idle, backend_inflight, healthy, ttft, queue)
        if "outbox_pending" in state:
            yield GaugeMetricFamily("llmproxy_usage_outbox_pending", "Usage deliveries waiting in the outbox.",
                                    value=state["outbox_pending"])
