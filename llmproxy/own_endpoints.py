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
    from llmproxy.services import Services

OwnHandler = Callable[["Services", "RequestContext"], None]


def health(services: Services, ctx: RequestContext) -> None:
    """The proxy's own state and each backend's. 200 while serving (even "degraded": no backend available,
    requests are still tried); 503 while draining, so a load balancer in front stops sending."""
    now = services.clock()
    backends = services.fleet.backends
    draining = services.traffic.draining
    available = sum(1 for b in backends if b.available(now))
    body = {
        "status": "draining" if draining else "ok" if available else "degraded",
        "backends": len(backends),
        "available": available,
        "inflight": services.traffic.inflight,
        "upstreams": [_backend_state(b, now) for b in backends],
    }
    limiter = services.limiter
    if limiter is not None:
        body["ratelimit"] = {"store": limiter.config.store, "admissions_held": limiter.held}
    ctx.send_response(503 if draining else 200, orjson.dumps(body))


def ready(services: Services, ctx: RequestContext) -> None:
    """Readiness, for load balancers and Kubernetes: 200 while at least one backend is available and the proxy
    is not stopping; else 503 with the reason. (/health is liveness: it stays 200 with every backend down.)"""
    traffic = services.traffic
    now = services.clock()
    available = sum(1 for b in services.fleet.backends if b.available(now))
    reason = "shutting down" if traffic.leaving or traffic.draining else None if available else "no backend available"
    if reason is None:
        ctx.send_response(200, orjson.dumps({"status": "ready", "available": available}))
    else:
        ctx.send_response(503, orjson.dumps({"status": "not_ready", "reason": reason, "available": available}))


def _backend_state(backend: Backend, now: float) -> dict:
    return {
        "name": backend.name, "url": backend.config.url, "type": backend.kind, "weight": backend.weight,
        "available": backend.available(now), "healthy": backend.healthy, "last_error": backend.last_error or None,
        "ejected_for_s": round(max(0.0, backend.ejected_until - now), 3), "consecutive_failures": backend.failures,
        "inflight": backend.in_flight,
        "models": None if backend.models is None else sorted(backend.models),
        "ttft_ewma_ms": round(backend.ttft_ewma * 1000.0, 3), "queue_depth": backend.queue_depth,
        "kv_cache_usage": backend.kv_cache_usage,
        "pool": {"checked_out": backend.pool.checked_out, "idle": backend.pool.idle_count},
    }


def models(services: Services, ctx: RequestContext) -> None:
    """GET /v1/models (or /models, asked by clients whose base URL lacks /v1): the union of the available
    backends' models, aliases included."""
    cards = services.fleet.router.model_cards(services.clock())
    tenant = ctx.tenant
    if tenant is not None and tenant.models is not None:
        cards = [card for card in cards if tenant.may_use(card["id"], card.get("root"))]  # what it may use
    ctx.send_response(200, orjson.dumps({"object": "list", "data": cards}))


def model(services: Services, ctx: RequestContext) -> None:
    """GET /v1/models/{id} or /models/{id} (the id may contain slashes: "Qwen/Qwen2.5-7B-Instruct")."""
    path = request_path(ctx)
    prefix = next(prefix for prefix in MODELS_PREFIXES if path.startswith(prefix))
    model_id = unquote(path[len(prefix):].decode("latin-1"))
    card = services.fleet.router.model_card(model_id, services.clock())
    if ctx.tenant is not None and not ctx.tenant.may_use(card["id"], card.get("root")):
        raise ProxyError("model_not_found", f"The model `{model_id}` does not exist.")
    ctx.send_response(200, orjson.dumps(card))


def metrics(services: Services, ctx: RequestContext) -> None:
    if services.metrics is None:
        raise ProxyError("not_found", "metrics are disabled")
    ctx.send_response(200, services.metrics.render(), content_type=METRICS_CONTENT_TYPE)


OWN_ENDPOINTS: dict[bytes, OwnHandler] = {
    b"/health": health,
    b"/ready": ready,
    b"/metrics": metrics,
    b"/v1/models": models,
    b"/models": models,
}
MODELS_PREFIXES = (b"/v1/models/", b"/models/")


def request_path(ctx: RequestContext) -> bytes:
    """The request target without its query, as received (not normalised: "//x" is not "/x")."""
    target = ctx.head.target
    return target.partition(b"?")[0]  # the same object when there is no query


def match_own(ctx: RequestContext) -> OwnHandler | None:
    """Return the handler of one of the proxy's own endpoints, or None if the request is to be forwarded.

    Raises ProxyError (405) for a proxy-owned path with a method other than GET or HEAD.
    """
    path = request_path(ctx)
    handler = OWN_ENDPOINTS.get(path)
    if handler is None and path.startswith(MODELS_PREFIXES) and path not in MODELS_PREFIXES:
        handler = model
    if handler is not None and ctx.head.method not in (b"GET", b"HEAD"):
        raise ProxyError("method_not_allowed", f"{path.decode()} accepts GET and HEAD only")
    return handler
