"""The building blocks of config validation: ConfigError, ${ENV} expansion, scalar and field parsers.

Each field parser takes (value, path) and returns the typed value or raises ConfigError naming the path.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import json
import math
import os
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from llmproxy.config.redis_url import parse_redis_url

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


def _list_of(parse: _Parser, what: str) -> _Parser:
    """A list (null = empty) whose items `parse` checks, each error naming its index."""

    def parse_list(value: Any, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigError(path, f"must be a list of {what}, got {_show(value)}")
        return [parse(item, f"{path}[{i}]") for i, item in enumerate(value)]

    return parse_list


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
        return _unmapped(ipaddress.ip_network(text) if "/" in text else ipaddress.ip_address(text))
    except ValueError:
        pass
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ConfigError(path, f"{help_text}, got {_show(value)}") from None
    mapped = ipaddress.ip_address(text.partition("/")[0])
    if isinstance(mapped, ipaddress.IPv6Address) and mapped.ipv4_mapped is not None and network.prefixlen < 96:
        raise ConfigError(path, f"{_show(value)} is an IPv4-mapped address with a prefix shorter than /96: client "
                                f"addresses are compared as IPv4, so write an IPv4 range "
                                f"({mapped.ipv4_mapped}/N)")
    raise ConfigError(path, f"{_show(value)} has host bits set; did you mean {_unmapped(network)}?")


_IPV4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


def _unmapped(entry: ipaddress.IPv4Address | ipaddress.IPv6Address | ipaddress.IPv4Network
              | ipaddress.IPv6Network) -> str:
    """An entry, with an IPv4-mapped one (::ffff:a.b.c.d, ::ffff:a.b.c.d/N with N >= 96) as the IPv4 address or
    range it means: client addresses are compared as IPv4 (iprules.py), so as written it would match nothing."""
    if isinstance(entry, ipaddress.IPv6Address) and entry.ipv4_mapped is not None:
        return str(entry.ipv4_mapped)
    if isinstance(entry, ipaddress.IPv6Network) and entry.prefixlen >= 96 and entry.network_address in _IPV4_MAPPED:
        return f"{entry.network_address.ipv4_mapped}/{entry.prefixlen - 96}"
    return str(entry)


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


def _string_list(value: Any, path: str, what: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise ConfigError(path, f"must be a non-empty list of {what}s, got {_show(value)}")
    return [_clean_string(what)(item, f"{path}[{i}]") for i, item in enumerate(value)]


def _percent(value: Any, path: str) -> int:
    number = _int_at_least(0)(value, path)
    if number > 100:
        raise ConfigError(path, f"must be a percentage between 0 and 100, got {number}")
    return number


def format_host(host: str) -> str:
    """A host as it goes before ":port" (an IPv6 address in brackets)."""
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


def check_redis_store(store: str, url: str | None, cluster: bool, path: str, missing: str) -> None:
    """A section's store settings (rate_limit, caching): with store: redis, a valid `redis_url` (`missing` says
    what is needed without one); with any other store, no `cluster`. Raises ConfigError naming the key."""
    if store != "redis":
        if cluster:
            raise ConfigError(_join(path, "cluster"), "applies to store: redis only")
        return
    if not url:
        raise ConfigError(_join(path, "redis_url"), missing)
    try:
        parse_redis_url(url, cluster)
    except ValueError as error:
        raise ConfigError(_join(path, "redis_url"), str(error)) from None
