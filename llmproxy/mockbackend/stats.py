"""What the mock observed (served at GET /_mock/stats) and the gates tests release events with."""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

MAX_RECORDS = 100
MAX_LOGGED_BODY = 4096


@dataclass(slots=True)
class RequestRecord:
    """One request as received, and how its response ended (filled in when it ends)."""

    id: int
    method: str
    path: str
    headers: list[list[str]]
    body_sha256: str
    body: str  # decoded with replacement, first 4 KiB
    status: int | None = None
    outcome: str | None = None  # complete | client_disconnect | reset | server_close
    response_body_sha256: str | None = None  # of the payload written, framing removed
    response_bytes: int = 0
    api_key: str | None = None  # the key the request carried (x-api-key, else Authorization: Bearer)


def api_key(headers: dict[str, str]) -> str:
    """The API key a request carries: x-api-key, else an Authorization: Bearer token ("" if neither).

    Anthropic's API takes a key in either header: the classic clients send x-api-key, its current SDKs Bearer.
    """
    key = headers.get("x-api-key")
    if key:
        return key
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class MockStats:
    """Counters and the log of the last requests. Control endpoints (/_mock/*) are not counted."""

    def __init__(self) -> None:
        self.open_connections = 0
        self.requests_running = 0  # generations whose response head went out
        self.requests_waiting = 0  # generations still inside their first-byte delay
        self.reset()

    def reset(self) -> None:
        """Zero the counters and the log; live gauges (open connections, running, waiting) stay."""
        self.requests_total = 0
        self.connections_total = 0
        self.client_disconnects_midstream = 0  # lost while a response body was being sent
        self.client_disconnects_before_response = 0  # lost after the request, before the response head
        self.last_disconnect_monotonic: float | None = None  # time.monotonic() of either kind of loss
        self.resets_sent = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.prefix_cache_queries_total = 0  # prompt tokens looked up in the prefix-cache model
        self.prefix_cache_hits_total = 0  # of those, the tokens found cached
        self.requests: deque[RequestRecord] = deque(maxlen=MAX_RECORDS)
        self._next_id = 0

    def record_request(self, method: str, path: str, headers: list[tuple[str, str]],
                       body: bytes) -> RequestRecord:
        self.requests_total += 1
        self._next_id += 1
        record = RequestRecord(
            id=self._next_id, method=method, path=path, headers=[[n, v] for n, v in headers],
            body_sha256=hashlib.sha256(body).hexdigest(),
            body=body[:MAX_LOGGED_BODY].decode("utf-8", "replace"), api_key=api_key(dict(headers)) or None,
        )
        self.requests.append(record)
        return record

    def gauges(self) -> tuple[int, int, int, int]:
        return (self.requests_running, self.requests_waiting, self.prompt_tokens_total,
                self.generation_tokens_total)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests_total": self.requests_total,
            "connections_total": self.connections_total,
            "open_connections": self.open_connections,
            "client_disconnects_midstream": self.client_disconnects_midstream,
            "client_disconnects_before_response": self.client_disconnects_before_response,
            "last_disconnect_monotonic": self.last_disconnect_monotonic,
            "resets_sent": self.resets_sent,
            "requests_running": self.requests_running,
            "requests_waiting": self.requests_waiting,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "prefix_cache_queries_total": self.prefix_cache_queries_total,
            "prefix_cache_hits_total": self.prefix_cache_hits_total,
            "requests": [asdict(r) for r in self.requests],
        }


class Gate:
    """Counts releases of one x-mock-gate token; a release may arrive before anyone waits for it."""

    __slots__ = ("released", "waiters")

    def __init__(self) -> None:
        self.released = 0
        self.waiters: deque[Callable[[], None]] = deque()

    def take(self) -> bool:
        """Consume one release if there is one."""
        if self.released:
            self.released -= 1
            return True
        return False

    def wait(self, wake: Callable[[], None]) -> None:
        self.waiters.append(wake)

    def forget(self, wake: Callable[[], None]) -> None:
        if wake in self.waiters:
            self.waiters.remove(wake)

    def release(self) -> Callable[[], None] | None:
        """Add one release; return the waiter to wake (the caller schedules it), if any."""
        self.released += 1
        return self.waiters.popleft() if self.waiters else None
