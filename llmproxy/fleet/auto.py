"""`model: auto`: the model is picked per request by rules, cheapest first (`routing.auto`).

Each rule names a model and the conditions a request must meet to be given it; the first rule the request
meets wins, so a list ordered from the cheapest model to the most capable sends each request to the cheapest
one that can take it. A rule without conditions takes anything (the usual last rule). Conditions:

- `max_prompt_tokens: N`: the prompt is at most N tokens (estimated from the body, as metering estimates it);
- `max_output_tokens: N`: the request caps its output at N or less (max_tokens, max_completion_tokens,
  max_output_tokens); a request that sets no cap does not meet it (its answer may be long);
- `needs_tools: true | false`: the request offers tools (or not);
- `needs_images: true | false`: the request holds an image (or not).

A request no rule fits is refused with a 400 that says, rule by rule, what it did not meet.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from llmproxy.config.model import AutoRuleConfig as AutoRule
from llmproxy.errors import ProxyError
from llmproxy.metering.estimate import estimate_prompt_tokens

AUTO_MODEL = "auto"
_OUTPUT_CAPS = ("max_completion_tokens", "max_tokens", "max_output_tokens", "num_predict", "n_predict")
_IMAGE_TYPES = frozenset({"image_url", "image", "input_image"})


class AutoRules:
    __slots__ = ("rules",)

    def __init__(self, rules: list[AutoRule]) -> None:
        self.rules = rules

    def choose(self, body: Any) -> str:
        """The model of the first rule `body` meets; raises ProxyError (400) naming what each rule missed."""
        request = _Request(body if isinstance(body, dict) else {})
        misses = []
        for index, rule in enumerate(self.rules):
            missed = list(_misses(rule, request))
            if not missed:
                return rule.model
            misses.append(f"rule {index + 1} ({rule.model}): {', '.join(missed)}")
        raise ProxyError("no_auto_rule", "no routing.auto rule fits this request: " + "; ".join(misses))


class _Request:
    """What the rules ask of a request, each worked out once, when first asked."""

    __slots__ = ("_body", "_prompt")

    def __init__(self, body: dict[str, Any]) -> None:
        self._body = body
        self._prompt: int | None = None

    @property
    def prompt_tokens(self) -> int:
        if self._prompt is None:
            self._prompt = estimate_prompt_tokens(self._body)
        return self._prompt

    @property
    def output_cap(self) -> int | None:
        body = self._body
        options = body.get("options") if isinstance(body.get("options"), dict) else {}  # Ollama's native
        for source in (body, options):
            for name in _OUTPUT_CAPS:
                value = source.get(name)
                if type(value) is int:
                    return value
        return None

    @property
    def has_tools(self) -> bool:
        tools = self._body.get("tools")
        return isinstance(tools, list) and bool(tools)

    @property
    def has_images(self) -> bool:
        return any(_holds_image(turn) for turn in _turns(self._body))


def _misses(rule: AutoRule, request: _Request) -> Iterator[str]:
    if rule.needs_tools is not None and request.has_tools != rule.needs_tools:
        yield "the request offers tools" if request.has_tools else "the request offers no tools"
    if rule.needs_images is not None and request.has_images != rule.needs_images:
        yield "the request holds an image" if request.has_images else "the request holds no image"
    if rule.max_output_tokens is not None:
        cap = request.output_cap
        if cap is None:
            yield f"no output cap set (max_output_tokens {rule.max_output_tokens})"
        elif cap > rule.max_output_tokens:
            yield f"output cap {cap} > max_output_tokens {rule.max_output_tokens}"
    if rule.max_prompt_tokens is not None and request.prompt_tokens > rule.max_prompt_tokens:
        yield f"prompt ~{request.prompt_tokens} tokens > max_prompt_tokens {rule.max_prompt_tokens}"


def _turns(body: dict[str, Any]) -> list[Any]:
    for name in ("messages", "input"):
        turns = body.get(name)
        if isinstance(turns, list):
            return turns
    return []


def _holds_image(turn: Any) -> bool:
    """An image part anywhere in a turn's content (a tool result's too); iterative: bodies may nest deep."""
    pending = [turn]
    while pending:
        item = pending.pop()
        if not isinstance(item, dict):
            continue
        if item.get("type") in _IMAGE_TYPES or item.get("images"):  # Ollama's native: `images` on the turn
            return True
        content = item.get("content")
        if isinstance(content, list):
            pending.extend(content)
    return False
