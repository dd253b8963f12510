"""Prefix-cache affinity: the turns of one conversation go to the backend that holds its prefix in cache.

An engine with prefix caching (vLLM, SGLang, llama.cpp) answers a prompt whose beginning it processed
recently in a fraction of the time; a coding agent resends its whole, growing conversation every turn. So a
conversation is given a key that stays the same as it grows, and the key a place on a consistent-hash ring.

The key: an explicit session id when the client gives one (the `x-session-id` header, OpenAI's
`prompt_cache_key` or `user`, Anthropic's `metadata.user_id`); else a hash of the model and the first
`key_chars` characters of the conversation's first turn after its shared preamble: system prompts and tools are
left out (every session of an agent sends the same ones, and they would send every session to one backend),
and so are blocks that change on every request (Claude Code's `x-anthropic-billing-header` block).

The choice: consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018). Walking the ring
from the key, the first candidate whose in-flight count is under (1 + ε) * the mean (per unit of weight,
counting the request being placed) takes it. A hot conversation spills to the next backend on the ring
instead of piling up; a backend that leaves or fails moves only its own keys (to their next backend).
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, TypeVar

POINTS_PER_WEIGHT = 100  # ring points per unit of weight: keys spread within a few % of the weights
_VOLATILE_PREFIXES = ("x-anthropic-billing-header",)  # system blocks that change on every request


class Member(Protocol):
    name: str
    weight: int
    in_flight: int


M = TypeVar("M", bound=Member)


def _hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class HashRing:
    """The backends' points on a 64-bit ring, `POINTS_PER_WEIGHT` per unit of weight."""

    __slots__ = ("_owners", "_points")

    def __init__(self, members: Sequence[Member]) -> None:
        placed = sorted((_hash(f"{member.name}#{i}".encode()), member.name)
                        for member in members for i in range(POINTS_PER_WEIGHT * max(1, member.weight)))
        self._points = [point for point, _ in placed]
        self._owners = [name for _, name in placed]

    def walk(self, key: int) -> Iterator[str]:
        """The backend names in ring order from `key`, each once, as far as the caller reads."""
        start = bisect.bisect(self._points, key)
        owners = self._owners
        seen: set[str] = set()
        count = len(owners)
        for step in range(count):
            name = owners[(start + step) % count]
            if name not in seen:
                seen.add(name)
                yield name


def bounded_choice(ring: HashRing, key: int, candidates: list[M], epsilon: float) -> M:
    """The first candidate on the ring from `key` whose load is under its bound: ceil((1 + ε) * the mean
    in-flight per unit of weight, this request included) * its weight."""
    by_name = {candidate.name: candidate for candidate in candidates}
    total_weight = sum(candidate.weight for candidate in candidates)
    total_load = sum(candidate.in_flight for candidate in candidates) + 1
    per_weight = (1.0 + epsilon) * total_load / total_weight
    for name in ring.walk(key):
        candidate = by_name.get(name)
        if candidate is not None and candidate.in_flight + 1 <= math.ceil(per_weight * candidate.weight):
            return candidate
    return min(candidates, key=lambda c: c.in_flight / c.weight)  # not on the ring (a reload races): least loaded


class AffinityKeys:
    """The affinity key of a request: a session id it gives, else its conversation's beginning."""

    __slots__ = ("_chars", "_header")

    def __init__(self, key_chars: int, session_header: str) -> None:
        self._chars = key_chars
        self._header = session_header.lower().encode()

    def key(self, headers: list[tuple[bytes, bytes]], body: Any) -> int | None:
        """A 64-bit key, or None when the request gives nothing to key on (it is then balanced by load)."""
        for name, value in headers:
            if name == self._header and value:
                return _hash(b"session:" + value)
        if not isinstance(body, dict):
            return None
        session = _session_field(body)
        if session is not None:
            return _hash(b"session:" + session.encode("utf-8", "surrogatepass"))
        text = conversation_start(body, self._chars)
        if not text:
            return None
        model = body.get("model")
        return _hash(f"{model if isinstance(model, str) else ''}\0{text}".encode("utf-8", "surrogatepass"))


def _session_field(body: dict[str, Any]) -> str | None:
    for value in (body.get("prompt_cache_key"), body.get("user")):
        if isinstance(value, str) and value:
            return value
    metadata = body.get("metadata")
    user = metadata.get("user_id") if isinstance(metadata, dict) else None
    return user if isinstance(user, str) and user else None


def conversation_start(body: dict[str, Any], chars: int) -> str:
    """The conversation's opening: the first `chars` characters of its first turn that is not a system one (Chat,
    Messages, Ollama, Responses input), or of its prompt. A later turn never changes it (a key on the first
    characters of the whole conversation would move until the conversation outgrew them); system prompts,
    tools and blocks that change per request are left out."""
    for text in _texts(body):
        if text and not text.startswith(_VOLATILE_PREFIXES):
            return text[:chars]
    return ""


def _texts(body: dict[str, Any]) -> Any:
    """The texts of the conversation's first non-system turn, in order; or its prompt."""
    turns = body.get("messages")
    if not isinstance(turns, list):
        turns = body.get("input")
        if isinstance(turns, str):
            yield turns
            return
    if isinstance(turns, list):
        for turn in turns:
            if isinstance(turn, dict) and turn.get("role") not in ("system", "developer"):
                yield from _content_texts(turn.get("content", turn.get("output")))
                return
        return
    for name in ("prompt", "inputs", "content"):  # completions, TGI, llama.cpp
        value = body.get(name)
        if isinstance(value, str):
            yield value
            return


def _content_texts(content: Any) -> Any:
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    yield text
            elif isinstance(part, str):
                yield part
