"""What the translators share: the refusal of what cannot be translated, ids, and JSON helpers."""

from __future__ import annotations

import os
from typing import Any

import orjson

from llmproxy.errors import ProxyError


def untranslatable(field: str, why: str) -> ProxyError:
    """A 400 in the client's API shape naming the field the translation cannot express."""
    return ProxyError("untranslatable", f"`{field}`: {why}")


def new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def json_str(value: Any) -> bytes:
    """A JSON string literal of `value` (a str), for events built from byte templates."""
    return orjson.dumps(value)


def text_of(content: Any, field: str) -> str:
    """The text of a string or of a list of text parts/blocks; raises for anything else in it."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise untranslatable(field, "must be a string or a list of text blocks")
    texts = []
    for i, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise untranslatable(f"{field}[{i}]", f"only text can be translated here, not {kind!r}")
    return "\n".join(texts) if len(texts) != 1 else texts[0]


def arguments_object(arguments: Any) -> dict:
    """A tool call's arguments as an object (Chat Completions sends them as a JSON string)."""
    if isinstance(arguments, dict):
        return arguments
    if isinstance(arguments, str) and arguments.strip():
        try:
            value = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            return {}
        return value if isinstance(value, dict) else {}
    return {}


def dumps_str(value: Any) -> str:
    return orjson.dumps(value).decode()
