"""What kind of server a backend is, whether it is healthy, what it serves and how loaded it is.

Everything here is one or a few GETs through `probe.probe_get`; the wire facts come from
docs/protocols.md §2-4 (vLLM, TGI, Ollama); the facts of each kind are rows of catalogue.KINDS.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families

from llmproxy.catalogue import FAMILY_PATHS, GENERIC_KIND, KINDS
from llmproxy.config.model import BackendConfig
from llmproxy.fleet.probe import ProbeError, ProbeResponse, probe_get

# Go's RFC 3339 (time.RFC3339Nano): fractional digits up to 9, which datetime.fromisoformat rejects
# before Python 3.11, as it rejects "Z".
_RFC3339 = re.compile(r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(?:\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


# --- kind --------------------------------------------------------------------------------------------

async def detect_kind(backend: BackendConfig, timeout: float) -> str:
    """Return the name of a catalogue kind; raises ProbeError when no probe got any HTTP answer, or when every
    answer was 503 (retry later).

    A server that answers 503 to every probe is up but not ready: llama-server answers every path so while it
    loads its model. Settling on the generic kind then would file it as "openai" for good (a kind is detected
    once): its native paths unserved, its streams' closed connections pooled, its counts unread.
    """
    answered = False
    statuses: set[int] = set()
    error: ProbeError | None = None
    for kind in KINDS.values():
        if kind.detect_path is None:
            continue
        try:
            response = await probe_get(backend, kind.detect_path, timeout)
        except ProbeError as exc:
            if exc.local:
                raise  # not sent at all (out of descriptors): the other answers cannot settle the kind
            answered = answered or exc.status is not None  # a head arrived: it is up and speaks HTTP
            error = exc
            continue
        answered = True
        statuses.add(response.status)
        if response.status == 200 and _holds(_json_or_none(response.body), kind.detect_key, kind.key_is_str):
            return kind.name
    if statuses == {503}:
        raise ProbeError("every detection probe answered 503: not ready (a llama.cpp loading its model?)", 503)
    if answered:
        return GENERIC_KIND
    assert error is not None
    raise error


def _holds(obj: Any, key: str, needs_str: bool) -> bool:
    return isinstance(obj, dict) and key in obj and (not needs_str or isinstance(obj[key], str))


def _json_or_none(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


# --- health ------------------------------------------------------------------------------------------

async def check_health(backend: BackendConfig, kind: str, timeout: float) -> tuple[bool, str]:
    """(healthy, reason): healthy iff the kind's health path answers 2xx; reason is "" when healthy.

    Raises the ProbeError of a probe the proxy could not send for its own lack of resources (`local`).
    """
    try:
        response = await probe_get(backend, KINDS[kind].health_path, timeout)
    except ProbeError as exc:
        if exc.local:
            raise
        return False, str(exc)
    if _ok(response):
        return True, ""
    return False, f"status {response.status}"


def _ok(response: ProbeResponse) -> bool:
    return 200 <= response.status < 300


# --- APIs --------------------------------------------------------------------------------------------

async def detect_apis(backend: BackendConfig, kind: str, timeout: float) -> frozenset[str] | None:
    """The API families the backend's OpenAPI document lists routes for; None when its kind publishes none or
    it answered that it has none (docs disabled: then its kind's defaults hold). Raises ProbeError when it gave
    no answer to go by (unreachable, 5xx): what was detected before still holds."""
    known = KINDS.get(kind)
    if known is None or known.openapi_path is None:
        return None
    try:
        document = await _get_json(backend, known.openapi_path, timeout)
    except ProbeError as error:
        if error.local or error.status is None or error.status >= 500:
            raise
        return None
    paths = document.get("paths") if isinstance(document, dict) else None
    if not isinstance(paths, dict):
        return None
    return frozenset(family for family, path in FAMILY_PATHS.items() if path in paths)


# --- models ------------------------------------------------------------------------------------------

async def fetch_models(backend: BackendConfig, kind: str, timeout: float) -> list[dict]:
    """OpenAI-shaped model cards the backend serves; raises ProbeError on failure or an unparsable list."""
    if kind == "ollama":
        tags = await _get_json(backend, "/api/tags", timeout)
        return _ollama_cards(tags)
    listing = await _get_json(backend, "/v1/models", timeout)
    cards = _openai_cards(listing)
    if kind == "anthropic":
        cards = [_as_openai_card(card) for card in cards]
    return cards


async def _get_json(backend: BackendConfig, path: str, timeout: float) -> Any:
    response = await probe_get(backend, path, timeout)
    if not _ok(response):
        raise ProbeError(f"GET {path}: status {response.status}", response.status)
    try:
        return orjson.loads(response.body)
    except orjson.JSONDecodeError:
        raise ProbeError(f"GET {path}: not JSON", response.status) from None


def _openai_cards(listing: Any) -> list[dict]:
    data = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(data, list):
        raise ProbeError("GET /v1/models: no data list")
    # Cards are kept whole: clients read extra fields (vLLM's max_model_len, root, ...).
    return [card if "object" in card else {**card, "object": "model"}
            for card in data if isinstance(card, dict) and isinstance(card.get("id"), str)]


def _as_openai_card(card: dict) -> dict:
    """An Anthropic model card (`created_at`, `display_name`) with the fields OpenAI clients require."""
    created = card.get("created") if type(card.get("created")) is int else _epoch(card.get("created_at"))
    return {**card, "object": "model", "created": created, "owned_by": card.get("owned_by") or "anthropic"}


def _ollama_cards(tags: Any) -> list[dict]:
    models = tags.get("models") if isinstance(tags, dict) else None
    if not isinstance(models, list):
        raise ProbeError("GET /api/tags: no models list")
    cards = []
    for entry in models:
        if not isinstance(entry, dict):
            continue
        name = entry.get("name") or entry.get("model")
        if isinstance(name, str) and name:
            cards.append({"id": name, "object": "model", "created": _epoch(entry.get("modified_at")),
                          "owned_by": "library"})
    return cards


def _epoch(stamp: Any) -> int:
    """Seconds since the epoch of an RFC 3339 time; 0 if absent, unparsable or before 1970 (Go's zero)."""
    match = _RFC3339.fullmatch(stamp) if isinstance(stamp, str) else None
    if match is None:
        return 0
    date, clock, offset = match.groups()
    offset = "+00:00" if offset in ("Z", "z") else offset
    try:
        return max(0, int(datetime.fromisoformat(f"{date}T{clock}{offset}").timestamp()))
    except (ValueError, OverflowError, OSError):
        return 0


# --- load --------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class LoadGauges:
    """Which samples of a backend's GET /metrics say how loaded it is (names compare with ":" as "_": colons
    are legal in Prometheus names, but some exposition paths rewrite them)."""

    queue: frozenset[str]  # summed: requests waiting + running
    kv_cache: str | None  # KV-cache use, 0..1


@dataclass(frozen=True, slots=True)
class Load:
    queue_depth: float | None  # None: no such sample
    kv_cache: float | None


def load_gauges(backend: BackendConfig, kind: str) -> LoadGauges | None:
    """The gauges to read: the backend's own `metrics:` names, else its kind's; None when it has none."""
    custom = backend.metrics
    if custom is not None:
        queue, kv = [*custom.queued, *custom.running], custom.kv_cache
    else:
        known = KINDS.get(kind)
        if known is None or not (known.load_metrics or known.kv_metric):
            return None
        queue, kv = list(known.load_metrics), known.kv_metric
    return LoadGauges(frozenset(_normal(name) for name in queue), _normal(kv) if kv else None)


def _normal(name: str) -> str:
    return name.replace(":", "_")


def parse_load(text: str, gauges: LoadGauges) -> Load:
    """Requests waiting + running (summed over label sets) and KV-cache use from a Prometheus text page;
    a value is None when its samples are missing or the text does not parse."""
    total, found, kv = 0.0, False, None
    try:
        # Match samples, not families: the parser names a counter's family without "_total" and an
        # untyped one after its sample, so sample names are the only stable key.
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if not math.isfinite(sample.value):
                    continue
                name = _normal(sample.name)
                if name in gauges.queue:
                    total += sample.value
                    found = True
                elif name == gauges.kv_cache:
                    kv = sample.value if kv is None else max(kv, sample.value)
    except Exception:  # the parser raises assorted errors (ValueError, IndexError, ...) on bad input
        return Load(None, None)
    return Load(total if found else None, kv)


async def fetch_load(backend: BackendConfig, kind: str, timeout: float) -> Load | None:
    """GET /metrics and read the load gauges; None without any request for a backend that has none.

    Raises ProbeError when /metrics does not answer 2xx (llama.cpp answers 501 without --metrics)."""
    gauges = load_gauges(backend, kind)
    if gauges is None:
        return None
    response = await probe_get(backend, "/metrics", timeout)
    if not _ok(response):
        raise ProbeError(f"GET /metrics: status {response.status}", response.status)
    return parse_load(response.body.decode("utf-8", "replace"), gauges)
