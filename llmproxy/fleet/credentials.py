"""A backend's API keys: sent the way its kind wants them, rotated, and rested after a 429.

Several keys for one upstream (`api_keys: [...]`) spread a fleet's traffic over the upstream's per-key rate
limits: each attempt takes the next key round robin. A key the upstream throttled (429) is skipped until
its `retry-after` has passed (a default rest when the upstream gave none); when every key rests, the one
whose rest ends first is used rather than failing locally: the upstream decides.
"""

from __future__ import annotations

from collections.abc import Callable

DEFAULT_REST = 1.0  # seconds a throttled key rests when the 429 says no retry-after
MAX_REST = 3600.0  # a retry-after beyond this is not believed


class Credentials:
    __slots__ = ("_clock", "_lines", "_next", "_resting_until")

    def __init__(self, keys: list[str], auth: str, clock: Callable[[], float]) -> None:
        template = b"x-api-key: %s\r\n" if auth == "x-api-key" else b"authorization: Bearer %s\r\n"
        self._lines = [template % key.encode() for key in keys]
        self._resting_until = [0.0] * len(keys)
        self._next = 0
        self._clock = clock

    def __bool__(self) -> bool:
        return bool(self._lines)

    @property
    def rotates(self) -> bool:
        """More than one key: a throttled one can be swapped for another."""
        return len(self._lines) > 1

    def pick(self) -> tuple[bytes, int]:
        """The header line of the key for the next attempt, and its index (b"", -1: the backend has none)."""
        lines = self._lines
        if not lines:
            return b"", -1
        if len(lines) == 1:
            return lines[0], 0
        now, resting, count = self._clock(), self._resting_until, len(lines)
        for step in range(count):
            index = (self._next + step) % count
            if resting[index] <= now:
                self._next = index + 1
                return lines[index], index
        index = min(range(count), key=resting.__getitem__)  # all rest: the one free soonest
        self._next = index + 1
        return lines[index], index

    def throttled(self, index: int, retry_after: bytes | None) -> None:
        """The key at `index` got a 429: rest it for the upstream's retry-after (seconds)."""
        if 0 <= index < len(self._lines):
            self._resting_until[index] = self._clock() + _seconds(retry_after)

    def another_available(self, index: int) -> bool:
        """Some key other than `index` is not resting: a throttled attempt is worth retrying with it (never for
        index -1, a credential not of this backend's: a tenant's own key, which no other key replaces)."""
        if index < 0:
            return False
        now = self._clock()
        return any(until <= now for i, until in enumerate(self._resting_until) if i != index)


def _seconds(retry_after: bytes | None) -> float:
    try:
        seconds = float(retry_after) if retry_after else DEFAULT_REST
    except ValueError:  # an HTTP date, or garbage: rest the default
        return DEFAULT_REST
    return min(max(seconds, 0.0), MAX_REST) if seconds == seconds else DEFAULT_REST
