"""tracing.py and spans.py: sampling, the traceparent sent upstream, the GenAI names a request's span gets, and
that the proxy never imports opentelemetry with tracing off."""

from __future__ import annotations

import subprocess
import sys
from time import perf_counter, time_ns
from types import SimpleNamespace

import pytest

from llmproxy.catalogue import lookup
from llmproxy.config.model import TracingConfig
from llmproxy.spans import error_type, operation_name, provider
from llmproxy.tracing import NOT_TRACED, Tracing, unix_ns
from tests.support import REPO, free_port

TRACE, SPAN = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"


@pytest.fixture
def make_tracing():
    made: list[Tracing] = []

    def make(ratio: float) -> Tracing:
        tracing = Tracing(TracingConfig(enabled=True, endpoint=f"http://127.0.0.1:{free_port()}/v1/traces",
                                        sample_ratio=ratio, export_timeout=0.5))
        made.append(tracing)
        return tracing
    yield make
    for tracing in made:
        tracing.shutdown()  # no span was ended: nothing to export


def test_the_proxy_never_imports_opentelemetry_with_tracing_off():
    script = ("import sys, llmproxy.cli, llmproxy.server, llmproxy.workers, llmproxy.pipeline, llmproxy.spans\n"
              "from llmproxy.config import parse_config\n"
              "parse_config({'backends': [{'url': 'http://a:1'}], 'tracing': {'enabled': False}})\n"
              "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_ratio_zero_makes_no_span_for_a_trace_of_its_own_and_follows_the_clients_decision(make_tracing):
    tracing = make_tracing(0.0)
    span = tracing.start("chat m", [(b"host", b"x")], perf_counter())
    assert span is NOT_TRACED and tracing.traceparent_line(span) == b"" and not tracing.recording(span)
    kept = tracing.start("chat m", [(b"traceparent", f"00-{TRACE}-{SPAN}-01".encode())], perf_counter())
    assert tracing.recording(kept)
    line = tracing.traceparent_line(kept)
    assert line.startswith(f"traceparent: 00-{TRACE}-".encode()) and line.endswith(b"-01\r\n")
    assert SPAN.encode() not in line
    dropped = tracing.start("chat m", [(b"traceparent", f"00-{TRACE}-{SPAN}-00".encode())], perf_counter())
    assert not tracing.recording(dropped)
    assert tracing.traceparent_line(dropped).endswith(b"-00\r\n")  # the backend learns the trace is not kept


@pytest.mark.parametrize("header", [b"garbage", b"00-" + b"0" * 32 + b"-" + SPAN.encode() + b"-01", b"00-abc-def-01"])
def test_an_invalid_client_traceparent_starts_a_trace_of_the_proxys_own(make_tracing, header):
    tracing = make_tracing(1.0)
    span = tracing.start("chat m", [(b"traceparent", header)], perf_counter())
    assert tracing.recording(span)
    context = span.get_span_context()
    assert context.is_valid and f"{context.trace_id:032x}" != TRACE
    assert context.trace_flags & 1  # sampled (the SDK also sets level 2's "random trace id" bit)
    assert tracing.traceparent_line(span) == b"traceparent: 00-%032x-%016x-%02x\r\n" % (
        context.trace_id, context.span_id, context.trace_flags)


def test_perf_counter_readings_become_unix_nanoseconds():
    assert abs(unix_ns(perf_counter()) - time_ns()) < 50_000_000
    assert abs(unix_ns(perf_counter() - 2.0) - (time_ns() - 2_000_000_000)) < 50_000_000


@pytest.mark.parametrize(("path", "operation"), [
    ("/v1/chat/completions", "chat"), ("/v1/messages", "chat"), ("/v1/responses", "chat"), ("/api/chat", "chat"),
    ("/v1/completions", "text_completion"), ("/generate_stream", "text_completion"),
    ("/api/generate", "text_completion"), ("/completion", "text_completion"), ("/v1/embeddings", "embeddings"),
])
def test_operation_name_follows_the_clients_api(path, operation):
    assert operation_name(SimpleNamespace(endpoint=lookup(path))) == operation


@pytest.mark.parametrize(("api", "kind", "name"), [
    ("chat", "vllm", "openai"), ("responses", "openai", "openai"), ("messages", "vllm", "anthropic"),
    ("messages", "anthropic", "anthropic"), ("tgi-generate", "tgi", "tgi"), ("ollama-chat", "ollama", "ollama"),
    ("sglang-generate", None, "openai"), ("llamacpp-completion", "llamacpp", "llamacpp"),
])
def test_provider_name_is_the_apis_maker_or_the_engines(api, kind, name):
    assert provider(api, kind) == name


@pytest.mark.parametrize(("error", "termination", "status", "expected"), [
    ("", "--", 200, None), ("invalid_api_key", "LR", 401, "invalid_api_key"),
    ("", "CD", 200, "client_closed"), ("", "sD", 200, "stream_idle_timeout"), ("", "--", 503, "503"),
    ("upstream_connect_failed", "SC", 502, "upstream_connect_failed"),
])
def test_error_type(error, termination, status, expected):
    assert error_type(SimpleNamespace(error_type=error, termination=termination, status=status)) == expected
