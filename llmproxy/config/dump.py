"""`llmproxy check-config` output: the resolved config in the config-file shape, secrets masked."""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml

from llmproxy.config.model import BackendConfig, Config, RouteConfig, ServerConfig
from llmproxy.config.values import _format_duration, _format_size, format_host

# ---------------------------------------------------------------------------------------------------------
# Dumping (`llmproxy check-config`): the config-file shape, so the output is itself a loadable config.

_SECRET_NAMES = ("api_key", "secret", "key", "password", "token")
_SECRET_SUFFIXES = ("_key", "_secret", "_password", "_token")


# Duration keys outside `server` and `backends` (which format their own): printed as durations ("25ms", "5s"),
# as the file would say them, never as bare numbers of seconds.
_DURATIONS = {
    "routing": ("retry_backoff",),
    "translation": ("ping_interval",),
    "health_check": ("interval", "timeout", "models_interval"),
    "passive": ("base_ejection_time", "max_ejection_time"),
    "usage": ("flush_interval",),
    "recount": ("timeout",),
    "webhook": ("timeout", "max_age", "backoff_base", "backoff_cap"),
    "tracing": ("export_timeout", "export_interval"),
    "jwt": ("leeway", "jwks_refresh", "jwks_timeout"),
}


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML, secrets replaced by "***" (None stays null)."""
    doc = {
        "server": _dump_server(cfg.server),
        "backends": [_dump_backend(backend) for backend in cfg.backends],
        "routing": dataclasses.asdict(cfg.routing),
        "routes": [],  # filled after the durations: a body field named "timeout" is no duration of ours
        "translation": dataclasses.asdict(cfg.translation),
        "health_check": dataclasses.asdict(cfg.health_check),
        "auth": _without_nones(dataclasses.asdict(cfg.auth)),
        "security": dataclasses.asdict(cfg.security),
        "rate_limit": _dump_rate_limit(cfg),
        "logging": dataclasses.asdict(cfg.logging),
        "metrics": dataclasses.asdict(cfg.metrics),
        "usage": _without_nones(dataclasses.asdict(cfg.usage)),
        "pricing": {model: _without_nones(dataclasses.asdict(price)) for model, price in cfg.pricing.items()},
        # Header values are a collector's credentials: masked whatever their names.
        "tracing": {**dataclasses.asdict(cfg.tracing), "headers": dict.fromkeys(cfg.tracing.headers, "***")},
    }
    _format_durations(doc)
    doc["routes"] = [_dump_route(route) for route in cfg.routes]
    doc["caching"] = _dump_caching(cfg)  # after the durations, as routes: its strategies' bodies are no durations
    return yaml.safe_dump(_mask_secrets(doc), sort_keys=False, default_flow_style=False, allow_unicode=True)


def _format_durations(node: Any, section: str = "") -> None:
    """Rewrite the duration keys of _DURATIONS wherever their section appears (nested sections included)."""
    if isinstance(node, list):
        for item in node:
            _format_durations(item, section)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key in _DURATIONS.get(section, ()) and isinstance(value, int | float):
                node[key] = _format_duration(value)
            else:
                _format_durations(value, key)


def _dump_rate_limit(cfg: Config) -> dict[str, Any]:
    doc = dataclasses.asdict(cfg.rate_limit)
    doc["global"] = doc.pop("global_limits")
    return doc


def _without_nones(node: Any) -> Any:
    """Drop unset optional keys so the dump loads back (null is not a valid value for most of them)."""
    if isinstance(node, dict):
        return {key: _without_nones(value) for key, value in node.items() if value is not None}
    if isinstance(node, list):
        return [_without_nones(item) for item in node]
    return node


def _dump_server(server: ServerConfig) -> dict[str, Any]:
    return {
        "listen": f"{format_host(server.host)}:{server.port}",
        "max_connections": server.max_connections,
        "max_header_size": _format_size(server.max_header_size),
        "max_request_line": _format_size(server.max_request_line),
        "max_body_size": _format_size(server.max_body_size),
        "shutdown_timeout": _format_duration(server.shutdown_timeout),
        "shutdown_delay": _format_duration(server.shutdown_delay),
        "trusted_proxies": list(server.trusted_proxies),
        "workers": server.workers,
        "timeouts": {name: _format_duration(value) for name, value in dataclasses.asdict(server.timeouts).items()},
    }


def _dump_backend(backend: BackendConfig) -> dict[str, Any]:
    derived = ("scheme", "host", "port", "base_path")  # recomputed from url on load
    doc = {key: value for key, value in dataclasses.asdict(backend).items() if key not in derived}
    for unset in ("api_keys", "apis", "discovery"):
        if doc[unset] is None:
            del doc[unset]
    if backend.discovery is not None:  # no url: discovery finds the addresses
        del doc["url"]
        doc["discovery"] = _without_nones(doc["discovery"])
        doc["discovery"]["interval"] = _format_duration(backend.discovery.interval)
    if "apis" in doc:
        doc["apis"] = sorted(doc["apis"])
    doc["idle_timeout"] = _format_duration(backend.idle_timeout)
    doc["queue_timeout"] = _format_duration(backend.queue_timeout)
    doc["timeouts"] = {
        name: None if value is None else _format_duration(value) for name, value in doc["timeouts"].items()
    }
    return doc


def _dump_route(route: RouteConfig) -> dict[str, Any]:
    """A route as the file says it: unset conditions left out, an upstream without a share by its name alone."""
    upstreams = [upstream.name if upstream.weight is None and upstream.percentage is None
                 else _without_nones(dataclasses.asdict(upstream)) for upstream in route.strategy.upstreams]
    match = {key: value for key, value in dataclasses.asdict(route.match).items() if value not in (None, {})}
    return {"id": route.id, "match": match, "strategy": {"type": route.strategy.type, "upstreams": upstreams}}


def _dump_caching(cfg: Config) -> dict[str, Any]:
    doc = _without_nones(dataclasses.asdict(cfg.caching))
    doc["strategies"] = [
        _without_nones({"id": strategy.id, "ttl_seconds": strategy.ttl_seconds,
                        "match": {key: value for key, value in dataclasses.asdict(strategy.match).items()
                                  if value not in (None, {})}})
        for strategy in cfg.caching.strategies]
    return doc


def _mask_secrets(node: Any) -> Any:
    if isinstance(node, list):
        return [_mask_secrets(item) for item in node]
    if not isinstance(node, dict):
        return node
    masked: dict[str, Any] = {}
    for key, value in node.items():
        # Secrets are strings: `per_key: {...}` or `metrics_per_key: false` are settings, not secrets.
        if isinstance(value, str) and (key in _SECRET_NAMES or key.endswith(_SECRET_SUFFIXES)):
            masked[key] = "***"
        elif key == "api_keys" and isinstance(value, list):
            masked[key] = ["***" for _ in value]
        elif key == "backend_keys" and isinstance(value, dict):  # BYOK: backend name -> a tenant's credential
            masked[key] = {name: "***" for name in value}
        elif isinstance(value, str) and key.endswith("url"):
            masked[key] = _mask_url_credentials(value)
        else:
            masked[key] = _mask_secrets(value)
    return masked


def _mask_url_credentials(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    if not sep or "@" not in netloc:
        return url
    return f"{scheme}://***@{netloc.rpartition('@')[2]}{slash}{tail}"


