"""What is live in this process across configuration generations: requests in flight, and draining."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(eq=False, slots=True)
class Traffic:
    inflight: int = 0  # requests in progress, the proxy's own endpoints excepted (read by /health, drain)
    draining: bool = False  # SIGTERM: new connections refused, every response closes its connection
