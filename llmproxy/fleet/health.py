"""Health: active probes, model discovery and queue-depth polling per backend, and passive ejection.

Active: every `interval` each backend is probed the way its kind expects (vLLM/TGI `GET /health`, Ollama
`GET /api/version`, openai `GET /v1/models`); `unhealthy_threshold` failures in a row mark it unhealthy,
`healthy_threshold` passes bring it back, so one lost probe never takes a backend out.

Passive (outlier ejection, as Envoy does it): `consecutive_failures` failed requests in a row (connect
errors, resets, first-byte timeouts, 5xx) eject a backend for `base_ejection_time` times the number of
ejections in a row, at most `max_ejection_time`; never more than `max_ejection_percent` of the backends at
once. A backend the probes saw go down and come back is un-ejected at once: it was restarted.

The first probe round at start (and after a reload) decides directly, without thresholds: a backend that
is down when the proxy starts gets no traffic until it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from time import monotonic
from typing import TYPE_CHECKING, Protocol

from llmproxy.fleet.introspect import check_health, detect_apis, detect_kind, fetch_load, fetch_models
from llmproxy.fleet.probe import ProbeError

if TYPE_CHECKING:
    from llmproxy.config.model import HealthCheckConfig
    from llmproxy.fleet.backend import Backend

log = logging.getLogger("llmproxy")


class HealthEvents(Protocol):
    def backend_ejected(self, backend: str) -> None: ...


class HealthMonitor:
    def __init__(self, backends: list[Backend], config: HealthCheckConfig, poll_queue_depth: bool,
                 events: HealthEvents | None = None) -> None:
        self.backends = backends
        self.config = config
        self.poll_queue_depth = poll_queue_depth
        self._events = events
        self._loop = asyncio.get_running_loop()
        self._tasks: list[asyncio.Task] = []
        self._said_no_metrics: set[str] = set()

    # Lifecycle ------------------------------------------------------------------------------------

    async def discover(self, only: list[Backend] | None = None) -> None:
        """The first round: kinds, models, health and load of every backend (or of `only` those), concurrently.

        Bounded by two probe timeouts: a backend that does not answer is left to the periodic checks.
        """
        backends = self.backends if only is None else only
        first_round = asyncio.gather(*(self._refresh(b, with_models=True, first=True) for b in backends))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(first_round, 2 * self.config.timeout)

    def start(self) -> None:
        self._tasks = [self._loop.create_task(self._watch(b)) for b in self.backends]

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []

    async def _watch(self, backend: Backend) -> None:
        next_models = monotonic() + self.config.models_interval
        while True:
            await asyncio.sleep(self.config.interval)
            with_models = monotonic() >= next_models
            if with_models:
                next_models = monotonic() + self.config.models_interval
            try:
                await self._refresh(backend, with_models)
            except Exception:  # a probe bug must not end the watch over this backend
                log.exception("health check of backend %s failed", backend.name)

    async def _refresh(self, backend: Backend, with_models: bool, first: bool = False) -> None:
        try:
            await self._check(backend, with_models, first)
        except ProbeError as error:
            if not error.local:
                raise
            # Out of file descriptors ourselves: the backend is as healthy as before, as far as we know.
            log.warning("health check of backend %s skipped: %s", backend.name, error)

    async def _check(self, backend: Backend, with_models: bool, first: bool) -> None:
        timeout = self.config.timeout
        if backend.kind == "auto":  # detected once: a flaky answer later must not turn Ollama into "openai"
            try:
                backend.set_kind(await detect_kind(backend.config, timeout))
                with_models = True
            except ProbeError as error:
                if error.local:
                    raise
                self._probe_result(backend, False, f"cannot tell what server it is: {error}", first)
                return
        if self.config.enabled:
            passed, reason = await check_health(backend.config, backend.kind, timeout)
            self._probe_result(backend, passed, reason, first)
        if with_models or backend.models is None:
            await self._refresh_models(backend, timeout)
        if self.poll_queue_depth:
            await self._refresh_queue_depth(backend, timeout)

    async def _refresh_models(self, backend: Backend, timeout: float) -> None:
        try:
            backend.set_models(await fetch_models(backend.config, backend.kind, timeout))
        except ProbeError as error:
            log.debug("backend %s: model list not refreshed: %s", backend.name, error)
        if backend.config.apis is None:  # what this release serves, where it documents its routes
            try:
                apis = await detect_apis(backend.config, backend.kind, timeout)
            except ProbeError as error:
                log.debug("backend %s: its APIs not read again: %s", backend.name, error)
                return
            if apis is not None and apis != backend.detected_apis:
                log.info("backend %s serves %s", backend.name, ", ".join(sorted(apis)) or "none of the APIs")
            backend.set_detected_apis(apis)

    async def _refresh_queue_depth(self, backend: Backend, timeout: float) -> None:
        try:
            load = await fetch_load(backend.config, backend.kind, timeout)
        except ProbeError as error:
            load = None  # balanced on our own in-flight count until the next report
            if error.status == 501 and backend.name not in self._said_no_metrics:
                self._said_no_metrics.add(backend.name)  # once: it will not change until the engine restarts
                log.warning("backend %s serves no /metrics (%s; llama.cpp needs --metrics): queue_depth balances "
                            "it on the proxy's own in-flight count", backend.name, error)
        backend.queue_depth = load.queue_depth if load is not None else None
        backend.kv_cache_usage = load.kv_cache if load is not None else None
        backend.queue_depth_in_flight = backend.in_flight

    # Active verdicts ------------------------------------------------------------------------------

    def _probe_result(self, backend: Backend, passed: bool, reason: str, first: bool) -> None:
        if passed:
            backend.probe_passes += 1
            backend.probe_failures = 0
            backend.last_error = ""
            if not backend.healthy and (first or backend.probe_passes >= self.config.healthy_threshold):
                self._mark_healthy(backend)
        else:
            backend.probe_failures += 1
            backend.probe_passes = 0
            backend.last_error = reason
            if backend.healthy and (first or backend.probe_failures >= self.config.unhealthy_threshold):
                backend.healthy = False
                log.warning("backend %s is unhealthy: %s", backend.name, reason)

    def _mark_healthy(self, backend: Backend) -> None:
        backend.healthy = True
        backend.failures = 0
        if backend.ejected_until:
            backend.ejected_until = 0.0  # it went down and came back: a restart, not an outlier any more
            backend.ejections = 0
        log.warning("backend %s is healthy again", backend.name)

    # Passive ejection: called by the pipeline for every attempt ----------------------------------

    def request_succeeded(self, backend: Backend) -> None:
        backend.failures = 0
        if backend.ejections and self._loop.time() > backend.ejected_until + self.config.passive.base_ejection_time:
            backend.ejections = 0  # back long enough: the next ejection starts short again

    def request_failed(self, backend: Backend) -> None:
        passive = self.config.passive
        if not passive.enabled:
            return
        backend.failures += 1
        now = self._loop.time()
        if backend.failures < passive.consecutive_failures or now < backend.ejected_until:
            return
        if self._ejected_count(now) >= self._max_ejected():
            return  # too many out already: the rest must keep serving, even if badly
        backend.ejections += 1
        duration = min(passive.base_ejection_time * backend.ejections, passive.max_ejection_time)
        backend.ejected_until = now + duration
        backend.failures = 0
        log.warning("backend %s ejected for %.0fs after %d consecutive failures", backend.name, duration,
                    passive.consecutive_failures)
        if self._events is not None:
            self._events.backend_ejected(backend.name)

    def _ejected_count(self, now: float) -> int:
        return sum(1 for b in self.backends if b.ejected_until > now)

    def _max_ejected(self) -> int:
        percent = self.config.passive.max_ejection_percent
        return max(1, len(self.backends) * percent // 100) if percent else 0

