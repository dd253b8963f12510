"""bench.translation's Markdown report, from the numbers alone (bench/README.md says how to read it)."""

from __future__ import annotations

import argparse
from typing import Any

from bench.harness import SATURATED, failure_lines, foreign_load, md_row, ms, num, report_head, result_line

MOCK_SIDE = ("mock", "loadgen")


def report(command: str, info: dict[str, Any], args: argparse.Namespace, result: dict[str, Any],
           checks: dict[str, Any], failed: list[str]) -> str:
    parts = [*report_head("bench.translation", command, info),
             "- proxy: one, with two backend entries for the same vLLM mock: **native** (`type: vllm`, model "
             "m-native: every API passed through) and **chat-only** (`type: vllm`, `apis: [chat]`, model m-chat: "
             "Messages and Responses requests translated to chat, each chat chunk re-emitted as their events); "
             "access log off, metering on (the default)",
             "- requests: streamed, `x-mock-eos: 1` (chat's finish_reason is `stop`); Messages with `max_tokens` = "
             "the stream's tokens, Responses with `store: false`", ""]
    if result["levels"]:
        parts += ["### Summary", "", summary(result), ""]
    if result["first_event"]:
        parts += first_event_section(result["first_event"])
    for level in result["levels"]:
        parts += burst_section(level)
    parts += ["### Checks", "", checks_section(checks, failed)]
    return "\n".join(parts)


def summary(result: dict[str, Any]) -> str:
    """One line per path: CPU per event at every level, and its ratio to the path it is compared with."""
    levels = result["levels"]
    paired = (result["first_event"] or {}).get("paired_ms", {})
    lines = []
    for path in levels[0]["per_path"]:
        cells = []
        for level in levels:
            p, r = level["per_path"][path], level["ratios"].get(path)
            ratio = f", {num(r['cpu_per_event'], '.2f')}x {r['versus']}" if r else ""
            cells.append(f"{level_name(level)}: {num(p['cpu_us_per_event'], '.2f')} "
                         f"µs/event{ratio}, {num(p['events_per_s'], ',.0f')} events/s")
        line = f"- **{path}**: " + "; ".join(cells)
        first = next((v for name, v in paired.items() if name.startswith(f"{path} - ")), None)
        if first is not None:
            versus = next(name for name in paired if name.startswith(f"{path} - ")).split(" - ", 1)[1]
            line += f"; first event at c=1, paired p50 vs {versus}: {ms(first.get('p50'))} ms"
        lines.append(line)
    return "\n".join(lines)


def level_name(level: dict[str, Any]) -> str:
    return f"{'burst' if level['burst'] else 'paced'} {level['tokens']} tokens c={level['concurrency']}"


def first_event_section(first: dict[str, Any]) -> list[str]:
    head = ["path", "streams", "first event p50", "p99", "stream p50", "errors"]
    rows = [md_row(head), "|:---|" + "---:|" * (len(head) - 1)]
    for path, ttft in first["ttft_ms"].items():
        rows.append(md_row([path, str(ttft["n"]), ms(ttft.get("p50")), ms(ttft.get("p99")),
                            ms(first["stream_ms"][path].get("p50")), str(first["errors"][path]["count"])]))
    pair_rows = [md_row(["pair", "rounds", "paired p50", "p90"]), "|:---|---:|---:|---:|"]
    for name, diff in first["paired_ms"].items():
        pair_rows.append(md_row([name, str(diff.get("n", 0)), ms(diff.get("p50")), ms(diff.get("p90"))]))
    return [f"### First event at concurrency 1 (paced backend: {first['tokens']} tokens)", "",
            "Time in ms from the request write to the first bytes of the first SSE `data:` event (message_start, "
            "the role chunk, response.created). Paired = median over rounds of the difference between two paths' "
            "streams run back to back on one worker.", "", "\n".join(rows), "", "\n".join(pair_rows), "",
            f"- proxy busy {num(first['proxy_busy'], '.0%')} of its core", ""]


def burst_section(level: dict[str, Any]) -> list[str]:
    head = ["path", "events/stream", "events/s", "per slice", "proxy CPU µs/event", "per slice", "CPU ms/stream",
            "ratio vs", "CPU/event ratio", "events/s ratio", "MB/s", "proxy busy", "reads / writes per 1k events",
            "errors"]
    rows = [md_row(head), "|:---|" + "---:|" * (len(head) - 1)]
    for path, p in level["per_path"].items():
        r = level["ratios"].get(path)
        rows.append(md_row([
            path, str(p["events_per_stream"]), num(p["events_per_s"], ",.0f"),
            " / ".join(num(v, ",.0f") for v in p["events_per_s_by_slice"]), num(p["cpu_us_per_event"], ".2f"),
            " / ".join(num(v, ".2f") for v in p["cpu_us_per_event_by_slice"]), num(p["cpu_ms_per_stream"], ".3f"),
            r["versus"] if r else "", num(r["cpu_per_event"], ".2f") if r else "",
            num(r["events_per_s"], ".2f") if r else "", num(p["mb_per_s"], ".1f"), num(p["proxy_busy"], ".0%"),
            f"{num(p['proxy_reads_per_1k_events'], '.0f')} / {num(p['proxy_writes_per_1k_events'], '.0f')}",
            str(p["errors"]["count"])]))
    lines = []
    for path, p in level["per_path"].items():
        line = (f"- {path}: {p['streams_completed']} streams completed in {p['seconds']:.1f}s; mock + load generator "
                f"{num(p['mock_loadgen_busy'], '.0%')} of their core; "
                f"{foreign_load(p['cpu_s'], p['seconds'], ['proxy'], MOCK_SIDE)}")
        if p["mock_loadgen_busy"] >= SATURATED:
            line += ("\n  WARNING: the mock + load generator core is saturated: events/s here is that core's limit, "
                     "not the proxy's; CPU per event still holds")
        lines.append(line)
    lines.append(f"- order: {', '.join(level['order'])}; client reconnects {level['reconnects']}")
    pacing = "no pacing" if level["burst"] else "paced"
    return [f"### {'Burst' if level['burst'] else 'Paced'}: {level['tokens']} tokens per stream, {pacing}, "
            f"c={level['concurrency']} ({level['slice_s']:g}s slices)", "",
            "Events = SSE `data:` events received inside the slices; CPU = the proxy's (schedstat) over the same "
            "windows. Ratios: a translated path over the passed-through path of its API; a passed-through path "
            "over chat-native.", "", "\n".join(rows), "", "\n".join(lines), ""]


def checks_section(checks: dict[str, Any], failed: list[str]) -> str:
    lines = []
    for path, got in (checks.get("upstream") or {}).items():
        lines.append(f"- {path}: the mock received `{got['path']}` for model `{got['model']}`")
    for path, tally in (checks.get("streams") or {}).items():
        lines.append(f"- {path}: {tally['requests']} requests, {tally['events']:,} events; events per good stream "
                     f"{tally['events_per_stream']}")
    lines.append(result_line(failed))
    return "\n".join(lines)


def error_report(result: dict[str, Any]) -> str:
    sources = []
    first = result["first_event"]
    if first:
        sources += [(f"first event {path}", errors) for path, errors in first["errors"].items()]
        sources.append(("first event warm-up", first["warmup_errors"]))
    for level in result["levels"]:
        where = level_name(level)
        sources += [(f"{where} {path}", p["errors"]) for path, p in level["per_path"].items()]
        sources.append((f"{where} warm-up", level["warmup_errors"]))
    return failure_lines(sources)
