"""One table of every error the proxy itself answers with.

Each kind maps to the HTTP status, the OpenAI-style error `type` and `code`, and the termination code
written to the access log. Phases raise `ProxyError(kind, message)`; one place (`pipeline.finish`)
turns it into a reply, so every locally generated error has the same shape:
``{"error": {"message": ..., "type": ..., "param": null, "code": ...}}``.

Termination codes follow HAProxy's two letters: who ended the request, then in which phase.
Who: ``C`` client, ``S`` server (backend), ``P`` proxy (a limit or internal error), ``L`` local reply
(the proxy answered by design, e.g. 404). Lower case ``c``/``s`` mean a timeout on that side.
Phase: ``R`` request (head/body), ``Q`` queued for a pooled connection, ``C`` connecting upstream,
``H`` waiting for the response head, ``D`` streaming data. ``--`` is a normal end.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable
from dataclasses import dataclass

import orjson

# A connect that fails with one of these hit the proxy's own limits (file descriptors, buffers), not the
# backend's: no other backend would do better, and no backend may be marked down for it.
LOCAL_EXHAUSTION_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    status: int
    type: str
    code: str
    termination: str
    close: bool = False  # the connection cannot be reused after this reply (framing unknown or unread)
    # Before any byte reached the client: the routing.retry_on condition that lets the pipeline try
    # another backend (None: never retried), and whether it counts against the backend's health.
    retry_on: str | None = None
    backend_fault: bool = False


ERRORS: dict[str, ErrorSpec] = {
    # Client side: malformed or over-limit requests. The connection is closed: its framing is suspect.
    "bad_request": ErrorSpec(400, "invalid_request_error", "bad_request", "CR", close=True),
    "header_too_large": ErrorSpec(431, "invalid_request_error", "request_header_too_large", "CR", close=True),
    "uri_too_long": ErrorSpec(414, "invalid_request_error", "uri_too_long", "CR", close=True),
    "body_too_large": ErrorSpec(413, "invalid_request_error", "request_too_large", "CR", close=True),
    "not_implemented": ErrorSpec(501, "invalid_request_error", "not_implemented", "CR", close=True),
    "version_not_supported": ErrorSpec(505, "invalid_request_error", "http_version_not_supported", "CR",
                                       close=True),
    "request_timeout": ErrorSpec(408, "invalid_request_error", "request_timeout", "cR", close=True),
    "invalid_json": ErrorSpec(400, "invalid_request_error", "invalid_json", "LR"),
    # A request in an API the chosen backend does not serve, holding something the translation cannot express
    # (translate/): refused before anything is sent upstream.
    "untranslatable": ErrorSpec(400, "invalid_request_error", "untranslatable", "LR"),
    # model: auto, and no routing.auto rule fits the request (the message says what each rule missed).
    "no_auto_rule": ErrorSpec(400, "invalid_request_error", "no_auto_rule", "LR"),
    "invalid_path": ErrorSpec(400, "invalid_request_error", "invalid_path", "CR", close=True),
    "upgrade_not_supported": ErrorSpec(501, "invalid_request_error", "upgrade_not_supported", "CR", close=True),
    # Who is calling, and how much (auth.py, ratelimit/). Refused before any backend is chosen.
    "unauthorized": ErrorSpec(401, "invalid_request_error", "invalid_api_key", "LR"),
    "ambiguous_credentials": ErrorSpec(400, "invalid_request_error", "ambiguous_api_key", "LR"),
    "model_not_allowed": ErrorSpec(403, "invalid_request_error", "model_not_allowed", "LR"),
    # security.ip_* (iprules.py): nothing of the request is read, so the connection closes. (A key's allowed_ips
    # refuse as "unauthorized": a 403 would tell that the key is valid.)
    "ip_forbidden": ErrorSpec(403, "permission_error", "ip_not_allowed", "LR", close=True),
    # A tenant with its own backend credentials (BYOK) has none for the chosen backend, and auth.byok_missing
    # says refuse: nothing is sent upstream.
    "byok_missing": ErrorSpec(403, "permission_error", "backend_credential_missing", "LR"),
    "rate_limited_requests": ErrorSpec(429, "requests", "rate_limit_exceeded", "PR"),
    "rate_limited_tokens": ErrorSpec(429, "tokens", "rate_limit_exceeded", "PR"),
    "rate_limited_concurrency": ErrorSpec(429, "requests", "rate_limit_exceeded", "PR"),
    "budget_exhausted": ErrorSpec(429, "insufficient_quota", "insufficient_quota", "PR"),
    "ratelimit_unavailable": ErrorSpec(503, "service_unavailable", "rate_limit_store_unavailable", "PR"),
    # Local replies by design.
    "not_found": ErrorSpec(404, "invalid_request_error", "not_found", "LR"),
    "model_not_found": ErrorSpec(404, "invalid_request_error", "model_not_found", "LR"),
    "method_not_allowed": ErrorSpec(405, "invalid_request_error", "method_not_allowed", "LR"),
    # Upstream side: nothing reached the client yet, so these are clean replies.
    # A connect failure means nothing was sent: retrying elsewhere is always safe.
    # No configured backend's type serves the path (Ollama's /api/* with only vLLM behind): it would be a 404
    # from any of them, and a 503 would have SDKs retry what can never succeed.
    "path_not_served": ErrorSpec(404, "invalid_request_error", "path_not_served", "LR"),
    # No backend at all: the discovery entries have found none yet (or none is left). A 503, for it may pass.
    "no_backends": ErrorSpec(503, "service_unavailable", "no_backend_available", "LR"),
    "pool_exhausted": ErrorSpec(503, "service_unavailable", "upstream_pool_exhausted", "PQ",
                                retry_on="connect_error"),
    "connect_failed": ErrorSpec(502, "api_error", "upstream_connect_failed", "SC",
                                retry_on="connect_error", backend_fault=True),
    "connect_timeout": ErrorSpec(504, "api_error", "upstream_connect_timeout", "sC",
                                 retry_on="connect_error", backend_fault=True),
    "upstream_failed": ErrorSpec(502, "api_error", "upstream_failed", "SH", retry_on="reset", backend_fault=True),
    "first_byte_timeout": ErrorSpec(504, "api_error", "upstream_first_byte_timeout", "sH",
                                    retry_on="timeout", backend_fault=True),
    # A response that is not one (malformed, or a head over server.max_header_size): the backend did get
    # the request, so it is not retried.
    "upstream_protocol_error": ErrorSpec(502, "api_error", "upstream_protocol_error", "SH", backend_fault=True),
    # A response the proxy could not translate into the client's API (too large, an event it cannot follow):
    # the backend may be fine, so it is not held against it, nor retried.
    "translation_failed": ErrorSpec(502, "api_error", "translation_failed", "PD"),
    # A backend status the relay held back to retry elsewhere (never answered as such: the last attempt
    # relays the backend's own response).
    "upstream_status": ErrorSpec(502, "api_error", "upstream_status", "SH"),
    "out_of_resources": ErrorSpec(503, "service_unavailable", "proxy_out_of_resources", "PC"),
    "shutting_down": ErrorSpec(503, "service_unavailable", "shutting_down", "PR", close=True),
    "internal_error": ErrorSpec(500, "api_error", "internal_error", "PR", close=True),
}


class ProxyError(Exception):
    """Raised by any phase to end a request with a local error reply (or an abort once bytes were sent)."""

    __slots__ = ("detail", "headers", "kind", "message", "spec", "status")

    def __init__(self, kind: str, message: str, status: int = 0, headers: bytes = b"", detail: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.spec = ERRORS[kind]
        self.status = status  # the backend's status, for "upstream_status"
        self.headers = headers  # header lines for the reply (retry-after, www-authenticate), each CRLF-ended
        # For the access log only, never the client: why a credential was refused (the client gets one
        # answer for every reason, so probing learns nothing).
        self.detail = detail

    @property
    def logged_message(self) -> str:
        """The message with its detail, as the access log says it."""
        return f"{self.message} ({self.detail})" if self.detail else self.message

    @property
    def retry_condition(self) -> str | None:
        """The routing.retry_on condition this failure falls under, or None if it is never retried."""
        return str(self.status) if self.kind == "upstream_status" else self.spec.retry_on

    @property
    def backend_fault(self) -> bool:
        """Whether this failure counts against the backend's passive health."""
        return self.status >= 500 if self.kind == "upstream_status" else self.spec.backend_fault


class Unauthorized(ProxyError):
    """401 for a credential that does not get in: the client gets one answer whatever the `reason` (a short
    code for the metrics: missing, unknown_key, expired...), which the access log shows with `detail`."""

    __slots__ = ("reason",)

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__("unauthorized", "Incorrect API key provided.", detail=f"{reason}: {detail}" if detail
                         else reason)
        self.reason = reason


class KeyRefresh(Exception):
    """A token names a signing key not fetched yet, and the key set is being fetched again: await
    `refresh` (it never raises), then authenticate once more."""

    def __init__(self, refresh: Awaitable[None]) -> None:
        super().__init__("signing keys refreshing")
        self.refresh = refresh


# Anthropic's error types by status, for errors answered on its API's paths (its SDK maps them to classes).
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error", 529: "overloaded_error"}


def error_body(spec: ErrorSpec, message: str, shape: str = "openai") -> bytes:
    """Return the JSON body of a local error in the shape of the client's API: OpenAI's (the default) or, with
    shape "anthropic", Anthropic's `{"type": "error", "error": {"type", "message"}}`."""
    return shaped_error(spec.status, message, shape, spec.type, spec.code)


def shaped_error(status: int, message: str, shape: str, openai_type: str | None = None,
                 code: str | None = None) -> bytes:
    """An error body in the client API's shape for `status`; the types are the API's own for that status
    unless given."""
    if shape == "anthropic":
        kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})
    if openai_type is None:
        openai_type = "invalid_request_error" if status < 500 else "api_error"
    return orjson.dumps({"error": {"message": message, "type": openai_type, "param": None, "code": code}})


def drop_traceback(error: BaseException) -> None:
    """Forget where `error` was raised and what it was raised during.

    A kept error (answered later, stored on a request) would otherwise hold its traceback's frames, and
    they the connection and request that hold the error: a reference cycle only a GC pass frees, with
    every buffer in it. The context matters too: the codec re-raises its error while handling httptools'
    wrapper of it, whose own traceback leads back to the codec.
    """
    error.__traceback__ = None
    error.__context__ = None
    error.__cause__ = None
