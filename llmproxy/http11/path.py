"""One canonical request path: every decision is made on it, and it is what the backend receives.

A proxy that decides on the path as sent while the backend normalises it serves requests it never
checked: `/v1//chat/completions`, `/health/../v1/chat/completions` or `/v1/%63hat/completions` reach a
backend that normalises paths (Go's net/http does, for Ollama) as a chat completion the proxy neither
metered nor checked against the model allow-list. So the target is made canonical once, in the codec:

- duplicate slashes are merged and `.` / `..` segments resolved (RFC 3986 §5.2.4; `..` never climbs
  above the root);
- percent-encoded unreserved characters (letters, digits, `-`, `_`, `~`) are decoded (RFC 3986 §6.2.2.2),
  other escapes are kept, upper-cased;
- an encoded `/`, `\\`, `.` or NUL, a literal `\\`, a `;` parameter or a malformed escape is refused
  (400 invalid_path): each means a different path to some server, and no client needs one;
- the query is kept as sent. A `#` (a fragment, which never belongs in a request) is refused.

One exception: under `/v1/models/` an encoded `/` is kept as it is, since model ids carry slashes
("Qwen/Qwen2.5-7B-Instruct") and SDKs encode them (openai-python asks for `/v1/models/Qwen%2FQwen2.5-...`).
The proxy answers those paths itself: they never reach a backend.

Targets without `#`, `;`, `\\`, `%`, `?`, `//` or `/.` (nearly all) cost one regular-expression search and no copy.
"""

from __future__ import annotations

import re

_HEX = b"0123456789ABCDEFabcdef"
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_~")
_REFUSED_ESCAPES = {0x2F: "an encoded '/'", 0x5C: "an encoded '\\'", 0x2E: "an encoded '.'", 0x00: "an encoded NUL"}
_ESCAPE = re.compile(rb"%(..)", re.DOTALL)
ENCODED_SLASH_KEPT_UNDER = (b"/v1/models/",)  # answered by the proxy itself: see the module docstring
# Anything canonical_target might refuse or rewrite (or a query, which it keeps as sent). One C-level search
# instead of a `bytes in bytes` test each: on Python 3.11 each of those first tries the needle as an integer
# and formats the TypeError it then discards (about 1,800 instructions, bench.instructions).
_MAY_CHANGE = re.compile(rb"[#;\\%?]|/[/.]")


class InvalidPath(ValueError):
    """The request target cannot be made canonical; the message says why."""


def canonical_target(target: bytes) -> bytes:
    """The canonical form of an origin-form request target (path and query); raises InvalidPath."""
    if _MAY_CHANGE.search(target) is None:
        return target  # the usual case: already canonical, not copied
    if b"#" in target:
        raise InvalidPath("a request target must not carry a fragment ('#')")
    path, mark, query = target.partition(b"?")
    original = path
    if b";" in path:
        raise InvalidPath("path parameters (';') are not accepted")
    if b"\\" in path:
        raise InvalidPath("a backslash is not a path separator here")
    if b"%" in path:
        decode = _decoded_keeping_slash if path.startswith(ENCODED_SLASH_KEPT_UNDER) else _decoded
        path = _ESCAPE.sub(decode, path)  # every "%" followed by two bytes; the ones left are at the end
        if _stray_percent(path):
            raise InvalidPath("a malformed percent-escape in the path")
    if b"//" in path or b"/." in path:
        path = remove_dot_segments(path)
    if path is original:
        return target  # the usual case: already canonical, not copied
    return path + mark + query


def remove_dot_segments(path: bytes) -> bytes:
    """`path` (starting with "/") with empty, `.` and `..` segments resolved; a trailing slash is kept."""
    segments: list[bytes] = []
    parts = path.split(b"/")
    for segment in parts[1:]:
        if segment == b"..":
            if segments:
                segments.pop()
        elif segment and segment != b".":
            segments.append(segment)
    last = parts[-1]
    trailing = bool(segments) and (last in (b"", b".", b".."))
    return b"/" + b"/".join(segments) + (b"/" if trailing else b"")


def _decoded(match: re.Match[bytes]) -> bytes:
    pair = match.group(1)
    if pair[0] not in _HEX or pair[1] not in _HEX:
        raise InvalidPath("a malformed percent-escape in the path")
    value = int(pair, 16)
    refused = _REFUSED_ESCAPES.get(value)
    if refused is not None:
        raise InvalidPath(f"{refused} in the path")
    if value in _UNRESERVED:
        return bytes((value,))
    return b"%" + pair.upper()


def _decoded_keeping_slash(match: re.Match[bytes]) -> bytes:
    return b"%2F" if match.group(1) in (b"2f", b"2F") else _decoded(match)


def _stray_percent(path: bytes) -> bool:
    """A '%' not followed by two hex digits, after escapes were rewritten (each kept one is "%XX")."""
    i = path.find(b"%")
    while i >= 0:
        pair = path[i + 1:i + 3]
        if len(pair) < 2 or pair[0] not in _HEX or pair[1] not in _HEX:
            return True
        i = path.find(b"%", i + 3)
    return False
