"""The proxy's own endpoints (own_endpoints.py): /health, /ready, /v1/models, /v1/models/{id}, /metrics.

Each request goes through handle_request (so errors get their real shape) on a FakeClientSide, against real
Services whose backends' states a test sets by hand; the fake network would record any forwarding.
"""

from __future__ import annotations

import pytest

from tests.fakes import (
    FakeLoop,
    Reply,
    backend,
    http_request,
    make_config,
    make_services,
    running,
    start_request,
)

KEY = "sk-own-endpoints-key-0001"
TWO_BACKENDS = [backend("a", models=["m1", "m2"]), backend("b", models=["m2", "m3"])]
ALIASES = {"fast": "m1", "ghost": "not-served"}


@pytest.fixture
def loop():
    with running() as loop:
        yield loop


def ask(loop: FakeLoop, services, target: str, method: str = "GET", headers: dict[str, str] | None = None) -> Reply:
    ctx = start_request(services, http_request(method, target, headers=headers), loop)
    assert loop.connects == [], "the proxy's own endpoints never reach a backend"
    assert ctx.conn.finished == [ctx]
    [reply] = ctx.conn.responses()
    return reply


def take_down(services, loop: FakeLoop, name: str, how: str) -> None:
    [b] = [b for b in services.fleet.backends if b.name == name]
    if how == "unhealthy":
        b.healthy = False
        b.last_error = "probe failed"
    else:
        b.ejected_until = loop.time() + 30


# --- /health ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("down", "draining", "status", "state", "available"), [
    ({}, False, 200, "ok", ["a", "b"]),
    ({"a": "unhealthy"}, False, 200, "ok", ["b"]),
    ({"a": "ejected"}, False, 200, "ok", ["b"]),
    ({"a": "unhealthy", "b": "ejected"}, False, 200, "degraded", []),  # still serving: requests are tried
    ({}, True, 503, "draining", ["a", "b"]),  # a load balancer in front must stop sending
    ({"a": "unhealthy", "b": "unhealthy"}, True, 503, "draining", []),
])
def test_health_reports_the_proxys_state_and_each_backends(loop, down, draining, status, state, available):
    services = make_services(make_config(backends=TWO_BACKENDS), loop)
    for name, how in down.items():
        take_down(services, loop, name, how)
    services.traffic.draining = draining
    reply = ask(loop, services, "/health")
    body = reply.json()
    assert (reply.status, body["status"]) == (status, state)
    assert (body["backends"], body["available"]) == (2, len(available))
    upstreams = {u["name"]: u for u in body["upstreams"]}
    assert [name for name, u in upstreams.items() if u["available"]] == available
    for name, how in down.items():
        assert upstreams[name]["healthy"] is (how != "unhealthy")
        assert upstreams[name]["ejected_for_s"] == (30.0 if how == "ejected" else 0.0)
        assert upstreams[name]["last_error"] == ("probe failed" if how == "unhealthy" else None)


# --- /ready -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("down", "leaving", "draining", "status", "reason"), [
    ({}, False, False, 200, None),
    ({"a": "unhealthy"}, False, False, 200, None),  # one backend is enough
    ({"a": "unhealthy", "b": "ejected"}, False, False, 503, "no backend available"),
    ({}, True, False, 503, "shutting down"),  # SIGTERM: not ready at once, serving on for shutdown_delay
    ({}, False, True, 503, "shutting down"),
])
def test_ready_is_200_only_with_a_backend_available_and_not_stopping(loop, down, leaving, draining, status, reason):
    services = make_services(make_config(backends=TWO_BACKENDS), loop)
    for name, how in down.items():
        take_down(services, loop, name, how)
    services.traffic.leaving, services.traffic.draining = leaving, draining
    reply = ask(loop, services, "/ready")
    assert reply.status == status
    assert reply.json().get("reason") == reason
    assert reply.json()["status"] == ("ready" if status == 200 else "not_ready")


def test_ready_needs_no_key_by_default(loop):
    services = make_services(make_config(backends=TWO_BACKENDS, auth={"enabled": True, "keys": [{"key": KEY}]}), loop)
    assert ask(loop, services, "/ready").status == 200


@pytest.mark.parametrize(("rate_limit", "section"), [
    ({"enabled": False}, None),
    ({"enabled": True, "global": {"max_concurrent": 3}}, {"store": "memory", "admissions_held": 0}),
])
def test_health_shows_the_rate_limiter_only_when_it_is_enabled(loop, rate_limit, section):
    services = make_services(make_config(rate_limit=rate_limit), loop)
    assert ask(loop, services, "/health").json().get("ratelimit") == section


def test_head_health_sends_the_head_of_the_get_answer_without_its_body(loop):
    services = make_services(make_config(), loop)
    got = ask(loop, services, "/health")
    ctx = start_request(services, http_request("HEAD", "/health"), loop)
    head = ctx.conn.transport.data
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
    assert b"content-length: %d\r\n" % len(got.body) in head
    assert ctx.conn.finished == [ctx]


# --- /v1/models ---------------------------------------------------------------------------------------------


def test_the_model_list_is_the_union_of_the_backends_models_plus_the_aliases_of_served_ones(loop):
    services = make_services(make_config(backends=TWO_BACKENDS, routing={"model_aliases": ALIASES}), loop)
    body = ask(loop, services, "/v1/models").json()
    assert body["object"] == "list"
    cards = {card["id"]: card for card in body["data"]}
    assert [card["id"] for card in body["data"]] == ["m1", "m2", "m3", "fast"]  # each once; "ghost" serves nothing
    assert cards["m2"]["owned_by"] == "a"  # the first backend's card
    assert {k: cards["fast"][k] for k in ("root", "parent", "owned_by")} == {"root": "m1", "parent": "m1",
                                                                             "owned_by": "a"}


@pytest.mark.parametrize(("down", "ids"), [
    ([], ["m1", "m2", "m3"]),
    (["a"], ["m2", "m3"]),  # an unavailable backend's models are not offered...
    (["a", "b"], ["m1", "m2", "m3"]),  # ...unless none is available: then every backend may be tried
])
def test_the_model_list_offers_what_the_available_backends_serve(loop, down, ids):
    services = make_services(make_config(backends=TWO_BACKENDS), loop)
    for name in down:
        take_down(services, loop, name, "unhealthy")
    assert [card["id"] for card in ask(loop, services, "/v1/models").json()["data"]] == ids


@pytest.mark.parametrize(("allowed", "ids"), [
    (None, ["m1", "m2", "m3", "fast"]),
    (["m1"], ["m1", "fast"]),  # an alias of an allowed model is usable, so listed
    (["fast"], ["fast"]),
    (["m3", "not-served"], ["m3"]),
])
def test_a_key_with_a_model_list_sees_only_the_models_it_may_use(loop, allowed, ids):
    key = {"key": KEY} if allowed is None else {"key": KEY, "models": allowed}
    services = make_services(make_config(backends=TWO_BACKENDS, routing={"model_aliases": ALIASES},
                                         auth={"enabled": True, "keys": [key]}), loop)
    reply = ask(loop, services, "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert [card["id"] for card in reply.json()["data"]] == ids


# --- /v1/models/{id} ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("target", "status", "model_id"), [
    ("/v1/models/Qwen/Qwen2.5-7B-Instruct", 200, "Qwen/Qwen2.5-7B-Instruct"),  # the id has a slash
    ("/v1/models/Qwen%2FQwen2.5-7B-Instruct", 200, "Qwen/Qwen2.5-7B-Instruct"),  # percent-encoded
    ("/v1/models/Qwen/Qwen2.5-7B-Instruct?x=1", 200, "Qwen/Qwen2.5-7B-Instruct"),
    ("/v1/models/fast", 200, "fast"),
    ("/v1/models/Qwen", 404, None),
    ("/v1/models/ghost", 404, None),  # an alias of a model nobody serves
])
def test_one_model_card_by_id_or_an_openai_404(loop, target, status, model_id):
    services = make_services(make_config(backends=[backend("a", models=["Qwen/Qwen2.5-7B-Instruct"])],
                                         routing={"model_aliases": {"fast": "Qwen/Qwen2.5-7B-Instruct",
                                                                    "ghost": "gone"}}), loop)
    reply = ask(loop, services, target)
    assert reply.status == status
    if status == 200:
        assert reply.json()["id"] == model_id
    else:
        assert reply.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(("model_id", "status"), [("m1", 200), ("fast", 200), ("m2", 404)])
def test_a_card_the_key_may_not_use_is_not_found_for_it(loop, model_id, status):
    services = make_services(make_config(backends=TWO_BACKENDS, routing={"model_aliases": ALIASES},
                                         auth={"enabled": True, "keys": [{"key": KEY, "models": ["m1"]}]}), loop)
    reply = ask(loop, services, f"/v1/models/{model_id}", headers={"Authorization": f"Bearer {KEY}"})
    assert reply.status == status
    if status == 404:  # the same answer as for a model that does not exist: nothing learned by asking
        assert reply.json()["error"] == {"message": f"The model `{model_id}` does not exist.",
                                         "type": "invalid_request_error", "param": None, "code": "model_not_found"}


# --- methods, auth, /metrics --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
@pytest.mark.parametrize("target", ["/health", "/metrics", "/v1/models", "/v1/models/m"])
def test_the_own_endpoints_accept_only_get_and_head(loop, method, target):
    services = make_services(make_config(), loop)
    reply = ask(loop, services, target, method=method)
    assert (reply.status, reply.json()["error"]["code"]) == (405, "method_not_allowed")
    assert reply.json()["error"]["message"] == f"{target} accepts GET and HEAD only"


@pytest.mark.parametrize(("skip_paths", "target", "status"), [
    (None, "/health", 200),
    (None, "/health?full=1", 200),
    (None, "/metrics", 200),
    (None, "/v1/models", 401),
    (None, "/v1/models/m", 401),
    ([], "/health", 401),
    (["/v1/models"], "/v1/models", 200),
])
def test_own_endpoints_need_a_key_unless_their_path_is_skipped(loop, skip_paths, target, status):
    auth = {"enabled": True, "keys": [{"key": KEY}]}
    if skip_paths is not None:
        auth["skip_paths"] = skip_paths
    services = make_services(make_config(auth=auth), loop)
    assert ask(loop, services, target).status == status
    assert ask(loop, services, target, headers={"X-API-Key": KEY}).status == 200


@pytest.mark.parametrize(("enabled", "status", "content_type"), [
    (True, 200, "text/plain; version=0.0.4; charset=utf-8"),
    (False, 404, "application/json"),
])
def test_metrics_are_served_only_when_enabled(loop, enabled, status, content_type):
    services = make_services(make_config(metrics={"enabled": enabled}), loop)
    ask(loop, services, "/health")  # one request finished before the scrape
    reply = ask(loop, services, "/metrics")
    assert (reply.status, reply.headers["content-type"]) == (status, content_type)
    if enabled:
        assert b'llmproxy_requests_total{backend="",status="200"} 1.0' in reply.body
    else:
        assert reply.json()["error"] == {"message": "metrics are disabled", "type": "invalid_request_error",
                                         "param": None, "code": "not_found"}
