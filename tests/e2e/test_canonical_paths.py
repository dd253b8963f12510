"""Path tricks: every decision is made on the canonical path, and the backend only ever sees canonical paths.

Each trick is sent through the real proxy to a vLLM mock, streaming and with an API key whose allow-list
names one model: a path that means /v1/chat/completions is metered (usage injected and stripped), checked
against the allow-list and forwarded as /v1/chat/completions; a path with no canonical form is refused with
400 invalid_path before anything reaches the backend.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import ResponseReader, mock_stats, post_request, raw_connect, start_mock, start_proxy, wait_for

KEY = "sk-canonical-paths-0123456789"
CHAT = "/v1/chat/completions"

FORWARDED = [
    ("/v1//chat/completions", CHAT),
    ("//v1/chat/completions", CHAT),
    ("/v1/chat//completions", CHAT),
    ("/v1///chat///completions", CHAT),
    ("/v1/./chat/completions", CHAT),
    ("/./v1/chat/completions", CHAT),
    ("/health/../v1/chat/completions", CHAT),
    ("/v1/models/../chat/completions", CHAT),
    ("/../v1/chat/completions", CHAT),
    ("/v1/chat/x/../completions", CHAT),
    ("/v1/%63hat/completions", CHAT),
    ("/%76%31/%63%68%61%74/completions", CHAT),
    ("/v1/chat/./completions", CHAT),
    ("/v1//chat/completions?trace=1", CHAT + "?trace=1"),
]
REFUSED = [
    "/v1/%2e%2e/v1/chat/completions",
    "/v1/%2E/chat/completions",
    "/v1%2fchat%2fcompletions",
    "/v1/chat%2Fcompletions",
    "/health%2f..%2fv1%2fchat%2fcompletions",
    "/v1/chat/completions;x=1",
    "/v1;/chat/completions",
    "/v1/chat%5ccompletions",
    "/v1/chat/completions%00",
    "/v1/chat/completions#fragment",
    "/v1/chat/completions%",
    "/v1/%zz/chat/completions",
]
assert len(FORWARDED) + len(REFUSED) >= 20


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp_path: Path = tmp_path_factory.mktemp("canonical")
    mock = start_mock("vllm", "--model", "m,other")
    usage = tmp_path / "usage.jsonl"
    proxy = start_proxy(
        tmp_path, [{"url": mock.url, "name": "vllm", "type": "vllm", "models": ["m", "other"]}],
        auth={"enabled": True, "keys": [{"key": KEY, "models": ["m"]}]},
        usage={"enabled": True, "spool_dir": str(tmp_path / "spool"),
               "reporters": [{"name": "f", "type": "file", "file": {"path": str(usage)}}]})
    yield proxy, mock, usage
    proxy.stop()
    mock.stop()


def _send(proxy, path: str, model: str = "m") -> tuple[int, dict, bytes]:
    body = json.dumps({"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
    with raw_connect(proxy.port) as sock:
        sock.sendall(post_request(path, body, {"Authorization": f"Bearer {KEY}", "X-Request-Id": path,
                                               "x-mock-tokens": "3"}))
        reader = ResponseReader(sock).read_head()
        content, _ = reader.read_body()
    return reader.status, reader.headers, content


def _records(usage: Path) -> list[dict]:
    return [json.loads(line) for line in usage.read_text().splitlines()] if usage.exists() else []


@pytest.mark.parametrize(("path", "canonical"), FORWARDED)
def test_a_path_trick_is_metered_and_forwarded_canonical(setup, path: str, canonical: str):
    proxy, mock, usage = setup
    status, _, content = _send(proxy, path)
    assert status == 200, content[:200]
    assert b'"choices":[]' not in content  # the usage the proxy asked for was stripped: it saw the endpoint
    seen = [r for r in mock_stats(mock)["requests"] if any(h == ["x-request-id", path] for h in r["headers"])]
    assert [r["path"] for r in seen] == [canonical]
    record = wait_for(lambda: [r for r in _records(usage) if r["client_request_id"] == path], timeout=5)[0]
    assert record["endpoint"] == canonical.split("?")[0]
    assert record["usage_source"] == "reported" and record["completion_tokens"] == 3


@pytest.mark.parametrize("path", [path for path, _ in FORWARDED[:4]])
def test_the_allow_list_holds_whatever_the_path(setup, path: str):
    proxy, mock, _ = setup
    before = mock_stats(mock)["requests_total"]
    status, _, content = _send(proxy, path, model="other")
    assert status == 403 and json.loads(content)["error"]["code"] == "model_not_allowed"
    assert mock_stats(mock)["requests_total"] == before


@pytest.mark.parametrize("path", REFUSED)
def test_a_path_without_a_canonical_form_is_refused_before_the_backend(setup, path: str):
    proxy, mock, _ = setup
    before = mock_stats(mock)["requests_total"]
    status, headers, content = _send(proxy, path)
    assert status == 400 and json.loads(content)["error"]["code"] == "invalid_path", content[:200]
    assert headers.get("connection") == "close"
    assert mock_stats(mock)["requests_total"] == before
