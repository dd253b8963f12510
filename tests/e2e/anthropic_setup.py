"""What the Anthropic Messages end-to-end modules share: mocks of the three engines that serve /v1/messages, a
proxy in front of them with API keys, limits and usage records, and the helpers to read what each side saw.

Each module starts its own set (`running`, from a module-scoped fixture): one proxy per module, routing by model.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anthropic

from tests.support import (
    NO_PERIODIC_PROBES,
    Proc,
    free_port,
    mock_stats,
    start_mock,
    start_proxy,
    usage_config,
    usage_records,
    wait_for,
)

DIALECTS = ("vllm", "ollama", "llamacpp")  # the engines that serve Anthropic's Messages API
MODELS = {dialect: f"claude-{dialect}" for dialect in DIALECTS}  # one model per engine: the proxy routes by it
DEAD_MODEL = "claude-nobody-home"  # served only by a backend that refuses connections
KEY = "sk-ant-e2e-claude-code-0123456789"
LIMITED_KEY = "sk-ant-e2e-one-request-a-minute-0123"  # one request, then 429 for a minute
NARROW_KEY = "sk-ant-e2e-vllm-model-only-01234567"  # may use the vLLM engine's model only
CLIENT_TIMEOUT = 10.0


@dataclass
class Setup:
    proxy: Proc
    mocks: dict[str, Proc]
    directory: Path  # the proxy's config, access log and usage records
    key: str = KEY


def running(directory: Path) -> Iterator[Setup]:
    """Start the three mocks and the proxy, yield them, stop them all whatever happened."""
    started: list[Proc] = []
    try:
        mocks = {}
        for dialect in DIALECTS:
            mocks[dialect] = start_mock(dialect, "--model", MODELS[dialect])
            started.append(mocks[dialect])
        started.append(start_proxy(directory, backends(mocks), **proxy_sections(directory)))
        yield Setup(started[-1], mocks, directory)
    finally:
        for proc in reversed(started):
            proc.stop()


def backends(mocks: dict[str, Proc]) -> list[dict]:
    # Kinds and models given, not detected: the first request needs no probe to have answered.
    engines = [{"url": mock.url, "name": dialect, "type": dialect, "models": [MODELS[dialect]]}
               for dialect, mock in mocks.items()]
    dead = {"url": f"http://127.0.0.1:{free_port()}", "name": "dead", "type": "vllm", "models": [DEAD_MODEL]}
    return [*engines, dead]


def proxy_sections(directory: Path) -> dict[str, dict]:
    return {
        "auth": {"enabled": True, "keys": [
            {"key": KEY, "user_id": "claude-code"},
            {"key": LIMITED_KEY, "user_id": "limited", "rate_limit": {"requests_per_minute": 1, "burst": 1}},
            {"key": NARROW_KEY, "user_id": "narrow", "models": [MODELS["vllm"]]},
        ]},
        "rate_limit": {"enabled": True},  # no limit but LIMITED_KEY's own
        "usage": usage_config(directory),
        "health_check": NO_PERIODIC_PROBES,
    }


def claude(setup: Setup, key: str = KEY) -> anthropic.Anthropic:
    """The SDK pointed at the proxy. No retries: a failure must show, not be papered over."""
    return anthropic.Anthropic(base_url=setup.proxy.url, api_key=key, max_retries=0, timeout=CLIENT_TIMEOUT)


def tagged() -> tuple[str, dict[str, str]]:
    """A fresh X-Request-Id and the headers that send it: the proxy forwards it to the engine and puts it on
    the request's usage record (client_request_id)."""
    rid = f"e2e-{uuid.uuid4().hex}"
    return rid, {"x-request-id": rid}


def record_for(setup: Setup, client_request_id: str, timeout: float = 5.0) -> dict:
    """The usage record of the request sent with this X-Request-Id; there must be exactly one, and no record
    written so far may share its request_id with another."""
    found = wait_for(lambda: [r for r in usage_records(setup.directory)
                              if r.get("client_request_id") == client_request_id], timeout=timeout)
    assert len(found) == 1, f"exactly one record per request, got {found}"
    ids = [r["request_id"] for r in usage_records(setup.directory)]
    assert len(ids) == len(set(ids)), "a request was recorded twice"
    return found[0]


def mock_requests(mock: Proc, client_request_id: str) -> list[dict]:
    """What the mock logged of the requests that carried this X-Request-Id (headers, body digest, outcome)."""
    return [r for r in mock_stats(mock)["requests"] if ["x-request-id", client_request_id] in r["headers"]]


def mock_request(mock: Proc, client_request_id: str) -> dict:
    found = mock_requests(mock, client_request_id)
    assert len(found) == 1, f"the mock got {len(found)} requests with id {client_request_id}"
    return found[0]


def sse_events(data: bytes) -> list[tuple[str, dict]]:
    """A Messages stream as (event name, data) pairs."""
    events = []
    for block in data.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n") if line)
        if fields:
            events.append((fields["event"], json.loads(fields["data"])))
    return events
