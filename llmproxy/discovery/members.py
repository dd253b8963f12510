"""The backends a discovery entry stands for: one per member found, with the entry's settings."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from llmproxy.config.discovery import Endpoint
from llmproxy.config.model import BackendConfig
from llmproxy.config.values import format_host


def expand(backends: list[BackendConfig], members: Mapping[str, tuple[Endpoint, ...]]) -> list[BackendConfig]:
    """`backends` with each discovery entry replaced by its members (by `members[entry name]`; none yet: none),
    in the config's order, each entry's members in their own (sorted) order."""
    expanded: list[BackendConfig] = []
    for backend in backends:
        if backend.discovery is None:
            expanded.append(backend)
        else:
            expanded.extend(member_config(backend, endpoint) for endpoint in members.get(backend.name, ()))
    return expanded


def member_config(entry: BackendConfig, endpoint: Endpoint) -> BackendConfig:
    """The backend `endpoint` is: the entry's settings, plain http to its address, named
    <entry>@<address>:<port> (its identity: a backend kept across changes keeps its pool and health); the
    weight and models of the endpoints file when it gives them."""
    host = format_host(endpoint.host)
    return dataclasses.replace(
        entry, name=f"{entry.name}@{host}:{endpoint.port}", url=f"http://{host}:{endpoint.port}", scheme="http",
        host=endpoint.host, port=endpoint.port, base_path="", discovery=None,
        weight=endpoint.weight if endpoint.weight is not None else entry.weight,
        models=list(endpoint.models) if endpoint.models is not None else entry.models)
