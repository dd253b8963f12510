"""A backend entry's `discovery:` block, and the endpoints file a `discovery: {file: ...}` entry names.

The endpoints file is llm-d's (its router's `file-discovery` plugin, for fleets outside Kubernetes), so one
file can feed both: a list under `endpoints:` of {name, address, port}, llm-d's own optional keys
(namespace, labels, metricsHost) accepted and unused, plus two of ours, `weight` and `models`, which llm-d
ignores. The whole file is checked: one bad entry refuses the file (a half-written file must not drop the
backends it has not reached yet).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llmproxy.config.model import BackendConfig, Config, DiscoveryConfig
from llmproxy.config.values import (
    ConfigError,
    _check_host,
    _clean_string,
    _int_at_least,
    _join,
    _parse_fields,
    _Parser,
    _positive_duration,
    _show,
    _string_list,
)

DNS_INTERVAL = 10.0  # seconds between resolutions, unless `interval` says otherwise
FILE_INTERVAL = 2.0  # seconds between looks at the file (a stat: cheap)
DNS_PORT = 53
MAX_ENDPOINTS_FILE = 1024 * 1024  # bytes, as llm-d's limit


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One member of a discovered set: where it listens, and what the file says of it (None: the entry's)."""

    host: str  # an IP address
    port: int
    name: str | None = None  # the file's name for it
    weight: int | None = None
    models: tuple[str, ...] | None = None


# The `discovery:` block --------------------------------------------------------------------------------------


def parse_discovery(value: Any, path: str) -> DiscoveryConfig:
    fields: dict[str, _Parser] = {
        "dns": _dns_name,
        "port": _port,
        "file": _path,
        "interval": _positive_duration,
        "resolver": _resolver,
    }
    values = _parse_fields(value, path, fields)
    if ("dns" in values) == ("file" in values):
        raise ConfigError(path, "give either dns (a name to resolve) or file (an endpoints file to watch)")
    if "dns" in values:
        if "port" not in values:
            raise ConfigError(_join(path, "port"), "is required with dns (the port every address listens on)")
        values.setdefault("interval", DNS_INTERVAL)
    else:
        for key in ("port", "resolver"):
            if key in values:
                raise ConfigError(_join(path, key), "applies to dns only (the file gives each address its port)")
        values.setdefault("interval", FILE_INTERVAL)
    return DiscoveryConfig(**values)


def _dns_name(value: Any, path: str) -> str:
    return _check_host(_clean_string("a DNS name")(value, path), value, path)


def _port(value: Any, path: str) -> int:
    port = _int_at_least(1)(value, path)
    if port > 65535:
        raise ConfigError(path, f"must be a port between 1 and 65535, got {port}")
    return port


def _path(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(path, f"must be a file path, got {_show(value)}")
    return value.strip()


def _resolver(value: Any, path: str) -> str:
    """ "ip:port" (port 53 when left out), IPv6 in brackets: a DNS server to ask, never a name to resolve."""
    help_text = 'must be a DNS server\'s IP address and port, like "10.96.0.10:53" or "[fd00::a]:53"'
    if not isinstance(value, str):
        raise ConfigError(path, f"{help_text}, got {_show(value)}")
    text = value.strip()
    host, port = text, str(DNS_PORT)
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(path, f"{help_text}, got {_show(value)}")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(path, f"{help_text}, got {_show(value)}") from None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(path, f"{help_text}, got {_show(value)}")
    shown = f"[{address}]" if address.version == 6 else str(address)
    return f"{shown}:{int(port)}"


def resolver_address(resolver: str) -> tuple[str, int]:
    """(ip, port) of a `resolver` value as the loader normalised it."""
    host, _, port = resolver.rpartition(":")
    return host.strip("[]"), int(port)


def default_name(discovery: DiscoveryConfig) -> str:
    """The name of an entry that gives none: its DNS name, or its file's name."""
    return discovery.dns if discovery.dns is not None else Path(discovery.file or "").name


def check_member_names(backends: list[BackendConfig], path: str) -> None:
    """No backend named as a discovery entry's members will be (<entry>@...): two backends of one name."""
    prefixes = [f"{backend.name}@" for backend in backends if backend.discovery is not None]
    for i, backend in enumerate(backends):
        taken = next((p for p in prefixes if backend.name.startswith(p)), None)
        if taken is not None:
            raise ConfigError(f"{path}[{i}].name", f"{_show(backend.name)} is how the backends discovery finds "
                                                   f"for {_show(taken[:-1])} are named: choose another name")


def check_discovery_files(config: Config, base_dir: Path) -> None:
    """Make every entry's endpoints file path absolute (relative ones start at `base_dir`) and read it once:
    a missing or broken file stops the proxy at start (and a reload) naming the key."""
    for i, backend in enumerate(config.backends):
        discovery = backend.discovery
        if discovery is None or discovery.file is None:
            continue
        discovery.file = str((base_dir / discovery.file).resolve())
        read_endpoints_file(discovery.file, f"backends[{i}].discovery.file")


# The endpoints file ------------------------------------------------------------------------------------------


def read_endpoints_file(file: str, path: str) -> tuple[Endpoint, ...]:
    """The endpoints `file` lists; raises ConfigError at `path` (the config key) with what is wrong."""
    try:
        with open(file, "rb") as handle:
            data = handle.read(MAX_ENDPOINTS_FILE + 1)
    except FileNotFoundError:
        raise ConfigError(path, f"{file}: file not found") from None
    except OSError as exc:
        raise ConfigError(path, f"{file}: cannot read the file: {exc.strerror or exc}") from None
    if len(data) > MAX_ENDPOINTS_FILE:
        raise ConfigError(path, f"{file}: larger than {MAX_ENDPOINTS_FILE // 1024} KiB")
    try:
        return parse_endpoints(yaml.safe_load(data.decode("utf-8-sig")))
    except UnicodeDecodeError:
        raise ConfigError(path, f"{file}: not valid UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise ConfigError(path, f"{file}: invalid YAML: {exc}") from None
    except ConfigError as error:
        raise ConfigError(path, f"{file}: {error}") from None


def parse_endpoints(document: Any) -> tuple[Endpoint, ...]:
    """The endpoints of a parsed endpoints file, in its order; raises ConfigError naming the bad key."""
    if not isinstance(document, dict) or "endpoints" not in document:
        # An empty document is a file caught half-written more often than a fleet emptied on purpose.
        raise ConfigError("endpoints", 'is required: the file is a mapping with a list under "endpoints" '
                                       '(an empty fleet is "endpoints: []")')
    fields = _parse_fields(document, "", {"endpoints": lambda v, p: v})
    items = fields["endpoints"]
    if items is None:
        return ()
    if not isinstance(items, list):
        raise ConfigError("endpoints", f"must be a list of {{name, address, port}}, got {_show(items)}")
    endpoints = tuple(_endpoint(item, f"endpoints[{i}]") for i, item in enumerate(items))
    _check_unique(endpoints)
    return endpoints


_IGNORED = lambda value, path: None  # noqa: E731 - llm-d's keys that mean nothing here

_ENDPOINT_FIELDS: dict[str, _Parser] = {
    "name": _clean_string("name"),
    "address": lambda value, path: _address(value, path),
    "port": lambda value, path: _port(int(value) if isinstance(value, str) and value.strip().isdigit()
                                      else value, path),
    "weight": _int_at_least(1),
    "models": lambda value, path: tuple(_string_list(value, path, "model name")),
    "namespace": _IGNORED,
    "labels": _IGNORED,
    "metricsHost": _IGNORED,
}


def _endpoint(value: Any, path: str) -> Endpoint:
    values = _parse_fields(value, path, _ENDPOINT_FIELDS)
    for required in ("address", "port"):
        if required not in values:
            raise ConfigError(_join(path, required), "is required")
    return Endpoint(host=values["address"], port=values["port"], name=values.get("name"),
                    weight=values.get("weight"), models=values.get("models"))


def _address(value: Any, path: str) -> str:
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise ConfigError(path, f"must be an IP address (names are not resolved), got {_show(value)}") from None


def _check_unique(endpoints: tuple[Endpoint, ...]) -> None:
    seen: dict[Any, int] = {}
    for i, endpoint in enumerate(endpoints):
        for key, what in (((endpoint.host, endpoint.port), "address and port"), (endpoint.name, "name")):
            if key is None:
                continue
            if (what, key) in seen:
                raise ConfigError(f"endpoints[{i}]", f"same {what} as endpoints[{seen[what, key]}]")
            seen[what, key] = i
