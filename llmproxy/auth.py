"""API keys: who is calling.

A key arrives as `Authorization: Bearer <key>` or `X-API-Key: <key>` (auth.header_names). It is hashed
(SHA-256) and looked up by digest, so the ring holds no raw key and a lookup reveals nothing useful about
timing. Every failure - missing, malformed, unknown - gets the same 401, so probing learns nothing; two
*different* credentials in one request are a 400 (which one would we bill?). The raw key is never logged
nor forwarded: the backend gets its own `api_key`, logs and usage records get `key_id`, a digest prefix.

`skip_paths` match the request path exactly, as the codec made it canonical (http11/path.py): `//health`
and `/%68ealth` are `/health`, while `/health/../v1/chat/completions` is `/v1/chat/completions` and needs
a key like any other path.
"""

from __future__ import annotations

import hashlib
import hmac

from llmproxy.config.model import ApiKeyConfig, AuthConfig, LimitConfig, RateLimitConfig
from llmproxy.errors import ProxyError
from llmproxy.http11.request import RequestHead
from llmproxy.ratelimit import limits_for
from llmproxy.tenant import Tenant

KEY_ID_LENGTH = 12  # hex digits of the digest shown in logs and metrics: unique enough, useless to an attacker


class KeyRing:
    def __init__(self, auth: AuthConfig, rate_limit: RateLimitConfig) -> None:
        self.enabled = auth.enabled
        self.skip_paths = frozenset(path.encode() for path in auth.skip_paths)
        # Lower-case names, as the codec gives them; True marks the one that carries "Bearer <key>".
        self.header_names = {name.lower().encode(): name.lower() == "authorization" for name in auth.header_names}
        # digest -> (digest, tenant): the stored digest is what the lookup result is compared with
        self._keys = {k.key_sha256: (k.key_sha256, _tenant(k, rate_limit.per_key)) for k in auth.keys}

    def skips(self, path: bytes) -> bool:
        return path in self.skip_paths

    def authenticate(self, head: RequestHead) -> Tenant:
        """The caller of the key this request carries; raises ProxyError "unauthorized" (401) or
        "ambiguous_credentials" (400)."""
        token = self._credential(head)
        digest = hashlib.sha256(token).hexdigest()
        found = self._keys.get(digest)
        if found is None or not hmac.compare_digest(found[0], digest):
            raise ProxyError("unauthorized", "Incorrect API key provided.")
        return found[1]

    def _credential(self, head: RequestHead) -> bytes:
        found: bytes | None = None
        for name, value in head.headers:
            bearer = self.header_names.get(name)
            if bearer is None:
                continue
            token = _bearer_token(value) if bearer else value.strip()
            if not token:
                continue  # no key in it (empty, or another scheme such as Basic): not a second key either
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


def _tenant(config: ApiKeyConfig, per_key: LimitConfig) -> Tenant:
    return Tenant(
        key_id=config.key_sha256[:KEY_ID_LENGTH],
        user_id=config.user_id,
        models=None if config.models is None else frozenset(config.models),
        limits=limits_for(per_key, config.rate_limit),
    )
