"""The catalogue: which kinds serve a path, how its responses are metered, whether it streams by default."""

from __future__ import annotations

import pytest

from llmproxy.catalogue import (
    ANTHROPIC_ERRORS,
    ANY_KIND,
    AUTO,
    BACKEND_KINDS,
    ENDPOINTS,
    KINDS,
    OPENAI_ERRORS,
    OTHER,
    STREAMS_ALWAYS,
    STREAMS_IF_ASKED,
    STREAMS_UNLESS_DECLINED,
    error_shape,
    lookup,
)
from llmproxy.metering.dialects import (
    ANTHROPIC_MESSAGES_SSE,
    LLAMACPP_COMPLETION_SSE,
    OLLAMA_NDJSON,
    OPENAI_CHAT_SSE,
    OPENAI_COMPLETIONS_SSE,
    OPENAI_EMBEDDINGS,
    OPENAI_RESPONSES_SSE,
    SGLANG_GENERATE_SSE,
    SPECS,
    TGI_GENERATE_SSE,
)


@pytest.mark.parametrize(("path", "kind", "expected"), [
    ("/v1/chat/completions", AUTO, OPENAI_CHAT_SSE),
    ("/v1/chat/completions", "vllm", OPENAI_CHAT_SSE),
    ("/v1/chat/completions/", AUTO, OPENAI_CHAT_SSE),
    ("/v1/completions", "tgi", OPENAI_COMPLETIONS_SSE),
    ("/v1/responses", "vllm", OPENAI_RESPONSES_SSE),
    ("/v1/responses", "ollama", OPENAI_RESPONSES_SSE),
    ("/v1/responses", "tgi", OPENAI_RESPONSES_SSE),
    ("/generate_stream", AUTO, TGI_GENERATE_SSE),
    ("/generate", "tgi", TGI_GENERATE_SSE),
    ("/generate_stream", "vllm", None),
    ("/api/chat", AUTO, OLLAMA_NDJSON),
    ("/api/generate", "ollama", OLLAMA_NDJSON),
    ("/api/chat", "vllm", None),
    ("/", "tgi", TGI_GENERATE_SSE),
    ("/", AUTO, None),  # only a backend known to be TGI makes `/` a generation
    ("/v1/embeddings", AUTO, OPENAI_EMBEDDINGS),
    ("/v1/models", "vllm", None),
    # OpenAI's paths without /v1: llama.cpp serves them (its /completions is its native completion).
    ("/chat/completions", AUTO, OPENAI_CHAT_SSE),
    ("/chat/completions", "llamacpp", OPENAI_CHAT_SSE),
    ("/chat/completions", "vllm", None),
    ("/completions", "openai", OPENAI_COMPLETIONS_SSE),
    ("/completions", "llamacpp", LLAMACPP_COMPLETION_SSE),
    ("/completion", "llamacpp", LLAMACPP_COMPLETION_SSE),
    ("/infill", AUTO, LLAMACPP_COMPLETION_SSE),
    ("/embedding", "llamacpp", OPENAI_EMBEDDINGS),  # no usage in its answer: estimated, then counted
    ("/embeddings", "llamacpp", OPENAI_EMBEDDINGS),
    ("/props", "llamacpp", None),
    # TGI's and SGLang's /generate: one path, two formats.
    ("/generate", "sglang", SGLANG_GENERATE_SSE),
    ("/generate", AUTO, TGI_GENERATE_SSE),
    ("/get_model_info", "sglang", None),
    ("/health", AUTO, None),
    ("/v1/messages", "vllm", ANTHROPIC_MESSAGES_SSE),
    ("/v1/messages", "ollama", ANTHROPIC_MESSAGES_SSE),
    # An API family's path is read in its own format whatever the kind: `apis:` may give it to any backend.
    ("/v1/messages", "tgi", ANTHROPIC_MESSAGES_SSE),
    ("/v1/messages/count_tokens", "vllm", None),  # counts, generates nothing
])
def test_the_metering_dialect_of_a_path_depends_on_the_backend_kind(path: str, kind: str, expected: str | None):
    assert lookup(path).dialect_on(kind) == expected


@pytest.mark.parametrize(("path", "kinds"), [
    ("/api/chat", {"ollama"}), ("/api/tags", {"ollama"}), ("/generate_stream", {"tgi"}), ("/", {"tgi"}),
    ("/tokenize", {"vllm", "tgi", "llamacpp"}), ("/generate", {"tgi", "sglang"}), ("/slots", {"llamacpp"}),
    ("/get_server_info", {"sglang"}), ("/chat/completions", {"llamacpp", "openai"}),
    # engine-specific paths must not reach another engine of a mixed fleet: llama.cpp's slot actions and LoRA
    # adapters, SGLang's newer info names and cache controls
    ("/slots/0", {"llamacpp"}), ("/lora-adapters", {"llamacpp"}), ("/server_info", {"sglang"}),
    ("/model_info", {"sglang"}), ("/flush_cache", {"sglang"}),
    ("/v1/chat/completions", set(BACKEND_KINDS) - {"anthropic"}), ("/v1/models/x", set(BACKEND_KINDS)),
])
def test_native_paths_are_served_by_their_kinds_only(path: str, kinds: set[str]):
    endpoint = lookup(path)
    assert {kind for kind in BACKEND_KINDS if endpoint.served_by(kind)} == kinds
    assert endpoint.served_by(AUTO)  # a backend of unknown kind may serve anything until detected


@pytest.mark.parametrize(("path", "streams"), [
    ("/v1/chat/completions", STREAMS_IF_ASKED), ("/api/chat", STREAMS_UNLESS_DECLINED),
    ("/api/generate", STREAMS_UNLESS_DECLINED), ("/generate_stream", STREAMS_ALWAYS), ("/generate", STREAMS_IF_ASKED),
    ("/anything/else", STREAMS_IF_ASKED),
])
def test_whether_a_path_streams_by_default(path: str, streams: str):
    assert lookup(path).streams == streams


def test_an_unknown_path_is_forwarded_to_any_backend_unmetered():
    assert lookup("/v2/whatever") is OTHER
    assert OTHER.kinds == ANY_KIND and OTHER.dialect is None


def test_a_kind_with_a_format_of_its_own_reads_its_variant_of_the_path():
    generate = lookup("/generate")
    assert generate.on("sglang").api == "sglang-generate" and generate.on("tgi") is generate
    assert lookup("/completions").on("llamacpp").api == "llamacpp-completion"


@pytest.mark.parametrize(("target", "shape"), [
    (b"/v1/messages", ANTHROPIC_ERRORS),
    (b"/v1/messages?beta=true", ANTHROPIC_ERRORS),  # Claude Code's path: the query is not part of it
    (b"/v1/messages/count_tokens", ANTHROPIC_ERRORS),
    (b"/v1/chat/completions", OPENAI_ERRORS),
    (b"/api/chat", OPENAI_ERRORS),
    (None, OPENAI_ERRORS),  # a request refused before its target was known
])
def test_the_shape_of_the_proxys_own_errors_follows_the_path_of_the_target(target: bytes | None, shape: str):
    assert error_shape(target) == shape


def test_llamacpps_tokenizer_counts_a_completions_prompt_but_not_an_infills():
    # /infill's prompt is input_prefix + input_suffix (+ input_extra) + prompt in FIM tokens: counting `prompt`
    # alone (often "") would record a cut infill stream as exactly counted at next to nothing.
    tokenizes = KINDS["llamacpp"].tokenizes
    assert lookup("/completion").api in tokenizes and lookup("/completions").on("llamacpp").api in tokenizes
    assert lookup("/infill").api not in tokenizes
    assert lookup("/infill").dialect_on("llamacpp") == lookup("/completion").dialect_on("llamacpp")


def test_every_row_names_known_kinds_and_dialects():
    for path, endpoint in ENDPOINTS.items():
        assert endpoint.kinds <= ANY_KIND, path
        for kind, variant in endpoint.variants:
            assert kind in endpoint.kinds and variant.kinds == {kind}, path
        assert endpoint.dialect is None or endpoint.dialect in SPECS, path
        assert endpoint.streams in (STREAMS_IF_ASKED, STREAMS_UNLESS_DECLINED, STREAMS_ALWAYS), path


def test_kinds_are_listed_once_and_only_the_generic_one_and_anthropic_are_not_detected_by_a_probe():
    assert tuple(KINDS) == BACKEND_KINDS
    # openai is what answers no probe; anthropic (Anthropic's API) is only ever declared
    assert [kind.name for kind in KINDS.values() if kind.detect_path is None] == ["openai", "anthropic"]


@pytest.mark.parametrize(("kind", "apis"), [
    ("vllm", {"chat", "completions", "responses", "messages", "embeddings"}),
    ("tgi", {"chat", "completions", "embeddings"}),
    ("anthropic", {"messages"}),
])
def test_the_api_families_a_kind_serves_decide_who_serves_their_paths(kind: str, apis: set[str]):
    assert KINDS[kind].apis == apis
    served = {family for family, path in (("chat", "/v1/chat/completions"), ("messages", "/v1/messages"),
                                          ("responses", "/v1/responses"), ("embeddings", "/v1/embeddings"),
                                          ("completions", "/v1/completions")) if lookup(path).served_by(kind)}
    assert served == apis
