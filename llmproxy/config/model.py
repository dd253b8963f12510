"""The resolved configuration: plain dataclasses, every field with its default.

`llmproxy.config` turns YAML into these (validating every key); the rest of the proxy only reads them.
Durations are seconds (float), sizes are bytes (int).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

BUDGET_PERIODS = ("day", "week", "month")
RATE_LIMIT_STORES = ("memory", "redis")
STORE_ERROR_POLICIES = ("fail_open", "fail_closed")
# What may be retried on another backend, before any byte reached the client (routing.retry_on).
RETRY_CONDITIONS = ("connect_error", "reset", "timeout", "429", "500", "502", "503", "504")


@dataclass(slots=True)
class Timeouts:
    request_head: float = 10.0  # absolute deadline to receive a request head (slowloris)
    keepalive: float = 75.0  # idle client connection between requests
    body: float = 30.0  # request body: longest pause without progress
    write: float = 60.0  # client not draining a response: longest pause without progress
    connect: float = 5.0  # TCP (+TLS) connect to a backend
    first_byte: float = 300.0  # request sent -> first response byte (long prompts are slow)
    stream_idle: float = 300.0  # longest pause between two response chunks


@dataclass(slots=True)
class BackendTimeouts:
    """Per-backend overrides; None means "use server.timeouts"."""

    connect: float | None = None
    first_byte: float | None = None
    stream_idle: float | None = None


@dataclass(slots=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8000
    max_connections: int = 10000
    max_header_size: int = 32 * 1024  # whole request head -> 431
    max_request_line: int = 8 * 1024  # request target -> 414
    max_body_size: int = 10 * 1024 * 1024  # -> 413, judged from Content-Length first
    shutdown_timeout: float = 30.0  # SIGTERM: how long requests in flight may finish
    # SIGTERM: how long /ready answers 503 while the proxy still serves, before it stops accepting (set it to
    # the load balancer's probe period, so it stops sending first; Kubernetes: the readiness period)
    shutdown_delay: float = 0.0
    trusted_proxies: list[str] = field(default_factory=list)  # IPs or CIDRs
    workers: int = 1  # processes sharing the port (SO_REUSEPORT)
    timeouts: Timeouts = field(default_factory=Timeouts)


@dataclass(slots=True)
class BackendMetricsConfig:
    """The Prometheus samples of an engine's GET /metrics that say its load (for engines not built in)."""

    queued: list[str] = field(default_factory=list)  # requests waiting
    running: list[str] = field(default_factory=list)  # requests being served
    kv_cache: str | None = None  # KV-cache use, 0..1


@dataclass(slots=True)
class DiscoveryConfig:
    """A backends[] entry that stands for a set found at run time (discovery/): each member is a backend with
    the entry's settings. Exactly one of `dns` and `file`."""

    dns: str | None = None  # a name whose A/AAAA records are the members (a Kubernetes headless Service)
    port: int | None = None  # dns: the members' port (required)
    file: str | None = None  # an endpoints file (llm-d's format), re-read when it changes; absolute once loaded
    interval: float = 10.0  # how often the name is resolved again / the file looked at (file: 2s by default)
    resolver: str | None = None  # dns: "ip:port" of the DNS server to ask; None: the system's (resolv.conf)


@dataclass(slots=True)
class BackendConfig:
    url: str  # scheme://host[:port][/base-path]; "" for an entry with discovery
    name: str = ""  # defaults to host:port
    weight: int = 1
    type: str = "auto"  # a kind of llmproxy.catalogue.KINDS, or auto: detected
    api_key: str | None = None  # sent upstream as "Authorization: Bearer <key>" (x-api-key for type anthropic)
    api_keys: list[str] | None = None  # several keys, rotated round robin; a throttled (429) one rests
    # The API families it serves natively (catalogue.FAMILIES); None: its type's. A request in another family is
    # translated to one of these when it can be (routing.translate).
    apis: frozenset[str] | None = None
    anthropic_version: str = "2023-06-01"  # sent to a type: anthropic backend when the client sent none
    # Pool cap (in use + idle); None: no cap of its own. The engine behind (vLLM, SGLang) queues and schedules
    # thousands of requests itself, and its queue is what balancing and autoscalers watch: a cap here would
    # make a second, invisible queue in front of it. server.max_connections bounds the streams anyway.
    max_connections: int | None = None
    max_idle: int | None = None  # idle connections kept; None: all (idle_timeout closes them): no reconnects
    idle_timeout: float = 4.0  # below vLLM's (uvicorn) 5 s keep-alive
    max_waiters: int = 1024  # requests waiting at max_connections or max_concurrent; more get 503
    # A deliberate queue in the proxy: at most this many requests at once to this backend, the rest wait (FIFO)
    # up to queue_timeout. None: none (the default; nothing on the request path).
    max_concurrent: int | None = None
    queue_timeout: float = 30.0  # longest wait for a max_concurrent slot: 503 upstream_pool_exhausted
    tls_verify: bool = True
    inject_usage: bool = True  # add stream_options.include_usage to streaming OpenAI-style requests
    models: list[str] | None = None  # the models it serves; None: the ones it reports (/v1/models, /api/tags)
    metrics: BackendMetricsConfig | None = None  # its load gauges; None: its kind's (catalogue.KINDS)
    # USD per million tokens on this backend, both or neither, for routes of type lowest_cost; None: the
    # `pricing:` table's price of the request's model.
    cost_per_million_input_tokens: float | None = None
    cost_per_million_output_tokens: float | None = None
    timeouts: BackendTimeouts = field(default_factory=BackendTimeouts)
    discovery: DiscoveryConfig | None = None  # the entry stands for the backends found this way
    # Derived from url by the loader:
    scheme: str = "http"
    host: str = ""
    port: int = 80
    base_path: str = ""  # prefix added to every forwarded path, without a trailing slash

    @property
    def keys(self) -> list[str]:
        """Its API keys: api_keys, else api_key alone, else none."""
        if self.api_keys:
            return self.api_keys
        return [self.api_key] if self.api_key else []


@dataclass(frozen=True, slots=True)
class AutoRuleConfig:
    """One rule of routing.auto (fleet/auto.py): the model, and the conditions a request must meet for it."""

    model: str
    max_prompt_tokens: int | None = None
    max_output_tokens: int | None = None
    needs_tools: bool | None = None
    needs_images: bool | None = None


@dataclass(slots=True)
class PrefixAffinityConfig:
    """routing.load_balance: prefix_affinity (fleet/prefix.py)."""

    key_chars: int = 1024  # characters of the conversation's beginning its key is made of
    epsilon: float = 0.25  # bounded load: no backend over (1 + epsilon) times the mean in-flight
    session_header: str = "x-session-id"  # a client's explicit session id, the key when present


@dataclass(slots=True)
class RoutingConfig:
    load_balance: str = "round_robin"  # a name of llmproxy.fleet.balancer.STRATEGIES
    retries: int = 2  # further attempts after the first, on another backend when there is one
    retry_on: list[str] = field(default_factory=lambda: ["connect_error", "reset", "502", "503"])
    retry_backoff: float = 0.025  # full jitter: each retry waits uniform(0, retry_backoff * 2**(n-1))
    model_aliases: dict[str, str] = field(default_factory=dict)  # requested name -> name forwarded
    translate: str = "when_needed"  # catalogue.TRANSLATE_MODES: when a client's API is translated
    # queue_depth and prefix_affinity pass over a backend whose KV cache is this full while another is not
    kv_cache_threshold: float = 0.9
    prefix_affinity: PrefixAffinityConfig = field(default_factory=PrefixAffinityConfig)
    auto: list[AutoRuleConfig] = field(default_factory=list)  # model "auto": the first rule a request meets


# routes[].strategy.type: how a route chooses among its upstreams (fleet/routes.py).
ROUTE_STRATEGIES = ("failover", "weighted_random", "round_robin", "canary", "lowest_cost", "lowest_latency")
WEIGHTED_ROUTE_STRATEGIES = ("weighted_random", "round_robin")  # the types an upstream's `weight` is for


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """One upstream of a route: a backends[].name, with its share."""

    name: str
    weight: int | None = None  # weighted_random, round_robin; None: the backend's own weight
    percentage: float | None = None  # canary (required there, and only there): its share of the requests


@dataclass(slots=True)
class RouteMatchConfig:
    """What a request must have for its route to take it: every condition given (none given: any request)."""

    path: str | None = None  # exact, as the proxy made it canonical; a trailing "*" makes it a prefix
    method: str | None = None  # upper case
    headers: dict[str, str] = field(default_factory=dict)  # lower-case name -> exact value
    json_body: dict[str, Any] = field(default_factory=dict)  # key -> JSON value; a mapping reaches into an object


@dataclass(slots=True)
class RouteStrategyConfig:
    type: str  # one of ROUTE_STRATEGIES
    upstreams: list[UpstreamConfig]


@dataclass(slots=True)
class RouteConfig:
    """`routes[]`: the requests that `match`, balanced over the route's own upstreams by its own strategy."""

    id: str
    match: RouteMatchConfig
    strategy: RouteStrategyConfig


@dataclass(slots=True)
class TranslationConfig:
    """How translated requests are made (translate/)."""

    # A Messages stream translated from a backend silent this long gets a `ping` event: Claude Code and the
    # intermediaries in front of it see the connection alive through a long prefill.
    ping_interval: float = 10.0
    # max_tokens for an Anthropic upstream when the Chat Completions client set none (Anthropic requires it).
    default_max_tokens: int = 4096


@dataclass(slots=True)
class PassiveHealthConfig:
    """Outlier ejection from live traffic: consecutive connect failures, resets, timeouts or 5xx."""

    enabled: bool = True
    consecutive_failures: int = 5
    base_ejection_time: float = 30.0  # the n-th ejection in a row lasts n times this...
    max_ejection_time: float = 300.0  # ...up to this
    max_ejection_percent: int = 50  # never eject more of the backends than this (at least one may go)


@dataclass(slots=True)
class HealthCheckConfig:
    enabled: bool = True  # active probes (vLLM/TGI GET /health, Ollama GET /api/version, openai GET /v1/models)
    interval: float = 5.0
    timeout: float = 2.0
    healthy_threshold: int = 2  # consecutive passing probes to mark a backend healthy again
    unhealthy_threshold: int = 3  # consecutive failing probes to mark it unhealthy
    models_interval: float = 60.0  # how often reported model lists (and auto-detected types) are refreshed
    passive: PassiveHealthConfig = field(default_factory=PassiveHealthConfig)


@dataclass(frozen=True, slots=True)
class BudgetConfig:
    """A usage cap over a calendar period (UTC; weeks start on Monday)."""

    per: str  # day | week | month
    tokens: int | None = None
    usd: float | None = None


@dataclass(frozen=True, slots=True)
class LimitConfig:
    """Limits of one scope (a key, or all traffic); None = no such limit (or, in a key's override, inherit)."""

    requests_per_minute: float | None = None
    burst: int | None = None  # requests allowed back to back; default one minute's allowance
    max_concurrent: int | None = None  # requests in progress, streams counted to their end
    tokens_per_minute: int | None = None  # charged from metered usage when a request ends
    budget: BudgetConfig | None = None


@dataclass(slots=True)
class ApiKeyConfig:
    key_sha256: str  # hex digest of the key; a `key:` in the config is hashed at load and never kept
    user_id: str | None = None
    name: str | None = None
    models: list[str] | None = None  # models this key may use; None = all
    rate_limit: LimitConfig | None = None  # overrides rate_limit.per_key field by field
    allowed_ips: list[str] | None = None  # addresses / CIDRs the key may be used from (after trusted_proxies)
    # BYOK: backend name -> the key's own credential for it (out of repr: a logged config must not show it)
    backend_keys: dict[str, str] | None = field(default=None, repr=False)


BYOK_MISSING = ("fallback", "refuse")  # a tenant with own credentials, on a backend it has none for
JWT_HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
JWT_KEY_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


@dataclass(slots=True)
class JwtClaimsConfig:
    """The names of the claims a tenant JWT is read from."""

    tenant: str = "tid"  # required in every token: names the tenant (key_id "tenant:<tid>")
    user: str = "sub"  # user_id of the records
    models: str = "models"  # optional list: narrows the models the tenant may use
    credential: str | None = None  # BYOK: names an entry of auth.jwt.credentials_file


@dataclass(slots=True)
class JwtTenantConfig:
    """What a tenant of auth.jwt.tenants carries, as an API key would."""

    user_id: str | None = None  # when the token has no user claim
    models: list[str] | None = None
    rate_limit: LimitConfig | None = None  # overrides rate_limit.per_key field by field
    allowed_ips: list[str] | None = None
    backend_keys: dict[str, str] | None = field(default=None, repr=False)


@dataclass(slots=True)
class JwtConfig:
    """Tenant JWTs (auth.jwt): verified with exactly one of jwks_url, public_keys and hs256_secret."""

    issuer: str
    audience: list[str]
    jwks_url: str | None = None
    public_keys: list[str] = field(default_factory=list)  # PEM public keys
    hs256_secret: str | None = field(default=None, repr=False)
    algorithms: list[str] = field(default_factory=list)  # default: HS256 with a secret, RS256 with keys
    claims: JwtClaimsConfig = field(default_factory=JwtClaimsConfig)
    leeway: float = 30.0  # clock skew allowed on exp / nbf / iat
    jwks_refresh: float = 600.0  # the key set is fetched again this often (in the background)
    jwks_timeout: float = 5.0
    tenants: dict[str, JwtTenantConfig] = field(default_factory=dict)  # limits, models... by tenant claim
    credentials_file: str | None = None  # BYOK: `credentials: {name: {backend: key}}`, re-read on change


@dataclass(slots=True)
class AuthConfig:
    enabled: bool = False
    header_names: list[str] = field(default_factory=lambda: ["Authorization", "X-API-Key"])
    skip_paths: list[str] = field(default_factory=lambda: ["/health", "/ready", "/metrics"])  # exact, no auth
    keys: list[ApiKeyConfig] = field(default_factory=list)  # from the config and keys_file together
    keys_file: str | None = None  # YAML with `keys: [...]`, relative to the config file; re-read on SIGHUP
    metrics_per_key: bool = False  # label ratelimited, usage_tokens and cost metrics with key_id
    jwt: JwtConfig | None = None  # tenant JWTs beside the keys
    byok_missing: str = "fallback"  # BYOK_MISSING: use the backend's own credential, or refuse (403)


@dataclass(slots=True)
class SecurityConfig:
    """Client addresses let in (`security:`); checked on the client address after trusted_proxies."""

    ip_whitelist: list[str] = field(default_factory=list)  # addresses / CIDRs; empty: everyone
    ip_blacklist: list[str] = field(default_factory=list)  # wins over the whitelist


@dataclass(slots=True)
class RateLimitConfig:
    enabled: bool = False
    store: str = "memory"  # memory | redis (shared by workers and instances)
    redis_url: str | None = None  # redis://, rediss://, unix://, redis+sentinel:// (config/redis_url.py)
    cluster: bool = False  # redis_url names nodes of a Redis Cluster (every key in one hash slot)
    on_store_error: str = "fail_open"  # fail_open | fail_closed (503) while the store is unreachable
    reserve_max_tokens: bool = False  # hold a request's max_tokens against tokens_per_minute up front
    per_key: LimitConfig = field(default_factory=LimitConfig)
    global_limits: LimitConfig = field(default_factory=LimitConfig)  # `global:` in the file


CACHE_STORES = ("memory", "redis")


@dataclass(slots=True)
class CacheStrategyConfig:
    """One `caching.strategies[]` entry: the requests it caches (a route's `match` form), and for how long."""

    id: str
    match: RouteMatchConfig
    ttl_seconds: float | None = None  # None: caching.default_ttl_seconds


@dataclass(slots=True)
class CachingConfig:
    """The response cache and de-duplication of identical requests in flight (llmproxy/cache/)."""

    enabled: bool = False
    default_ttl_seconds: float = 3600.0
    max_size_mb: float = 100.0  # the memory store's bound, least recently used out first
    max_entry_kb: int = 1024  # a larger response is neither stored nor joined once past it
    store: str = "memory"  # memory | redis (shared by workers and replicas)
    redis_url: str | None = None  # None with store: redis -> rate_limit.redis_url
    cluster: bool = False  # redis_url names nodes of a Redis Cluster
    per_key: bool = True  # the caller's key is part of the cache key: one tenant's answers never reach another
    ignore_fields: list[str] = field(default_factory=lambda: ["user"])  # body keys left out of the cache key
    bill_hits: bool = False  # a hit (and a de-duplicated follower) is charged the original cost
    dedup: bool = True  # identical cacheable requests in flight share one upstream request
    dedup_max_lag_kb: int = 1024  # a follower this far behind the stream is cut
    strategies: list[CacheStrategyConfig] = field(default_factory=list)


@dataclass(slots=True)
class LoggingConfig:
    level: str = "info"  # debug | info | warning | error
    access_log: str = "stdout"  # stdout | stderr | off | a file path


@dataclass(slots=True)
class MetricsConfig:
    enabled: bool = True


@dataclass(slots=True)
class TracingConfig:
    """OpenTelemetry traces (tracing.py): one span per generation request, exported by OTLP/HTTP in batches."""

    enabled: bool = False  # needs the otel extra: pip install 'llmproxy[otel]'
    endpoint: str = "http://127.0.0.1:4318/v1/traces"  # an OTLP/HTTP (protobuf) traces URL
    # Of the traces the proxy starts itself; a client's traceparent carries its own decision, which is followed.
    sample_ratio: float = 1.0
    service_name: str = "llmproxy"
    headers: dict[str, str] = field(default_factory=dict)  # sent with every export (a collector's credential)
    export_timeout: float = 10.0  # one export request
    export_interval: float = 5.0  # the longest a finished span waits for its batch
    max_batch_size: int = 512  # spans per export request
    max_queue_size: int = 2048  # spans waiting for export; beyond, new ones are dropped (never the request)


@dataclass(frozen=True, slots=True)
class PriceConfig:
    """USD per million tokens, for `cost_usd` on usage records."""

    input_per_million: float
    output_per_million: float
    cached_input_per_million: float | None = None  # prompt tokens read from a cache; None: the input price
    cache_write_per_million: float | None = None  # prompt tokens written to a cache (Anthropic); None: input


# Usage delivery (`usage:`): reporters of the usage records. `__post_init__` validates what a typo would
# otherwise turn into a silent delivery failure at runtime (bad secret, duplicate reporter names).
REPORTER_TYPES = ("webhook", "file")
SECRET_PREFIX = "whsec_"
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an HTTP field name (RFC 9110 token)
# Headers the webhook client owns: a user override would break framing, signing or deduplication.
RESERVED_HEADERS = frozenset({
    "host", "content-length", "content-type", "transfer-encoding", "connection",
    "webhook-id", "webhook-timestamp", "webhook-signature",
})


@dataclass(slots=True)
class WebhookConfig:
    url: str
    timeout: float = 3.0  # whole attempt: connect + send + response
    secret: str | None = None  # Standard Webhooks: "whsec_<base64>", or any other string used as raw UTF-8 key
    headers: dict[str, str] = field(default_factory=dict)
    max_attempts: int = 3  # total attempts for non-retryable answers (4xx other than 408/429)
    max_age: float = 259200.0  # retryable failures are retried this long after the record was created (72 h)
    concurrency: int = 4  # attempts in flight for this reporter
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    retry: int | None = None  # seed compatibility: an alias of max_attempts

    def __post_init__(self) -> None:
        if self.retry is not None:
            self.max_attempts = self.retry
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"webhook.url must be an http:// or https:// URL with a host, got {self.url!r}")
        if self.timeout <= 0 or self.max_age <= 0 or self.backoff_base <= 0 or self.backoff_cap <= 0:
            raise ValueError("webhook timeout, max_age, backoff_base and backoff_cap must be positive")
        if self.max_attempts < 1 or self.concurrency < 1:
            raise ValueError("webhook.max_attempts and webhook.concurrency must be at least 1")
        for name, value in self.headers.items():
            if not _TOKEN.fullmatch(name) or any(c in value for c in "\r\n\0"):
                raise ValueError(f"webhook.headers: invalid header {name!r}: {value!r}")
        reserved = sorted(name for name in self.headers if name.lower() in RESERVED_HEADERS)
        if reserved:
            raise ValueError(f"webhook.headers may not set {', '.join(reserved)}: the client sets them")
        if self.secret is not None:
            signing_key(self.secret)  # fail at load time, not at the first delivery


@dataclass(slots=True)
class FileReporterConfig:
    path: str  # JSON lines, appended; parent directories are created


@dataclass(slots=True)
class ReporterConfig:
    name: str
    type: str
    enabled: bool = True
    webhook: WebhookConfig | None = None
    file: FileReporterConfig | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("usage reporter name must not be empty")
        if self.type not in REPORTER_TYPES:
            raise ValueError(f"usage reporter {self.name!r}: type must be one of {REPORTER_TYPES}, got {self.type!r}")
        if self.type == "webhook" and self.webhook is None:
            raise ValueError(f"usage reporter {self.name!r}: type webhook needs a webhook section")
        if self.type == "file" and self.file is None:
            raise ValueError(f"usage reporter {self.name!r}: type file needs a file section")


@dataclass(slots=True)
class RecountConfig:
    """Counting an estimated record's prompt exactly with the backend's tokenizer, after the request ended."""

    enabled: bool = True
    timeout: float = 2.0  # per count: then the record goes out estimated
    concurrency: int = 4  # counts in flight at once (each is one small request to a backend)
    max_pending: int = 1000  # records waiting for a count; beyond, they go out estimated at once


@dataclass(slots=True)
class UsageConfig:
    enabled: bool = False
    metering: bool = True  # meter responses and build records (metrics); false: no body rewriting, no records
    recount: RecountConfig = field(default_factory=RecountConfig)
    spool_dir: str = "./usage-spool"
    reporters: list[ReporterConfig] = field(default_factory=list)
    max_outbox_records: int = 1_000_000  # pending rows (one per record and reporter); see outbox.py for the policy
    flush_interval: float = 0.1  # group commit period: the most a SIGKILL can lose

    def __post_init__(self) -> None:
        names = [reporter.name for reporter in self.reporters]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            # The reporter name keys the outbox rows: two reporters sharing it would steal each other's rows.
            raise ValueError(f"usage reporter names must be unique, repeated: {', '.join(duplicates)}")
        if self.max_outbox_records < 1:
            raise ValueError("usage.max_outbox_records must be at least 1")
        if not 0 < self.flush_interval <= 10:
            raise ValueError("usage.flush_interval must be in (0, 10] seconds")

    def active_reporters(self) -> list[ReporterConfig]:
        return [reporter for reporter in self.reporters if reporter.enabled] if self.enabled else []


def signing_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret: base64 after "whsec_", else the raw UTF-8 bytes."""
    if not secret.startswith(SECRET_PREFIX):
        if not secret:
            raise ValueError("webhook.secret must not be empty")
        return secret.encode()
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("webhook.secret: the part after whsec_ is not valid base64") from exc
    if not key:
        raise ValueError("webhook.secret: empty key after whsec_")
    return key


@dataclass(slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    backends: list[BackendConfig] = field(default_factory=list)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    routes: list[RouteConfig] = field(default_factory=list)  # the most specific match wins; none: load_balance
    translation: TranslationConfig = field(default_factory=TranslationConfig)
    health_check: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    usage: UsageConfig = field(default_factory=UsageConfig)
    pricing: dict[str, PriceConfig] = field(default_factory=dict)  # by model name as forwarded (after aliases)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    caching: CachingConfig = field(default_factory=CachingConfig)
