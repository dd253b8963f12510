"""handle_request: the phases of one request, in order, and nothing else.

    authenticate (gate.py) -> own endpoint? -> read body -> inspect body -> route (model, endpoint -> candidates:
    those serving the client's API natively first, else those it can be translated for; a matching route of
    `routes:` -> its upstreams among them; a Responses follow-up -> the backend that stored its previous response)
    -> admit (rate limits)
    -> cache (caching.py, with `caching:`): a stored answer is replayed, or an identical request in flight
       followed; else the request leads and its relay hands the answer on (recording.py)
    -> [choose backend -> plan translation and metering, prepare body -> pick a key -> acquire connection
        -> relay] x attempts
    -> finish (records, releases rate-limit slots, charges usage)

Every phase works on the one Services snapshot the request started with (services.py), so a reload
in the middle of a stream never mixes two configurations in one request.

Attempts: a failure before any byte reached the client is retried on another backend when
`routing.retry_on` allows it (a connect failure always may: nothing was sent); once a byte was sent, never.
A 429 on one of a backend's keys while another is free is retried at once with that key, not counted as an
attempt.

`finish` runs in a `finally` whatever happened, and is the only place that records the request
(metrics, access log, usage record), stores a cacheable answer that came whole, and hands the connection back
to the client protocol.
"""

from __future__ import annotations

import asyncio
import logging
import random
from time import perf_counter
from typing import TYPE_CHECKING, Any

from llmproxy.caching import charges, land, serve_from_cache, served_record
from llmproxy.errors import ProxyError, drop_traceback, error_body
from llmproxy.fleet.auto import AUTO_MODEL
from llmproxy.fleet.tokenizer import can_count, count_prompt_tokens
from llmproxy.gate import authenticate
from llmproxy.metering.session import ESTIMATED, MeteringSession
from llmproxy.own_endpoints import match_own
from llmproxy.record import build_record, recount
from llmproxy.recording import RecordingExchange
from llmproxy.relay import Exchange
from llmproxy.request_body import body_for_backend, inspect_body
from llmproxy.spans import end_span, traced, upstream_traceparent
from llmproxy.translate import translation_for

if TYPE_CHECKING:
    from llmproxy.context import RequestContext
    from llmproxy.fleet.backend import Backend
    from llmproxy.fleet.balancer import Balancer
    from llmproxy.fleet.fleet import Fleet
    from llmproxy.fleet.routes import Route
    from llmproxy.http11.request import ProtocolError
    from llmproxy.services import Services

log = logging.getLogger("llmproxy")
RESPONSES_API = "openai-responses"
# A translated response is read and rewritten, a cacheable one stored for any client: they come uncompressed.
TRANSLATED_SKIPS = frozenset({b"accept-encoding"})
TRACEPARENT = frozenset({b"traceparent"})  # a traced request's is the proxy span's, not the client's
TRACED_TRANSLATED_SKIPS = TRANSLATED_SKIPS | TRACEPARENT
KEY_THROTTLED = "key_throttled"  # a 429 on one of a backend's keys while another key is free: always retried
MAX_KEY_ROTATIONS = 16  # bounds the key retries of one request (an upstream that 429s every key, never resting)


async def handle_request(services: Services, ctx: RequestContext) -> None:
    try:
        pending = authenticate(services, ctx)
        if pending is not None:  # a tenant token whose signing key is being fetched
            await pending
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


async def proxy_request(services: Services, ctx: RequestContext) -> None:
    """read body -> route -> admit (rate limits) -> forward, retrying on another backend where safe."""
    traffic = services.traffic
    traffic.inflight += 1
    try:
        body = await ctx.read_body()
        inspect_body(ctx, body)
        fleet = services.fleet
        named = ctx.model
        requested = services.auto.choose(ctx.body_data) if named == AUTO_MODEL and services.auto else named
        if requested != named:
            ctx.model_requested = named  # "auto": the record says what the rules chose for it
        ctx.model = fleet.router.resolve_model(requested)
        ctx.model_aliased = ctx.model != named
        if ctx.tenant is not None and not ctx.tenant.may_use(requested, ctx.model):
            raise ProxyError("model_not_allowed", f"This API key may not use the model `{requested}`.")
        now = services.clock()
        candidates = fleet.router.candidates(ctx.endpoint, ctx.path, ctx.model, now, fleet.routing.translate)
        # The most specific of `routes:` that matches, if any (fleet/routes.py): its upstreams, its strategy.
        route = fleet.routes and fleet.routes.match(ctx.head.method, ctx.path, ctx.head.headers, ctx.body_data)
        if route is not None:
            ctx.route_id = route.id
            candidates, key = route.plan(candidates, ctx.endpoint, ctx.path, ctx.model, now, ctx.request_id)
        if ctx.endpoint.api == RESPONSES_API:  # a follow-up goes where its previous response is stored
            candidates = services.lasting.affinity.home_of_follow_up(ctx.body_data, candidates)
        if services.limiter is not None:
            ctx.admission = await services.limiter.admit(ctx.tenant, ctx.body_data)
            if ctx.admission is not None:
                ctx.response_headers += ctx.admission.headers
        if services.cache is not None and await serve_from_cache(services, ctx):
            return  # a hit, or an identical request's answer followed
        if route is None:
            key = fleet.balancer.affinity_key(ctx.head.headers, ctx.body_data)  # prefix_affinity's, else None
        await forward_with_failover(services, ctx, fleet, candidates, body, key, route or fleet.balancer)
    finally:
        traffic.inflight -= 1


async def forward_with_failover(services: Services, ctx: RequestContext, fleet: Fleet, candidates: list[Backend],
                                body: bytes, key: Any, chooser: Balancer | Route) -> None:
    """Forward to one backend after another until one answers or retrying is no longer allowed; `chooser`
    (the request's route, else the fleet's balancer) picks each attempt's backend with `key`."""
    routing = fleet.routing
    tried: list[Backend] = []
    attempt = 0
    rotations = 0  # retries with another key of the same backend after a 429: not attempts of their own
    rotating: Backend | None = None  # the backend whose next key gets the request again
    while True:
        if rotating is not None:
            backend, rotating = rotating, None
        else:
            untried = [b for b in candidates if b not in tried] if tried else candidates
            backend = chooser.choose(untried or candidates, key)
            tried.append(backend)
        last = attempt == routing.retries
        try:
            await forward(services, ctx, backend, prepare_attempt(services, ctx, backend, body), last,
                          rotations < MAX_KEY_ROTATIONS)
        except ProxyError as error:
            if error.backend_fault:
                fleet.health.request_failed(backend)
            rotated = error.retry_condition == "429" and ctx.key_throttled
            retryable = rotated or error.retry_condition in fleet.retry_on
            if (last and not rotated) or not retryable or ctx.response_started or ctx.conn.closed:
                raise
            drop_traceback(error)  # swallowed: its frames hold the exchange, connection and ctx
            ctx.retries += 1
            if services.metrics is not None:
                services.metrics.observe_retry(KEY_THROTTLED if rotated else error.retry_condition)
            if rotated:  # the same backend with another key, at once: the throttled one rests
                rotations += 1
                rotating = backend
                continue
            # Full jitter: retries of many requests that failed together do not arrive together.
            await asyncio.sleep(random.uniform(0.0, routing.retry_backoff * 2 ** attempt))
            attempt += 1
            continue
        if ctx.status >= 500:
            fleet.health.request_failed(backend)
        elif ctx.status:
            fleet.health.request_succeeded(backend)
        return


def prepare_attempt(services: Services, ctx: RequestContext, backend: Backend, body: bytes) -> bytes:
    """Plan this attempt on `backend`: its translation if the backend does not serve the client's API, its
    metering; return the body to send it (translated, alias resolved, usage asked)."""
    endpoint = ctx.endpoint
    translation = translation_for(endpoint, backend, services.fleet.routing.translate) if endpoint.family else None
    ctx.translation = translation
    if translation is not None:
        if not isinstance(ctx.body_data, dict):
            raise ProxyError("invalid_json", "a request in an API this backend does not serve must be a JSON object")
        request = {**ctx.body_data, "model": ctx.model} if ctx.model_aliased else ctx.body_data
        ctx.backend_api = translation.backend
        mapped = translation.request(request, backend, ctx.is_stream, services.translation.default_max_tokens)
        # A session even with metering off: the translator maps the response (finish() records nothing then).
        ctx.meter = MeteringSession.translated(translation, ctx.body_data)
        return mapped
    served = endpoint.on(backend.kind)
    ctx.backend_api = served.family or served.api
    ctx.meter = None  # not a previous (translated) attempt's
    if services.metering or ctx.flight is not None:  # a cacheable answer is stored only if metered whole
        ctx.meter = MeteringSession.plan(ctx.endpoint.dialect_on(backend.kind),
                                         inject_allowed=backend.config.inject_usage, is_stream=ctx.is_stream,
                                         body=ctx.body_data)
    return body_for_backend(ctx, body, ctx.meter is not None and ctx.meter.injects_usage)


async def forward(services: Services, ctx: RequestContext, backend: Backend, body: bytes, last: bool,
                  may_rotate: bool = True) -> None:
    """Send the request to `backend` and relay the response; raises ProxyError before any byte is sent.

    Unless this is the `last` attempt, a response whose status routing.retry_on names is not relayed: it
    raises ProxyError("upstream_status"). Nor is a 429 on one of the backend's keys while another is free
    (`may_rotate`): the pipeline retries with that one.
    """
    ctx.backend = backend.name
    tenant = ctx.tenant
    # BYOK: the tenant's own credential (raises if it has none here and must), outside the backend's rotation
    own = (tenant.backend_keys.credential_for(backend.name, backend.anthropic_auth)
           if tenant is not None and tenant.backend_keys is not None else None)
    backend.in_flight += 1
    credentials = backend.credentials
    credential, key = credentials.pick() if own is None else (own, -1)
    refuse_statuses = frozenset() if last else services.fleet.retry_statuses
    ctx.key_throttled = may_rotate and credentials.rotates and credentials.another_available(key)
    if ctx.key_throttled:
        refuse_statuses |= {429}
    try:
        request = upstream_request(services, ctx, backend, body, credential)
        pool = backend.pool
        for attempt in (1, 2):
            conn = await pool.acquire()
            if ctx.conn.closed:  # the client left in the same moment a connection was handed to it
                pool.release(conn, True)  # unused: keep it
                return
            exchange = Exchange(ctx, conn, backend, services.relay, refuse_statuses) if ctx.flight is None \
                else RecordingExchange(ctx, conn, backend, services.relay, refuse_statuses, ctx.flight)
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
                if ctx.backend_status == 429 and exchange.retry_after is not None:
                    credentials.throttled(key, exchange.retry_after)  # relayed: the key rests all the same
    finally:
        backend.in_flight -= 1


def upstream_request(services: Services, ctx: RequestContext, backend: Backend, body: bytes,
                     credential: bytes) -> bytes:
    """The request bytes for `backend`: the client's head with the backend's credential (and, for a translated
    request, the path of the backend's API)."""
    head = ctx.head
    if backend.anthropic_auth and not head.has_header(b"anthropic-version"):
        credential += b"anthropic-version: %b\r\n" % backend.config.anthropic_version.encode()
    translation = ctx.translation
    # A cacheable request's answer is stored and shared with clients that may not take gzip: it comes plain.
    plain = translation is not None or backend.anthropic_auth or ctx.flight is not None
    skip = TRANSLATED_SKIPS if plain else frozenset()
    if services.tracing is not None and traced(ctx):
        credential += upstream_traceparent(services.tracing, ctx)
        skip = TRACED_TRANSLATED_SKIPS if skip else TRACEPARENT
    return services.headers.upstream_request(head, ctx.conn.peer, ctx.forwarded_request_id, backend, body,
                                             credential=credential,
                                             target=None if translation is None else translation.target, skip=skip)


def reply_error(ctx: RequestContext, error: ProxyError) -> None:
    """Answer a local error, or abort the connection if the response has already started."""
    ctx.termination = error.spec.termination
    ctx.error_message = error.logged_message
    ctx.error_type = error.spec.code
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
        if ctx.upstream_sent and ctx.meter is not None and services.metering:  # one per request sent upstream
            usage = ctx.meter.final_usage(ctx.backend_status)
            record = build_record(ctx, usage, duration, ttft, services.prices)
            response_id = ctx.meter.response_id
            if response_id is not None:
                services.lasting.affinity.remember(response_id, ctx.backend)
            counting = (usage.source == ESTIMATED and not ctx.meter.prompt_reported
                        and _recount_later(services, ctx, record))
            if not counting:
                deliver_record(services, record)
        elif ctx.cache_role and services.metering:  # a hit or a follower: the original usage
            record = served_record(services, ctx, duration, ttft)
            deliver_record(services, record)
        services.access_log.write(ctx, duration, ttft)
        if services.tracing is not None and traced(ctx):  # the backend of its last attempt: None if it had none
            end_span(services.tracing, ctx, record, now, services.fleet.backend_named(ctx.backend))
    except Exception:  # recording must never strand the connection
        log.exception("recording request %s failed", ctx.request_id)
    finally:
        if ctx.flight is not None:
            _land(services, ctx, record)
        # A hit's (or follower's) tokens and cost count against the limits only with caching.bill_hits.
        _settle(ctx, record if charges(services, ctx) else None, counting)
        ctx.conn.request_finished(ctx)


def _land(services: Services, ctx: RequestContext, record: dict | None) -> None:
    """The leader of a flight ended: store its answer, let its followers finish (caching.land), whatever
    happened: a follower must never wait for a leader that is gone."""
    flight, ctx.flight = ctx.flight, None
    try:
        land(services, ctx, flight, record)
    except Exception:
        log.exception("storing the answer of request %s failed", ctx.request_id)
        flight.end(None, ctx.backend)


def deliver_record(services: Services, record: dict) -> None:
    """A finished request's usage record: counted in the metrics and handed to the durable outbox."""
    if services.metrics is not None:
        # Per key only when asked (auth.metrics_per_key): one series per key and model can be many.
        key_id = (record["key_id"] or "") if services.config.auth.metrics_per_key else ""
        services.metrics.observe_usage(record, key_id)
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
