"""Which backend produced a Responses API response, so that a follow-up naming it goes there.

A backend keeps the responses it produced in its own memory (vLLM, Ollama): a request with
`previous_response_id` can only be served by that backend. The proxy remembers the backend of each response
it relayed (the id read off the stream or the body), in a bounded map whose oldest entries are forgotten
first; a follow-up whose id it does not know (forgotten, or produced before a restart) is balanced as usual.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Protocol, TypeVar

DEFAULT_CAPACITY = 100_000  # responses remembered: ~100 bytes each, 10 MB at most


class Named(Protocol):
    name: str


B = TypeVar("B", bound=Named)


class ResponseAffinity:
    __slots__ = ("_capacity", "_homes")

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._capacity = capacity
        self._homes: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._homes)

    def remember(self, response_id: str, backend: str) -> None:
        """`backend` (its name) produced the response `response_id`."""
        homes = self._homes
        homes[response_id] = backend
        homes.move_to_end(response_id)
        if len(homes) > self._capacity:
            homes.popitem(last=False)

    def home_of_follow_up(self, body: Any, candidates: list[B]) -> list[B]:
        """`candidates` narrowed to the backend that stored the response a request continues
        (`previous_response_id`), when that backend is known and among them; else all of them."""
        previous = body.get("previous_response_id") if isinstance(body, dict) else None
        home = self.backend_of(previous) if isinstance(previous, str) else None
        if home is None:
            return candidates
        return [backend for backend in candidates if backend.name == home] or candidates

    def backend_of(self, response_id: str) -> str | None:
        """The name of the backend that produced `response_id`, or None if it is not known."""
        backend = self._homes.get(response_id)
        if backend is not None:
            self._homes.move_to_end(response_id)  # a conversation going on stays remembered
        return backend
