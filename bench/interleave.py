"""The interleaved first-token phase shared by bench.ttft, bench.metering and bench.limits.

C workers each hold one keep-alive connection per path and play rounds of one stream on every path, in
random order. All paths therefore run at the same moments, under the same load, and are only ever
compared within one run. A benchmark says which paths it has, which paired differences it wants and how
to sample CPU (`Interleaving` and the `Env` it passes); `run_level` does the rest and returns a `Level`
that the benchmark summarises in its own terms.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol, TypeVar

from bench.harness import HOST, Log, all_alive
from bench.loadgen import Lane, fetch_json
from bench.procs import Service
from bench.stats import overhead_ms, per_stream_ms, summary_ms

DIRECT = "direct"  # the path straight to the mock backend, which every benchmark compares against
WARMUP_ROUNDS = 1  # per worker: first use of every connection, fills the proxies' upstream pools
MIN_ROUNDS = 3  # recorded per worker: at high concurrency N/C would otherwise leave too few samples
OPEN_BATCH = 64  # connections opened at once: a SYN burst past the accept queue costs 1 s retransmits

Pair = tuple[str, str, str]  # name, minuend, subtrahend
T = TypeVar("T")


class Env(Protocol):
    """What the phase needs from a benchmark's environment."""

    rng: random.Random
    ports: dict[str, int]

    def lane(self, path: str) -> Lane: ...

    def cpu(self) -> dict[str, float]: ...  # CPU seconds so far, by name; sampled at both ends of the window


class Failures:
    """Failed streams: how many, and each distinct message with its count (the first few kinds only)."""

    MAX_KINDS = 20

    def __init__(self) -> None:
        self.count = 0
        self.kinds: dict[str, int] = {}

    def add(self, message: str) -> None:
        self.count += 1
        if message in self.kinds or len(self.kinds) < self.MAX_KINDS:
            self.kinds[message] = self.kinds.get(message, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "kinds": self.kinds}


@dataclass(frozen=True)
class Interleaving:
    """The paths a benchmark interleaves, and what it keeps of each round besides the TTFTs."""

    paths: tuple[str, ...]
    pairs: tuple[Pair, ...] = ()  # paired differences kept per round, when both streams of a pair succeeded
    label: Callable[[Sequence[str]], str] = ",".join  # how a round's order is written into `Phase.rounds`
    # count the connections the proxies open to the mock while recording (from the mock's /_mock/stats)
    count_upstream: bool = False


@dataclass
class Worker:
    lanes: dict[str, Lane]


@dataclass
class Phase:
    """What the recording window of one concurrency level collected."""

    ttft: dict[str, list[int]]
    total: dict[str, list[int]]
    paired: dict[str, list[int]]
    errors: dict[str, Failures]
    window_streams: dict[str, int]  # streams completed inside the window, recorded or not: CPU is per these
    # SSE events of the streams in window_streams (CPU per event divides by these)
    window_events: dict[str, int] = field(default_factory=dict)
    played: dict[str, int] = field(default_factory=dict)  # every stream sent in the phase, recorded, failed or not
    # per path, the event arrival times of each recorded stream, when its lanes record them (Lane.record_arrivals)
    arrivals: dict[str, list[list[int]]] = field(default_factory=dict)
    rounds: list[tuple[Any, ...]] = field(default_factory=list)  # label, then the TTFT of each path
    wall_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)  # Env.cpu() over the window
    window_open: bool = False
    upstream_connects: int | None = None

    @classmethod
    def of(cls, spec: Interleaving) -> Phase:
        return cls(ttft={path: [] for path in spec.paths}, total={path: [] for path in spec.paths},
                   paired={name: [] for name, _, _ in spec.pairs},
                   errors={path: Failures() for path in spec.paths}, window_streams=dict.fromkeys(spec.paths, 0),
                   window_events=dict.fromkeys(spec.paths, 0), played=dict.fromkeys(spec.paths, 0),
                   arrivals={path: [] for path in spec.paths})


@dataclass
class Level:
    """One concurrency level, measured: the benchmark turns it into its report's numbers."""

    concurrency: int
    rounds: int  # recorded per worker
    phase: Phase
    reconnects: dict[str, int]
    warmup_errors: Failures
    extra: Any = None  # what run_level's `then` returned (bench.ttft: its throughput phase)

    @cached_property
    def ttft_ms(self) -> dict[str, dict[str, float]]:
        return {path: summary_ms(samples) for path, samples in self.phase.ttft.items()}

    @property
    def paired_ms(self) -> dict[str, dict[str, float]]:
        return {name: summary_ms(diffs) for name, diffs in self.phase.paired.items()}

    def overhead_ms(self, path: str, base: str = DIRECT) -> dict[str, float]:
        """TTFT of `path` minus that of `base`, percentile by percentile."""
        return overhead_ms(self.ttft_ms[base], self.ttft_ms[path])

    def cpu_ms_per_stream(self, name: str, paths: Iterable[str]) -> float:
        """CPU of `name` over the window per stream completed in it on `paths` (the streams it served)."""
        return per_stream_ms(self.phase.cpu_s[name], sum(self.phase.window_streams[path] for path in paths))

    def cpu_us_per_event(self, name: str, paths: Iterable[str]) -> float:
        """CPU of `name` over the window per SSE event of the streams completed in it on `paths`, in µs."""
        # per_stream_ms gives ms per unit; events are counted instead of streams, and µs = 1000 x ms
        return 1000 * per_stream_ms(self.phase.cpu_s[name], sum(self.phase.window_events[path] for path in paths))

    def busy(self, *names: str) -> float:
        """Share of one core that `names` used together over the window (NaN if the window never closed)."""
        return sum(self.phase.cpu_s[name] for name in names) / (self.phase.wall_s or float("nan"))

    def summary(self, middle: dict[str, Any], paired_raw: Any, **raw: Any) -> dict[str, Any]:
        """The level as JSON: the keys every benchmark has around its own `middle` ones, in one order.

        `paired_raw` is written as raw.paired_diff_ns and `raw` adds keys to raw before its rounds.
        """
        phase = self.phase
        return {
            "concurrency": self.concurrency,
            "rounds_per_worker": self.rounds,
            "ttft_ms": self.ttft_ms,
            "stream_ms": {path: summary_ms(samples) for path, samples in phase.total.items()},
            **middle,
            "reconnects": self.reconnects,
            "errors": {path: failures.as_dict() for path, failures in phase.errors.items()},
            "warmup_errors": self.warmup_errors.as_dict(),
            "raw": {"ttft_ns": phase.ttft, "stream_ns": phase.total, "paired_diff_ns": paired_raw, **raw,
                    "rounds": phase.rounds},
        }


# --- workers --------------------------------------------------------------------------------------


async def open_workers(lane: Callable[[str], Lane], paths: Sequence[str], concurrency: int) -> list[Worker]:
    """`concurrency` workers with one connected lane per path; connections open a batch at a time."""
    workers = [Worker({path: lane(path) for path in paths}) for _ in range(concurrency)]
    lanes = [lane for worker in workers for lane in worker.lanes.values()]
    for start in range(0, len(lanes), OPEN_BATCH):
        await asyncio.gather(*(lane.open() for lane in lanes[start:start + OPEN_BATCH]))
    return workers


def close_workers(workers: list[Worker]) -> None:
    for worker in workers:
        for lane in worker.lanes.values():
            lane.close()


def reconnects(workers: list[Worker], path: str) -> int:
    return sum(worker.lanes[path].reconnects for worker in workers)


async def warm_up(workers: list[Worker]) -> tuple[int, Failures]:
    """One round of streams on every lane; return the median stream duration (ns) and any errors."""
    durations: list[int] = []
    errors = Failures()

    async def one(worker: Worker) -> None:
        for _ in range(WARMUP_ROUNDS):
            for path, lane in worker.lanes.items():
                result = await lane.send()
                if result.ok:
                    durations.append(result.total_ns)
                else:
                    errors.add(f"{path}: {result.error}")

    await asyncio.gather(*(one(worker) for worker in workers))
    return (int(statistics.median(durations)) if durations else 0), errors


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Collect now, then keep the collector off: a collection pause would land on whichever stream is in flight."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# --- rounds ---------------------------------------------------------------------------------------


async def record_in_steady_state(workers: list[Worker], rounds: int, spread_s: float, settle_s: float,
                                 rng: random.Random, play_round: Callable[[Worker, bool], Awaitable[None]],
                                 on_open: Callable[[], Awaitable[None]],
                                 on_close: Callable[[], Awaitable[None]]) -> None:
    """Have each worker record `rounds` rounds while all C workers are streaming (steady state).

    Workers start staggered over `spread_s`, as independent users would, rather than in lock-step
    bursts every stream length. They play unrecorded rounds until every worker has started and settled
    (`settle_s`), record their rounds, then keep playing unrecorded until the last worker is done, so no
    recorded stream sees fewer than C concurrent streams. `on_open` / `on_close` bracket the recording
    window (for CPU samples).
    """
    recording = asyncio.Event()
    all_recorded = asyncio.Event()
    unfinished = [len(workers)]

    def recorded() -> None:
        unfinished[0] -= 1
        if not unfinished[0]:
            all_recorded.set()

    async def one(worker: Worker, delay_s: float) -> None:
        try:
            await asyncio.sleep(delay_s)
            while not recording.is_set():
                await play_round(worker, False)
            for _ in range(rounds):
                await play_round(worker, True)
        finally:
            recorded()  # also on a crash, so the window closes and gather() below raises it
        while not all_recorded.is_set():
            await play_round(worker, False)

    tasks = [asyncio.ensure_future(one(worker, rng.uniform(0, spread_s))) for worker in workers]
    if len(workers) > 1:
        await asyncio.sleep(settle_s)
    await on_open()
    recording.set()
    await all_recorded.wait()
    await on_close()
    await asyncio.gather(*tasks)


def random_order(rng: random.Random, paths: tuple[str, ...]) -> tuple[str, ...]:
    """The paths in random order. Two paths take one rng.random() draw, as bench.ttft always has, so that
    its seeded runs repeat."""
    if len(paths) == 2:
        return paths[::-1] if rng.random() < 0.5 else paths
    order = list(paths)
    rng.shuffle(order)
    return tuple(order)


async def play_streams(worker: Worker, order: Sequence[str], phase: Phase, record: bool) -> dict[str, int]:
    """One stream per path in `order`, back to back on the worker's connections; failures are counted
    whether recorded or not. Returns the TTFTs recorded."""
    got: dict[str, int] = {}
    for path in order:
        result = await worker.lanes[path].send()
        phase.played[path] += 1
        if not result.ok:
            phase.errors[path].add(result.error or "unknown error")
            continue
        if record:
            phase.ttft[path].append(result.ttft_ns)
            phase.total[path].append(result.total_ns)
            got[path] = result.ttft_ns
            if result.arrivals_ns is not None:
                phase.arrivals[path].append(result.arrivals_ns)
        if phase.window_open:
            phase.window_streams[path] += 1
            phase.window_events[path] += result.events
    return got


async def play_round(rng: random.Random, spec: Interleaving, worker: Worker, phase: Phase, record: bool) -> None:
    """One stream on each path, in random order; a recorded round also keeps its order and paired differences."""
    order = random_order(rng, spec.paths)
    got = await play_streams(worker, order, phase, record)
    if record:
        phase.rounds.append((spec.label(order), *(got.get(path) for path in spec.paths)))
        for name, a, b in spec.pairs:
            if a in got and b in got:
                phase.paired[name].append(got[a] - got[b])


async def mock_connections(port: int) -> int | None:
    """Connections the mock backend has accepted so far, or None: diagnostics only, the run stands without it."""
    try:
        stats = await fetch_json(HOST, port, "/_mock/stats")
    except (OSError, RuntimeError, ValueError, asyncio.TimeoutError):
        return None
    return stats.get("connections_total") if isinstance(stats, dict) else None


async def measure(env: Env, spec: Interleaving, workers: list[Worker], rounds: int, stream_ns: int) -> Phase:
    """Record `rounds` rounds per worker in steady state (see record_in_steady_state). CPU is sampled over
    the recording window, to be divided by the streams completed in it (recorded or not)."""
    phase = Phase.of(spec)
    spread_s = len(spec.paths) * stream_ns / 1e9 if len(workers) > 1 else 0.0
    before: dict[str, Any] = {}

    async def opened() -> None:
        if spec.count_upstream:
            before["reconnects"] = reconnects(workers, DIRECT)
        before["cpu"] = env.cpu()
        before["started"] = time.perf_counter()
        phase.window_open = True
        if spec.count_upstream:
            before["stats"] = await mock_connections(env.ports[DIRECT])

    async def closed() -> None:
        phase.window_open = False
        phase.wall_s = time.perf_counter() - before["started"]
        phase.cpu_s = cpu_delta(env.cpu(), before["cpu"])
        if spec.count_upstream:
            stats_after = await mock_connections(env.ports[DIRECT])
            if before["stats"] is not None and stats_after is not None:
                # connections the mock accepted in between, less one stats request and direct reopens
                direct_reopens = reconnects(workers, DIRECT) - before["reconnects"]
                phase.upstream_connects = stats_after - before["stats"] - 1 - direct_reopens

    await record_in_steady_state(workers, rounds, spread_s, spread_s + stream_ns / 1e9, env.rng,
                                 lambda worker, record: play_round(env.rng, spec, worker, phase, record),
                                 opened, closed)
    return phase


def cpu_delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before[name] for name in after}


# --- levels ---------------------------------------------------------------------------------------


Then = Callable[[list[Worker], Phase, int], Awaitable[Any]]


async def run_level(env: Env, spec: Interleaving, concurrency: int, requests: int, log: Log,
                    then: Then | None = None, before: Callable[[], Awaitable[None]] | None = None) -> Level:
    """Open the workers, warm up, record the rounds with the collector off, then run `then` (if any) on the
    same warm connections with the phase and the warm-up stream length (ns), and close the workers.

    `before` (if any) runs between the warm-up and the phase, and `then` right after the phase: no
    stream is in flight at either moment, so what a proxy counts in between is exactly the phase's
    streams (`Phase.played`). Each worker records max(MIN_ROUNDS, ceil(requests / C)) rounds, so a
    level has at least `requests` streams per path.
    """
    rounds = max(MIN_ROUNDS, math.ceil(requests / concurrency))
    log(f"c={concurrency}: opening {len(spec.paths) * concurrency} connections, warm-up "
        f"({WARMUP_ROUNDS} round(s) per worker)")
    workers = await open_workers(env.lane, spec.paths, concurrency)
    try:
        stream_ns, warm_errors = await warm_up(workers)
        if warm_errors.count:
            log(f"c={concurrency}: {warm_errors.count} warm-up errors, first: {next(iter(warm_errors.kinds))}")
        log(f"c={concurrency}: measuring {rounds} rounds x {concurrency} workers "
            f"(median warm-up stream {stream_ns / 1e6:.0f} ms)")
        if before is not None:
            await before()
        with gc_paused():
            phase = await measure(env, spec, workers, rounds, stream_ns)
        extra = await then(workers, phase, stream_ns) if then is not None else None
        lost = {path: reconnects(workers, path) for path in spec.paths}
    finally:
        close_workers(workers)
    return Level(concurrency, rounds, phase, lost, warm_errors, extra)


def concurrency_label(level: Any) -> str:
    return f"c={level}"


async def run_levels(concurrencies: Sequence[T], run_one: Callable[[T], Awaitable[dict[str, Any]]],
                     services: list[Service], log: Log,
                     label: Callable[[T], str] = concurrency_label) -> tuple[list[dict[str, Any]], bool]:
    """Run each level in turn; stop early, returning False, when a child has exited meanwhile.

    A level is usually a concurrency; it may be anything `run_one` takes, e.g. (concurrency, backend mode),
    with `label` naming it in the log. Whatever setup allocated so far (connections, probes) lives for the
    whole run: frozen first, it is kept out of every later collection.
    """
    gc.collect()
    gc.freeze()
    levels = []
    for level in concurrencies:
        levels.append(await run_one(level))
        if not all_alive(services, label(level), log):
            return levels, False
    return levels, True
