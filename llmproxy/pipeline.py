"""handle_request: the phases of one request, in order, and nothing else.

    local route? -> read body -> inspect body -> choose backend -> prepare body (metering)
    -> acquire connection -> relay -> finish

`finish` runs in a `finally` whatever happened, and is the only place that records the request
(metrics, access log, usage record) and hands the connection back to the client protocol.
"""

from __future__ import annotations

import asyncio
import logging
from time import perf_counter
from typing import TYPE_CHECKING

from .accounting import build_record
from .errors import ProxyError, error_body
from .relay import Exchange
from .request_body import inspect_body, prepare_for_backend
from .routes import match_local
from .upstream_request import build_upstream_request

if TYPE_CHECKING:
    from .context import RequestContext
    from .server import Backend, ProxyServer

log = logging.getLogger("llmproxy")


async def handle_request(server: ProxyServer, ctx: RequestContext) -> None:
    try:
        local = match_local(ctx)
        if local is not None:
            local(server, ctx)
        else:
            await proxy_request(server, ctx)
    except ProxyError as error:
        reply_error(ctx, error)
    except asyncio.CancelledError:
        pass  # the client went away; its termination code is already set
    except Exception as exc:  # a bug: answer 500 rather than hang the client
        log.exception("internal error handling request %s", ctx.request_id)
        reply_error(ctx, ProxyError("internal_error", f"internal error: {type(exc).__name__}"))
    finally:
        finish(server, ctx)


async def proxy_request(server: ProxyServer, ctx: RequestContext) -> None:
    """read body -> choose backend -> acquire connection and relay."""
    server.inflight += 1  # requests in progress, the proxy's own endpoints excepted
    try:
        body = await ctx.read_body()
        inspect_body(ctx, body)
        backend = server.balancer.choose()
        await forward(ctx, backend, prepare_for_backend(ctx, backend, body))
    finally:
        server.inflight -= 1


async def forward(ctx: RequestContext, backend: Backend, body: bytes) -> None:
    """Send the request to `backend` and relay the response; raises ProxyError before any byte is sent."""
    ctx.backend = backend.name
    backend.in_flight += 1
    try:
        request = build_upstream_request(ctx, backend, body)
        pool = backend.pool
        for attempt in (1, 2):
            conn = await pool.acquire()
            if ctx.conn.closed:  # the client left in the same moment a connection was handed to it
                pool.release(conn, True)  # unused: keep it
                return
            exchange = Exchange(ctx, conn, backend.first_byte_timeout, backend.stream_idle_timeout)
            try:
                exchange.start(request)
                await exchange.done
                return
            except ProxyError as error:
                # A pooled connection the backend closed while idle fails before any response byte:
                # the backend never saw the request, so one retry on a fresh connection is safe.
                if attempt == 1 and conn.reused and not conn.received_any and error.kind == "upstream_failed":
                    continue
                raise
            finally:
                pool.release(conn, conn.reusable())
    finally:
        backend.in_flight -= 1


def reply_error(ctx: RequestContext, error: ProxyError) -> None:
    """Answer a local error, or abort the connection if the response has already started."""
    ctx.termination = error.spec.termination
    ctx.error_message = error.message
    if ctx.conn.closed:
        return
    if ctx.response_started:
        ctx.conn.abort()
        return
    if error.spec.close:
        ctx.keep_alive = False
    ctx.send_response(error.spec.status, error_body(error.spec, error.message))


def finish(server: ProxyServer, ctx: RequestContext) -> None:
    """Record the request exactly once and let the connection go on."""
    now = perf_counter()
    duration = now - ctx.t_start
    ttft = ctx.t_first_byte - ctx.t_start if ctx.t_first_byte else None
    if not ctx.response_started:
        ctx.status = 499  # the client left before any response (nginx's convention)
    try:
        if server.metrics is not None:
            server.metrics.observe_request(ctx.backend, ctx.status, ctx.termination, duration, ttft)
        if ctx.upstream_sent and ctx.head.method == b"POST" and server.metering:
            server.record_usage(build_record(ctx, duration, ttft, server.prices))
        server.access_log.write(ctx, duration, ttft)
    except Exception:  # recording must never strand the connection
        log.exception("recording request %s failed", ctx.request_id)
    finally:
        ctx.conn.request_finished(ctx)
