"""Parser of the `routes:` section: rules that give the requests they match their own upstreams and strategy.

Each error names the route and key (`routes[1].strategy.upstreams[0]: no backend named "x"`). Upstream names
are checked against `backends` once the whole document is read (check_routes), since `routes:` may come first.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

from llmproxy.config.model import (
    ROUTE_STRATEGIES,
    WEIGHTED_ROUTE_STRATEGIES,
    Config,
    RouteConfig,
    RouteMatchConfig,
    RouteStrategyConfig,
    UpstreamConfig,
)
from llmproxy.config.values import (
    ConfigError,
    _choice,
    _clean_string,
    _int_at_least,
    _is_visible_ascii,
    _join,
    _parse_fields,
    _Parser,
    _show,
)
from llmproxy.http11.path import InvalidPath, canonical_target

_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def parse_routes(value: Any, path: str) -> list[RouteConfig]:
    """`routes:`, a list of {id, match, strategy}; raises ConfigError naming the route and key."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(path, f"must be a list of routes, got {_show(value)}")
    routes = [_route(item, f"{path}[{i}]") for i, item in enumerate(value)]
    first_use: dict[str, int] = {}
    for i, route in enumerate(routes):
        if route.id in first_use:
            raise ConfigError(f"{path}[{i}].id", f"duplicate route id {_show(route.id)} "
                                                 f"(already used by {path}[{first_use[route.id]}])")
        first_use[route.id] = i
    return routes


def check_routes(config: Config) -> None:
    """Every upstream a route names is a backends[].name; raises ConfigError at the upstream otherwise."""
    names = [backend.name for backend in config.backends]
    known = set(names)
    discovered = {backend.name for backend in config.backends if backend.discovery is not None}
    for i, route in enumerate(config.routes):
        for j, upstream in enumerate(route.strategy.upstreams):
            if upstream.name in discovered:
                raise ConfigError(f"routes[{i}].strategy.upstreams[{j}]",
                                  f"{_show(upstream.name)} is a discovery entry, whose backends come and go: "
                                  "a route names backends with a fixed url")
            if upstream.name not in known:
                reason = f"no backend named {_show(upstream.name)}"
                close = difflib.get_close_matches(upstream.name, names, n=1, cutoff=0.8)
                if close:
                    reason += f' (did you mean "{close[0]}"?)'
                raise ConfigError(f"routes[{i}].strategy.upstreams[{j}]", reason)


def _route(value: Any, path: str) -> RouteConfig:
    fields: dict[str, _Parser] = {"id": _clean_string("route id"), "match": _match, "strategy": _strategy}
    values = _parse_fields(value, path, fields)
    for required in ("id", "match", "strategy"):
        if required not in values:
            raise ConfigError(_join(path, required), "is required")
    return RouteConfig(**values)


# match -------------------------------------------------------------------------------------------------------


def _match(value: Any, path: str) -> RouteMatchConfig:
    if value is None:
        raise ConfigError(path, "must be a mapping of conditions (path, method, headers, json_body); "
                                "{} matches every request")
    fields: dict[str, _Parser] = {"path": _path, "method": _method, "headers": _headers, "json_body": _json_body}
    return RouteMatchConfig(**_parse_fields(value, path, fields))


def _path(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ConfigError(path, f'must be a path starting with "/" (a trailing "*" matches a prefix), '
                                f"got {_show(value)}")
    exact = value[:-1] if value.endswith("*") else value
    if "*" in exact or "?" in exact or not _is_visible_ascii(value):
        raise ConfigError(path, f'must be a path without a query, spaces or a "*" other than a last one, '
                                f"got {_show(value)}")
    try:
        canonical = canonical_target(exact.encode()).decode("latin-1")
    except InvalidPath as exc:
        raise ConfigError(path, f"{exc}, got {_show(value)}") from None
    if canonical != exact:
        # Requests are matched as the proxy made their path canonical: this one could never match.
        shown = canonical + ("*" if value.endswith("*") else "")
        raise ConfigError(path, f"requests arrive with their path made canonical: write {_show(shown)}")
    return value


def _method(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value or not set(value) <= _TOKEN_CHARS:
        raise ConfigError(path, f"must be an HTTP method like POST, got {_show(value)}")
    return value.upper()


def _headers(value: Any, path: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ConfigError(path, f"must be a mapping of header names to values, got {_show(value)}")
    headers: dict[str, str] = {}
    for name, raw in value.items():
        key_path = _join(path, str(name))
        if not isinstance(name, str) or not name or not set(name) <= _TOKEN_CHARS:
            raise ConfigError(key_path, "must be a header name (letters, digits, - and the like)")
        if isinstance(raw, int) and not isinstance(raw, bool):
            raw = str(raw)  # `x-tier: 2`: YAML's integer, a header's text
        if not isinstance(raw, str) or not all(" " <= ch <= "~" for ch in raw) or raw != raw.strip():
            raise ConfigError(key_path, f"must be the header's exact value: printable ASCII text, without "
                                        f"leading or trailing spaces, got {_show(raw)}")
        if name.lower() in headers:
            raise ConfigError(key_path, "is given twice (header names are not case-sensitive)")
        headers[name.lower()] = raw
    return headers


def _json_body(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(path, f"must be a mapping of body keys to values, got {_show(value)}")
    for key, item in value.items():
        _json_value(item, _join(path, str(key)), key)
    return value


def _json_value(value: Any, path: str, key: Any = "") -> None:
    """A value a JSON body can hold (a mapping's keys are strings, a number is finite)."""
    if not isinstance(key, str):
        raise ConfigError(path, f"a JSON key is a string, got {_show(key)} (quote it)")
    if isinstance(value, dict):
        if not value:
            raise ConfigError(path, "an empty mapping matches no field: name one, or drop the key")
        for inner_key, item in value.items():
            _json_value(item, _join(path, str(inner_key)), inner_key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _json_value(item, f"{path}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(path, f"must be a finite number, got {value!r}")
    elif not (value is None or isinstance(value, str | int | float)):
        raise ConfigError(path, f"must be a JSON value (text, number, true/false, null, list, mapping), "
                                f"got {_show(value)}")


# strategy ----------------------------------------------------------------------------------------------------


def _strategy(value: Any, path: str) -> RouteStrategyConfig:
    values = _parse_fields(value, path, {"type": _choice(ROUTE_STRATEGIES), "upstreams": _upstreams})
    for required in ("type", "upstreams"):
        if required not in values:
            raise ConfigError(_join(path, required), "is required")
    strategy = RouteStrategyConfig(**values)
    _check_shares(strategy, _join(path, "upstreams"))
    return strategy


def _upstreams(value: Any, path: str) -> list[UpstreamConfig]:
    if not isinstance(value, list) or not value:
        raise ConfigError(path, f"must be a non-empty list of backend names or {{name, weight | percentage}}, "
                                f"got {_show(value)}")
    upstreams = [_upstream(item, f"{path}[{i}]") for i, item in enumerate(value)]
    first_use: dict[str, int] = {}
    for i, upstream in enumerate(upstreams):
        if upstream.name in first_use:
            raise ConfigError(f"{path}[{i}]", f"backend {_show(upstream.name)} is listed twice "
                                              f"(already {path}[{first_use[upstream.name]}])")
        first_use[upstream.name] = i
    return upstreams


def _upstream(value: Any, path: str) -> UpstreamConfig:
    if isinstance(value, str):
        return UpstreamConfig(_clean_string("backend name")(value, path))
    fields: dict[str, _Parser] = {"name": _clean_string("backend name"), "weight": _int_at_least(1),
                                  "percentage": _percentage}
    values = _parse_fields(value, path, fields)
    if "name" not in values:
        raise ConfigError(_join(path, "name"), "is required")
    return UpstreamConfig(**values)


def _percentage(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
        raise ConfigError(path, f"must be a percentage between 0 and 100, got {_show(value)}")
    return float(value)


def _check_shares(strategy: RouteStrategyConfig, path: str) -> None:
    """Weights only where they mean something; a canary's percentages, on every upstream, summing to 100."""
    kind = strategy.type
    for i, upstream in enumerate(strategy.upstreams):
        if upstream.weight is not None and kind not in WEIGHTED_ROUTE_STRATEGIES:
            raise ConfigError(f"{path}[{i}].weight", f"has no meaning for type {kind}: weights are for "
                                                     f"{' and '.join(WEIGHTED_ROUTE_STRATEGIES)}")
        if upstream.percentage is not None and kind != "canary":
            raise ConfigError(f"{path}[{i}].percentage", f"is for type canary, not {kind}")
        if upstream.percentage is None and kind == "canary":
            raise ConfigError(f"{path}[{i}]", "a canary upstream needs its percentage: {name, percentage}")
    if kind == "canary":
        total = sum(upstream.percentage or 0.0 for upstream in strategy.upstreams)
        if not math.isclose(total, 100.0, abs_tol=1e-9):
            raise ConfigError(path, f"canary percentages must sum to 100, got {total:g}")
