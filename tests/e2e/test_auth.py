"""API-key auth end to end: who gets in, who does not, and that no key ever leaves the proxy.

Every refused request is checked twice: the answer (401/400, the same body whatever the reason) and the
backend, which must not have received anything.
"""

from __future__ import annotations

import hashlib
import json

import openai
import pytest
import yaml

from tests.support import (
    Proc,
    ResponseReader,
    http_get,
    metric_value,
    mock_posts,
    mock_stats,
    raw_connect,
    sighup,
    start_mock,
    start_proxy,
    usage_config,
    usage_records,
    wait_for,
)

KEY_A = "sk-test-team-a-0123456789abcdef"
KEY_B = "sk-test-team-b-fedcba9876543210"
KEY_C = "sk-test-team-c-only-by-its-digest"
BACKEND_KEY = "backend-secret-key"
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    mock = start_mock("vllm")
    tmp = tmp_path_factory.mktemp("auth")
    keys_file = tmp / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"keys": [
        {"key_sha256": hashlib.sha256(KEY_C.encode()).hexdigest(), "user_id": "team-c"}]}))
    proxy = start_proxy(tmp, [{"url": mock.url, "api_key": BACKEND_KEY}], auth={
        "enabled": True,
        "keys": [{"key": KEY_A, "user_id": "team-a"}, {"key": KEY_B, "user_id": "team-b", "models": ["m"]}],
        "keys_file": "keys.yaml",
    }, usage=usage_config(tmp))
    try:
        yield proxy, mock, tmp
    finally:
        proxy.stop()
        mock.stop()


def exchange(proxy: Proc, head_lines: list[str], body: str = CHAT, method: str = "POST",
             path: str = "/v1/chat/completions") -> tuple[int, dict[str, str], bytes]:
    """Send one request with exactly these extra header lines; return status, headers and body."""
    data = body.encode() if method == "POST" else b""
    lines = [f"{method} {path} HTTP/1.1", "Host: proxy", "Content-Type: application/json",
             f"Content-Length: {len(data)}", *head_lines]
    with raw_connect(proxy.port) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data)
        reader = ResponseReader(sock).read_head()
        content, _ = reader.read_body()
    return reader.status, reader.headers, content


REFUSED = [
    ("no credentials", [], 401),
    ("wrong key", [f"Authorization: Bearer {KEY_A}x"], 401),
    ("a prefix of a key", [f"Authorization: Bearer {KEY_A[:-1]}"], 401),
    ("Basic scheme", ["Authorization: Basic dXNlcjpwYXNz"], 401),
    ("key without scheme", [f"Authorization: {KEY_A}"], 401),
    ("empty bearer", ["Authorization: Bearer"], 401),
    ("bearer with only spaces", ["Authorization: Bearer    "], 401),
    ("wrong x-api-key", ["X-API-Key: nope-nope-nope-nope"], 401),
    ("empty x-api-key", ["X-API-Key: "], 401),
    ("unconfigured header name", [f"Api-Key: {KEY_A}"], 401),
    ("key as proxy-authorization", [f"Proxy-Authorization: Bearer {KEY_A}"], 401),
    ("two different keys", [f"Authorization: Bearer {KEY_A}", f"X-API-Key: {KEY_B}"], 400),
    ("a good key and a bad one", [f"X-API-Key: {KEY_A}", "Authorization: Bearer nope"], 400),
    ("two authorization headers", [f"Authorization: Bearer {KEY_A}", f"Authorization: Bearer {KEY_B}"], 400),
]


@pytest.mark.parametrize(("case", "headers", "status"), REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_credentials_reach_no_backend(setup, case: str, headers: list[str], status: int):
    proxy, mock, _ = setup
    before = len(mock_posts(mock))
    got, response_headers, body = exchange(proxy, headers)
    assert got == status, case
    error = json.loads(body)["error"]
    if status == 401:
        # One answer for every failure: probing learns nothing.
        assert error == {"message": "Incorrect API key provided.", "type": "invalid_request_error", "param": None,
                         "code": "invalid_api_key"}
        assert response_headers["www-authenticate"].startswith("Bearer")
    else:
        assert error["code"] == "ambiguous_api_key"
    assert len(mock_posts(mock)) == before


# Paths that look like a skipped path. Decisions are made on the canonical path (http11/path.py): what
# is /health once made canonical is the proxy's own /health; anything else needs a key or is refused; no
# trick reaches the backend without a key.
PATH_TRICKS = [
    ("//health", 200), ("/%68ealth", 200), ("/./health", 200),  # /health itself
    ("/health/../v1/chat/completions", 401), ("/metrics/../v1/completions", 401),  # /v1/...: a key
    ("/HEALTH", 401), ("/health/", 401), ("/v1/models", 401),  # other paths: a key
    ("/health%2f..%2fv1%2fmodels", 400), ("/health;x/../v1/models", 400),  # no canonical form: refused
]


@pytest.mark.parametrize(("path", "status"), PATH_TRICKS)
def test_path_tricks_never_skip_auth(setup, path: str, status: int):
    proxy, mock, _ = setup
    before = len(mock_stats(mock)["requests"])
    answered, _, _ = exchange(proxy, [], method="GET", path=path)
    assert answered == status, path
    if status != 200:
        answered, _, _ = exchange(proxy, [], method="POST", path=path)
        assert answered == status, path
    assert len(mock_stats(mock)["requests"]) == before


def test_skipped_paths_need_no_key(setup):
    proxy, _, _ = setup
    assert http_get(proxy.url + "/health")[0] == 200
    assert http_get(proxy.url + "/health?verbose=1")[0] == 200
    assert http_get(proxy.url + "/metrics")[0] == 200


ACCEPTED = [
    ("bearer", [f"Authorization: Bearer {KEY_A}"]),
    ("scheme in any case", [f"authorization: bEaReR {KEY_A}"]),
    ("extra whitespace", [f"Authorization:    Bearer     {KEY_A}   "]),
    ("x-api-key", [f"x-api-key: {KEY_A}"]),
    ("both headers, same key (Continue sends both)", [f"Authorization: Bearer {KEY_A}", f"X-API-Key: {KEY_A}"]),
    ("key from the keys file, stored as a digest", [f"Authorization: Bearer {KEY_C}"]),
]


@pytest.mark.parametrize(("case", "headers"), ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_accepted_credentials_are_never_forwarded(setup, case: str, headers: list[str]):
    proxy, mock, _ = setup
    before = len(mock_posts(mock))
    status, _, body = exchange(proxy, headers)
    assert status == 200, (case, body)
    sent = mock_posts(mock)[before:]
    assert len(sent) == 1
    forwarded = {name.lower(): value for name, value in sent[0]["headers"]}
    assert forwarded["authorization"] == f"Bearer {BACKEND_KEY}"  # the backend's own key, not the caller's
    assert "x-api-key" not in forwarded
    assert all(KEY_A not in value and KEY_C not in value for value in forwarded.values())


def test_the_openai_sdk_with_a_key_and_without(setup):
    proxy, _, _ = setup
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=KEY_A, max_retries=0)
    assert client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}]).choices
    assert {m.id for m in client.models.list()} >= {"m"}
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-wrong-key-wrong-key", max_retries=0).models.list()


def test_a_key_limited_to_some_models(setup):
    proxy, mock, _ = setup
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=KEY_B, max_retries=0)
    assert [m.id for m in client.models.list()] == ["m"]  # only what this key may use
    before = len(mock_posts(mock))
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client.chat.completions.create(model="priced-model", messages=[{"role": "user", "content": "hi"}])
    assert denied.value.body["code"] == "model_not_allowed"
    assert len(mock_posts(mock)) == before
    assert client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}]).choices


def test_no_key_in_logs_metrics_or_usage_records_and_failures_are_counted(setup):
    proxy, _, tmp = setup
    failures = metric_value(proxy, "llmproxy_auth_failures_total")
    exchange(proxy, [f"Authorization: Bearer {KEY_A}-typo"])
    assert metric_value(proxy, "llmproxy_auth_failures_total") == failures + 1
    exchange(proxy, [f"Authorization: Bearer {KEY_A}"])
    records = wait_for(lambda: usage_records(tmp))
    key_id = hashlib.sha256(KEY_A.encode()).hexdigest()[:12]
    wait_for(lambda: any(r.get("key_id") == key_id and r.get("user_id") == "team-a" for r in usage_records(tmp)))
    assert records
    everything = "\n".join([(tmp / "access.log").read_text(), (tmp / "usage.jsonl").read_text(),
                            http_get(proxy.url + "/metrics")[1].decode(), proxy.text()])
    for key in (KEY_A, KEY_B, KEY_C):
        assert key not in everything
    assert KEY_A[:12] not in everything  # not even a prefix of the key (key_id is a digest prefix)


def test_keys_file_is_re_read_on_sighup(setup):
    proxy, _, tmp = setup
    new_key = "sk-test-added-by-reload-000000000"
    assert exchange(proxy, [f"Authorization: Bearer {new_key}"])[0] == 401
    (tmp / "keys.yaml").write_text(yaml.safe_dump({"keys": [{"key": new_key, "user_id": "new"}]}))
    sighup(proxy)
    assert exchange(proxy, [f"Authorization: Bearer {new_key}"])[0] == 200
    assert exchange(proxy, [f"Authorization: Bearer {KEY_C}"])[0] == 401  # gone from the file: gone
    assert exchange(proxy, [f"Authorization: Bearer {KEY_A}"])[0] == 200  # config keys stay


def test_a_refused_request_is_answered_before_its_body_is_read(setup):
    """401 without waiting for a body that never comes (a client cannot hold a slot unauthenticated)."""
    proxy, _, _ = setup
    with raw_connect(proxy.port) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Length: 100000\r\n\r\n{")
        reader = ResponseReader(sock).read_head()
        assert reader.status == 401
        assert reader.headers.get("connection") == "close"  # the unread body cannot be parsed as a request
