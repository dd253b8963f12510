"""Parsers of the `auth`, `security` and `rate_limit` sections, and the checks that span sections.

A raw API key never outlives parsing: `key:` is hashed to `key_sha256` here, so nothing downstream (dumps,
logs, the key ring) can leak it.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import yaml

from llmproxy.config.jwt import parse_jwt
from llmproxy.config.model import (
    BUDGET_PERIODS,
    BYOK_MISSING,
    RATE_LIMIT_STORES,
    STORE_ERROR_POLICIES,
    ApiKeyConfig,
    AuthConfig,
    BudgetConfig,
    Config,
    LimitConfig,
    RateLimitConfig,
    SecurityConfig,
)
from llmproxy.config.values import (
    ConfigError,
    _api_key,
    _bool,
    _choice,
    _clean_string,
    _expand,
    _int_at_least,
    _join,
    _list_of,
    _mapping,
    _non_negative_number,
    _optional,
    _parse_fields,
    _section,
    _show,
    _string_list,
    _trusted_proxies,
    check_redis_store,
)

MIN_KEY_LENGTH = 16  # shorter keys can be guessed; `llmproxy keygen` makes 43-character ones
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_HEADER_NAME = re.compile(r"[A-Za-z0-9-]+")


def key_digest(key: str) -> str:
    """The SHA-256 hex digest keys are stored and looked up by."""
    return hashlib.sha256(key.encode()).hexdigest()


def _positive_number(value: Any, path: str) -> float:
    number = _non_negative_number(value, path)
    if number == 0:
        raise ConfigError(path, f"must be greater than 0, got {_show(value)}")
    return number


def _parse_budget(value: Any, path: str) -> BudgetConfig:
    fields = {"per": _choice(BUDGET_PERIODS), "tokens": _int_at_least(1), "usd": _positive_number}
    values = _parse_fields(value, path, fields)
    if "per" not in values:
        raise ConfigError(_join(path, "per"), f"is required ({', '.join(BUDGET_PERIODS)})")
    if "tokens" not in values and "usd" not in values:
        raise ConfigError(path, "needs a cap: tokens, usd or both")
    return BudgetConfig(**values)


_LIMIT_FIELDS = {
    "requests_per_minute": _optional(_positive_number),
    "burst": _optional(_int_at_least(1)),
    "max_concurrent": _optional(_int_at_least(1)),
    "tokens_per_minute": _optional(_int_at_least(1)),
    "budget": _optional(_parse_budget),
}


def _parse_limits(value: Any, path: str) -> LimitConfig:
    return LimitConfig(**_parse_fields(value, path, _LIMIT_FIELDS))


def _ip_list(value: Any, path: str) -> list[str]:
    """Addresses and CIDR ranges, IPv4 or IPv6 (a single address is its own /32 or /128)."""
    return _trusted_proxies([] if value is None else value, path)


def _backend_keys(value: Any, path: str) -> dict[str, str]:
    """BYOK credentials by backend name; each value "${ENV}"-expanded, an empty one dropped (no key)."""
    if value is not None and not isinstance(value, dict):  # never echoed: it may be a credential
        raise ConfigError(path, "must be a mapping of backend name to credential")
    keys = {}
    for name, raw in _mapping(value, path).items():
        item = _join(path, str(name))
        key = _api_key(_expand(raw, item), item)
        if key is not None:
            keys[_clean_string("backend name")(name, item)] = key
    return keys


# What a caller carries, whether it is an API key or a JWT tenant (auth.jwt.tenants).
_CALLER_FIELDS = {
    "models": lambda v, p: _string_list(v, p, "model name"),
    "rate_limit": _parse_limits,
    "allowed_ips": _ip_list,
    "backend_keys": _backend_keys,
}


def _parse_key(value: Any, path: str) -> ApiKeyConfig:
    fields = {
        "key": _clean_string("key"),
        "key_sha256": _clean_string("hex SHA-256 digest"),
        "user_id": _clean_string("user id"),
        "name": _clean_string("name"),
        **_CALLER_FIELDS,
    }
    values = _parse_fields(value, path, fields)
    key, digest = values.pop("key", None), values.pop("key_sha256", None)
    if (key is None) == (digest is None):
        raise ConfigError(path, "needs exactly one of key or key_sha256")
    if key is not None and len(key) < MIN_KEY_LENGTH:
        raise ConfigError(_join(path, "key"), f"must be at least {MIN_KEY_LENGTH} characters (llmproxy keygen)")
    if digest is not None and not _HEX_DIGEST.fullmatch(digest.lower()):
        raise ConfigError(_join(path, "key_sha256"), "must be 64 hex digits (llmproxy keygen prints it)")
    return ApiKeyConfig(key_sha256=key_digest(key) if key is not None else digest.lower(), **values)


_parse_keys = _list_of(_parse_key, "keys")


def _header_names(value: Any, path: str) -> list[str]:
    names = _string_list(value, path, "header name")
    for i, name in enumerate(names):
        if not _HEADER_NAME.fullmatch(name):
            raise ConfigError(f"{path}[{i}]", f"not a header name: {_show(name)}")
    return names


def _skip_paths(value: Any, path: str) -> list[str]:
    if value == []:
        return []
    paths = _string_list(value, path, "path")
    for i, item in enumerate(paths):
        if not item.startswith("/"):
            raise ConfigError(f"{path}[{i}]", f"must be a path starting with /, got {_show(item)}")
    return paths


def parse_auth(value: Any, path: str) -> AuthConfig:
    fields = {
        "enabled": _bool,
        "header_names": _header_names,
        "skip_paths": _skip_paths,
        "keys": _parse_keys,
        "keys_file": _optional(_clean_string("file path")),
        "metrics_per_key": _bool,
        "jwt": _optional(lambda v, p: parse_jwt(v, p, _CALLER_FIELDS)),
        "byok_missing": _choice(BYOK_MISSING),
    }
    return AuthConfig(**_parse_fields(value, path, fields))


parse_security = _section(SecurityConfig, {"ip_whitelist": _ip_list, "ip_blacklist": _ip_list})


def parse_rate_limit(value: Any, path: str) -> RateLimitConfig:
    fields = {
        "enabled": _bool,
        "store": _choice(RATE_LIMIT_STORES),
        "redis_url": _optional(_clean_string("redis:// URL")),
        "cluster": _bool,
        "on_store_error": _choice(STORE_ERROR_POLICIES),
        "reserve_max_tokens": _bool,
        "per_key": _parse_limits,
        "global": _parse_limits,
    }
    values = _parse_fields(value, path, fields)
    if "global" in values:
        values["global_limits"] = values.pop("global")
    config = RateLimitConfig(**values)
    check_redis_store(config.store, config.redis_url, config.cluster, path, "is required with store: redis")
    return config


# ---------------------------------------------------------------------------------------------------------
# After all sections are parsed


def load_keys_file(config: Config, base_dir: Path) -> None:
    """Add the keys of auth.keys_file (relative to the config file's folder) to auth.keys."""
    name = config.auth.keys_file
    if name is None:
        return
    path = base_dir / name
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except OSError as exc:
        raise ConfigError("auth.keys_file", f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError("auth.keys_file", f"{path}: invalid YAML: {exc}") from None
    keys = _parse_fields(data, f"{name}", {"keys": _parse_keys}).get("keys", [])
    config.auth.keys = [*config.auth.keys, *keys]


def load_credentials_file(config: Config, base_dir: Path) -> None:
    """Make auth.jwt.credentials_file absolute (relative to the config file's folder) and check it reads."""
    jwt = config.auth.jwt
    if jwt is None or jwt.credentials_file is None:
        return
    jwt.credentials_file = str((base_dir / jwt.credentials_file).absolute())
    try:
        read_credentials_file(jwt.credentials_file)
    except ConfigError as error:
        raise ConfigError("auth.jwt.credentials_file", error.reason) from None


def read_credentials_file(path: str) -> dict[str, dict[str, str]]:
    """The BYOK entries of a credentials file: `credentials: {name: {backend: key}}`; raises ConfigError."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8-sig"))
    except OSError as exc:
        raise ConfigError(path, f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError:
        raise ConfigError(path, f"{path}: invalid YAML") from None  # no excerpt: the file holds secrets
    try:
        entries = _parse_fields(data, Path(path).name, {"credentials": _mapping}).get("credentials", {})
        return {str(name): _backend_keys(keys, f"credentials.{name}") for name, keys in entries.items()}
    except ConfigError as error:  # the reason may quote a value, and every value here is a secret
        raise ConfigError(path, f"{error.path}: must be credentials: {{name: {{backend: key}}}}") from None


def _check_backend_keys(config: Config) -> None:
    """A BYOK credential must name a configured backend (a typo would silently bill the backend's own key)."""
    names = {backend.name for backend in config.backends}
    auth = config.auth
    callers = [(f"auth.keys[{i}]", key) for i, key in enumerate(auth.keys)]
    if auth.jwt is not None:
        callers += [(f"auth.jwt.tenants.{tid}", tenant) for tid, tenant in auth.jwt.tenants.items()]
    for path, caller in callers:
        for name in caller.backend_keys or ():
            if name not in names:
                raise ConfigError(f"{path}.backend_keys.{name}", f"no backend is named {_show(name)} "
                                                                 f"(backends: {', '.join(sorted(names))})")


def access_warnings(config: Config) -> list[str]:
    """What is valid but almost certainly not meant, one line each (check-config and serve say them)."""
    auth = config.auth
    warnings = []
    if auth.keys and not auth.enabled:
        warnings.append(f"auth.keys: {len(auth.keys)} key(s) configured but auth.enabled is false: requests are "
                        "not checked for a key (add `enabled: true` under auth)")
    if auth.jwt is not None and not auth.enabled:
        warnings.append("auth.jwt: tenant JWTs configured but auth.enabled is false: requests are not checked for "
                        "a token (add `enabled: true` under auth)")
    return warnings


def check_access(config: Config) -> None:
    """Checks that span sections; raises ConfigError naming the key to change."""
    auth, rate = config.auth, config.rate_limit
    seen: dict[str, int] = {}
    for i, key in enumerate(auth.keys):
        if key.key_sha256 in seen:
            raise ConfigError(f"auth.keys[{i}]", f"the same key as auth.keys[{seen[key.key_sha256]}]")
        seen[key.key_sha256] = i
    if auth.enabled and not auth.keys and auth.jwt is None:
        raise ConfigError("auth.keys", "auth is enabled but no key (nor auth.jwt) is configured: nobody could "
                                       "get in")
    _check_backend_keys(config)
    if not rate.enabled:
        return
    callers = [*auth.keys, *(auth.jwt.tenants.values() if auth.jwt is not None else ())]
    per_key_set = rate.per_key != LimitConfig() or any(c.rate_limit for c in callers)
    if per_key_set and not auth.enabled:
        raise ConfigError("rate_limit.per_key", "limits are per API key: enable auth (or use rate_limit.global)")
    uses_tokens = any(limits is not None and (limits.tokens_per_minute or limits.budget)
                      for limits in (rate.per_key, rate.global_limits, *(c.rate_limit for c in callers)))
    if uses_tokens and not config.usage.metering:
        raise ConfigError("rate_limit", "token limits and budgets are charged from metered usage: "
                                        "usage.metering must be true")
    workers = config.server.workers
    if workers > 1 and rate.store == "memory":
        raise ConfigError("server.workers", f"with {workers} workers the memory store would multiply every "
                                            f"limit by {workers}: set rate_limit.store: redis")
    if rate.store == "redis":
        try:
            import redis  # noqa: F401
        except ImportError:
            raise ConfigError("rate_limit.store", "redis needs the redis package: "
                                                  "pip install 'llmproxy[redis]'") from None
