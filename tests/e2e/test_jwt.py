"""Tenant JWTs end to end: bad tokens refused alike, good ones mapped to a tenant, JWKS rotation, and one
tenant's weekly budget held across two proxies sharing Redis.

Every refused token is checked three times: the answer (the same 401 whatever the reason), the backend
(which must not have received anything) and the access log (which names the reason the client is not told).
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import pytest
import yaml

from tests.jwks_server import AUDIENCE, ISSUER, JwksServer, SigningKey, b64, claims, unsigned
from tests.redis_server import RedisServer
from tests.support import (
    CHAT,
    Proc,
    access_log,
    metric_value,
    mock_posts,
    send_request,
    sighup,
    start_mock,
    start_proxy,
    usage_config,
    usage_records,
    wait_for,
)

API_KEY = "sk-test-jwt-side-by-side-0123456789"
GENERIC_401 = {"message": "Incorrect API key provided.", "type": "invalid_request_error", "param": None,
               "code": "invalid_api_key"}
QUIET = {"interval": 3600, "models_interval": 3600}


def jwt_section(**changes) -> dict:
    return {"issuer": ISSUER, "audience": AUDIENCE, "algorithms": ["RS256"], "leeway": "5s", **changes}


@pytest.fixture(scope="module")
def keys():
    return {"k1": SigningKey("k1"), "other": SigningKey("k1"), "ec": SigningKey("e1", "EC")}


@pytest.fixture(scope="module")
def setup(keys, tmp_path_factory):
    jwks = JwksServer(keys["k1"])
    mock = start_mock("vllm")
    tmp = tmp_path_factory.mktemp("jwt")
    proxy = start_proxy(tmp, [{"url": mock.url, "type": "vllm", "api_key": "backend-own-key"}],
                        health_check=QUIET, usage=usage_config(tmp), auth={
                            "enabled": True, "keys": [{"key": API_KEY, "user_id": "keyholder"}],
                            "jwt": jwt_section(jwks_url=jwks.url, tenants={"acme": {"user_id": "acme-default"}})})
    try:
        yield proxy, mock, tmp, jwks
    finally:
        proxy.stop()
        mock.stop()
        jwks.close()


def call(proxy: Proc, token: str, body: bytes = CHAT) -> tuple[int, dict, dict]:
    reader, data, _ = send_request(proxy.port, body, {"Authorization": f"Bearer {token}"}, timeout=10)
    return reader.status, reader.headers, json.loads(data)


def bad_tokens(keys: dict[str, SigningKey]) -> list[tuple[str, str, str]]:
    """(case, token, the reason the access log gives)."""
    k1, now = keys["k1"], int(time.time())
    good = k1.sign(claims())
    header, payload, signature = good.split(".")
    forged = claims(tenant="victim")
    return [
        ("expired", k1.sign(claims(exp=now - 60)), "expired"),
        ("expired, exp a numeric string", k1.sign(claims(exp=str(now - 60))), "expired"),
        ("not yet valid (nbf)", k1.sign(claims(nbf=now + 3600)), "not_yet_valid"),
        ("issued in the future (iat)", k1.sign(claims(iat=now + 3600)), "not_yet_valid"),
        ("wrong audience", k1.sign(claims(aud="another-service")), "audience"),
        ("wrong issuer", k1.sign(claims(iss="https://evil.test/")), "issuer"),
        ("no audience", k1.sign(claims(aud=None)), "missing_claim"),
        ("no expiry", k1.sign(claims(exp=None)), "missing_claim"),
        ("signed by another key with the same kid", keys["other"].sign(claims()), "signature"),
        ("payload swapped after signing", f"{header}.{b64(json.dumps(forged).encode())}.{signature}",
         "signature"),
        ("signature removed", f"{header}.{payload}.", "signature"),
        ("alg none", unsigned(claims(), {"alg": "none", "typ": "JWT", "kid": "k1"}), "algorithm"),
        ("HS256 keyed with the public key (algorithm confusion)",
         unsigned(claims(), {"alg": "HS256", "typ": "JWT", "kid": "k1"}, k1.public_pem.encode()), "algorithm"),
        ("ES256, not an allowed algorithm", keys["ec"].sign(claims()), "algorithm"),
        ("RS256 header, unknown kid", k1.sign(claims(), kid="nobody"), "unknown_kid"),
        ("no tenant claim", k1.sign(claims(tenant=None)), "bad_claim"),
        ("a tenant claim that is no id", k1.sign(claims(tenant="acme/../root")), "bad_claim"),
        ("models claim not a list", k1.sign(claims(models="m")), "bad_claim"),
        ("not a JWT at all", "eyJub3QiOiJqc29uIn0.bad.token", "malformed"),
    ]


def test_bad_tokens_get_one_401_and_reach_no_backend(setup, keys):
    proxy, mock, tmp, _ = setup
    cases = bad_tokens(keys)
    assert len(cases) >= 12
    before = len(mock_posts(mock))
    for case, token, _ in cases:
        status, headers, body = call(proxy, token)
        assert (status, body["error"]) == (401, GENERIC_401), case
        assert headers["www-authenticate"].startswith("Bearer"), case
    assert len(mock_posts(mock)) == before  # not one of them reached the backend
    wait_for(lambda: len([r for r in access_log(tmp) if r["status"] == 401]) >= len(cases))
    logged = [r for r in access_log(tmp) if r["status"] == 401][-len(cases):]
    for (case, token, reason), record in zip(cases, logged, strict=True):
        assert f"({reason}" in record["error"], (case, record["error"])
        assert token not in json.dumps(record) and record["key_id"] is None
    for reason in {reason for _, _, reason in cases}:
        assert metric_value(proxy, "llmproxy_auth_failures_total", f'reason="{reason}"') >= 1, reason


def test_a_valid_token_is_a_tenant_beside_the_api_keys(setup, keys):
    proxy, mock, tmp, _ = setup
    status, _, _ = call(proxy, keys["k1"].sign(claims(sub="alice")))
    assert status == 200
    assert call(proxy, API_KEY)[0] == 200  # the keys still work beside the tokens
    assert call(proxy, keys["k1"].sign(claims(sub=None)))[0] == 200  # the tenant's default user
    wait_for(lambda: len(usage_records(tmp)) >= 3)
    records = usage_records(tmp)[-3:]
    assert [(r["key_id"], r["user_id"]) for r in records] == [
        ("tenant:acme", "alice"), (records[1]["key_id"], "keyholder"), ("tenant:acme", "acme-default")]
    # An exp PyJWT reads as an integer (a numeric string) is accepted, as PyJWT accepts it.
    assert call(proxy, keys["k1"].sign(claims(exp=str(int(time.time()) + 600))))[0] == 200
    # The models claim narrows what the tenant may use.
    narrowed = keys["k1"].sign(claims(models=["priced-model"]))
    status, _, body = call(proxy, narrowed)
    assert (status, body["error"]["code"]) == (403, "model_not_allowed")
    assert call(proxy, narrowed, CHAT.replace(b'"m"', b'"priced-model"'))[0] == 200
    assert all(r["headers"] and ("authorization", "Bearer backend-own-key") in [tuple(h) for h in r["headers"]]
               for r in mock_posts(mock)[-3:])


def test_jwks_rotation(keys, tmp_path):
    old, new, unknown = keys["k1"], SigningKey("k2"), SigningKey("k3")
    jwks = JwksServer(old)
    mock = start_mock("vllm")
    proxy = start_proxy(tmp_path, [{"url": mock.url, "type": "vllm"}], health_check=QUIET,
                        auth={"enabled": True, "jwt": jwt_section(jwks_url=jwks.url)})
    try:
        assert jwks.fetches == 1  # at start, before the first request
        old_token = old.sign(claims())
        assert call(proxy, old_token)[0] == 200
        # The IdP rotates: k2 replaces k1. The first token signed with k2 has the set fetched again, waits for
        # it and gets in.
        jwks.keys = [new]
        assert call(proxy, new.sign(claims()))[0] == 200
        assert jwks.fetches == 2
        # k1 is gone from the set: its token (verified before) is refused now.
        assert call(proxy, old_token)[0] == 401
        # Unknown kids fetch the set at most once a minute: these are refused without a fetch.
        for _ in range(3):
            assert call(proxy, unknown.sign(claims()))[0] == 401
        assert jwks.fetches == 2
        assert call(proxy, new.sign(claims(sub="again")))[0] == 200
        assert "unknown_kid" in access_log(tmp_path)[-2]["error"]
    finally:
        proxy.stop()
        mock.stop()
        jwks.close()


def test_a_reload_applies_tenant_changes_and_keeps_the_fetched_key_set(keys, tmp_path):
    jwks = JwksServer(keys["k1"])
    mock = start_mock("vllm")
    proxy = start_proxy(tmp_path, [{"url": mock.url, "type": "vllm"}], health_check=QUIET,
                        auth={"enabled": True, "jwt": jwt_section(jwks_url=jwks.url)})
    try:
        token = keys["k1"].sign(claims())
        assert call(proxy, token)[0] == 200
        path = tmp_path / "config.yaml"
        document = yaml.safe_load(path.read_text())
        document["auth"]["jwt"]["tenants"] = {"acme": {"models": ["priced-model"]}}
        path.write_text(yaml.safe_dump(document))
        sighup(proxy)
        status, _, body = call(proxy, token)  # the same token: its tenant's new settings
        assert (status, body["error"]["code"]) == (403, "model_not_allowed")
        assert jwks.fetches == 1  # the same URL: the set fetched at start is kept
    finally:
        proxy.stop()
        mock.stop()
        jwks.close()


def test_a_tenants_weekly_budget_holds_across_two_proxies_sharing_redis(tmp_path):
    now = datetime.now(timezone.utc)
    monday = (now - timedelta(days=now.weekday())).replace(hour=0, minute=0, second=0, microsecond=0)
    if (monday + timedelta(days=7) - now).total_seconds() < 120:
        pytest.skip("too close to the ISO week's end: the budget period would roll over during the test")
    secret = "an-hs256-secret-of-at-least-32-chars!"
    mock = start_mock("vllm")
    redis = RedisServer().start()
    proxies: list[Proc] = []
    try:
        for name in ("a", "b"):
            directory = tmp_path / name
            directory.mkdir()
            proxies.append(start_proxy(directory, [{"url": mock.url, "type": "vllm"}], health_check=QUIET,
                                       usage=usage_config(directory),
                                       auth={"enabled": True, "jwt": jwt_section(
                                           hs256_secret=secret, algorithms=["HS256"], tenants={
                                               "acme": {"rate_limit": {"budget": {"tokens": 50, "per": "week"}}}})},
                                       rate_limit={"enabled": True, "store": "redis", "redis_url": redis.url}))
        import jwt as pyjwt

        acme = pyjwt.encode(claims(), secret, algorithm="HS256")
        other = pyjwt.encode(claims(tenant="globex"), secret, algorithm="HS256")  # no budget: per_key's (none)
        reader, _, _ = send_request(proxies[0].port, CHAT, {"Authorization": f"Bearer {acme}",
                                                            "x-mock-tokens": "60"})
        assert reader.status == 200

        def refused_by_the_other_proxy() -> bool:
            reader, data, _ = send_request(proxies[1].port, CHAT, {"Authorization": f"Bearer {acme}"})
            return reader.status == 429 and json.loads(data)["error"]["code"] == "insufficient_quota"
        # The charge lands in Redis just after the first response ends: until then the other proxy may still
        # admit (the documented lag of a budget); once it refuses, a refusal never reaches the backend.
        wait_for(refused_by_the_other_proxy, timeout=10)
        before = len(mock_posts(mock))
        assert refused_by_the_other_proxy()
        assert len(mock_posts(mock)) == before
        # The same tenant with a fresh token (another user) is the same budget; another tenant is not limited.
        fresh = pyjwt.encode(claims(sub="bob", iat=int(time.time()) + 1), secret, algorithm="HS256")
        assert send_request(proxies[0].port, CHAT, {"Authorization": f"Bearer {fresh}"})[0].status == 429
        assert send_request(proxies[1].port, CHAT, {"Authorization": f"Bearer {other}"})[0].status == 200
    finally:
        for proxy in proxies:
            proxy.stop()
        mock.stop()
        redis.close()
