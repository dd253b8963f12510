"""The one error table, and the shapes local errors take: OpenAI's, or Anthropic's on its API's paths."""

from __future__ import annotations

import orjson
import pytest

from llmproxy.errors import ERRORS, ProxyError, error_body


@pytest.mark.parametrize(("kind", "anthropic_type"), [
    ("unauthorized", "authentication_error"),
    ("model_not_allowed", "permission_error"),
    ("model_not_found", "not_found_error"),
    ("rate_limited_requests", "rate_limit_error"),
    ("budget_exhausted", "rate_limit_error"),
    ("bad_request", "invalid_request_error"),
    ("invalid_path", "invalid_request_error"),
    ("body_too_large", "request_too_large"),
    ("path_not_served", "not_found_error"),
    ("pool_exhausted", "overloaded_error"),
    ("connect_failed", "api_error"),
    ("first_byte_timeout", "api_error"),
    ("internal_error", "api_error"),
])
def test_an_error_on_an_anthropic_path_is_in_anthropics_shape(kind: str, anthropic_type: str):
    body = orjson.loads(error_body(ERRORS[kind], "what went wrong", "anthropic"))
    assert body == {"type": "error", "error": {"type": anthropic_type, "message": "what went wrong"}}


@pytest.mark.parametrize("kind", sorted(ERRORS))
def test_every_error_has_an_openai_shape(kind: str):
    spec = ERRORS[kind]
    body = orjson.loads(error_body(spec, "m"))
    assert body == {"error": {"message": "m", "type": spec.type, "param": None, "code": spec.code}}
    assert 400 <= spec.status <= 599 and len(spec.termination) == 2


def test_an_upstream_status_counts_against_the_backend_only_when_it_is_a_5xx():
    assert ProxyError("upstream_status", "503", 503).backend_fault
    assert not ProxyError("upstream_status", "429", 429).backend_fault
    assert ProxyError("upstream_status", "503", 503).retry_condition == "503"
    assert ProxyError("connect_failed", "refused").retry_condition == "connect_error"
