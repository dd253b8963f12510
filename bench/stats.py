"""Percentiles and summaries over nanosecond samples (reported in milliseconds)."""

from __future__ import annotations

from collections.abc import Sequence

QUANTILES = (50, 90, 99)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of already sorted values; NaN when empty."""
    if not sorted_values:
        return float("nan")
    rank = (len(sorted_values) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


def summary_ms(samples_ns: Sequence[int]) -> dict[str, float]:
    """n, min, mean, max and p50/p90/p99 of nanosecond samples, in milliseconds."""
    values = sorted(samples_ns)
    out: dict[str, float] = {"n": len(values)}
    if not values:
        return out
    out["min"] = values[0] / 1e6
    out["mean"] = sum(values) / len(values) / 1e6
    out["max"] = values[-1] / 1e6
    for q in QUANTILES:
        out[f"p{q}"] = percentile(values, q) / 1e6
    return out


def overhead_ms(direct: dict[str, float], proxied: dict[str, float]) -> dict[str, float]:
    """Proxied minus direct, percentile by percentile (a difference of percentiles, not of pairs)."""
    return {f"p{q}": proxied.get(f"p{q}", float("nan")) - direct.get(f"p{q}", float("nan")) for q in QUANTILES}


def per_stream_ms(cpu_s: float, streams: int) -> float:
    """CPU seconds spread over `streams`, in milliseconds per stream; NaN when there were none."""
    return cpu_s * 1000 / streams if streams else float("nan")
