"""One backend: its pool, what it is (kind, models), and the live state the balancer and health use.

All the state here is written from the event loop only (probes, requests), so it needs no locking.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from time import monotonic

from llmproxy.catalogue import ALL_FAMILIES, KINDS, Endpoint
from llmproxy.config.model import BackendConfig, Config
from llmproxy.fleet.credentials import Credentials
from llmproxy.upstream.pool import UpstreamPool

# How fast a new TTFT sample replaces the estimate (seconds; time-based, so independent of traffic rate).
TTFT_SMOOTHING = 2.0
# How fast an unrefreshed TTFT estimate fades (seconds). A backend that stopped getting traffic because
# it looked slow sees its estimate shrink towards zero, so it is tried again and can prove it recovered.
TTFT_FADE = 10.0


def is_pattern(model: str) -> bool:
    """A `models:` entry that is a glob pattern ("*", "qwen2.5-*", "llama3.?"), not a model name."""
    return any(char in model for char in "*?[")


@dataclass(slots=True, eq=False)
class Backend:
    """A configured backend with its pool and live counters."""

    config: BackendConfig
    pool: UpstreamPool
    name: str
    host_header: bytes
    base_path: bytes
    credentials: Credentials  # its API keys, as header lines, rotated
    first_byte_timeout: float
    stream_idle_timeout: float
    kind: str  # vllm | tgi | ollama | openai, or "auto" until detection succeeds
    weight: int = 1
    in_flight: int = 0  # requests in progress, counted for the whole stream
    # What it serves: None = not known (yet), so it may serve anything.
    models: frozenset[str] | None = None
    model_patterns: tuple[str, ...] = ()  # the glob patterns of its `models:` list ("*", "qwen2.5-*")
    model_cards: list[dict] = field(default_factory=list)  # as /v1/models lists them
    # Active health (probes): the verdict and the run of results behind it.
    healthy: bool = True
    probe_passes: int = 0
    probe_failures: int = 0
    last_error: str = ""
    # Passive health (outlier ejection from live traffic).
    failures: int = 0  # consecutive failed requests
    ejected_until: float = 0.0  # loop time
    ejections: int = 0  # ejections in a row; each lasts longer
    # Balancing state.
    ttft_ewma: float = 0.0  # seconds, peak-sensitive EWMA of request sent -> first body byte
    ttft_at: float = 0.0  # when it was last updated (perf_counter)
    queue_depth: float | None = None  # requests waiting + running as the backend last reported them
    queue_depth_in_flight: int = 0  # our in-flight count when that report came
    kv_cache_usage: float | None = None  # KV-cache use, 0..1, as the backend last reported it
    wrr_current: int = 0  # smooth weighted round robin's running weight
    detected_apis: frozenset[str] | None = None  # the API families its OpenAPI document lists (None: not read)
    apis: frozenset[str] = ALL_FAMILIES  # the API families it serves natively (see _update_apis)
    anthropic_auth: bool = False  # its credential goes as x-api-key, with an anthropic-version (Anthropic's API)

    @classmethod
    def create(cls, config: BackendConfig, server: Config, clock: Callable[[], float] = monotonic) -> Backend:
        timeouts = server.server.timeouts
        default_port = 443 if config.scheme == "https" else 80
        host = f"[{config.host}]" if ":" in config.host else config.host
        host_header = host if config.port == default_port else f"{host}:{config.port}"
        backend = cls(
            config=config,
            pool=UpstreamPool(config, config.timeouts.connect or timeouts.connect, server.server.max_header_size),
            name=config.name,
            host_header=host_header.encode(),
            base_path=config.base_path.encode(),
            credentials=Credentials(config.keys, KINDS[config.type].auth if config.type in KINDS else "bearer",
                                    clock),
            first_byte_timeout=config.timeouts.first_byte or timeouts.first_byte,
            stream_idle_timeout=config.timeouts.stream_idle or timeouts.stream_idle,
            kind=config.type,
            weight=config.weight,
        )
        if config.models is not None:
            backend.model_patterns = tuple(m for m in config.models if is_pattern(m))
            backend.set_models([])
        return backend

    @property
    def closes_after_stream(self) -> bool:
        """Its kind closes the connection after every streamed response (llama.cpp): such a connection is not
        pooled, or the next request on it would fail as stale."""
        kind = KINDS.get(self.kind)
        return kind is not None and kind.closes_after_stream

    def __post_init__(self) -> None:
        self._update_apis()

    def set_kind(self, kind: str) -> None:
        """Its kind, once detected: what it serves follows."""
        self.kind = kind
        self._update_apis()

    def set_detected_apis(self, apis: frozenset[str] | None) -> None:
        """The API families its OpenAPI document lists (None: it publishes none)."""
        self.detected_apis = apis
        self._update_apis()

    def _update_apis(self) -> None:
        """The API families it serves: as configured, else as its OpenAPI document lists them, else its kind's
        (all of them while its kind is unknown). An attribute, read by every request's routing."""
        kind = KINDS.get(self.kind)
        self.apis = (self.config.apis if self.config.apis is not None
                     else self.detected_apis if self.detected_apis is not None
                     else ALL_FAMILIES if kind is None else kind.apis)
        self.anthropic_auth = kind is not None and kind.auth == "x-api-key"

    def serves_endpoint(self, endpoint: Endpoint) -> bool:
        """It serves the endpoint natively (no translation)."""
        family = endpoint.family
        if family is not None:
            return family in self.apis
        required = endpoint.requires
        return endpoint.served_by(self.kind) and (required is None or required in self.apis)

    def available(self, now: float) -> bool:
        """Healthy by the probes and not ejected by passive checks (`now` is loop time)."""
        return self.healthy and now >= self.ejected_until

    def serves(self, model: str) -> bool:
        models = self.models
        if models is None or model in models:
            return True
        if self.model_patterns and any(fnmatchcase(model, pattern) for pattern in self.model_patterns):
            return True  # a backend that takes any name (OpenRouter-like, Ollama pulling, LoRA adapters)
        # Ollama names carry a tag: "llama3.2" means "llama3.2:latest" to Ollama itself.
        if ":" in model:
            return model.endswith(":latest") and model[:-7] in models
        return model + ":latest" in models

    def set_models(self, cards: list[dict]) -> None:
        """Adopt a reported model list (or the configured one, which then filters the reported cards).

        A configured name is listed whether reported or not; a configured pattern lists the reported models
        it matches (only concrete names are listed: a client cannot ask for "qwen2.5-*").
        """
        configured = self.config.models
        if configured is not None:
            by_id = {card["id"]: card for card in cards}
            named = [by_id.get(m) or {"id": m, "object": "model", "created": 0, "owned_by": self.name}
                     for m in configured if not is_pattern(m)]
            listed = {card["id"] for card in named}
            patterns = self.model_patterns
            cards = named + [card for card in cards if card["id"] not in listed
                             and any(fnmatchcase(card["id"], pattern) for pattern in patterns)]
        self.model_cards = cards
        self.models = frozenset(card["id"] for card in cards)

    def observe_ttft(self, seconds: float, now: float) -> None:
        """Fold one time-to-first-token into the estimate: up at once on a slow one, down gradually."""
        if seconds >= self.ttft_ewma:
            self.ttft_ewma = seconds  # peak-sensitive: react to a slowdown now, not after many samples
        else:
            keep = math.exp(-(now - self.ttft_at) / TTFT_SMOOTHING) if self.ttft_at else 0.0
            self.ttft_ewma = self.ttft_ewma * keep + seconds * (1.0 - keep)
        self.ttft_at = now

    def ttft_estimate(self, now: float) -> float:
        """The TTFT estimate, faded by the time since it was last refreshed."""
        if not self.ttft_at:
            return 0.0
        return self.ttft_ewma * math.exp(-(now - self.ttft_at) / TTFT_FADE)

    def estimated_load(self) -> float:
        """Requests on the backend now: its last report, corrected by what we sent or finished since."""
        if self.queue_depth is None:
            return float(self.in_flight)
        return max(0.0, self.queue_depth + self.in_flight - self.queue_depth_in_flight)
