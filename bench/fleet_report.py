"""bench.fleet's Markdown report, from the figures alone (bench/README.md says how to read it)."""

from __future__ import annotations

import argparse
from typing import Any

from bench.harness import MAX_ERRORS_SHOWN, md_row, ms, num, report_head, result_line

NOISY = 0.2  # other processes' share of a core above which the report warns


def report(command: str, info: dict[str, Any], args: argparse.Namespace, setup: dict[str, Any], order: list[str],
           figures: dict[str, Any]) -> str:
    trace = setup["trace"]
    parts = [*report_head("bench.fleet", command, info),
             f"- backends: {setup['backends']} vLLM mocks with the prefix-cache model: each caches "
             f"{setup['cache_tokens']:,} tokens ({args.cache_share:.2f} of the trace's working set at its peak, "
             f"{setup['working_set_tokens']:,} tokens: the live conversations' prompts at the busiest turn; "
             f"{setup['final_working_set_tokens']:,} at the end); first byte after "
             f"{args.base_ttft_ms:g} ms + {args.prefill_us:g} µs per prompt token not found cached; answers of "
             f"{args.max_tokens} tokens, {args.delay_ms:g} ms apart",
             f"- trace (seed {setup['seed']}): {trace['sessions']} sessions starting within {trace['stagger_s']:g} s, "
             f"{trace['turns_min']}-{trace['turns_max']} turns (mean {trace['turns_mean']:.1f}), {trace['requests']:,} "
             f"requests; a shared system prompt of {trace['system_chars']:,} characters, a first user message of "
             f"{args.first_chars:,}, then +{trace['growth_chars'][0]:,}-{trace['growth_chars'][1]:,} characters a "
             f"turn (longest conversation {trace['last_prompt_chars_max']:,}); {trace['think_ms'][0]:g}-"
             f"{trace['think_ms'][1]:g} ms between a stream's end and the next turn; "
             + ("each session sends `x-session-id`" if args.session_header else
                "no session id: prefix_affinity keys on the first user message"),
             f"- proxies: one per strategy, access log to a file, everything else default "
             f"(prefix_affinity: ε = {args.epsilon:g}, key_chars 1024)",
             f"- order: {', '.join(order)}" + (", then the kill phase" if figures["kill"] else "")
             + "; every mock's cache is flushed before each phase", ""]
    strategies = figures["strategies"]
    if strategies:
        parts += ["### Strategies", "", strategy_table(strategies), "", *strategy_notes(strategies), ""]
    if figures["targets"]:
        parts += ["### Targets", "", targets_table(figures["targets"]), ""]
    if figures["kill"]:
        parts += ["### Kill phase (prefix_affinity)", "", *kill_section(figures["kill"]), ""]
    parts += ["### Checks", "", result_line(figures["failed"])]
    return "\n".join(parts)


def strategy_table(strategies: dict[str, dict[str, Any]]) -> str:
    head = ["strategy", "requests", "TTFT mean", "p50", "p90", "p99", "modelled prefill mean", "cache hit rate",
            "max/mean in-flight", "per-sample p99", "busiest backend", "mean in-flight", "turns moved", "errors",
            "seconds"]
    rows = [md_row(head), "|:---|" + "---:|" * (len(head) - 1)]
    for name, s in strategies.items():
        t, f = s["ttft_ms"], s["inflight"]
        rows.append(md_row([
            name, f"{s['requests']:,}", ms(t.get("mean")), ms(t.get("p50")), ms(t.get("p90")), ms(t.get("p99")),
            ms(s["prefill_ms"].get("mean")), num(s["hit_rate"], ".1%"), num(f["max_over_mean"], ".2f"),
            num(f["sample_p99"], ".2f"), num(f["busiest_share"], ".2f"), num(f["mean_total"], ".1f"),
            num(s["moves"]["move_share"], ".0%"), str(s["errors"]), " / ".join(f"{v:.1f}" for v in s["seconds"])]))
    return "\n".join(rows)


def strategy_notes(strategies: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["TTFT in ms, at the client. *Modelled prefill*: the first-byte delay the mocks' cache model charged "
             "(base + µs per uncached prompt token, from the hit header): TTFT less the rest, chiefly each mock's "
             "own CPU time for the request (tokenizing the prompt) and its wait for the shared core. "
             "*Cache hit rate*: prompt tokens the mocks found cached / prompt tokens "
             "(their counters). *Max/mean in-flight*: Σ over samples of the busiest backend's in-flight requests "
             "/ Σ of the mean over backends (the proxy's /health, every sample period); *per-sample p99*: of "
             "max/mean in one sample, over samples with a mean of at least 1; *busiest backend*: its mean "
             "in-flight over the phase / the mean over backends. *Turns moved*: a session's turn served by "
             "another backend than its previous turn.", ""]
    for name, s in strategies.items():
        per_backend = ", ".join(f"{b} {n:,}" for b, n in s["requests_per_backend"].items())
        lines.append(f"- {name}: requests per backend {per_backend}; {busy_text(s['core_busy'])}")
        homes = s.get("homes")
        if homes:
            lines.append(f"  - served by the key's first backend on the ring: {num(homes['home_share'], '.1%')} "
                         f"({homes['spilled']} turns spilled by the load bound); TTFT mean at home "
                         f"{ms(homes['ttft_home_ms'].get('mean'))} ms, spilled "
                         f"{ms(homes['ttft_spilled_ms'].get('mean'))} ms; modelled prefill at home "
                         f"{ms(homes['prefill_home_ms'].get('mean'))} ms, spilled "
                         f"{ms(homes['prefill_spilled_ms'].get('mean'))} ms: the spilled turns took "
                         f"{num(homes['spilled_prefill_share'], '.0%')} of all the prefill")
    return lines


def busy_text(busy: dict[str, float]) -> str:
    """Our processes' shares of their cores, and what other processes took (a WARNING when it is much)."""
    text = (f"core busy: proxies {num(busy.get('proxies'), '.0%')}, mocks {num(busy.get('mocks'), '.0%')} + load "
            f"generator {num(busy.get('loadgen'), '.0%')}")
    if "others_mock_core" in busy:
        text += (f"; other processes: {num(busy['others_proxy_core'], '.0%')} of the proxies' core, "
                 f"{num(busy['others_mock_core'], '.0%')} of the mocks' (steal "
                 f"{num(busy.get('mock_core_steal'), '.0%')})")
        if max(busy["others_proxy_core"], busy["others_mock_core"]) > NOISY:
            text += " — WARNING: a busy neighbour; its TTFTs are inflated"
    return text


def targets_table(rows: list[dict[str, Any]]) -> str:
    lines = [md_row(["target", "bound", "measured", "result"]), "|:---|:---|---:|:---|"]
    for row in rows:
        result = "untargeted" if row["met"] is None else "met" if row["met"] else "missed"
        lines.append(md_row([row["what"], row["bound"], num(row["measured"], ".2f"), result]))
    return "\n".join(lines)


def kill_section(kill: dict[str, Any]) -> list[str]:
    if kill.get("at_s") is None:
        return [f"- {kill.get('note', 'no kill')}"]
    victim = kill["victim"]
    lines = [f"- killed {victim} (SIGKILL) at {kill['at_s']:.2f} s of {kill['seconds']:.1f} s. A session's backend "
             "before and after: that of its last turn before the kill and of its first after it; or the most "
             "frequent of its last / first three (past single spills). *Control*: the same figures at the same "
             "moment in the prefix_affinity phase without a kill: what spills of the load bound move anyway.", "",
             md_row(["", "sessions across", f"on {victim} before", "of them moved", f"others (not on {victim})",
                     "**others moved**", "**all remapped**"]), "|:---|" + "---:|" * 6]
    control = kill.get("control") or {}
    for label, figures in (("kill, last / first turn", kill["last_first"]), ("kill, majority of 3", kill["majority"]),
                           ("control, last / first turn", control.get("last_first")),
                           ("control, majority of 3", control.get("majority"))):
        if figures:
            lines.append(md_row([label, str(figures["sessions"]), str(figures["on_victim"]),
                                 str(figures["victim_moved"]), str(figures["others"]),
                                 f"{figures['others_moved']} ({num(figures['others_moved_share'], '.1%')})",
                                 num(figures["remapped_share"], ".1%")]))
    lines += [
        "",
        f"- 1/N = {kill['expected_share']:.1%}"
        + (f"; keys whose first backend on the ring is {victim}: {num(kill['ring_victim_share'], '.1%')}; the "
           f"others' first backend is the same without {victim}: {kill['ring_unchanged_others']}"
           if "ring_victim_share" in kill else ""),
        f"- turn-to-turn backend changes: before the kill {num(kill['churn_before']['move_share'], '.1%')} of "
        f"{kill['churn_before']['pairs']} pairs, after it {num(kill['churn_after']['move_share'], '.1%')} of "
        f"{kill['churn_after']['pairs']}",
        f"- TTFT mean before the kill {ms(kill['ttft_before_ms'].get('mean'))} ms, after "
        f"{ms(kill['ttft_after_ms'].get('mean'))} ms (p99 {ms(kill['ttft_before_ms'].get('p99'))} / "
        f"{ms(kill['ttft_after_ms'].get('p99'))})",
        f"- {busy_text(kill['core_busy'])}",
        f"- failed requests (streams cut by the kill; the session sends the turn again): {kill['failed_requests']}; "
        f"requests the proxy retried on another backend: {kill['proxy_retried']}",
    ]
    for message, count in list(kill["errors"].items())[:MAX_ERRORS_SHOWN]:
        lines.append(f"    {count} x {message}")
    return lines


def error_report(result: dict[str, Any]) -> str:
    """The failed requests of the strategy phases (the kill phase's are expected and in the report)."""
    lines = []
    for phase in result["phases"]:
        failed = [t for t in phase["turns"] if not t["ok"]]
        if failed:
            lines.append(f"- {phase['tag']} {phase['strategy']}: {len(failed)} failed requests, e.g.:")
            kinds: dict[str, int] = {}
            for turn in failed:
                kinds[turn["error"] or "unknown"] = kinds.get(turn["error"] or "unknown", 0) + 1
            lines += [f"    {n} x {message}" for message, n in list(kinds.items())[:MAX_ERRORS_SHOWN]]
    return "\n".join(lines)
