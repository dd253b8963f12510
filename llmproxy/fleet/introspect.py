"""What kind of server a backend is, whether it is healthy, what it serves and how loaded it is.

Everything here is one or a few GETs through `probe.probe_get`; the wire facts come from
docs/protocols.md §2-4 (vLLM, TGI, Ollama); the facts of each kind are rows of catalogue.KINDS.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families

from llmproxy.catalogue import GENERIC_KIND, KINDS
from llmproxy.config.model import BackendConfig
from llmproxy.fleet.probe import ProbeError, ProbeResponse, probe_get

# Sample names compare with ":" as "_": colons are legal in Prometheus names, but some exposition paths
# rewrite them, and either spelling means the same gauge.
_LOAD_METRICS = {kind.name: frozenset(name.replace(":", "_") for name in kind.load_metrics)
                 for kind in KINDS.values() if kind.load_metrics}

# Go's RFC 3339 (time.RFC3339Nano): fractional digits up to 9, which datetime.fromisoformat rejects
# before Python 3.11, as it rejects "Z".
_RFC3339 = re.compile(r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(?:\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


# --- kind --------------------------------------------------------------------------------------------

async def detect_kind(backend: BackendConfig, timeout: float) -> str:
    """Return the name of a catalogue kind; raises ProbeError when no probe got any HTTP answer (retry later)."""
    answered = False
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
        if response.status == 200 and _holds(_json_or_none(response.body), kind.detect_key, kind.key_is_str):
            return kind.name
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


# --- models ------------------------------------------------------------------------------------------

async def fetch_models(backend: BackendConfig, kind: str, timeout: float) -> list[dict]:
    """OpenAI-shaped model cards the backend serves; raises ProbeError on failure or an unparsable list."""
    if kind == "ollama":
        tags = await _get_json(backend, "/api/tags", timeout)
        return _ollama_cards(tags)
    listing = await _get_json(backend, "/v1/models", timeout)
    return _openai_cards(listing)


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

def parse_queue_depth(kind: str, text: str) -> float | None:
    """Requests waiting + running from a Prometheus text page, summed over label sets.

    None for kinds without such metrics, when neither metric is present, or when the text does not parse.
    """
    wanted = _LOAD_METRICS.get(kind)
    if wanted is None:
        return None
    total, found = 0.0, False
    try:
        # Match samples, not families: the parser names a counter's family without "_total" and an
        # untyped one after its sample, so sample names are the only stable key.
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.replace(":", "_") in wanted and math.isfinite(sample.value):
                    total += sample.value
                    found = True
    except Exception:  # the parser raises assorted errors (ValueError, IndexError, ...) on bad input
        return None
    return total if found else None


async def fetch_queue_depth(backend: BackendConfig, kind: str, timeout: float) -> float | None:
    """GET /metrics and parse it; None without any request for kinds that expose no queue metrics."""
    if kind not in _LOAD_METRICS:
        return None
    response = await probe_get(backend, "/metrics", timeout)
    if not _ok(response):
        raise ProbeError(f"GET /metrics: status {response.status}", response.status)
    return parse_queue_depth(kind, response.body.decode("utf-8", "replace"))
