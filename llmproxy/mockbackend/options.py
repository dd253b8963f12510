"""Server-wide options of the mock backend and the per-request knobs that override them.

Knobs arrive as `x-mock-*` request headers because the proxy under test forwards headers untouched:
a test can steer one request through the proxy without reconfiguring anything.
"""

from __future__ import annotations

from dataclasses import dataclass

DIALECTS = ("vllm", "tgi", "ollama", "llamacpp", "sglang", "anthropic")
# The engines whose prefix caching the mock models and whose answers report its hits (options.prefix_cache_tokens)
PREFIX_CACHE_DIALECTS = ("vllm", "sglang", "llamacpp")

# The model each real server would report when the request does not name one.
DEFAULT_MODELS = {
    "vllm": "Qwen/Qwen2.5-7B-Instruct",
    "tgi": "HuggingFaceH4/zephyr-7b-beta",
    "ollama": "llama3.2:latest",
    "llamacpp": "qwen2.5-7b-instruct-q4_k_m.gguf",  # llama-server names the model by its file unless --alias
    "sglang": "Qwen/Qwen2.5-7B-Instruct",
    "anthropic": "claude-sonnet-4-5",  # Anthropic's own API (api.anthropic.com), by the alias clients use
}

# A backend must never be asked to hold more than this many events in one response: it bounds the
# work a typo in a header (x-mock-tokens: 10000000000) can cause.
MAX_TOKENS = 1_000_000


class BadRequest(Exception):
    """A request the mock refuses; answered with `status` in the dialect's error shape."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass
class MockOptions:
    dialect: str = "vllm"
    tokens: int = 16
    delay_ms: float = 0.0  # between two events of a stream
    first_byte_delay_ms: float = 0.0  # before the response head (and the first event)
    # None or "": the dialect's default (DEFAULT_MODELS); "a,b": serve both, the first is the default
    model: str | None = None
    fixtures_dir: str | None = None  # None: $LLMPROXY_FIXTURES_DIR, else <repo>/tests/fixtures/streams
    strict_models: bool = False  # answer a request naming an unserved model like the real server does
    # llama.cpp only: serve GET /metrics, as llama-server does when started with --metrics (else 501)
    metrics: bool = False
    # anthropic only: the x-api-key values accepted; empty accepts any non-empty key
    api_keys: tuple[str, ...] = ()
    # Routes this server lacks, as an older release of the engine does (answered 404, left out of its OpenAPI)
    without_routes: tuple[str, ...] = ()
    # The prefix-cache model (prefixcache.py; vllm, sglang and llamacpp): its capacity in tokens, 0 = off. When on,
    # a generation's first byte waits base_ttft_ms + prefill_us_per_token for each prompt token not found cached.
    prefix_cache_tokens: int = 0
    prefill_us_per_token: float = 50.0
    base_ttft_ms: float = 2.0

    def __post_init__(self) -> None:
        if self.dialect not in DIALECTS:
            raise ValueError(f"unknown dialect {self.dialect!r}; expected one of {', '.join(DIALECTS)}")
        if self.tokens < 0 or self.delay_ms < 0 or self.first_byte_delay_ms < 0:
            raise ValueError("tokens and delays must not be negative")
        self.api_keys = tuple(self.api_keys)  # a list from a caller must not be shared and mutated
        if any(not key for key in self.api_keys):  # an empty key would be the same as sending none
            raise ValueError("--api-key must not be empty")
        if self.model and not self.models:  # "," or " , ": a typo, not a request for the default
            raise ValueError(f"--model names no model: {self.model!r}")
        if self.prefix_cache_tokens < 0 or self.prefill_us_per_token < 0 or self.base_ttft_ms < 0:
            raise ValueError("--prefix-cache-tokens, --prefill-us-per-token and --base-ttft-ms must not be negative")
        if self.prefix_cache_tokens and self.dialect not in PREFIX_CACHE_DIALECTS:
            raise ValueError(f"--prefix-cache-tokens: the prefix-cache model is for {', '.join(PREFIX_CACHE_DIALECTS)}")

    @property
    def models(self) -> tuple[str, ...]:
        """The served models in the order given, duplicates dropped; the first is the default."""
        if not self.model:
            return (DEFAULT_MODELS[self.dialect],)
        names = (name.strip() for name in self.model.split(","))
        return tuple(dict.fromkeys(name for name in names if name))

    @property
    def model_name(self) -> str:
        """The default model: the one a request that names none gets."""
        return self.models[0]


@dataclass(slots=True)
class Knobs:
    """What one request asked of the mock, CLI defaults already applied. Delays are in seconds."""

    tokens: int
    delay: float
    first_byte_delay: float
    status: int | None = None
    retry_after: str | None = None
    stall_after: int | None = None
    error_after: int | None = None
    reset_after_bytes: int | None = None
    close_delimited: bool = False
    fixture: str | None = None
    gate: str | None = None
    cache_read: int | None = None  # prompt tokens served from the prefix cache (x-mock-cache-read), if given
    cache_write: int = 0  # prompt tokens written to a prompt cache (x-mock-cache-write, Anthropic usage only)


def _int(headers: dict[str, str], name: str, low: int, high: int) -> int | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}, got {value}")
    return value


def _ms(headers: dict[str, str], name: str, default_ms: float) -> float:
    raw = headers.get(name)
    if raw is None:
        return default_ms / 1000.0
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a number of milliseconds, got {raw!r}") from None
    if not 0 <= value <= 3_600_000:
        raise BadRequest(f"{name} must be between 0 and 3600000, got {raw}")
    return value / 1000.0


def parse_knobs(headers: dict[str, str], options: MockOptions) -> Knobs:
    """Return the knobs of one request (header names lower-case). Raises BadRequest on a bad value."""
    tokens = _int(headers, "x-mock-tokens", 0, MAX_TOKENS)
    return Knobs(
        tokens=options.tokens if tokens is None else tokens,
        delay=_ms(headers, "x-mock-delay-ms", options.delay_ms),
        first_byte_delay=_ms(headers, "x-mock-first-byte-delay-ms", options.first_byte_delay_ms),
        status=_int(headers, "x-mock-status", 100, 599),
        retry_after=headers.get("x-mock-retry-after"),
        stall_after=_int(headers, "x-mock-stall-after", 0, MAX_TOKENS),
        error_after=_int(headers, "x-mock-error-after", 0, MAX_TOKENS),
        reset_after_bytes=_int(headers, "x-mock-reset-after-bytes", 0, 1 << 40),
        close_delimited=headers.get("x-mock-close-delimited", "0").strip().lower() in ("1", "true", "yes"),
        fixture=headers.get("x-mock-fixture"),
        gate=headers.get("x-mock-gate"),
        cache_read=_int(headers, "x-mock-cache-read", 0, MAX_TOKENS),
        cache_write=_int(headers, "x-mock-cache-write", 0, MAX_TOKENS) or 0,
    )
