"""Bring your own key: a tenant's own provider credentials, sent to a backend instead of the backend's.

A key carries them inline (`keys[].backend_keys`); a JWT tenant carries them inline too (auth.jwt.tenants) or
names an entry of auth.jwt.credentials_file in a claim, a file re-read when it changes. Requests of such a
tenant go upstream with its credential for the chosen backend, one of the tenant's own: the backend's key
rotation and 429 rests are left to the backend's own keys. A credential is never logged, recorded, nor
put in metrics: it lives in these objects (no repr shows it) and in the upstream request's bytes only. A
tenant with none for the chosen backend gets the backend's own credential, or 403 with auth.byok_missing:
refuse.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

from llmproxy.config.access import read_credentials_file
from llmproxy.config.values import ConfigError
from llmproxy.errors import ProxyError

log = logging.getLogger("llmproxy")
CHECK_EVERY = 1.0  # seconds between two looks at the credentials file's modification time


def credential_line(key: str, anthropic: bool) -> bytes:
    """The header line a backend takes its credential in (x-api-key for Anthropic's API, else Bearer)."""
    return (b"x-api-key: %s\r\n" if anthropic else b"authorization: Bearer %s\r\n") % key.encode()


class BackendKeys:
    """A tenant's own credentials, by backend name."""

    __slots__ = ("_keys", "_refuse_missing")

    def __init__(self, keys: Mapping[str, str], refuse_missing: bool) -> None:
        self._keys = keys
        self._refuse_missing = refuse_missing

    def __repr__(self) -> str:
        return f"BackendKeys(<{len(self._keys)} hidden>)"

    def keys(self) -> Mapping[str, str]:
        return self._keys

    def credential_for(self, backend: str, anthropic: bool) -> bytes | None:
        """The header line of the tenant's credential for `backend`; None: use the backend's own. Raises
        ProxyError ("byok_missing", 403) if it has none and missing ones are refused."""
        key = self.keys().get(backend)
        if key is not None:
            return credential_line(key, anthropic)
        if self._refuse_missing:
            raise ProxyError("byok_missing", "No credential of yours is configured for the backend chosen.",
                             detail=f"no BYOK credential for backend {backend}")
        return None


class FileBackendKeys(BackendKeys):
    """The credentials of one entry of a credentials file, as the file says them now."""

    __slots__ = ("_file", "_name")

    def __init__(self, file: CredentialsFile, name: str, refuse_missing: bool) -> None:
        super().__init__({}, refuse_missing)
        self._file = file
        self._name = name

    def __repr__(self) -> str:
        return f"FileBackendKeys({self._name!r})"

    def keys(self) -> Mapping[str, str]:
        return self._file.entry(self._name)


class CredentialsFile:
    """auth.jwt.credentials_file, read again when its modification time or size changes (looked at no more
    than once a second). A file that no longer parses keeps the last good entries, and the log says why once."""

    __slots__ = ("_checked_at", "_entries", "_path", "_stamp")

    def __init__(self, path: str) -> None:
        self._path = path
        self._entries: dict[str, dict[str, str]] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked_at = 0.0
        self._refresh()

    def entry(self, name: str) -> Mapping[str, str]:
        now = time.monotonic()
        if now - self._checked_at >= CHECK_EVERY:
            self._checked_at = now
            self._refresh()
        return self._entries.get(name, {})

    def _refresh(self) -> None:
        try:
            stat = os.stat(self._path)
        except OSError as error:
            stamp = None
            if self._stamp is not None:
                log.error("auth.jwt.credentials_file: cannot read %s (%s); keeping the last entries read",
                          self._path, error.strerror)
        else:
            stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp is None or stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self._entries = read_credentials_file(self._path)
        except ConfigError as error:
            log.error("auth.jwt.credentials_file: %s; keeping the last entries read", error.reason)
            return
        log.info("auth.jwt.credentials_file: read %d entries from %s", len(self._entries), self._path)
