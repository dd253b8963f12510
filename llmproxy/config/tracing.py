"""The `tracing:` section: OpenTelemetry spans per request, exported by OTLP/HTTP (llmproxy/tracing.py).

Enabled without the otel extra installed, the proxy refuses to start (and check-config fails) rather than
run without the traces it was told to send.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any
from urllib.parse import urlsplit

from llmproxy.config.model import TracingConfig
from llmproxy.config.values import (
    ConfigError,
    _bool,
    _clean_string,
    _dataclass_from,
    _int_at_least,
    _join,
    _mapping,
    _parse_fields,
    _Parser,
    _positive_duration,
    _show,
)

_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an HTTP field name (RFC 9110 token)
OTEL_EXTRA = "pip install 'llmproxy[otel]'"


def _endpoint(value: Any, path: str) -> str:
    url = _clean_string("URL")(value, path)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(path, f'must be an http:// or https:// OTLP/HTTP traces URL like '
                                f'"http://collector:4318/v1/traces", got {_show(value)}')
    return url


def _ratio(value: Any, path: str) -> float:
    if isinstance(value, str):  # ${SAMPLE_RATIO} arrives as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ConfigError(path, f"must be a fraction from 0 to 1 (0.1 = one trace in ten), got {_show(value)}")
    return float(value)


def _headers(value: Any, path: str) -> dict[str, str]:
    headers = {}
    for name, text in _mapping(value, path).items():
        key_path = _join(path, str(name))
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise ConfigError(key_path, "is not a valid HTTP header name")
        if not isinstance(text, str | int) or any(c in str(text) for c in "\r\n\0"):
            raise ConfigError(key_path, "must be a header value on one line")  # never echoed: a credential
        headers[name] = str(text)
    return headers


_FIELDS: dict[str, _Parser] = {
    "enabled": _bool,
    "endpoint": _endpoint,
    "sample_ratio": _ratio,
    "service_name": _clean_string("service name"),
    "headers": _headers,
    "export_timeout": _positive_duration,
    "export_interval": _positive_duration,
    "max_batch_size": _int_at_least(1),
    "max_queue_size": _int_at_least(1),
}


def parse_tracing(value: Any, path: str) -> TracingConfig:
    config: TracingConfig = _dataclass_from(TracingConfig, path, _parse_fields(value, path, _FIELDS))
    if config.max_batch_size > config.max_queue_size:
        raise ConfigError(_join(path, "max_batch_size"), f"must not exceed max_queue_size ({config.max_queue_size})")
    if config.enabled and not otel_installed():
        raise ConfigError(_join(path, "enabled"), f"tracing needs the OpenTelemetry SDK and its OTLP/HTTP exporter: "
                                                  f"{OTEL_EXTRA}")
    return config


def otel_installed() -> bool:
    """Whether the otel extra's packages import (asked only when tracing is enabled)."""
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        return False
    return True
