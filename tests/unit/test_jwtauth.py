"""The tenant-JWT verifier (llmproxy/jwtauth.py) in process: tenants from claims, the key set's rules."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
import urllib.error
import urllib.request

import jwt as pyjwt
import pytest

from llmproxy import jwtauth
from llmproxy.config import parse_config
from llmproxy.errors import Unauthorized
from llmproxy.jwtauth import JwksKeys, JwtVerifier, StaticKeys, _parse_jwks
from tests.jwks_server import AUDIENCE, ISSUER, SigningKey, claims

SECRET = "a-unit-test-secret-of-32-characters!"


def verifier(**jwt) -> JwtVerifier:
    cfg = parse_config({"backends": [{"url": "http://b", "name": "b"}], "rate_limit": {"per_key": {
        "requests_per_minute": 60}}, "auth": {"enabled": True, "jwt": {
            "issuer": ISSUER, "audience": AUDIENCE, "hs256_secret": SECRET, **jwt}}})
    return JwtVerifier(cfg.auth.jwt, cfg.rate_limit.per_key, refuse_missing=False)


def sign(**changes) -> bytes:
    return pyjwt.encode(claims(**changes), SECRET, algorithm="HS256").encode()


def test_a_tenant_from_its_claims_and_config():
    check = verifier(tenants={"acme": {"models": ["a", "b"], "rate_limit": {"requests_per_minute": 5},
                                       "allowed_ips": ["10.0.0.0/8"], "backend_keys": {"b": "sk-own"}}})
    tenant = check.verify(sign(models=["b", "c"]))
    assert (tenant.key_id, tenant.scope, tenant.user_id) == ("tenant:acme", "key:tenant:acme", "user-1")
    assert tenant.models == frozenset({"b"})  # the claim narrows the config, never widens it
    assert tenant.limits.requests_per_minute == 5 and "10.1.2.3" in tenant.allowed_ips
    assert tenant.backend_keys.credential_for("b", anthropic=True) == b"x-api-key: sk-own\r\n"
    assert "sk-own" not in repr(tenant)
    other = check.verify(sign(tenant="globex", sub=None))
    assert (other.key_id, other.user_id, other.models) == ("tenant:globex", None, None)
    assert other.limits.requests_per_minute == 60  # rate_limit.per_key
    assert check.verify(sign(tenant=7)).key_id == "tenant:7"


def test_a_verified_token_is_checked_once_until_the_key_set_changes():
    check = verifier()
    token = sign()
    first = check.verify(token)
    assert check.verify(token) is first
    check.keys = StaticKeys([b"another-secret-of-at-least-32-chars!!"])
    check.keys.version = 1
    with pytest.raises(Unauthorized) as refused:
        check.verify(token)
    assert refused.value.reason == "signature"


def test_custom_claim_names():
    check = verifier(claims={"tenant": "org", "user": "email", "models": "allowed"})
    tenant = check.verify(sign(tenant=None, org="initech", email=1234, allowed=["m"]))
    assert (tenant.key_id, tenant.user_id, tenant.models) == ("tenant:initech", "1234", frozenset({"m"}))
    with pytest.raises(Unauthorized) as refused:
        check.verify(sign())  # tid is no longer the tenant claim
    assert refused.value.reason == "bad_claim"


def test_a_jwks_document_gives_only_public_signing_keys():
    rsa, ec = SigningKey("r"), SigningKey("e", "EC")
    document = {"keys": [rsa.jwk(), {"kty": "oct", "k": "c2VjcmV0", "kid": "o"},
                         {**ec.jwk(), "use": "enc"}, {"kty": "RSA", "kid": "broken"}, "junk"]}
    assert [kid for kid, _ in _parse_jwks(document)] == ["r"]
    for bad in ({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}, {"nokeys": []}, []):
        with pytest.raises(ValueError):
            _parse_jwks(bad)



# (case, exp as now -> claim value, the refusal's reason or None: accepted), as PyJWT reads exp.
EXPIRIES = [
    ("numeric string", lambda now: str(now + 3600), None),
    ("float", lambda now: now + 3600.5, None),
    ("numeric string in the past", lambda now: str(now - 3600), "expired"),
    ("not a number", lambda now: "soon", "malformed"),
]


@pytest.mark.parametrize(("case", "exp", "reason"), EXPIRIES, ids=[c[0] for c in EXPIRIES])
def test_an_exp_is_read_as_pyjwt_reads_it(case, exp, reason):
    check = verifier()
    token = sign(exp=exp(int(time.time())))
    if reason is None:
        assert check.verify(token).key_id == "tenant:acme"
        assert check.verify(token).key_id == "tenant:acme"  # remembered until its exp
        return
    with pytest.raises(Unauthorized) as refused:
        check.verify(token)
    assert refused.value.reason == reason


class FakeIdp:
    """jwtauth._download's stand-in: counts the fetches, fails while `down`."""

    def __init__(self, document: dict) -> None:
        self.document, self.down, self.fetches = document, True, 0

    def __call__(self, url: str, timeout: float) -> dict:
        self.fetches += 1
        if self.down:
            raise OSError("connection refused")
        return self.document


def test_a_failing_jwks_fetch_backs_off_and_is_logged_once_per_outage(monkeypatch, caplog):
    idp = FakeIdp({"keys": [SigningKey("k1").jwk()]})
    monkeypatch.setattr(jwtauth, "_download", idp)
    clock = [1000.0]

    async def scenario() -> None:
        keys = JwksKeys("https://idp.test/jwks.json", 1.0, 600.0)
        keys._clock = lambda: clock[0]
        await keys.start()  # the IdP is down at start

        async def requests(count: int) -> None:
            for _ in range(count):
                if not keys.candidates("k1", "RS256"):  # as JwtVerifier asks
                    refresh = keys.refresh_for_unknown()
                    if refresh is not None:
                        await refresh
                await asyncio.sleep(0)

        await requests(200)
        assert idp.fetches == 1  # not one per request
        for step, fetches in ((9.0, 1), (1.5, 2), (15.0, 2), (6.0, 3), (39.0, 3), (60.0, 4), (61.0, 5)):
            clock[0] += step  # backoff: 10 s, 20 s, 40 s, then 60 s at most
            await requests(50)
            assert idp.fetches == fetches, step
        idp.down = False
        clock[0] += 61.0
        await requests(50)
        assert idp.fetches == 6 and keys.candidates("k1", "RS256")

    with caplog.at_level(logging.INFO, logger="llmproxy"):
        asyncio.run(scenario())
    failures = [r for r in caplog.records if "failed (" in r.getMessage()]
    recoveries = [r for r in caplog.records if "works again" in r.getMessage()]
    assert len(failures) == 1 and failures[0].levelno == logging.ERROR
    assert len(recoveries) == 1 and "5 failed attempt(s)" in recoveries[0].getMessage()


def test_a_jwks_fetch_that_outlasts_jwks_timeout_fails_and_frees_the_next_one(monkeypatch, caplog):
    release = threading.Event()

    def hanging(url: str, timeout: float) -> dict:
        release.wait(10)  # a slow IdP (or DNS) that urllib's per-operation timeout would not stop
        raise OSError("too late")

    monkeypatch.setattr(jwtauth, "_download", hanging)

    async def scenario() -> float:
        keys = JwksKeys("https://idp.test/jwks.json", 0.2, 600.0)
        started = time.monotonic()
        await keys.start()
        took = time.monotonic() - started
        assert keys._fetching is None and keys._failures == 1  # the next fetch (after the backoff) may start
        release.set()  # asyncio.run waits for the executor's thread
        return took

    try:
        with caplog.at_level(logging.ERROR, logger="llmproxy"):
            took = asyncio.run(asyncio.wait_for(scenario(), 5))
    finally:
        release.set()
    assert took < 3
    assert "within jwks_timeout 0.2s" in caplog.text


def test_a_jwks_download_that_drips_is_cut_at_its_deadline():
    with socket.create_server(("127.0.0.1", 0)) as server:
        def drip() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
                with contextlib.suppress(OSError):
                    for _ in range(100):  # one byte every 50 ms: each read is quick, the whole is not
                        conn.sendall(b" ")
                        time.sleep(0.05)

        threading.Thread(target=drip, daemon=True).start()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            jwtauth._download(f"http://127.0.0.1:{server.getsockname()[1]}/jwks.json", 0.5)
        assert time.monotonic() - started < 3


def test_a_jwks_redirect_from_https_to_http_is_refused():
    handler = jwtauth._NoDowngrade()
    request = urllib.request.Request("https://idp.test/jwks.json")
    with pytest.raises(urllib.error.HTTPError):
        handler.redirect_request(request, None, 302, "Found", {}, "http://idp.test/jwks.json")
    moved = handler.redirect_request(request, None, 302, "Found", {}, "https://keys.idp.test/jwks.json")
    assert moved.full_url == "https://keys.idp.test/jwks.json"
