"""Backend state, model routing and health verdicts on Backend objects, without sockets.

The balancing strategies are tested in test_balancer.py.
"""

from __future__ import annotations

import asyncio
import errno
import os
from types import SimpleNamespace

import pytest

from llmproxy.catalogue import lookup
from llmproxy.config.model import BackendConfig, HealthCheckConfig, PassiveHealthConfig
from llmproxy.errors import ProxyError
from llmproxy.fleet.backend import TTFT_FADE, Backend, is_pattern
from llmproxy.fleet.credentials import Credentials
from llmproxy.fleet.health import HealthMonitor
from llmproxy.fleet.router import Router


def backend(name: str, weight: int = 1, kind: str = "vllm", models: list[str] | None = None) -> Backend:
    config = BackendConfig(url=f"http://{name}", name=name, weight=weight, type=kind, models=models)
    made = Backend(config=config, pool=None, name=name, host_header=b"", base_path=b"",
                   credentials=Credentials([], "bearer", lambda: 0.0),
                   first_byte_timeout=1.0, stream_idle_timeout=1.0, kind=kind, weight=weight)
    if models is not None:
        made.model_patterns = tuple(m for m in models if is_pattern(m))
        made.set_models([{"id": m, "object": "model"} for m in models if not is_pattern(m)])
    return made


# --- TTFT estimate ------------------------------------------------------------------------------------------


def test_a_ttft_estimate_rises_at_once_falls_gradually_and_fades_when_idle():
    b = backend("b")
    b.observe_ttft(0.010, 100.0)
    b.observe_ttft(0.500, 100.1)
    assert b.ttft_ewma == 0.500  # peak: a slowdown counts at once
    b.observe_ttft(0.010, 100.2)
    assert 0.010 < b.ttft_ewma < 0.500  # one fast answer does not erase it
    assert b.ttft_estimate(100.2 + 3 * TTFT_FADE) < 0.05 * b.ttft_ewma  # idle: tried again


# --- routing ------------------------------------------------------------------------------------------------


def candidates(router: Router, path: str, model: str | None, now: float) -> list[Backend]:
    return router.candidates(lookup(path), path, model, now)


def test_candidates_by_model_alias_and_path():
    vllm = backend("vllm", models=["qwen"])
    ollama = backend("ollama", kind="ollama", models=["llama3.2:latest"])
    router = Router([vllm, ollama], {"gpt-4o": "qwen"})
    assert candidates(router, "/v1/chat/completions", router.resolve_model("gpt-4o"), 0) == [vllm]
    assert candidates(router, "/v1/chat/completions", "llama3.2", 0) == [ollama]  # Ollama's implicit :latest
    assert candidates(router, "/api/tags", None, 0) == [ollama]
    assert candidates(router, "/v1/embeddings", None, 0) == [vllm, ollama]
    with pytest.raises(ProxyError) as missing:
        candidates(router, "/v1/chat/completions", "gpt-5", 0)
    assert missing.value.spec.status == 404 and missing.value.spec.code == "model_not_found"
    with pytest.raises(ProxyError) as nobody:
        candidates(router, "/generate_stream", None, 0)
    assert nobody.value.kind == "path_not_served"


def test_a_backend_whose_models_are_unknown_may_serve_anything():
    known, unknown = backend("known", models=["a"]), backend("unknown")
    router = Router([known, unknown], {})
    assert candidates(router, "/v1/completions", "b", 0) == [unknown]


def test_unavailable_backends_are_skipped_unless_all_are():
    a, b = backend("a"), backend("b")
    a.healthy = False
    router = Router([a, b], {})
    assert candidates(router, "/v1/completions", None, 0) == [b]
    b.ejected_until = 10.0
    assert candidates(router, "/v1/completions", None, 5.0) == [a, b]  # all down: keep trying them
    assert candidates(router, "/v1/completions", None, 11.0) == [b]


def test_models_listing_is_the_union_with_aliases_and_configured_lists_filter_reported_cards():
    a = backend("a", models=["qwen"])
    a.set_models([{"id": "qwen", "object": "model", "max_model_len": 32768}, {"id": "other", "object": "model"}])
    b = backend("b")
    b.set_models([{"id": "llama", "object": "model"}, {"id": "qwen", "object": "model", "owned_by": "b"}])
    listing = Router([a, b], {"gpt-4o": "qwen", "dangling": "nowhere"}).model_cards(0)
    assert [c["id"] for c in listing] == ["qwen", "llama", "gpt-4o"]
    assert listing[0]["max_model_len"] == 32768 and listing[2]["max_model_len"] == 32768
    assert listing[2]["root"] == "qwen"


@pytest.mark.parametrize(("patterns", "model", "served"), [
    (["*"], "anything/at-all:7b", True),
    (["qwen2.5-*"], "qwen2.5-coder-7b", True),
    (["qwen2.5-*"], "qwen3-8b", False),
    (["llama3.?"], "llama3.2", True),
    (["llama3.?"], "llama3.10", False),
    (["exact", "lora-[ab]"], "lora-b", True),
    (["exact", "lora-[ab]"], "lora-c", False),
    (["Qwen*"], "qwen-7b", False),  # model names are case-sensitive
])
def test_models_may_be_glob_patterns(patterns: list[str], model: str, served: bool):
    assert backend("b", models=patterns).serves(model) is served


def test_patterns_list_only_the_concrete_models_reported_that_they_match():
    b = backend("b", models=["pinned", "qwen2.5-*"])
    b.set_models([{"id": "qwen2.5-7b", "object": "model"}, {"id": "llama3", "object": "model"}])
    assert [card["id"] for card in b.model_cards] == ["pinned", "qwen2.5-7b"]
    assert Router([b], {}).model_cards(0) == b.model_cards
    assert backend("c", models=["*"]).model_cards == []  # nothing reported yet: nothing to list


# --- health verdicts ----------------------------------------------------------------------------------------


def _monitor(backends: list[Backend], **passive) -> tuple[HealthMonitor, SimpleNamespace]:
    events = SimpleNamespace(ejected=[])
    events.backend_ejected = events.ejected.append
    config = HealthCheckConfig(healthy_threshold=2, unhealthy_threshold=3,
                               passive=PassiveHealthConfig(**{"consecutive_failures": 3, "base_ejection_time": 10.0,
                                                              "max_ejection_time": 25.0, **passive}))
    return HealthMonitor(backends, config, False, events), events


def test_probe_thresholds_take_a_backend_out_and_back():
    async def run() -> None:
        b = backend("b")
        monitor, _ = _monitor([b])
        for passed, healthy in [(False, True), (False, True), (True, True), (False, True), (False, True),
                                (False, False), (True, False), (True, True)]:
            monitor._probe_result(b, passed, "" if passed else "status 503", first=False)
            assert b.healthy is healthy
        monitor._probe_result(b, False, "down", first=True)  # the very first probe decides alone
        assert not b.healthy

    asyncio.run(run())


def test_passive_ejection_grows_is_capped_and_never_takes_out_too_many():
    async def run() -> None:
        a, b, c, d = (backend(n) for n in "abcd")
        monitor, events = _monitor([a, b, c, d], max_ejection_percent=50)
        loop = asyncio.get_running_loop()
        for _ in range(3):
            monitor.request_failed(a)
        assert events.ejected == ["a"] and 9.0 < a.ejected_until - loop.time() <= 10.0
        monitor.request_failed(a)  # failures while ejected do not extend it
        for victim in (b, c):
            for _ in range(3):
                monitor.request_failed(victim)
        assert events.ejected == ["a", "b"]  # 50 % of 4: c must keep serving
        a.ejected_until = 0.0  # a's time is up; it fails again: longer, then capped
        for _ in range(3):
            monitor.request_failed(a)
        assert 19.0 < a.ejected_until - loop.time() <= 20.0
        a.ejected_until = 0.0
        for _ in range(3):
            monitor.request_failed(a)
        assert 24.0 < a.ejected_until - loop.time() <= 25.0

    asyncio.run(run())


def test_a_success_resets_the_failure_run_and_recovery_seen_by_probes_un_ejects():
    async def run() -> None:
        a, b = backend("a"), backend("b")
        monitor, events = _monitor([a, b])
        monitor.request_failed(a)
        monitor.request_failed(a)
        monitor.request_succeeded(a)
        monitor.request_failed(a)
        assert events.ejected == []
        for _ in range(2):
            monitor.request_failed(a)
        assert a.ejected_until > 0
        for _ in range(3):
            monitor._probe_result(a, False, "refused", first=False)  # the probes see it die...
        for _ in range(2):
            monitor._probe_result(a, True, "", first=False)  # ...and come back: it was restarted
        assert a.available(asyncio.get_running_loop().time())

    asyncio.run(run())


@pytest.mark.parametrize(("error", "counted"), [(errno.EMFILE, False), (errno.ENFILE, False),
                                                 (errno.ECONNREFUSED, True)])
def test_a_probe_the_proxy_cannot_send_for_lack_of_descriptors_is_no_verdict_on_the_backend(
        monkeypatch, error, counted):
    async def no_socket(*args, **kwargs):
        raise OSError(error, os.strerror(error))

    async def run() -> None:
        b = backend("b")
        monitor, _ = _monitor([b])
        monkeypatch.setattr(asyncio, "open_connection", no_socket)
        for _ in range(3):  # unhealthy_threshold
            await monitor._refresh(b, with_models=False)
        assert b.probe_failures == (3 if counted else 0)
        assert b.healthy is not counted

    asyncio.run(run())
