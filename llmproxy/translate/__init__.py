"""Translation between the API a client speaks and the one its backend serves (docs/translation.md).

Three translations, each a module: a Messages client on a Chat Completions backend (messages.py), a
Responses client on one (responses.py), and a Chat Completions client on Anthropic's Messages API
(chat.py). A Translation is the plan of one attempt: the backend path, the request mapped once before
it is sent, and the response mapped as it arrives: a stream event by event, in the read that brought it
(the translator is the attempt's meter: it reads the backend's usage as it maps the events), a whole body
at its end, and an error in the client's shape with the backend's status and message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from llmproxy.catalogue import FAMILY_PATHS, KINDS, OPENAI_ERRORS, TRANSLATIONS, Endpoint
from llmproxy.errors import shaped_error
from llmproxy.metering.dialects import ANTHROPIC_MESSAGES_SSE, OPENAI_CHAT_SSE
from llmproxy.metering.usage import Usage
from llmproxy.translate import chat, messages, responses

if TYPE_CHECKING:
    from llmproxy.metering import Meter


class Backend(Protocol):
    """What translation needs to know of a backend (llmproxy.fleet.backend.Backend)."""

    kind: str
    config: Any  # its BackendConfig: inject_usage

    @property
    def apis(self) -> frozenset[str]: ...

    def serves_endpoint(self, endpoint: Endpoint) -> bool: ...

__all__ = ["Translation", "translation_for"]


@dataclass(frozen=True, slots=True)
class Translation:
    client: str  # the client's API family (catalogue.FAMILIES)
    backend: str  # the backend's
    target: bytes  # the backend's path for it
    dialect: str  # the metering dialect of the backend's responses
    errors: str  # the shape of the client's errors
    _request: Callable[..., dict[str, Any]]
    _stream: Callable[[dict[str, Any]], Meter]
    _body: Callable[[bytes, dict[str, Any]], tuple[bytes, Usage | None]]

    @property
    def name(self) -> str:
        return f"{self.client}->{self.backend}"

    @property
    def pings(self) -> bool:
        """The client's stream has keep-alive events of its own (Messages' ping)."""
        return self.client == "messages"

    def request(self, body: dict[str, Any], backend: Backend, stream: bool, default_max_tokens: int) -> bytes:
        """The request body for the backend; raises ProxyError (400, "untranslatable") for what cannot be mapped."""
        kind = KINDS.get(backend.kind)
        mapped = self._request(body, stream=stream, continuous_usage=kind is not None and kind.continuous_usage,
                               default_max_tokens=default_max_tokens)
        if not backend.config.inject_usage:
            mapped.pop("stream_options", None)  # a backend that refuses the option: the stream is estimated
        return orjson.dumps(mapped)

    def stream(self, request: dict[str, Any]) -> Meter:
        """The translator of one streamed response (it meters it too)."""
        return self._stream(request)

    def body(self, raw: bytes, request: dict[str, Any]) -> tuple[bytes, Usage | None]:
        """A whole successful response body mapped, and the backend's usage read off it."""
        return self._body(raw, request)

    def error(self, raw: bytes, status: int) -> bytes:
        """A backend's error body in the client's shape, with the backend's message."""
        return shaped_error(status, _error_message(raw, status), self.errors)


def _error_message(raw: bytes, status: int) -> str:
    """The message of an error body in any of the engines' shapes (OpenAI's, Anthropic's, TGI's, FastAPI's)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        text = raw.decode("utf-8", "replace").strip()
        return text[:2000] or f"backend answered {status}"
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        for key in ("message", "detail", "error"):
            if isinstance(error.get(key), str):
                return error[key]
    if isinstance(error, str):
        return error
    return f"backend answered {status}"


def _messages_request(body: dict[str, Any], *, stream: bool, continuous_usage: bool, **_: Any) -> dict[str, Any]:
    return messages.request_to_chat(body, stream=stream, continuous_usage=continuous_usage)


def _responses_request(body: dict[str, Any], *, stream: bool, **_: Any) -> dict[str, Any]:
    return responses.request_to_chat(body, stream=stream)


def _chat_request(body: dict[str, Any], *, stream: bool, default_max_tokens: int, **_: Any) -> dict[str, Any]:
    return chat.request_to_messages({**body, "stream": stream}, default_max_tokens=default_max_tokens)


PLANS: dict[tuple[str, str], Translation] = {
    ("messages", "chat"): Translation("messages", "chat", FAMILY_PATHS["chat"].encode(), OPENAI_CHAT_SSE,
                                      "anthropic", _messages_request, messages.ChatToMessages,
                                      messages.chat_body_to_messages),
    ("responses", "chat"): Translation("responses", "chat", FAMILY_PATHS["chat"].encode(), OPENAI_CHAT_SSE,
                                       OPENAI_ERRORS, _responses_request, responses.ChatToResponses,
                                       responses.chat_body_to_responses),
    ("chat", "messages"): Translation("chat", "messages", FAMILY_PATHS["messages"].encode(), ANTHROPIC_MESSAGES_SSE,
                                      OPENAI_ERRORS, _chat_request, chat.MessagesToChat, chat.messages_body_to_chat),
}
assert set(PLANS) == {(client, backend) for client, targets in TRANSLATIONS.items() for backend in targets}


def translation_for(endpoint: Endpoint, backend: Backend, mode: str) -> Translation | None:
    """How a request for `endpoint` is translated for `backend` under routing.translate `mode`; None: sent as
    it is (the backend serves it natively, or no translation applies).

    `always` translates what a backend serves natively only into Chat Completions, the API every engine serves
    best: a chat request is never turned into a Messages request for an engine that serves both.
    """
    family = endpoint.family
    if family is None or mode == "never" or family not in TRANSLATIONS:
        return None
    targets = TRANSLATIONS[family]
    if backend.serves_endpoint(endpoint):
        if mode != "always":
            return None
        targets = tuple(target for target in targets if target == "chat")
    apis = backend.apis
    for target in targets:
        if target in apis:
            return PLANS[(family, target)]
    return None
