"""handle_request: the phases of one request, in order, and nothing else.

    authenticate -> own endpoint? -> read body -> inspect body -> route (model, endpoint -> candidates;
    a Responses follow-up -> the backend that stored its previous response)
    -> admit (rate limits)
    -> [choose backend -> plan metering, prepare body -> acquire connection -> relay] x attempts
    -> finish (records, releases rate-limit slots, charges usage)

Every phase works on the one Services snapshot the request started with (services.py), so a reload
in the middle of a stream never mixes two configurations in one request.

Attempts: a failure before any byte reached the client is retried on another backend when
`routing.retry_on` allows it (a connect failure always may: nothing was sent); once a byte was sent, never.

`finish` runs in a `finally` whatever happened, and is the only place that records the request
(metrics, access log, usage record) and hands the connection back to the client protocol.
"""

from __future__ import annotations

import asyncio
import logging
import random
from time import perf_counter
from typing import TYPE_CHECKING

from llmproxy.errors import ProxyError, drop_traceback, error_body
from llmproxy.fleet.tokenizer import can_count, count_prompt_tokens
from llmproxy.metering.session import ESTIMATED, MeteringSession
from llmproxy.own_endpoints import match_own, request_path
from llmproxy.record import build_record, recount
from llmproxy.relay import Exchange
from llmproxy.request_body import body_for_backend, inspect_body

if TYPE_CHECKING:
    from llmproxy.context import RequestContext
    from llmproxy.fleet.backend import Backend
    from llmproxy.fleet.fleet import Fleet
    from llmproxy.http11.request import ProtocolError
    from llmproxy.services import Services

log = logging.getLogger("llmproxy")
WWW_AUTHENTICATE = b'www-authenticate: Bearer realm="llmproxy"\r\n'
RESPONSES_API = "openai-responses"


async def handle_request(services: Services, ctx: RequestContext) -> None:
    try:
        authenticate(services, ctx)
        own = match_own(ctx)
        if own is not None:
            own(services, ctx)
        else:
            await proxy_request(services, ctx)
    except ProxyError as error:
        drop_traceback(error)  # ctx -> body_error -> traceback -> frames -> ctx: no cycle left for the GC
        reply_error(ctx, error)
    except asyncio.CancelledError:
        pass  # the client went away; its termination code is already set
    except Exception as exc:  # a bug: answer 500 rather than hang the client
        log.exception("internal error handling request %s", ctx.request_id)
        reply_error(ctx, ProxyError("internal_error", f"internal error: {type(exc).__name__}"))
    finally:
        finish(services, ctx)


def authenticate(services: Services, ctx: RequestContext) -> None:
    """Who is calling: sets ctx.tenant, or raises ProxyError (401/400) before any body byte is read."""
    keys = services.keys
    if not keys.enabled or keys.skips(request_path(ctx)):
        return
    try:
        ctx.tenant = keys.authenticate(ctx.head)
    except ProxyError as error:
        error.headers += WWW_AUTHENTICATE
        if services.metrics is not None:
            services.metrics.observe_auth_failure()
        raise


async def proxy_request(services: Services, ctx: RequestContext) -> None:
    """read body -> route -> admit (rate limits) -> forward, retrying on another backend where safe."""
    traffic = services.traffic
    traffic.inflight += 1
    try:
        body = await ctx.read_body()
        inspect_body(ctx, body)
        fleet = services.fleet
        requested = ctx.model
        ctx.model = fleet.router.resolve_model(requested)
        ctx.model_aliased = ctx.model != requested
        if ctx.tenant is not None and not ctx.tenant.may_use(requested, ctx.model):
            raise ProxyError("model_not_allowed", f"This API key may not use the model `{requested}`.")
        candidates = fleet.router.candidates(ctx.endpoint, ctx.path, ctx.model, services.clock())
        if ctx.endpoint.api == RESPONSES_API:  # a follow-up goes where its previous response is stored
            candidates = services.lasting.affinity.home_of_follow_up(ctx.body_data, candidates)
        if services.limiter is not None:
            ctx.admission = await services.limiter.admit(ctx.tenant, ctx.body_data)
            if ctx.admission is not None:
                ctx.response_headers += ctx.admission.headers
        await forward_with_failover(services, ctx, fleet, candidates, body)
    finally:
        traffic.inflight -= 1


async def forward_with_failover(services: Services, ctx: RequestContext, fleet: Fleet, candidates: list[Backend],
                                body: bytes) -> None:
    """Forward to one backend after another until one answers or retrying is no longer allowed."""
    routing = fleet.routing
    tried: list[Backend] = []
    for attempt in range(routing.retries + 1):
        untried = [b for b in candidates if b not in tried] if tried else candidates
        backend = fleet.balancer.choose(untried or candidates)
        tried.append(backend)
        last = attempt == routing.retries
        try:
            await forward(services, ctx, backend, prepare_attempt(services, ctx, backend, body),
                          frozenset() if last else fleet.retry_statuses)
        except ProxyError as error:
            if error.backend_fault:
                fleet.health.request_failed(backend)
            condition = error.retry_condition
            if last or condition not in fleet.retry_on or ctx.response_started or ctx.conn.closed:
                raise
            drop_traceback(error)  # swallowed: its frames hold the exchange, connection and ctx
            ctx.retries += 1
            if services.metrics is not None:
                services.metrics.observe_retry(condition)
            # Full jitter: retries of many requests that failed together do not arrive together.
            await asyncio.sleep(random.uniform(0.0, routing.retry_backoff * 2 ** attempt))
            continue
        if ctx.status >= 500:
            fleet.health.request_failed(backend)
        elif ctx.status:
            fleet.health.request_succeeded(backend)
        return


def prepare_attempt(services: Services, ctx: RequestContext, backend: Backend, body: bytes) -> bytes:
    """Plan this attempt's metering on `backend`; return the body to send it (alias resolved, usage asked)."""
    if services.metering:
        ctx.meter = MeteringSession.plan(ctx.endpoint.dialect_on(backend.kind),
                                         inject_allowed=backend.config.inject_usage, is_stream=ctx.is_stream,
                                         body=ctx.body_data)
    return body_for_backend(ctx, body, ctx.meter is not None and ctx.meter.injects_usage)


async def forward(services: Services, ctx: RequestContext, backend: Backend, body: bytes,
                  refuse_statuses: frozenset[int]) -> None:
    """Send the request to `backend` and relay the response; raises ProxyError before any byte is sent.

    A response whose status is in `refuse_statuses` is not relayed: it raises ProxyError("upstream_status").
    """
    ctx.backend = backend.name
    backend.in_flight += 1
    try:
        request = services.headers.upstream_request(ctx.head, ctx.conn.peer, ctx.forwarded_request_id, backend,
                                                    body)
        pool = backend.pool
        for attempt in (1, 2):
            conn = await pool.acquire()
            if ctx.conn.closed:  # the client left in the same moment a connection was handed to it
                pool.release(conn, True)  # unused: keep it
                return
            exchange = Exchange(ctx, conn, backend, services.relay, refuse_statuses)
            try:
                exchange.start(request)
                await exchange.done
                return
            except ProxyError as error:
                # A pooled connection the backend closed while idle fails before any response byte:
                # the backend never saw the request, so one retry on a fresh connection is safe.
                if attempt == 1 and conn.reused and not conn.received_any and error.kind == "upstream_failed":
                    drop_traceback(error)
                    continue
                raise
            finally:
                pool.release(conn, conn.reusable() and not (ctx.is_stream and backend.closes_after_stream))
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
    if error.spec.close or not ctx.body_done:
        ctx.keep_alive = False  # an unread body would be parsed as the next request: say we close
    ctx.send_response(error.spec.status, error_body(error.spec, error.message, ctx.endpoint.errors),
                      headers=error.headers)


def finish(services: Services, ctx: RequestContext) -> None:
    """Record the request exactly once and let the connection go on."""
    now = perf_counter()
    duration = now - ctx.t_start
    ttft = ctx.t_first_byte - ctx.t_start if ctx.t_first_byte else None
    if not ctx.response_started:
        ctx.status = 499  # the client left before any response (nginx's convention)
    record = None
    counting = False  # the record waits for the backend's count of its prompt
    try:
        metrics = services.metrics
        if metrics is not None:
            metrics.observe_request(ctx.backend, ctx.status, ctx.termination, duration, ttft)
        if ctx.upstream_sent and ctx.meter is not None:  # one record per request sent to a backend
            usage = ctx.meter.final_usage(ctx.backend_status)
            record = build_record(ctx, usage, duration, ttft, services.prices)
            response_id = ctx.meter.response_id
            if response_id is not None:
                services.lasting.affinity.remember(response_id, ctx.backend)
            counting = (usage.source == ESTIMATED and not ctx.meter.prompt_reported
                        and _recount_later(services, ctx, record))
            if not counting:
                deliver_record(services, record)
        services.access_log.write(ctx, duration, ttft)
    except Exception:  # recording must never strand the connection
        log.exception("recording request %s failed", ctx.request_id)
    finally:
        _settle(ctx, record, counting)
        ctx.conn.request_finished(ctx)


def deliver_record(services: Services, record: dict) -> None:
    """A finished request's usage record: counted in the metrics and handed to the durable outbox."""
    if services.metrics is not None:
        services.metrics.observe_usage(record)
    services.outbox.append(record)


def _recount_later(services: Services, ctx: RequestContext, record: dict) -> bool:
    """Have the backend's tokenizer count an estimated record's prompt (recount.py); True if it will: the
    record and the charge of its rate limits go out when the count is in."""
    backend = services.fleet.backend_named(ctx.backend)
    body, admission = ctx.body_data, ctx.admission
    if backend is None:
        return False
    api = ctx.endpoint.on(backend.kind).api
    if not isinstance(body, dict) or not can_count(backend.kind, api):
        return False
    timeout = services.recounter.config.timeout

    def done(prompt_tokens: int | None) -> None:
        if prompt_tokens is not None:
            recount(record, prompt_tokens, services.prices)
        deliver_record(services, record)
        if admission is not None:
            admission.charge(record)

    return services.recounter.submit(lambda: count_prompt_tokens(backend.config, backend.kind, api, body, timeout),
                                     done)


def reject_malformed(services: Services, peer: str, error: ProtocolError) -> None:
    """Record a request rejected before it had a context (a malformed or over-limit head)."""
    services.access_log.write_rejected(peer, error.spec.status, error.spec.termination, error.message)
    if services.metrics is not None:
        services.metrics.observe_request("", error.spec.status, error.spec.termination, 0.0, None)


def _settle(ctx: RequestContext, record: dict | None, counting: bool) -> None:
    """Give back the request's rate-limit slots and charge its usage (unless its record is `counting`: then
    the count charges it), whatever happened before."""
    admission, ctx.admission = ctx.admission, None
    if admission is not None:
        try:
            if counting:
                admission.release()
            else:
                admission.settle(record)
        except Exception:
            log.exception("settling the rate limits of request %s failed", ctx.request_id)
