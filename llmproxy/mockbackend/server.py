"""The mock backend's server: routing, control endpoints (/_mock/*) and the embeddable handle."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from http import HTTPStatus
from types import ModuleType
from typing import Any
from urllib.parse import parse_qsl

import llmproxy.mockbackend.anthropic as anthropic
import llmproxy.mockbackend.llamacpp as llamacpp
import llmproxy.mockbackend.ollama as ollama
import llmproxy.mockbackend.sglang as sglang
import llmproxy.mockbackend.tgi as tgi
import llmproxy.mockbackend.vllm as vllm
from llmproxy.mockbackend.connection import MockConnection, ParsedRequest
from llmproxy.mockbackend.fixtures import FixtureStore
from llmproxy.mockbackend.options import BadRequest, Knobs, MockOptions, parse_knobs
from llmproxy.mockbackend.prefixcache import BLOCK_TOKENS, Lookup, PrefixCache
from llmproxy.mockbackend.reply import Call, Reply, json_reply
from llmproxy.mockbackend.responses import ResponseStore
from llmproxy.mockbackend.stats import Gate, MockStats
from llmproxy.mockbackend.writer import ResponseWriter

DIALECT_MODULES: dict[str, ModuleType] = {"vllm": vllm, "tgi": tgi, "ollama": ollama, "llamacpp": llamacpp,
                                          "sglang": sglang, "anthropic": anthropic}
CONTROL_PREFIX = "/_mock/"
GAUGE_NAMES = ("waiting", "running", "kv")
# Live KV-cache use when /_mock/gauges does not pin it: each running generation holds 1/16 of the cache.
KV_PER_RUNNING = 1 / 16
MAX_GAUGE = 1_000_000_000  # far above any real queue, and small enough to print exactly as a float
MAX_THROTTLE_SECONDS = 86_400


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"status {status}"


def _control_int(name: str, raw: str, low: int, high: int) -> int:
    """Parse a control value: plain ASCII digits only, so "+1", " 1" and "1e3" are refused, not guessed."""
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 10 and low <= int(raw) <= high):
        raise BadRequest(f"{name} must be an integer from {low} to {high}, got {raw!r}")
    return int(raw)


def _control_fraction(raw: str) -> float:
    """A KV-cache fraction: a plain decimal from 0 to 1 ("0.5", "1", ".25"); no signs, exponents or nan."""
    digits = raw.replace(".", "", 1)
    if not (raw and len(raw) <= 12 and raw.isascii() and digits.isdigit() and 0.0 <= float(raw) <= 1.0):
        raise BadRequest(f"kv must be a fraction from 0 to 1, got {raw!r}")
    return float(raw)


def _health_reply(dialect: ModuleType, status: int) -> Reply:
    reply: Reply = dialect.unhealthy(status)
    if status in (204, 304):  # statuses that never carry a body (RFC 9110 §15.3.5, §15.4.5)
        reply.body, reply.content_type = b"", None
    return reply


class MockState:
    """Everything shared by the connections of one mock backend."""

    def __init__(self, options: MockOptions, loop: asyncio.AbstractEventLoop) -> None:
        self.options = options
        self.loop = loop
        self.dialect = DIALECT_MODULES[options.dialect]
        self.stats = MockStats()
        self.gates: dict[str, Gate] = {}
        self.fixtures = FixtureStore(options.fixtures_dir)
        self.connections: set[MockConnection] = set()
        self.models = options.models  # computed once: it is read on every request
        # Set through /_mock/health and /_mock/gauges. They are configuration, not observations, so
        # reset-stats keeps them: tests reset the stats between phases of one scenario.
        self.health = 200
        self.loading = False  # /_mock/loading/1: every route but the model lists answers 503, as while loading
        self.gauge_overrides: dict[str, float] = {}
        self.responses = ResponseStore()  # the Responses API ids this process produced
        self.throttles: dict[str, float] = {}  # API key -> time.monotonic() its /_mock/throttle ends
        # The prefix-cache model (--prefix-cache-tokens): reset-stats keeps it, /_mock/flush-cache empties it
        self.prefix = PrefixCache(options.prefix_cache_tokens) if options.prefix_cache_tokens else None
        self.prefix_prompts: dict[str, Callable[[Call], list[str]]] = getattr(self.dialect, "PREFIX_PROMPTS", {})

    def connection_opened(self, conn: MockConnection) -> None:
        self.connections.add(conn)
        self.stats.connections_total += 1
        self.stats.open_connections += 1

    def connection_closed(self, conn: MockConnection) -> None:
        self.connections.discard(conn)
        self.stats.open_connections -= 1

    def gauges(self) -> tuple[int, int, int, int]:
        """The stats' live gauges, with the queue gauges pinned by /_mock/gauges swapped in."""
        running, waiting, prompt_total, generation_total = self.stats.gauges()
        pinned = self.gauge_overrides
        return (int(pinned.get("running", running)), int(pinned.get("waiting", waiting)), prompt_total,
                generation_total)

    def kv_usage(self) -> float:
        """KV-cache use, 0..1: pinned by /_mock/gauges?kv=F, else the blocks the prefix-cache model's requests in
        flight hold, else following the running generations."""
        if "kv" in self.gauge_overrides:
            return self.gauge_overrides["kv"]
        if self.prefix is not None:
            return self.prefix.usage()
        return min(1.0, self.stats.requests_running * KV_PER_RUNNING)

    def prefix_metrics(self) -> tuple[int, int, float] | None:
        """(queries, hits) in tokens and the last prompt's hit rate, while the prefix-cache model is on."""
        if self.prefix is None:
            return None
        return self.stats.prefix_cache_queries_total, self.stats.prefix_cache_hits_total, self.prefix.last_hit_rate

    def flush_cache(self) -> bool:
        """An engine's own flush (SGLang's /flush_cache): refused while generations run or wait, as SGLang does."""
        if self.stats.requests_running or self.stats.requests_waiting:
            return False
        if self.prefix is not None:
            self.prefix.flush()
        return True

    def throttled(self, key: str) -> float:
        """Seconds the API key `key` stays throttled by /_mock/throttle (0: not throttled)."""
        until = self.throttles.get(key)
        if until is None:
            return 0.0
        left = until - time.monotonic()
        if left <= 0:
            del self.throttles[key]
            return 0.0
        return left

    def default_knobs(self) -> Knobs:
        opts = self.options
        return Knobs(tokens=opts.tokens, delay=opts.delay_ms / 1000.0,
                     first_byte_delay=opts.first_byte_delay_ms / 1000.0)

    def respond(self, conn: MockConnection, request: ParsedRequest) -> ResponseWriter:
        """Build the response to `request` and the writer that will send it."""
        path, _, query = request.target.partition("?")
        headers = dict(request.headers)
        options = {"keep_alive": request.keep_alive, "http10": request.http10,
                   "request_id": headers.get("x-request-id"), "head_only": request.method == "HEAD"}
        if path.startswith(CONTROL_PREFIX):
            reply = self._control(request.method, path, query)
            return ResponseWriter(conn, reply, self.default_knobs(), None, gate=None, **options)
        record = self.stats.record_request(request.method, request.target, request.headers, request.body)
        knobs = self.default_knobs()
        try:
            knobs = parse_knobs(headers, self.options)
            reply = self._route(request, path, headers, knobs)
        except BadRequest as exc:
            reply = self.dialect.error(exc.status, exc.message, path)
        except Exception as exc:  # a request shape the handlers did not foresee must not kill the mock
            reply = self.dialect.error(500, f"mock backend failed: {exc!r}", path)
        if knobs.retry_after is not None:
            reply.headers.append((b"retry-after", knobs.retry_after.encode("latin-1", "replace")))
        record.status = reply.status
        self.stats.prompt_tokens_total += reply.prompt_tokens
        self.stats.generation_tokens_total += reply.completion_tokens
        gate = self._gate(knobs.gate) if knobs.gate else None
        return ResponseWriter(conn, reply, knobs, record, gate=gate, **options)

    def _route(self, request: ParsedRequest, path: str, headers: dict[str, str], knobs: Knobs) -> Reply:
        if self.loading and path not in getattr(self.dialect, "OPEN_WHILE_LOADING", ()):
            return _health_reply(self.dialect, 503)  # before routing: unknown paths too, as llama-server does
        if knobs.status is not None:
            return self.dialect.error(knobs.status, f"{_phrase(knobs.status)} (x-mock-status)", path)
        if knobs.fixture is not None:
            return self.fixtures.get(knobs.fixture).reply()
        if path in self.options.without_routes:
            raise BadRequest("Not Found", 404)
        if path == getattr(self.dialect, "OPENAPI_PATH", None):
            return self._openapi()
        route = self.dialect.ROUTES.get(path)
        if route is None and hasattr(self.dialect, "route_for"):
            route = self.dialect.route_for(path)  # paths with a parameter (anthropic's /v1/models/{id})
        if route is None:
            raise BadRequest("Not Found", 404)
        method, handler = route
        methods = method.split(",")  # "GET,POST": a route that takes both
        if request.method not in methods and not (request.method == "HEAD" and "GET" in methods):
            raise BadRequest("Method Not Allowed", 405)
        if self.health != 200 and path in self.dialect.HEALTH_PATHS:
            return _health_reply(self.dialect, self.health)
        call = Call(method=method, path=path, headers=headers, body=request.body, tokens=knobs.tokens,
                    model=self.models[0], models=self.models, gauges=self.gauges, error_after=knobs.error_after,
                    cache_read=knobs.cache_read, cache_write=knobs.cache_write, kv_usage=self.kv_usage,
                    responses=self.responses, metrics_enabled=self.options.metrics,
                    api_keys=self.options.api_keys, throttled=self.throttled,
                    prefix_metrics=self.prefix_metrics, flush_cache=self.flush_cache)
        refused = self._refuse_model(call)
        if refused is not None:
            return refused
        prefix = self.prefix
        render = self.prefix_prompts.get(path) if prefix is not None else None
        if prefix is None or render is None:
            return handler(call)
        lookup = prefix.lookup(render(call))
        call.prefix_hit = lookup.hit
        reply: Reply = handler(call)
        if reply.generation:  # not an error answer: the engine ran the prompt
            self._admit(prefix, lookup, reply, knobs)
        return reply

    def _admit(self, prefix: PrefixCache, lookup: Lookup, reply: Reply, knobs: Knobs) -> None:
        """Cache a generation's prompt, hold its blocks until its response ends, count the lookup, and delay its
        first byte by a base plus the prefill of the prompt tokens not found cached."""
        hold = prefix.admit(lookup, reply.completion_tokens)
        reply.on_done = lambda: prefix.release(hold)
        self.stats.prefix_cache_queries_total += lookup.prompt
        self.stats.prefix_cache_hits_total += lookup.hit
        opts = self.options
        prefill_ms = opts.prefill_us_per_token * (lookup.prompt - lookup.hit) / 1000
        knobs.first_byte_delay += (opts.base_ttft_ms + prefill_ms) / 1000
        reply.headers.append((b"x-mock-prefix-cache-hit-tokens", b"%d" % lookup.hit))

    def _openapi(self) -> Reply:
        """The engine's OpenAPI document (FastAPI's, TGI's): its routes, by which the proxy tells what a release
        serves."""
        routes = {path: {m.lower(): {} for m in method.split(",")} for path, (method, _) in self.dialect.ROUTES.items()
                  if path not in self.options.without_routes}
        return json_reply({"openapi": "3.1.0", "info": {"title": self.options.dialect, "version": "mock"},
                           "paths": routes})

    def _refuse_model(self, call: Call) -> Reply | None:
        """With --strict-models, the dialect's answer to a body naming an unserved model."""
        # only POST routes carry a body naming a model; a stray GET body must not turn into a 400
        if not self.options.strict_models or call.method != "POST":
            return None
        result: Reply | None = self.dialect.check_model(call)
        return result

    def _gate(self, token: str) -> Gate:
        gate = self.gates.get(token)
        if gate is None:
            gate = self.gates[token] = Gate()
        return gate

    def _control(self, method: str, path: str, query: str) -> Reply:
        try:
            reply = self._control_action(method, path[len(CONTROL_PREFIX):], query)
        except BadRequest as exc:
            return json_reply({"error": exc.message}, exc.status)
        if reply is None:
            return json_reply({"error": f"unknown control endpoint {method} {path}"}, 404)
        return reply

    def _control_action(self, method: str, action: str, query: str) -> Reply | None:
        if method in ("GET", "HEAD") and action == "stats":
            extra = {"prefix_cache": self.prefix.state()} if self.prefix is not None else {}
            return json_reply({**self.stats.as_dict(), **extra})
        if method != "POST":
            return None
        if action.startswith("release/") and len(action) > len("release/"):
            return self._release(action[len("release/"):])
        if action == "reset-stats":
            return self._reset_stats()
        if action.startswith("health/"):
            return self._set_health(action[len("health/"):])
        if action.startswith("loading/"):
            return self._set_loading(action[len("loading/"):])
        if action == "gauges":
            return self._set_gauges(query)
        if action == "throttle":
            return self._set_throttle(query)
        if action == "flush-cache":
            return self._flush_cache()
        return None

    def _flush_cache(self) -> Reply:
        """Empty the prefix cache, but for the blocks requests in flight hold (they stay cached)."""
        if self.prefix is None:
            return json_reply({"flushed_tokens": 0, "cached_tokens": 0})
        dropped = self.prefix.flush()
        return json_reply({"flushed_tokens": dropped * BLOCK_TOKENS, "cached_tokens": self.prefix.cached_tokens})

    def _release(self, token: str) -> Reply:
        gate = self._gate(token)
        wake = gate.release()
        if wake is not None:
            self.loop.call_soon(wake)
        return json_reply({"released": gate.released, "woke": wake is not None})

    def _reset_stats(self) -> Reply:
        self.stats.reset()
        # gates nobody waits on are forgotten too; a waiting stream keeps its gate
        self.gates = {token: gate for token, gate in self.gates.items() if gate.waiters}
        return json_reply({"reset": True})

    def _set_health(self, raw: str) -> Reply:
        self.health = _control_int("health status", raw, 200, 599)
        return json_reply({"health": self.health})

    def _set_loading(self, raw: str) -> Reply:
        self.loading = bool(_control_int("loading", raw, 0, 1))
        return json_reply({"loading": self.loading})

    def _set_throttle(self, query: str) -> Reply:
        """Make requests carrying x-api-key K answer 429 for S seconds (key=K&seconds=S; S=0 lifts it).

        Only the anthropic dialect reads it: a proxy rotating keys must see one key refused, others not.
        """
        args = dict(parse_qsl(query, keep_blank_values=True))
        key = args.get("key")
        if not key or set(args) != {"key", "seconds"}:
            raise BadRequest("expected key=K&seconds=S")
        seconds = _control_int("seconds", args["seconds"], 0, MAX_THROTTLE_SECONDS)
        if seconds:
            self.throttles[key] = time.monotonic() + seconds
        else:
            self.throttles.pop(key, None)
        return json_reply({"key": key, "seconds": seconds})

    def _set_gauges(self, query: str) -> Reply:
        """Pin the given load gauges; each call replaces the previous pins, so no query unpins them all.

        waiting and running are the queue gauges of every dialect (vLLM waiting/running, TGI queue/batch,
        llama.cpp deferred/processing, SGLang queue/running); kv is the KV-cache use, a fraction 0..1
        (vLLM kv_cache_usage_perc, SGLang token_usage).
        """
        pinned: dict[str, float] = {}
        for name, raw in parse_qsl(query, keep_blank_values=True):
            if name not in GAUGE_NAMES:
                raise BadRequest(f"unknown gauge {name!r}; expected waiting, running and/or kv")
            if name in pinned:
                raise BadRequest(f"{name} given twice")
            pinned[name] = _control_fraction(raw) if name == "kv" else _control_int(name, raw, 0, MAX_GAUGE)
        self.gauge_overrides = pinned
        return json_reply({name: pinned.get(name) for name in GAUGE_NAMES})


class MockBackend:
    """A running mock backend. Close it with `await backend.close()` or `async with`."""

    def __init__(self, server: asyncio.Server, state: MockState) -> None:
        self._server = server
        self._state = state
        sockname = server.sockets[0].getsockname()
        self.host: str = sockname[0]
        self.port: int = sockname[1]

    @property
    def stats(self) -> MockStats:
        return self._state.stats

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        """Stop listening and drop every connection, stalled streams included."""
        self._server.close()
        for conn in list(self._state.connections):
            conn.close_by_server()
        await self._server.wait_closed()

    async def __aenter__(self) -> MockBackend:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


async def start_mock_backend(options: MockOptions, host: str = "127.0.0.1", port: int = 0) -> MockBackend:
    """Start listening on host:port (0: any free port) in the running loop and return the handle."""
    loop = asyncio.get_running_loop()
    state = MockState(options, loop)
    factory: Callable[[], MockConnection] = lambda: MockConnection(state, loop)  # noqa: E731
    # a deep backlog: benchmarks open thousands of connections at once
    server = await loop.create_server(factory, host, port, backlog=4096)
    return MockBackend(server, state)
