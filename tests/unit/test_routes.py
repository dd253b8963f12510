"""Route rules (llmproxy/fleet/routes.py) on Backend objects, without sockets: which route a request matches,
the candidates a route gives it, and how each strategy chooses among them.

Routes come through the real config parser, so a test's route reads as a `routes:` entry would. Where a
strategy draws at random, the module's `random` is a seeded `random.Random`.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from llmproxy.catalogue import lookup
from llmproxy.config import parse_config
from llmproxy.context import RequestIds
from llmproxy.errors import ProxyError
from llmproxy.fleet import routes as routes_module
from llmproxy.fleet.backend import Backend
from llmproxy.fleet.credentials import Credentials
from llmproxy.fleet.router import Router
from llmproxy.fleet.routes import Route, RouteTable, build_routes, json_equal, request_point

CHAT_PATH = "/v1/chat/completions"


def fleet(*names: str, **backend_options: dict[str, Any]) -> list[Backend]:
    """Backends of these names serving model "m" (and what backend_options[name]["models"] says)."""
    made = []
    for name in names:
        options = {"url": f"http://{name}:8000", "name": name, "type": "vllm", "models": ["m"],
                   **backend_options.get(name, {})}
        config = parse_config({"backends": [options]}).backends[0]
        backend = Backend(config=config, pool=None, name=name, host_header=b"", base_path=b"",
                          credentials=Credentials([], "bearer", lambda: 0.0), first_byte_timeout=1.0,
                          stream_idle_timeout=1.0, kind="vllm", weight=config.weight)
        backend.set_models([])
        made.append(backend)
    return made


def table(backends: list[Backend], *routes: dict[str, Any], pricing: dict | None = None) -> RouteTable:
    config = parse_config({"backends": [{"url": f"http://{b.name}:8000", "name": b.name} for b in backends],
                           "routes": list(routes), "pricing": pricing or {}})
    built = build_routes(config.routes, backends, Router(backends, {}), "when_needed", config.pricing)
    assert built is not None
    return built


def route(kind: str = "failover", upstreams: Any = ("a", "b"), id: str = "r", **match: Any) -> dict[str, Any]:
    return {"id": id, "match": match, "strategy": {"type": kind, "upstreams": list(upstreams)}}


def only(backends: list[Backend], *routes: dict[str, Any], **options: Any) -> Route:
    [made] = table(backends, *routes, **options).routes
    return made


def matched(routes: RouteTable, body: Any = None, path: str = CHAT_PATH, method: bytes = b"POST",
            headers: dict[str, str] | None = None) -> str | None:
    head = [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    found = routes.match(method, path, head, body)
    return None if found is None else found.id


def plan(made: Route, backends: list[Backend], model: str | None = "m", request_id: str = "req-1",
         now: float = 0.0) -> tuple[list[Backend], Any]:
    """The route's plan for a chat request, given the router's candidates over the whole fleet."""
    endpoint = lookup(CHAT_PATH)
    candidates = Router(backends, {}).candidates(endpoint, CHAT_PATH, model, now)
    return made.plan(candidates, endpoint, CHAT_PATH, model, now, request_id)


def names(backends: list[Backend]) -> list[str]:
    return [b.name for b in backends]


@pytest.fixture
def rng(monkeypatch) -> random.Random:
    seeded = random.Random(20240611)
    monkeypatch.setattr(routes_module, "random", seeded)
    return seeded


# --- matching -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("match", "request_", "matches"), [
    ({"path": CHAT_PATH}, {}, True),
    ({"path": CHAT_PATH}, {"path": "/v1/completions"}, False),
    ({"path": CHAT_PATH}, {"path": CHAT_PATH + "/"}, False),  # exact
    ({"path": "/v1/*"}, {}, True),
    ({"path": "/v1/*"}, {"path": "/v1/"}, True),
    ({"path": "/v1/*"}, {"path": "/v1"}, False),
    ({"path": "/v1/*"}, {"path": "/api/chat"}, False),
    ({"path": "/*"}, {"path": "/api/chat"}, True),
    ({"method": "post"}, {}, True),
    ({"method": "GET"}, {}, False),
    ({"headers": {"X-Tier": "gold"}}, {"headers": {"x-tier": "gold"}}, True),
    ({"headers": {"x-tier": "gold"}}, {"headers": {"X-TIER": "gold"}}, True),  # names in any case
    ({"headers": {"x-tier": "gold"}}, {"headers": {"x-tier": "Gold"}}, False),  # values exact
    ({"headers": {"x-tier": "gold"}}, {"headers": {"x-tier": "gold  "}}, True),  # trailing spaces are no part
    ({"headers": {"x-tier": "gold"}}, {"headers": {"x-other": "gold"}}, False),
    ({"headers": {"x-tier": "gold"}}, {}, False),
    ({"headers": {"x-tier": "gold", "x-team": "ml"}}, {"headers": {"x-tier": "gold"}}, False),  # every one
    ({"headers": {"x-priority": 2}}, {"headers": {"x-priority": "2"}}, True),
])
def test_path_method_and_header_conditions(match, request_, matches):
    made = table(fleet("a", "b"), route(**match))
    assert (matched(made, {"model": "m"}, **request_) == "r") is matches


@pytest.mark.parametrize(("json_body", "body", "matches"), [
    ({"model": "gpt-4"}, {"model": "gpt-4", "messages": []}, True),
    ({"model": "gpt-4"}, {"model": "gpt-4o"}, False),
    ({"model": "gpt-4"}, {}, False),
    ({"temperature": 0.0}, {"temperature": 0}, True),  # numbers by value
    ({"temperature": 0.0}, {"temperature": 0.0}, True),
    ({"temperature": 0.0}, {"temperature": False}, False),  # never a boolean as a number
    ({"temperature": 0.0}, {"temperature": "0"}, False),
    ({"temperature": 0.0}, {}, False),
    ({"stream": True}, {"stream": True}, True),
    ({"stream": True}, {"stream": 1}, False),
    ({"stream": False}, {"stream": 0}, False),
    ({"stream": False}, {}, False),  # absent is not false
    ({"max_tokens": 100}, {"max_tokens": 100.0}, True),
    ({"user": None}, {"user": None}, True),
    ({"user": None}, {}, False),  # null matches a null, not a missing key
    ({"stop": ["\n", "END"]}, {"stop": ["\n", "END"]}, True),
    ({"stop": ["\n", "END"]}, {"stop": ["END", "\n"]}, False),
    ({"stop": ["\n"]}, {"stop": "\n"}, False),
    ({"metadata": {"team": "ml"}}, {"metadata": {"team": "ml", "user": "u1"}}, True),  # nested: a subset
    ({"metadata": {"team": "ml"}}, {"metadata": {"team": "web"}}, False),
    ({"metadata": {"team": "ml"}}, {"metadata": "ml"}, False),
    ({"metadata": {"team": "ml"}}, {}, False),
    ({"a": {"b": {"c": 1}}}, {"a": {"b": {"c": 1, "d": 2}}}, True),
    ({"a": {"b": {"c": 1}}}, {"a": {"b": None}}, False),
    ({"tools": [{"type": "function"}]}, {"tools": [{"type": "function"}]}, True),  # in a list: whole objects
    ({"tools": [{"type": "function"}]}, {"tools": [{"type": "function", "name": "f"}]}, False),
])
def test_json_body_conditions_compare_as_json(json_body, body, matches):
    made = table(fleet("a", "b"), route(json_body=json_body))
    assert (matched(made, body) == "r") is matches


@pytest.mark.parametrize("body", [None, [], "text", 3])
def test_a_body_that_is_no_object_matches_no_json_body_condition(body):
    made = table(fleet("a", "b"), route(json_body={"model": "m"}), route(id="any"))
    assert matched(made, body) == "any"


def test_json_equal_is_strict_about_types_and_recursive():
    assert json_equal(1, 1.0) and json_equal([1, {"a": True}], [1.0, {"a": True}])
    assert not json_equal(True, 1) and not json_equal(1, True) and not json_equal(None, False)
    assert not json_equal({"a": 1, "b": 2}, {"a": 1}) and not json_equal("1", 1)


def test_the_guides_catch_all_listed_first_loses_to_the_more_specific_route():
    routes = table(fleet("openai-gpt4", "anthropic-claude"),
                   route("round_robin", ["openai-gpt4", "anthropic-claude"], "default_chat_route", path=CHAT_PATH),
                   route("weighted_random", [{"name": "openai-gpt4", "weight": 100}], "specific_gpt4_route",
                         path=CHAT_PATH, json_body={"model": "gpt-4"}))
    assert matched(routes, {"model": "gpt-4"}) == "specific_gpt4_route"
    assert matched(routes, {"model": "claude-sonnet"}) == "default_chat_route"
    assert matched(routes, {"model": "gpt-4"}, path="/v1/completions") is None  # no route: load_balance


def test_the_route_with_the_most_conditions_wins_and_the_earlier_on_a_tie():
    routes = table(fleet("a", "b"),
                   route(id="path", path=CHAT_PATH),
                   route(id="header", headers={"x-tier": "gold"}),  # as specific as "path": listed later
                   route(id="path+header", path=CHAT_PATH, headers={"x-tier": "gold"}),
                   route(id="nested", json_body={"metadata": {"team": "ml", "tier": "gold"}}),  # two leaves
                   route(id="everything"))
    assert [r.specificity for r in routes.routes] == [2, 2, 1, 1, 0]
    assert [r.id for r in routes.routes] == ["path+header", "nested", "path", "header", "everything"]
    assert matched(routes, {}) == "path"
    assert matched(routes, {}, headers={"x-tier": "gold"}) == "path+header"
    assert matched(routes, {"metadata": {"team": "ml", "tier": "gold"}}) == "nested"
    assert matched(routes, {"metadata": {"team": "ml", "tier": "gold"}}, path="/v1/completions") == "nested"
    assert matched(routes, {}, path="/v1/completions", headers={"x-tier": "gold"}) == "header"
    assert matched(routes, {}, path="/v1/completions") == "everything"


def test_without_routes_there_is_no_table():
    backends = fleet("a")
    assert build_routes([], backends, Router(backends, {}), "when_needed", {}) is None


# --- a route's candidates ------------------------------------------------------------------------------------


def test_a_routes_candidates_are_its_upstreams_the_router_lets_through_in_the_routes_order():
    backends = fleet("a", "b", "c", "d", c={"models": ["other"]})
    made = only(backends, route(upstreams=["d", "c", "b"]))
    assert names(plan(made, backends)[0]) == ["d", "b"]  # c does not serve "m"; a is not the route's
    backends[3].healthy = False
    assert names(plan(made, backends)[0]) == ["b"]


def test_a_route_none_of_whose_upstreams_serves_the_model_answers_the_routers_404():
    backends = fleet("a", "b", "c", c={"models": ["other"]})
    made = only(backends, route(upstreams=["c"], id="other-only"))
    with pytest.raises(ProxyError) as caught:
        plan(made, backends)
    assert (caught.value.kind, caught.value.spec.status) == ("model_not_found", 404)
    assert caught.value.message == "No upstream of route `other-only` serves the model `m`."


def test_a_route_whose_upstreams_are_all_down_tries_them_rather_than_another_backend():
    backends = fleet("a", "b", "c")
    backends[0].healthy = backends[1].healthy = False
    made = only(backends, route(upstreams=["b", "a"]))
    assert names(plan(made, backends)[0]) == ["b", "a"]  # as the router does when every backend is down


def test_a_route_may_name_a_backend_the_router_would_reach_only_by_translation():
    backends = fleet("native", "chat", chat={"apis": ["messages"]})  # "chat" serves Messages only
    made = only(backends, route(upstreams=["chat"]))
    assert names(plan(made, backends)[0]) == ["chat"]  # translated, since the route says so


# --- strategies ---------------------------------------------------------------------------------------------


def attempts(made: Route, candidates: list[Backend], key: Any, count: int) -> list[str]:
    """The backends of `count` attempts, each retry choosing among the untried ones as the pipeline does."""
    tried: list[Backend] = []
    for _ in range(count):
        untried = [b for b in candidates if b not in tried]
        tried.append(made.choose(untried or candidates, key))
    return names(tried)


def test_failover_takes_the_first_available_and_a_retry_moves_down_the_list():
    backends = fleet("primary", "fallback", "last-resort")
    made = only(backends, route("failover", ["primary", "fallback", "last-resort"]))
    candidates, key = plan(made, backends)
    assert [made.choose(candidates, key) for _ in range(3)] == [backends[0]] * 3  # no spreading
    assert attempts(made, candidates, key, 3) == ["primary", "fallback", "last-resort"]
    assert attempts(made, candidates, key, 4)[3] == "primary"  # more retries than upstreams: from the top
    backends[0].healthy = False  # the probes saw it die
    candidates, key = plan(made, backends)
    assert attempts(made, candidates, key, 2) == ["fallback", "last-resort"]


def test_round_robin_interleaves_by_the_routes_weights_else_the_backends():
    backends = fleet("a", "b", "c", c={"weight": 2})
    made = only(backends, route("round_robin", ["a", {"name": "b", "weight": 3}, "c"]))
    candidates, key = plan(made, backends)
    picks = "".join(made.choose(candidates, key).name for _ in range(12))
    assert Counter(picks) == {"a": 2, "b": 6, "c": 4}
    assert picks[:6] == "bcabcb"  # smooth: interleaved, not in bursts
    backends[1].healthy = False
    candidates, key = plan(made, backends)
    assert Counter(made.choose(candidates, key).name for _ in range(9)) == {"a": 3, "c": 6}


def test_round_robin_state_is_the_routes_own():
    backends = fleet("a", "b")
    routes = table(backends, route("round_robin", ["a", "b"], "one", path=CHAT_PATH),
                   route("round_robin", ["a", "b"], "two", path="/v1/completions"))
    one, two = routes.routes
    assert one.choose(backends, None).name == "a" and one.choose(backends, None).name == "b"
    assert two.choose(backends, None).name == "a"


def test_weighted_random_shares_follow_the_weights(rng):
    backends = fleet("fast", "backup")
    made = only(backends, route("weighted_random", [{"name": "fast", "weight": 70}, {"name": "backup", "weight": 30}]))
    candidates, key = plan(made, backends)
    picks = Counter(made.choose(candidates, key).name for _ in range(10_000))
    assert abs(picks["fast"] / 10_000 - 0.70) < 0.02
    assert attempts(made, candidates, key, 2) in (["fast", "backup"], ["backup", "fast"])  # a retry: the other


def test_canary_splits_request_ids_by_percentage_and_every_attempt_keeps_its_side():
    backends = fleet("stable", "experimental")
    made = only(backends, route("canary", [{"name": "stable", "percentage": 95},
                                           {"name": "experimental", "percentage": 5}]))
    ids = RequestIds()
    sides = Counter()
    for _ in range(10_000):
        request_id = ids.next()
        candidates, key = plan(made, backends, request_id=request_id)
        assert len(candidates) == 1  # its only candidate: a retry goes to it again
        assert attempts(made, candidates, key, 3) == [candidates[0].name] * 3
        assert plan(made, backends, request_id=request_id)[0] == candidates  # deterministic per request id
        sides[candidates[0].name] += 1
    assert abs(sides["experimental"] / 10_000 - 0.05) < 0.02
    assert abs(sides["stable"] / 10_000 - 0.95) < 0.02


def test_a_canary_side_that_cannot_take_a_request_hands_it_to_the_others_by_their_shares():
    backends = fleet("a", "b", "c")
    made = only(backends, route("canary", [{"name": "a", "percentage": 50}, {"name": "b", "percentage": 30},
                                           {"name": "c", "percentage": 20}]))
    ids = [f"req-{i}" for i in range(10_000)]
    before = {i: plan(made, backends, request_id=i)[0][0].name for i in ids}
    backends[1].healthy = False
    after = {i: plan(made, backends, request_id=i)[0][0].name for i in ids}
    assert all(after[i] == before[i] for i in ids if before[i] != "b")  # the others keep their side
    moved = Counter(after[i] for i in ids if before[i] == "b")
    assert set(moved) == {"a", "c"} and abs(moved["a"] / sum(moved.values()) - 50 / 70) < 0.05


def test_canary_with_a_zero_percent_side_sends_it_nothing():
    backends = fleet("a", "b")
    made = only(backends, route("canary", [{"name": "a", "percentage": 100}, {"name": "b", "percentage": 0}]))
    assert {plan(made, backends, request_id=f"r{i}")[0][0].name for i in range(1000)} == {"a"}
    backends[0].healthy = False
    assert plan(made, backends, request_id="r1")[0][0].name == "b"  # the only side left, 0 % or not


def test_request_points_are_uniform_over_sequential_ids():
    ids = RequestIds()
    points = [request_point(ids.next()) for _ in range(10_000)]
    assert all(0.0 <= p < 1.0 for p in points)
    deciles = Counter(int(p * 10) for p in points)
    assert all(abs(count - 1000) < 150 for count in deciles.values())


PRICED = {"cheap": {"cost_per_million_input_tokens": 0.1, "cost_per_million_output_tokens": 0.4},
          "mid": {"cost_per_million_input_tokens": 1, "cost_per_million_output_tokens": 1},
          "dear": {"cost_per_million_input_tokens": 3, "cost_per_million_output_tokens": 15}}


def test_lowest_cost_takes_the_cheapest_and_a_retry_the_next_cheapest():
    backends = fleet("dear", "mid", "cheap", **PRICED)
    made = only(backends, route("lowest_cost", ["dear", "mid", "cheap"]))
    candidates, key = plan(made, backends)
    assert attempts(made, candidates, key, 3) == ["cheap", "mid", "dear"]


def test_lowest_cost_falls_back_to_the_next_cheapest_when_the_cheapest_is_down():
    backends = fleet("dear", "mid", "cheap", **PRICED)
    made = only(backends, route("lowest_cost", ["dear", "mid", "cheap"]))
    backends[2].healthy = False
    candidates, key = plan(made, backends)
    assert made.choose(candidates, key).name == "mid"
    backends[1].ejected_until = 10.0
    candidates, key = plan(made, backends, now=5.0)
    assert made.choose(candidates, key).name == "dear"


def test_lowest_cost_blends_three_input_tokens_to_one_output():
    # in 1 + out 9 -> 3.0; in 3.5 + out 1 -> 2.875: the second is cheaper for prompt-heavy traffic
    backends = fleet("out-heavy", "in-heavy",
                     **{"out-heavy": {"cost_per_million_input_tokens": 1, "cost_per_million_output_tokens": 9},
                        "in-heavy": {"cost_per_million_input_tokens": 3.5, "cost_per_million_output_tokens": 1}})
    made = only(backends, route("lowest_cost", ["out-heavy", "in-heavy"]))
    assert made.choose(*plan(made, backends)).name == "in-heavy"


def test_lowest_cost_reads_the_pricing_table_for_backends_without_prices_and_puts_the_unpriced_last():
    backends = fleet("own", "table", "own-dear", own={"cost_per_million_input_tokens": 2,
                                                       "cost_per_million_output_tokens": 2},
                     **{"own-dear": {"cost_per_million_input_tokens": 50, "cost_per_million_output_tokens": 50}})
    made = only(backends, route("lowest_cost", ["own-dear", "own", "table"]),
                pricing={"m": {"input_per_million": 1, "output_per_million": 1}})
    candidates, key = plan(made, backends)
    assert attempts(made, candidates, key, 3) == ["table", "own", "own-dear"]
    no_price = only(backends, route("lowest_cost", ["own-dear", "table", "own"]))
    candidates, key = plan(no_price, backends)
    assert attempts(no_price, candidates, key, 3) == ["own", "own-dear", "table"]  # "m" has no price


def test_lowest_cost_ties_go_to_the_least_loaded_then_the_first_listed():
    equal = {"cost_per_million_input_tokens": 1, "cost_per_million_output_tokens": 1}
    backends = fleet("a", "b", a=equal, b=equal)
    made = only(backends, route("lowest_cost", ["a", "b"]))
    candidates, key = plan(made, backends)
    assert made.choose(candidates, key).name == "a"
    backends[0].in_flight = 2
    assert made.choose(candidates, key).name == "b"


def test_lowest_latency_takes_the_least_peak_ewma_cost(monkeypatch):
    backends = fleet("fast", "slow")
    made = only(backends, route("lowest_latency", ["slow", "fast"]))
    now = 100.0
    monkeypatch.setattr(routes_module, "perf_counter", lambda: now)
    backends[0].observe_ttft(0.050, now)
    backends[1].observe_ttft(0.400, now)
    candidates, key = plan(made, backends)
    assert made.choose(candidates, key).name == "fast"
    backends[0].in_flight = 9  # 0.051 x 10 > 0.401 x 1: with its load it is the slower answer now
    assert made.choose(candidates, key).name == "slow"
    assert attempts(made, candidates, key, 2) == ["slow", "fast"]


def test_lowest_latency_tries_a_backend_without_samples_and_ties_go_to_the_first_listed(monkeypatch):
    backends = fleet("measured", "fresh-1", "fresh-2")
    made = only(backends, route("lowest_latency", ["measured", "fresh-2", "fresh-1"]))
    monkeypatch.setattr(routes_module, "perf_counter", lambda: 100.0)
    backends[0].observe_ttft(0.010, 100.0)
    assert made.choose(*plan(made, backends)).name == "fresh-2"
