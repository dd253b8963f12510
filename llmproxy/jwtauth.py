"""Tenant JWTs (auth.jwt): a signed token names a tenant, which then carries limits, budgets, models, address
rules and own backend credentials exactly as an API key does.

A token is verified with PyJWT against the algorithms configured (never `none`; a secret only with HMAC ones,
public keys only with asymmetric ones, and a key only with the algorithms of its type, so no algorithm
confusion), then its issuer, audience, expiry and not-before (with `leeway`). The tenant's key_id is
"tenant:<tid>", from the tenant claim and never from the token, so its counters (and budgets) are the same
on every replica sharing the Redis store, whichever token it came with.

Keys from a JWKS URL are fetched off the request path: at start, again every jwks_refresh in the background
(the request that notices stays on the cached keys), and when a token names a `kid` not in the set, at most
once a minute; only that request waits for the fetch (up to jwks_timeout). While fetching fails, no fetch
starts before a backoff (10 s doubling to 60 s) has passed, and the outage is logged once. A verified token
is remembered until it expires (or the key set changes): a client sends the same token many times, and its
signature is checked once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from llmproxy.byok import CredentialsFile, FileBackendKeys
from llmproxy.config.jwt import TENANT_ID_CHARS
from llmproxy.config.model import JwtConfig, JwtTenantConfig, LimitConfig
from llmproxy.errors import KeyRefresh, Unauthorized
from llmproxy.tenant import Tenant, tenant_from

log = logging.getLogger("llmproxy")
UNKNOWN_KID_REFETCH = 60.0  # a kid not in the set fetches the set again at most this often
# While fetching fails, no fetch starts (for any reason) before the backoff has passed: 10 s, doubling to 60 s.
# Without it every request would start a fetch of its own against an IdP that is down.
FAILED_BACKOFF, MAX_FAILED_BACKOFF = 10.0, 60.0
MAX_JWKS_BYTES = 1 << 20
MAX_CACHED = 10_000  # verified tokens remembered; beyond, the cache starts over
MAX_TENANT_ID = 128
# The PyJWT failures, as the reasons the metrics and the access log name (the client never sees them).
_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid"),
    (jwt.InvalidAudienceError, "audience"),
    (jwt.InvalidIssuerError, "issuer"),
    (jwt.InvalidSignatureError, "signature"),
    (jwt.MissingRequiredClaimError, "missing_claim"),
    (jwt.InvalidAlgorithmError, "algorithm"),
    (jwt.DecodeError, "malformed"),
)


class JwtVerifier:
    def __init__(self, config: JwtConfig, per_key: LimitConfig, refuse_missing: bool,
                 previous: JwtVerifier | None = None) -> None:
        self.config = config
        self.algorithms = frozenset(config.algorithms)
        self._claims = config.claims
        self._issuer, self._audience, self._leeway = config.issuer, config.audience, config.leeway
        self._refuse_missing = refuse_missing
        # Templates: what every token of a tenant (or of any other) gets; each token's Tenant is made from one.
        self._default = tenant_from(JwtTenantConfig(), "", per_key, refuse_missing)
        self._tenants = {tid: tenant_from(t, "", per_key, refuse_missing) for tid, t in config.tenants.items()}
        old = previous.keys if previous is not None else None
        self.keys = _key_source(config, old)
        self._file = CredentialsFile(config.credentials_file) if config.credentials_file else None
        self._cache: dict[bytes, tuple[Tenant, float]] = {}
        self._cache_version = -1

    async def start(self) -> None:
        await self.keys.start()

    def close(self) -> None:
        self.keys.close()

    def verify(self, token: bytes) -> Tenant:
        """The tenant of a valid token; raises Unauthorized (reason and detail for the log) or KeyRefresh."""
        if self._cache_version != self.keys.version:
            self._cache.clear()  # a key was added or withdrawn: tokens are checked against the new set
            self._cache_version = self.keys.version
        cached = self._cache.get(token)
        if cached is not None and time.time() <= cached[1]:
            return cached[0]
        claims = self._verified_claims(token)
        tenant = self._tenant(claims)
        if len(self._cache) >= MAX_CACHED:
            self._cache.clear()
        # int(): PyJWT takes any integer-looking exp, a numeric string ("1796654156") or a float too.
        self._cache[token] = (tenant, int(claims["exp"]) + self._leeway)
        return tenant

    def _verified_claims(self, token: bytes) -> dict[str, Any]:
        try:
            text = token.decode("ascii")
            header = jwt.get_unverified_header(text)
        except (UnicodeDecodeError, jwt.DecodeError) as error:
            raise Unauthorized("malformed", str(error)) from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise Unauthorized("algorithm", f"alg {str(alg)[:20]!r} is not one of auth.jwt.algorithms")
        kid = header.get("kid")
        kid = kid if isinstance(kid, str) else None
        keys = self.keys.candidates(kid, alg)
        if not keys:
            refresh = self.keys.refresh_for_unknown()
            if refresh is not None:
                raise KeyRefresh(refresh)
            raise Unauthorized("unknown_kid", f"no key {kid!r} for {alg}")
        failure: Unauthorized | None = None
        for key in keys:
            try:
                return jwt.decode(text, key, algorithms=[alg], issuer=self._issuer, audience=self._audience,
                                  leeway=self._leeway, options={"require": ["exp"]})
            except jwt.InvalidSignatureError:
                failure = Unauthorized("signature", f"signature does not verify ({alg}, kid {kid!r})")
            except jwt.PyJWTError as error:
                raise _refusal(error) from None
        raise failure or Unauthorized("signature")

    def _tenant(self, claims: dict[str, Any]) -> Tenant:
        names = self._claims
        tid = claims.get(names.tenant)
        if isinstance(tid, int) and not isinstance(tid, bool):
            tid = str(tid)
        if not isinstance(tid, str) or not tid or len(tid) > MAX_TENANT_ID or not set(tid) <= TENANT_ID_CHARS:
            raise Unauthorized("bad_claim", f"claim {names.tenant!r} must name a tenant (letters, digits . _ : @ -)")
        template = self._tenants.get(tid, self._default)
        user = claims.get(names.user)
        user_id = str(user) if isinstance(user, str | int) and not isinstance(user, bool) else template.user_id
        models = template.models
        if names.models in claims:
            listed = claims[names.models]
            if not isinstance(listed, list) or not all(isinstance(m, str) for m in listed):
                raise Unauthorized("bad_claim", f"claim {names.models!r} must be a list of model names")
            models = frozenset(listed) if models is None else models & frozenset(listed)
        backend_keys = template.backend_keys
        if names.credential and self._file is not None:
            name = claims.get(names.credential)
            if isinstance(name, str):
                backend_keys = FileBackendKeys(self._file, name, self._refuse_missing)
        return Tenant(key_id=f"tenant:{tid}", user_id=user_id, models=models, limits=template.limits,
                      allowed_ips=template.allowed_ips, backend_keys=backend_keys)


def _refusal(error: Exception) -> Unauthorized:
    for kind, reason in _REASONS:
        if isinstance(error, kind):
            return Unauthorized(reason, str(error))
    return Unauthorized("invalid", str(error))


# Keys ----------------------------------------------------------------------------------------------------

def _family(alg: str) -> type | tuple[type, ...] | None:
    """The key type an algorithm verifies with (HMAC: a secret, bytes)."""
    if alg.startswith(("RS", "PS")):
        return rsa.RSAPublicKey
    if alg.startswith("ES"):
        return ec.EllipticCurvePublicKey
    if alg == "EdDSA":
        return (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)
    if alg.startswith("HS"):
        return bytes
    return None


class StaticKeys:
    """Keys from the config (public_keys, or hs256_secret): no kid needed, every key of the right type tried."""

    version = 0

    def __init__(self, keys: Iterable[Any]) -> None:
        self._keys = list(keys)

    async def start(self) -> None:
        return None

    def close(self) -> None:
        return None

    def candidates(self, kid: str | None, alg: str) -> list[Any]:
        family = _family(alg)
        return [key for key in self._keys if family is not None and isinstance(key, family)]

    def refresh_for_unknown(self) -> None:
        return None


class JwksKeys:
    """The key set of a JWKS URL, fetched in the background and kept until the next fetch succeeds."""

    def __init__(self, url: str, timeout: float, refresh_every: float) -> None:
        self.url = url
        self.timeout = timeout
        self.refresh_every = refresh_every
        self.version = 0  # +1 per key set fetched
        self._keys: list[tuple[str | None, Any]] = []
        self._fetched_at = -math.inf  # monotonic time of the last fetch that succeeded
        self._unknown_at = -math.inf  # monotonic time an unknown kid last had the set fetched
        self._failures = 0  # fetches failed in a row (the outage logged once, at the first)
        self._backoff = 0.0
        self._retry_at = -math.inf  # monotonic time before which no fetch starts, after a failure
        self._fetching: asyncio.Task[None] | None = None
        self._clock = time.monotonic

    async def start(self) -> None:
        if self.version == 0 and self._fetching is None:
            await self._spawn()

    def close(self) -> None:
        if self._fetching is not None:
            self._fetching.cancel()

    def candidates(self, kid: str | None, alg: str) -> list[Any]:
        if self._fetching is None:
            now = self._clock()
            if now - self._fetched_at >= self.refresh_every and now >= self._retry_at:
                self._spawn()  # stale: fetched again in the background; this request uses the keys it has
        family = _family(alg)
        return [key for key_id, key in self._keys
                if family is not None and isinstance(key, family) and (kid is None or key_id in (None, kid))]

    def refresh_for_unknown(self) -> asyncio.Future[None] | None:
        """The fetch to wait for, started now if the last one is old enough; None: too soon, refuse."""
        if self._fetching is not None:
            return self._fetching
        # Counted from the last fetch an unknown kid caused (the periodic ones are bounded anyway): random kids
        # cannot make the proxy hammer the IdP, and a rotation just after a periodic fetch is still seen.
        now = self._clock()
        if now < self._retry_at or (now - self._unknown_at < UNKNOWN_KID_REFETCH and not self._failures):
            return None
        self._unknown_at = now
        return self._spawn()

    def _spawn(self) -> asyncio.Task[None]:
        self._fetching = asyncio.get_running_loop().create_task(self._fetch())
        return self._fetching

    async def _fetch(self) -> None:
        try:
            download = asyncio.get_running_loop().run_in_executor(None, _download, self.url, self.timeout)
            # The whole fetch, DNS included, within jwks_timeout (urllib's timeout is per socket operation): the
            # requests waiting for it and the next periodic refresh are not held by a slow IdP.
            keys = _parse_jwks(await asyncio.wait_for(download, self.timeout))
        except TimeoutError:
            self._failed(f"no key set within jwks_timeout {self.timeout:g}s")
            return
        except Exception as error:  # the IdP down or confused: keep the keys we have
            self._failed(str(error) or type(error).__name__)
            return
        finally:
            self._fetching = None
        if self._failures:
            log.warning("auth.jwt.jwks_url: fetching %s works again (after %d failed attempt(s))", self.url,
                        self._failures)
        self._failures, self._backoff, self._retry_at = 0, 0.0, -math.inf
        self._fetched_at = self._clock()
        if [kid for kid, _ in keys] != [kid for kid, _ in self._keys] or self.version == 0:
            log.info("auth.jwt.jwks_url: %d signing key(s) from %s", len(keys), self.url)
        self._keys = keys
        self.version += 1

    def _failed(self, error: str) -> None:
        """Back off before the next fetch, and say so once per outage (not once per attempt)."""
        self._failures += 1
        self._backoff = min(self._backoff * 2, MAX_FAILED_BACKOFF) if self._backoff else FAILED_BACKOFF
        self._retry_at = self._clock() + self._backoff
        if self._failures == 1:
            log.error("auth.jwt.jwks_url: fetching %s failed (%s); keeping %d key(s), trying again after "
                      "%gs, then less often (up to every %gs) until it works", self.url, error, len(self._keys),
                      self._backoff, MAX_FAILED_BACKOFF)


class _NoDowngrade(urllib.request.HTTPRedirectHandler):
    """Redirects are followed, but never from https to anything else: the key set must not come in clear."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        if urlsplit(req.full_url).scheme == "https" and urlsplit(newurl).scheme != "https":
            raise urllib.error.HTTPError(req.full_url, code, f"redirect to {newurl} refused: not https",
                                         headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_NoDowngrade)


def _download(url: str, timeout: float) -> Any:
    """The JSON document at `url` (http(s) only, checked at load); raises TimeoutError past `timeout` in all,
    so that a thread of the executor is not held by an IdP that drips its answer."""
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "llmproxy"})
    with _OPENER.open(request, timeout=timeout) as response:
        body = bytearray()
        while len(body) < MAX_JWKS_BYTES:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the key set took longer than {timeout:g}s")
            chunk = response.read1(MAX_JWKS_BYTES - len(body))
            if not chunk:
                break
            body += chunk
        return json.loads(body)


def _parse_jwks(data: Any) -> list[tuple[str | None, Any]]:
    """(kid, public key) of every signing key in a JWKS document; symmetric (`oct`) keys are never taken
    from one: a public document cannot hold a secret."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("not a JWKS document (no `keys` list)")
    keys = []
    for item in data["keys"]:
        if not isinstance(item, dict) or item.get("kty") not in ("RSA", "EC", "OKP") or item.get("use", "sig") != "sig":
            continue
        with contextlib.suppress(jwt.PyJWTError, ValueError, TypeError):
            key = jwt.PyJWK(item).key
            key = key.public_key() if hasattr(key, "public_key") else key  # a private JWK: its public half
            kid = item.get("kid")
            keys.append((kid if isinstance(kid, str) else None, key))
    if not keys:
        raise ValueError("no usable signing key in the JWKS document")
    return keys


def _key_source(config: JwtConfig, old: StaticKeys | JwksKeys | None) -> StaticKeys | JwksKeys:
    """The keys `config` names; a reload with the same JWKS URL keeps the fetched set. A replaced set is left
    alone: requests of the generation before may still wait for its fetch, and it fetches nothing unasked."""
    if config.jwks_url is not None:
        if isinstance(old, JwksKeys) and old.url == config.jwks_url:
            old.timeout, old.refresh_every = config.jwks_timeout, config.jwks_refresh
            return old
        return JwksKeys(config.jwks_url, config.jwks_timeout, config.jwks_refresh)
    if config.hs256_secret is not None:
        return StaticKeys([config.hs256_secret.encode()])
    return StaticKeys(load_pem_public_key(pem.encode()) for pem in config.public_keys)
