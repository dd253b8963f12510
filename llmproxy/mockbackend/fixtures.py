"""Replaying recorded streams (`x-mock-fixture`) verbatim, one event per HTTP chunk."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import orjson

from llmproxy.mockbackend.options import BadRequest
from llmproxy.mockbackend.reply import Reply

# The mock recomputes framing itself; the recording's framing headers describe the original transfer.
_FRAMING = frozenset({"transfer-encoding", "content-length", "connection"})


def default_fixtures_dir() -> Path:
    """$LLMPROXY_FIXTURES_DIR, else the project's recorded streams, tests/fixtures/streams in the checkout."""
    env = os.environ.get("LLMPROXY_FIXTURES_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "streams"


def split_events(data: bytes, name: str) -> list[bytes]:
    """Cut a recording at event boundaries: SSE at blank lines, NDJSON at newlines.

    Joining the pieces gives `data` back byte for byte; that is what makes the replay verbatim.
    """
    separator = b"\n\n" if name.endswith(".sse") else b"\n" if name.endswith(".ndjson") else None
    if separator is None:
        return [data]
    pieces, start = [], 0
    while (end := data.find(separator, start)) != -1:
        pieces.append(data[start : end + len(separator)])
        start = end + len(separator)
    if start < len(data):
        pieces.append(data[start:])
    return pieces


@dataclass(frozen=True, slots=True)
class Fixture:
    status: int
    content_type: bytes | None
    headers: tuple[tuple[bytes, bytes], ...]
    events: tuple[bytes, ...]

    def reply(self) -> Reply:
        return Reply(status=self.status, content_type=self.content_type, events=iter(self.events),
                     headers=list(self.headers), generation=True)


class FixtureStore:
    """Loads each fixture once; tests replay the same few files many times."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory else default_fixtures_dir()
        self._cache: dict[str, Fixture] = {}

    def get(self, name: str) -> Fixture:
        """Return the fixture `name` (a bare file name). Raises BadRequest (400/404) otherwise."""
        if not name or "/" in name or "\\" in name or ".." in name:
            raise BadRequest(f"invalid fixture name {name!r}")
        fixture = self._cache.get(name)
        if fixture is None:
            fixture = self._cache[name] = self._load(name)
        return fixture

    def _load(self, name: str) -> Fixture:
        path = self.directory / name
        try:
            data = path.read_bytes()
        except OSError:
            raise BadRequest(f"fixture {name!r} not found in {self.directory}", 404) from None
        meta = {}
        meta_path = path.with_suffix(".json")
        if meta_path != path and meta_path.exists():
            meta = orjson.loads(meta_path.read_bytes()).get("http", {})
        content_type = None
        headers = []
        for key, value in meta.get("headers", {}).items():
            if key.lower() == "content-type":
                content_type = value.encode()
            elif key.lower() not in _FRAMING:
                headers.append((key.lower().encode(), str(value).encode()))
        return Fixture(status=int(meta.get("status", 200)), content_type=content_type, headers=tuple(headers),
                       events=tuple(split_events(data, name)))
