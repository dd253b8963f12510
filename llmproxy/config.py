"""Load the YAML configuration into the dataclasses of `llmproxy.config_model`, validating every key.

Validation is strict on purpose: an unknown key, a wrong type or an out-of-range value stops the proxy with a
message naming the key path (`backends[1].weight: must be a positive integer, got "abc"`). A silently ignored
typo in a timeout, or a silently ignored `auth:` section, is worse than refusing to start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import yaml

from llmproxy.config_model import (
    BACKEND_TYPES,
    LOAD_BALANCE_STRATEGIES,
    RETRY_CONDITIONS,
    BackendConfig,
    BackendTimeouts,
    Config,
    HealthCheckConfig,
    LoggingConfig,
    MetricsConfig,
    PassiveHealthConfig,
    PriceConfig,
    RoutingConfig,
    ServerConfig,
    Timeouts,
)
from llmproxy.usage.config import REPORTER_TYPES, FileReporterConfig, ReporterConfig, UsageConfig, WebhookConfig

# Sections later versions will implement: refusing them beats silently running without, say, auth.
UNSUPPORTED_SECTIONS = ("auth", "rate_limit")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """A configuration problem; `str(err)` is "<path>: <reason>"."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception pickles as cls(*args), which would lose the (path, reason) split.
        return (type(self), (self.path, self.reason))


# ---------------------------------------------------------------------------------------------------------
# Loading


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, which PyYAML otherwise resolves silently (last one wins)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        # Only this node's own keys: keys brought in by a `<<:` merge may legitimately be overridden.
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {_show(key)}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate a YAML config file."""
    name = os.fspath(path)
    try:
        text = Path(name).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(name, "file not found") from None
    except UnicodeDecodeError:
        raise ConfigError(name, "not valid UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(name, f"cannot read the file: {exc.strerror or exc}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as exc:
        raise ConfigError(name, f"invalid YAML: {_describe_yaml_error(exc)}") from None
    return parse_config(data, source=name)


def _describe_yaml_error(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"{exc.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return str(exc)


def parse_config(data: dict[str, Any] | None, *, source: str = "<config>") -> Config:
    """Validate an already-parsed YAML document. `source` names the document in document-level errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, f"must be a mapping of sections (server, backends, ...), got {_show(data)}")
    for key in data:
        if key in UNSUPPORTED_SECTIONS:
            raise ConfigError(str(key), "not supported yet by this version of llmproxy")
    values = _parse_fields(data, "", _TOP_LEVEL_FIELDS)
    if "backends" not in values:
        raise ConfigError("backends", "at least one backend is required")
    return Config(**values)


# ---------------------------------------------------------------------------------------------------------
# Environment variables


class _EnvStr(str):
    """A string from ${VAR} substitution; YAML could not type it, so int and bool fields may convert it."""

    __slots__ = ()


_ENV_RE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}$]*))?\}|\$\{")


def expand_env(text: str, path: str = "<value>") -> str:
    """Expand ${VAR} and ${VAR:-default} (default also used when VAR is empty, as in the shell).

    `$${` is a literal `${`; a default cannot contain `$` or `}`. An unset ${VAR} without default, or a
    malformed `${`, is a ConfigError at `path`.
    """
    substituted = False

    def replace(match: re.Match[str]) -> str:
        nonlocal substituted
        if match.group(0) == "$${":
            return "${"
        name, default = match.group(1), match.group(2)
        if name is None:
            raise ConfigError(path, "malformed ${...}: use ${VAR} or ${VAR:-default}; $${ is a literal ${")
        substituted = True
        value = os.environ.get(name)
        if default is not None:
            return value or default
        if value is None:
            raise ConfigError(path, f"environment variable {name} is not set")
        return value

    result = _ENV_RE.sub(replace, text)
    return _EnvStr(result) if substituted else result


def _expand(value: Any, path: str) -> Any:
    # Expansion happens on parsed string scalars, so an env value containing ':' or '#' cannot alter the YAML.
    return expand_env(value, path) if isinstance(value, str) else value


# ---------------------------------------------------------------------------------------------------------
# Scalar parsers (public ones are reused by the CLI and tests)

_DURATION_UNITS = {"us": Decimal("0.000001"), "ms": Decimal("0.001"), "s": 1, "m": 60, "h": 3600}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_DURATION_PART = re.compile(rf"({_NUMBER})\s*(us|ms|s|m|h)\s*")
_DURATION_RE = re.compile(rf"(?:{_DURATION_PART.pattern})+")
_DURATION_HELP = "must be a duration like 5s, 500ms or 2m"

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE_RE = re.compile(rf"({_NUMBER})\s*([A-Za-z]*)")
_SIZE_HELP = "must be a size like 512B, 32KiB or 10MiB"


def parse_duration(value: Any, path: str = "<duration>") -> float:
    """Seconds from a number (seconds) or a string like "250ms", "1.5s", "2m", "1h", "100us" or "1m30s"."""
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        seconds = float(value) if value < 1e18 else math.inf
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(_NUMBER, text):
            seconds = float(Decimal(text))
        elif _DURATION_RE.fullmatch(text):
            # Decimal makes "100ms" exactly float(0.1) instead of accumulating float error across parts.
            seconds = float(sum(Decimal(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text)))
    if seconds is None or not math.isfinite(seconds):
        raise ConfigError(path, f"{_DURATION_HELP}, got {_show(value)}")
    return seconds


def parse_size(value: Any, path: str = "<size>") -> int:
    """Bytes from an int or a string like "512B", "32KiB", "10MiB", "10MB" (10**6) or "1024"."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value >= 0:
            return value
    elif isinstance(value, str):
        match = _SIZE_RE.fullmatch(value.strip())
        unit = _SIZE_UNITS.get(match.group(2).lower()) if match else None
        if match and unit is not None:
            total = Decimal(match.group(1)) * unit
            if total != total.to_integral_value():
                raise ConfigError(path, f"must be a whole number of bytes, got {_show(value)}")
            return int(total)
    raise ConfigError(path, f"{_SIZE_HELP}, got {_show(value)}")


_LISTEN_RE = re.compile(r"(?:\[([^\]]*)\]|([^:\[\]]*)):(\d{1,5})")
_LABEL_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def parse_listen(value: str, path: str = "<listen>") -> tuple[str, int]:
    """(host, port) from ":8000" (all IPv4 interfaces), "127.0.0.1:0" (0 = any free port) or "[::1]:8080"."""
    help_text = 'must be "host:port" or ":port" (IPv6 in brackets: "[::1]:8080")'
    if not isinstance(value, str):
        # A bare `listen: 8000` is an int to YAML; make the fix obvious rather than guess.
        raise ConfigError(path, f'must be a quoted string like ":8000" or "127.0.0.1:8000", got {_show(value)}')
    match = _LISTEN_RE.fullmatch(value.strip())
    if not match:
        raise ConfigError(path, f"{help_text}, got {_show(value)}")
    ipv6, host, port = match.group(1), match.group(2), int(match.group(3))
    if port > 65535:
        raise ConfigError(path, f"port must be between 0 and 65535, got {port}")
    if ipv6 is not None:
        return _check_ipv6(ipv6, value, path), port
    if not host:
        return "0.0.0.0", port
    return _check_host(host, value, path), port


def _check_ipv6(host: str, shown: str, path: str) -> str:
    try:
        return str(ipaddress.IPv6Address(host))
    except ValueError:
        raise ConfigError(path, f"invalid IPv6 address in {_show(shown)}") from None


def _check_host(host: str, shown: str, path: str) -> str:
    """A hostname (underscores allowed: Docker service names use them) or an IPv4 address."""
    if re.fullmatch(r"[\d.]+", host):
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise ConfigError(path, f"invalid IPv4 address in {_show(shown)}") from None
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if len(host) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels):
        raise ConfigError(path, f"invalid host name in {_show(shown)}")
    return host.lower()


# ---------------------------------------------------------------------------------------------------------
# Field parsers: each takes (value, path) and returns the typed value or raises ConfigError.

_Parser = Callable[[Any, str], Any]


def _show(value: Any) -> str:
    """How a bad value is quoted in messages: YAML-ish, strings in double quotes, long ones truncated."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return json.dumps(value if len(value) <= 60 else value[:57] + "...", ensure_ascii=False)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"  # e.g. a YAML timestamp


def _int_at_least(minimum: int) -> _Parser:
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(value: Any, path: str) -> int:
        if isinstance(value, _EnvStr) and re.fullmatch(r"\s*\+?\d+\s*", value):
            value = int(value)
        # bool is an int subclass: `weight: true` must not mean 1.
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(path, f"must be {what}, got {_show(value)}")
        return value

    return parse


def _bool(value: Any, path: str) -> bool:
    if isinstance(value, _EnvStr) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise ConfigError(path, f"must be true or false, got {_show(value)}")
    return value


def _choice(options: tuple[str, ...]) -> _Parser:
    def parse(value: Any, path: str) -> str:
        if isinstance(value, str) and value.strip().lower() in options:
            return value.strip().lower()
        raise ConfigError(path, f"must be one of {', '.join(options)}, got {_show(value)}")

    return parse


def _positive_duration(value: Any, path: str) -> float:
    seconds = parse_duration(value, path)
    if seconds == 0:
        raise ConfigError(path, f"must be greater than 0, got {_show(value)}")  # would fail every request
    return seconds


def _optional(parse: _Parser) -> _Parser:
    return lambda value, path: None if value is None else parse(value, path)


def _size_at_least(minimum: int) -> _Parser:
    def parse(value: Any, path: str) -> int:
        size = parse_size(value, path)
        if size < minimum:
            raise ConfigError(path, f"must be at least {_format_size(minimum)}, got {_show(value)}")
        return size

    return parse


def _clean_string(what: str) -> _Parser:
    """A non-empty string without whitespace or control characters (it ends up in headers, logs, labels)."""

    def parse(value: Any, path: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(path, f"must be a non-empty {what}, got {_show(value)}")
        text = value.strip()
        if any(ch.isspace() or not ch.isprintable() for ch in text):
            raise ConfigError(path, f"must not contain whitespace or control characters, got {_show(value)}")
        return text

    return parse


def _api_key(value: Any, path: str) -> str | None:
    # Empty (e.g. "${KEY:-}") means "no key". Never echo the value: it is a secret.
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise ConfigError(path, "must be a string (quote it if YAML reads it as a number)")
    text = value.strip()
    if not _is_visible_ascii(text):
        # It becomes a header value: CR/LF would inject headers into every upstream request.
        raise ConfigError(path, "must be printable ASCII without whitespace")
    return text


def _is_visible_ascii(text: str) -> bool:
    return all("!" <= ch <= "~" for ch in text)


def _access_log(value: Any, path: str) -> str:
    if value is False:
        return "off"  # YAML 1.1 reads a bare `off` as false
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(path, f"must be stdout, stderr, off or a file path, got {_show(value)}")
    text = value.strip()
    return text.lower() if text.lower() in ("stdout", "stderr", "off") else text


def _trusted_proxies(value: Any, path: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(path, f"must be a list of IP addresses or CIDR ranges, got {_show(value)}")
    return [_trusted_proxy(_expand(item, f"{path}[{i}]"), f"{path}[{i}]") for i, item in enumerate(value)]


def _trusted_proxy(value: Any, path: str) -> str:
    help_text = "must be an IP address or a CIDR range like 10.0.0.0/8"
    if not isinstance(value, str):
        raise ConfigError(path, f"{help_text}, got {_show(value)}")
    text = value.strip()
    try:
        return str(ipaddress.ip_network(text) if "/" in text else ipaddress.ip_address(text))
    except ValueError:
        pass
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ConfigError(path, f"{help_text}, got {_show(value)}") from None
    raise ConfigError(path, f"{_show(value)} has host bits set; did you mean {network}?")


# ---------------------------------------------------------------------------------------------------------
# Sections


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _mapping(value: Any, path: str) -> dict[Any, Any]:
    if value is None:
        return {}  # an empty section (`metrics:`) means "all defaults"
    if not isinstance(value, dict):
        raise ConfigError(path or "<config>", f"must be a mapping, got {_show(value)}")
    return value


def _unknown_key(path: str, key: Any, known: dict[str, _Parser]) -> ConfigError:
    reason = "unknown key"
    close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.8)
    if close:
        reason += f' (did you mean "{close[0]}"?)'
    return ConfigError(_join(path, str(key)), reason)


def _parse_fields(data: Any, path: str, fields: dict[str, _Parser]) -> dict[str, Any]:
    """Parse the keys present in `data` (in document order, so the first problem is reported first)."""
    values: dict[str, Any] = {}
    for key, raw in _mapping(data, path).items():
        parse = fields.get(key) if isinstance(key, str) else None
        if parse is None:
            raise _unknown_key(path, key, fields)
        key_path = _join(path, key)
        values[key] = parse(_expand(raw, key_path), key_path)
    return values


def _section(cls: type, fields: dict[str, _Parser]) -> _Parser:
    return lambda value, path: cls(**_parse_fields(value, path, fields))


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
    "trusted_proxies": _trusted_proxies,
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
    return _BackendUrl(url, scheme, host, _backend_port(parts, scheme, value, path), parts.path.rstrip("/"))


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
    "type": _choice(BACKEND_TYPES),
    "api_key": _api_key,
    "max_connections": _int_at_least(1),
    "max_idle": _int_at_least(0),
    "idle_timeout": parse_duration,
    "max_waiters": _int_at_least(0),
    "tls_verify": _bool,
    "inject_usage": _bool,
    "models": _optional(lambda value, path: _string_list(value, path, "model name")),
    "timeouts": _section(BackendTimeouts, _BACKEND_TIMEOUT_FIELDS),
}


def _parse_backend(value: Any, path: str) -> BackendConfig:
    values = _parse_fields(value, path, _BACKEND_FIELDS)
    url = values.pop("url", None)
    if url is None:
        raise ConfigError(_join(path, "url"), "is required")
    backend = BackendConfig(
        url=url.url, scheme=url.scheme, host=url.host, port=url.port, base_path=url.base_path, **values
    )
    if not backend.name:
        backend.name = _default_name(backend)
    return backend


def _default_name(backend: BackendConfig) -> str:
    return f"{_format_host(backend.host)}:{backend.port}"


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
    return backends


def _non_negative_number(value: Any, path: str) -> float:
    if isinstance(value, _EnvStr):
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(path, f"must be a number >= 0, got {_show(value)}")
    return float(value)


def _dataclass_from(cls: type, path: str, values: dict[str, Any]) -> Any:
    """Build `cls`, turning its own validation (ValueError in __post_init__) into a ConfigError at `path`."""
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(path, str(exc)) from None


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


def _parse_reporters(value: Any, path: str) -> list[ReporterConfig]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(path, f"must be a list of reporters, got {_show(value)}")
    return [_parse_reporter(item, f"{path}[{i}]") for i, item in enumerate(value)]


def _parse_usage(value: Any, path: str) -> UsageConfig:
    fields: dict[str, _Parser] = {
        "enabled": _bool,
        "metering": _bool,
        "spool_dir": _clean_string("a directory"),
        "max_outbox_records": _int_at_least(1),
        "flush_interval": _positive_duration,
        "reporters": _parse_reporters,
    }
    return _dataclass_from(UsageConfig, path, _parse_fields(value, path, fields))


def _parse_pricing(value: Any, path: str) -> dict[str, PriceConfig]:
    fields: dict[str, _Parser] = {name: _non_negative_number for name in
                                  ("input_per_million", "output_per_million", "cached_input_per_million")}
    prices = {}
    for model, entry in _mapping(value, path).items():
        entry_path = _join(path, str(model))
        values = _parse_fields(entry, entry_path, fields)
        for required in ("input_per_million", "output_per_million"):
            if required not in values:
                raise ConfigError(_join(entry_path, required), "is required")
        prices[str(model)] = PriceConfig(**values)
    return prices


def _string_list(value: Any, path: str, what: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise ConfigError(path, f"must be a non-empty list of {what}s, got {_show(value)}")
    return [_clean_string(what)(item, f"{path}[{i}]") for i, item in enumerate(value)]


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


def _percent(value: Any, path: str) -> int:
    number = _int_at_least(0)(value, path)
    if number > 100:
        raise ConfigError(path, f"must be a percentage between 0 and 100, got {number}")
    return number


_ROUTING_FIELDS: dict[str, _Parser] = {
    "load_balance": _choice(LOAD_BALANCE_STRATEGIES),
    "retries": _int_at_least(0),
    "retry_on": _retry_on,
    "retry_backoff": parse_duration,
    "model_aliases": _model_aliases,
}

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
    "health_check": _section(HealthCheckConfig, _HEALTH_CHECK_FIELDS),
    "logging": _section(LoggingConfig, {"level": _choice(LOG_LEVELS), "access_log": _access_log}),
    "metrics": _section(MetricsConfig, {"enabled": _bool}),
    "usage": _parse_usage,
    "pricing": _parse_pricing,
}


# ---------------------------------------------------------------------------------------------------------
# Dumping (`llmproxy check-config`): the config-file shape, so the output is itself a loadable config.

_SECRET_NAMES = ("api_key", "secret", "key", "password", "token")
_SECRET_SUFFIXES = ("_key", "_secret", "_password", "_token")


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML, secrets replaced by "***" (None stays null)."""
    doc = {
        "server": _dump_server(cfg.server),
        "backends": [_dump_backend(backend) for backend in cfg.backends],
        "routing": dataclasses.asdict(cfg.routing),
        "health_check": dataclasses.asdict(cfg.health_check),
        "logging": dataclasses.asdict(cfg.logging),
        "metrics": dataclasses.asdict(cfg.metrics),
        "usage": _without_nones(dataclasses.asdict(cfg.usage)),
        "pricing": {model: _without_nones(dataclasses.asdict(price)) for model, price in cfg.pricing.items()},
    }
    return yaml.safe_dump(_mask_secrets(doc), sort_keys=False, default_flow_style=False, allow_unicode=True)


def _without_nones(node: Any) -> Any:
    """Drop unset optional keys so the dump loads back (null is not a valid value for most of them)."""
    if isinstance(node, dict):
        return {key: _without_nones(value) for key, value in node.items() if value is not None}
    if isinstance(node, list):
        return [_without_nones(item) for item in node]
    return node


def _dump_server(server: ServerConfig) -> dict[str, Any]:
    return {
        "listen": f"{_format_host(server.host)}:{server.port}",
        "max_connections": server.max_connections,
        "max_header_size": _format_size(server.max_header_size),
        "max_request_line": _format_size(server.max_request_line),
        "max_body_size": _format_size(server.max_body_size),
        "shutdown_timeout": _format_duration(server.shutdown_timeout),
        "trusted_proxies": list(server.trusted_proxies),
        "timeouts": {name: _format_duration(value) for name, value in dataclasses.asdict(server.timeouts).items()},
    }


def _dump_backend(backend: BackendConfig) -> dict[str, Any]:
    derived = ("scheme", "host", "port", "base_path")  # recomputed from url on load
    doc = {key: value for key, value in dataclasses.asdict(backend).items() if key not in derived}
    doc["idle_timeout"] = _format_duration(backend.idle_timeout)
    doc["timeouts"] = {
        name: None if value is None else _format_duration(value) for name, value in doc["timeouts"].items()
    }
    return doc


def _mask_secrets(node: Any) -> Any:
    if isinstance(node, list):
        return [_mask_secrets(item) for item in node]
    if not isinstance(node, dict):
        return node
    masked: dict[str, Any] = {}
    for key, value in node.items():
        if value is not None and (key in _SECRET_NAMES or key.endswith(_SECRET_SUFFIXES)):
            masked[key] = "***"
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


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _format_duration(seconds: float) -> str:
    """Shortest of "250ms"/"30s"/"1.5s" that parses back to exactly `seconds`."""
    candidates = []
    if seconds == int(seconds):
        candidates.append(f"{int(seconds)}s")
    if (ms := round(seconds * 1000)) and seconds < 1:
        candidates.append(f"{ms}ms")
    candidates.append(f"{Decimal(repr(seconds)):f}s")
    return next(text for text in candidates if parse_duration(text) == seconds)


def _format_size(size: int) -> str:
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"
