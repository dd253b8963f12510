"""Route rules (`routes:`): the requests a route matches go to its own upstreams, chosen by its own strategy.

Matching. A route's conditions are the path (exact, as the proxy made it canonical, or a prefix with a trailing
`*`), the method, headers (exact values, names in any case) and fields of the JSON body, read from the body the
pipeline already parsed: a nested mapping reaches into a nested object, and values compare as JSON values (0
equals 0.0, true equals no number, a list the same items in the same order). Of the routes that match, the one
with the most conditions wins (the path, the method, each header, each body leaf: one each), the earlier on a
tie; the table is sorted so at load, and matching walks it to the first route that matches. A request no route
matches is balanced by routing.load_balance, as without routes.

Candidates. A route balances over its upstreams that are among the router's candidates for the request (the
model, the API, availability), in the route's order. When none of them is, its upstreams are judged alone by the
router's rules: none serves the model (or the path) -> the router's 404 (model_not_found, path_not_served); all
down -> they are tried all the same, as the router does when every backend is down. A request a route took
never goes to a backend the route does not name.

Strategies (an upstream's weight is the route's `weight` for it, else its backend's):
- failover: the first upstream in the listed order; a retry (routing.retry_on) goes to the next one;
- round_robin: smooth weighted round robin (balancer.smooth_weighted's algorithm, with the route's own state);
- weighted_random: at random, in proportion to the weights;
- canary: a hash of the proxy's request id picks the side, so every attempt of a request stays on it (the
  request's only candidate); a side that cannot take the request (down, or not serving its model) hands it to
  the other sides in proportion to their percentages;
- lowest_cost: the cheapest by blended price, (3 x input + output) / 4 per million tokens, from the backend's own
  cost_per_million_* or else the `pricing:` entry of the request's model (unpriced: last); ties to the least
  in-flight per unit of weight; a retry goes to the next cheapest;
- lowest_latency: the least peak-EWMA cost, (TTFT estimate + floor) x (in-flight + 1) / weight: latency_based's
  cost, over every upstream rather than two sampled.
"""

from __future__ import annotations

import math
import random
from hashlib import blake2b
from time import perf_counter
from typing import TYPE_CHECKING, Any

from llmproxy.errors import ProxyError
from llmproxy.fleet.balancer import TTFT_FLOOR

if TYPE_CHECKING:
    from llmproxy.catalogue import Endpoint
    from llmproxy.config.model import PriceConfig, RouteConfig, RouteMatchConfig, UpstreamConfig
    from llmproxy.fleet.backend import Backend
    from llmproxy.fleet.router import Router

Leaf = tuple[tuple[str, ...], Any]  # a json_body condition: the keys down to the value, and the value
INPUT_SHARE = 0.75  # a blended price counts three input tokens to one output token (prompts outweigh answers)
_MISSING = object()


def json_equal(actual: Any, expected: Any) -> bool:
    """`actual` (parsed from a body) equals `expected` (from the config) as JSON values: numbers by value but
    never a boolean as a number, lists item by item, objects key by key."""
    if expected is None or isinstance(expected, bool):
        return actual is expected
    if isinstance(expected, int | float):
        return isinstance(actual, int | float) and not isinstance(actual, bool) and actual == expected
    if isinstance(expected, list):
        return (isinstance(actual, list) and len(actual) == len(expected)
                and all(json_equal(a, e) for a, e in zip(actual, expected, strict=True)))
    if isinstance(expected, dict):
        return (isinstance(actual, dict) and actual.keys() == expected.keys()
                and all(json_equal(actual[key], value) for key, value in expected.items()))
    return isinstance(actual, str) and actual == expected


def leaves(mapping: dict[str, Any], keys: tuple[str, ...] = ()) -> list[Leaf]:
    """The conditions of a json_body mapping: one per value that is not itself a mapping."""
    found: list[Leaf] = []
    for key, value in mapping.items():
        if isinstance(value, dict):
            found += leaves(value, (*keys, key))
        else:
            found.append(((*keys, key), value))
    return found


def request_point(request_id: str) -> float:
    """Where a request id falls in [0, 1): a hash, uniform however alike the ids (ours end in a counter)."""
    return int.from_bytes(blake2b(request_id.encode(), digest_size=8).digest(), "big") / 2**64


def blended(input_per_million: float, output_per_million: float) -> float:
    return INPUT_SHARE * input_per_million + (1.0 - INPUT_SHARE) * output_per_million


class Conditions:
    """A `match:` mapping precomputed: what a request must have (a route's; a cache strategy's too)."""

    __slots__ = ("_body", "_headers", "_method", "_path", "_prefix", "specificity")

    def __init__(self, match: RouteMatchConfig) -> None:
        path = match.path
        self._prefix = path is not None and path.endswith("*")
        self._path = path[:-1] if path is not None and self._prefix else path
        self._method = match.method.encode() if match.method is not None else None
        self._headers = tuple((name.encode(), value.encode()) for name, value in match.headers.items())
        self._body = tuple(leaves(match.json_body))
        self.specificity = (path is not None) + (self._method is not None) + len(self._headers) + len(self._body)

    def matches(self, method: bytes, path: str, headers: list[tuple[bytes, bytes]], body: Any) -> bool:
        """The request has every condition (`headers`: lower-case names; `body`: the parsed JSON)."""
        if self._method is not None and method != self._method:
            return False
        expected = self._path
        if expected is not None and (not path.startswith(expected) if self._prefix else path != expected):
            return False
        for name, value in self._headers:  # the codec strips a value's leading spaces, not its trailing ones
            for have, given in headers:
                if have == name and given.rstrip(b" \t") == value:
                    break
            else:
                return False
        return not self._body or _body_matches(body, self._body)


class Route(Conditions):
    """One `routes[]` entry with its conditions precomputed and its upstreams resolved, for one fleet generation."""

    __slots__ = ("_router", "_translate", "choose", "id", "strategy", "upstreams")

    def __init__(self, config: RouteConfig, backends: dict[str, Backend], router: Router, translate: str,
                 prices: dict[str, PriceConfig]) -> None:
        super().__init__(config.match)
        self.id = config.id
        self.upstreams = [backends[upstream.name] for upstream in config.strategy.upstreams]
        self.strategy: RouteStrategy = STRATEGIES[config.strategy.type](config.strategy.upstreams, self.upstreams,
                                                                        prices)
        self.choose = self.strategy.choose  # the pipeline asks the route as it asks the balancer
        self._router = router
        self._translate = translate

    def plan(self, candidates: list[Backend], endpoint: Endpoint, path: str, model: str | None, now: float,
             request_id: str) -> tuple[list[Backend], Any]:
        """The request's candidates on this route and the key its strategy chooses with (see the module's
        docstring); raises ProxyError (404) when none of its upstreams serves the model or the path."""
        mine = [backend for backend in self.upstreams if backend in candidates]
        if not mine:
            mine = self._alone(endpoint, path, model, now)
        return self.strategy.plan(mine, request_id, model)

    def _alone(self, endpoint: Endpoint, path: str, model: str | None, now: float) -> list[Backend]:
        """The route's upstreams as the router judges them without the rest of the fleet, in the route's order."""
        try:
            able = self._router.candidates(endpoint, path, model, now, self._translate, among=self.upstreams)
        except ProxyError as error:
            what = f"the model `{model}`" if error.kind == "model_not_found" else path
            raise ProxyError(error.kind, f"No upstream of route `{self.id}` serves {what}.") from None
        return [backend for backend in self.upstreams if backend in able]


def _body_matches(body: Any, conditions: tuple[Leaf, ...]) -> bool:
    if not isinstance(body, dict):
        return False
    for keys, expected in conditions:
        node = body
        for key in keys:
            node = node.get(key, _MISSING) if isinstance(node, dict) else _MISSING
            if node is _MISSING:
                return False
        if not json_equal(node, expected):
            return False
    return True


class RouteTable:
    """The routes of one fleet generation, most specific first (in the config's order among equals)."""

    __slots__ = ("routes",)

    def __init__(self, routes: list[Route]) -> None:
        self.routes = tuple(sorted(routes, key=lambda route: -route.specificity))  # stable: ties keep their order

    def match(self, method: bytes, path: str, headers: list[tuple[bytes, bytes]], body: Any) -> Route | None:
        """The route that takes the request, or None (routing.load_balance then)."""
        for route in self.routes:
            if route.matches(method, path, headers, body):
                return route
        return None


def build_routes(configs: list[RouteConfig], backends: list[Backend], router: Router, translate: str,
                 prices: dict[str, PriceConfig]) -> RouteTable | None:
    """The table of `routes:` over this generation's backends; None when there are none (requests skip it)."""
    if not configs:
        return None
    by_name = {backend.name: backend for backend in backends}
    return RouteTable([Route(config, by_name, router, translate, prices) for config in configs])


# Strategies --------------------------------------------------------------------------------------------------


def _weights(upstreams: list[UpstreamConfig], backends: list[Backend]) -> dict[Backend, int]:
    return {backend: upstream.weight or backend.weight for upstream, backend in zip(upstreams, backends, strict=True)}


class RouteStrategy:
    """How a route chooses: `plan` once per request (its candidates and the key), `choose` once per attempt."""

    __slots__ = ()

    def __init__(self, upstreams: list[UpstreamConfig], backends: list[Backend], prices: dict) -> None:
        pass

    def plan(self, candidates: list[Backend], request_id: str, model: str | None) -> tuple[list[Backend], Any]:
        return candidates, None

    def choose(self, candidates: list[Backend], key: Any = None) -> Backend:
        """One of `candidates` (never empty)."""
        raise NotImplementedError


class Failover(RouteStrategy):
    """The first candidate: they are in the route's order, and a retry's candidates are the untried ones."""

    __slots__ = ()

    def choose(self, candidates: list[Backend], key: Any = None) -> Backend:
        return candidates[0]


class RoundRobin(RouteStrategy):
    """Smooth weighted round robin over the candidates, with the route's weights and its own running state."""

    __slots__ = ("_current", "_weights")

    def __init__(self, upstreams: list[UpstreamConfig], backends: list[Backend], prices: dict) -> None:
        self._weights = _weights(upstreams, backends)
        self._current = dict.fromkeys(backends, 0)

    def choose(self, candidates: list[Backend], key: Any = None) -> Backend:
        if len(candidates) == 1:
            return candidates[0]
        weights, current = self._weights, self._current
        total = 0
        best = candidates[0]
        for backend in candidates:
            current[backend] += weights[backend]
            total += weights[backend]
            if current[backend] > current[best]:
                best = backend
        current[best] -= total
        return best


class WeightedRandom(RouteStrategy):
    __slots__ = ("_weights",)

    def __init__(self, upstreams: list[UpstreamConfig], backends: list[Backend], prices: dict) -> None:
        self._weights = _weights(upstreams, backends)

    def choose(self, candidates: list[Backend], key: Any = None) -> Backend:
        if len(candidates) == 1:
            return candidates[0]
        weights = self._weights
        return random.choices(candidates, [weights[backend] for backend in candidates])[0]


class Canary(Failover):
    """Each request's side by a hash of its request id: its only candidate, so its retries stay there."""

    __slots__ = ("_sides",)

    def __init__(self, upstreams: list[UpstreamConfig], backends: list[Backend], prices: dict) -> None:
        sides = []
        start = 0.0
        for upstream, backend in zip(upstreams, backends, strict=True):
            end = start + (upstream.percentage or 0.0)
            sides.append((backend, start, end))  # the side's share of [0, 100)
            start = end
        self._sides = tuple(sides)

    def plan(self, candidates: list[Backend], request_id: str, model: str | None) -> tuple[list[Backend], Any]:
        return [self.side(request_point(request_id) * 100.0, candidates)], None

    def side(self, point: float, candidates: list[Backend]) -> Backend:
        """The upstream whose share holds `point` (in [0, 100)) if it is a candidate; else another candidate, in
        proportion to the percentages, by where `point` fell in the share it left."""
        sides = self._sides
        fraction = point / 100.0  # past the last share (percentages summing to 100 give or take a rounding)
        for backend, start, end in sides:
            if start <= point < end:
                if backend in candidates:
                    return backend
                fraction = (point - start) / (end - start)
                break
        others = [(backend, end - start) for backend, start, end in sides if end > start and backend in candidates]
        if not others:
            return candidates[0]  # the sides left have 0 %: the first of them rather than none
        rest = fraction * sum(share for _, share in others)
        for backend, share in others:
            if rest < share:
                return backend
            rest -= share
        return others[-1][0]


class LowestCost(RouteStrategy):
    """The cheapest candidate by blended price (the key: the pricing table's for the request's model)."""

    __slots__ = ("_own", "_prices")

    def __init__(self, upstreams: list[UpstreamConfig], backends: list[Backend], prices: dict) -> None:
        self._own = {backend: blended(backend.config.cost_per_million_input_tokens,
                                      backend.config.cost_per_million_output_tokens)
                     for backend in backends if backend.config.cost_per_million_input_tokens is not None
                     and backend.config.cost_per_million_output_tokens is not None}
        self._prices = {model: blended(price.input_per_million, price.output_per_million)
                        for model, price in prices.items()}

    def plan(self, candidates: list[Backend], request_id: str, model: str | None) -> tuple[list[Backend], Any]:
        return candidates, self._prices.get(model) if model is not None else None

    def choose(self, candidates: list[Backend], key: Any = None) -> Backend:
        own = self._own
        best = candidates[0]
        best_rank: tuple[float, float] | None = None
        for backend in candidates:
            cost = own.get(backend, key)
            rank = (math.inf if cost is None else cost, backend.in_flight / backend.weight)
            if best_rank is None or rank < best_rank:
                best, best_rank = backend, rank
        return best


class LowestLatency(RouteStrategy):
    __slots__ = ()

    def choose(self, candidates: list[Backend], key: Any = None) -> Backend:
        if len(candidates) == 1:
            return candidates[0]
        now = perf_counter()
        return min(candidates, key=lambda b: (b.ttft_estimate(now) + TTFT_FLOOR) * (b.in_flight + 1) / b.weight)


# routes[].strategy.type -> its strategy (config.model.ROUTE_STRATEGIES names the same ones)
STRATEGIES: dict[str, type[RouteStrategy]] = {
    "failover": Failover,
    "weighted_random": WeightedRandom,
    "round_robin": RoundRobin,
    "canary": Canary,
    "lowest_cost": LowestCost,
    "lowest_latency": LowestLatency,
}
