"""The suite's report, targets table and README section, all computed from a results directory alone.

`python -m bench` writes `summary.json` (what ran, where, how it went) and, per section, `<section>.json`
(with its `headline`) and `<section>.md`; everything here reads those files and nothing else, so
`python -m bench --readme-from DIR` regenerates the same outputs without running anything.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from bench.harness import Log, md_row
from bench.plots import memory_figures, write_plots

SUMMARY = "summary.json"
REPORT = "report.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
MODES = ("paced", "burst")
LOG_TAIL_LINES = 30
TIMES = "\u00d7"  # the multiplication sign of "missed by 0.21 ms (2.05x)"; spelled out for ruff (RUF001)


# --- the results directory ------------------------------------------------------------------------


@dataclass
class Results:
    directory: Path
    summary: dict[str, Any]  # summary.json as the run wrote it
    documents: dict[str, dict[str, Any]]  # section -> its JSON, for those that wrote one

    def headline(self, section: str) -> dict[str, Any]:
        return (self.documents.get(section) or {}).get("headline") or {}

    def markdown(self, section: str) -> str:
        path = self.directory / f"{section}.md"
        return path.read_text(errors="replace").strip() if path.exists() else ""

    def log_tail(self, section: str, lines: int = LOG_TAIL_LINES) -> str:
        path = self.directory / f"{section}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    @property
    def sections(self) -> dict[str, dict[str, Any]]:
        return self.summary.get("sections") or {}


def load(directory: str | Path) -> Results:
    """Read a results directory: summary.json and every `<section>.json` it names (missing or unreadable: skipped)."""
    directory = Path(directory)
    summary = orjson.loads((directory / SUMMARY).read_bytes())
    documents = {}
    for section in summary.get("sections") or {}:
        path = directory / f"{section}.json"
        try:
            documents[section] = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue
    return Results(directory, summary, documents)


# --- targets --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One line of the targets table: `section`'s headline `key` compared with `limit` (op None: shown only)."""

    what: str
    section: str
    key: str
    op: str | None
    limit: float
    unit: str = ""
    digits: int = 2

    def format(self, value: float) -> str:
        return f"{value:,.{self.digits}f}" + (f" {self.unit}" if self.unit else "")

    def bound(self) -> str:
        return f"{self.op} {self.limit:,g}" + (f" {self.unit}" if self.unit else "") if self.op else "untargeted"


def _ttft(q: str, c: int, mode: str, op: str | None, limit: float) -> Target:
    return Target(f"TTFT overhead {q}, c={c}, {mode}", "ttft", f"overhead_{q}_ms_c{c}_{mode}", op, limit, "ms")


def _ratio(c: int) -> Target:
    return Target(f"throughput ratio, c={c}, paced", "ttft", f"throughput_ratio_c{c}_paced", "≥", 0.95, digits=3)


TARGETS = (
    _ttft("p50", 1, "paced", "≤", 0.2), _ttft("p99", 1, "paced", "≤", 0.5),
    _ttft("p50", 1, "burst", None, 0), _ttft("p99", 1, "burst", None, 0),
    _ttft("p99", 64, "paced", "≤", 2), _ratio(64), _ttft("p99", 512, "paced", "≤", 2), _ratio(512),
    Target("proxy CPU per paced stream, c=512", "ttft", "cpu_ms_per_stream_c512_paced", "≤", 1.2, "ms", 3),
    Target("RSS idle", "memory", "rss_idle_mb", "≤", 40, "MB", 1),
    Target("RSS at 2,000 streams (peak)", "memory", "rss_peak_mb_2000", "≤", 100, "MB", 1),
    Target("RSS per idle connection", "memory", "idle_conn_kib", "≤", 4, "KiB"),
    Target("concurrent streams", "connections", "streams", "≥", 10_000, digits=0),
    Target("errors at 10,000 streams", "connections", "errors", "=", 0, digits=0),
    Target("mean TTFT, least_connections / prefix_affinity", "fleet",
           "ttft_mean_ratio_least_connections_over_prefix_affinity", "≥", 2, digits=2),
    Target("prefix_affinity max/mean in-flight", "fleet", "inflight_max_over_mean_prefix_affinity", "≤", 1.5,
           digits=2),
)


def verdict(target: Target, value: float | None) -> tuple[str, str]:
    """(status, text): met, missed (by how much, and the ratio where it means something), untargeted or not
    measured, e.g. ("missed", "0.41 ms vs ≤ 0.2 ms: missed by 0.21 ms (2.05\u00d7)")."""
    if value is None:
        return "not measured", "not measured"
    measured = target.format(value)
    if target.op is None:
        return "untargeted", f"{measured} (untargeted)"
    met = {"≤": value <= target.limit, "≥": value >= target.limit, "=": value == target.limit}[target.op]
    if met:
        return "met", f"{measured} vs {target.bound()}: met"
    by = f"missed by {target.format(abs(value - target.limit))}"
    if target.limit:
        by += f" ({value / target.limit:.2f}{TIMES})"
    return "missed", f"{measured} vs {target.bound()}: {by}"


def evaluate(results: Results) -> list[dict[str, Any]]:
    """Every target with its measured value, status and text; a section that failed is named in the row."""
    rows = []
    for target in TARGETS:
        headline = results.headline(target.section)
        value = headline.get(target.key)
        status, text = verdict(target, value if isinstance(value, int | float) else None)
        level = re.search(r"_(c\d+_(?:paced|burst))$", target.key)
        if status == "missed" and level and target.key.startswith(("overhead_", "throughput_ratio_")) \
                and headline.get(f"rig_saturated_{level.group(1)}"):
            text += " † (the mock + load generator core was saturated)"
        section_status = results.sections.get(target.section, {}).get("status", "not run")
        rows.append({"what": target.what, "section": target.section, "key": target.key, "op": target.op,
                     "limit": target.limit, "unit": target.unit, "measured": value, "status": status, "text": text,
                     "section_status": section_status})
    return rows


def targets_table(rows: list[dict[str, Any]]) -> str:
    lines = [md_row(["target", "bound", "measured", "result"]), "|:---|:---|---:|:---|"]
    for row in rows:
        target = next(t for t in TARGETS if t.key == row["key"] and t.section == row["section"])
        measured = target.format(row["measured"]) if isinstance(row["measured"], int | float) else "—"
        result = row["text"].split(": ", 1)[1] if row["status"] in ("met", "missed") else row["status"]
        if row["section_status"] != "ok":  # a failed section's numbers may still be there: say so
            result += f" (section {row['section_status']})"
        lines.append(md_row([row["what"], target.bound(), measured, result]))
    return "\n".join(lines)


# --- key figures ----------------------------------------------------------------------------------


Cell = Callable[[dict[str, Any], int], float | None]


def key(template: str) -> Cell:
    """A cell reading `template` (with `{c}` for the concurrency) from a headline."""
    return lambda headline, c: headline.get(template.format(c=c))


def ratio(numerator: str, denominator: str) -> Cell:
    def cell(headline: dict[str, Any], c: int) -> float | None:
        a, b = key(numerator)(headline, c), key(denominator)(headline, c)
        return a / b if isinstance(a, int | float) and isinstance(b, int | float) and b else None
    return cell


def levels_of(headline: dict[str, Any]) -> list[int]:
    return sorted({int(m.group(1)) for name in headline if (m := re.search(r"_c(\d+)(?:_|$)", name))})


def level_table(headline: dict[str, Any], rows: Iterable[tuple[str, Cell, str]],
                mark: Callable[[int], str] = lambda c: "") -> str:
    """A table with one column per concurrency level and one row per (label, cell, format) with any value;
    `mark(c)` is appended to the level's column heading."""
    levels = levels_of(headline)
    lines = []
    for label, cell, spec in rows:
        values = [cell(headline, c) for c in levels]
        if any(v is not None for v in values):
            lines.append(md_row([label, *("—" if v is None else format(v, spec) for v in values)]))
    if not lines:
        return ""
    return "\n".join([md_row(["", *(f"c={c}{mark(c)}" for c in levels)]), "|:---|" + "---:|" * len(levels), *lines])


def ttft_rows(mode: str) -> list[tuple[str, Cell, str]]:
    suffix = f"c{{c}}_{mode}"
    rows = [(f"overhead p50 ({mode}), ms", key(f"overhead_p50_ms_{suffix}"), ".3f"),
            (f"overhead p99 ({mode}), ms", key(f"overhead_p99_ms_{suffix}"), ".3f"),
            (f"paired Δ p50 ({mode}), ms", key(f"paired_p50_ms_{suffix}"), ".3f"),
            (f"throughput ratio ({mode})", key(f"throughput_ratio_{suffix}"), ".3f"),
            (f"proxy CPU per stream ({mode}), ms", key(f"cpu_ms_per_stream_{suffix}"), ".3f"),
            (f"proxy CPU per event ({mode}), µs", key(f"cpu_us_per_event_{suffix}"), ".2f"),
            (f"nginx overhead p50 ({mode}), ms", key(f"nginx_overhead_p50_ms_{suffix}"), ".3f"),
            (f"nginx overhead p99 ({mode}), ms", key(f"nginx_overhead_p99_ms_{suffix}"), ".3f"),
            (f"llmproxy / nginx CPU per stream ({mode})",
             ratio(f"cpu_ms_per_stream_{suffix}", f"nginx_cpu_ms_per_stream_{suffix}"), ".2f")]
    if mode == "paced":
        rows.append(("inter-chunk overhead p99 (paced), ms", key("inter_chunk_overhead_p99_ms_c{c}_paced"), ".3f"))
    return rows


SATURATED_NOTE = ("† The core running the mock backend and the load generator was saturated at this level: TTFTs "
                  "there are mostly queueing on the test rig, for every path (a negative overhead means the direct "
                  "path queued longer), so read CPU per stream and per event there, not overheads.")
FEATURE_ROWS = (("bare overhead p50, ms", key("bare_overhead_p50_ms_c{c}"), ".3f"),
                ("full overhead p50, ms", key("full_overhead_p50_ms_c{c}"), ".3f"),
                ("full - bare paired p50, ms", key("full_minus_bare_paired_p50_ms_c{c}"), ".3f"),
                ("bare proxy CPU per stream, ms", key("bare_cpu_ms_per_stream_c{c}"), ".3f"),
                ("full proxy CPU per stream, ms", key("full_cpu_ms_per_stream_c{c}"), ".3f"),
                ("full - bare proxy CPU per stream, ms", key("full_minus_bare_cpu_ms_per_stream_c{c}"), ".3f"))
MEMORY_EXTRA = (("per idle connection", "idle_conn_kib", "KiB"), ("idle connections held", "idle_conns_held", ""))
CONNECTION_FIGURES = (("streams", "streams", ""), ("completed", "completed", ""), ("errors", "errors", ""),
                      ("probe TTFT p50 through the proxy", "probe_ttft_p50_ms", "ms"),
                      ("probe TTFT p99 through the proxy", "probe_ttft_p99_ms", "ms"),
                      ("probe TTFT p50 direct", "probe_direct_ttft_p50_ms", "ms"),
                      ("proxy RSS peak", "rss_peak_mb", "MB"), ("proxy CPU", "proxy_cpu_s", "s"),
                      ("wall time", "wall_s", "s"))


def figure_list(headline: dict[str, Any], figures: Iterable[tuple[str, str, str]]) -> str:
    """`label: value unit` pairs on one line, for a section without concurrency levels."""
    parts = []
    for label, name, unit in figures:
        value = headline.get(name)
        if isinstance(value, int | float):
            shown = f"{value:,}" if isinstance(value, int) else f"{value:,.2f}"
            parts.append(f"{label}: {shown}" + (f" {unit}" if unit else ""))
    return "; ".join(parts)


def key_figures(results: Results) -> str:
    """The compact tables of the README: first-token overhead, memory, 10k connections, feature cost."""
    parts = []
    ttft = results.headline("ttft")
    for mode in MODES:
        saturated = [c for c in levels_of(ttft) if ttft.get(f"rig_saturated_c{c}_{mode}")]
        table = level_table(ttft, ttft_rows(mode), lambda c, marked=tuple(saturated): " †" if c in marked else "")
        if table:
            parts += [f"First token, {mode} backend (bench.ttft):", "", table, ""]
            if saturated:
                parts += [SATURATED_NOTE, ""]
    headline = results.headline("memory")
    memory = figure_list(headline, [*(("RSS " + label, name, "MB") for label, name in memory_figures(headline)),
                                    *MEMORY_EXTRA])
    if memory:
        parts += [f"Memory (bench.memory): {memory}.", ""]
    connections = figure_list(results.headline("connections"), CONNECTION_FIGURES)
    if connections:
        parts += [f"10,000 connections (bench.connections): {connections}.", ""]
    features = level_table(results.headline("features"), FEATURE_ROWS)
    if features:
        parts += ["Feature cost, auth + rate limits + metering + webhook + access log vs bare (bench.features):", "",
                  features, ""]
    return "\n".join(parts).strip()


# --- report.md and the README section -------------------------------------------------------------


def when(results: Results) -> str:
    started = results.summary.get("started")
    if not started:
        return "unknown date"
    return datetime.fromisoformat(started).strftime("%Y-%m-%d %H:%M UTC")


def machine_line(results: Results) -> str:
    m = results.summary.get("machine") or {}
    return (f"nproc {m.get('nproc', '?')}, {m.get('cpu_model', 'unknown CPU')}, Python {m.get('python', '?')}, "
            f"Linux {m.get('kernel', '?')}")


def pinning_line(results: Results) -> str:
    return (results.summary.get("machine") or {}).get("pinning", "unknown")


def sections_table(results: Results) -> str:
    lines = [md_row(["section", "status", "seconds", "command"]), "|:---|:---|---:|:---|"]
    for name, info in results.sections.items():
        seconds = info.get("seconds")
        lines.append(md_row([name, info.get("status", "?"), "—" if seconds is None else f"{seconds:.0f}",
                             f"`{info['command']}`" if info.get("command") else "—"]))
    return "\n".join(lines)


def section_part(results: Results, name: str) -> list[str]:
    """A section's Markdown verbatim, with the tail of its log when it did not succeed."""
    info = results.sections[name]
    parts = [results.markdown(name) or f"## {name}\n\n(no report on stdout)", ""]
    if info.get("status") != "ok":
        reason = info.get("reason") or info.get("status")
        parts += [f"**{name} {info.get('status')}**: {reason}. Last lines of `{name}.log`:", "", "```",
                  results.log_tail(name), "```", ""]
    return parts


def render_report(results: Results, plots: Iterable[tuple[str, str]]) -> str:
    """report.md: run, machine, targets, key figures, plots, then every section's own report verbatim."""
    summary = results.summary
    parts = ["# llmproxy benchmark suite", "", f"- command: `{summary.get('command', 'python -m bench')}`",
             f"- date: {when(results)} ({summary.get('seconds', 0):.0f} s in all)",
             f"- machine: {machine_line(results)}", f"- pinning: {pinning_line(results)}", "",
             sections_table(results), "", "## Targets", "", targets_table(evaluate(results)), ""]
    figures = key_figures(results)
    if figures:
        parts += ["## Key figures", "", figures, ""]
    plots = list(plots)
    if plots:
        parts += ["## Plots", ""]
        parts += [f"![{caption}]({name})\n\n{caption}\n" for name, caption in plots]
    for name in results.sections:
        if results.sections[name].get("status") != "skipped":
            parts += section_part(results, name)
    return "\n".join(parts).rstrip() + "\n"


def render_readme(results: Results) -> str:
    """The README's performance section (what goes between the markers)."""
    parts = [f"Measured with `python -m bench` on {when(results)}: {machine_line(results)}; "
             f"{pinning_line(results)}. Numbers from one run on that machine, not a guarantee; see "
             "[bench/README.md](bench/README.md) for what each figure means and how it is measured.", "",
             targets_table(evaluate(results)), "", key_figures(results)]
    return "\n".join(parts).strip()


def replace_between_markers(text: str, block: str) -> str | None:
    """`text` with what lies between the bench markers replaced by `block`; None when the markers are missing
    or out of order. Everything outside the markers is kept byte for byte."""
    begin = text.find(BEGIN)
    end = text.find(END, begin + len(BEGIN)) if begin >= 0 else -1
    if begin < 0 or end < 0:
        return None
    return text[:begin + len(BEGIN)] + "\n" + block + "\n" + text[end:]


# --- writing --------------------------------------------------------------------------------------


def write_outputs(directory: str | Path, readme: Path | None, log: Log) -> list[dict[str, Any]]:
    """Regenerate everything derived from a results directory: plots, report.md, the targets and headlines in
    summary.json and, when `readme` is given, its section between the markers. Returns the targets."""
    results = load(directory)
    targets = evaluate(results)
    for name, info in results.sections.items():
        info["headline"] = results.headline(name) or None
    results.summary["targets"] = targets
    (results.directory / SUMMARY).write_bytes(orjson.dumps(results.summary, option=orjson.OPT_INDENT_2))
    limits = {t.key: t.limit for t in TARGETS if t.op == "≤"}
    plots = write_plots(results.documents, results.directory, limits)
    (results.directory / REPORT).write_text(render_report(results, plots))
    log(f"report: {results.directory / REPORT}")
    if readme is not None:
        update_readme(readme, render_readme(results), log)
    return targets


def update_readme(readme: Path, block: str, log: Log) -> bool:
    """Put `block` between the markers of `readme`; warn and leave the file alone when they are missing."""
    try:
        text = readme.read_text()
    except OSError as exc:
        log(f"WARNING: cannot read {readme} ({exc}); README not updated")
        return False
    updated = replace_between_markers(text, block)
    if updated is None:
        log(f"WARNING: {readme} has no `{BEGIN}` ... `{END}` markers; README not updated")
        return False
    if updated != text:
        readme.write_text(updated)
    log(f"README: performance section of {readme} regenerated")
    return True
