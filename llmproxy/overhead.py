"""The time the proxy itself adds, measured in-process on every request and every chunk.

Three histograms, each the difference of two monotonic clock reads:
- request: the client's request complete (and its turn come, when pipelined) -> written to the backend. This
  is everything the proxy does before the backend sees the request: parsing, routing, rate-limit
  admission (a Redis round trip with the shared store) and getting an upstream connection (a connect when
  none is idle). A retry's time is not counted;
- first byte: the upstream read that brought the first response bytes -> those bytes written to the client;
- chunk: every later upstream read -> its bytes written to the client.

The chunk one runs per upstream read, where `prometheus_client`'s `observe` (a lock, a loop over the
buckets, about 2 us) would cost more than the relay itself. So each is counted in a plain list of bucket
counts here (one `bisect`, one increment, one add) and copied into a real Prometheus histogram at scrape
time, and in multiprocess mode also on the one-second tick that publishes the live gauges.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from prometheus_client import CollectorRegistry, Histogram

# From 10 us (a chunk relayed by a warm process) to 100 ms (a stalled event loop).
OVERHEAD_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)

HISTOGRAMS = (
    ("request", "llmproxy_proxy_request_overhead_seconds",
     "Time from the client's request fully read to the request written to the backend."),
    ("first_byte", "llmproxy_proxy_first_byte_overhead_seconds",
     "Time from the first upstream response bytes read to their write to the client."),
    ("chunk", "llmproxy_proxy_chunk_overhead_seconds",
     "Time from each later upstream read to its write to the client (one per upstream read)."),
)


class OverheadHistogram:
    """Bucket counts and a sum, cheap to update; `flush` adds what is new to a Prometheus histogram."""

    __slots__ = ("_bounds", "_flushed", "_flushed_sum", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = OVERHEAD_BUCKETS) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self._flushed = [0] * (len(bounds) + 1)
        self._flushed_sum = 0.0

    def observe(self, seconds: float) -> None:
        # Prometheus buckets are "less or equal": bisect_left finds the first bound >= seconds.
        self.counts[bisect_left(self._bounds, seconds)] += 1
        self.sum += seconds

    def flush(self, target: Histogram) -> None:
        """Add the observations made since the last flush to `target` (same buckets)."""
        # prometheus_client has no public "add n to a bucket"; _buckets/_sum are its per-bucket
        # (non-cumulative) values, the same ones observe() increments, in one process or in the shared files.
        buckets: list[Any] = target._buckets
        for i, (now, before) in enumerate(zip(self.counts, self._flushed, strict=True)):
            if now != before:
                buckets[i].inc(now - before)
                self._flushed[i] = now
        if self.sum != self._flushed_sum:
            target._sum.inc(self.sum - self._flushed_sum)
            self._flushed_sum = self.sum


class Tally:
    """A counter child's increments, kept as a plain number and added to it by `flush` (like OverheadHistogram):
    prometheus_client's own `inc` takes a lock and four Python calls, on every request."""

    __slots__ = ("_flushed", "_target", "n")

    def __init__(self, target: Any) -> None:
        self._target = target
        self.n = 0.0
        self._flushed = 0.0

    def flush(self) -> None:
        if self.n != self._flushed:
            self._target.inc(self.n - self._flushed)
            self._flushed = self.n


class DeferredHistogram(OverheadHistogram):
    """An OverheadHistogram bound to the Prometheus histogram child it is flushed into (same buckets)."""

    __slots__ = ("_target",)

    def __init__(self, target: Any, bounds: tuple[float, ...]) -> None:
        super().__init__(bounds)
        self._target = target

    def flush(self, target: Histogram | None = None) -> None:  # type: ignore[override]
        super().flush(self._target if target is None else target)


class ProxyOverhead:
    """The three histograms of one process; the relay and the pipeline observe into them."""

    __slots__ = ("chunk", "first_byte", "request")

    def __init__(self) -> None:
        self.request = OverheadHistogram()
        self.first_byte = OverheadHistogram()
        self.chunk = OverheadHistogram()


class OverheadExporter:
    """The Prometheus side: one histogram per kind, fed by `flush` (called at scrape time and on the tick)."""

    def __init__(self, overhead: ProxyOverhead, registry: CollectorRegistry | None) -> None:
        self._pairs = [(getattr(overhead, key), Histogram(name, help_text, buckets=OVERHEAD_BUCKETS,
                                                          registry=registry))
                       for key, name, help_text in HISTOGRAMS]

    def flush(self) -> None:
        for local, exported in self._pairs:
            local.flush(exported)


def server_timing(seconds: float) -> bytes:
    """The `Server-Timing` header line for the proxy's own time on a response."""
    return b"server-timing: proxy;dur=%.3f\r\n" % (seconds * 1000.0)
