"""bench.fleet's workload: a coding agent's sessions, each a chat conversation that grows every turn.

Every session sends the same system prompt (an agent's instructions, shared by all its sessions), then a
first user message of its own (the task), and on every later turn the whole conversation again with the
previous answer and a new user message (a tool's output) appended, as a coding agent does. The trace is drawn
once from a seed, so every strategy sees the same sessions, texts, start times and pauses.

The texts are random words of seven letters, each with its space one token of the mock's tokenizer (8
characters a token, where a real tokenizer makes 3-4 of source code). The mock's CPU goes mostly to tokenizing,
per token; the four mocks share one core with the load generator, and their time spent tokenizing is time a
request waits that the prefix-cache model does not account for. Fewer tokens per character halve it; the
prefill cost per token (bench.fleet --prefill-us) is set for these tokens.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from typing import Any

import orjson

from llmproxy.mockbackend.textgen import CHATML_QWEN, count_tokens

MODEL = "m"
ASSISTANT_CHARS = (150, 450)  # an answer's length (a short plan or a tool call), within the turn's growth
WORD_LETTERS = 7  # a space and 7 letters: one token of the mock's tokenizer (textgen.CHARS_PER_WORD_PIECE is 8)


def vocabulary(rng: random.Random, size: int = 4000) -> list[str]:
    """Words of WORD_LETTERS letters, each with its leading space."""
    return [" " + "".join(rng.choices(string.ascii_lowercase, k=WORD_LETTERS)) for _ in range(size)]


class TextMaker:
    """Texts of a given length, drawn from one vocabulary with one random generator."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.words = vocabulary(rng)

    def text(self, chars: int) -> str:
        out = "".join(self.rng.choices(self.words, k=chars // (WORD_LETTERS + 1) + 1))
        return out[:chars]


@dataclass
class Session:
    """One conversation: when it starts, and for each turn the user message, the answer appended after it, and
    the pause before the next turn."""

    id: int
    start_s: float
    users: list[str]  # users[t]: the new user message of turn t (users[0]: the session's task)
    answers: list[str]  # answers[t]: the assistant message appended after turn t
    think_s: list[float]  # think_s[t]: the pause after turn t's stream ends
    messages: list[dict[str, str]] = field(default_factory=list, repr=False)  # built turn by turn

    @property
    def turns(self) -> int:
        return len(self.users)

    def body(self, system: str, turn: int, max_tokens: int) -> bytes:
        """The request of `turn`: the system prompt and the conversation up to this turn's user message.

        Turns must be asked for in order (the conversation is kept and extended, not rebuilt); asking for the
        same turn again (a retry) gives the same body.
        """
        if turn == 0:
            self.messages = [{"role": "system", "content": system}, {"role": "user", "content": self.users[0]}]
        elif len(self.messages) < 2 * turn + 2:
            self.messages += [{"role": "assistant", "content": self.answers[turn - 1]},
                              {"role": "user", "content": self.users[turn]}]
        return orjson.dumps({"model": MODEL, "stream": True, "max_tokens": max_tokens, "messages": self.messages})

    def prompt_chars(self, system: str, turn: int) -> int:
        return len(system) + sum(len(u) for u in self.users[:turn + 1]) + sum(len(a) for a in self.answers[:turn])


@dataclass
class Trace:
    system: str
    sessions: list[Session]

    @property
    def requests(self) -> int:
        return sum(session.turns for session in self.sessions)

    def prompt_chars(self) -> int:
        """Characters of every request's conversation, summed: what the mock reads over a run."""
        return sum(s.prompt_chars(self.system, t) for s in self.sessions for t in range(s.turns))

    def prompt_tokens(self) -> list[list[int]]:
        """Each session's prompt tokens at each turn, as the mock's tokenizer and chat template count them."""
        per_message, system = CHATML_QWEN.per_message, count_tokens(self.system) + CHATML_QWEN.per_message
        out = []
        for session in self.sessions:
            size = system + count_tokens(session.users[0]) + per_message
            sizes = [size + CHATML_QWEN.generation]
            for answer, user in zip(session.answers, session.users[1:], strict=True):
                size += count_tokens(answer) + count_tokens(user) + 2 * per_message
                sizes.append(size + CHATML_QWEN.generation)
            out.append(sizes)
        return out

    def working_set_tokens(self) -> tuple[int, int]:
        """(peak, final) working set, in tokens. Peak: the largest sum, over the sessions still running, of their
        prompts at the same turn (sessions start together and go at about the same pace, so this is about the
        most the live conversations hold at once); final: every session's last prompt. The shared system prompt
        counts once."""
        sizes = self.prompt_tokens()
        shared = count_tokens(self.system) + CHATML_QWEN.per_message
        final = sum(s[-1] for s in sizes) - shared * (len(sizes) - 1)
        peak = max(sum(s[k] for s in sizes if len(s) > k) - shared * (sum(1 for s in sizes if len(s) > k) - 1)
                   for k in range(max(map(len, sizes))))
        return peak, final


@dataclass(frozen=True)
class Shape:
    """The trace's parameters (the command line's)."""

    sessions: int
    turns: tuple[int, int]  # per session, drawn uniformly
    growth: tuple[int, int]  # characters a turn adds (answer + user message), drawn uniformly
    system_chars: int
    first_chars: int  # the session's task, its first user message
    think_ms: tuple[float, float]
    stagger_s: float  # sessions start uniformly within this many seconds


def make_trace(shape: Shape, seed: int) -> Trace:
    rng = random.Random(seed)
    maker = TextMaker(rng)
    system = "You are a coding agent. Use the tools to read, edit and test the repository.\n"
    system += maker.text(shape.system_chars - len(system))
    sessions = []
    for i in range(shape.sessions):
        turns = rng.randint(*shape.turns)
        # the task comes first: the proxy keys a conversation on its first user message's opening
        users = [f"Task {i}: fix the failing test in module_{i}.py.\n" + maker.text(shape.first_chars)]
        answers = []
        for _ in range(turns - 1):
            growth = rng.randint(*shape.growth)
            answer = rng.randint(*ASSISTANT_CHARS)
            answers.append(maker.text(answer))
            users.append(maker.text(max(growth - answer, 1)))
        think = [rng.uniform(*shape.think_ms) / 1000 for _ in range(turns)]
        sessions.append(Session(i, rng.uniform(0, shape.stagger_s), users, answers, think))
    return Trace(system, sessions)


def describe(trace: Trace, shape: Shape) -> dict[str, Any]:
    """What the report says of the trace."""
    turns = [s.turns for s in trace.sessions]
    return {"sessions": len(trace.sessions), "requests": trace.requests, "turns_min": min(turns),
            "turns_max": max(turns), "turns_mean": sum(turns) / len(turns), "system_chars": len(trace.system),
            "prompt_chars_total": trace.prompt_chars(), "growth_chars": list(shape.growth),
            "think_ms": list(shape.think_ms), "stagger_s": shape.stagger_s,
            "last_prompt_chars_max": max(s.prompt_chars(trace.system, s.turns - 1) for s in trace.sessions)}
