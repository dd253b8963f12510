"""bench.ttft's Markdown report: the TTFT, inter-chunk, nginx and in-product tables, the diagnostics lines,
and the errors and failed checks listed under "Problems". It only reads the level summaries bench.ttft builds.
"""

from __future__ import annotations

import argparse
from typing import Any

from bench.harness import (
    CPU_SOURCE,
    SATURATED,
    failure_lines,
    foreign_load,
    level_failures,
    md_row,
    ms,
    num,
    report_head,
    stream_p50s,
)
from bench.inproduct import AGREEMENT_MS, INPRODUCT, NOT_EXPORTED, PROXIED
from bench.interleave import DIRECT
from bench.stats import QUANTILES

NGINX = "nginx"  # the third path, nginx as a reference proxy
PACED, BURST = "paced", "burst"  # backend modes


def table(levels: list[dict[str, Any]]) -> str:
    head = ["concurrency", "streams/path", "direct p50", "direct p99", "proxied p50", "proxied p99",
            "overhead p50", "overhead p90", "overhead p99", "overhead max", "paired Δ p50", "throughput ratio",
            "proxy CPU ms/stream", "proxy CPU µs/event", "errors"]
    rows = [md_row(head), "|" + "---:|" * len(head)]
    for level in levels:
        ttft, over = level["ttft_ms"], level["overhead_ms"]
        throughput = level["throughput"]
        ratio = f"{throughput['ratio']:.3f}" if throughput else "skipped"
        errors = sum(errs["count"] for errs in level["errors"].values())
        cells = [level_cell(level), f"{ttft[DIRECT]['n']}/{ttft[PROXIED]['n']}",
                 ms(ttft[DIRECT].get("p50")), ms(ttft[DIRECT].get("p99")),
                 ms(ttft[PROXIED].get("p50")), ms(ttft[PROXIED].get("p99")),
                 *(ms(over[f"p{q}"]) for q in QUANTILES), ms(over["max"]), ms(level["paired_overhead_ms"].get("p50")),
                 ratio, ms(level["proxy_cpu_ms_per_stream"]), num(level["proxy_cpu_us_per_event"], ".1f"),
                 str(errors)]
        rows.append(md_row(cells))
    return "\n".join(rows)


def level_cell(level: dict[str, Any]) -> str:
    """The concurrency, marked when the mock + load generator core was saturated (every column is affected)."""
    return f"{level['concurrency']}" + (" (sat.)" if saturated(level["core_busy"]) else "")


def inter_chunk_table(levels: list[dict[str, Any]]) -> str:
    head = ["concurrency", "gaps/path", "direct gap p50", "proxied gap p50", "Δ p50", "direct gap p99",
            "proxied gap p99", "Δ p99", "in-product chunk mean", "in-product chunk p99"]
    rows = [md_row(head), "|" + "---:|" * len(head)]
    for level in levels:
        gaps, over, chunk = level["inter_chunk_ms"]["gaps"], level["inter_chunk_ms"][f"{PROXIED}_overhead"], \
            level["inproduct"].get("chunk") or {}
        rows.append(md_row([level_cell(level), str(gaps[PROXIED]["n"]),
                            ms(gaps[DIRECT].get("p50")), ms(gaps[PROXIED].get("p50")), ms(over["p50"]),
                            ms(gaps[DIRECT].get("p99")), ms(gaps[PROXIED].get("p99")), ms(over["p99"]),
                            ms(chunk.get("mean_ms")), ms(chunk.get("p99_ms"))]))
    return "\n".join(rows)


def nginx_table(levels: list[dict[str, Any]]) -> str:
    head = ["backend", "concurrency", "nginx overhead p50", "nginx overhead p99", "proxy overhead p50",
            "proxy overhead p99", "overhead p50 ratio", "nginx CPU ms/stream", "proxy CPU ms/stream", "CPU ratio",
            "nginx CPU µs/event", "proxy CPU µs/event"]
    rows = [md_row(head), "|" + "---:|" * len(head)]
    for level in levels:
        theirs, ours = level["nginx"], level["overhead_ms"]
        rows.append(md_row([level["backend"], level_cell(level), ms(theirs["overhead_ms"]["p50"]),
                            ms(theirs["overhead_ms"]["p99"]), ms(ours["p50"]), ms(ours["p99"]),
                            num(theirs["overhead_p50_ratio"], ".2f"), ms(theirs["cpu_ms_per_stream"]),
                            ms(level["proxy_cpu_ms_per_stream"]), num(theirs["cpu_per_stream_ratio"], ".2f"),
                            num(theirs["cpu_us_per_event"], ".1f"), num(level["proxy_cpu_us_per_event"], ".1f")]))
    return "\n".join(rows)


def inproduct_table(levels: list[dict[str, Any]]) -> str:
    head = ["backend", "concurrency", "streams", "request mean/p50/p99", "first byte mean/p50/p99",
            "in-product sum", "paired Δ mean", "paired Δ p50", "share", "chunk mean/p50/p99", "check"]
    rows = [md_row(head), "|" + "---:|" * len(head)]
    for level in levels:
        found = level["inproduct"]
        check = found["check"]

        def triple(key: str, found: dict[str, Any] = found) -> str:
            h = found[key]
            return "/".join(ms(h[f]) for f in ("mean_ms", "p50_ms", "p99_ms")) if h else NOT_EXPORTED

        rows.append(md_row([level["backend"], level_cell(level), str(found["streams"]), triple("request"),
                            triple("first_byte"), ms(check["inproduct_ms"]), ms(check["paired_mean_ms"]),
                            ms(check["paired_p50_ms"]), num(check["share_of_paired_mean"], ".0%"), triple("chunk"),
                            check_cell(found)]))
    return "\n".join(rows)


def check_cell(found: dict[str, Any]) -> str:
    if found["failed"]:
        return "FAILED"
    return "counts ok; Δ not comparable" if found["check"]["comparison_skipped"] else "ok"


def inproduct_section(levels: list[dict[str, Any]]) -> list[str]:
    exported = [level for level in levels if level["inproduct"]["exported"]]
    if not exported:
        notes = sorted({level["inproduct"]["note"] for level in levels})
        return [f"In-product overhead histograms ({', '.join(INPRODUCT.values())}): {'; '.join(notes)}."]
    return ["In-product overhead (ms), from the proxy's /metrics scraped before and after each level's phase "
            "with no stream in flight. Sum = request + first byte means: the part of the client-side paired Δ "
            "spent in proxy code; the rest is two loopback hops and wake-ups. FAILED: the sum exceeds paired Δ "
            f"p50 by more than {AGREEMENT_MS} ms, or the counts do not match the phase's proxied streams.", "",
            inproduct_table(exported)]


def rig_bound(busy: dict[str, Any]) -> bool:
    """Whether the mock and the load generator saturated their core themselves."""
    return busy["mock"] + busy["loadgen"] >= SATURATED


def saturated(busy: dict[str, Any]) -> bool:
    """Whether the mock + load generator core was saturated: by them, or (when pinned) with other processes."""
    return rig_bound(busy) or busy.get("mock_core", 0.0) >= SATURATED


def diagnostics(levels: list[dict[str, Any]]) -> str:
    return "\n".join(diagnostics_line(level) for level in levels)


def diagnostics_line(level: dict[str, Any]) -> str:
    busy = level["core_busy"]
    nginx = f" + nginx {busy['nginx']:.0%}" if busy["nginx"] is not None else ""
    parts = [f"- c={level['concurrency']} {level['backend']}: recording window {level['wall_s']:.1f}s",
             f"core busy: proxy {busy['proxy']:.0%}{nginx}, mock {busy['mock']:.0%} + load generator "
             f"{busy['loadgen']:.0%}", stream_p50s(level["stream_ms"], level["stream_ms"])]
    throughput = level["throughput"]
    if throughput:
        per_s, counted = throughput["streams_per_s"], throughput["counted_streams_per_s"]
        cost = throughput["mock_loadgen_cpu_ms_per_stream"]
        parts.append(f"throughput direct {per_s[DIRECT]:.1f}/s, proxied {per_s[PROXIED]:.1f}/s (counted: "
                     f"{counted[DIRECT]:.1f}/s, {counted[PROXIED]:.1f}/s; mock + load generator CPU per stream: "
                     f"direct {ms(cost[DIRECT])} ms, proxied {ms(cost[PROXIED])} ms)")
    ours = [name for name in (PROXIED, NGINX) if name in level["cpu_s"]]
    parts += [foreign_load(level["cpu_s"], level["wall_s"], ours, ["mock", "loadgen"]),
              f"{' + '.join(ours).replace(PROXIED, 'proxy')} opened {level['proxy_upstream_connects']} upstream "
              "connections (the proxy's health probes included)", f"client reconnects {level['reconnects']}",
              f"events through the proxy in the CPU window {level['events_in_cpu_window'][PROXIED]}",
              f"for scale, the mock spent {ms(level['mock_cpu_ms_per_stream'])} ms CPU per stream"]
    line = "; ".join(parts)
    if saturated(busy):
        whole = f", {busy['mock_core']:.0%} with other processes" if "mock_core" in busy else ""
        line += (f"\n  WARNING: the mock + load generator core is saturated (ours {busy['mock'] + busy['loadgen']:.0%}"
                 f"{whole}): TTFT and throughput at this level include queueing on that core, for every path")
    return line


def error_report(levels: list[dict[str, Any]]) -> str:
    sources = []
    for level in levels:
        sources += level_failures(level, level["errors"])
        if level["throughput"]:
            sources.append((f"c={level['concurrency']} {level['backend']} throughput phase",
                            level["throughput"]["errors"]))
    return failure_lines(sources)


def failed_checks(levels: list[dict[str, Any]]) -> list[str]:
    return [f"c={level['concurrency']} {level['backend']}: {message}"
            for level in levels for message in level["inproduct"]["failed"]]


MODE_TITLES = {PACED: "paced backend: {tokens} tokens, one event every {delay:g} ms",
               BURST: "burst backend: {tokens} tokens, the whole stream in one write"}


def report(command: str, info: dict[str, Any], args: argparse.Namespace, levels: list[dict[str, Any]],
           nginx_note: str) -> str:
    parts = [*report_head("bench.ttft", command, info), f"- nginx: {nginx_note}", f"- proxy CPU from {CPU_SOURCE}", ""]
    if not levels:
        return "\n".join(parts)
    parts += ["TTFT in ms (request write -> first bytes of the first SSE `data:` event). Overhead = proxied "
              "minus direct percentile (max: difference of the maxima); paired Δ = median of per-round (proxied "
              "- direct). (sat.) after the concurrency = the mock + load generator core was saturated: every figure "
              "of that row includes queueing there, and overheads are not the proxy's (see the warnings "
              "below). CPU per event divides by the `data:` events the proxy delivered in the CPU window."]
    for mode in args.backends:
        of_mode = [level for level in levels if level["backend"] == mode]
        if of_mode:
            parts += ["", "### " + MODE_TITLES[mode].format(tokens=args.tokens, delay=args.delay_ms), "",
                      table(of_mode)]
        if mode == PACED and of_mode:
            parts += ["", "Inter-chunk gaps in ms (between consecutive events of a recorded stream; Δ = proxied "
                      "minus direct percentile), and the proxy's own per-read chunk overhead:", "",
                      inter_chunk_table(of_mode)]
    with_nginx = [level for level in levels if level["nginx"]]
    if with_nginx:
        parts += ["", "### nginx as a reference (same rounds, third path)", "",
                  "Overheads in ms over direct; ratios are ours / nginx's (above 1: ours costs more).", "",
                  nginx_table(with_nginx)]
    parts += ["", "### In-product overhead", "", *inproduct_section(levels), "", "### Diagnostics", "",
              diagnostics(levels)]
    return "\n".join(parts)
