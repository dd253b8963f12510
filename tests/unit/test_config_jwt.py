"""The auth.jwt, security and BYOK config (llmproxy/config/jwt.py, access.py): what loads, and what is refused
with the key to change."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import yaml

from llmproxy.config import ConfigError, dump_config, parse_config
from tests.jwks_server import SigningKey

SECRET = "s" * 32
BASE = {"issuer": "https://idp/", "audience": "proxy"}


def config(jwt: dict | None = None, **auth: Any):
    section = {"enabled": True, **auth, **({"jwt": jwt} if jwt is not None else {})}
    return parse_config({"backends": [{"url": "http://b", "name": "b"}], "auth": section})


def test_the_guides_security_section_loads():
    cfg = parse_config({"backends": [{"url": "http://b"}],
                        "security": {"ip_whitelist": ["192.168.1.0/24", "10.0.0.5"], "ip_blacklist": ["1.2.3.4"]}})
    assert cfg.security.ip_whitelist == ["192.168.1.0/24", "10.0.0.5"] and cfg.security.ip_blacklist == ["1.2.3.4"]


@pytest.mark.parametrize(("entry", "loaded"), [
    ("::ffff:192.0.2.0/120", "192.0.2.0/24"),  # clients are compared as IPv4: as written it would match nothing
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("::ffff:192.0.2.7/128", "192.0.2.7/32"),
    ("::ffff:0:0/96", "0.0.0.0/0"),
    ("2001:db8::/32", "2001:db8::/32"),
    ("::/0", "::/0"),
])
def test_ipv4_mapped_list_entries_load_as_ipv4(entry, loaded):
    cfg = parse_config({"backends": [{"url": "http://b"}], "security": {"ip_whitelist": [entry]}})
    assert cfg.security.ip_whitelist == [loaded]


@pytest.mark.parametrize(("entry", "says"), [
    ("::ffff:192.0.2.0/64", "write an IPv4 range (192.0.2.0/N)"),
    ("::ffff:192.0.2.1/120", "did you mean 192.0.2.0/24?"),
])
def test_ipv4_mapped_list_entries_that_cannot_be_ipv4_are_refused_with_a_hint(entry, says):
    with pytest.raises(ConfigError) as error:
        parse_config({"backends": [{"url": "http://b"}], "security": {"ip_blacklist": [entry]}})
    assert error.value.path == "security.ip_blacklist[0]" and says in str(error.value)


@pytest.mark.parametrize(("security", "where"), [
    ({"ip_whitelist": ["192.168.1.1/24"]}, "security.ip_whitelist[0]"),  # host bits: a typo
    ({"ip_blacklist": ["1.2.3"]}, "security.ip_blacklist[0]"),
    ({"ip_whitelist": "10.0.0.1"}, "security.ip_whitelist"),
    ({"ip_allowlist": []}, "security.ip_allowlist"),
])
def test_bad_security_lists_are_refused(security, where):
    with pytest.raises(ConfigError) as error:
        parse_config({"backends": [{"url": "http://b"}], "security": security})
    assert error.value.path == where


@pytest.mark.parametrize(("jwt", "where"), [
    ({"audience": "a", "hs256_secret": SECRET}, "auth.jwt.issuer"),
    ({"issuer": "i", "hs256_secret": SECRET}, "auth.jwt.audience"),
    ({**BASE}, "auth.jwt"),  # no key source
    ({**BASE, "hs256_secret": SECRET, "jwks_url": "https://idp/jwks"}, "auth.jwt"),  # two
    ({**BASE, "hs256_secret": "short"}, "auth.jwt.hs256_secret"),
    ({**BASE, "hs256_secret": SECRET, "algorithms": ["none"]}, "auth.jwt.algorithms[0]"),
    ({**BASE, "hs256_secret": SECRET, "algorithms": ["RS256"]}, "auth.jwt.algorithms[0]"),  # confusion
    ({**BASE, "jwks_url": "https://idp/jwks", "algorithms": ["HS256"]}, "auth.jwt.algorithms[0]"),  # confusion
    ({**BASE, "jwks_url": "ftp://idp/jwks"}, "auth.jwt.jwks_url"),
    ({**BASE, "jwks_url": "http://idp.example/jwks"}, "auth.jwt.jwks_url"),  # in clear, beyond this host
    ({**BASE, "jwks_url": "http://10.0.0.1/jwks"}, "auth.jwt.jwks_url"),
    ({**BASE, "jwks_url": "http://localhost.evil.test/jwks"}, "auth.jwt.jwks_url"),
    ({**BASE, "public_keys": ["not a key"]}, "auth.jwt.public_keys[0]"),
    ({**BASE, "hs256_secret": SECRET, "credentials_file": "c.yaml"}, "auth.jwt.claims.credential"),
    ({**BASE, "hs256_secret": SECRET, "tenants": {"a b": {}}}, "auth.jwt.tenants.a b"),
    ({**BASE, "hs256_secret": SECRET, "tenants": {"t": {"backend_keys": {"nope": "k"}}}},
     "auth.jwt.tenants.t.backend_keys.nope"),
    ({**BASE, "hs256_secret": SECRET, "tenants": {"t": {"allowed_ips": ["x"]}}}, "auth.jwt.tenants.t.allowed_ips[0]"),
])
def test_bad_jwt_configs_are_refused_naming_the_key(jwt, where):
    with pytest.raises(ConfigError) as error:
        config(jwt)
    assert error.value.path == where
    assert SECRET not in str(error.value)


def test_a_jwt_config_loads_with_every_key_source(tmp_path):
    key = SigningKey("k")
    assert config({**BASE, "hs256_secret": SECRET}).auth.jwt.algorithms == ["HS256"]
    assert config({**BASE, "jwks_url": "https://idp/jwks"}).auth.jwt.algorithms == ["RS256"]
    for loopback in ("http://127.0.0.1:8080/jwks", "http://127.1.2.3/jwks", "http://[::1]:80/jwks",
                     "http://LocalHost/jwks"):  # plain http stays on this host
        assert config({**BASE, "jwks_url": loopback}).auth.jwt.jwks_url == loopback
    cfg = config({**BASE, "public_keys": key.public_pem, "algorithms": ["RS256", "PS256"]})
    assert cfg.auth.jwt.public_keys == [key.public_pem.strip()]
    assert cfg.auth.keys == []  # tokens alone may be the way in


def test_byok_credentials_are_expanded_checked_and_masked(monkeypatch):
    monkeypatch.setenv("TEAM_B_KEY", "sk-provider-secret-xyz")
    cfg = config(keys=[{"key": "k" * 20, "backend_keys": {"b": "${TEAM_B_KEY}"}}],
                 jwt={**BASE, "hs256_secret": SECRET, "tenants": {"t": {"backend_keys": {"b": "sk-tenant-secret"}}}})
    assert cfg.auth.keys[0].backend_keys == {"b": "sk-provider-secret-xyz"}
    dumped = dump_config(cfg)
    for secret in ("sk-provider-secret-xyz", "sk-tenant-secret", SECRET):
        assert secret not in dumped and secret not in repr(cfg)
    assert yaml.safe_load(dumped)["auth"]["keys"][0]["backend_keys"] == {"b": "***"}
    with pytest.raises(ConfigError) as error:
        config(keys=[{"key": "k" * 20, "backend_keys": {"typo": "x"}}])
    assert error.value.path == "auth.keys[0].backend_keys.typo"
    with pytest.raises(ConfigError) as error:
        config(keys=[{"key": "k" * 20, "backend_keys": {"b": "two words"}}])
    assert "two words" not in str(error.value)


def test_a_credentials_file_must_read(tmp_path):
    with pytest.raises(ConfigError) as error:
        parse_config({"backends": [{"url": "http://b"}], "auth": {"enabled": True, "jwt": {
            **BASE, "hs256_secret": SECRET, "claims": {"credential": "c"}, "credentials_file": "missing.yaml"}}},
            base_dir=tmp_path)
    assert error.value.path == "auth.jwt.credentials_file"


def test_without_pyjwt_auth_jwt_refuses_to_start(monkeypatch):
    monkeypatch.setitem(sys.modules, "jwt", None)  # as if the extra were not installed
    with pytest.raises(ConfigError) as error:
        config({**BASE, "hs256_secret": SECRET})
    assert error.value.path == "auth.jwt" and "pip install 'llmproxy[jwt]'" in error.value.reason


def test_the_dump_of_security_and_jwt_loads_back():
    cfg = parse_config({"backends": [{"url": "http://b", "name": "b"}],
                        "security": {"ip_whitelist": ["10.0.0.0/8", "::1"], "ip_blacklist": ["10.0.0.9"]},
                        "auth": {"enabled": True, "jwt": {**BASE, "jwks_url": "https://idp/jwks", "leeway": "10s",
                                                          "tenants": {"t": {"models": ["m"]}}}}})
    assert parse_config(yaml.safe_load(dump_config(cfg))) == cfg


def test_jwt_without_auth_enabled_is_warned_about():
    from llmproxy.config import config_warnings

    cfg = parse_config({"backends": [{"url": "http://b"}], "auth": {"jwt": {**BASE, "hs256_secret": SECRET}}})
    assert any(w.startswith("auth.jwt:") for w in config_warnings(cfg))
