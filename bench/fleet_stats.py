"""bench.fleet's figures, from the raw phases alone: TTFT, cache hits, in-flight balance, stickiness, the kill.

Every function takes the JSON-shaped phases bench.fleet records (a turn per request, an in-flight sample per
period, the mocks' counters), so the figures can be recomputed from a saved run.
"""

from __future__ import annotations

import argparse
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from bench.fleet_trace import Trace
from bench.stats import percentile
from llmproxy.fleet.prefix import AffinityKeys, HashRing

TTFT_TARGET = 2.0  # prefix_affinity's mean TTFT at least this many times lower than least_connections'
INFLIGHT_BASE = 1.25  # the in-flight target is max/mean <= INFLIGHT_BASE + epsilon (issue 16)


def ms_summary(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    if not values:
        return {"n": 0}
    return {"n": len(values), "mean": sum(values) / len(values), "p50": percentile(values, 50),
            "p90": percentile(values, 90), "p99": percentile(values, 99), "max": values[-1]}


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


# --- in-flight balance ----------------------------------------------------------------------------


def inflight(samples: list[dict[str, Any]], until: float | None = None) -> dict[str, Any]:
    """Balance of the backends' in-flight requests over the samples (taken before `until`, if given).

    - max_over_mean: Σ over samples of the busiest backend's in-flight / Σ of the mean over backends. Each
      sample weighs by its load, so the nearly idle start and end of a phase (one request in flight is max/mean
      = N) do not dominate; this is the figure held against the target;
    - sample_p50 / sample_p99: the per-sample max/mean, over samples with at least one request per backend;
    - busiest_share: the busiest backend's mean in-flight over the run / the mean over backends;
    - per_backend: each backend's mean and peak in-flight.
    """
    maxima = means = 0.0
    per_sample = []
    totals: dict[str, float] = defaultdict(float)
    peaks: dict[str, int] = defaultdict(int)
    used = 0
    for sample in samples:
        if until is not None and sample["t"] > until:
            break
        values = {name: sample["inflight"][name] for name in sample["available"] if name in sample["inflight"]}
        if not values:
            continue
        used += 1
        for name, value in values.items():
            totals[name] += value
            peaks[name] = max(peaks[name], value)
        mean = sum(values.values()) / len(values)
        maxima += max(values.values())
        means += mean
        if mean >= 1:
            per_sample.append(max(values.values()) / mean)
    per_sample.sort()
    per_backend = {name: {"mean": totals[name] / used, "peak": peaks[name]} for name in sorted(totals)} if used else {}
    backend_means = [b["mean"] for b in per_backend.values()]
    return {"samples": used, "max_over_mean": ratio(maxima, means), "sample_p50": percentile(per_sample, 50),
            "sample_p99": percentile(per_sample, 99),
            "busiest_share": ratio(max(backend_means, default=0.0), sum(backend_means) / max(len(backend_means), 1)),
            "mean_total": means * len(per_backend) / used if used else math.nan, "per_backend": per_backend}


# --- where sessions went --------------------------------------------------------------------------


@dataclass
class Ring:
    """The proxy's own consistent-hash ring and keys (llmproxy.fleet.prefix), to name each session's home."""

    names: list[str]
    keys: dict[int, int]  # session id -> affinity key

    @classmethod
    def of(cls, trace: Trace, names: list[str], session_header: bool, max_tokens: int) -> Ring:
        import orjson

        affinity = AffinityKeys(1024, "x-session-id")  # the proxy's defaults, as bench.fleet configures it
        keys = {}
        for session in trace.sessions:
            headers = [(b"x-session-id", f"session-{session.id}".encode())] if session_header else []
            key = affinity.key(headers, orjson.loads(session.body(trace.system, 0, max_tokens)))
            if key is not None:
                keys[session.id] = key
        return cls(names, keys)

    def home(self, session: int, without: frozenset[str] = frozenset()) -> str | None:
        """The first backend on the ring from the session's key, passing over `without`."""
        members = [_Member(name) for name in self.names if name not in without]
        key = self.keys.get(session)
        if key is None or not members:
            return None
        return next(HashRing(members).walk(key))


@dataclass
class _Member:
    name: str
    weight: int = 1
    in_flight: int = 0


@dataclass(frozen=True)
class Model:
    """The mocks' prefix-cache model: what a request's first byte waits for, by design."""

    sizes: list[list[int]]  # prompt tokens per session and turn (Trace.prompt_tokens)
    base_ms: float
    us_per_token: float

    def prefill_ms(self, turn: dict[str, Any]) -> float:
        """The first-byte delay the mock charged this request: base + µs per prompt token not found cached."""
        prompt = self.sizes[turn["session"]][turn["turn"]]
        return self.base_ms + self.us_per_token * (prompt - max(turn["hit_tokens"], 0)) / 1000


def stickiness(turns: list[dict[str, Any]], until: float | None = None) -> dict[str, Any]:
    """How often a session's next turn went to another backend than its previous one (ok turns, by start)."""
    last: dict[int, str] = {}
    moves = pairs = 0
    for turn in turns:
        if not turn["ok"] or turn["backend"] is None or (until is not None and turn["start_s"] > until):
            continue
        previous = last.get(turn["session"])
        if previous is not None:
            pairs += 1
            moves += previous != turn["backend"]
        last[turn["session"]] = turn["backend"]
    return {"pairs": pairs, "moves": moves, "move_share": ratio(moves, pairs)}


def homes(turns: list[dict[str, Any]], ring: Ring, model: Model) -> dict[str, Any]:
    """prefix_affinity: the share of turns served by their key's first backend on the ring (not spilled); the
    TTFT and modelled prefill of those served at home and of those spilled to another backend; and the spilled
    turns' share of all the prefill the cache model charged."""
    ttft: dict[bool, list[float]] = {True: [], False: []}
    prefill: dict[bool, list[float]] = {True: [], False: []}
    cache = {}
    for turn in turns:
        if not turn["ok"] or turn["backend"] is None:
            continue
        session = turn["session"]
        if session not in cache:
            cache[session] = ring.home(session)
        at_home = turn["backend"] == cache[session]
        ttft[at_home].append(turn["ttft_ms"])
        prefill[at_home].append(model.prefill_ms(turn))
    served = len(ttft[True]) + len(ttft[False])
    return {"home_share": ratio(len(ttft[True]), served), "spilled": len(ttft[False]),
            "ttft_home_ms": ms_summary(ttft[True]), "ttft_spilled_ms": ms_summary(ttft[False]),
            "prefill_home_ms": ms_summary(prefill[True]), "prefill_spilled_ms": ms_summary(prefill[False]),
            "spilled_prefill_share": ratio(sum(prefill[False]), sum(prefill[True]) + sum(prefill[False]))}


# --- one strategy's phases ------------------------------------------------------------------------


def strategy_figures(phases: list[dict[str, Any]], ring: Ring | None, model: Model) -> dict[str, Any]:
    """One strategy's figures over its phases (repeats pooled)."""
    turns = [turn for phase in phases for turn in phase["turns"]]
    ok = [turn for turn in turns if turn["ok"]]
    queries = sum(m["prefix_cache_queries_total"] for phase in phases for m in phase["mocks"].values())
    hits = sum(m["prefix_cache_hits_total"] for phase in phases for m in phase["mocks"].values())
    requests: dict[str, int] = defaultdict(int)
    for turn in ok:
        requests[turn["backend"] or "?"] += 1
    balance = [inflight(phase["samples"]) for phase in phases]
    moved = [stickiness(phase["turns"]) for phase in phases]
    out = {
        "phases": [phase["tag"] for phase in phases], "seconds": [phase["seconds"] for phase in phases],
        "requests": len(turns), "ok": len(ok), "errors": len(turns) - len(ok),
        "ttft_ms": ms_summary([turn["ttft_ms"] for turn in ok]),
        "prefill_ms": ms_summary([model.prefill_ms(turn) for turn in ok]),
        "prompt_tokens_counted": sum(model.sizes[turn["session"]][turn["turn"]] for turn in turns),
        "hit_rate": ratio(hits, queries), "prompt_tokens": queries, "hit_tokens": hits,
        "hit_tokens_header": sum(max(turn["hit_tokens"], 0) for turn in ok),
        "requests_per_backend": dict(sorted(requests.items())),
        "inflight": _pooled_balance(balance),
        "moves": {"pairs": sum(m["pairs"] for m in moved), "moves": sum(m["moves"] for m in moved)},
        "core_busy": _core_busy(phases), "ttft_by_turn": ttft_by_turn(ok),
    }
    out["moves"]["move_share"] = ratio(out["moves"]["moves"], out["moves"]["pairs"])
    if ring is not None:
        out["homes"] = homes(turns, ring, model)
    return out


def _pooled_balance(balance: list[dict[str, Any]]) -> dict[str, Any]:
    if len(balance) == 1:
        return balance[0]
    keys = ("max_over_mean", "sample_p50", "sample_p99", "busiest_share", "mean_total")
    return {key: sum(b[key] for b in balance) / len(balance) for key in keys} | {"per_phase": balance}


def _core_busy(phases: list[dict[str, Any]]) -> dict[str, float]:
    """Shares of each core over the phases: the proxies', the mocks', the load generator's, and in all."""
    seconds = sum(phase["seconds"] for phase in phases)
    total: dict[str, float] = defaultdict(float)
    for phase in phases:
        for key, value in phase["cpu_s"].items():
            if math.isfinite(value):
                total["mocks" if key.startswith("mock_b") else key] += value
    if not seconds:
        return {}
    out = {key: value / seconds for key, value in total.items()}
    if "proxy_core_busy" in out:  # what went to processes not ours (other sessions' tests, say), each core
        out["others_proxy_core"] = max(out["proxy_core_busy"] - out.get("proxies", 0.0), 0.0)
        out["others_mock_core"] = max(out["mock_core_busy"] - out.get("mocks", 0.0) - out.get("loadgen", 0.0), 0.0)
    return out


def ttft_by_turn(ok: list[dict[str, Any]]) -> list[float]:
    """Mean TTFT (ms) of each turn index, over the sessions that got that far."""
    sums: dict[int, list[float]] = defaultdict(list)
    for turn in ok:
        sums[turn["turn"]].append(turn["ttft_ms"])
    return [sum(sums[i]) / len(sums[i]) for i in range(max(sums) + 1)] if sums else []


# --- the kill phase -------------------------------------------------------------------------------


MAJORITY = 3  # turns each side of the kill whose most frequent backend is a session's, to see past single spills


def sides(turns: list[dict[str, Any]], at: float, window: int) -> dict[int, tuple[str, str]]:
    """Each session with ok turns on both sides of `at`: (its backend before, its backend after), each the most
    frequent among its last `window` turns that ended before `at` / its first `window` that started after it
    (ties: the turn nearest `at`)."""
    before: dict[int, list[str]] = defaultdict(list)
    after: dict[int, list[str]] = defaultdict(list)
    for turn in turns:  # by start time
        if not turn["ok"] or turn["backend"] is None:
            continue
        if turn["start_s"] + turn["total_ms"] / 1000 <= at:
            before[turn["session"]].append(turn["backend"])
        elif turn["start_s"] >= at:
            after[turn["session"]].append(turn["backend"])
    return {session: (Counter(reversed(before[session][-window:])).most_common(1)[0][0],
                      Counter(after[session][:window]).most_common(1)[0][0])
            for session in before if session in after}


def moves(turns: list[dict[str, Any]], at: float, victim: str, window: int) -> dict[str, Any]:
    """Across `at`: the sessions on `victim` before, those elsewhere, and how many of each changed backend."""
    pairs = sides(turns, at, window)
    on_victim = [s for s, (b, _) in pairs.items() if b == victim]
    others = [s for s, (b, _) in pairs.items() if b != victim]
    others_moved = sum(1 for s in others if pairs[s][1] != pairs[s][0])
    victim_moved = sum(1 for s in on_victim if pairs[s][1] != victim)
    return {"window": window, "sessions": len(pairs), "on_victim": len(on_victim), "victim_moved": victim_moved,
            "others": len(others), "others_moved": others_moved, "others_moved_share": ratio(others_moved, len(others)),
            "remapped_share": ratio(others_moved + victim_moved, len(pairs))}


def kill_figures(phase: dict[str, Any], ring: Ring | None, backends: int,
                 control: dict[str, Any] | None) -> dict[str, Any]:
    """Which sessions changed backend across the kill, by their last turn before it and first after it, and by
    the majority of MAJORITY turns each side; `control`, a prefix_affinity phase without a kill, gives the same
    figures at the same moment: what spills alone move."""
    victim, at = phase["killed"]["backend"], phase["killed"]["at_s"]
    out: dict[str, Any] = {"victim": victim, "at_s": at, "seconds": phase["seconds"]}
    if at is None:
        return out | {"note": "the trace ended before the kill"}
    failed = [t for t in phase["turns"] if not t["ok"]]
    ok_after = [t["ttft_ms"] for t in phase["turns"] if t["ok"] and t["start_s"] >= at]
    ok_before = [t["ttft_ms"] for t in phase["turns"] if t["ok"] and t["start_s"] < at]
    out.update({
        "last_first": moves(phase["turns"], at, victim, 1), "majority": moves(phase["turns"], at, victim, MAJORITY),
        "control": ({"last_first": moves(control["turns"], at, victim, 1),
                     "majority": moves(control["turns"], at, victim, MAJORITY), "tag": control["tag"]}
                    if control else None),
        "expected_share": 1 / backends, "failed_requests": len(failed), "errors": _kinds(failed),
        "proxy_retried": sum(1 for t in phase["turns"] if (t.get("retries") or 0) > 0),
        "ttft_before_ms": ms_summary(ok_before), "ttft_after_ms": ms_summary(ok_after),
        "core_busy": _core_busy([phase]), "churn_before": stickiness(phase["turns"], until=at),
        "churn_after": _churn_after(phase["turns"], at),
    })
    if ring is not None:
        ring_victims = [s for s in ring.keys if ring.home(s) == victim]
        out["ring_victim_share"] = ratio(len(ring_victims), len(ring.keys))
        out["ring_unchanged_others"] = all(ring.home(s, frozenset({victim})) == ring.home(s)
                                           for s in ring.keys if ring.home(s) != victim)
    return out


def _churn_after(turns: list[dict[str, Any]], at: float) -> dict[str, Any]:
    """Turn-to-turn backend changes among turns that started after the kill (the move itself not counted)."""
    return stickiness([t for t in turns if t["start_s"] >= at])


def _kinds(failed: list[dict[str, Any]]) -> dict[str, int]:
    kinds: dict[str, int] = defaultdict(int)
    for turn in failed:
        kinds[(turn["error"] or "unknown")[:120]] += 1
    return dict(kinds)


# --- everything -----------------------------------------------------------------------------------


def analyse(result: dict[str, Any], trace: Trace, args: argparse.Namespace) -> dict[str, Any]:
    """The figures of a run: per strategy, the targets, the kill phase, and what failed."""
    names = [f"b{i}" for i in range(args.backends)]
    ring = Ring.of(trace, names, args.session_header, args.max_tokens) if result["phases"] or result["kill"] else None
    by_strategy: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for phase in result["phases"]:
        by_strategy[phase["strategy"]].append(phase)
    model = Model(trace.prompt_tokens(), args.base_ttft_ms, args.prefill_us)
    strategies = {name: strategy_figures(phases, ring if name == "prefix_affinity" else None, model)
                  for name, phases in by_strategy.items()}
    control = by_strategy["prefix_affinity"][-1] if by_strategy.get("prefix_affinity") else None
    figures: dict[str, Any] = {"strategies": strategies, "targets": targets(strategies, args.epsilon),
                               "kill": kill_figures(result["kill"], ring, args.backends, control)
                               if result["kill"] else None}
    figures["failed"] = failed_checks(result, strategies)
    return figures


def targets(strategies: dict[str, dict[str, Any]], epsilon: float) -> list[dict[str, Any]]:
    rows = []
    affinity, least = strategies.get("prefix_affinity"), strategies.get("least_connections")
    if affinity and least:
        measured = ratio(least["ttft_ms"].get("mean", math.nan), affinity["ttft_ms"].get("mean", math.nan))
        rows.append({"what": "mean TTFT, least_connections / prefix_affinity", "bound": f"≥ {TTFT_TARGET:g}",
                     "measured": measured, "met": measured >= TTFT_TARGET})
        modelled = ratio(least["prefill_ms"].get("mean", math.nan), affinity["prefill_ms"].get("mean", math.nan))
        rows.append({"what": "the same, of the prefill the cache model charged (untargeted)", "bound": "",
                     "measured": modelled, "met": None})
    if affinity:
        bound = INFLIGHT_BASE + epsilon
        measured = affinity["inflight"]["max_over_mean"]
        rows.append({"what": "prefix_affinity max/mean in-flight", "bound": f"≤ {bound:g} (1.25 + ε)",
                     "measured": measured, "met": measured <= bound})
    return rows


def failed_checks(result: dict[str, Any], strategies: dict[str, dict[str, Any]]) -> list[str]:
    """What makes the run untrustworthy (not a missed target): failed requests outside the kill phase, turns the
    access log does not name a backend for, /health reads that failed."""
    failed = []
    for name, figures in strategies.items():
        if figures["errors"]:
            failed.append(f"{name}: {figures['errors']} failed requests")
        if not figures["errors"] and figures["prompt_tokens_counted"] != figures["prompt_tokens"]:
            # the modelled prefill rests on counting prompts as the mock does
            failed.append(f"{name}: the mocks looked up {figures['prompt_tokens']:,} prompt tokens, the trace counts "
                          f"{figures['prompt_tokens_counted']:,}")
    for phase in [*result["phases"], *([result["kill"]] if result["kill"] else [])]:
        if phase["unlogged"]:
            failed.append(f"{phase['tag']} ({phase['strategy']}): {phase['unlogged']} requests missing from the "
                          "proxy's access log")
        if phase["sample_failures"]:
            failed.append(f"{phase['tag']} ({phase['strategy']}): {phase['sample_failures']} /health reads failed")
    kill = result["kill"]
    if kill:
        sessions = {t["session"] for t in kill["turns"]}
        finished = {t["session"] for t in kill["turns"] if t["ok"]}
        if len(sessions) != len(finished):
            failed.append(f"kill phase: {len(sessions) - len(finished)} sessions never got an answer")
    return failed


def headline(figures: dict[str, Any]) -> dict[str, Any]:
    """Flat keys for a summary: ttft_mean_ms_<strategy>, ttft_p99_ms_<strategy>, hit_rate_<strategy>,
    inflight_max_over_mean_<strategy>, ttft_mean_ratio_least_connections_over_prefix_affinity, kill_*, errors."""
    out: dict[str, Any] = {}
    for name, s in figures["strategies"].items():
        out[f"ttft_mean_ms_{name}"] = s["ttft_ms"].get("mean")
        out[f"ttft_p99_ms_{name}"] = s["ttft_ms"].get("p99")
        out[f"hit_rate_{name}"] = s["hit_rate"]
        out[f"inflight_max_over_mean_{name}"] = s["inflight"]["max_over_mean"]
    for row in figures["targets"]:
        if row["what"].startswith("mean TTFT"):
            out["ttft_mean_ratio_least_connections_over_prefix_affinity"] = row["measured"]
    kill = figures["kill"]
    if kill and kill.get("at_s") is not None:
        for how in ("last_first", "majority"):
            out[f"kill_others_moved_share_{how}"] = kill[how]["others_moved_share"]
            out[f"kill_remapped_share_{how}"] = kill[how]["remapped_share"]
    out["errors"] = sum(s["errors"] for s in figures["strategies"].values())
    return out
