"""A billing consumer's view of a busy day: 1,000 requests through the real openai and ollama clients, across
chat, completions, embeddings and Ollama's native paths, one in ten refused by the backend and one in ten
abandoned by its client mid-stream.

What must hold: exactly one record per request; every completed request's record carries the backend's own
counts; every refused one zero tokens and zero cost; an abandoned one the backend tokenizer's count of its
prompt (vLLM) or an estimate (Ollama); and the sum of cost_usd is the sum of the price table applied to the
records, whose completed part is the backend's own usage.
"""

from __future__ import annotations

import json
import random
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import ollama
import openai
import pytest

from llmproxy.mockbackend import TEMPLATES, prompt_tokens
from tests.support import start_mock, start_proxy, wait_for

N = 1000
VLLM_MODEL, OLLAMA_MODEL = "Qwen/Qwen2.5-7B-Instruct", "llama3.2"
PRICES = {VLLM_MODEL: {"input_per_million": 0.5, "output_per_million": 1.5},
          OLLAMA_MODEL: {"input_per_million": 0.1, "output_per_million": 0.2}}
KINDS = ("chat_stream", "chat", "completions_stream", "completions", "embeddings", "ollama_chat_stream",
         "ollama_chat", "ollama_generate")
STREAMS = ("chat_stream", "completions_stream", "ollama_chat_stream")
REFUSALS = (400, 404, 429, 500, 503)


@dataclass
class Plan:
    rid: str
    kind: str
    fault: str  # "" | "refused" | "aborted"
    status: int = 200  # what the backend is told to answer
    tokens: int = 6
    expected: tuple[int, int] | None = None  # the backend's own (prompt, completion), for a completed request
    outcome: str = ""


def _plans(seed: int = 7) -> list[Plan]:
    rng = random.Random(seed)
    plans = []
    for i in range(N):
        kind = KINDS[i % len(KINDS)]
        roll = rng.random()
        fault = "refused" if roll < 0.1 else "aborted" if roll < 0.2 and kind in STREAMS else ""
        tokens = 40 if fault == "aborted" else rng.randint(2, 12)  # a stream that is still going when left
        plans.append(Plan(f"bill-{i:04d}", kind, fault, rng.choice(REFUSALS) if fault == "refused" else 200,
                          tokens=tokens))
    return plans


def _messages(plan: Plan) -> list[dict]:
    return [{"role": "user", "content": f"Request {plan.rid}: say something about the number {plan.tokens}."}]


def _headers(plan: Plan) -> dict[str, str]:
    headers = {"X-Request-Id": plan.rid, "x-mock-tokens": str(plan.tokens)}
    if plan.fault == "refused":
        headers["x-mock-status"] = str(plan.status)
    if plan.fault == "aborted":
        headers["x-mock-delay-ms"] = "15"  # slow enough that the client leaves mid-stream
    return headers


def _run_openai(client: openai.OpenAI, plan: Plan) -> None:
    headers = _headers(plan)
    try:
        if plan.kind in ("chat_stream", "chat"):
            body = {"model": VLLM_MODEL, "messages": _messages(plan)}
            if plan.kind == "chat":
                response = client.chat.completions.create(**body, extra_headers=headers)
                plan.expected = (response.usage.prompt_tokens, response.usage.completion_tokens)
                plan.outcome = "completed"
                return
            stream = client.chat.completions.create(**body, stream=True, extra_headers=headers)
            plan.expected = (prompt_tokens(body, TEMPLATES["vllm"]), plan.tokens)
            _consume(stream, plan)
            return
        elif plan.kind in ("completions_stream", "completions"):
            body = {"model": VLLM_MODEL, "prompt": f"Request {plan.rid}: once upon a time"}
            if plan.kind == "completions":
                response = client.completions.create(**body, extra_headers=headers)
                plan.expected = (response.usage.prompt_tokens, response.usage.completion_tokens)
                plan.outcome = "completed"
                return
            stream = client.completions.create(**body, stream=True, extra_headers=headers)
            plan.expected = (prompt_tokens(body, TEMPLATES["vllm"]), plan.tokens)
            _consume(stream, plan)
            return
        else:
            response = client.embeddings.create(model=VLLM_MODEL, input=[f"{plan.rid} a", "b c d"],
                                                extra_headers=headers)
            plan.expected = (response.usage.prompt_tokens, 0)
        plan.outcome = "completed"
    except openai.APIStatusError as error:
        plan.outcome = f"refused {error.status_code}"


def _consume(stream, plan: Plan) -> None:
    for _ in stream:
        if plan.fault == "aborted":
            stream.close()  # the client leaves after its first event
            plan.outcome = "aborted"
            return
    plan.outcome = "completed"


def _run_ollama(url: str, plan: Plan) -> None:
    client = ollama.Client(host=url, headers=_headers(plan), timeout=10)
    messages = _messages(plan)
    try:
        if plan.kind == "ollama_generate":
            last = client.generate(model=OLLAMA_MODEL, prompt=messages[0]["content"])
        elif plan.kind == "ollama_chat":
            last = client.chat(model=OLLAMA_MODEL, messages=messages)
        else:
            last = None
            for part in client.chat(model=OLLAMA_MODEL, messages=messages, stream=True):
                if plan.fault == "aborted":
                    plan.outcome = "aborted"
                    client._client.close()  # leave mid-stream: the connection goes
                    return
                last = part
        plan.expected = (last.prompt_eval_count, last.eval_count)
        plan.outcome = "completed"
    except ollama.ResponseError as error:
        plan.outcome = f"refused {error.status_code}"


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def setup(tmp_path):
    vllm, ollama_mock = start_mock("vllm", "--model", VLLM_MODEL), start_mock("ollama", "--model", OLLAMA_MODEL)
    usage = tmp_path / "usage.jsonl"
    proxy = start_proxy(
        tmp_path, [{"url": vllm.url, "name": "vllm", "type": "vllm"},
                   {"url": ollama_mock.url, "name": "ollama", "type": "ollama"}],
        usage={"enabled": True, "spool_dir": str(tmp_path / "spool"),
               "reporters": [{"name": "f", "type": "file", "file": {"path": str(usage)}}]},
        pricing=PRICES, logging={"access_log": "off"})
    yield proxy, usage
    for proc in (proxy, vllm, ollama_mock):
        proc.stop()


def test_a_thousand_mixed_requests_give_exactly_the_right_records(setup):
    proxy, usage = setup
    plans = _plans()
    local = threading.local()

    def run(plan: Plan) -> None:
        if plan.kind.startswith("ollama"):
            _run_ollama(proxy.url, plan)
            return
        if not hasattr(local, "client"):
            local.client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=10)
        _run_openai(local.client, plan)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(run, plans))
    assert not [plan for plan in plans if not plan.outcome], [plan for plan in plans if not plan.outcome][:3]
    outcomes = Counter(plan.outcome.split()[0] for plan in plans)
    assert outcomes["refused"] >= 80 and outcomes["aborted"] >= 20 and sum(outcomes.values()) == N, outcomes

    wait_for(lambda: len(_records(usage)) >= N, timeout=30)
    records = {}
    for record in _records(usage):
        assert record["client_request_id"] not in records, f"two records for {record['client_request_id']}"
        records[record["client_request_id"]] = record
    assert len(records) == N and set(records) == {plan.rid for plan in plans}

    for plan in plans:
        record = records[plan.rid]
        if plan.outcome == "completed":
            assert (record["prompt_tokens"], record["completion_tokens"]) == plan.expected, (plan, record)
            assert record["usage_source"] == "reported" and record["termination"] == "--"
        elif plan.outcome.startswith("refused"):
            assert record["status"] == plan.status, (plan, record)
            assert (record["usage_source"], record["prompt_tokens"], record["completion_tokens"],
                    record["cost_usd"]) == ("none", 0, 0, 0.0), (plan, record)
        else:
            assert record["termination"] in ("CD", "CH"), (plan, record)
            source = "estimated" if plan.kind.startswith("ollama") else "tokenized"
            assert record["usage_source"] == source, (plan, record)
            if source == "tokenized":
                body = {"model": VLLM_MODEL, **({"messages": _messages(plan)} if plan.kind == "chat_stream"
                                                else {"prompt": f"Request {plan.rid}: once upon a time"})}
                assert record["prompt_tokens"] == prompt_tokens(body, TEMPLATES["vllm"]), (plan, record)

    def priced(record: dict) -> float:
        price = PRICES[record["model"]]
        return (record["prompt_tokens"] * price["input_per_million"]
                + record["completion_tokens"] * price["output_per_million"]) / 1e6

    assert sum(r["cost_usd"] for r in records.values()) == pytest.approx(sum(map(priced, records.values())))
    completed = [plan for plan in plans if plan.outcome == "completed"]
    backend_cost = sum((p.expected[0] * PRICES[records[p.rid]["model"]]["input_per_million"]
                        + p.expected[1] * PRICES[records[p.rid]["model"]]["output_per_million"]) / 1e6
                       for p in completed)
    assert sum(records[p.rid]["cost_usd"] for p in completed) == pytest.approx(backend_cost)
