"""Parsers of the config sections: server, backends, routing, health_check, usage, pricing (routes: routes.py)."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from llmproxy.catalogue import AUTO, BACKEND_KINDS, FAMILIES, TRANSLATE_MODES
from llmproxy.config.access import parse_auth, parse_rate_limit, parse_security
from llmproxy.config.caching import parse_caching
from llmproxy.config.discovery import check_member_names, default_name, parse_discovery
from llmproxy.config.model import (
    REPORTER_TYPES,
    RETRY_CONDITIONS,
    AutoRuleConfig,
    BackendConfig,
    BackendMetricsConfig,
    BackendTimeouts,
    FileReporterConfig,
    HealthCheckConfig,
    LoggingConfig,
    MetricsConfig,
    PassiveHealthConfig,
    PrefixAffinityConfig,
    PriceConfig,
    RecountConfig,
    ReporterConfig,
    RoutingConfig,
    ServerConfig,
    Timeouts,
    TranslationConfig,
    UsageConfig,
    WebhookConfig,
)
from llmproxy.config.routes import parse_routes
from llmproxy.config.tracing import parse_tracing
from llmproxy.config.values import (
    LOG_LEVELS,
    ConfigError,
    _access_log,
    _api_key,
    _bool,
    _check_host,
    _check_ipv6,
    _choice,
    _clean_string,
    _dataclass_from,
    _int_at_least,
    _is_visible_ascii,
    _join,
    _list_of,
    _mapping,
    _non_negative_number,
    _optional,
    _parse_fields,
    _Parser,
    _percent,
    _positive_duration,
    _section,
    _show,
    _size_at_least,
    _string_list,
    _trusted_proxies,
    format_host,
    parse_duration,
    parse_listen,
)
from llmproxy.fleet.balancer import STRATEGIES

_TIMEOUT_FIELDS: dict[str, _Parser] = {f.name: _positive_duration for f in dataclasses.fields(Timeouts)}
_BACKEND_TIMEOUT_FIELDS: dict[str, _Parser] = {
    f.name: _optional(_positive_duration) for f in dataclasses.fields(BackendTimeouts)
}

_SERVER_FIELDS: dict[str, _Parser] = {
    "listen": parse_listen,
    "max_connections": _int_at_least(1),
    "max_header_size": _size_at_least(1024),  # below this, ordinary browser/SDK heads are refused
    "max_request_line": _size_at_least(1),
    "max_body_size": _size_at_least(1),
    "shutdown_timeout": parse_duration,
    "shutdown_delay": parse_duration,
    "trusted_proxies": _trusted_proxies,
    "workers": _int_at_least(1),
    "timeouts": _section(Timeouts, _TIMEOUT_FIELDS),
}


def _parse_server(value: Any, path: str) -> ServerConfig:
    values = _parse_fields(value, path, _SERVER_FIELDS)
    listen = values.pop("listen", None)
    server = ServerConfig(**values)
    if listen is not None:
        server.host, server.port = listen
    return server


class _BackendUrl(NamedTuple):
    url: str
    scheme: str
    host: str
    port: int
    base_path: str


def _metric_names(value: Any, path: str) -> list[str]:
    """One Prometheus sample name or a list of them (they are summed)."""
    return _string_list([value] if isinstance(value, str) else value, path, "metric name")


def _backend_metrics(value: Any, path: str) -> BackendMetricsConfig:
    fields: dict[str, _Parser] = {"queued": _metric_names, "running": _metric_names,
                                  "kv_cache": _clean_string("a metric name")}
    metrics = _dataclass_from(BackendMetricsConfig, path, _parse_fields(value, path, fields))
    if not (metrics.queued or metrics.running or metrics.kv_cache):
        raise ConfigError(path, "names no metric: give queued, running and/or kv_cache")
    return metrics


def _backend_url(value: Any, path: str) -> _BackendUrl:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(path, f'must be a URL like "http://vllm:8000", got {_show(value)}')
    url = value.strip()
    if "@" in url.partition("://")[2].partition("/")[0]:
        # Checked first and never echoed: it holds a password.
        raise ConfigError(path, "must not contain credentials (user:password@); use api_key instead")
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed "[" around an IPv6 address
        raise ConfigError(path, f"invalid URL {_show(value)}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not url.lower().startswith(f"{scheme}://"):
        raise ConfigError(path, f"must be an http:// or https:// URL, got {_show(value)}")
    if not _is_visible_ascii(url):
        # The base path is sent as-is in request lines.
        raise ConfigError(path, f"must be printable ASCII without spaces (percent-encode), got {_show(value)}")
    if "?" in url or "#" in url:
        raise ConfigError(path, f"must not have a query string or fragment, got {_show(value)}")
    host = _backend_host(parts.netloc, value, path)
    base_path = parts.path.rstrip("/")
    if base_path.lower().endswith("/v1"):
        # Clients' paths already start with /v1 and go to the backend as they are: /v1/v1/chat/completions.
        fixed = url[: len(url) - len(parts.path)] + base_path[: -len("/v1")]
        raise ConfigError(path, f"ends in /v1, which every forwarded path already starts with (the backend "
                                f"would get /v1/v1/...): use {_show(fixed)}")
    return _BackendUrl(url, scheme, host, _backend_port(parts, scheme, value, path), base_path)


def _backend_host(netloc: str, shown: str, path: str) -> str:
    hostport = netloc.rsplit(":", 1)[0] if not netloc.endswith("]") else netloc
    if hostport.startswith("["):
        if not hostport.endswith("]"):
            raise ConfigError(path, f"invalid IPv6 address in {_show(shown)}")
        return _check_ipv6(hostport[1:-1], shown, path)
    if not hostport:
        raise ConfigError(path, f"must include a host, got {_show(shown)}")
    return _check_host(hostport, shown, path)


def _backend_port(parts: Any, scheme: str, shown: str, path: str) -> int:
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is None:
        return 443 if scheme == "https" else 80
    if not 1 <= port <= 65535:
        raise ConfigError(path, f"invalid port in {_show(shown)}")
    return port


_BACKEND_FIELDS: dict[str, _Parser] = {
    "url": _backend_url,
    "name": _clean_string("name"),
    "weight": _int_at_least(1),
    "type": _choice((AUTO, *BACKEND_KINDS)),
    "api_key": _api_key,
    "api_keys": _optional(lambda value, path: _api_keys(value, path)),
    "apis": _optional(lambda value, path: _apis(value, path)),
    "anthropic_version": _clean_string("an anthropic-version date"),
    "max_connections": _optional(_int_at_least(1)),
    "max_idle": _optional(_int_at_least(0)),
    "idle_timeout": parse_duration,
    "max_waiters": _int_at_least(0),
    "max_concurrent": _optional(_int_at_least(1)),
    "queue_timeout": parse_duration,
    "tls_verify": _bool,
    "inject_usage": _bool,
    "models": _optional(lambda value, path: _string_list(value, path, "model name")),
    "metrics": _optional(lambda value, path: _backend_metrics(value, path)),
    "cost_per_million_input_tokens": _optional(_non_negative_number),
    "cost_per_million_output_tokens": _optional(_non_negative_number),
    "timeouts": _section(BackendTimeouts, _BACKEND_TIMEOUT_FIELDS),
    "discovery": _optional(parse_discovery),
}
_COSTS = ("cost_per_million_input_tokens", "cost_per_million_output_tokens")


def _api_keys(value: Any, path: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise ConfigError(path, "must be a non-empty list of keys")
    keys = [_api_key(item, f"{path}[{i}]") for i, item in enumerate(value)]
    for i, key in enumerate(keys):
        if key is None:
            raise ConfigError(f"{path}[{i}]", "is empty")
    return [key for key in keys if key is not None]


def _apis(value: Any, path: str) -> frozenset[str]:
    names = _string_list(value, path, "API")
    for i, name in enumerate(names):
        if name not in FAMILIES:
            raise ConfigError(f"{path}[{i}]", f"unknown API {_show(name)}; expected some of {', '.join(FAMILIES)}")
    return frozenset(names)


def _parse_backend(value: Any, path: str) -> BackendConfig:
    values = _parse_fields(value, path, _BACKEND_FIELDS)
    url = values.pop("url", None)
    if values.get("discovery") is not None:
        return _discovered_entry(values, url, path)
    if url is None:
        raise ConfigError(_join(path, "url"), "is required")
    _check_keys(values, path)
    backend = BackendConfig(
        url=url.url, scheme=url.scheme, host=url.host, port=url.port, base_path=url.base_path, **values
    )
    if not backend.name:
        backend.name = _default_name(backend)
    return backend


def _discovered_entry(values: dict[str, Any], url: _BackendUrl | None, path: str) -> BackendConfig:
    """An entry that stands for the backends its discovery finds: plain http to each address found."""
    if url is not None:
        raise ConfigError(_join(path, "url"), "give url or discovery, not both (discovery finds the addresses)")
    _check_keys(values, path)
    backend = BackendConfig(url="", **values)
    if not backend.name:
        backend.name = default_name(values["discovery"])
    if "@" in backend.name:
        raise ConfigError(_join(path, "name"), f'must not contain "@" (its backends are named '
                                               f'<name>@<address>:<port>), got {_show(backend.name)}')
    return backend


def _check_keys(values: dict[str, Any], path: str) -> None:
    if values.get("api_key") is not None and values.get("api_keys") is not None:
        raise ConfigError(_join(path, "api_keys"), "give api_key or api_keys, not both")
    given = [values.get(cost) is not None for cost in _COSTS]
    if any(given) and not all(given):
        missing = _COSTS[given.index(False)]
        raise ConfigError(_join(path, missing), f"is required with {_COSTS[given.index(True)]} (give both prices)")


def _default_name(backend: BackendConfig) -> str:
    return f"{format_host(backend.host)}:{backend.port}"


def _parse_backends(value: Any, path: str) -> list[BackendConfig]:
    if value is None or value == []:
        raise ConfigError(path, "at least one backend is required")
    if not isinstance(value, list):
        raise ConfigError(path, f"must be a list of backends, got {_show(value)}")
    backends = [_parse_backend(item, f"{path}[{i}]") for i, item in enumerate(value)]
    first_use: dict[str, int] = {}
    for i, backend in enumerate(backends):
        if backend.name in first_use:
            earlier = f"{path}[{first_use[backend.name]}]"
            reason = f"duplicate backend name {_show(backend.name)} (already used by {earlier})"
            if backend.name == _default_name(backend):
                reason += "; names default to host:port, so give each backend a distinct name"
            raise ConfigError(f"{path}[{i}].name", reason)
        first_use[backend.name] = i
    check_member_names(backends, path)
    return backends


_WEBHOOK_FIELDS: dict[str, _Parser] = {
    "url": _clean_string("a URL"),
    "timeout": _positive_duration,
    "secret": _optional(_clean_string("a secret")),
    "headers": lambda value, path: {str(k): str(v) for k, v in _mapping(value, path).items()},
    "max_attempts": _int_at_least(1),
    "retry": _int_at_least(1),
    "max_age": _positive_duration,
    "concurrency": _int_at_least(1),
    "backoff_base": _positive_duration,
    "backoff_cap": _positive_duration,
}


def _parse_reporter(value: Any, path: str) -> ReporterConfig:
    fields: dict[str, _Parser] = {
        "name": _clean_string("a name"),
        "type": _choice(REPORTER_TYPES),
        "enabled": _bool,
        "webhook": lambda v, p: _dataclass_from(WebhookConfig, p, _parse_fields(v, p, _WEBHOOK_FIELDS)),
        "file": lambda v, p: _dataclass_from(FileReporterConfig, p,
                                             _parse_fields(v, p, {"path": _clean_string("a path")})),
    }
    values = _parse_fields(value, path, fields)
    for required in ("name", "type"):
        if required not in values:
            raise ConfigError(_join(path, required), "is required")
    return _dataclass_from(ReporterConfig, path, values)


_parse_reporters = _list_of(_parse_reporter, "reporters")


def _parse_usage(value: Any, path: str) -> UsageConfig:
    fields: dict[str, _Parser] = {
        "enabled": _bool,
        "metering": _bool,
        "spool_dir": _clean_string("a directory"),
        "max_outbox_records": _int_at_least(1),
        "flush_interval": _positive_duration,
        "reporters": _parse_reporters,
        "recount": _section(RecountConfig, {"enabled": _bool, "timeout": _positive_duration,
                                            "concurrency": _int_at_least(1), "max_pending": _int_at_least(0)}),
    }
    return _dataclass_from(UsageConfig, path, _parse_fields(value, path, fields))


def _parse_pricing(value: Any, path: str) -> dict[str, PriceConfig]:
    fields: dict[str, _Parser] = {name: _non_negative_number for name in
                                  ("input_per_million", "output_per_million", "cached_input_per_million",
                                   "cache_write_per_million")}
    prices = {}
    for model, entry in _mapping(value, path).items():
        entry_path = _join(path, str(model))
        values = _parse_fields(entry, entry_path, fields)
        for required in ("input_per_million", "output_per_million"):
            if required not in values:
                raise ConfigError(_join(entry_path, required), "is required")
        prices[str(model)] = PriceConfig(**values)
    return prices


def _retry_on(value: Any, path: str) -> list[str]:
    if value == []:
        return []  # never retry, not even a refused connection
    conditions = _string_list([str(v) if isinstance(v, int) else v for v in value]
                              if isinstance(value, list) else value, path, "condition")
    for i, condition in enumerate(conditions):
        if condition not in RETRY_CONDITIONS:
            raise ConfigError(f"{path}[{i}]", f"unknown condition {_show(condition)}; "
                                              f"expected one of {', '.join(RETRY_CONDITIONS)}")
    return conditions


def _model_aliases(value: Any, path: str) -> dict[str, str]:
    aliases = {}
    for alias, target in _mapping(value, path).items():
        alias_path = _join(path, str(alias))
        aliases[_clean_string("a model name")(alias, alias_path)] = _clean_string("a model name")(target, alias_path)
    for alias, target in aliases.items():
        if target in aliases:
            raise ConfigError(_join(path, alias), f"aliases {_show(target)}, itself an alias: name the real model")
    return aliases


_ROUTING_FIELDS: dict[str, _Parser] = {
    "load_balance": _choice(tuple(STRATEGIES)),
    "retries": _int_at_least(0),
    "retry_on": _retry_on,
    "retry_backoff": parse_duration,
    "model_aliases": _model_aliases,
    "translate": _choice(TRANSLATE_MODES),
    "kv_cache_threshold": lambda value, path: _fraction(value, path),
    "auto": lambda value, path: _auto_rules(value, path),
    "prefix_affinity": _section(PrefixAffinityConfig, {"key_chars": _int_at_least(1),
                                                       "epsilon": lambda value, path: _positive_number(value, path),
                                                       "session_header": _clean_string("a header name")}),
}


def _auto_rules(value: Any, path: str) -> list[AutoRuleConfig]:
    if not isinstance(value, list):
        raise ConfigError(path, "must be a list of {model, when} rules, cheapest model first")
    return [_auto_rule(rule, f"{path}[{i}]") for i, rule in enumerate(value)]


def _auto_rule(value: Any, path: str) -> AutoRuleConfig:
    fields = _parse_fields(value, path, {"model": _clean_string("a model name"),
                                          "when": lambda v, p: _parse_fields(v, p, _AUTO_CONDITIONS)})
    if "model" not in fields:
        raise ConfigError(_join(path, "model"), "is required")
    return AutoRuleConfig(model=fields["model"], **fields.get("when", {}))


_AUTO_CONDITIONS: dict[str, _Parser] = {"max_prompt_tokens": _int_at_least(1), "max_output_tokens": _int_at_least(1),
                                        "needs_tools": _bool, "needs_images": _bool}


def _fraction(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < value <= 1.0:
        raise ConfigError(path, f"must be a fraction above 0 and at most 1, got {_show(value)}")
    return float(value)


def _positive_number(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(path, f"must be a number above 0, got {_show(value)}")
    return float(value)

_PASSIVE_FIELDS: dict[str, _Parser] = {
    "enabled": _bool,
    "consecutive_failures": _int_at_least(1),
    "base_ejection_time": _positive_duration,
    "max_ejection_time": _positive_duration,
    "max_ejection_percent": _percent,
}

_HEALTH_CHECK_FIELDS: dict[str, _Parser] = {
    "enabled": _bool,
    "interval": _positive_duration,
    "timeout": _positive_duration,
    "healthy_threshold": _int_at_least(1),
    "unhealthy_threshold": _int_at_least(1),
    "models_interval": _positive_duration,
    "passive": _section(PassiveHealthConfig, _PASSIVE_FIELDS),
}

_TOP_LEVEL_FIELDS: dict[str, _Parser] = {
    "server": _parse_server,
    "backends": _parse_backends,
    "routing": _section(RoutingConfig, _ROUTING_FIELDS),
    "routes": parse_routes,
    "translation": _section(TranslationConfig, {"ping_interval": _positive_duration,
                                                "default_max_tokens": _int_at_least(1)}),
    "health_check": _section(HealthCheckConfig, _HEALTH_CHECK_FIELDS),
    "auth": parse_auth,
    "security": parse_security,
    "rate_limit": parse_rate_limit,
    "logging": _section(LoggingConfig, {"level": _choice(LOG_LEVELS), "access_log": _access_log}),
    "metrics": _section(MetricsConfig, {"enabled": _bool}),
    "usage": _parse_usage,
    "pricing": _parse_pricing,
    "tracing": parse_tracing,
    "caching": parse_caching,
}


