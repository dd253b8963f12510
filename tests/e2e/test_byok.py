"""Bring your own key end to end: a tenant's own provider credential reaches the backend, and nothing else.

The mock records the headers it received (the positive control); then every other place a credential could
leak is read back and searched for each tenant secret: the access log, the usage records and their spool, the
metrics, the config dump, and the proxy's own output, at debug level.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
import yaml

from tests.jwks_server import AUDIENCE, ISSUER, claims
from tests.support import (
    CHAT,
    REPO,
    Proc,
    access_log,
    http_get,
    mock_posts,
    send_request,
    start_mock,
    usage_config,
    usage_records,
    wait_for,
    write_config,
)

SECRET = "hs256-secret-for-the-byok-tests-0123456789"
KEY_BYOK = "sk-test-byok-tenant-key-0123456789"
KEY_PLAIN = "sk-test-byok-plain-key-0123456789"
ENV_CREDENTIAL = "sk-byok-from-env-7f3a9c51d2e8"
CONF_CREDENTIAL = "sk-byok-tenant-conf-5d6e0a9b"
FILE_CREDENTIALS = ("sk-byok-file-one-1b2c3d4e", "sk-byok-file-two-9f8e7d6c")
TENANT_SECRETS = (ENV_CREDENTIAL, CONF_CREDENTIAL, *FILE_CREDENTIALS)
OWN_KEYS = ["backend-own-key-1", "backend-own-key-2"]
Z_CHAT = CHAT.replace(b'"m"', b'"z"')  # served by the backend "other" only


@pytest.fixture(scope="module")
def mocks():
    main, other = start_mock("vllm"), start_mock("vllm", "--model", "z")
    yield main, other
    main.stop()
    other.stop()


def start(tmp: Path, mocks: tuple[Proc, Proc], missing: str) -> Proc:
    main, other = mocks
    (tmp / "creds.yaml").write_text(yaml.safe_dump({"credentials": {"team-x": {"main": FILE_CREDENTIALS[0]}}}))
    path = write_config(
        tmp, [{"url": main.url, "name": "main", "type": "vllm", "models": ["m"], "api_keys": OWN_KEYS},
              {"url": other.url, "name": "other", "type": "vllm", "models": ["z"], "api_key": "other-own-key"}],
        health_check={"interval": 3600, "models_interval": 3600}, usage=usage_config(tmp),
        logging={"level": "debug", "access_log": str(tmp / "access.log")},
        auth={"enabled": True, "byok_missing": missing,
              "keys": [{"key": KEY_BYOK, "backend_keys": {"main": "${BYOK_TEST_KEY}"}}, {"key": KEY_PLAIN}],
              "jwt": {"issuer": ISSUER, "audience": AUDIENCE, "hs256_secret": SECRET,
                      "claims": {"credential": "cred"}, "credentials_file": "creds.yaml",
                      "tenants": {"conf": {"backend_keys": {"main": CONF_CREDENTIAL}}}}})
    return Proc(["serve", "--config", str(path)], env={"BYOK_TEST_KEY": ENV_CREDENTIAL}).wait_listening()


def token(tenant: str, **changes) -> str:
    return jwt.encode(claims(tenant, **changes), SECRET, algorithm="HS256")


def call(proxy: Proc, credential: str, body: bytes = CHAT, **headers: str) -> tuple[int, dict]:
    reader, data, _ = send_request(proxy.port, body, {"Authorization": f"Bearer {credential}", **headers})
    return reader.status, json.loads(data)


def credential_received(mock: Proc) -> str:
    """The credential of the last request the mock received."""
    headers = dict(mock_posts(mock)[-1]["headers"])
    return headers["authorization"].removeprefix("Bearer ")


def test_own_credentials_reach_the_backend_and_appear_nowhere_else(mocks, tmp_path):
    main, other = mocks
    proxy = start(tmp_path, mocks, "fallback")
    try:
        seen = []
        for credential in (KEY_PLAIN, KEY_BYOK, KEY_PLAIN, token("conf"), token("x", cred="team-x")):
            assert call(proxy, credential)[0] == 200
            seen.append(credential_received(main))
        # The tenants' own; the backend's keys rotate among the other requests as if these were not there.
        assert seen == [OWN_KEYS[0], ENV_CREDENTIAL, OWN_KEYS[1], CONF_CREDENTIAL, FILE_CREDENTIALS[0]]
        # The credentials file is read again when it changes.
        (tmp_path / "creds.yaml").write_text(yaml.safe_dump({"credentials": {"team-x": {"main":
                                                                                       FILE_CREDENTIALS[1]}}}))

        def file_credential_changed() -> bool:
            assert call(proxy, token("x", cred="team-x"))[0] == 200
            return credential_received(main) == FILE_CREDENTIALS[1]
        wait_for(file_credential_changed, timeout=5, interval=0.3)
        # No credential of its own for "other": the backend's own (auth.byok_missing: fallback).
        assert call(proxy, KEY_BYOK, Z_CHAT)[0] == 200
        assert credential_received(other) == "other-own-key"
        # A 429 on the tenant's own key is the tenant's: never retried with the backend's keys.
        before = len(mock_posts(main))
        status, _ = call(proxy, KEY_BYOK, **{"x-mock-status": "429", "x-mock-retry-after": "1"})
        assert status == 429 and len(mock_posts(main)) == before + 1
        assert credential_received(main) == ENV_CREDENTIAL
        assert call(proxy, KEY_PLAIN)[0] == 200  # and the backend's keys did not rest for it

        wait_for(lambda: len(usage_records(tmp_path)) >= 9)
        metrics = http_get(proxy.url + "/metrics")[1].decode()
        dump = subprocess.run([sys.executable, "-m", "llmproxy", "check-config",
                               str(tmp_path / "config.yaml")], capture_output=True, text=True, timeout=30, cwd=REPO,
                              env={"BYOK_TEST_KEY": ENV_CREDENTIAL, "PATH": "/usr/bin:/bin"})
        assert dump.returncode == 0, dump.stderr
    finally:
        proxy.stop()
    time.sleep(0.1)
    places = {
        "access log": (tmp_path / "access.log").read_text(),
        "usage records": (tmp_path / "usage.jsonl").read_text(),
        "spool": "".join(p.read_bytes().decode("latin-1") for p in (tmp_path / "spool").rglob("*") if p.is_file()),
        "metrics": metrics,
        "check-config": dump.stdout + dump.stderr,
        "proxy output": proxy.text(),
    }
    assert "reloaded" not in places["proxy output"] and "debug" in json.dumps(yaml.safe_load(dump.stdout)["logging"])
    assert len(access_log(tmp_path)) >= 9 and places["metrics"]
    for secret in TENANT_SECRETS:
        for place, text in places.items():
            assert secret not in text, f"{secret} leaked into the {place}"


def test_a_missing_credential_is_refused_when_configured(mocks, tmp_path):
    main, other = mocks
    proxy = start(tmp_path, mocks, "refuse")
    try:
        before = len(mock_posts(other))
        status, body = call(proxy, KEY_BYOK, Z_CHAT)
        assert (status, body["error"]["code"]) == (403, "backend_credential_missing")
        status, body = call(proxy, token("x", cred="no-such-entry"))  # a claim naming nothing in the file
        assert (status, body["error"]["code"]) == (403, "backend_credential_missing")
        assert len(mock_posts(other)) == before
        assert call(proxy, KEY_BYOK)[0] == 200 and credential_received(main) == ENV_CREDENTIAL
        assert call(proxy, KEY_PLAIN, Z_CHAT)[0] == 200  # a caller without own credentials is not concerned
        wait_for(lambda: len(access_log(tmp_path)) >= 4)
        assert "no BYOK credential for backend other" in access_log(tmp_path)[0]["error"]
    finally:
        proxy.stop()
