"""API keys: who is calling.

A key arrives as `Authorization: Bearer <key>` or `X-API-Key: <key>` (auth.header_names). It is hashed
(SHA-256) and looked up by digest, so the ring holds no raw key and a lookup reveals nothing useful about
timing. Every failure - missing, malformed, unknown - gets the same 401, so probing learns nothing; two
*different* credentials in one request are a 400 (which one would we bill?). The raw key is never logged
nor forwarded: the backend gets its own `api_key`, logs and usage records get `key_id`, a digest prefix.

`skip_paths` match the exact request path only: `//health`, `/health/../v1/chat/completions` or
`/%68ealth` are not `/health`, so they need a key like any other path.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from llmproxy.config.model import ApiKeyConfig, AuthConfig, LimitConfig, RateLimitConfig
from llmproxy.errors import ProxyError
from llmproxy.http11.request import RequestHead
from llmproxy.ratelimit import limits_for

KEY_ID_LENGTH = 12  # hex digits of the digest shown in logs and metrics: unique enough, useless to an attacker


@dataclass(frozen=True, slots=True)
class ApiKey:
    key_id: str
    user_id: str | None
    models: frozenset[str] | None  # None: any model
    limits: object  # ratelimit.store.Limits of this key (rate_limit.per_key, then the key's overrides)
    digest: str

    @property
    def scope(self) -> str:
        return f"key:{self.key_id}"

    def may_use(self, *models: str | None) -> bool:
        """True if the key may use a model known by any of these names (the requested one, an alias's target)."""
        allowed = self.models
        return allowed is None or any(m in allowed for m in models if m is not None)


class KeyRing:
    def __init__(self, auth: AuthConfig, rate_limit: RateLimitConfig) -> None:
        self.enabled = auth.enabled
        self.skip_paths = frozenset(path.encode() for path in auth.skip_paths)
        # Lower-case names, as the codec gives them; True marks the one that carries "Bearer <key>".
        self.header_names = {name.lower().encode(): name.lower() == "authorization" for name in auth.header_names}
        self._keys = {k.key_sha256: _api_key(k, rate_limit.per_key) for k in auth.keys}

    def skips(self, path: bytes) -> bool:
        return path in self.skip_paths

    def authenticate(self, head: RequestHead) -> ApiKey:
        """The key this request carries; raises ProxyError "unauthorized" (401) or "ambiguous_credentials" (400)."""
        token = self._credential(head)
        digest = hashlib.sha256(token).hexdigest()
        key = self._keys.get(digest)
        if key is None or not hmac.compare_digest(key.digest, digest):
            raise ProxyError("unauthorized", "Incorrect API key provided.")
        return key

    def _credential(self, head: RequestHead) -> bytes:
        found: bytes | None = None
        for name, value in head.headers:
            bearer = self.header_names.get(name)
            if bearer is None:
                continue
            token = _bearer_token(value) if bearer else value.strip()
            if found is not None and token != found:
                raise ProxyError("ambiguous_credentials", "Two different API keys in one request: send one.")
            found = token
        if not found:
            raise ProxyError("unauthorized", "Incorrect API key provided.")
        return found


def _bearer_token(value: bytes) -> bytes:
    parts = value.split(None, 1)
    if len(parts) != 2 or parts[0].lower() != b"bearer":
        return b""  # another scheme (Basic...) or none: no key
    return parts[1].strip()


def _api_key(config: ApiKeyConfig, per_key: LimitConfig) -> ApiKey:
    return ApiKey(
        key_id=config.key_sha256[:KEY_ID_LENGTH],
        user_id=config.user_id,
        models=None if config.models is None else frozenset(config.models),
        limits=limits_for(per_key, config.rate_limit),
        digest=config.key_sha256,
    )
