"""The catalogue: the kinds of backend the proxy knows, and every API path it forwards, one row each.

A backend kind is a row of KINDS: how to recognise it, how to probe its health and its load. An endpoint
is a row of ENDPOINTS: its API family, the kinds that serve it, the metering dialect its responses are
read in (an endpoint without one is not a generation: its records carry no tokens), and whether it
streams by default (or always). The router, the metering
plan and the reading of request bodies all look here, so a new endpoint is one row (plus a meter when it
speaks a new dialect), and a new kind is one row of KINDS plus its name in the endpoints it serves.
Wire facts behind each row: docs/protocols.md §2-4.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmproxy.metering.dialects import (
    ANTHROPIC_MESSAGES_SSE,
    LLAMACPP_COMPLETION_SSE,
    OLLAMA_NDJSON,
    OPENAI_CHAT_SSE,
    OPENAI_COMPLETIONS_SSE,
    OPENAI_EMBEDDINGS,
    OPENAI_RESPONSES_SSE,
    SGLANG_GENERATE_SSE,
    TGI_GENERATE_SSE,
)

AUTO = "auto"  # a backend whose kind is not known yet: detected by probing it


@dataclass(frozen=True, slots=True)
class Kind:
    """A kind of backend server and how to talk to it outside of requests."""

    name: str
    health_path: str  # GET answered 2xx while it serves
    # Detection: GET `path` answers 200 with a JSON object holding `key` (a string when `key_is_str`).
    detect_path: str | None
    detect_key: str = ""
    key_is_str: bool = True
    # Queue depth: Prometheus samples on GET /metrics whose sum is requests waiting + running.
    load_metrics: frozenset[str] = frozenset()
    # The API families (Endpoint.api) whose prompt its tokenizer endpoint counts (fleet/tokenizer.py asks it).
    tokenizes: frozenset[str] = frozenset()
    kv_metric: str | None = None  # KV-cache use, 0..1, on GET /metrics
    # It closes its connection after a streamed response, whatever its headers say: such a connection is not
    # pooled (reusing it would fail as stale, every time).
    closes_after_stream: bool = False
    # The API families (FAMILIES) it serves under /v1, unless its backend's `apis:` says otherwise.
    apis: frozenset[str] = frozenset({"chat", "completions", "embeddings"})
    # Its chat streams take stream_options.continuous_usage_stats: usage on every chunk, so a translated
    # Messages stream's message_start can carry the prompt's count.
    continuous_usage: bool = False
    # How its credential is sent: "bearer" (Authorization: Bearer) or "x-api-key" with anthropic-version.
    auth: str = "bearer"
    # Where it documents its routes (OpenAPI): which of the API families a release serves is read there (an
    # older vLLM has no /v1/messages); None, or no answer: `apis` as above.
    openapi_path: str | None = None


# Detection tries the kinds in this order: vLLM's /version and TGI's /info both carry "version" too, and
# only Ollama answers /api/version. A server that answers none of them is a generic OpenAI-compatible one.
_OPENAI_APIS = frozenset({"chat", "completions", "embeddings"})
KINDS: dict[str, Kind] = {kind.name: kind for kind in (
    Kind("ollama", "/api/version", "/api/version", "version", apis=_OPENAI_APIS | {"responses", "messages"}),
    Kind("tgi", "/health", "/info", "model_id", key_is_str=False, openapi_path="/api-doc/openapi.json",
         load_metrics=frozenset({"tgi_queue_size", "tgi_batch_current_size"}),
         tokenizes=frozenset({"openai-chat", "openai-completions", "tgi-generate"})),
    Kind("sglang", "/health", "/get_model_info", "model_path",
         load_metrics=frozenset({"sglang:num_queue_reqs", "sglang:num_running_reqs"}),
         kv_metric="sglang:token_usage", continuous_usage=True, openapi_path="/openapi.json"),
    # llama.cpp's llama-server: its queue gauges need --metrics (else /metrics answers 501).
    Kind("llamacpp", "/health", "/props", "default_generation_settings", key_is_str=False,
         load_metrics=frozenset({"llamacpp:requests_processing", "llamacpp:requests_deferred"}),
         tokenizes=frozenset({"openai-chat", "openai-completions", "openai-embeddings", "llamacpp-completion",
                              "llamacpp-embedding"}),
         closes_after_stream=True, apis=_OPENAI_APIS | {"messages"}),
    Kind("vllm", "/health", "/version", "version",
         load_metrics=frozenset({"vllm:num_requests_waiting", "vllm:num_requests_running"}),
         tokenizes=frozenset({"openai-chat", "openai-completions"}), kv_metric="vllm:kv_cache_usage_perc",
         apis=_OPENAI_APIS | {"responses", "messages"}, continuous_usage=True, openapi_path="/openapi.json"),
    Kind("openai", "/v1/models", None, apis=_OPENAI_APIS | {"responses"}),
    # Anthropic's own API (api.anthropic.com, or a gateway in front of it): Messages only, keyed by x-api-key.
    # Never detected: declared with `type: anthropic`.
    Kind("anthropic", "/v1/models", None, apis=frozenset({"messages"}), auth="x-api-key"),
)}
BACKEND_KINDS = tuple(KINDS)
GENERIC_KIND = "openai"
ANY_KIND = frozenset(BACKEND_KINDS)
# The client APIs a backend may serve or be translated to, as `backends[].apis` names them.
FAMILIES = ("chat", "completions", "responses", "messages", "embeddings")
ALL_FAMILIES = frozenset(FAMILIES)
# The translations the proxy can make (translate/): a client's API family -> the backend families it can be
# translated to, in order of preference.
TRANSLATIONS: dict[str, tuple[str, ...]] = {"messages": ("chat",), "responses": ("chat",), "chat": ("messages",)}
# routing.translate: translate only when no backend serves the client's API natively (the default), whenever
# a translation exists into an API the chosen backend serves, or never.
TRANSLATE_MODES = ("when_needed", "always", "never")

# Whether a response streams: as the body's "stream" says (default false), unless it says false (native
# Ollama), or always (TGI's /generate_stream).
STREAMS_IF_ASKED, STREAMS_UNLESS_DECLINED, STREAMS_ALWAYS = "if_asked", "unless_declined", "always"
# The shape of the errors the proxy itself answers on an endpoint: its clients' API's (their SDKs parse them).
OPENAI_ERRORS, ANTHROPIC_ERRORS = "openai", "anthropic"


@dataclass(frozen=True, slots=True)
class Endpoint:
    api: str  # the API family: "openai-chat", "tgi-generate", "ollama-native", ...
    kinds: frozenset[str]  # the backend kinds that serve it
    dialect: str | None = None  # the metering dialect of its responses (llmproxy.metering); None: not metered
    streams: str = STREAMS_IF_ASKED
    usage_option: bool = False  # OpenAI's stream_options.include_usage: the proxy may ask for usage
    # A backend of unknown kind (AUTO) may serve it and is metered as if it did. False for a path that
    # means a generation only on one kind (TGI's `/`): metering anything else would misread it.
    guess_unknown_kind: bool = True
    errors: str = OPENAI_ERRORS
    # Kinds that serve this path as an API of their own (SGLang's /generate is not TGI's): their row instead.
    variants: tuple[tuple[str, Endpoint], ...] = ()
    # One of FAMILIES: which backends serve it is their `apis` (a kind's default, or configured), not `kinds`.
    family: str | None = None
    # A family a backend must also serve (by its `apis`) to get this path: count_tokens belongs to Messages.
    requires: str | None = None

    def served_by(self, kind: str) -> bool:
        """A backend of `kind` serves this path (for a family: by its kind's defaults; Backend.serves_endpoint
        knows its configured `apis`)."""
        if self.family is not None:
            return kind == AUTO or (kind in KINDS and self.family in KINDS[kind].apis)
        return kind in self.kinds or kind == AUTO

    def on(self, kind: str) -> Endpoint:
        """This endpoint as a backend of `kind` serves it (its variant for that kind, if any)."""
        for name, variant in self.variants:
            if name == kind:
                return variant
        return self

    def dialect_on(self, kind: str) -> str | None:
        """The metering dialect of this endpoint's responses from a backend of `kind`; None: not metered."""
        if self.variants:
            variant = self.on(kind)
            if variant is not self:
                return variant.dialect_on(kind)
        if self.dialect is None:
            return None
        if kind == AUTO:
            return self.dialect if self.guess_unknown_kind else None
        return self.dialect if kind in self.kinds or self.family is not None else None


_OLLAMA, _TGI, _LLAMACPP, _SGLANG = (frozenset({name}) for name in ("ollama", "tgi", "llamacpp", "sglang"))
CHAT = Endpoint("openai-chat", ANY_KIND, OPENAI_CHAT_SSE, usage_option=True, family="chat")
MESSAGES = Endpoint("anthropic-messages", ANY_KIND, ANTHROPIC_MESSAGES_SSE, errors=ANTHROPIC_ERRORS, family="messages")
# The path of each family.
FAMILY_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "responses": "/v1/responses",
                "messages": "/v1/messages", "embeddings": "/v1/embeddings"}
# OpenAI's paths without /v1 (a client whose base URL lacks it): llama.cpp serves them, and so may any server
# of unknown make; vLLM, SGLang, TGI and Ollama answer 404.
_UNVERSIONED_KINDS = frozenset({"llamacpp", "openai"})
# llama.cpp's native completion (docs/protocols.md §10.2): tokens_evaluated / tokens_predicted on its last chunk.
_LLAMACPP_COMPLETION = Endpoint("llamacpp-completion", _LLAMACPP, LLAMACPP_COMPLETION_SSE)
# Its /infill answers in the same format, but its prompt is input_prefix, input_suffix, input_extra and prompt
# framed by the model's FIM tokens: an API of its own, which /tokenize cannot count from `prompt` alone (a cut
# infill stream is estimated, not "counted" as its often empty `prompt`).
_LLAMACPP_INFILL = Endpoint("llamacpp-infill", _LLAMACPP, LLAMACPP_COMPLETION_SSE)
# llama.cpp's native embeddings report no usage: metered as an embedding, the record is estimated or counted.
_LLAMACPP_EMBEDDING = Endpoint("llamacpp-embedding", _LLAMACPP, OPENAI_EMBEDDINGS)
_LLAMACPP_NATIVE = Endpoint("llamacpp-native", _LLAMACPP)
_SGLANG_NATIVE = Endpoint("sglang-native", _SGLANG)
ENDPOINTS: dict[str, Endpoint] = {
    # The API families: served by the backends whose `apis` (their kind's by default) name them.
    "/v1/chat/completions": CHAT,
    "/v1/completions": Endpoint("openai-completions", ANY_KIND, OPENAI_COMPLETIONS_SSE, usage_option=True,
                                family="completions"),
    "/v1/responses": Endpoint("openai-responses", ANY_KIND, OPENAI_RESPONSES_SSE, family="responses"),
    # Anthropic's Messages API (Claude Code).
    "/v1/messages": MESSAGES,
    # Counts, generates nothing: not billed. Only for backends that serve Messages (by their `apis`).
    "/v1/messages/count_tokens": Endpoint("anthropic-count-tokens", frozenset({"vllm", "llamacpp", "anthropic"}),
                                          errors=ANTHROPIC_ERRORS, requires="messages"),
    "/v1/embeddings": Endpoint("openai-embeddings", ANY_KIND, OPENAI_EMBEDDINGS, family="embeddings"),
    "/chat/completions": Endpoint("openai-chat", _UNVERSIONED_KINDS, OPENAI_CHAT_SSE, usage_option=True),
    # llama.cpp's /completions is its native completion, not OpenAI's.
    "/completions": Endpoint("openai-completions", _UNVERSIONED_KINDS, OPENAI_COMPLETIONS_SSE, usage_option=True,
                             variants=(("llamacpp", _LLAMACPP_COMPLETION),)),
    "/embeddings": Endpoint("openai-embeddings", _UNVERSIONED_KINDS, OPENAI_EMBEDDINGS,
                            variants=(("llamacpp", _LLAMACPP_EMBEDDING),)),
    # TGI's and SGLang's /generate share a path, not a format. A backend of unknown kind is read as TGI.
    "/generate": Endpoint("tgi-generate", _TGI | _SGLANG, TGI_GENERATE_SSE,
                          variants=(("sglang", Endpoint("sglang-generate", _SGLANG, SGLANG_GENERATE_SSE)),)),
    "/generate_stream": Endpoint("tgi-generate", _TGI, TGI_GENERATE_SSE, STREAMS_ALWAYS),
    # TGI's compat route: /generate or /generate_stream by the body's "stream".
    "/": Endpoint("tgi-generate", _TGI, TGI_GENERATE_SSE, guess_unknown_kind=False),
    "/info": Endpoint("tgi-native", _TGI),
    "/chat_tokenize": Endpoint("tgi-native", _TGI),
    "/tokenize": Endpoint("tokenizer", frozenset({"vllm", "tgi", "llamacpp"})),
    "/detokenize": Endpoint("tokenizer", frozenset({"vllm", "tgi", "llamacpp"})),
    "/completion": _LLAMACPP_COMPLETION,
    "/infill": _LLAMACPP_INFILL,
    "/embedding": _LLAMACPP_EMBEDDING,
    "/apply-template": _LLAMACPP_NATIVE,
    "/props": _LLAMACPP_NATIVE,
    "/slots": _LLAMACPP_NATIVE,
    "/lora-adapters": _LLAMACPP_NATIVE,
    "/get_model_info": _SGLANG_NATIVE,
    "/get_server_info": _SGLANG_NATIVE,
    "/model_info": _SGLANG_NATIVE,  # the newer names of the two above
    "/server_info": _SGLANG_NATIVE,
    "/health_generate": _SGLANG_NATIVE,
    "/flush_cache": _SGLANG_NATIVE,
    "/abort_request": _SGLANG_NATIVE,
    "/api/chat": Endpoint("ollama-chat", _OLLAMA, OLLAMA_NDJSON, STREAMS_UNLESS_DECLINED),
    "/api/generate": Endpoint("ollama-generate", _OLLAMA, OLLAMA_NDJSON, STREAMS_UNLESS_DECLINED),
}
# Paths under a prefix that only one kind serves, whatever follows it.
# llama.cpp's /slots/<id>?action=save|restore|erase acts on one slot of one server.
PREFIXES: tuple[tuple[str, Endpoint], ...] = (("/api/", Endpoint("ollama-native", _OLLAMA)),
                                              ("/slots/", _LLAMACPP_NATIVE))
# Any other path: forwarded to any backend, not metered.
OTHER = Endpoint("other", ANY_KIND)


def lookup(path: str) -> Endpoint:
    """The catalogue row of a request path (without its query); OTHER when the catalogue has none.

    A trailing slash names the same endpoint ("/v1/chat/completions/").
    """
    endpoint = ENDPOINTS.get(path)
    if endpoint is not None:
        return endpoint
    if len(path) > 1 and path.endswith("/"):
        endpoint = ENDPOINTS.get(path.rstrip("/") or "/")
        if endpoint is not None:
            return endpoint
    for prefix, native in PREFIXES:
        if path.startswith(prefix):
            return native
    return OTHER


def error_shape(target: bytes | None) -> str:
    """The shape of the proxy's own errors for a request target (path and query): its endpoint's, or OpenAI's
    when the target is not known (a request refused before its head could be read)."""
    if target is None:
        return OPENAI_ERRORS
    return lookup(target.partition(b"?")[0].decode("latin-1")).errors
