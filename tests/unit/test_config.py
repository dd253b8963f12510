from __future__ import annotations

import dataclasses
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from llmproxy.config import (
    ConfigError,
    dump_config,
    expand_env,
    load_config,
    parse_config,
    parse_duration,
    parse_listen,
    parse_size,
)
from llmproxy.config.model import (
    AuthConfig,
    BackendConfig,
    BackendTimeouts,
    CachingConfig,
    Config,
    LimitConfig,
    LoggingConfig,
    MetricsConfig,
    PrefixAffinityConfig,
    RateLimitConfig,
    RoutingConfig,
    SecurityConfig,
    ServerConfig,
    Timeouts,
    TracingConfig,
    TranslationConfig,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "config.yaml.example"


def doc(**sections: Any) -> dict[str, Any]:
    """A minimal valid document plus the given sections."""
    return {"backends": [{"url": "http://vllm:8000"}], **sections}


def one(**fields: Any) -> dict[str, Any]:
    """A document with one backend having the given fields."""
    return {"backends": [{"url": "http://a", **fields}]}


def error_of(data: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value


# --- scalars ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (5, 5.0),
        (1.5, 1.5),
        (0, 0.0),
        ("250ms", 0.25),
        ("3s", 3.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        (".5s", 0.5),
        ("100us", 0.0001),
        ("100ms", 0.1),
        ("1m30s", 90.0),
        ("30", 30.0),
        (" 5 s ", 5.0),
    ],
)
def test_parse_duration_good(value: Any, seconds: float) -> None:
    assert parse_duration(value, "x") == seconds


@pytest.mark.parametrize(
    "value",
    [-1, -0.5, "-5s", "", "  ", "fast", "5x", "s", "5S", "1e3s", "5 5s", "1d", True, None, [], float("inf"),
     float("nan"), "9" * 400 + "s"],
)  # fmt: skip
def test_parse_duration_bad(value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(value, "server.timeouts.connect")
    assert info.value.path == "server.timeouts.connect"
    assert info.value.reason.startswith("must be a duration like 5s, 500ms or 2m, got ")


def test_duration_message_is_exact() -> None:
    err = error_of(doc(server={"timeouts": {"connect": "fast"}}))
    assert str(err) == 'server.timeouts.connect: must be a duration like 5s, 500ms or 2m, got "fast"'


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 0),
        (1024, 1024),
        ("1024", 1024),
        ("512B", 512),
        ("512b", 512),
        ("32KiB", 32 * 1024),
        ("10MiB", 10 * 1024**2),
        ("10mib", 10 * 1024**2),
        ("10 MiB", 10 * 1024**2),
        ("1GiB", 1024**3),
        ("10MB", 10 * 10**6),
        ("10KB", 10 * 10**3),
        ("1.5KiB", 1536),
    ],
)
def test_parse_size_good(value: Any, size: int) -> None:
    assert parse_size(value, "x") == size


@pytest.mark.parametrize("value", [-1, "-1KiB", "", "abc", "KiB", "10XB", "10K", "1e3", 1.5, True, None, {"a": 1}])
def test_parse_size_bad(value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        parse_size(value, "server.max_body_size")
    assert info.value.path == "server.max_body_size"
    assert info.value.reason.startswith("must be a size like 512B, 32KiB or 10MiB, got ")


def test_parse_size_rejects_fractional_bytes() -> None:
    with pytest.raises(ConfigError, match="whole number of bytes"):
        parse_size("0.5B", "x")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (":8000", ("0.0.0.0", 8000)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::1]:8080", ("::1", 8080)),
        ("[::]:8000", ("::", 8000)),
        ("localhost:80", ("localhost", 80)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
        ("my_service.internal:9000", ("my_service.internal", 9000)),
    ],
)
def test_parse_listen_good(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value, "server.listen") == expected


@pytest.mark.parametrize(
    "value",
    ["8000", "127.0.0.1", "::1:8080", "[::1]", "host:99999", "host:-1", "host:abc", "", "[zz]:80",
     "999.1.1.1:80", "bad host:80", "-host:80", "*:80", 8000, None],
)  # fmt: skip
def test_parse_listen_bad(value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        parse_listen(value, "server.listen")
    assert info.value.path == "server.listen"


# --- ConfigError --------------------------------------------------------------------------------------------


def test_config_error_carries_path_and_reason() -> None:
    err = ConfigError("backends[1].weight", "must be a positive integer")
    assert str(err) == "backends[1].weight: must be a positive integer"
    assert (err.path, err.reason) == ("backends[1].weight", "must be a positive integer")
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.path, copy.reason, str(copy)) == (err.path, err.reason, str(err))


# --- whole documents: good -------------------------------------------------------------------------------


def test_minimal_document_uses_model_defaults() -> None:
    cfg = parse_config(doc())
    assert cfg.server == ServerConfig()
    assert cfg.routing == RoutingConfig()
    assert cfg.logging == LoggingConfig()
    assert cfg.metrics == MetricsConfig()
    [backend] = cfg.backends
    assert backend == BackendConfig(url="http://vllm:8000", name="vllm:8000", host="vllm", port=8000)


FULL = {
    "server": {
        "listen": "127.0.0.1:9000",
        "max_connections": 50,
        "max_header_size": "64KiB",
        "max_request_line": "4KiB",
        "max_body_size": "1MB",
        "shutdown_timeout": "10s",
        "trusted_proxies": ["10.0.0.0/8", "192.168.1.1", "::1"],
        "timeouts": {
            "request_head": "5s",
            "keepalive": "1m",
            "body": 20,
            "write": "45s",
            "connect": "500ms",
            "first_byte": "10m",
            "stream_idle": "2m",
        },
    },
    "backends": [
        {
            "url": "https://gw.example/openai/",
            "name": "openai",
            "weight": 2,
            "type": "openai",
            "api_key": "sk-secret",
            "max_connections": 8,
            "max_idle": 0,
            "idle_timeout": "2s",
            "max_waiters": 0,
            "tls_verify": False,
            "timeouts": {"connect": "1s", "first_byte": "1m", "stream_idle": None},
        },
        {"url": "http://ollama:11434"},
    ],
    "routing": {"load_balance": "least_connections"},
    "logging": {"level": "debug", "access_log": "/var/log/llmproxy.log"},
    "metrics": {"enabled": False},
}


def test_every_key_is_applied() -> None:
    cfg = parse_config(FULL)
    assert cfg.server == ServerConfig(
        host="127.0.0.1",
        port=9000,
        max_connections=50,
        max_header_size=64 * 1024,
        max_request_line=4 * 1024,
        max_body_size=10**6,
        shutdown_timeout=10.0,
        trusted_proxies=["10.0.0.0/8", "192.168.1.1", "::1"],
        timeouts=Timeouts(
            request_head=5.0,
            keepalive=60.0,
            body=20.0,
            write=45.0,
            connect=0.5,
            first_byte=600.0,
            stream_idle=120.0,
        ),
    )
    assert cfg.backends[0] == BackendConfig(
        url="https://gw.example/openai/",
        name="openai",
        weight=2,
        type="openai",
        api_key="sk-secret",
        max_connections=8,
        max_idle=0,
        idle_timeout=2.0,
        max_waiters=0,
        tls_verify=False,
        timeouts=BackendTimeouts(connect=1.0, first_byte=60.0, stream_idle=None),
        scheme="https",
        host="gw.example",
        port=443,
        base_path="/openai",
    )
    assert cfg.backends[1].name == "ollama:11434"
    assert cfg.routing.load_balance == "least_connections"
    assert cfg.logging == LoggingConfig(level="debug", access_log="/var/log/llmproxy.log")
    assert cfg.metrics.enabled is False


@pytest.mark.parametrize(
    ("url", "scheme", "host", "port", "base_path", "name"),
    [
        ("http://vllm:8000", "http", "vllm", 8000, "", "vllm:8000"),
        ("http://ollama", "http", "ollama", 80, "", "ollama:80"),
        ("https://api.openai.com", "https", "api.openai.com", 443, "", "api.openai.com:443"),
        ("https://gw.example/openai/", "https", "gw.example", 443, "/openai", "gw.example:443"),
        ("HTTPS://Example.COM:8443/a/b//", "https", "example.com", 8443, "/a/b", "example.com:8443"),
        ("http://host/", "http", "host", 80, "", "host:80"),
        ("http://10.0.0.5:8000", "http", "10.0.0.5", 8000, "", "10.0.0.5:8000"),
        ("http://[::1]:8000/", "http", "::1", 8000, "", "[::1]:8000"),
        ("http://[2001:db8::1]", "http", "2001:db8::1", 80, "", "[2001:db8::1]:80"),
        ("http://vllm_a:8000", "http", "vllm_a", 8000, "", "vllm_a:8000"),
    ],
)
def test_backend_url_derived_fields(url: str, scheme: str, host: str, port: int, base_path: str, name: str) -> None:
    [b] = parse_config({"backends": [{"url": url}]}).backends
    assert (b.scheme, b.host, b.port, b.base_path, b.name) == (scheme, host, port, base_path, name)


def test_lenient_spellings() -> None:
    cfg = parse_config(
        doc(
            logging={"level": "WARNING", "access_log": False},  # a bare YAML `off` is false
            routing={"load_balance": "Weighted"},
            metrics=None,  # an empty section means defaults
            server={"trusted_proxies": None},
        )
    )
    assert (cfg.logging.level, cfg.logging.access_log) == ("warning", "off")
    assert cfg.routing.load_balance == "weighted"
    assert cfg.metrics == MetricsConfig()
    assert cfg.server.trusted_proxies == []


def test_empty_api_key_means_none() -> None:
    cfg = parse_config({"backends": [{"url": "http://a", "api_key": ""}, {"url": "http://b"}]})
    assert [b.api_key for b in cfg.backends] == [None, None]


# --- whole documents: bad ---------------------------------------------------------------------------------


def test_weight_message_is_exact() -> None:
    err = error_of({"backends": [{"url": "http://a"}, {"url": "http://b", "weight": "abc"}]})
    assert str(err) == 'backends[1].weight: must be a positive integer, got "abc"'
    assert (err.path, err.reason) == ("backends[1].weight", 'must be a positive integer, got "abc"')


@pytest.mark.parametrize(
    ("data", "path"),
    [
        (doc(bogus=1), "bogus"),
        (doc(server={"bogus": 1}), "server.bogus"),
        (doc(server={"timeouts": {"bogus": "1s"}}), "server.timeouts.bogus"),
        ({"backends": [{"url": "http://a", "bogus": 1}]}, "backends[0].bogus"),
        ({"backends": [{"url": "http://a"}, {"url": "http://b", "timeouts": {"keepalive": "1s"}}]},
         "backends[1].timeouts.keepalive"),
        (doc(routing={"bogus": 1}), "routing.bogus"),
        (doc(logging={"bogus": 1}), "logging.bogus"),
        (doc(metrics={"bogus": 1}), "metrics.bogus"),
        (doc(server={1: 2}), "server.1"),
        # host/port are derived: they are not keys of the file.
        (doc(server={"host": "0.0.0.0"}), "server.host"),
        ({"backends": [{"url": "http://a", "port": 80}]}, "backends[0].port"),
    ],
)  # fmt: skip
def test_unknown_keys_report_their_path(data: dict[str, Any], path: str) -> None:
    err = error_of(data)
    assert err.path == path
    assert err.reason.startswith("unknown key")


def test_a_backend_pool_has_no_cap_and_no_queue_unless_asked() -> None:
    default, capped, queued = parse_config(doc(backends=[
        {"url": "http://a"}, {"url": "http://b", "max_connections": 64, "max_idle": 8},
        {"url": "http://c", "max_concurrent": 10, "queue_timeout": "5s", "max_connections": None}])).backends
    assert (default.max_connections, default.max_idle, default.max_concurrent) == (None, None, None)
    assert (capped.max_connections, capped.max_idle) == (64, 8)
    assert (queued.max_concurrent, queued.queue_timeout, queued.max_connections) == (10, 5.0, None)


def test_unknown_key_message() -> None:
    assert str(error_of(doc(server={"bogus": 1}))) == "server.bogus: unknown key"
    typo = error_of(doc(server={"listne": ":80"}))
    assert str(typo) == 'server.listne: unknown key (did you mean "listen"?)'


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (one(weight=True), "backends[0].weight: must be a positive integer, got true"),
        (one(weight=0), "backends[0].weight: must be a positive integer, got 0"),
        (one(weight=1.5), "backends[0].weight: must be a positive integer, got 1.5"),
        (one(weight="5"), 'backends[0].weight: must be a positive integer, got "5"'),
        (one(max_idle=-1), "backends[0].max_idle: must be an integer >= 0, got -1"),
        (one(max_connections=0), "backends[0].max_connections: must be a positive integer, got 0"),
        (one(max_concurrent=0), "backends[0].max_concurrent: must be a positive integer, got 0"),
        (one(queue_timeout="soon"), 'backends[0].queue_timeout: must be a duration like 5s, 500ms or 2m, got "soon"'),
        (one(tls_verify=1), "backends[0].tls_verify: must be true or false, got 1"),
        (one(tls_verify="yes"), 'backends[0].tls_verify: must be true or false, got "yes"'),
        (one(type="foo"),
         'backends[0].type: must be one of auto, ollama, tgi, sglang, llamacpp, vllm, openai, anthropic, got "foo"'),
        (one(name=""), 'backends[0].name: must be a non-empty name, got ""'),
        (one(name="a b"), 'backends[0].name: must not contain whitespace or control characters, got "a b"'),
        (
            one(idle_timeout="-1s"),
            'backends[0].idle_timeout: must be a duration like 5s, 500ms or 2m, got "-1s"',
        ),
        (one(timeouts={"connect": 0}), "backends[0].timeouts.connect: must be greater than 0, got 0"),
        (one(timeouts=[]), "backends[0].timeouts: must be a mapping, got a list"),
        ({"backends": [{"weight": 2}]}, "backends[0].url: is required"),
        ({"backends": ["http://a"]}, 'backends[0]: must be a mapping, got "http://a"'),
        ({"backends": {"url": "http://a"}}, "backends: must be a list of backends, got a mapping"),
        ({"backends": []}, "backends: at least one backend is required"),
        ({"backends": None}, "backends: at least one backend is required"),
        ({}, "backends: at least one backend is required"),
        (None, "backends: at least one backend is required"),
        ([1, 2], "<config>: must be a mapping of sections (server, backends, ...), got a list"),
        (doc(server=[]), "server: must be a mapping, got a list"),
        (doc(server={"timeouts": {"connect": 0}}), "server.timeouts.connect: must be greater than 0, got 0"),
        (doc(server={"max_connections": 0}), "server.max_connections: must be a positive integer, got 0"),
        (
            doc(server={"max_header_size": "1000B"}),
            'server.max_header_size: must be at least 1KiB, got "1000B"',
        ),
        (doc(server={"max_body_size": 0}), "server.max_body_size: must be at least 1B, got 0"),
        (
            doc(server={"listen": 8000}),
            'server.listen: must be a quoted string like ":8000" or "127.0.0.1:8000", got 8000',
        ),
        (
            doc(server={"trusted_proxies": "10.0.0.0/8"}),
            'server.trusted_proxies: must be a list of IP addresses or CIDR ranges, got "10.0.0.0/8"',
        ),
        (
            doc(server={"trusted_proxies": ["10.0.0.0/8", "nope"]}),
            'server.trusted_proxies[1]: must be an IP address or a CIDR range like 10.0.0.0/8, got "nope"',
        ),
        (
            doc(server={"trusted_proxies": ["10.0.0.1/8"]}),
            'server.trusted_proxies[0]: "10.0.0.1/8" has host bits set; did you mean 10.0.0.0/8?',
        ),
        (
            doc(routing={"load_balance": "random"}),
            "routing.load_balance: must be one of round_robin, weighted, least_connections, latency_based, "
            'queue_depth, prefix_affinity, got "random"',
        ),
        (
            doc(logging={"level": "verbose"}),
            'logging.level: must be one of debug, info, warning, error, got "verbose"',
        ),
        (
            doc(logging={"access_log": True}),
            "logging.access_log: must be stdout, stderr, off or a file path, got true",
        ),
        (doc(metrics={"enabled": "true"}), 'metrics.enabled: must be true or false, got "true"'),
    ],
)
def test_bad_values(data: Any, message: str) -> None:
    assert str(error_of(data)) == message


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://a", "must be an http:// or https:// URL"),
        ("vllm:8000", "must be an http:// or https:// URL"),
        ("http:vllm", "must be an http:// or https:// URL"),
        ("http://", "must include a host"),
        ("http:///v1", "must include a host"),
        ("http://a/v1?x=1", "must not have a query string or fragment"),
        ("http://a/v1#frag", "must not have a query string or fragment"),
        ("http://a:0", "invalid port"),
        ("http://a:70000", "invalid port"),
        ("http://a:port", "invalid port"),
        ("http://a b:80", "must be printable ASCII"),
        ("http://a/caf\u00e9", "must be printable ASCII"),
        ("http://[::1", "invalid URL"),
        ("http://[zz]:80", "invalid"),  # urlsplit or our own IPv6 check
        ("http://bad!host", "invalid host name"),
        ("", "must be a URL like"),
        (8000, "must be a URL like"),
        ("http://vllm:8000/v1", 'ends in /v1, which every forwarded path already starts with (the backend would get '
                                '/v1/v1/...): use "http://vllm:8000"'),
        ("http://vllm:8000/v1/", "ends in /v1"),
        ("https://gw.example/llm/v1", 'ends in /v1, which every forwarded path already starts with (the backend '
                                      'would get /v1/v1/...): use "https://gw.example/llm"'),
    ],
)
def test_bad_backend_urls(url: Any, reason: str) -> None:
    err = error_of({"backends": [{"url": url}]})
    assert err.path == "backends[0].url"
    assert err.reason.startswith(reason)


@pytest.mark.parametrize("url", ["http://user:hunter2@vllm:8000", "http://hunter2@vllm/v1", "http://u:hunter2@[::1"])
def test_url_credentials_are_refused_without_echoing_them(url: str) -> None:
    err = error_of({"backends": [{"url": url}]})
    assert err.path == "backends[0].url"
    assert "api_key" in err.reason
    assert "hunter2" not in str(err)


@pytest.mark.parametrize("api_key", [123, "sk-1\r\nX-Evil: 1", "sk 1", "sk-\u00e9"])
def test_bad_api_key_is_refused_without_echoing_it(api_key: Any) -> None:
    err = error_of({"backends": [{"url": "http://a", "api_key": api_key}]})
    assert err.path == "backends[0].api_key"
    assert str(api_key) not in str(err)


def test_duplicate_backend_names() -> None:
    err = error_of({"backends": [{"url": "http://a", "name": "x"}, {"url": "http://b", "name": "x"}]})
    assert str(err) == 'backends[1].name: duplicate backend name "x" (already used by backends[0])'


def test_duplicate_default_names_explain_the_default() -> None:
    err = error_of({"backends": [{"url": "http://a:80"}, {"url": "http://b"}, {"url": "http://a/v2"}]})
    assert err.path == "backends[2].name"
    assert err.reason.startswith('duplicate backend name "a:80" (already used by backends[0]); names default')


# --- environment variables --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("${LP_SET}", "value"),
        ("pre-${LP_SET}-post", "pre-value-post"),
        ("${LP_SET:-default}", "value"),
        ("${LP_UNSET:-default}", "default"),
        ("${LP_UNSET:-}", ""),
        ("${LP_EMPTY:-default}", "default"),  # as in the shell, :- also covers an empty variable
        ("${LP_EMPTY}", ""),
        ("$${LP_SET}", "${LP_SET}"),
        ("$LP_SET and $$", "$LP_SET and $$"),  # only ${...} is special
        ("${LP_SET}${LP_SET}", "valuevalue"),
        ("no references", "no references"),
    ],
)
def test_expand_env(monkeypatch: pytest.MonkeyPatch, text: str, expected: str) -> None:
    monkeypatch.setenv("LP_SET", "value")
    monkeypatch.setenv("LP_EMPTY", "")
    monkeypatch.delenv("LP_UNSET", raising=False)
    assert expand_env(text, "k") == expected


@pytest.mark.parametrize("text", ["${1X}", "${LP_SET", "${}", "${A:default}", "${A:-${B}}"])
def test_expand_env_malformed(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv("LP_SET", "value")
    with pytest.raises(ConfigError) as info:
        expand_env(text, "server.listen")
    assert info.value.path == "server.listen"
    assert info.value.reason.startswith("malformed ${...}")


def test_unset_variable_names_key_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_KEY", raising=False)
    err = error_of({"backends": [{"url": "http://vllm:8000", "api_key": "${VLLM_KEY}"}]})
    assert str(err) == "backends[0].api_key: environment variable VLLM_KEY is not set"


def test_env_in_lists_names_the_item(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LP_UNSET", raising=False)
    err = error_of(doc(server={"trusted_proxies": ["10.0.0.0/8", "${LP_UNSET}"]}))
    assert str(err) == "server.trusted_proxies[1]: environment variable LP_UNSET is not set"


def test_env_values_cannot_break_yaml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Expansion happens after parsing: ':' and '#' in a value stay part of the value.
    monkeypatch.setenv("LP_KEY", "sk:#not-a-comment")
    monkeypatch.setenv("LP_URL", "http://vllm:8000/llm")
    path = tmp_path / "config.yaml"
    path.write_text("backends:\n  - url: ${LP_URL}\n    api_key: ${LP_KEY}\n    name: ${LP_NAME:-main}\n")
    [backend] = load_config(path).backends
    assert (backend.api_key, backend.base_path, backend.name) == ("sk:#not-a-comment", "/llm", "main")


def test_env_values_fill_typed_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    # YAML cannot type a substituted value, so int and bool fields accept its text.
    monkeypatch.setenv("LP_WEIGHT", "7")
    monkeypatch.delenv("LP_TLS", raising=False)
    data = {
        "backends": [{"url": "http://a", "weight": "${LP_WEIGHT}", "tls_verify": "${LP_TLS:-false}"}],
        "server": {"max_connections": "${LP_CONNS:-100}", "max_body_size": "${LP_BODY:-1MiB}"},
    }
    cfg = parse_config(data)
    assert (cfg.backends[0].weight, cfg.backends[0].tls_verify) == (7, False)
    assert (cfg.server.max_connections, cfg.server.max_body_size) == (100, 1024**2)


def test_env_value_still_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LP_WEIGHT", "abc")
    err = error_of({"backends": [{"url": "http://a"}, {"url": "http://b", "weight": "${LP_WEIGHT}"}]})
    assert str(err) == 'backends[1].weight: must be a positive integer, got "abc"'


# --- files -----------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: file not found"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"server: [unclosed\n", "invalid YAML: "),
        (b"backends:\n\t- url: x\n", "invalid YAML: "),
        (b"a: 1\n---\nb: 2\n", "invalid YAML: "),
        (b"- 1\n- 2\n", "must be a mapping of sections"),
        (b"\xff\xfe bad", "not valid UTF-8 text"),
        (b"server: !!python/object:os.system {}\n", "invalid YAML: "),
    ],
)
def test_bad_files(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.path == str(path)
    assert info.value.reason.startswith(reason)


def test_unreadable_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)  # a directory
    assert info.value.path == str(tmp_path)
    assert info.value.reason.startswith("cannot read the file")


def test_empty_file_needs_backends(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("# nothing yet\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == "backends: at least one backend is required"


def test_duplicate_yaml_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("server:\n  listen: ':80'\nbackends:\n  - url: http://a\nserver:\n  listen: ':81'\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.reason == 'invalid YAML: duplicate key "server" (line 5, column 1)'


def test_yaml_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "backends:\n"
        "  - &base {url: 'http://a', weight: 2, max_idle: 3}\n"
        "  - <<: *base\n"
        "    url: http://b\n"
        "    weight: 5\n"
    )
    a, b = load_config(path).backends
    assert (a.name, a.weight, b.name, b.weight, b.max_idle) == ("a:80", 2, "b:80", 5, 3)


def test_example_config_loads() -> None:
    cfg = load_config(EXAMPLE)
    assert (cfg.server.host, cfg.server.port) == ("0.0.0.0", 8000)
    assert [(b.url, b.weight) for b in cfg.backends] == [("http://vllm:8000", 5), ("http://ollama:11434", 3)]
    assert cfg.routing.load_balance == "least_connections"


def test_example_documents_every_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Uncommenting every `# key: value` line must load, and give exactly the model's defaults."""
    monkeypatch.setenv("VLLM_KEY", "sk-test")
    text = re.sub(r"(?m)^(\s*)# (\s*[a-z_]+:.*)$", r"\1\2", EXAMPLE.read_text())
    path = tmp_path / "config.yaml"
    path.write_text(text)
    full, plain = load_config(path), load_config(EXAMPLE)
    assert full.backends[0].api_key == "sk-test"
    full.backends[0].api_key = None
    assert full == plain
    assert full.server == ServerConfig()
    assert full.logging == LoggingConfig()
    assert full.metrics == MetricsConfig()
    documented = set(re.findall(r"(?m)^\s*(?:- )?(?:# )?\s*([a-z_]+):", EXAMPLE.read_text()))
    classes = (
        ServerConfig,
        Timeouts,
        BackendConfig,
        BackendTimeouts,
        RoutingConfig,
        PrefixAffinityConfig,
        TranslationConfig,
        LoggingConfig,
        MetricsConfig,
        AuthConfig,
        SecurityConfig,
        RateLimitConfig,
        LimitConfig,
        TracingConfig,
        CachingConfig,
    )
    model_keys = {f.name for cls in (Config, *classes) for f in dataclasses.fields(cls)}
    # host/port come from listen, the rest from url; global_limits is `global:` in the file
    derived = {"host", "port", "scheme", "base_path", "global_limits"}
    assert "listen" in documented
    assert model_keys - derived - documented == set()


# --- dump_config -----------------------------------------------------------------------------------------


def test_dump_masks_secrets_and_round_trips() -> None:
    cfg = parse_config(FULL)
    text = dump_config(cfg)
    assert "sk-secret" not in text
    dumped = yaml.safe_load(text)
    assert dumped["backends"][0]["api_key"] == "***"
    assert dumped["backends"][1]["api_key"] is None  # unset stays null
    again = parse_config(dumped)
    again.backends[0].api_key = "sk-secret"
    assert again == cfg


def test_dump_is_readable() -> None:
    dumped = yaml.safe_load(dump_config(parse_config(doc(server={"listen": "[::1]:0"}))))
    assert dumped["server"]["listen"] == "[::1]:0"
    assert dumped["server"]["max_body_size"] == "10MiB"
    assert dumped["server"]["timeouts"]["connect"] == "5s"
    assert dumped["backends"][0]["idle_timeout"] == "4s"
    assert "host" not in dumped["backends"][0]  # derived from url


def test_dump_masks_url_credentials_of_configs_built_in_code() -> None:
    cfg = Config(backends=[BackendConfig(url="http://user:hunter2@a:1/v1", api_key="k")])
    text = dump_config(cfg)
    assert "hunter2" not in text
    assert "http://***@a:1/v1" in text


durations = st.floats(min_value=1e-6, max_value=1e7, allow_nan=False, allow_infinity=False) | st.integers(1, 10**6).map(
    float
)


@settings(deadline=None)  # timing varies on loaded CI machines; correctness is what is tested
@given(connect=durations, idle=durations, first_byte=durations, size=st.integers(1024, 2**40))
def test_dump_round_trips_any_values(connect: float, idle: float, first_byte: float, size: int) -> None:
    cfg = Config(
        server=ServerConfig(max_header_size=size, timeouts=Timeouts(connect=connect)),
        backends=[
            BackendConfig(
                url="http://a:1",
                name="a:1",
                host="a",
                port=1,
                idle_timeout=idle,
                timeouts=BackendTimeouts(first_byte=first_byte),
            )
        ],
    )
    assert parse_config(yaml.safe_load(dump_config(cfg))) == cfg


yaml_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
yaml_values = st.recursive(
    yaml_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10) | st.integers(), inner, max_size=3)
    ),
    max_leaves=10,
)
known_keys = st.sampled_from(["server", "backends", "routing", "logging", "metrics", "url", "weight", "listen"])


@settings(deadline=None)
@given(st.dictionaries(known_keys, yaml_values | st.lists(st.dictionaries(known_keys, yaml_values), max_size=2)))
def test_any_document_gives_a_config_or_a_config_error(data: dict[str, Any]) -> None:
    try:
        parse_config(data)
    except ConfigError as err:
        assert str(err) == f"{err.path}: {err.reason}"
