"""API keys: who is calling.

A key arrives as `Authorization: Bearer <key>` or `X-API-Key: <key>` (auth.header_names). It is hashed
(SHA-256) and looked up by digest, so the ring holds no raw key and a lookup reveals nothing useful about
timing. Every failure - missing, malformed, unknown - gets the same 401, so probing learns nothing; two
*different* credentials in one request are a 400 (which one would we bill?). The raw key is never logged
nor forwarded: the backend gets its own `api_key`, logs and usage records get `key_id`, a digest prefix.

`skip_paths` match the request path exactly, as the codec made it canonical (http11/path.py): `//health`
and `/%68ealth` are `/health`, while `/health/../v1/chat/completions` is `/v1/chat/completions` and needs
a key like any other path.

With auth.jwt set, a credential shaped as a JWT (three dot-separated parts) is a tenant token and goes to
the verifier (jwtauth.py); every other one is looked up as a key. Either way the caller is a Tenant, and a
refusal the same 401: the reason goes to the access log and the metrics only.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING

from llmproxy.config.model import AuthConfig, RateLimitConfig
from llmproxy.errors import ProxyError, Unauthorized
from llmproxy.http11.request import RequestHead
from llmproxy.tenant import Tenant, tenant_from

if TYPE_CHECKING:
    from llmproxy.jwtauth import JwtVerifier

KEY_ID_LENGTH = 12  # hex digits of the digest shown in logs and metrics: unique enough, useless to an attacker


class KeyRing:
    def __init__(self, auth: AuthConfig, rate_limit: RateLimitConfig, previous: KeyRing | None = None) -> None:
        self.enabled = auth.enabled
        self.skip_paths = frozenset(path.encode() for path in auth.skip_paths)
        # Lower-case names, as the codec gives them; True marks the one that carries "Bearer <key>".
        self.header_names = {name.lower().encode(): name.lower() == "authorization" for name in auth.header_names}
        refuse_missing = auth.byok_missing == "refuse"
        # digest -> (digest, tenant): the stored digest is what the lookup result is compared with
        self._keys = {k.key_sha256: (k.key_sha256, tenant_from(k, k.key_sha256[:KEY_ID_LENGTH], rate_limit.per_key,
                                                               refuse_missing)) for k in auth.keys}
        self.jwt: JwtVerifier | None = None
        if auth.jwt is not None:
            from llmproxy.jwtauth import JwtVerifier  # PyJWT is an extra: imported only when configured

            self.jwt = JwtVerifier(auth.jwt, rate_limit.per_key, refuse_missing,
                                   previous.jwt if previous is not None else None)

    async def start(self) -> None:
        """Fetch what verification needs before the first request (a JWKS key set)."""
        if self.jwt is not None:
            await self.jwt.start()

    def close(self) -> None:
        """At shutdown: stop a key-set fetch in progress."""
        if self.jwt is not None:
            self.jwt.close()

    def skips(self, path: bytes) -> bool:
        return path in self.skip_paths

    def authenticate(self, head: RequestHead) -> Tenant:
        """The caller of the key or token this request carries; raises Unauthorized (401), ProxyError
        "ambiguous_credentials" (400), or KeyRefresh (a token's signing key is being fetched: wait, retry)."""
        token = self._credential(head)
        jwt = self.jwt
        if jwt is not None and looks_like_jwt(token):
            return jwt.verify(token)
        digest = hashlib.sha256(token).hexdigest()
        found = self._keys.get(digest)
        if found is None or not hmac.compare_digest(found[0], digest):
            raise Unauthorized("unknown_key")
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
            raise Unauthorized("missing")
        return found


def _bearer_token(value: bytes) -> bytes:
    parts = value.split(None, 1)
    if len(parts) != 2 or parts[0].lower() != b"bearer":
        return b""  # another scheme (Basic...) or none: no key
    return parts[1].strip()


def looks_like_jwt(token: bytes) -> bool:
    """A JSON header ("eyJ" is `{"` in base64url) and three dot-separated parts: what a JWT is, and what no
    `llmproxy keygen` key is."""
    return token.startswith(b"eyJ") and token.count(b".") == 2
