"""model: auto: the first routing.auto rule a request meets picks its model; none → a 400 saying why
(llmproxy/fleet/auto.py)."""

from __future__ import annotations

import pytest

from llmproxy.config.model import AutoRuleConfig as AutoRule
from llmproxy.errors import ProxyError
from llmproxy.fleet.auto import AutoRules

RULES = AutoRules([
    AutoRule("tiny", max_prompt_tokens=200, max_output_tokens=256, needs_tools=False, needs_images=False),
    AutoRule("vision", needs_images=True, max_prompt_tokens=4000),
    AutoRule("coder", needs_tools=True),
    AutoRule("big", max_prompt_tokens=100_000),
])
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}


def chat(text: str = "hi", **extra) -> dict:
    return {"model": "auto", "messages": [{"role": "user", "content": text}], **extra}


@pytest.mark.parametrize(("body", "model"), [
    (chat(max_tokens=100), "tiny"),  # short, capped, no tools, no image: the cheapest
    (chat(), "big"),  # no output cap: not tiny; no image, no tools
    (chat(max_tokens=1000), "big"),  # cap over tiny's
    (chat("word " * 2000, max_tokens=100), "big"),  # prompt over tiny's
    ({"model": "auto", "messages": [{"role": "user", "content": [{"type": "text", "text": "what?"}, IMAGE]}],
      "max_tokens": 10}, "vision"),
    (chat(max_tokens=10, tools=[{"type": "function", "function": {"name": "f"}}]), "coder"),
    ({"model": "auto", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "vision"),  # Responses
    ({"model": "auto", "messages": [{"role": "user", "content": "see", "images": ["AA"]}]}, "vision"),  # Ollama
    ({"model": "auto", "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 50}}, "tiny"),
])
def test_the_first_rule_a_request_meets_picks_its_model(body: dict, model: str):
    assert RULES.choose(body) == model


def test_a_request_no_rule_fits_is_refused_saying_what_each_rule_missed():
    rules = AutoRules([AutoRule("tiny", max_prompt_tokens=10, needs_tools=False),
                       AutoRule("mid", max_output_tokens=100)])
    with pytest.raises(ProxyError) as raised:
        rules.choose(chat("word " * 100, tools=[{"type": "function", "function": {"name": "f"}}]))
    error = raised.value
    assert error.kind == "no_auto_rule" and error.spec.status == 400
    assert "rule 1 (tiny): the request offers tools, prompt ~" in error.message
    assert "> max_prompt_tokens 10" in error.message
    assert "rule 2 (mid): no output cap set (max_output_tokens 100)" in error.message
