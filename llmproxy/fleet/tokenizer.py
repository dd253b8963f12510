"""How many tokens a backend's own tokenizer makes of a request's prompt, asked after the request ended.

Only kinds with a tokenizer endpoint can say (docs/protocols.md §2-3, §10): vLLM's `POST /tokenize` renders chat
messages with the model's template (`add_generation_prompt`, tools included) and answers `count`; TGI's
`POST /chat_tokenize` does the same for messages, and `POST /tokenize` counts plain `inputs`; llama.cpp renders
messages with `POST /apply-template`, and its `POST /tokenize` counts text (special tokens parsed, BOS added,
as its chat route does); a batch of prompts (a list of texts or token-id lists) is counted prompt by prompt, each
with its own special tokens, as llama-server tokenizes a batch. The answer is
the prompt as the backend counted it for a request that reported no usage (cut off before its last event).
"""

from __future__ import annotations

from typing import Any

import orjson

from llmproxy.catalogue import KINDS
from llmproxy.config.model import BackendConfig
from llmproxy.fleet.probe import ProbeError, probe_post

_CHAT, _TGI = "openai-chat", "tgi-generate"
_LLAMACPP_TEXT_KEYS = ("prompt", "content", "input")  # completion, native embedding, OpenAI embedding
# A batch of more prompts than this is not counted one /tokenize at a time: its estimate stands.
LLAMACPP_MAX_PROMPTS = 64


def can_count(kind: str, api: str) -> bool:
    """Whether a backend of `kind` can count the prompt of a request of API family `api` (catalogue.KINDS)."""
    known = KINDS.get(kind)
    return known is not None and api in known.tokenizes


async def count_prompt_tokens(backend: BackendConfig, kind: str, api: str, body: dict[str, Any],
                              timeout: float) -> int | None:
    """The backend's own count of the prompt of `body`, or None when it cannot say (no such endpoint, a
    prompt this counter does not understand). Raises ProbeError when asking failed."""
    if not can_count(kind, api):
        return None
    if kind == "vllm":
        return await _vllm(backend, api, body, timeout)
    if kind == "llamacpp":
        return await _llamacpp(backend, api, body, timeout)
    return await _tgi(backend, api, body, timeout)


async def _vllm(backend: BackendConfig, api: str, body: dict[str, Any], timeout: float) -> int | None:
    if api == _CHAT:
        request: dict[str, Any] = {"messages": body.get("messages"), "add_generation_prompt": True}
        if body.get("tools"):
            request["tools"] = body["tools"]
    elif isinstance(body.get("prompt"), str | list):
        request = {"prompt": body["prompt"]}
    else:
        return None
    if isinstance(body.get("model"), str):
        request["model"] = body["model"]
    answer = await _post_json(backend, "/tokenize", request, timeout)
    count = answer.get("count") if isinstance(answer, dict) else None
    return count if type(count) is int and count >= 0 else None


async def _tgi(backend: BackendConfig, api: str, body: dict[str, Any], timeout: float) -> int | None:
    if api == _CHAT:
        answer = await _post_json(backend, "/chat_tokenize", {"messages": body.get("messages"),
                                                                "tools": body.get("tools")}, timeout)
        tokens = answer.get("tokenize_response") if isinstance(answer, dict) else None
    else:
        text = body.get("inputs") if api == _TGI else body.get("prompt")
        if not isinstance(text, str):
            return None
        tokens = await _post_json(backend, "/tokenize", {"inputs": text}, timeout)
    return len(tokens) if isinstance(tokens, list) else None


async def _llamacpp(backend: BackendConfig, api: str, body: dict[str, Any], timeout: float) -> int | None:
    if api == _CHAT:
        request = {key: body[key] for key in ("messages", "tools") if body.get(key) is not None}
        rendered = await _post_json(backend, "/apply-template", request, timeout)
        text = rendered.get("prompt") if isinstance(rendered, dict) else None
        return await _llamacpp_text(backend, text, timeout) if isinstance(text, str) else None
    prompt = next((body[key] for key in _LLAMACPP_TEXT_KEYS if key in body), None)
    if _token_ids(prompt):
        return len(prompt)  # one prompt given as token ids
    if isinstance(prompt, list) and 0 < len(prompt) <= LLAMACPP_MAX_PROMPTS:
        return await _llamacpp_batch(backend, prompt, timeout)
    return await _llamacpp_text(backend, prompt, timeout) if isinstance(prompt, str) else None


async def _llamacpp_batch(backend: BackendConfig, prompts: list[Any], timeout: float) -> int | None:
    """Several prompts (a batch of embeddings or completions): each is tokenized on its own, its special tokens
    included, as llama-server does; None when one is neither text nor token ids."""
    total = 0
    for prompt in prompts:
        if _token_ids(prompt):
            total += len(prompt)
            continue
        count = await _llamacpp_text(backend, prompt, timeout) if isinstance(prompt, str) else None
        if count is None:
            return None
        total += count
    return total


async def _llamacpp_text(backend: BackendConfig, text: str, timeout: float) -> int | None:
    answer = await _post_json(backend, "/tokenize", {"content": text, "add_special": True, "parse_special": True},
                              timeout)
    tokens = answer.get("tokens") if isinstance(answer, dict) else None
    return len(tokens) if isinstance(tokens, list) else None


def _token_ids(prompt: Any) -> bool:
    return isinstance(prompt, list) and all(type(token) is int for token in prompt)


async def _post_json(backend: BackendConfig, path: str, request: dict[str, Any], timeout: float) -> Any:
    response = await probe_post(backend, path, request, timeout)
    if not 200 <= response.status < 300:
        raise ProbeError(f"POST {path}: status {response.status}", response.status)
    try:
        return orjson.loads(response.body)
    except orjson.JSONDecodeError:
        raise ProbeError(f"POST {path}: not JSON", response.status) from None
