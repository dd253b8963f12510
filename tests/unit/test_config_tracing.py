"""The `tracing:` section: its defaults, what it refuses (naming the key), and its dump."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import yaml

from llmproxy.config import ConfigError, dump_config, parse_config
from llmproxy.config.model import TracingConfig


def tracing(**fields: Any) -> dict[str, Any]:
    return {"backends": [{"url": "http://vllm:8000"}], "tracing": fields}


def test_tracing_is_off_by_default_and_every_key_parses() -> None:
    assert parse_config({"backends": [{"url": "http://vllm:8000"}]}).tracing == TracingConfig()
    config = parse_config(tracing(enabled=True, endpoint="https://otel.example:4318/v1/traces", sample_ratio=0.25,
                                  service_name="edge-proxy", headers={"Authorization": "Bearer abc"},
                                  export_timeout="2s", export_interval="250ms", max_batch_size=64,
                                  max_queue_size=4096)).tracing
    assert config == TracingConfig(True, "https://otel.example:4318/v1/traces", 0.25, "edge-proxy",
                                   {"Authorization": "Bearer abc"}, 2.0, 0.25, 64, 4096)


@pytest.mark.parametrize(("fields", "path", "reason"), [
    ({"enabled": "yes"}, "tracing.enabled", "true or false"),
    ({"endpoint": "collector:4318"}, "tracing.endpoint", "OTLP/HTTP traces URL"),
    ({"endpoint": "grpc://collector:4317"}, "tracing.endpoint", "http:// or https://"),
    ({"sample_ratio": 1.5}, "tracing.sample_ratio", "fraction from 0 to 1"),
    ({"sample_ratio": -0.1}, "tracing.sample_ratio", "fraction from 0 to 1"),
    ({"sample_ratio": True}, "tracing.sample_ratio", "fraction from 0 to 1"),
    ({"service_name": ""}, "tracing.service_name", "non-empty"),
    ({"headers": {"bad name": "x"}}, "tracing.headers.bad name", "header name"),
    ({"headers": {"x-token": "a\r\nb"}}, "tracing.headers.x-token", "one line"),
    ({"headers": ["x"]}, "tracing.headers", "mapping"),
    ({"export_timeout": 0}, "tracing.export_timeout", "greater than 0"),
    ({"export_interval": "soon"}, "tracing.export_interval", "duration"),
    ({"max_batch_size": 0}, "tracing.max_batch_size", "positive integer"),
    ({"max_batch_size": 100, "max_queue_size": 10}, "tracing.max_batch_size", "must not exceed max_queue_size"),
    ({"sample_rate": 0.5}, "tracing.sample_rate", 'did you mean "sample_ratio"'),
])
def test_bad_tracing_settings_are_refused_naming_the_key(fields: dict[str, Any], path: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(tracing(**fields))
    assert caught.value.path == path and reason in caught.value.reason, str(caught.value)


def test_a_header_value_is_never_echoed_in_an_error() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(tracing(headers={"authorization": "Bearer s3cret\n"}))
    assert "s3cret" not in str(caught.value)


def test_enabled_without_the_otel_extra_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)  # not installed
    with pytest.raises(ConfigError) as caught:
        parse_config(tracing(enabled=True))
    assert caught.value.path == "tracing.enabled"
    assert "pip install 'llmproxy[otel]'" in caught.value.reason
    assert parse_config(tracing(enabled=False)).tracing.enabled is False  # off, nothing is asked of the extra


def test_dump_masks_header_values_and_loads_back() -> None:
    config = parse_config(tracing(enabled=True, headers={"Authorization": "Bearer s3cret"}, export_interval="100ms"))
    text = dump_config(config)
    assert "s3cret" not in text
    dumped = yaml.safe_load(text)["tracing"]
    assert dumped["headers"] == {"Authorization": "***"} and dumped["export_interval"] == "100ms"
    again = parse_config({"backends": [{"url": "http://vllm:8000"}], "tracing": dumped}).tracing
    assert again == TracingConfig(enabled=True, headers={"Authorization": "***"}, export_interval=0.1)
