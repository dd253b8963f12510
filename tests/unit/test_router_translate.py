"""The router's candidates when some backends serve a client's API only through a translation
(llmproxy/fleet/router.py with routing.translate, backends[].apis), and the translation each attempt gets
(llmproxy.translate.translation_for), on Backend objects without sockets."""

from __future__ import annotations

import pytest

from llmproxy.catalogue import lookup
from llmproxy.config.model import BackendConfig
from llmproxy.errors import ProxyError
from llmproxy.fleet.backend import Backend
from llmproxy.fleet.credentials import Credentials
from llmproxy.fleet.router import Router
from llmproxy.translate import translation_for


def backend(name: str, kind: str = "vllm", apis: list[str] | None = None, models: tuple[str, ...] = ("m",)) -> Backend:
    config = BackendConfig(url=f"http://{name}", name=name, type=kind, models=list(models),
                           apis=None if apis is None else frozenset(apis))
    made = Backend(config=config, pool=None, name=name, host_header=b"", base_path=b"",
                   credentials=Credentials([], "bearer", lambda: 0.0), first_byte_timeout=1.0,
                   stream_idle_timeout=1.0, kind=kind)
    made.set_models([])
    return made


NATIVE = backend("native")  # vLLM: serves Responses and Messages itself
CHAT = backend("chat", apis=["chat"], models=("m", "only-chat"))
TGI = backend("tgi", kind="tgi")  # chat, completions, embeddings


def candidates(backends: list[Backend], path: str, model: str | None = "m", translate: str = "when_needed",
               now: float = 0.0) -> list[str]:
    return [b.name for b in Router(backends, {}).candidates(lookup(path), path, model, now, translate)]


def refusal(backends: list[Backend], path: str, model: str | None = "m", translate: str = "when_needed") -> str:
    with pytest.raises(ProxyError) as caught:
        candidates(backends, path, model, translate)
    return caught.value.kind


@pytest.mark.parametrize(("translate", "model", "expected"), [
    ("when_needed", "m", ["native"]),  # a native backend serves it: no translation
    ("when_needed", "only-chat", ["chat"]),  # no native backend serves the model: translated
    ("always", "m", ["native", "chat"]),
    ("always", "only-chat", ["chat"]),
    ("never", "m", ["native"]),
])
def test_responses_candidates_by_mode(translate, model, expected):
    assert candidates([NATIVE, CHAT], "/v1/responses", model, translate) == expected


def test_never_translates_nothing():
    assert refusal([CHAT, TGI], "/v1/responses", translate="never") == "path_not_served"
    assert refusal([NATIVE, CHAT], "/v1/responses", "only-chat", "never") == "model_not_found"
    assert candidates([CHAT, TGI], "/v1/chat/completions", translate="never") == ["chat", "tgi"]


def test_a_chat_only_fleet_serves_responses_and_messages_translated():
    assert candidates([CHAT, TGI], "/v1/responses") == ["chat", "tgi"]
    assert candidates([CHAT, TGI], "/v1/messages") == ["chat", "tgi"]


def test_apis_narrows_what_a_backend_serves():
    tgi_chat = backend("tgi-chat", kind="tgi", apis=["chat"])
    assert candidates([TGI], "/v1/completions") == ["tgi"]
    assert refusal([tgi_chat], "/v1/completions") == "path_not_served"
    assert refusal([tgi_chat], "/v1/embeddings") == "path_not_served"
    assert candidates([tgi_chat], "/v1/responses") == ["tgi-chat"]
    completions_only = backend("completions", apis=["completions"])
    for path in ("/v1/messages", "/v1/responses", "/v1/chat/completions"):
        assert refusal([completions_only], path) == "path_not_served"


def test_down_backends_are_left_out_of_the_translated_ones_too():
    down = backend("down", apis=["chat"])
    down.healthy = False
    assert candidates([down, CHAT], "/v1/responses") == ["chat"]


def test_when_every_native_backend_is_down_a_translation_to_an_available_one_is_taken():
    native = backend("native-down")
    native.healthy = False
    assert candidates([native, CHAT], "/v1/responses") == ["chat"]
    CHAT.ejected_until = 10.0
    try:
        assert candidates([native, CHAT], "/v1/responses", now=5.0) == ["native-down"]  # all down: the native
    finally:
        CHAT.ejected_until = 0.0


@pytest.mark.parametrize(("path", "backend_name", "mode", "plan"), [
    ("/v1/responses", "native", "when_needed", None),
    ("/v1/responses", "native", "always", "responses->chat"),
    ("/v1/responses", "chat", "when_needed", "responses->chat"),
    ("/v1/responses", "chat", "never", None),
    ("/v1/messages", "tgi", "when_needed", "messages->chat"),
    ("/v1/chat/completions", "native", "always", None),  # always translates into chat only: never chat->messages
    ("/v1/chat/completions", "chat", "always", None),  # no API to translate chat to on it
    ("/v1/completions", "chat", "always", None),  # no translation exists for completions
])
def test_the_translation_of_each_attempt(path, backend_name, mode, plan):
    chosen = {"native": NATIVE, "chat": CHAT, "tgi": TGI}[backend_name]
    translation = translation_for(lookup(path), chosen, mode)
    assert (translation.name if translation is not None else None) == plan
