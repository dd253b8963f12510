"""PNG plots of a suite run, from the sections' JSON documents: TTFT CDFs, overhead by concurrency, memory.

Each function draws one figure when its data is there and returns (file name, caption), or None.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display, and no GUI toolkit to import

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

from bench.stats import percentile

Plot = tuple[str, str]  # file name in the results directory, caption
PATH_STYLE = {"direct": ("direct", "tab:gray"), "proxied": ("llmproxy", "tab:blue"), "nginx": ("nginx", "tab:orange")}
X_CUT = 99.9  # CDF x axes end at the largest path's p99.9: one outlier would otherwise squash the curves
DPI = 110


def save(fig: Figure, directory: Path, name: str) -> None:
    fig.tight_layout()
    fig.savefig(directory / name, dpi=DPI)
    plt.close(fig)


def ttft_levels(ttft: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    """The levels of bench.ttft run against the `mode` backend (a document without `backend` is all paced)."""
    return [level for level in ttft.get("levels") or [] if level.get("backend", "paced") == mode
            and (level.get("raw") or {}).get("ttft_ns")]


def cdf_axes(ax: Axes, level: dict[str, Any]) -> None:
    samples = level["raw"]["ttft_ns"]
    low, cut = float("inf"), 0.0
    for path, (label, color) in PATH_STYLE.items():
        values = sorted(v / 1e6 for v in samples.get(path) or [])
        if not values:
            continue
        ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", color=color,
                label=f"{label} (n={len(values)})")
        low, cut = min(low, values[0]), max(cut, percentile(values, X_CUT))
    # log scale: TTFTs span 0.2 ms at c=1 to hundreds of ms on a saturated core, and both ends matter
    ax.set_xscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.xaxis.set_major_formatter(plain)
    # within one decade there may be no major tick at all: label the minor ones instead
    ax.xaxis.set_minor_formatter(plain if low > 0 and cut / low < 10 else NullFormatter())
    if 0 < low < cut:
        ax.set_xlim(low * 0.9, cut * 1.1)
    ax.set_title(f"c={level['concurrency']}")
    ax.set_xlabel(f"TTFT, ms (log scale, axis ends at p{X_CUT:g})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")


def ttft_cdf(documents: dict[str, dict[str, Any]], directory: Path, mode: str) -> Plot | None:
    levels = ttft_levels(documents.get("ttft") or {}, mode)
    if not levels:
        return None
    fig, axes = plt.subplots(1, len(levels), figsize=(4.2 * len(levels), 3.6), squeeze=False)
    for ax, level in zip(axes[0], levels, strict=True):
        cdf_axes(ax, level)
    axes[0][0].set_ylabel("fraction of streams")
    fig.suptitle(f"TTFT, direct vs through the proxy, {mode} backend (bench.ttft)")
    name = f"ttft_cdf_{mode}.png"
    save(fig, directory, name)
    return name, f"TTFT CDF, {mode} backend: direct vs proxied" + (" vs nginx" if _has_nginx(levels) else "")


def _has_nginx(levels: list[dict[str, Any]]) -> bool:
    return any(level["raw"]["ttft_ns"].get("nginx") for level in levels)


def overhead_bars(documents: dict[str, dict[str, Any]], directory: Path) -> Plot | None:
    headline = (documents.get("ttft") or {}).get("headline") or {}
    pattern = re.compile(r"overhead_(p50|p90|p99)_ms_c(\d+)_(paced|burst)$")
    found: dict[str, dict[int, dict[str, float]]] = {}
    for name, value in headline.items():
        match = pattern.match(name)
        if match and isinstance(value, int | float):
            q, c, mode = match.groups()
            found.setdefault(mode, {}).setdefault(int(c), {})[q] = value
    if not found:
        return None
    modes = [mode for mode in ("paced", "burst") if mode in found]
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 3.8), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        grouped_bars(ax, found[mode], ("p50", "p90", "p99"))
        ax.set_title(f"{mode} backend")
        ax.set_xlabel("concurrency")
    axes[0][0].set_ylabel("TTFT overhead (proxied - direct), ms")
    fig.suptitle("First-token overhead by concurrency (bench.ttft)")
    save(fig, directory, "overhead_by_concurrency.png")
    return "overhead_by_concurrency.png", "TTFT overhead percentiles by concurrency"


def grouped_bars(ax: Axes, by_level: dict[int, dict[str, float]], series: tuple[str, ...]) -> None:
    levels = sorted(by_level)
    width = 0.8 / len(series)
    for i, name in enumerate(series):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(levels))]
        values = [by_level[c].get(name, float("nan")) for c in levels]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize="x-small")
    ax.set_xticks(range(len(levels)), [str(c) for c in levels])
    ax.axhline(0, color="black", linewidth=0.6)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")


def memory_figures(headline: dict[str, Any]) -> list[tuple[str, str]]:
    """(bar label, headline key): idle, the peak at each stream count measured, and after the largest."""
    counts = sorted(int(name.rsplit("_", 1)[1]) for name in headline if re.fullmatch(r"rss_peak_mb_\d+", name))
    bars = [("idle", "rss_idle_mb"), *((f"peak, {n:,} streams", f"rss_peak_mb_{n}") for n in counts)]
    if counts:
        bars.append((f"after {counts[-1]:,} streams", f"rss_after_mb_{counts[-1]}"))
    return bars


def memory_bars(documents: dict[str, dict[str, Any]], directory: Path, limits: dict[str, float]) -> Plot | None:
    """Proxy RSS per phase of bench.memory, with the target of a phase (`limits`, by headline key) over its bar."""
    headline = (documents.get("memory") or {}).get("headline") or {}
    bars = [(label, headline[name], limits.get(name)) for label, name in memory_figures(headline)
            if isinstance(headline.get(name), int | float)]
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.8))
    drawn = ax.bar([label for label, _, _ in bars], [value for _, value, _ in bars], color="tab:blue")
    ax.bar_label(drawn, fmt="%.1f")
    for i, (_, _, target) in enumerate(bars):
        if target is not None:  # the target as a short red line across its own bar
            ax.hlines(target, i - 0.4, i + 0.4, colors="tab:red", linestyles="--", label=f"target ≤ {target:g} MB")
    top = max(max(value for _, value, _ in bars), *(target or 0 for _, _, target in bars))
    ax.set_ylim(0, top * 1.2)  # room for the value labels and the legend above the bars
    ax.set_ylabel("proxy RSS, MB")
    ax.set_title("Proxy memory (bench.memory)")
    ax.grid(axis="y", alpha=0.3)
    if any(target is not None for _, _, target in bars):
        ax.legend(fontsize="small", loc="upper left")
    save(fig, directory, "memory.png")
    return "memory.png", "Proxy RSS: " + ", ".join(label for label, _, _ in bars)


STRATEGY_COLORS = {"round_robin": "tab:gray", "least_connections": "tab:orange", "latency_based": "tab:green",
                   "queue_depth": "tab:purple", "prefix_affinity": "tab:blue"}


def fleet_ttft(document: dict[str, Any], path: str | Path) -> None:
    """bench.fleet: the TTFT CDF of each strategy (repeats pooled), and the mean TTFT by turn of the conversation."""
    by_strategy: dict[str, list[dict[str, Any]]] = {}
    for phase in document["phases"]:
        by_strategy.setdefault(phase["strategy"], []).extend(t for t in phase["turns"] if t["ok"])
    fig, (cdf, by_turn) = plt.subplots(1, 2, figsize=(11, 4))
    low, cut = float("inf"), 0.0
    for name, turns in by_strategy.items():
        color = STRATEGY_COLORS.get(name)
        values = sorted(t["ttft_ms"] for t in turns)
        if not values:
            continue
        cdf.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", color=color,
                 label=f"{name} (mean {sum(values) / len(values):.1f} ms)")
        low, cut = min(low, values[0]), max(cut, percentile(values, X_CUT))
        sums: dict[int, list[float]] = {}
        for t in turns:
            sums.setdefault(t["turn"], []).append(t["ttft_ms"])
        xs = sorted(sums)
        by_turn.plot([x + 1 for x in xs], [sum(sums[x]) / len(sums[x]) for x in xs], color=color, label=name)
    cdf.set_xscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    cdf.xaxis.set_major_formatter(plain)
    cdf.xaxis.set_minor_formatter(plain if low > 0 and cut / low < 10 else NullFormatter())
    if 0 < low < cut:
        cdf.set_xlim(low * 0.9, cut * 1.1)
    cdf.set_xlabel(f"TTFT, ms (log scale, axis ends at p{X_CUT:g})")
    cdf.set_ylabel("fraction of requests")
    cdf.set_title("TTFT per strategy")
    cdf.grid(alpha=0.3)
    cdf.legend(loc="lower right", fontsize="small")
    by_turn.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_turn.set_xlabel("turn of the conversation")
    by_turn.set_ylabel("mean TTFT, ms")
    by_turn.set_title("TTFT as conversations grow")
    by_turn.grid(alpha=0.3)
    by_turn.legend(fontsize="small")
    fig.suptitle("Balancing strategies on a coding-agent trace, four prefix-caching backends (bench.fleet)")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def write_plots(documents: dict[str, dict[str, Any]], directory: Path, limits: dict[str, float]) -> list[Plot]:
    """Draw every plot the documents have data for into `directory`; (file name, caption) of each. `limits`
    are the upper bounds of the targets, by headline key, drawn where a plot shows that figure."""
    makers: list[Callable[[], Plot | None]] = [
        *(lambda mode=mode: ttft_cdf(documents, directory, mode) for mode in ("paced", "burst")),
        lambda: overhead_bars(documents, directory), lambda: memory_bars(documents, directory, limits),
        lambda: fleet_plot(documents, directory)]
    return [plot for make in makers if (plot := make()) is not None]


def fleet_plot(documents: dict[str, dict[str, Any]], directory: Path) -> Plot | None:
    document = documents.get("fleet")
    if not document or not document.get("phases"):
        return None
    name = "fleet_ttft.png"
    fleet_ttft(document, directory / name)
    return name, "Balancing strategies on a coding-agent trace: TTFT per strategy and as conversations grow"
