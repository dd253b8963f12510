"""Choosing a backend for a request.

Strategies (all honour `weight`):
- round_robin / weighted: smooth weighted round robin (nginx's algorithm): over any window of
  sum(weights) picks, each backend gets exactly its weight, spread out rather than in bursts;
- least_connections: fewest in-flight requests per unit of weight, ties broken at random; the count
  covers the whole stream (released in the pipeline's `finally`), not just the response head.
latency_based is accepted in the config and served by least_connections until the balancing
release adds its TTFT-EWMA strategy.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from .errors import ProxyError

if TYPE_CHECKING:
    from .server import Backend


class Balancer:
    def __init__(self, backends: list[Backend], strategy: str) -> None:
        self.backends = backends
        self.strategy = strategy
        self._current = [0] * len(backends)
        self._total_weight = sum(b.config.weight for b in backends)
        self.choose = self._least_connections if strategy in ("least_connections", "latency_based") \
            else self._smooth_weighted

    def _smooth_weighted(self) -> Backend:
        backends = self.backends
        if not backends:
            raise ProxyError("no_backend", "no backend is configured")
        current = self._current
        best = 0
        for i, backend in enumerate(backends):
            current[i] += backend.config.weight
            if current[i] > current[best]:
                best = i
        current[best] -= self._total_weight
        return backends[best]

    def _least_connections(self) -> Backend:
        backends = self.backends
        if not backends:
            raise ProxyError("no_backend", "no backend is configured")
        best: list[Backend] = []
        best_load = 0.0
        for backend in backends:
            load = backend.in_flight / backend.config.weight
            if not best or load < best_load:
                best, best_load = [backend], load
            elif load == best_load:
                best.append(backend)
        return best[0] if len(best) == 1 else random.choice(best)
