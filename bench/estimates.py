"""How far each way of counting an aborted request's prompt is from the backend's own count.

    python -m bench.estimates [--json out.json]

For every request of the recorded fixtures (tests/fixtures/streams/*.json) and a corpus of request shapes a
coding assistant sends (short and long chats, a system prompt, tool definitions and calls, code, prose in
other scripts), it compares with the count of the backend's own model (the mock's: its chat template
and BPE-like split, llmproxy/mockbackend/textgen.py) three ways the proxy could record the prompt:

- `length/4`: the estimate before: the characters of the message contents / 4;
- `template`: today's estimate (llmproxy/metering/estimate.py): UTF-8 bytes / 4 plus what a chat template adds;
- `tokenized`: the backend's own tokenizer endpoint asked after the request (recount.py), exact where the
  backend has one (vLLM, TGI), else the template estimate.

It prints, per backend dialect, the mean and worst error of each method, in per cent of the backend's count.
No process is started: the backends' counts are the mock's functions, and "tokenized" is what its
/tokenize answers (tests/e2e/test_estimates.py checks that the proxy records exactly that).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

from bench.harness import write_json
from llmproxy.metering.estimate import estimate_prompt_tokens
from llmproxy.mockbackend import TEMPLATES, prompt_tokens

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "streams"
TOKENIZER_KINDS = ("vllm", "tgi")  # catalogue.KINDS with a tokenizer endpoint

CODE = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\nprint([fib(i) for i in range(10)])\n"
TOOLS = [{"type": "function", "function": {"name": "read_file", "description": "Read a file of the repository.",
                                           "parameters": {"type": "object", "properties": {
                                               "path": {"type": "string", "description": "relative path"}},
                                               "required": ["path"]}}},
         {"type": "function", "function": {"name": "run_tests", "description": "Run the test suite.",
                                           "parameters": {"type": "object", "properties": {}}}}]
CORPUS: list[tuple[str, dict[str, Any]]] = [
    ("hi", {"messages": [{"role": "user", "content": "Hi"}]}),
    ("one question", {"messages": [{"role": "user", "content": "What is the capital of France?"}]}),
    ("system + question", {"messages": [{"role": "system", "content": "You are a terse assistant."},
                                        {"role": "user", "content": "Explain TCP slow start in two sentences."}]}),
    ("code review", {"messages": [{"role": "system", "content": "You review Python code."},
                                  {"role": "user", "content": "Is this efficient?\n\n" + CODE}]}),
    ("agent turn with tools", {"messages": [
        {"role": "system", "content": "You are a coding agent. Use the tools to inspect the repository."},
        {"role": "user", "content": "Why does test_pipeline fail?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "read_file", "arguments": '{"path":"x.py"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": CODE * 3},
        {"role": "user", "content": "Fix it."}], "tools": TOOLS}),
    ("long conversation", {"messages": [
        {"role": "user" if i % 2 == 0 else "assistant",
         "content": f"Turn {i}: " + "the quick brown fox jumps over the lazy dog " * (3 + i % 5)}
        for i in range(24)]}),
    ("German prose", {"messages": [{"role": "user", "content": "Können Sie mir bitte erklären, wie die "
                                    "Bundesregierung gewählt wird und welche Rolle der Bundestag spielt?"}]}),
    ("Chinese prose", {"messages": [{"role": "user",
                                     "content": "请用三句话解释什么是机器学习\uff0c以及它的主要应用领域\u3002"}]}),
    ("completion prompt", {"prompt": "Once upon a time, in a land far away, there lived a"}),
]


def old_estimate(body: Any) -> int:
    """The estimate before: characters of the message contents and prompts / 4."""
    chars, pending = 0, [body.get(k) for k in ("messages", "prompt", "input", "inputs", "system", "suffix")]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            chars += len(value)
        elif isinstance(value, list):
            pending.extend(value)
        elif isinstance(value, dict):
            pending.extend(value.get(key) for key in ("content", "text", "input_text"))
    return math.ceil(chars / 4)


def requests() -> list[tuple[str, dict[str, Any]]]:
    found = [(f"fixture {path.stem}", json.loads(path.read_text())["request"])
             for path in sorted(FIXTURES.glob("*.json"))]
    return [(name, body) for name, body in found if isinstance(body, dict)] + CORPUS


def measure() -> dict[str, Any]:
    rows, summary = [], {}
    for dialect, template in TEMPLATES.items():
        errors: dict[str, list[float]] = {"length/4": [], "template": [], "tokenized": []}
        for name, body in requests():
            exact = prompt_tokens(body, template)
            if not exact:
                continue
            counts = {"length/4": old_estimate(body), "template": estimate_prompt_tokens(body),
                      "tokenized": exact if dialect in TOKENIZER_KINDS else estimate_prompt_tokens(body)}
            row = {"dialect": dialect, "request": name, "backend": exact, **counts}
            rows.append(row)
            for method, count in counts.items():
                errors[method].append(100.0 * (count - exact) / exact)
        summary[dialect] = {method: {"mean_abs_pct": round(statistics.fmean(map(abs, values)), 1),
                                     "worst_pct": round(max(values, key=abs), 1)}
                            for method, values in errors.items()}
    return {"rows": rows, "summary": summary}


def report(result: dict[str, Any]) -> str:
    lines = ["| backend (template) | length/4: mean / worst | template estimate: mean / worst | "
             "tokenized: mean / worst |", "|:---|---:|---:|---:|"]
    for dialect, methods in result["summary"].items():
        cells = [f"{m['mean_abs_pct']:.0f} % / {m['worst_pct']:+.0f} %" for m in methods.values()]
        lines.append(f"| {dialect} ({TEMPLATES[dialect].name}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.estimates", description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the rows and the summary here")
    args = parser.parse_args(argv)
    result = measure()
    print(f"{len(requests())} requests; error in % of the backend's own count (negative: under)\n")
    print(report(result))
    write_json(args.json, result, print)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
