"""Parsers of the `auth` and `rate_limit` sections, and the checks that span sections.

A raw API key never outlives parsing: `key:` is hashed to `key_sha256` here, so nothing downstream (dumps,
logs, the key ring) can leak it.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import yaml

from llmproxy.config.model import (
    BUDGET_PERIODS,
    RATE_LIMIT_STORES,
    STORE_ERROR_POLICIES,
    ApiKeyConfig,
    AuthConfig,
    BudgetConfig,
    Config,
    LimitConfig,
    RateLimitConfig,
)
from llmproxy.config.redis_url import parse_redis_url
from llmproxy.config.values import (
    ConfigError,
    _bool,
    _choice,
    _clean_string,
    _int_at_least,
    _join,
    _list_of,
    _non_negative_number,
    _optional,
    _parse_fields,
    _show,
    _string_list,
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


def _parse_key(value: Any, path: str) -> ApiKeyConfig:
    fields = {
        "key": _clean_string("key"),
        "key_sha256": _clean_string("hex SHA-256 digest"),
        "user_id": _clean_string("user id"),
        "name": _clean_string("name"),
        "models": lambda v, p: _string_list(v, p, "model name"),
        "rate_limit": _parse_limits,
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
    }
    return AuthConfig(**_parse_fields(value, path, fields))


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
    if config.store == "redis" and not config.redis_url:
        raise ConfigError(_join(path, "redis_url"), "is required with store: redis")
    if config.store == "redis":
        try:
            parse_redis_url(config.redis_url, config.cluster)
        except ValueError as error:
            raise ConfigError(_join(path, "redis_url"), str(error)) from None
    elif config.cluster:
        raise ConfigError(_join(path, "cluster"), "applies to store: redis only")
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


def access_warnings(config: Config) -> list[str]:
    """What is valid but almost certainly not meant, one line each (check-config and serve say them)."""
    auth = config.auth
    warnings = []
    if auth.keys and not auth.enabled:
        warnings.append(f"auth.keys: {len(auth.keys)} key(s) configured but auth.enabled is false: requests are "
                        "not checked for a key (add `enabled: true` under auth)")
    return warnings


def check_access(config: Config) -> None:
    """Checks that span sections; raises ConfigError naming the key to change."""
    auth, rate = config.auth, config.rate_limit
    seen: dict[str, int] = {}
    for i, key in enumerate(auth.keys):
        if key.key_sha256 in seen:
            raise ConfigError(f"auth.keys[{i}]", f"the same key as auth.keys[{seen[key.key_sha256]}]")
        seen[key.key_sha256] = i
    if auth.enabled and not auth.keys:
        raise ConfigError("auth.keys", "auth is enabled but no key is configured: nobody could get in")
    if not rate.enabled:
        return
    per_key_set = rate.per_key != LimitConfig() or any(k.rate_limit for k in auth.keys)
    if per_key_set and not auth.enabled:
        raise ConfigError("rate_limit.per_key", "limits are per API key: enable auth (or use rate_limit.global)")
    uses_tokens = any(limits is not None and (limits.tokens_per_minute or limits.budget)
                      for limits in (rate.per_key, rate.global_limits, *(k.rate_limit for k in auth.keys)))
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
