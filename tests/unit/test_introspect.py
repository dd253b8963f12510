"""Backend discovery and probing: kind detection, health, models and queue depth against real sockets.

The mock backend runs in-process on the test's own event loop; tiny asyncio servers stand in for an
OpenAI-only server, a failing one and a silent one. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from llmproxy.catalogue import KINDS
from llmproxy.config import parse_config
from llmproxy.config.model import BackendConfig, BackendMetricsConfig
from llmproxy.fleet.introspect import (
    Load,
    check_health,
    detect_kind,
    fetch_load,
    fetch_models,
    load_gauges,
    parse_load,
)
from llmproxy.fleet.probe import ProbeError, host_header, probe_get
from llmproxy.mockbackend.options import DEFAULT_MODELS, MockOptions
from llmproxy.mockbackend.server import start_mock_backend

pytestmark = pytest.mark.timeout(20)

TIMEOUT = 2.0
DIALECTS = ("vllm", "tgi", "ollama")


def run(coro: Awaitable[Any]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, 10)

    return asyncio.run(bounded())


def backend_for(url: str, **extra: Any) -> BackendConfig:
    return parse_config({"backends": [{"url": url, **extra}]}).backends[0]


async def with_mock(dialect: str, check: Callable[[BackendConfig], Awaitable[Any]]) -> Any:
    async with await start_mock_backend(MockOptions(dialect=dialect)) as mock:
        return await check(backend_for(mock.url))


def reply(status: int, body: bytes = b"", length: bool = True) -> bytes:
    """A raw response; without `length` the body is delimited by closing the connection."""
    head = b"HTTP/1.1 %d X\r\nconnection: close\r\n" % status
    if length:
        head += b"content-length: %d\r\n" % len(body)
    return head + b"\r\n" + body


class TinyServer:
    """Answers each request target from `routes` (raw responses), 404 otherwise; records request heads.

    With `silent`, it reads the request but never answers; it counts clients that hang up on it.
    """

    def __init__(self, routes: dict[str, bytes] | None = None, silent: bool = False,
                 tls: ssl.SSLContext | None = None) -> None:
        self.routes = routes or {}
        self.silent = silent
        self.tls = tls
        self.heads: list[bytes] = []
        self.hung_up = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> TinyServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._server.close()
        for writer in self._writers:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            if self.silent:
                await self._wait_for_hang_up(reader)
                return
            target = head.split(b" ")[1].decode()
            writer.write(self.routes.get(target, reply(404, b"not found")))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def _wait_for_hang_up(self, reader: asyncio.StreamReader) -> None:
        try:
            while await reader.read(4096):
                pass
        except ConnectionError:
            pass
        self.hung_up += 1


def dead_url() -> str:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# --- kind ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dialect", DIALECTS)
def test_detects_each_mock_dialect(dialect: str) -> None:
    assert run(with_mock(dialect, lambda b: detect_kind(b, TIMEOUT))) == dialect


def test_a_server_answering_only_v1_models_is_openai() -> None:
    async def check() -> str:
        routes = {"/v1/models": reply(200, b'{"object":"list","data":[{"id":"gpt-x","object":"model"}]}')}
        async with TinyServer(routes) as server:
            return await detect_kind(backend_for(server.url), TIMEOUT)

    assert run(check()) == "openai"


def test_a_json_version_without_a_string_is_not_ollama() -> None:
    async def check() -> str:
        async with TinyServer({"/api/version": reply(200, b'{"version": 3}')}) as server:
            return await detect_kind(backend_for(server.url), TIMEOUT)

    assert run(check()) == "openai"


LOADING = reply(503, b'{"error":{"message":"Loading model","type":"unavailable_error","code":503}}')
DETECT_PATHS = [kind.detect_path for kind in KINDS.values() if kind.detect_path is not None]


def test_a_server_answering_every_probe_503_is_not_ready_rather_than_openai() -> None:
    # llama-server while it loads its model: every path 503. Filed as "openai" now, it would stay so for good.
    async def check() -> str:
        async with TinyServer(dict.fromkeys(DETECT_PATHS, LOADING)) as server:
            return await detect_kind(backend_for(server.url), TIMEOUT)

    with pytest.raises(ProbeError, match="503") as caught:
        run(check())
    assert caught.value.status == 503 and not caught.value.local


def test_a_503_beside_other_answers_still_settles_the_kind() -> None:
    async def check() -> str:
        routes = {DETECT_PATHS[0]: LOADING, "/v1/models": reply(200, b'{"object":"list","data":[]}')}
        async with TinyServer(routes) as server:  # the other probes answer 404
            return await detect_kind(backend_for(server.url), TIMEOUT)

    assert run(check()) == "openai"


def test_a_dead_backend_raises_instead_of_guessing() -> None:
    with pytest.raises(ProbeError, match="connect refused") as caught:
        run(detect_kind(backend_for(dead_url()), TIMEOUT))
    assert caught.value.status is None


def test_a_probe_that_could_not_be_sent_settles_no_kind(monkeypatch) -> None:
    # The first probe hits the proxy's own descriptor limit; the later ones would answer 404 (an openai-only
    # server's answers): guessing "openai" from them would misfile an Ollama backend for good.
    sent = []

    async def probe(backend: BackendConfig, path: str, timeout: float) -> Any:
        sent.append(path)
        if len(sent) == 1:
            raise ProbeError("connect failed: Too many open files", local=True)
        raise ProbeError("status 404", 404)

    monkeypatch.setattr("llmproxy.fleet.introspect.probe_get", probe)
    with pytest.raises(ProbeError, match="Too many open files") as caught:
        run(detect_kind(backend_for("http://127.0.0.1:9"), TIMEOUT))
    assert caught.value.local and len(sent) == 1


# --- health --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dialect", DIALECTS)
def test_mocks_are_healthy(dialect: str) -> None:
    assert run(with_mock(dialect, lambda b: check_health(b, dialect, TIMEOUT))) == (True, "")


def test_openai_kind_is_healthy_when_v1_models_answers() -> None:
    async def check() -> tuple[bool, str]:
        async with TinyServer({"/v1/models": reply(200, b'{"data":[]}')}) as server:
            return await check_health(backend_for(server.url), "openai", TIMEOUT)

    assert run(check()) == (True, "")


def test_a_503_is_unhealthy_with_its_status() -> None:
    async def check() -> tuple[bool, str]:
        async with TinyServer({"/health": reply(503, b'{"error":"unhealthy"}')}) as server:
            return await check_health(backend_for(server.url), "vllm", TIMEOUT)

    assert run(check()) == (False, "status 503")


def test_a_dead_port_is_unhealthy_with_the_probe_error() -> None:
    assert run(check_health(backend_for(dead_url()), "tgi", TIMEOUT)) == (False, "connect refused")


# --- models --------------------------------------------------------------------------------------------

def test_vllm_models_keep_every_field() -> None:
    cards = run(with_mock("vllm", lambda b: fetch_models(b, "vllm", TIMEOUT)))
    assert [card["id"] for card in cards] == [DEFAULT_MODELS["vllm"]]
    card = cards[0]
    assert card["object"] == "model"
    assert isinstance(card["max_model_len"], int) and card["max_model_len"] > 0
    assert card["root"] == DEFAULT_MODELS["vllm"] and "permission" in card


def test_tgi_models() -> None:
    cards = run(with_mock("tgi", lambda b: fetch_models(b, "tgi", TIMEOUT)))
    assert cards == [{"id": DEFAULT_MODELS["tgi"], "object": "model", "created": 0,
                      "owned_by": DEFAULT_MODELS["tgi"]}]


def test_ollama_models_come_from_api_tags() -> None:
    cards = run(with_mock("ollama", lambda b: fetch_models(b, "ollama", TIMEOUT)))
    # the mock's modified_at is 2026-05-01T09:00:00.123456789Z (nanoseconds, as Go writes it)
    assert cards == [{"id": DEFAULT_MODELS["ollama"], "object": "model", "created": 1777626000,
                      "owned_by": "library"}]


def test_ollama_tags_fallbacks_and_odd_entries() -> None:
    body = (b'{"models":[{"model":"a:1","modified_at":"2024-01-01T00:00:00+01:00"},'
            b'{"name":"b","modified_at":"yesterday"},{"name":"c"},{"name":""},"junk",{"name":7}]}')

    async def check() -> list[dict]:
        async with TinyServer({"/api/tags": reply(200, body)}) as server:
            return await fetch_models(backend_for(server.url), "ollama", TIMEOUT)

    assert [(card["id"], card["created"]) for card in run(check())] == [("a:1", 1704063600), ("b", 0), ("c", 0)]


def test_openai_models_skip_entries_without_a_string_id() -> None:
    body = b'{"object":"list","data":[{"id":"m1","object":"model","extra":1},{"id":2},"x",{"id":"m2"}]}'

    async def check() -> list[dict]:
        async with TinyServer({"/v1/models": reply(200, body)}) as server:
            return await fetch_models(backend_for(server.url), "openai", TIMEOUT)

    assert run(check()) == [{"id": "m1", "object": "model", "extra": 1}, {"id": "m2", "object": "model"}]


@pytest.mark.parametrize(("response", "message"), [
    (reply(500, b"{}"), "status 500"),
    (reply(200, b"<html>"), "not JSON"),
    (reply(200, b'{"data": {}}'), "no data list"),
])
def test_models_failures_raise(response: bytes, message: str) -> None:
    async def check() -> list[dict]:
        async with TinyServer({"/v1/models": response}) as server:
            return await fetch_models(backend_for(server.url), "vllm", TIMEOUT)

    with pytest.raises(ProbeError, match=message):
        run(check())


# --- queue depth ---------------------------------------------------------------------------------------

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
vllm:num_requests_running{engine="1",model_name="m"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 4.0
vllm:num_requests_waiting{engine="1",model_name="m"} 0.0
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 1000.0
"""

TGI_METRICS = """\
# TYPE tgi_batch_current_size gauge
tgi_batch_current_size 5
# TYPE tgi_queue_size gauge
tgi_queue_size 7
# TYPE tgi_request_count counter
tgi_request_count 99
"""


def _depth(load: Load | None) -> float | None:
    return load.queue_depth if load is not None else None


@pytest.mark.parametrize(("kind", "text", "expected"), [
    ("vllm", VLLM_METRICS, 9.0),
    ("tgi", TGI_METRICS, 12.0),
    ("tgi", "tgi_queue_size 3\n", 3.0),  # untyped, one of the two present
    ("vllm", 'vllm_num_requests_waiting{model_name="m"} 1\n', 1.0),  # colon already rewritten
    ("vllm", TGI_METRICS, None),  # the other server's metrics
    ("tgi", VLLM_METRICS, None),
    ("vllm", "", None),
    ("vllm", "# just a comment\n", None),
    ("vllm", "this is {{{ not prometheus", None),
    ("tgi", "<html><body>oops</body></html>", None),
    ("ollama", VLLM_METRICS, None),
    ("openai", TGI_METRICS, None),
])
def test_parse_queue_depth(kind: str, text: str, expected: float | None) -> None:
    gauges = load_gauges(backend_for("http://x"), kind)
    assert (parse_load(text, gauges).queue_depth if gauges else None) == expected


@pytest.mark.parametrize(("text", "queue", "kv"), [
    ("sglang:num_queue_reqs 2\nsglang:num_running_reqs 3\nsglang:token_usage 0.75\n", 5.0, 0.75),
    ("sglang_token_usage 0.5\n", None, 0.5),
    ("sglang:num_running_reqs 1\n", 1.0, None),
])
def test_sglang_reports_its_queue_and_kv_cache_use(text: str, queue, kv):
    assert parse_load(text, load_gauges(backend_for("http://x"), "sglang")) == Load(queue, kv)


def test_llamacpp_queue_is_processing_plus_deferred():
    text = "# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 1\nllamacpp:requests_deferred 4\n"
    assert parse_load(text, load_gauges(backend_for("http://x"), "llamacpp")).queue_depth == 5.0


def test_a_backends_own_metric_names_replace_its_kinds():
    config = BackendConfig(url="http://x", host="x", port=80,
                           metrics=BackendMetricsConfig(queued=["trtllm_num_requests_waiting"],
                                                        running=["trtllm_num_requests_running"], kv_cache="kv_use"))
    text = "trtllm_num_requests_waiting 7\ntrtllm_num_requests_running 2\nkv_use 0.25\nvllm:num_requests_running 99\n"
    assert parse_load(text, load_gauges(config, "vllm")) == Load(9.0, 0.25)
    assert load_gauges(config, "ollama") is not None  # any kind: the names say where to look


@pytest.mark.parametrize("dialect", ["vllm", "tgi"])
def test_fetch_queue_depth_counts_a_request_held_by_the_mock(dialect: str) -> None:
    async def check(backend: BackendConfig) -> tuple[float | None, float | None]:
        idle = _depth(await fetch_load(backend, dialect, TIMEOUT))
        body = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
        _, writer = await asyncio.open_connection(backend.host, backend.port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"x-mock-first-byte-delay-ms: 5000\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))
        await writer.drain()
        try:
            for _ in range(100):  # until the mock has parsed the request and counts it as waiting
                busy = _depth(await fetch_load(backend, dialect, TIMEOUT))
                if busy:
                    return idle, busy
                await asyncio.sleep(0.02)
            return idle, busy
        finally:
            writer.close()

    assert run(with_mock(dialect, check)) == (0.0, 1.0)


def test_fetch_queue_depth_makes_no_request_for_kinds_without_metrics() -> None:
    # a dead port: any network call would raise
    assert run(fetch_load(backend_for(dead_url()), "ollama", TIMEOUT)) is None
    assert run(fetch_load(backend_for(dead_url()), "openai", TIMEOUT)) is None


def test_fetch_queue_depth_raises_on_a_failed_fetch() -> None:
    async def check() -> float | None:
        async with TinyServer({"/metrics": reply(503)}) as server:
            return _depth(await fetch_load(backend_for(server.url), "vllm", TIMEOUT))

    with pytest.raises(ProbeError, match="status 503"):
        run(check())
    with pytest.raises(ProbeError, match="connect refused"):
        run(fetch_load(backend_for(dead_url()), "tgi", TIMEOUT))


# --- probe_get -----------------------------------------------------------------------------------------

def _header_lines(head: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    request_line, *lines = head.rstrip(b"\r\n").split(b"\r\n")
    return request_line, {name.lower(): value.strip() for name, _, value in (ln.partition(b":") for ln in lines)}


def test_probe_sends_host_auth_and_base_path() -> None:
    async def check() -> tuple[int, bytes, int, dict[str, str], bytes]:
        routes = {"/prefix/v1/models": reply(200, b'{"data":[]}')}
        async with TinyServer(routes) as server:
            backend = backend_for(server.url + "/prefix/", api_key="sk-test")
            response = await probe_get(backend, "/v1/models", TIMEOUT)
            return server.port, server.heads[0], response.status, response.headers, response.body

    port, head, status, headers, body = run(check())
    request_line, sent = _header_lines(head)
    assert request_line == b"GET /prefix/v1/models HTTP/1.1"
    assert sent[b"host"] == b"127.0.0.1:%d" % port
    assert sent[b"authorization"] == b"Bearer sk-test"
    assert sent[b"user-agent"] == b"llmproxy-health"
    assert sent[b"accept"] == b"*/*"
    assert sent[b"connection"] == b"close"
    assert (status, body) == (200, b'{"data":[]}')
    assert headers["content-length"] == "11" and headers["connection"] == "close"


def test_probe_without_api_key_sends_no_authorization() -> None:
    async def check() -> bytes:
        async with TinyServer() as server:
            response = await probe_get(backend_for(server.url), "/x", TIMEOUT)
            assert response.status == 404
            return server.heads[0]

    _, sent = _header_lines(run(check()))
    assert b"authorization" not in sent


def test_host_header_omits_the_default_port_and_brackets_ipv6() -> None:
    assert host_header(backend_for("http://example.com")) == "example.com"
    assert host_header(backend_for("https://example.com:443/v")) == "example.com"
    assert host_header(backend_for("https://example.com:80")) == "example.com:80"
    assert host_header(backend_for("http://[::1]:8000")) == "[::1]:8000"


def test_probe_times_out_on_a_silent_server() -> None:
    async def check() -> None:
        async with TinyServer(silent=True) as server:
            await probe_get(backend_for(server.url), "/health", 0.3)

    with pytest.raises(ProbeError, match=r"timed out after 0\.3s") as caught:
        run(check())
    assert caught.value.status is None


def test_probe_closes_the_socket_after_a_timeout() -> None:
    async def check() -> int:
        async with TinyServer(silent=True) as server:
            with pytest.raises(ProbeError):
                await probe_get(backend_for(server.url), "/health", 0.3)
            while not server.hung_up:
                await asyncio.sleep(0.01)
            return server.hung_up

    assert run(check()) == 1


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "close-delimited"])
def test_probe_refuses_a_body_over_max_body(length: bool) -> None:
    async def check() -> None:
        async with TinyServer({"/big": reply(200, b"x" * 5000, length=length)}) as server:
            await probe_get(backend_for(server.url), "/big", TIMEOUT, max_body=1000)

    with pytest.raises(ProbeError, match="body over 1000 bytes") as caught:
        run(check())
    assert caught.value.status == 200


def test_probe_body_exactly_max_body_is_fine() -> None:
    async def check() -> bytes:
        async with TinyServer({"/b": reply(200, b"y" * 1000, length=False)}) as server:
            return (await probe_get(backend_for(server.url), "/b", TIMEOUT, max_body=1000)).body

    assert run(check()) == b"y" * 1000


@pytest.mark.parametrize(("response", "message", "status"), [
    (b"garbage\r\n\r\n", "malformed response", None),
    (b"", "connection closed without a response", None),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc", "malformed response", 200),
])
def test_probe_reports_broken_responses(response: bytes, message: str, status: int | None) -> None:
    async def check() -> None:
        async with TinyServer({"/x": response}) as server:
            await probe_get(backend_for(server.url), "/x", TIMEOUT)

    with pytest.raises(ProbeError, match=message) as caught:
        run(check())
    assert caught.value.status == status


def test_probe_cancellation_propagates_and_closes_the_socket() -> None:
    async def check() -> int:
        async with TinyServer(silent=True) as server:
            task = asyncio.ensure_future(probe_get(backend_for(server.url), "/health", 5.0))
            while not server.heads:  # the request is out; the probe now waits for an answer
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            while not server.hung_up:  # bounded by run()'s wait_for
                await asyncio.sleep(0.01)
            return server.hung_up

    assert run(check()) == 1


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    """A server context with a throwaway self-signed certificate for 127.0.0.1 (made by the openssl CLI)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available")
    folder: Path = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=10)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def test_probe_over_tls_honours_tls_verify(self_signed: ssl.SSLContext) -> None:
    async def check(verify: bool) -> int:
        async with TinyServer({"/health": reply(200)}, tls=self_signed) as server:
            return (await probe_get(backend_for(server.url, tls_verify=verify), "/health", TIMEOUT)).status

    assert run(check(False)) == 200
    with pytest.raises(ProbeError, match="TLS certificate rejected") as caught:
        run(check(True))
    assert caught.value.status is None


def test_probe_with_tls_to_a_plain_http_server_is_a_tls_failure() -> None:
    async def answer_plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(reply(400, b"plain http"))  # at once, as a plain server answers a TLS hello
        await writer.drain()
        writer.close()

    async def check() -> None:
        server = await asyncio.start_server(answer_plain, "127.0.0.1", 0)
        try:
            port = server.sockets[0].getsockname()[1]
            await probe_get(backend_for(f"https://127.0.0.1:{port}", tls_verify=False), "/health", TIMEOUT)
        finally:
            server.close()

    with pytest.raises(ProbeError, match="TLS failure") as caught:
        run(check())
    assert caught.value.status is None
