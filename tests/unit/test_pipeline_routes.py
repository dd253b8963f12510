"""`routes:` in the pipeline (pipeline.proxy_request -> fleet/routes.py), driven with the fakes of tests/fakes.py:
which backends a routed request's attempts go to, and what a route that cannot serve a request answers."""

from __future__ import annotations

import orjson
import pytest

from llmproxy.eager import EagerRun
from llmproxy.fleet.routes import request_point
from llmproxy.pipeline import handle_request
from tests.fakes import (
    OK,
    FakeLoop,
    backend,
    chat,
    http_request,
    json_response,
    make_config,
    make_services,
    request_context,
    running,
)

CHAT_PATH = "/v1/chat/completions"


@pytest.fixture
def loop():
    with running() as loop:
        yield loop


def route(kind: str, upstreams: list, id: str = "r", **match) -> dict:
    return {"id": id, "match": match, "strategy": {"type": kind, "upstreams": upstreams}}


def services_with(loop: FakeLoop, backends: list[str], *routes: dict, **sections):
    return make_services(make_config(backends=[backend(name, models=["m", "gpt-4"]) for name in backends],
                                     routes=list(routes), **sections), loop)


def start(services, raw: bytes, loop: FakeLoop, request_id: str = "req-1"):
    ctx = request_context(raw, request_id=request_id)
    ctx.run = EagerRun(handle_request(services, ctx), loop)
    loop.run_ready()
    return ctx


def answer(loop: FakeLoop, ctx, response: bytes = OK) -> None:
    """The backend of `ctx` answers it (one request at a time: its connection is the last opened to it)."""
    [upstream for upstream in loop.upstreams if upstream.host == ctx.backend][-1].send(response)


def test_without_routes_the_fleet_has_no_table_and_requests_go_by_load_balance(loop):
    services = services_with(loop, ["a", "b"])
    assert services.fleet.routes is None
    for _ in range(2):
        start(services, chat(), loop)
        loop.upstreams[-1].send(OK)
    assert loop.connects == ["a", "b"]


def test_a_failover_route_tries_its_upstreams_in_order_and_never_another_backend(loop):
    services = services_with(loop, ["other", "c", "b", "a"], route("failover", ["a", "b", "c"]))
    loop.refuse("a")
    loop.refuse("b")
    ctx = start(services, chat(), loop)
    loop.upstreams[-1].send(OK)
    assert loop.connects == ["a", "b", "c"]
    assert (ctx.status, ctx.backend, ctx.retries) == (200, "c", 2)


def test_a_failover_route_relays_the_last_answer_when_retries_run_out(loop):
    services = services_with(loop, ["a", "b", "c"], route("failover", ["c", "b", "a"]), routing={"retries": 1})
    loop.refuse("c")
    ctx = start(services, chat(), loop)
    loop.upstreams[-1].send(json_response({"from": "b"}, 503, "Service Unavailable"))
    assert loop.connects == ["c", "b"] and ctx.status == 503


def _id_on_side(low: float, high: float) -> str:
    """A request id whose canary point (percent) falls in [low, high)."""
    return next(rid for rid in (f"req-{i}" for i in range(1000)) if low <= request_point(rid) * 100 < high)


def test_a_canary_request_is_retried_on_its_own_side(loop):
    halves = [{"name": "stable", "percentage": 50}, {"name": "canary", "percentage": 50}]
    services = services_with(loop, ["stable", "canary"], route("canary", halves))
    ctx = start(services, chat(), loop, request_id=_id_on_side(50, 100))
    loop.upstreams[0].send(json_response({"error": "busy"}, 503, "Service Unavailable"))
    loop.upstreams[1].send(OK)
    assert loop.connects == ["canary", "canary"]
    assert (ctx.status, ctx.retries) == (200, 1)
    start(services, chat(), loop, request_id=_id_on_side(0, 50))
    loop.upstreams[-1].send(OK)
    assert loop.connects[-1] == "stable"


def test_the_json_body_picks_the_route_and_other_requests_take_the_catch_all(loop):
    services = services_with(loop, ["gpt4", "claude"],
                             route("round_robin", ["gpt4", "claude"], "default_chat_route", path=CHAT_PATH),
                             route("weighted_random", [{"name": "gpt4", "weight": 100}], "specific_gpt4_route",
                                   path=CHAT_PATH, json_body={"model": "gpt-4"}))
    served = []
    for model in ["gpt-4", "m", "gpt-4", "m", "gpt-4", "m"]:
        ctx = start(services, chat(model), loop)
        answer(loop, ctx)
        served.append(ctx.backend)
    assert served == ["gpt4", "gpt4", "gpt4", "claude", "gpt4", "gpt4"]


@pytest.mark.parametrize(("path", "body", "shape"), [
    (CHAT_PATH, {"model": "m", "messages": [{"role": "user", "content": "hi"}]}, "openai"),
    ("/v1/messages", {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}, "anthropic"),
])
def test_a_route_none_of_whose_upstreams_serves_the_model_answers_404_in_the_clients_shape(loop, path, body, shape):
    services = make_services(make_config(backends=[backend("a"), backend("b", models=["other"])],
                                         routes=[route("failover", ["b"], "other-only", path=path)]), loop)
    ctx = start(services, http_request("POST", path, orjson.dumps(body)), loop)
    [reply] = ctx.conn.responses()
    message = "No upstream of route `other-only` serves the model `m`."
    if shape == "openai":
        assert reply.json() == {"error": {"message": message, "type": "invalid_request_error", "param": None,
                                          "code": "model_not_found"}}
    else:
        assert reply.json() == {"type": "error", "error": {"type": "not_found_error", "message": message}}
    assert reply.status == 404 and loop.connects == [] and ctx.termination == "LR"


def test_a_route_whose_upstreams_are_all_down_tries_them_and_answers_their_error(loop):
    services = services_with(loop, ["up", "down"], route("failover", ["down"], path=CHAT_PATH),
                             routing={"retries": 0})
    services.fleet.backend_named("down").healthy = False
    loop.refuse("down")
    ctx = start(services, chat(), loop)
    [reply] = ctx.conn.responses()
    assert loop.connects == ["down"]  # never "up": the route does not name it
    assert (reply.status, reply.json()["error"]["code"]) == (502, "upstream_connect_failed")


def test_json_body_conditions_read_the_body_as_the_client_sent_it_an_alias_by_its_own_name(loop):
    services = make_services(make_config(backends=[backend("a"), backend("b")],
                                         routing={"model_aliases": {"gpt-4": "m"}},
                                         routes=[route("failover", ["b"], json_body={"model": "gpt-4"})]), loop)
    for model, expected in [("gpt-4", "b"), ("m", "a"), ("gpt-4", "b")]:
        ctx = start(services, chat(model), loop)
        answer(loop, ctx)
        assert (ctx.backend, ctx.status) == (expected, 200)
    assert b'"model":"m"' in loop.upstreams[-1].received  # forwarded as the alias's target
