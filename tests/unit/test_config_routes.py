"""The `routes:` section and the backends' prices (llmproxy/config/routes.py): what loads, and what is refused
with a message naming the route and key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from llmproxy.config import ConfigError, dump_config, parse_config
from llmproxy.config.model import RouteConfig, RouteMatchConfig, RouteStrategyConfig, UpstreamConfig

BACKENDS = [{"url": "http://a:1", "name": "a"}, {"url": "http://b:1", "name": "b"}]

# The example of OpenClaw's guide, as written there (issue 16), over backends of the names it uses.
GUIDE = """
backends:
  - url: "http://gpt4:8000"
    name: "openai-gpt4"
  - url: "http://claude:8000"
    name: "anthropic-claude"
routes:
  - id: default_chat_route
    match:
      path: "/v1/chat/completions"
    strategy:
      type: round_robin
      upstreams: ["openai-gpt4", "anthropic-claude"]
  - id: specific_gpt4_route
    match:
      path: "/v1/chat/completions"
      json_body:
        model: "gpt-4"          # only requests whose body says model "gpt-4"
    strategy:
      type: weighted_random
      upstreams:
        - name: "openai-gpt4"
          weight: 100
"""


def route(match: Any = None, kind: str = "failover", upstreams: Any = ("a",), **extra: Any) -> dict[str, Any]:
    return {"id": extra.pop("id", "r"), "match": {} if match is None else match,
            "strategy": {"type": kind, "upstreams": upstreams if upstreams is None else list(upstreams)}, **extra}


def config_with(*routes: dict[str, Any], backends: list[dict] = BACKENDS) -> Any:
    return parse_config({"backends": backends, "routes": list(routes)})


def test_the_guides_example_loads_as_written():
    config = parse_config(yaml.safe_load(GUIDE))
    assert config.routes == [
        RouteConfig("default_chat_route", RouteMatchConfig(path="/v1/chat/completions"),
                    RouteStrategyConfig("round_robin", [UpstreamConfig("openai-gpt4"),
                                                        UpstreamConfig("anthropic-claude")])),
        RouteConfig("specific_gpt4_route", RouteMatchConfig(path="/v1/chat/completions",
                                                            json_body={"model": "gpt-4"}),
                    RouteStrategyConfig("weighted_random", [UpstreamConfig("openai-gpt4", weight=100)])),
    ]


def test_every_match_condition_and_share_is_read():
    config = config_with(
        route({"path": "/v1/*", "method": "post", "headers": {"X-Tier": "gold", "x-priority": 2},
               "json_body": {"temperature": 0.0, "stream": True, "metadata": {"team": "ml"}, "stop": ["\n"]}},
              "canary", [{"name": "a", "percentage": 95}, {"name": "b", "percentage": 5}]),
        route(None, "round_robin", ["a", {"name": "b", "weight": 3}], id="r2"),
        route(None, "lowest_cost", ["a", "b"], id="r3"),
    )
    first, second, third = config.routes
    assert first.match == RouteMatchConfig(path="/v1/*", method="POST",
                                           headers={"x-tier": "gold", "x-priority": "2"},
                                           json_body={"temperature": 0.0, "stream": True,
                                                      "metadata": {"team": "ml"}, "stop": ["\n"]})
    assert first.strategy.upstreams == [UpstreamConfig("a", percentage=95.0), UpstreamConfig("b", percentage=5.0)]
    assert second.strategy.upstreams == [UpstreamConfig("a"), UpstreamConfig("b", weight=3)]
    assert third.match == RouteMatchConfig()  # {}: every request


def test_backend_prices_load_in_pairs():
    [a] = parse_config({"backends": [{"url": "http://a:1", "cost_per_million_input_tokens": 3,
                                      "cost_per_million_output_tokens": 15.5}]}).backends
    assert (a.cost_per_million_input_tokens, a.cost_per_million_output_tokens) == (3.0, 15.5)


@pytest.mark.parametrize(("routes", "message"), [
    ([route(upstreams=["x"])], 'routes[0].strategy.upstreams[0]: no backend named "x"'),
    ([route(), route(upstreams=["a", "x"], id="r2")], 'routes[1].strategy.upstreams[1]: no backend named "x"'),
    ([route(upstreams=["alpha"])], 'routes[0].strategy.upstreams[0]: no backend named "alpha"'),
    ([route(), route()], 'routes[1].id: duplicate route id "r" (already used by routes[0])'),
    ([route(kind="fastest")], "routes[0].strategy.type: must be one of failover, weighted_random, round_robin, "
                              'canary, lowest_cost, lowest_latency, got "fastest"'),
    ([route(kind="canary", upstreams=[{"name": "a", "percentage": 90}, {"name": "b", "percentage": 5}])],
     "routes[0].strategy.upstreams: canary percentages must sum to 100, got 95"),
    ([route(kind="canary", upstreams=["a"])],
     "routes[0].strategy.upstreams[0]: a canary upstream needs its percentage: {name, percentage}"),
    ([route(kind="canary", upstreams=[{"name": "a", "percentage": 101}])],
     "routes[0].strategy.upstreams[0].percentage: must be a percentage between 0 and 100, got 101"),
    ([route(kind="weighted_random", upstreams=[{"name": "a", "weight": 0}])],
     "routes[0].strategy.upstreams[0].weight: must be a positive integer, got 0"),
    ([route(kind="weighted_random", upstreams=[{"name": "a", "weight": 0.5}])],
     "routes[0].strategy.upstreams[0].weight: must be a positive integer, got 0.5"),
    ([route(kind="failover", upstreams=[{"name": "a", "weight": 2}])],
     "routes[0].strategy.upstreams[0].weight: has no meaning for type failover: weights are for weighted_random "
     "and round_robin"),
    ([route(kind="round_robin", upstreams=[{"name": "a", "percentage": 100}])],
     "routes[0].strategy.upstreams[0].percentage: is for type canary, not round_robin"),
    ([route(upstreams=["a", "a"])], 'routes[0].strategy.upstreams[1]: backend "a" is listed twice '
                                    "(already routes[0].strategy.upstreams[0])"),
    ([route(upstreams=[])], "routes[0].strategy.upstreams: must be a non-empty list of backend names or "
                            "{name, weight | percentage}, got a list"),
    ([route(upstreams=[{"weight": 2}], kind="round_robin")], "routes[0].strategy.upstreams[0].name: is required"),
    ([route({"json_body": ["model"]})], "routes[0].match.json_body: must be a mapping of body keys to values, "
                                        "got a list"),
    ([route({"json_body": "gpt-4"})], "routes[0].match.json_body: must be a mapping of body keys to values, "
                                      'got "gpt-4"'),
    ([route({"json_body": {"metadata": {}}})], "routes[0].match.json_body.metadata: an empty mapping matches no "
                                               "field: name one, or drop the key"),
    ([route({"json_body": {1: "x"}})], "routes[0].match.json_body.1: a JSON key is a string, got 1 (quote it)"),
    ([route({"json_body": {"t": float("nan")}})], "routes[0].match.json_body.t: must be a finite number, got nan"),
    ([{"id": "r", "strategy": {"type": "failover", "upstreams": ["a"]}}], "routes[0].match: is required"),
    ([{"id": "r", "match": {}}], "routes[0].strategy: is required"),
    ([{"match": {}, "strategy": {"type": "failover", "upstreams": ["a"]}}], "routes[0].id: is required"),
    ([route(None, upstreams=None)], "routes[0].strategy.upstreams: must be a non-empty list of backend names or "
                                    "{name, weight | percentage}, got null"),
    ([{"id": "r", "match": None, "strategy": {"type": "failover", "upstreams": ["a"]}}],
     "routes[0].match: must be a mapping of conditions (path, method, headers, json_body); {} matches every request"),
    ([route({"jsonbody": {"model": "m"}})], 'routes[0].match.jsonbody: unknown key (did you mean "json_body"?)'),
    ([route({"path": "v1/chat/completions"})], 'routes[0].match.path: must be a path starting with "/" (a trailing '
                                               '"*" matches a prefix), got "v1/chat/completions"'),
    ([route({"path": "/v1/*/completions"})], 'routes[0].match.path: must be a path without a query, spaces or a '
                                             '"*" other than a last one, got "/v1/*/completions"'),
    ([route({"path": "/v1//chat/completions"})], "routes[0].match.path: requests arrive with their path made "
                                                 'canonical: write "/v1/chat/completions"'),
    ([route({"method": "PO ST"})], 'routes[0].match.method: must be an HTTP method like POST, got "PO ST"'),
    ([route({"headers": {"x-tier": True}})], "routes[0].match.headers.x-tier: must be the header's exact value: "
                                             "printable ASCII text, without leading or trailing spaces, got true"),
    ([route({"headers": {"X-Tier": "a", "x-tier": "b"}})],
     "routes[0].match.headers.x-tier: is given twice (header names are not case-sensitive)"),
    ([route({"headers": {"x tier": "a"}})],
     "routes[0].match.headers.x tier: must be a header name (letters, digits, - and the like)"),
    ({"id": "r"}, 'routes: must be a list of routes, got a mapping'),
])
def test_a_bad_route_is_refused_naming_the_route_and_key(routes, message):
    with pytest.raises(ConfigError) as caught:
        parse_config({"backends": BACKENDS, "routes": routes})
    assert str(caught.value) == message


def test_an_unknown_upstream_name_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r'no backend named "openai-gpt" \(did you mean "openai-gpt4"\?\)'):
        config_with(route(upstreams=["openai-gpt"]), backends=[{"url": "http://a:1", "name": "openai-gpt4"}])


def test_routes_may_come_before_the_backends_they_name():
    config = parse_config({"routes": [route(upstreams=["b"])], "backends": BACKENDS})
    assert config.routes[0].strategy.upstreams == [UpstreamConfig("b")]


@pytest.mark.parametrize(("backend", "message"), [
    ({"cost_per_million_input_tokens": 3},
     "backends[0].cost_per_million_output_tokens: is required with cost_per_million_input_tokens (give both prices)"),
    ({"cost_per_million_output_tokens": 3},
     "backends[0].cost_per_million_input_tokens: is required with cost_per_million_output_tokens (give both prices)"),
    ({"cost_per_million_input_tokens": -1, "cost_per_million_output_tokens": 3},
     "backends[0].cost_per_million_input_tokens: must be a number >= 0, got -1"),
])
def test_backend_prices_are_checked(backend, message):
    with pytest.raises(ConfigError) as caught:
        parse_config({"backends": [{"url": "http://a:1", **backend}]})
    assert str(caught.value) == message


def test_routes_and_prices_dump_in_the_files_shape_and_load_back():
    config = parse_config({
        "backends": [{**BACKENDS[0], "cost_per_million_input_tokens": 1, "cost_per_million_output_tokens": 2},
                     BACKENDS[1]],
        "routes": [route({"path": "/v1/*", "headers": {"X-Tier": "gold"},
                          "json_body": {"temperature": 0.0, "metadata": {"timeout": 3}}},
                         "canary", [{"name": "a", "percentage": 99.5}, {"name": "b", "percentage": 0.5}]),
                   route(None, "round_robin", ["a", {"name": "b", "weight": 2}], id="r2")],
    })
    dumped = yaml.safe_load(dump_config(config))
    assert dumped["routes"] == [
        {"id": "r", "match": {"path": "/v1/*", "headers": {"x-tier": "gold"},
                              "json_body": {"temperature": 0.0, "metadata": {"timeout": 3}}},  # not a duration
         "strategy": {"type": "canary", "upstreams": [{"name": "a", "percentage": 99.5},
                                                      {"name": "b", "percentage": 0.5}]}},
        {"id": "r2", "match": {}, "strategy": {"type": "round_robin", "upstreams": ["a", {"name": "b", "weight": 2}]}},
    ]
    assert dumped["backends"][1]["cost_per_million_input_tokens"] is None
    assert parse_config(dumped) == config


def test_the_readmes_route_example_is_the_guides_and_loads():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("### Route rules"):]
    block = section[section.index("```yaml\n") + 8:section.index("```\n", section.index("```yaml\n") + 8)]
    config = parse_config(yaml.safe_load(block))
    assert config.routes == parse_config(yaml.safe_load(GUIDE)).routes
