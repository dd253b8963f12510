"""Configuration of usage delivery: plain dataclasses, durations in seconds (float).

The YAML loader (elsewhere) builds these; `__post_init__` validates what a typo would otherwise turn
into a silent delivery failure at runtime (bad secret, duplicate reporter names, missing sub-section).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

REPORTER_TYPES = ("webhook", "file")
SECRET_PREFIX = "whsec_"
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an HTTP field name (RFC 9110 token)
# Headers the webhook client owns: a user override would break framing, signing or deduplication.
RESERVED_HEADERS = frozenset({
    "host", "content-length", "content-type", "transfer-encoding", "connection",
    "webhook-id", "webhook-timestamp", "webhook-signature",
})


@dataclass(slots=True)
class WebhookConfig:
    url: str
    timeout: float = 3.0  # whole attempt: connect + send + response
    secret: str | None = None  # Standard Webhooks: "whsec_<base64>", or any other string used as raw UTF-8 key
    headers: dict[str, str] = field(default_factory=dict)
    max_attempts: int = 3  # total attempts for non-retryable answers (4xx other than 408/429)
    max_age: float = 259200.0  # retryable failures are retried this long after the record was created (72 h)
    concurrency: int = 4  # attempts in flight for this reporter
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    retry: int | None = None  # seed compatibility: an alias of max_attempts

    def __post_init__(self) -> None:
        if self.retry is not None:
            self.max_attempts = self.retry
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"webhook.url must be an http:// or https:// URL with a host, got {self.url!r}")
        if self.timeout <= 0 or self.max_age <= 0 or self.backoff_base <= 0 or self.backoff_cap <= 0:
            raise ValueError("webhook timeout, max_age, backoff_base and backoff_cap must be positive")
        if self.max_attempts < 1 or self.concurrency < 1:
            raise ValueError("webhook.max_attempts and webhook.concurrency must be at least 1")
        for name, value in self.headers.items():
            if not _TOKEN.fullmatch(name) or any(c in value for c in "\r\n\0"):
                raise ValueError(f"webhook.headers: invalid header {name!r}: {value!r}")
        reserved = sorted(name for name in self.headers if name.lower() in RESERVED_HEADERS)
        if reserved:
            raise ValueError(f"webhook.headers may not set {', '.join(reserved)}: the client sets them")
        if self.secret is not None:
            signing_key(self.secret)  # fail at load time, not at the first delivery


@dataclass(slots=True)
class FileReporterConfig:
    path: str  # JSON lines, appended; parent directories are created


@dataclass(slots=True)
class ReporterConfig:
    name: str
    type: str
    enabled: bool = True
    webhook: WebhookConfig | None = None
    file: FileReporterConfig | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("usage reporter name must not be empty")
        if self.type not in REPORTER_TYPES:
            raise ValueError(f"usage reporter {self.name!r}: type must be one of {REPORTER_TYPES}, got {self.type!r}")
        if self.type == "webhook" and self.webhook is None:
            raise ValueError(f"usage reporter {self.name!r}: type webhook needs a webhook section")
        if self.type == "file" and self.file is None:
            raise ValueError(f"usage reporter {self.name!r}: type file needs a file section")


@dataclass(slots=True)
class UsageConfig:
    enabled: bool = False
    metering: bool = True  # meter responses and build records (metrics); false: no body rewriting, no records
    spool_dir: str = "./usage-spool"
    reporters: list[ReporterConfig] = field(default_factory=list)
    max_outbox_records: int = 1_000_000  # pending rows (one per record and reporter); see outbox.py for the policy
    flush_interval: float = 0.1  # group commit period: the most a SIGKILL can lose

    def __post_init__(self) -> None:
        names = [reporter.name for reporter in self.reporters]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            # The reporter name keys the outbox rows: two reporters sharing it would steal each other's rows.
            raise ValueError(f"usage reporter names must be unique, repeated: {', '.join(duplicates)}")
        if self.max_outbox_records < 1:
            raise ValueError("usage.max_outbox_records must be at least 1")
        if not 0 < self.flush_interval <= 10:
            raise ValueError("usage.flush_interval must be in (0, 10] seconds")

    def active_reporters(self) -> list[ReporterConfig]:
        return [reporter for reporter in self.reporters if reporter.enabled] if self.enabled else []


def signing_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret: base64 after "whsec_", else the raw UTF-8 bytes."""
    if not secret.startswith(SECRET_PREFIX):
        if not secret:
            raise ValueError("webhook.secret must not be empty")
        return secret.encode()
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("webhook.secret: the part after whsec_ is not valid base64") from exc
    if not key:
        raise ValueError("webhook.secret: empty key after whsec_")
    return key
