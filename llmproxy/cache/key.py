"""The cache key of a request: what makes two requests ask for the same answer.

The canonical JSON of the body (keys sorted, the model as resolved from its alias, the fields that do not change
the answer left out), the path (the API asked: a Chat answer is not a Messages answer), and the caller's key when
`per_key` holds. `stream` stays in: a streamed answer and a whole body are different bytes. A blake2b digest
keeps the key short however long the prompt.
"""

from __future__ import annotations

from hashlib import blake2b
from typing import Any

import orjson

KEY_SIZE = 16  # bytes of digest: collisions are out of reach at any cache size


def cache_key(path: str, model: str | None, body: dict[str, Any], tenant: str | None,
              ignore_fields: frozenset[str]) -> bytes:
    """The key (hex digest) of a request with parsed JSON `body` to `path`; raises TypeError or ValueError for a
    body orjson cannot write back (not possible for one it parsed, but the caller guards)."""
    canonical = {name: value for name, value in body.items() if name not in ignore_fields}
    canonical["model"] = model
    digest = blake2b(digest_size=KEY_SIZE)
    digest.update(path.encode())
    digest.update(b"\0")
    digest.update((tenant or "").encode())
    digest.update(b"\0")
    digest.update(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS))
    return digest.hexdigest().encode()
