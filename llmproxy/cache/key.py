"""The cache key of a request: what makes two requests ask for the same answer.

The canonical JSON of the body (keys sorted, the model as resolved from its alias, the fields that do not change
the answer left out), the method, the path and its raw query (the API asked: a Chat answer is not a Messages
answer; `?beta=true` or Azure's `api-version` may change it), the request headers that select an API version or
feature (KEYED_HEADERS), and the caller's key when `per_key` holds. `stream` stays in: a streamed answer and a
whole body are different bytes. Each part is length-prefixed, so no part can run into the next; a blake2b
digest keeps the key short however long the prompt.
"""

from __future__ import annotations

from hashlib import blake2b
from typing import Any

import orjson

KEY_SIZE = 16  # bytes of digest: collisions are out of reach at any cache size
# The request headers that change the answer (besides the body): Anthropic's API version and beta features.
KEYED_HEADERS = (b"anthropic-version", b"anthropic-beta")


def cache_key(method: bytes, path: str, query: bytes, headers: list[tuple[bytes, bytes]], model: str | None,
              body: dict[str, Any], tenant: str | None, ignore_fields: frozenset[str]) -> bytes:
    """The key (hex digest) of a request with parsed JSON `body` to `path`?`query`; raises TypeError or
    ValueError for a body orjson cannot write back (not possible for one it parsed, but the caller guards)."""
    canonical = {name: value for name, value in body.items() if name not in ignore_fields}
    canonical["model"] = model
    digest = blake2b(digest_size=KEY_SIZE)
    parts = [method, path.encode(), query, (tenant or "").encode()]
    parts += [b"%b:%b" % (name, value) for name, value in headers if name in KEYED_HEADERS]
    parts.append(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS))
    for part in parts:
        digest.update(b"%d:" % len(part))
        digest.update(part)
    return digest.hexdigest().encode()
