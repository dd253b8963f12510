"""Parser of `auth.jwt`: tenant JWTs, and what each tenant carries.

Algorithm confusion is refused here, before any token is seen: a shared secret goes with HMAC algorithms
only and public keys (a JWKS URL or PEM keys) with asymmetric ones only, so a token can never have a public
key used as its HMAC secret; `none` is no algorithm at all.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit

from llmproxy.config.model import (
    JWT_HMAC_ALGORITHMS,
    JWT_KEY_ALGORITHMS,
    JwtClaimsConfig,
    JwtConfig,
    JwtTenantConfig,
)
from llmproxy.config.values import (
    ConfigError,
    _clean_string,
    _join,
    _mapping,
    _optional,
    _parse_fields,
    _positive_duration,
    _section,
    _show,
    _string_list,
    parse_duration,
)

MIN_SECRET_LENGTH = 32  # an HS256 key shorter than its 256-bit output can be brute-forced offline
TENANT_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:@-")


def parse_jwt(value: Any, path: str, key_fields: dict[str, Any]) -> JwtConfig:
    """`key_fields`: the parsers of an API key's models, rate_limit, allowed_ips and backend_keys, which a
    tenant shares."""
    tenant_fields = {"user_id": _clean_string("user id"), **key_fields}
    fields = {
        "issuer": _clean_string("issuer"),
        "audience": _audience,
        "jwks_url": _optional(_jwks_url),
        "public_keys": _public_keys,
        "hs256_secret": _optional(_secret),
        "algorithms": lambda v, p: _string_list(v, p, "algorithm"),
        "claims": _section(JwtClaimsConfig, {name: _clean_string("claim name") for name in
                                             ("tenant", "user", "models", "credential")}),
        "leeway": parse_duration,
        "jwks_refresh": _positive_duration,
        "jwks_timeout": _positive_duration,
        "tenants": lambda v, p: _tenants(v, p, tenant_fields),
        "credentials_file": _optional(_clean_string("file path")),
    }
    values = _parse_fields(value, path, fields)
    for required in ("issuer", "audience"):
        if required not in values:
            raise ConfigError(_join(path, required), "is required: a token for another issuer or service must "
                                                     "not get in")
    sources = [name for name in ("jwks_url", "public_keys", "hs256_secret") if values.get(name)]
    if len(sources) != 1:
        raise ConfigError(path, "needs exactly one of jwks_url, public_keys and hs256_secret"
                                + (f", got {', '.join(sources)}" if sources else ""))
    config = JwtConfig(**values)
    config.algorithms = _algorithms(config, _join(path, "algorithms"))
    if config.credentials_file and not config.claims.credential:
        raise ConfigError(_join(path, "claims.credential"), "is required with credentials_file: the claim naming "
                                                            "a tenant's entry")
    _check_installed(path)
    for i, pem in enumerate(config.public_keys):
        _check_public_key(pem, f"{path}.public_keys[{i}]")
    return config


def _audience(value: Any, path: str) -> list[str]:
    return [_clean_string("audience")(value, path)] if isinstance(value, str) else _string_list(value, path,
                                                                                                 "audience")


def _jwks_url(value: Any, path: str) -> str:
    url = _clean_string("https:// URL")(value, path)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(path, f"must be an https:// URL, got {_show(value)}")
    if parts.scheme == "http" and not _loopback(parts.hostname):
        # Whoever can change the key set in transit can sign any tenant's tokens.
        raise ConfigError(path, f"must be an https:// URL (plain http only to a loopback address: 127.0.0.0/8, "
                                f"::1, localhost), got {_show(value)}")
    return url


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _public_keys(value: Any, path: str) -> list[str]:
    if value is None or value == []:
        return []  # none (as check-config prints it with another key source)
    keys = [value] if isinstance(value, str) else value
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k.strip() for k in keys):
        raise ConfigError(path, "must be a PEM public key or a list of them")
    return [key.strip() for key in keys]


def _secret(value: Any, path: str) -> str:
    if not isinstance(value, str) or len(value) < MIN_SECRET_LENGTH:
        # Never echo it: it is a secret.
        raise ConfigError(path, f"must be a string of at least {MIN_SECRET_LENGTH} characters")
    return value


def _algorithms(config: JwtConfig, path: str) -> list[str]:
    hmac = config.hs256_secret is not None
    allowed = JWT_HMAC_ALGORITHMS if hmac else JWT_KEY_ALGORITHMS
    algorithms = config.algorithms or (["HS256"] if hmac else ["RS256"])
    for i, name in enumerate(algorithms):
        if name not in allowed:
            source = "hs256_secret" if hmac else "public keys (jwks_url, public_keys)"
            raise ConfigError(f"{path}[{i}]", f"{_show(name)} cannot be used with {source}: one of "
                                              f"{', '.join(allowed)}")
    return algorithms


def _tenants(value: Any, path: str, fields: dict[str, Any]) -> dict[str, JwtTenantConfig]:
    tenants = {}
    for tid, settings in _mapping(value, path).items():
        item = _join(path, str(tid))
        if not isinstance(tid, str) or not tid or not set(tid) <= TENANT_ID_CHARS:
            raise ConfigError(item, "a tenant id is letters, digits and . _ : @ -")
        tenants[tid] = JwtTenantConfig(**_parse_fields(settings, item, fields))
    return tenants


def _check_installed(path: str) -> None:
    try:
        import jwt  # noqa: F401
        from cryptography.hazmat.primitives import serialization  # noqa: F401
    except ImportError:
        raise ConfigError(path, "tenant JWTs need PyJWT with cryptography: pip install 'llmproxy[jwt]'") from None


def _check_public_key(pem: str, path: str) -> None:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        load_pem_public_key(pem.encode())
    except (ValueError, TypeError):
        raise ConfigError(path, "not a PEM public key (-----BEGIN PUBLIC KEY----- ...)") from None

