"""The cache phase of a request (the `caching:` section; the cache itself is llmproxy/cache/).

    plan: does a strategy match (and no Cache-Control: no-cache)? -> bypass, else its key
    -> a stored answer? replay it (hit)
    -> an identical request in flight? follow it from its first byte (miss, deduplicated)
    -> else lead: the request goes upstream, its relay (recording.py) handing the answer to its flight
    ... and when the leader's request ends (pipeline.finish): `land` stores a complete answer and gives the
    followers the usage for their records.

Decisions: the phase runs after authentication and admission, so a hit is a request like any other for the
request-rate and concurrency limits; its tokens and cost are charged only with `bill_hits`. A hit replays the
stored status and content type (the backend's other headers are not kept), with this request's own request id,
x-ratelimit-* and `x-llmproxy-cache: hit`. HTTP/1.0 clients are served hits but never follow (their body could
only end with the connection): they go upstream themselves. BYOK requests (a caller with its own provider keys,
or any with auth.byok_missing: refuse) bypass the cache and de-duplication: an answer paid with one tenant's key
is never another's, and a hit must not get round a refusal decided when forwarding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from llmproxy.cache import BYPASS, HIT, MISS, asks_no_cache
from llmproxy.cache.entry import Entry
from llmproxy.cache.flight import CUT, FALLBACK, FOLLOWED, GONE, TRUNCATED, Flight, FlightHead, Follower
from llmproxy.http11.headers import connection_line, response_head
from llmproxy.http11.wire import LAST_CHUNK, chunk
from llmproxy.metering.dialects import (
    ANTHROPIC_MESSAGES_SSE,
    OPENAI_CHAT_SSE,
    OPENAI_COMPLETIONS_SSE,
    OPENAI_RESPONSES_SSE,
)
from llmproxy.metering.session import NONE, REPORTED, MeteredUsage
from llmproxy.record import build_record

if TYPE_CHECKING:
    from llmproxy.context import RequestContext
    from llmproxy.services import Services

CACHE_HEADERS = {result: b"x-llmproxy-cache: %b\r\n" % result.encode() for result in (HIT, MISS, BYPASS)}
DEDUPLICATED_HEADER = b"x-llmproxy-deduplicated: true\r\n"
REPLAY_SLICE = 16 * 1024  # a stored answer goes out in pieces of this size, as fast as the client takes them
HIT_ROLE, FOLLOWER_ROLE = "hit", "follower"
NOTHING_METERED = (0, 0, None, None, NONE)
# The last event of a whole stream, by the client's API (the others end with their usage event: ended_whole).
FINAL_EVENTS = {OPENAI_CHAT_SSE: b"data: [DONE]", OPENAI_COMPLETIONS_SSE: b"data: [DONE]",
                ANTHROPIC_MESSAGES_SSE: b"event: message_stop", OPENAI_RESPONSES_SSE: b"response.completed"}
# An in-band error event at the start of a line (inside JSON strings a line break is escaped: no false match).
IN_BAND_ERROR_STARTS = (b'data: {"error"', b"event: error")
IN_BAND_ERRORS = tuple(b"\n" + start for start in IN_BAND_ERROR_STARTS)


async def serve_from_cache(services: Services, ctx: RequestContext) -> bool:
    """The cache phase; True when the request was answered here (a hit, or a flight followed to its end)."""
    cache = services.cache
    head = ctx.head
    plan = None
    if not asks_no_cache(head.headers) and not _brings_own_credentials(services, ctx):
        target = head.target
        query = target.partition(b"?")[2]
        plan = cache.plan(head.method, ctx.path, query, head.headers, ctx.body_data, ctx.model, ctx.key_id)
    if plan is None:
        _count(services, ctx, BYPASS)
        return False
    entry = await cache.get(plan.key)
    if entry is not None:
        _count(services, ctx, HIT)
        await _replay(services, ctx, entry)
        return True
    _count(services, ctx, MISS)
    if cache.config.dedup and head.version == "1.1":
        flight = cache.joinable(plan.key)
        # A flight that ends before its head (its leader failed every attempt) is followed no further: the
        # request goes upstream itself rather than wait through another leader's attempts.
        if flight is not None and await _follow(services, ctx, flight):
            return True
    ctx.cache_plan = plan
    ctx.flight = cache.lead(plan.key)
    return False


def _brings_own_credentials(services: Services, ctx: RequestContext) -> bool:
    """BYOK and the cache do not mix: an answer paid with one tenant's own provider key is never served to
    another, nor one that would have been refused (auth.byok_missing: refuse, checked only when forwarding)."""
    if services.config.auth.byok_missing == "refuse":
        return True
    tenant = ctx.tenant
    return tenant is not None and tenant.backend_keys is not None and bool(tenant.backend_keys.keys())


def _count(services: Services, ctx: RequestContext, result: str) -> None:
    ctx.response_headers += CACHE_HEADERS[result]
    if services.metrics is not None:
        services.metrics.observe_cache(result)


async def _replay(services: Services, ctx: RequestContext, entry: Entry) -> None:
    """Answer with a stored response: a stream as a stream (chunked), paced by the client's reading."""
    ctx.cache_role = HIT_ROLE
    ctx.cached_usage = entry.usage
    chunked = entry.streaming and ctx.head.version == "1.1"
    body = entry.body if ctx.head.method != b"HEAD" else b""
    headers = [(b"content-type", entry.content_type)] if entry.content_type else []
    if not chunked:
        headers.append((b"content-length", b"%d" % len(entry.body)))
    follower = Follower(ctx.conn, _head_maker(ctx, headers, chunked), float("inf"), services.relay.write_timeout)
    ctx.exchange = follower
    try:
        follower.begin(FlightHead(entry.status, headers, entry.streaming))
        for start in range(0, len(body), REPLAY_SLICE):
            piece = body[start:start + REPLAY_SLICE]
            follower.send(chunk(piece) if chunked else piece)
        if chunked:
            follower.send(LAST_CHUNK)
        follower.end_of_stream()
        outcome = await follower.done
    finally:
        ctx.exchange = None
        follower.client_lost()  # a no-op once done; if this task was cancelled, the replay stops here
        _took(ctx, follower, entry.status)
    if services.metrics is not None:
        services.metrics.cache_bytes_counted("served", len(body))
    if outcome != FOLLOWED:
        ctx.termination = _termination(outcome, ctx)


async def _follow(services: Services, ctx: RequestContext, flight: Flight) -> bool:
    """Follow `flight` to its end; False if it ended before its head (the caller tries again or leads)."""
    follower = Follower(ctx.conn, _head_maker(ctx, None, True), flight.max_lag, services.relay.write_timeout)
    headers = ctx.response_headers
    ctx.response_headers += DEDUPLICATED_HEADER
    ctx.exchange = follower
    try:
        if not flight.join(follower):
            ctx.response_headers = headers
            return False
        outcome = await follower.done
    finally:
        ctx.exchange = None
        follower.client_lost()  # a no-op once done; if this task was cancelled, it leaves the flight
    if services.metrics is not None:
        services.metrics.observe_follower(outcome)
    if outcome == FALLBACK:
        ctx.response_headers = headers
        return False
    ctx.cache_role = FOLLOWER_ROLE
    _took(ctx, follower, follower.head.status if follower.head is not None else 0)
    if outcome == FOLLOWED or flight.settled.done():
        # The leader's request ends with the upstream's end: its record (and usage) is there at once.
        ctx.cached_usage, ctx.backend = await flight.settled
    else:  # cut or gone while the stream goes on: recorded at once, without usage (usage_source "none")
        ctx.cached_usage = NOTHING_METERED
    if outcome != FOLLOWED:
        ctx.termination = _termination(outcome, ctx)
        ctx.keep_alive = False
    return True


def _head_maker(ctx: RequestContext, headers: list[tuple[bytes, bytes]] | None,
                chunked: bool) -> Callable[[FlightHead], bytes]:
    """This client's response head for a flight's (or a stored answer's) head."""
    def head_for(head: FlightHead) -> bytes:
        ctx.status = head.status
        ctx.response_started = True
        return response_head(head.status, head.headers if headers is None else headers, keeps_length=not chunked,
                             chunked=chunked, streaming=head.streaming, request_id=ctx.forwarded_request_id,
                             extra=ctx.response_headers,
                             connection=connection_line(ctx.keep_alive, ctx.head.version == "1.0"))
    return head_for


def _took(ctx: RequestContext, follower: Follower, status: int) -> None:
    ctx.status = status or ctx.status
    ctx.bytes_out += follower.bytes_out
    if follower.first_byte_at:
        ctx.t_first_byte = follower.first_byte_at


def _termination(outcome: str, ctx: RequestContext) -> str:
    """The termination code of a follower or replay that did not get to the end (the connection may have set
    one already)."""
    if ctx.termination != "--":
        return ctx.termination
    if outcome == GONE:
        return "CD" if ctx.response_started else "CH"
    return {CUT: "cD", TRUNCATED: "SD"}.get(outcome, ctx.termination)


def land(services: Services, ctx: RequestContext, flight: Flight, record: dict[str, Any] | None) -> None:
    """The leader of `flight` ended: store its answer if it came whole with a 200, and give its followers the
    usage (from `record`, None when unmetered) for their own records."""
    usage = None
    if record is not None:
        usage = (record["prompt_tokens"], record["completion_tokens"], record.get("cache_read_tokens"),
                 record.get("cache_write_tokens"), record["usage_source"])
    complete = flight.state == "complete" and flight.chunks is not None and flight.head is not None
    if complete and ctx.status == 200 and flight.head.status == 200:
        head = flight.head
        body = b"".join(flight.chunks)
        if ended_whole(ctx, head.streaming, body):
            content_type = head.headers[0][1] if head.headers else b""
            services.cache.put(ctx.cache_plan, Entry(head.status, content_type, head.streaming, body, usage,
                                                     ctx.backend))
    flight.end(usage, ctx.backend)


def ended_whole(ctx: RequestContext, streaming: bool, body: bytes) -> bool:
    """Whether an answer that ended cleanly at the HTTP level is whole: the backend reported its usage (which every
    cacheable dialect sends last, or in its whole JSON body), and a stream whose API has a final event ended with
    it, with no in-band error event on the way. An error event, a stream without its end, a body cut by a clean
    close are not stored."""
    meter = ctx.meter
    if meter is None or meter.final_usage(ctx.backend_status).source != REPORTED:
        return False
    if not streaming:
        return True
    dialect = ctx.endpoint.dialect if meter.translation is not None else meter.dialect
    final = FINAL_EVENTS.get(dialect)
    if final is not None and final not in _last_event(body):
        return False
    return not any(marker in body for marker in IN_BAND_ERRORS) and not body.startswith(IN_BAND_ERROR_STARTS)


def _last_event(body: bytes) -> bytes:
    end = body.rstrip()
    return end[max(end.rfind(b"\n\n"), end.rfind(b"\r\n\r\n"), end.rfind(b"\r\r")) + 1:]


def served_record(services: Services, ctx: RequestContext, duration: float, ttft: float | None) -> dict[str, Any]:
    """The usage record of a hit or a follower: the original usage, at zero cost unless `bill_hits`."""
    # Exactly one record per client: an answer stored unmetered (or a leader whose record failed) counts none.
    record = build_record(ctx, MeteredUsage(*(ctx.cached_usage or NOTHING_METERED)), duration, ttft,
                          services.prices)
    record["cached"] = ctx.cache_role == HIT_ROLE
    record["deduplicated"] = ctx.cache_role == FOLLOWER_ROLE
    if not services.cache.config.bill_hits and "cost_usd" in record:
        record["cost_usd"] = 0.0
    return record


def charges(services: Services, ctx: RequestContext) -> bool:
    """Whether this request's record is charged to its rate limits' tokens and budget."""
    return not ctx.cache_role or services.cache.config.bill_hits

