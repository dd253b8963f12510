"""The proxy's own endpoints. Everything else is forwarded to a backend.

`/v1/models` is answered here rather than forwarded: IDE assistants call it first, and only the proxy
knows the union of what its backends serve (and the aliases it adds).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import unquote

import orjson

from llmproxy.errors import ProxyError
from llmproxy.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

if TYPE_CHECKING:
    from llmproxy.context import RequestContext
    from llmproxy.fleet.backend import Backend
    from llmproxy.server import ProxyServer

LocalHandler = Callable[["ProxyServer", "RequestContext"], None]


def health(server: ProxyServer, ctx: RequestContext) -> None:
    """The proxy's own state and each backend's. 200 while serving (even "degraded": no backend available,
    requests are still tried); 503 while draining, so a load balancer in front stops sending."""
    now = server.loop.time()
    backends = server.backends
    available = sum(1 for b in backends if b.available(now))
    body = {
        "status": "draining" if server.draining else "ok" if available else "degraded",
        "backends": len(backends),
        "available": available,
        "inflight": server.inflight,
        "upstreams": [_backend_state(b, now) for b in backends],
    }
    if server.limiter is not None:
        body["ratelimit"] = {"store": server.limiter.config.store, "admissions_held": server.limiter.held}
    ctx.send_response(503 if server.draining else 200, orjson.dumps(body))


def _backend_state(backend: Backend, now: float) -> dict:
    return {
        "name": backend.name, "url": backend.config.url, "type": backend.kind, "weight": backend.weight,
        "available": backend.available(now), "healthy": backend.healthy, "last_error": backend.last_error or None,
        "ejected_for_s": round(max(0.0, backend.ejected_until - now), 3), "consecutive_failures": backend.failures,
        "inflight": backend.in_flight,
        "models": None if backend.models is None else sorted(backend.models),
        "ttft_ewma_ms": round(backend.ttft_ewma * 1000.0, 3), "queue_depth": backend.queue_depth,
        "pool": {"checked_out": backend.pool.checked_out, "idle": backend.pool.idle_count},
    }


def models(server: ProxyServer, ctx: RequestContext) -> None:
    """GET /v1/models: the union of the available backends' models, aliases included."""
    cards = server.fleet.router.model_cards(server.loop.time())
    key = ctx.api_key
    if key is not None and key.models is not None:
        cards = [card for card in cards if key.may_use(card["id"], card.get("root"))]  # what this key may use
    ctx.send_response(200, orjson.dumps({"object": "list", "data": cards}))


def model(server: ProxyServer, ctx: RequestContext) -> None:
    """GET /v1/models/{id} (the id may contain slashes: "Qwen/Qwen2.5-7B-Instruct")."""
    path = request_path(ctx)
    model_id = unquote(path[len(MODELS_PREFIX):].decode("latin-1"))
    card = server.fleet.router.model_card(model_id, server.loop.time())
    if ctx.api_key is not None and not ctx.api_key.may_use(card["id"], card.get("root")):
        raise ProxyError("model_not_found", f"The model `{model_id}` does not exist.")
    ctx.send_response(200, orjson.dumps(card))


def metrics(server: ProxyServer, ctx: RequestContext) -> None:
    if server.metrics is None:
        raise ProxyError("not_found", "metrics are disabled")
    ctx.send_response(200, server.metrics.render(), content_type=METRICS_CONTENT_TYPE)


LOCAL_ROUTES: dict[bytes, LocalHandler] = {
    b"/health": health,
    b"/metrics": metrics,
    b"/v1/models": models,
}
MODELS_PREFIX = b"/v1/models/"


def request_path(ctx: RequestContext) -> bytes:
    """The request target without its query, as received (not normalised: "//x" is not "/x")."""
    target = ctx.head.target
    return target.split(b"?", 1)[0] if b"?" in target else target


def match_local(ctx: RequestContext) -> LocalHandler | None:
    """Return the handler of a proxy-owned endpoint, or None if the request is to be forwarded.

    Raises ProxyError (405) for a proxy-owned path with a method other than GET or HEAD.
    """
    path = request_path(ctx)
    handler = LOCAL_ROUTES.get(path)
    if handler is None and path.startswith(MODELS_PREFIX) and len(path) > len(MODELS_PREFIX):
        handler = model
    if handler is not None and ctx.head.method not in (b"GET", b"HEAD"):
        raise ProxyError("method_not_allowed", f"{path.decode()} accepts GET and HEAD only")
    return handler
