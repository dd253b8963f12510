"""The phases of one request (pipeline.handle_request) driven with fakes.

The request sees its connection through a FakeClientSide (context.ClientSide) and its backends through the
fake network of the FakeLoop; the Services are real (tests/fakes.py). Each test starts one request the way
the client connection does (EagerRun, in `start_request`) and plays the backend's or the client's part by hand.
"""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from llmproxy.context import RequestContext
from tests.fakes import (
    OK,
    STREAM_HEAD,
    FakeLoop,
    backend,
    chat,
    chunk,
    http_request,
    json_response,
    make_config,
    make_services,
    requests_counted,
    running,
    sample,
    start_request,
)

KEY = "sk-pipeline-test-key-0001"
BEARER = {"Authorization": f"Bearer {KEY}"}
EVENT = chunk(b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n')


@pytest.fixture
def loop():
    with running() as loop:
        yield loop


def with_headers(raw: bytes, headers: dict[str, str]) -> bytes:
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items()).encode()
    return raw.replace(b"\r\n", b"\r\n" + lines, 1)


def forwarded_body(upstream) -> bytes:
    return upstream.received.split(b"\r\n\r\n", 1)[1]


def error_of(ctx: RequestContext) -> tuple[int, dict]:
    [reply] = ctx.conn.responses()
    return reply.status, reply.json()["error"]


# --- authentication comes first -----------------------------------------------------------------------------


@pytest.mark.parametrize(("headers", "status", "code", "reason"), [
    ({}, 401, "invalid_api_key", "missing"),
    ({"Authorization": "Bearer sk-not-a-key"}, 401, "invalid_api_key", "unknown_key"),
    ({"Authorization": f"Basic {KEY}"}, 401, "invalid_api_key", "missing"),
    ({**BEARER, "X-API-Key": "sk-another-key"}, 400, "ambiguous_api_key", "ambiguous"),
])
def test_an_auth_refusal_is_answered_without_reading_the_body(loop, headers, status, code, reason):
    services = make_services(make_config(auth={"enabled": True, "keys": [{"key": KEY}]}), loop)
    head_only = http_request("POST", "/v1/chat/completions",
                             headers={**headers, "Content-Length": "100", "Expect": "100-continue"})
    ctx = start_request(services, head_only, loop)
    [reply] = ctx.conn.responses()  # no "100 Continue" before it: the body was never asked for
    assert (reply.status, reply.json()["error"]["code"]) == (status, code)
    assert reply.headers["www-authenticate"] == 'Bearer realm="llmproxy"'
    assert reply.headers["connection"] == "close"  # the unread body would be taken for the next request
    assert ctx.conn.body_timer_armed == 0 and ctx.body_waiter is None
    assert ctx.conn.finished == [ctx] and loop.connects == []
    assert sample(services, "llmproxy_auth_failures_total", reason=reason) == 1


def test_with_a_valid_key_the_body_is_asked_for_and_waited_for(loop):
    services = make_services(make_config(auth={"enabled": True, "keys": [{"key": KEY}]}), loop)
    head_only = http_request("POST", "/v1/chat/completions",
                             headers={**BEARER, "Content-Length": "100", "Expect": "100-continue"})
    ctx = start_request(services, head_only, loop)
    assert ctx.conn.transport.data == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert ctx.conn.body_timer_armed == 1 and ctx.conn.finished == []
    assert ctx.tenant is not None and ctx.tenant.key_id == ctx.key_id


# --- own endpoints and forwarding ---------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "target", "forwarded"), [
    ("GET", "/health", False),
    ("HEAD", "/health", False),
    ("GET", "/health?verbose=1", False),
    ("GET", "/metrics", False),
    ("GET", "/v1/models", False),
    ("GET", "/v1/models/m", False),
    ("GET", "/v1/models/", True),  # no id: not the proxy's
    ("GET", "/healthz", True),
    ("GET", "//health", False),  # the codec made it canonical: "//health" is "/health"
    ("GET", "/v1/./models", False),
    ("POST", "/v1/chat/completions", True),
    ("GET", "/version", True),
])
def test_the_proxys_own_endpoints_are_answered_here_and_every_other_path_forwarded(loop, method, target,
                                                                                  forwarded):
    services = make_services(make_config(), loop)
    body = b'{"model":"m"}' if method == "POST" else None
    ctx = start_request(services, http_request(method, target, body), loop)
    if forwarded:
        [upstream] = loop.upstreams
        assert upstream.received.startswith(f"{method} {target} HTTP/1.1\r\n".encode())
        assert ctx.conn.transport.data == b"" and services.traffic.inflight == 1
        upstream.send(OK)
    else:
        assert loop.connects == [] and services.traffic.inflight == 0
    assert ctx.status == 200 and ctx.conn.finished == [ctx] and services.traffic.inflight == 0


def test_own_endpoints_do_not_count_as_in_flight_and_see_the_forwarded_ones_that_do(loop):
    services = make_services(make_config(), loop)
    forwarded = start_request(services, chat(), loop)
    health = start_request(services, http_request("GET", "/health"), loop)
    assert health.conn.responses()[0].json()["inflight"] == 1
    assert services.traffic.inflight == 1
    loop.upstreams[0].send(OK)
    assert services.traffic.inflight == 0 and forwarded.status == 200


# --- model: alias, allow-list, routing errors ---------------------------------------------------------------


@pytest.mark.parametrize(("requested", "forwarded_as"), [("gpt-4o", "m"), ("m", "m")])
def test_a_model_alias_is_forwarded_as_its_target_and_other_bodies_byte_for_byte(loop, requested, forwarded_as):
    services = make_services(make_config(routing={"model_aliases": {"gpt-4o": "m"}}), loop)
    raw = chat(requested)
    ctx = start_request(services, raw, loop)
    [upstream] = loop.upstreams
    assert orjson.loads(forwarded_body(upstream))["model"] == forwarded_as
    assert (ctx.model, ctx.model_aliased) == (forwarded_as, requested != forwarded_as)
    if requested == forwarded_as:
        assert forwarded_body(upstream) == raw.split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize(("allowed", "requested", "status"), [
    (None, "other", 200),  # a key without a list may use any model
    (["m"], "m", 200),
    (["m"], "other", 403),
    (["m"], "gpt-4o", 200),  # an alias of an allowed model
    (["gpt-4o"], "gpt-4o", 200),  # the alias itself allowed
    (["gpt-4o"], "m", 403),  # ...does not allow its target by name
])
def test_a_key_may_use_only_the_models_it_is_allowed(loop, allowed, requested, status):
    key = {"key": KEY} if allowed is None else {"key": KEY, "models": allowed}
    services = make_services(make_config(backends=[backend("a", models=["m", "other"])],
                                         routing={"model_aliases": {"gpt-4o": "m"}},
                                         auth={"enabled": True, "keys": [key]}), loop)
    ctx = start_request(services, with_headers(chat(requested), BEARER), loop)
    if status == 200:
        loop.upstreams[0].send(OK)
        assert ctx.status == 200
    else:
        assert error_of(ctx) == (403, {"message": f"This API key may not use the model `{requested}`.",
                                       "type": "invalid_request_error", "param": None, "code": "model_not_allowed"})
        assert loop.connects == []


@pytest.mark.parametrize(("raw", "status", "error_type", "code", "termination"), [
    (chat("nope"), 404, "invalid_request_error", "model_not_found", "LR"),
    (http_request("POST", "/generate", b'{"inputs":"hi"}'), 404, "invalid_request_error", "path_not_served",
     "LR"),  # TGI's path, and only vLLM is configured
    (http_request("POST", "/api/chat", b'{"model":"m"}'), 404, "invalid_request_error", "path_not_served", "LR"),
], ids=["unknown-model", "tgi-path", "ollama-path"])
def test_a_request_no_backend_can_serve_gets_an_openai_shaped_error(loop, raw, status, error_type, code,
                                                                     termination):
    services = make_services(make_config(), loop)
    ctx = start_request(services, raw, loop)
    [reply] = ctx.conn.responses()
    assert reply.status == status
    assert reply.json() == {"error": {"message": reply.json()["error"]["message"], "type": error_type,
                                      "param": None, "code": code}}
    assert "connection" not in reply.headers  # the body was read: the connection may go on
    assert ctx.termination == termination and loop.connects == []


# --- failover -----------------------------------------------------------------------------------------------


def fail_first_attempt(loop: FakeLoop, failure: str) -> None:
    """Make the attempt on backend "a" fail as `failure` says ("refused" is set up before the request)."""
    if failure == "reset":
        loop.upstreams[0].close()  # closed before any response byte
    elif failure == "timeout":
        loop.advance(2.5)  # past the first-byte timeout (2 s) and the sweeper's next tick
    elif failure != "refused":
        loop.upstreams[0].send(json_response({"error": "busy"}, int(failure), "Failed"))


@pytest.mark.parametrize(("failure", "retry_on", "retried", "status"), [
    ("refused", None, True, 200),
    ("refused", ["reset"], False, 502),
    ("reset", None, True, 200),
    ("reset", ["connect_error"], False, 502),
    ("503", None, True, 200),
    ("503", ["connect_error"], False, 503),  # relayed as the backend sent it
    ("500", None, False, 500),
    ("500", ["500"], True, 200),
    ("timeout", None, False, 504),
    ("timeout", ["timeout"], True, 200),
])
def test_a_failure_before_the_first_byte_is_retried_elsewhere_only_on_a_retry_on_condition(
        loop, failure, retry_on, retried, status):
    routing = {} if retry_on is None else {"retry_on": retry_on}
    services = make_services(make_config(backends=[backend("a"), backend("b")], routing=routing,
                                         server={"timeouts": {"first_byte": 2}}), loop)
    if failure == "refused":
        loop.refuse("a")
    ctx = start_request(services, chat(), loop)
    fail_first_attempt(loop, failure)
    on_b = [u for u in loop.upstreams if u.host == "b"]
    if retried:
        on_b[0].send(OK)
    assert [bool(on_b), ctx.retries, ctx.status] == [retried, int(retried), status]
    assert ctx.backend == ("b" if retried else "a")
    condition = "connect_error" if failure == "refused" else failure
    assert sample(services, "llmproxy_upstream_retries_total", reason=condition) == int(retried)
    assert ctx.conn.finished == [ctx]


def test_a_failure_after_the_first_byte_is_never_retried(loop):
    services = make_services(make_config(backends=[backend("a"), backend("b")]), loop)
    ctx = start_request(services, chat(stream=True), loop)
    [upstream] = loop.upstreams
    upstream.send(STREAM_HEAD + EVENT)
    upstream.close()  # "reset" is in retry_on, but the client has bytes already
    assert ctx.conn.aborts == 1  # the client sees a truncated stream, not a clean end
    assert (ctx.status, ctx.termination, ctx.retries, ctx.backend) == (200, "SD", 0, "a")
    assert loop.connects == ["a"]


def test_the_last_attempt_relays_the_backends_own_answer(loop):
    services = make_services(make_config(backends=[backend("a"), backend("b")], routing={"retries": 1}), loop)
    ctx = start_request(services, chat(), loop)
    loop.upstreams[0].send(json_response({"from": "a"}, 503, "Service Unavailable"))
    loop.upstreams[1].send(json_response({"from": "b"}, 503, "Service Unavailable"))
    [reply] = ctx.conn.responses()
    assert (reply.status, reply.json()) == (503, {"from": "b"})
    assert ctx.retries == 1


def test_attempts_stop_after_routing_retries(loop):
    services = make_services(make_config(backends=[backend("a"), backend("b"), backend("c")],
                                         routing={"retries": 1}), loop)
    for host in "abc":
        loop.refuse(host)
    ctx = start_request(services, chat(), loop)
    assert loop.connects == ["a", "b"]
    assert error_of(ctx)[0] == 502 and ctx.retries == 1


def test_a_pooled_connection_that_died_idle_is_replaced_once_on_the_same_backend(loop):
    """Not a failover: the backend never saw the request, so even without "reset" in retry_on it is sent again,
    on a fresh connection (and it is not counted as a retry)."""
    services = make_services(make_config(routing={"retry_on": ["connect_error"]}), loop)
    first = start_request(services, chat(), loop)
    loop.upstreams[0].send(OK)
    second = start_request(services, chat(), loop)
    assert loop.upstreams[0].received.count(b"POST ") == 2  # written on the pooled connection...
    loop.upstreams[0].close()  # ...which the backend had closed
    assert len(loop.upstreams) == 2
    loop.upstreams[1].send(OK)
    assert (first.status, second.status, second.retries) == (200, 200, 0)


def test_a_reload_mid_request_does_not_change_the_services_the_request_uses(loop):
    price = {"input_per_million": 1_000_000, "output_per_million": 1_000_000}
    old = make_services(make_config(backends=[backend("a1", timeouts={"connect": 1}), backend("a2")],
                                    pricing={"m": price}), loop)
    loop.hang("a1")
    ctx = start_request(old, chat(), loop)
    new = make_services(make_config(backends=[backend("b")], pricing={"m": {**price, "input_per_million": 0}}),
                        loop, previous=old)
    loop.advance(1.0)  # a1's connect times out: the retry goes to the request's own fleet
    [upstream] = loop.upstreams
    assert upstream.host == "a2"
    upstream.send(OK)
    [record] = old.outbox.records
    assert (ctx.status, record["backend"], record["cost_usd"]) == (200, "a2", 7.0)  # 5 + 2 tokens at the old price
    assert new.generation == 2 and [b.name for b in new.fleet.backends] == ["b"]


# --- finish: exactly once, whatever the ending --------------------------------------------------------------


class ExplodingHeaders:
    def upstream_request(self, *args: object) -> bytes:
        raise RuntimeError("a bug in a phase")


class ExplodingAccessLog:
    def write(self, *args: object) -> None:
        raise OSError("disk full")


def _local(loop, services):
    return start_request(services, http_request("GET", "/health"), loop)


def _auth_refused(loop, services):
    return start_request(services, chat(), loop)


def _model_not_found(loop, services):
    return start_request(services, with_headers(chat("nope"), BEARER), loop)


def _completed(loop, services):
    ctx = start_request(services, with_headers(chat(), BEARER), loop)
    loop.upstreams[0].send(OK)
    return ctx


def _backend_reset(loop, services):
    ctx = start_request(services, with_headers(chat(), BEARER), loop)
    loop.upstreams[0].close()
    return ctx


def _backend_died_mid_stream(loop, services):
    ctx = start_request(services, with_headers(chat(stream=True), BEARER), loop)
    loop.upstreams[0].send(STREAM_HEAD + EVENT)
    loop.upstreams[0].close()
    return ctx


def _client_left_mid_stream(loop, services):
    ctx = start_request(services, with_headers(chat(stream=True), BEARER), loop)
    loop.upstreams[0].send(STREAM_HEAD + EVENT)
    ctx.conn.closed = True  # what ClientConnection.connection_lost does
    ctx.exchange.client_lost()
    loop.run_ready()
    return ctx


def _client_left_while_connecting(loop, services):
    loop.hang("a")
    ctx = start_request(services, with_headers(chat(), BEARER), loop)
    ctx.conn.closed = True
    ctx.run.cancel()
    loop.run_ready()
    return ctx


def _internal_error(loop, services):
    return start_request(dataclasses.replace(services, headers=ExplodingHeaders()), with_headers(chat(), BEARER), loop)


def _recording_failed(loop, services):
    return _completed(loop, dataclasses.replace(services, access_log=ExplodingAccessLog()))


@pytest.mark.parametrize(("ending", "status", "usage_records", "logged"), [
    (_local, 200, 0, 1),
    (_auth_refused, 401, 0, 1),
    (_model_not_found, 404, 0, 1),
    (_completed, 200, 1, 1),
    (_backend_reset, 502, 1, 1),  # sent: it gets a (estimated) record
    (_backend_died_mid_stream, 200, 1, 1),
    (_client_left_mid_stream, 200, 1, 1),
    (_client_left_while_connecting, 499, 0, 1),
    (_internal_error, 500, 0, 1),
    (_recording_failed, 200, 1, 0),
])
def test_finish_records_the_request_exactly_once_whatever_the_ending(loop, caplog, ending, status, usage_records,
                                                                     logged):
    services = make_services(make_config(auth={"enabled": True, "keys": [{"key": KEY}]}, routing={"retries": 0},
                                         rate_limit={"enabled": True, "global": {"max_concurrent": 5}}), loop)
    ctx = ending(loop, services)
    assert ctx.conn.finished == [ctx]  # the connection goes on exactly once
    assert ctx.status == status
    assert requests_counted(services) == 1
    assert sample(services, "llmproxy_requests_total", backend=ctx.backend, status=str(status)) == 1
    assert len(services.access_log.requests) == logged
    assert len(services.outbox.records) == usage_records
    assert services.limiter.held == 0  # settled once: never left held, never given back twice
    assert ctx.admission is None


def test_a_rate_limit_slot_is_held_for_the_whole_stream_and_given_back_at_its_end(loop):
    services = make_services(make_config(rate_limit={"enabled": True, "global": {"max_concurrent": 1}}), loop)
    streaming = start_request(services, chat(stream=True), loop)
    loop.upstreams[0].send(STREAM_HEAD + EVENT)
    assert services.limiter.held == 1
    refused = start_request(services, chat(), loop)
    assert error_of(refused)[0] == 429 and refused.conn.finished == [refused]
    loop.upstreams[0].send(b"0\r\n\r\n")
    assert streaming.conn.finished == [streaming] and services.limiter.held == 0
    admitted = start_request(services, chat(), loop)
    loop.upstreams[0].send(OK)
    assert admitted.status == 200 and services.limiter.held == 0


@pytest.mark.parametrize("per_key", [True, False])
def test_tokens_and_cost_are_labelled_with_the_key_only_with_metrics_per_key(loop, per_key):
    services = make_services(make_config(auth={"enabled": True, "metrics_per_key": per_key, "keys": [{"key": KEY}]},
                                         pricing={"m": {"input_per_million": 1e6, "output_per_million": 1e6}}), loop)
    start_request(services, with_headers(chat(), BEARER), loop)
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    loop.upstreams[0].send(json_response({"object": "chat.completion", "choices": [], "usage": usage}))
    [record] = services.outbox.records
    key_id = record["key_id"] if per_key else ""  # one series per key only when asked: keys can be many
    assert record["key_id"] and record["cost_usd"] == 5
    assert sample(services, "llmproxy_usage_tokens_total", type="completion", model="m", key_id=key_id) == 2
    assert sample(services, "llmproxy_estimated_cost_usd_total", model="m", key_id=key_id) == 5
