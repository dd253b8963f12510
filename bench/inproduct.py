"""In-product overhead: what the proxy's own overhead histograms say it added, checked against the client.

The proxy times itself (request read -> written upstream, first upstream byte -> written to the client, each
later read -> written) and exports the histograms at `GET /metrics`. bench.ttft scrapes them before and after
each level's first-token phase, with no stream in flight, and takes the difference. Two checks keep that
metric honest: every proxied stream that succeeded is counted exactly once, and request + first-byte time
spent in proxy code is no more than the first-token overhead the client measured (paired Δ p50, plus
AGREEMENT_MS of noise), since the client's figure also holds two loopback hops and the wake-ups. A metric
that misses requests or claims more time than the client saw is wrong, and fails the run.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bench.harness import HOST, Histogram, parse_histograms
from bench.interleave import Phase
from bench.loadgen import http_get

PROXIED = "proxied"  # the path through the proxy, whose own histograms these are

# the proxy's own overhead histograms (in seconds), by what they time
INPRODUCT = {"request": "llmproxy_proxy_request_overhead_seconds",
             "first_byte": "llmproxy_proxy_first_byte_overhead_seconds",
             "chunk": "llmproxy_proxy_chunk_overhead_seconds"}
NOT_EXPORTED = "not exported by this proxy"
AGREEMENT_MS = 0.1  # in-product request + first byte may exceed the client-side paired Δ p50 by this much
SCRAPE_TRIES, SCRAPE_PAUSE_S = 10, 0.02


async def scrape(port: int) -> dict[str, Histogram] | str:
    """The proxy's overhead histograms now, or why they could not be read."""
    try:
        text = (await http_get(HOST, port, "/metrics")).decode("utf-8", "replace")
    except (OSError, RuntimeError, asyncio.TimeoutError) as exc:
        return f"scrape of /metrics failed: {exc}"
    return parse_histograms(text, INPRODUCT.values())


async def scrape_settled(port: int, before: dict[str, Histogram] | str, phase: Phase) -> dict[str, Histogram] | str:
    """The second scrape, taken once the request histogram has caught up with the phase's streams.

    No stream is in flight now, but the proxy may file a stream's observations a moment after the client
    has its last byte: scrape again, briefly, until every stream that succeeded is counted.
    """
    expected = phase.played[PROXIED] - phase.errors[PROXIED].count
    name = INPRODUCT["request"]
    after = await scrape(port)
    for _ in range(SCRAPE_TRIES):
        if isinstance(after, str) or isinstance(before, str) or name not in after or name not in before:
            break
        if after[name].count - before[name].count >= expected:
            break
        await asyncio.sleep(SCRAPE_PAUSE_S)
        after = await scrape(port)
    return after


def inproduct_summary(scrapes: dict[str, Any], phase: Phase, paired: dict[str, float],
                      inter_chunk: dict[str, Any] | None, rig_bound: bool) -> dict[str, Any]:
    """What the proxy's own histograms say it added over the phase, and whether that agrees with the client."""
    before, after = scrapes.get("before", "not scraped"), scrapes.get("after", "not scraped")
    if isinstance(before, str) or isinstance(after, str):
        return {"exported": False, "note": before if isinstance(before, str) else after, "failed": []}
    deltas = {key: after[name].minus(before[name])
              for key, name in INPRODUCT.items() if name in before and name in after}
    if not deltas:
        return {"exported": False, "note": NOT_EXPORTED, "failed": []}
    found: dict[str, Any] = {"exported": True, "streams": phase.played[PROXIED],
                             "failed_streams": phase.errors[PROXIED].count}
    for key in INPRODUCT:
        found[key] = histogram_ms(deltas[key]) if key in deltas else None
    found["check"] = agreement(found, paired, rig_bound)
    if inter_chunk is not None and found["chunk"] is not None:
        found["chunk_vs_client"] = {"inproduct_mean_ms": found["chunk"]["mean_ms"],
                                    "client_inter_chunk_overhead_ms": inter_chunk[f"{PROXIED}_overhead"]}
    found["failed"] = found["check"].pop("failed")
    return found


def histogram_ms(histogram: Histogram) -> dict[str, float]:
    return {"count": histogram.count, "mean_ms": histogram.mean() * 1e3,
            "p50_ms": histogram.quantile(0.5) * 1e3, "p99_ms": histogram.quantile(0.99) * 1e3}


def agreement(found: dict[str, Any], paired: dict[str, float], rig_bound: bool) -> dict[str, Any]:
    """Check the proxy's request + first-byte overhead against the client's paired Δ, and its counts.

    The in-product part is the time spent in proxy code; the client-side Δ adds the two extra loopback
    hops and wake-ups, so the in-product sum can only be smaller, give or take noise (AGREEMENT_MS).
    That holds only while the client-side Δ measures the proxy: not when the mock + load generator core
    is saturated (`rig_bound`: by them, or with other processes on a shared machine) or Δ is negative
    (queueing there, which differs between paths, dominates it); the comparison is then skipped. Every
    stream of the phase that succeeded must be counted once: the scrapes bracket the phase with no stream
    in flight.
    """
    failed = []
    nan = float("nan")
    streams, failures = found["streams"], found["failed_streams"]
    for key in ("request", "first_byte"):
        histogram = found[key]
        if histogram is None:
            failed.append(f"{INPRODUCT[key]} {NOT_EXPORTED} (the other overhead histograms are)")
        elif not streams - failures <= histogram["count"] <= streams:
            failed.append(f"{INPRODUCT[key]} counted {histogram['count']:.0f} observations for {streams} proxied "
                          f"streams ({failures} failed)")
    request, first = found["request"], found["first_byte"]
    total = request["mean_ms"] + first["mean_ms"] if request and first else nan
    paired_p50, paired_mean = paired.get("p50", nan), paired.get("mean", nan)
    skipped = None
    if rig_bound or not paired_p50 > 0:
        skipped = "the mock + load generator core was saturated (by them, or with other processes)" if rig_bound else \
            "paired Δ p50 is not positive: queueing on the mock + load generator core dominates it"
    elif total > paired_p50 + AGREEMENT_MS:
        failed.append(f"in-product request + first-byte overhead {total:.3f} ms exceeds the client-side paired Δ "
                      f"p50 {paired_p50:.3f} ms by more than {AGREEMENT_MS} ms")
    return {"inproduct_ms": total, "paired_mean_ms": paired_mean, "paired_p50_ms": paired_p50,
            "share_of_paired_mean": total / paired_mean if paired_mean > 0 else nan,
            "comparison_skipped": skipped, "failed": failed}
