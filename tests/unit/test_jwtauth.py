"""The tenant-JWT verifier (llmproxy/jwtauth.py) in process: tenants from claims, the key set's rules."""

from __future__ import annotations

import time

import jwt as pyjwt
import pytest

from llmproxy.config import parse_config
from llmproxy.errors import Unauthorized
from llmproxy.jwtauth import JwtVerifier, StaticKeys, _parse_jwks
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
