"""The proxy's own endpoints. Everything else is forwarded to a backend."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import orjson

from .errors import ProxyError
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

if TYPE_CHECKING:
    from .context import RequestContext
    from .server import ProxyServer

LocalHandler = Callable[["ProxyServer", "RequestContext"], None]


def health(server: ProxyServer, ctx: RequestContext) -> None:
    backends = server.backends
    body = {
        "status": "draining" if server.draining else "ok",
        "backends": len(backends),
        "inflight": server.inflight,
        "upstreams": [
            {"name": b.name, "url": b.config.url, "inflight": b.in_flight,
             "pool": {"checked_out": b.pool.checked_out, "idle": b.pool.idle_count}}
            for b in backends
        ],
    }
    ctx.send_response(503 if server.draining else 200, orjson.dumps(body))


def metrics(server: ProxyServer, ctx: RequestContext) -> None:
    if server.metrics is None:
        raise ProxyError("not_found", "metrics are disabled")
    ctx.send_response(200, server.metrics.render(), content_type=METRICS_CONTENT_TYPE)


LOCAL_ROUTES: dict[bytes, LocalHandler] = {
    b"/health": health,
    b"/metrics": metrics,
}


def match_local(ctx: RequestContext) -> LocalHandler | None:
    """Return the handler of a proxy-owned endpoint, or None if the request is to be forwarded.

    Raises ProxyError (405) for a proxy-owned path with a method other than GET or HEAD.
    """
    target = ctx.head.target
    path = target.split(b"?", 1)[0] if b"?" in target else target
    handler = LOCAL_ROUTES.get(path)
    if handler is not None and ctx.head.method not in (b"GET", b"HEAD"):
        raise ProxyError("method_not_allowed", f"{path.decode()} accepts GET and HEAD only")
    return handler
