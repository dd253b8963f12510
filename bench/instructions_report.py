"""What bench.instructions prints and keeps: instructions per request and per event, what they are made of,
how well they repeat, and how they compare with nginx and with the committed baseline.

The proxy is Python, and callgrind sees C functions only: the interpreter's eval loop is one function, whatever
Python it runs. So the phases of a request are not read off function names; they are differences between
workloads that differ in one thing (see `derive`), and the C side is shown by object file and top functions.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

TOP_FUNCTIONS = 12
SPREAD_TARGET = 0.005  # counts of two fresh processes should agree within half a percent
NGINX = "nginx"


def _per_request(runs: list[dict[str, Any]], shape: str, requests: int) -> list[float]:
    return [run[shape]["ir"] / requests for run in runs]


def _figures(runs: list[dict[str, Any]], requests: int) -> dict[str, dict[str, Any]]:
    """Per shape measured: the runs' instructions a request, their mean and spread ((max - min) / mean), events a
    request."""
    out = {}
    for shape in runs[0]:
        values = _per_request(runs, shape, requests)
        mean = statistics.fmean(values)
        out[shape] = {"per_request": values, "mean": mean, "spread": (max(values) - min(values)) / mean if mean else 0,
                      "events": runs[0][shape]["events"], "per_event": mean / runs[0][shape]["events"],
                      "background_per_request": [(run[shape]["raw_ir"] - run[shape]["ir"]) / requests for run in runs],
                      "background_per_s": [run[shape]["background_per_s"] for run in runs]}
    return out


def derive(figures: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The phases that differences between shapes isolate (a key is left out when its shapes were not run):

    - fixed: a 1-token stream (3 events), all of it: parse, route, upstream request, head relay, finish/records;
    - local: a request for a model nobody serves, answered by the proxy itself: parse, route, a local reply and
      finish/records, without the upstream exchange;
    - upstream: fixed - local: the upstream request, the head relay and relaying 3 events (and what finishing
      a proxied request costs more than finishing a local reply);
    - per_event_one_write: (64-token stream - 1-token stream) / their difference in events, both in one write:
      what each further event costs when many arrive in one read (scanning, metering, chunk framing);
    - per_event_own_read: (paced 16-token stream - 1-token stream) / their difference in events: what each event
      costs when it arrives in a read of its own (an event-loop wake-up, a read, a write to the client).
    """
    out: dict[str, float] = {}
    one = figures.get("stream1")
    if one is None:
        return out
    out["fixed"] = one["mean"]
    local = figures.get("local404")
    if local is not None:
        out["local"] = local["mean"]
        out["upstream"] = one["mean"] - local["mean"]
    for key, shape in (("per_event_one_write", "stream64"), ("per_event_own_read", "paced8")):
        other = figures.get(shape)
        if other is not None and other["events"] != one["events"]:
            out[key] = (other["mean"] - one["mean"]) / (other["events"] - one["events"])
    return out


def summarise(measured: dict[str, Any], args: argparse.Namespace, baseline: dict[str, Any] | None) -> dict[str, Any]:
    """Everything the report shows, and the baseline entry this run would write."""
    targets = {name: _figures(runs, args.requests) for name, runs in measured["runs"].items()}
    if measured["nginx_runs"]:
        targets[NGINX] = _figures(measured["nginx_runs"], args.requests)
    derived = {name: derive(figures) for name, figures in targets.items()}
    if "metering_on" in derived and "metering_off" in derived:
        derived["meter"] = {key: derived["metering_on"][key] - derived["metering_off"][key]
                            for key in derived["metering_on"] if key in derived["metering_off"]}
    first = measured["runs"]["metering_on"][0]
    shown = "stream64" if "stream64" in first else args.shapes[0]
    entry = {"requests": args.requests, "warmup": args.warmup, "shapes": args.shapes,
             "per_request": {name: {shape: round(f["mean"]) for shape, f in figures.items()}
                             for name, figures in targets.items()},
             "events": {shape: f["events"] for shape, f in targets["metering_on"].items()}}
    headline: dict[str, float] = {f"ir_per_request_{shape}_{name}": round(f["mean"])
                                  for name, figures in targets.items() for shape, f in figures.items()}
    headline["max_spread"] = max(f["spread"] for figures in targets.values() for f in figures.values())
    return {"args": dict(vars(args)), "nginx": measured["nginx"], "headline": headline,
            "targets": targets, "derived": derived, "deltas": deltas(entry, baseline),
            "baseline": baseline, "baseline_entry": entry, "profile_shape": shown,
            "by_object": {shape: {name: ir / args.requests for name, ir in first[shape]["by_object"].items()}
                          for shape in args.shapes},
            "top": {shape: [(fn, obj, ir / args.requests) for fn, obj, ir in first[shape]["top"]]
                    for shape in args.shapes}}


def deltas(entry: dict[str, Any], baseline: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    """(this run - baseline) / baseline, per target and shape both have; {} without a baseline."""
    if not baseline:
        return {}
    out: dict[str, dict[str, float]] = {}
    for target, shapes in entry["per_request"].items():
        before = baseline.get("per_request", {}).get(target, {})
        out[target] = {shape: value / before[shape] - 1 for shape, value in shapes.items() if before.get(shape)}
    return out


# --- Markdown -------------------------------------------------------------------------------------


def _n(value: float) -> str:
    return f"{value:,.0f}"


def _mean(figures: dict[str, Any], shape: str) -> str:
    return _n(figures[shape]["mean"]) if shape in figures else "n/a"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:+.2f} %"


def report(result: dict[str, Any], abouts: dict[str, str]) -> str:
    args, targets = result["args"], result["targets"]
    lines = ["## bench.instructions", "", f"- command: `{result['command']}`",
             f"- commit: {result['commit']}; {result['valgrind']}; Python {result['machine']['python']}; "
             f"reference: {result['nginx']}",
             f"- workload: per shape, {args['warmup']} uncounted then {args['requests']} counted requests, one at "
             "a time on one keep-alive connection; each proxy config run "
             f"{args['repeat']} time(s), a fresh process each (PYTHONHASHSEED=0); run time {result['wall_s']:.0f} s",
             "- shapes: " + "; ".join(f"`{name}` {about}" for name, about in abouts.items()), "",
             "### Instructions per request", ""]
    names = [name for name in ("metering_on", "metering_off", NGINX) if name in targets]
    ratios = [f"{n} / nginx" for n in names if n != NGINX] if NGINX in targets else []
    header = ["shape", "events", *names, "metering cost", "per event (on)", *ratios]
    lines += ["| " + " | ".join(header) + " |", "|:---|" + "---:|" * (len(header) - 1)]
    for shape in abouts:
        on = targets["metering_on"][shape]
        cells = [f"`{shape}`", str(on["events"]), *(_mean(targets[n], shape) for n in names)]
        cells.append(_n(on["mean"] - targets["metering_off"][shape]["mean"]) if "metering_off" in targets else "n/a")
        cells.append(_n(on["per_event"]))
        if NGINX in targets:
            cells += [f"{targets[n][shape]['mean'] / targets[NGINX][shape]['mean']:.1f}x" if shape in targets[NGINX]
                      else "n/a" for n in names if n != NGINX]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "### Phases, from differences between shapes", "",
              "callgrind sees C functions only: all Python runs inside the interpreter's eval loop. Each figure is a "
              "difference between workloads that differ in one thing:", "",
              "| phase | how it is derived | " + " | ".join(names) + " | metering cost |",
              "|:---|:---|" + "---:|" * (len(names) + 1)]
    derived = result["derived"]
    for key, label, how in (
            ("fixed", "per request: parse, route, upstream request, head relay, finish/records",
             "`stream1` (3 events) whole"),
            ("local", "of which parse, route, a local reply, finish/records", "`local404` whole"),
            ("upstream", "of which upstream request, head relay, 3 events", "`stream1` - `local404`"),
            ("per_event_one_write", "body relay, per event, many in one read", "(`stream64` - `stream1`) / Δevents"),
            ("per_event_own_read", "body relay, per event in a read of its own", "(`paced8` - `stream1`) / Δevents")):
        if key in derived.get("metering_on", {}):
            cells = [_n(derived[n][key]) if key in derived.get(n, {}) else "n/a" for n in names]
            meter = derived.get("meter", {}).get(key)
            cells.append(_n(meter) if meter is not None else "n/a")
            lines.append(f"| {label} | {how} | " + " | ".join(cells) + " |")
    lines += _repeatability(targets, abouts, args)
    lines += _baseline_lines(result, abouts)
    lines += _profile_lines(result)
    return "\n".join(lines)


def _repeatability(targets: dict[str, Any], abouts: dict[str, str], args: dict[str, Any]) -> list[str]:
    worst = max(f["spread"] for figures in targets.values() for f in figures.values())
    rates = [rate for figures in targets.values() for f in figures.values() for rate in f["background_per_s"]]
    largest = max((share, shape, name) for name, figures in targets.items() for shape, f in figures.items()
                  for share in (max(f["background_per_request"]) / f["mean"],))
    lines = ["", "### Repeatability", "",
             "Every count has the target's idle background subtracted: what its timers execute per second with "
             f"nothing to serve ({_n(min(rates))}-{_n(max(rates))} instructions a second here, counted for "
             f"{args['idle_seconds']:g} s in each process after its shapes), times the shape's wall time, "
             "which follows the machine's load. The largest correction: "
             f"{largest[0]:.2%} of `{largest[1]}` on {largest[2]}.", "",
             f"Spread, (max - min) / mean over the runs of each config, per shape (target < {SPREAD_TARGET:.1%}); "
             f"worst {worst:.3%}: " + ("within target" if worst < SPREAD_TARGET else "**above target**"), "",
             "| shape | " + " | ".join(targets) + " |", "|:---|" + "---:|" * len(targets)]
    for shape in abouts:
        lines.append(f"| `{shape}` | " + " | ".join(f"{targets[n][shape]['spread']:.3%}" if shape in targets[n]
                                                    else "n/a" for n in targets) + " |")
    return lines


def _baseline_lines(result: dict[str, Any], abouts: dict[str, str]) -> list[str]:
    baseline = result["baseline"]
    if not baseline:
        return ["", "### Against the baseline", "", "no baseline file: run with --update-baseline to write one"]
    lines = ["", "### Against the baseline", "",
             f"baseline: commit {baseline.get('commit', '?')}, {baseline.get('requests', '?')} requests a shape. "
             "Δ = (this run - baseline) / baseline, instructions per request.", "",
             "| shape | " + " | ".join(result["deltas"]) + " |", "|:---|" + "---:|" * len(result["deltas"])]
    for shape in abouts:
        lines.append(f"| `{shape}` | " + " | ".join(_pct(d.get(shape)) for d in result["deltas"].values()) + " |")
    return lines


def _profile_lines(result: dict[str, Any]) -> list[str]:
    shape = result["profile_shape"]
    by_object = sorted(result["by_object"][shape].items(), key=lambda item: -item[1])
    total = sum(ir for _, ir in by_object) or 1
    lines = ["", f"### Where `{shape}` goes (metering on, first run): self instructions per request", "",
             "| object file | instructions | share |", "|:---|---:|---:|"]
    lines += [f"| {name} | {_n(ir)} | {ir / total:.1%} |" for name, ir in by_object[:8]]
    lines += ["", "| top function (self) | object | instructions | share |", "|:---|:---|---:|---:|"]
    lines += [f"| `{fn}` | {obj} | {_n(ir)} | {ir / total:.1%} |" for fn, obj, ir in result["top"][shape]]
    return lines
