"""What is live in this process across configuration generations: requests in flight, and draining."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(eq=False, slots=True)
class Traffic:
    inflight: int = 0  # requests in progress, the proxy's own endpoints excepted (read by /health, drain)
    # SIGTERM: /ready answers 503 at once, while the proxy serves on for server.shutdown_delay so that a load
    # balancer stops sending first; then it drains.
    leaving: bool = False
    draining: bool = False  # new connections refused, every response closes its connection
