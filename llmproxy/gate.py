"""The gate: who may come in, by address and by credential (the first phase of every request).

    at accept   security rules on the peer's address, unless it is a trusted proxy  -> 403, nothing read
    after head  the same, once more, if a reload replaced the rules since (a keep-alive connection) -> 403
    after head  security rules on the client a trusted proxy forwards for (X-Forwarded-For) -> 403
                -> skip_paths? -> the key or tenant JWT (auth.py) -> 401 / 400
                -> the caller's own allowed_ips on the client address -> 401, as a bad key (not to tell a
                   stolen key's holder that it is a valid one)
    all before the body is read, so a refused request costs its head and reaches no backend.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from llmproxy.errors import KeyRefresh, ProxyError, Unauthorized
from llmproxy.iprules import client_address
from llmproxy.own_endpoints import request_path

if TYPE_CHECKING:
    from llmproxy.context import RequestContext
    from llmproxy.services import Services

WWW_AUTHENTICATE = b'www-authenticate: Bearer realm="llmproxy"\r\n'
DENIED_AT_ACCEPT = ProxyError("ip_forbidden", "Your address is not allowed to use this service.")


def refused_at_accept(services: Services, peer: str) -> bool:
    """The security rules keep out a connection from `peer` (counted in the metrics when they do)."""
    rules = services.ip_rules
    if rules is None or not rules.judged_at_accept(peer) or rules.allows(peer):
        return False
    if services.metrics is not None:
        services.metrics.observe_ip_denied("accept")
    return True


def authenticate(services: Services, ctx: RequestContext) -> Awaitable[None] | None:
    """Who is calling, and from where: sets ctx.tenant, or raises ProxyError (403, 401, 400) before any body
    byte is read. Returns an awaitable that finishes the job when a token's signing key must be fetched first
    (a new JWKS kid), else None."""
    rules = services.ip_rules
    if rules is not ctx.conn.judged_by:
        _judge_again(services, ctx)
    if rules is not None and not rules.judged_at_accept(ctx.conn.peer):
        try:
            rules.check_request(ctx.conn.peer, ctx.head)
        except ProxyError:
            if services.metrics is not None:
                services.metrics.observe_ip_denied("forwarded")
            raise
    keys = services.keys
    if not keys.enabled or keys.skips(request_path(ctx)):
        return None
    try:
        tenant = keys.authenticate(ctx.head)
    except KeyRefresh as pending:
        return _after_refresh(services, ctx, pending.refresh)
    except ProxyError as error:
        raise _refused(services, error) from None
    ctx.tenant = tenant
    if tenant.allowed_ips is not None:
        _check_caller_address(services, ctx)
    return None


def _judge_again(services: Services, ctx: RequestContext) -> None:
    """A reload replaced the security rules since this connection's peer was judged: judge it by the new ones,
    or a keep-alive connection would keep the access its address has just lost. Raises ProxyError (403, and
    the connection closes)."""
    conn = ctx.conn
    if refused_at_accept(services, conn.peer):
        raise ProxyError("ip_forbidden", DENIED_AT_ACCEPT.message,
                         detail=f"peer {conn.peer} no longer allowed by security rules (reloaded)")
    conn.judged_by = services.ip_rules


async def _after_refresh(services: Services, ctx: RequestContext, refresh: Awaitable[None]) -> None:
    await asyncio.shield(refresh)  # shared by every request waiting for it: one leaving must not cancel it
    try:
        ctx.tenant = services.keys.authenticate(ctx.head)
    except KeyRefresh:
        raise _refused(services, Unauthorized("unknown_kid", "not in the key set fetched again")) from None
    except ProxyError as error:
        raise _refused(services, error) from None
    if ctx.tenant.allowed_ips is not None:
        _check_caller_address(services, ctx)


def _refused(services: Services, error: ProxyError) -> ProxyError:
    error.headers += WWW_AUTHENTICATE
    if services.metrics is not None:
        services.metrics.observe_auth_failure(error.reason if isinstance(error, Unauthorized) else "ambiguous")
    return error


def _check_caller_address(services: Services, ctx: RequestContext) -> None:
    """Raises Unauthorized (the 401 of any bad credential) if the caller's allowed_ips do not hold the client:
    a 403 would confirm the key is valid to whoever holds it elsewhere. The access log's error and
    llmproxy_ip_denied_total{check="key"} say why."""
    client = client_address(ctx.conn.peer, ctx.head, services.trusted_proxies)
    if client not in ctx.tenant.allowed_ips:
        if services.metrics is not None:
            services.metrics.observe_ip_denied("key")
        error = Unauthorized("ip_not_allowed", f"client address {client} not in {ctx.tenant.key_id}'s allowed_ips")
        error.headers += WWW_AUTHENTICATE
        raise error
