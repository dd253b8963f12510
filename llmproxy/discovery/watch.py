"""The members of every discovery entry, kept current by one task per entry.

Each task looks every `interval` (resolves the name, or stats the endpoints file and reads it when it
changed) and, when the set differs from the last one, keeps the new set and calls `on_change`: the server
then builds the next fleet from it, as a reload does. A failed look (no answer, no address, an unreadable
or broken file) keeps the last known set: a DNS hiccup or a half-written file never empties the fleet. It is
logged once, when the failing starts, and once more when it ends, and counted (llmproxy_discovery_errors_total).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Protocol

from llmproxy.config.discovery import Endpoint, read_endpoints_file, resolver_address
from llmproxy.config.model import BackendConfig, DiscoveryConfig
from llmproxy.config.values import ConfigError, format_host
from llmproxy.discovery.resolve import ResolveError, resolve

log = logging.getLogger("llmproxy")
FIRST_LOOK_TIMEOUT = 10.0  # seconds start-up (or a reload) waits for a new entry's first set


class DiscoveryEvents(Protocol):
    def discovery_failed(self, entry: str) -> None: ...
    def discovery_changed(self, entry: str) -> None: ...


class LookFailed(Exception):
    """This look found no usable set; the message says why, for the log."""


class Discovery:
    """The sets of members found so far, by entry name; the server owns it for the life of the process."""

    def __init__(self, on_change: Callable[[], None], events: DiscoveryEvents | None = None) -> None:
        self._on_change = on_change
        self._events = events
        self._watchers: dict[str, _Watcher] = {}

    def members(self) -> dict[str, tuple[Endpoint, ...]]:
        """The last known set of each entry (empty until its first successful look)."""
        return {name: watcher.members for name, watcher in self._watchers.items()}

    async def configure(self, backends: list[BackendConfig]) -> None:
        """Watch the discovery entries of `backends`: an entry kept with the same settings keeps its watcher
        and set; a new or changed one is looked at once (bounded) before this returns."""
        wanted = {b.name: b.discovery for b in backends if b.discovery is not None}
        replaced: dict[str, _Watcher] = {}
        for name in [name for name, w in self._watchers.items() if wanted.get(name) != w.config]:
            replaced[name] = old = self._watchers.pop(name)
            old.stop()
        new = [_Watcher(name, config, self._changed, self._events) for name, config in wanted.items()
               if name not in self._watchers]
        for watcher in new:
            old = replaced.get(watcher.name)
            if old is not None and old.same_source(watcher.config):
                watcher.members = old.members  # only how it looks changed: a failed first look keeps the set
        if new:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(w.look() for w in new)), FIRST_LOOK_TIMEOUT)
        for watcher in new:
            self._watchers[watcher.name] = watcher
            watcher.start()

    def stop(self) -> None:
        for watcher in self._watchers.values():
            watcher.stop()
        self._watchers = {}

    def _changed(self, watcher: _Watcher) -> None:
        if self._watchers.get(watcher.name) is watcher:  # not one being replaced by a reload
            self._on_change()


class _Watcher:
    def __init__(self, name: str, config: DiscoveryConfig, changed: Callable[[_Watcher], None],
                 events: DiscoveryEvents | None) -> None:
        self.name = name
        self.config = config
        self.members: tuple[Endpoint, ...] = ()
        self._changed = changed
        self._events = events
        self._failing = False
        self._file_seen: tuple[int, int, int] | None = None  # the file's (inode, size, mtime) last read
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    def same_source(self, config: DiscoveryConfig) -> bool:
        """`config` looks at what this watcher looks at (the same name and port, or the same file)."""
        return (config.dns, config.port, config.file) == (self.config.dns, self.config.port, self.config.file)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval)
            try:
                if await self.look():
                    self._changed(self)
            except Exception:  # a bug in a look must not end the watch
                log.exception("discovery for backend %s failed", self.name)

    async def look(self) -> bool:
        """Look once; True when the set changed."""
        try:
            found = await (self._resolve() if self.config.dns is not None else self._read_file())
        except LookFailed as failure:
            if not self._failing:
                self._failing = True
                log.warning("discovery for backend %s: %s; keeping its %d known backends", self.name, failure,
                            len(self.members))
            if self._events is not None:
                self._events.discovery_failed(self.name)
            return False
        if self._failing:
            self._failing = False
            log.warning("discovery for backend %s works again", self.name)
        if found is None or found == self.members:
            return False
        self._log_change(found)
        self.members = found
        if self._events is not None:
            self._events.discovery_changed(self.name)
        return True

    async def _resolve(self) -> tuple[Endpoint, ...]:
        config = self.config
        assert config.dns is not None and config.port is not None
        server = resolver_address(config.resolver) if config.resolver is not None else None
        try:
            addresses = await resolve(config.dns, config.port, server)
        except ResolveError as error:
            raise LookFailed(str(error)) from None
        return tuple(Endpoint(host=address, port=config.port) for address in addresses)

    async def _read_file(self) -> tuple[Endpoint, ...] | None:
        """The file's endpoints, or None when it has not changed since it was last read."""
        file = self.config.file
        assert file is not None
        try:
            stat = os.stat(file)  # follows symlinks: a ConfigMap's swapped ..data link is a change
        except OSError as exc:
            raise LookFailed(f"{file}: {exc.strerror or exc}") from None
        seen = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if seen == self._file_seen:
            return None
        try:
            endpoints = await asyncio.to_thread(read_endpoints_file, file, "discovery.file")
        except ConfigError as error:
            raise LookFailed(error.reason) from None
        self._file_seen = seen
        return endpoints

    def _log_change(self, found: tuple[Endpoint, ...]) -> None:
        before, after = {(e.host, e.port) for e in self.members}, {(e.host, e.port) for e in found}
        added, removed = sorted(after - before), sorted(before - after)
        log.info("discovery for backend %s: %d backends (added %s; removed %s%s)", self.name, len(found),
                 _show(added), _show(removed), "; weights or models changed" if added == removed == [] else "")


def _show(addresses: list[tuple[str, int]]) -> str:
    return ", ".join(f"{format_host(host)}:{port}" for host, port in addresses) or "none"
