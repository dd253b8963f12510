"""The benchmark side of bench.memory and bench.connections: the children they load the proxy with, and how
they read them. The load process itself is bench.holder.

- Holder: the handle on a running `python -m bench.holder`, read through the JSON lines it prints;
- Rig and run_rig: the mock backend, the proxy and the holders, all stopped whatever happens. The proxy is
  one process, or a supervisor and its `server.workers` (see proxy_processes);
- raise_nofile and FdPlan: the open-files limit, and how many proxy processes the connections need under it;
- wide_proxy_config: the proxy config with room for every connection the benchmark holds;
- gauges, cpu_delta and cpu_text: the proxy's /metrics, and who used the CPU over a window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import resource
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import orjson
import uvloop

from bench.harness import (
    HOST,
    Log,
    Pins,
    foreign_load,
    mock_service,
    process_cpu_seconds,
    proxy_config,
    proxy_service,
    stop_children,
    write_configs,
)
from bench.loadgen import http_get
from bench.procs import Service, pinned_core_seconds, self_cpu_seconds

CLK_TCK = os.sysconf("SC_CLK_TCK")
CAP_SYS_RESOURCE = 24  # capability(7): the bit that lets a process raise its hard limits
FD_HEADROOM = 200  # descriptors a proxy holds besides its connections: listener, epoll, logs, metrics files, scrapes
WORKER_SHARE = 0.8  # SO_REUSEPORT spreads connections by a hash, not evenly: a worker is planned to fill this much


# --- the benchmark's handle on a holder process ---------------------------------------------------


class Holder:
    """A running `python -m bench.holder`, read through the JSON lines it prints.

    It is a bench.procs.Service with another command: that gives it the same output draining, CPU
    accounting and SIGTERM-then-SIGKILL stop as the mock and the proxy, and `stop_children` handles it
    alike. SIGTERM makes the holder close its connections and exit.
    """

    def __init__(self, name: str, mode: str, port: int, count: int, *options: str) -> None:
        self.service = Service(name, [])
        self.service.argv = [sys.executable, "-m", "bench.holder", mode, "--port", str(port),
                             "--count", str(count), *options]

    def start(self) -> None:
        self.service.spawn()

    def last(self, event: str) -> dict[str, Any] | None:
        """The latest line of this kind the holder printed, or None."""
        marker = f'{{"event":"{event}"'
        for line in reversed(list(self.service.lines)):
            if line.startswith(marker):
                return orjson.loads(line)
        return None

    async def wait(self, event: str, timeout: float) -> dict[str, Any]:
        """Wait for a line of this kind; RuntimeError if the holder exits or `timeout` passes first."""
        deadline = time.monotonic() + timeout
        while (found := self.last(event)) is None:
            if not self.service.alive():
                raise RuntimeError(f"{self.service.name} exited before `{event}`:\n{self.service.output()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.service.name}: no `{event}` within {timeout:g}s")
            await asyncio.sleep(0.05)
        return found

    def stop(self) -> dict[str, Any] | None:
        """Close its connections (SIGTERM) and wait for it to exit; its `closed` line, if it printed one."""
        self.service.stop()
        return self.last("closed")


# --- open files -----------------------------------------------------------------------------------


def raise_nofile(target: int) -> int:
    """Raise this process's open-files limit, soft and hard, to `target`; return the soft limit now in force.

    Children inherit it: the proxy holds two descriptors per proxied stream, the mock and the holders one
    per connection, and the usual hard limit (often 20000 or less) is below that at 10,000 streams. Raising
    a hard limit needs root (CAP_SYS_RESOURCE) and stops at /proc/sys/fs/nr_open; without them, the soft
    limit goes up to the hard one and the report shows the limit the run had.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
    new_soft = hard if hard == resource.RLIM_INFINITY else min(max(soft, target), hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
    return new_soft


def _has_cap_sys_resource() -> bool:
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    return False


@dataclass
class FdPlan:
    """How many proxy processes `streams` proxied streams need under the open-files limit, and why.

    A proxied stream holds two descriptors in the proxy (client and upstream socket), and so does every
    other connection through it (`extra`: the probes). When one process may not hold them all, the proxy
    runs as `server.workers: N`: the kernel spreads the connections over the workers (SO_REUSEPORT), by a
    hash rather than evenly, so each is planned to need at most WORKER_SHARE of the limit.
    """

    streams: int
    need: int  # descriptors the proxy needs in all
    limit: int  # the most one process may hold: the hard limit, after trying to raise it
    limit_why: str  # "hard limit, no CAP_SYS_RESOURCE", "raised by the bench", ...
    soft: int  # the soft limit of this process, which its children start with
    workers: int
    requested: int | None  # --workers N; None for auto

    @classmethod
    def make(cls, streams: int, extra: int, requested: int | None, target: int) -> FdPlan:
        """Raise this process's limit (children inherit it) to `target` or what the proxy needs, if higher, and plan."""
        need = 2 * (streams + extra) + FD_HEADROOM
        hard_before = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        soft = raise_nofile(max(target, need))
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard == resource.RLIM_INFINITY:
            limit, why = sys.maxsize, "no limit"
        elif hard != hard_before:
            limit, why = hard, "hard limit, raised by the bench"
        elif hard >= max(target, need):
            limit, why = hard, "hard limit"
        else:
            limit, why = hard, ("hard limit, no CAP_SYS_RESOURCE" if not _has_cap_sys_resource()
                                else "hard limit, could not be raised (see /proc/sys/fs/nr_open)")
        return cls(streams, need, limit, why, soft, requested or auto_workers(need, limit), requested)

    @property
    def per_worker(self) -> int:
        return math.ceil(self.need / self.workers)

    def why(self, cpu: int | None) -> str:
        """E.g. `one process may hold at most 20,000 descriptors here (hard limit, no CAP_SYS_RESOURCE); 10,000
        streams need ~20,232: 2 workers sharing CPU 0`."""
        limit = ("one process may hold any number of descriptors here" if self.limit == sys.maxsize else
                 f"one process may hold at most {self.limit:,} descriptors here ({self.limit_why})")
        where = f"on CPU {cpu}" if cpu is not None else "unpinned"
        chosen = (f"one process {where}" if self.workers == 1 else
                  f"{self.workers} workers {'sharing CPU ' + str(cpu) if cpu is not None else 'unpinned'}, "
                  f"~{self.per_worker:,} descriptors each")
        given = f" (--workers {self.requested})" if self.requested else ""
        return f"{limit}; {self.streams:,} streams need ~{self.need:,}: {chosen}{given}"

    def warnings(self) -> list[str]:
        """What may run out of descriptors: the proxy when --workers asked for too few, or the one mock process."""
        out = []
        if self.per_worker > self.limit:
            short = self.per_worker - self.limit
            out.append(f"WARNING: ~{self.per_worker:,} descriptors per proxy process are above the limit: about "
                       f"{short * self.workers // 2:,} streams or probes may fail with 503 proxy_out_of_resources "
                       "or find their connection closed")
        elif self.workers > 1 and self.per_worker > WORKER_SHARE * self.limit:
            out.append(f"WARNING: ~{self.per_worker:,} descriptors per worker leave under {1 - WORKER_SHARE:.0%} of "
                       "the limit for an uneven split of the connections; a worker may run out")
        if self.streams + FD_HEADROOM > self.limit:  # the mock holds one descriptor per stream, in one process
            out.append(f"WARNING: the mock backend, one process, holds a descriptor per stream: {self.streams:,} "
                       "streams are more than it may hold")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "per_worker": self.per_worker}


def auto_workers(need: int, limit: int) -> int:
    """One process when it may hold `need` descriptors, else the fewest workers that each need at most
    WORKER_SHARE of `limit`: 20,232 under 20,000 take 2."""
    return 1 if need <= limit else math.ceil(need / (WORKER_SHARE * limit))


# --- the proxy's processes ------------------------------------------------------------------------


def child_pids(pid: int) -> list[int]:
    """The live children of `pid`, from /proc/<pid>/task/*/children, or by scanning /proc where the kernel
    lacks those files (CONFIG_PROC_CHILDREN)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    children: list[int] = []
    try:
        for task in tasks:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += map(int, f.read().split())
    except FileNotFoundError:
        children = [int(entry) for entry in os.listdir("/proc") if entry.isdigit() and _ppid(int(entry)) == pid]
    except OSError:
        pass
    return sorted(set(children))


def _ppid(pid: int) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[1])  # field 4 of proc(5)
    return -1


def _worker_name(pid: int) -> str:
    """`worker-<i>` from the `--worker-index i` the supervisor starts a worker with; `pid-<pid>` otherwise."""
    with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().decode(errors="replace").split("\0")
        return f"worker-{int(argv[argv.index('--worker-index') + 1])}"
    return f"pid-{pid}"


def proxy_processes(pid: int) -> dict[str, int]:
    """The proxy's processes by name: {"proxy": pid} for a single process; {"supervisor": pid, "worker-0": ...}
    for `server.workers: N`, whose workers are children of the supervisor (which serves nothing itself)."""
    workers = {_worker_name(child): child for child in child_pids(pid)}
    if not workers:
        return {"proxy": pid}
    return {"supervisor": pid, **dict(sorted(workers.items(), key=lambda item: (len(item[0]), item[0])))}


def check_affinity(processes: dict[str, int], cpu: int) -> dict[str, Any]:
    """Every process's CPU mask, which should be {cpu}: the supervisor is pinned as it starts, before it starts
    its workers, so they inherit it. One that is not is pinned now, and listed under `repinned`."""
    found, repinned = {}, []
    for name, pid in processes.items():
        with contextlib.suppress(OSError):
            found[name] = sorted(os.sched_getaffinity(pid))
            if found[name] != [cpu]:
                os.sched_setaffinity(pid, {cpu})
                repinned.append(name)
    return {"cpu": cpu, "found": found, "repinned": repinned}


# --- proxy config, /metrics and CPU ---------------------------------------------------------------


def wide_proxy_config(mock_port: int, clients: int, upstream: int, pool_idle_timeout: float | None = None,
                      headroom: int = 1000, workers: int = 1) -> dict[str, Any]:
    """bench.harness.proxy_config with room for `clients` client and `upstream` backend connections.

    The timeouts are stretched so that nothing the benchmark holds on purpose is cut while it measures: a
    connection that has sent nothing is idle as far as the proxy is concerned (server.timeouts.keepalive),
    one that has begun a head has server.timeouts.request_head, and under a saturated load core connects,
    first bytes and pauses between events all take longer than usual. With `workers` > 1 every worker has
    those caps (server.max_connections and the pool's are per process): how the kernel splits the
    connections between them is not known in advance.
    """
    config = proxy_config(mock_port)
    config["server"].update(max_connections=clients + headroom, timeouts={
        "request_head": 300, "keepalive": 300, "body": 120, "write": 120, "connect": 60,
        "first_byte": 120, "stream_idle": 120})
    if workers > 1:
        config["server"]["workers"] = workers
    pool = {"max_connections": upstream + headroom, "max_idle": upstream + headroom}
    if pool_idle_timeout is not None:
        pool["idle_timeout"] = pool_idle_timeout
    config["backends"][0].update(pool)
    return config


async def gauges(port: int) -> dict[str, float]:
    """The proxy's /metrics, each metric summed over its labels (e.g. llmproxy_client_connections).

    With workers, whichever worker gets the scrape merges all of them (prometheus-client multiprocess mode).
    """
    totals: dict[str, float] = {}
    for line in (await http_get(HOST, port, "/metrics")).decode().splitlines():
        if line and not line.startswith("#"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """after - before for every key of `after`; a holder started inside the window counts from 0."""
    return {name: value - before.get(name, 0.0) for name, value in after.items()}


def cpu_text(cpu_s: dict[str, float], seconds: float) -> str:
    """Who used the two cores over a window of Rig.cpu() samples, e.g. `proxy 7.90s (58%); mock 6.83s + load
    processes 3.69s + benchmark 0.20s (78%); other processes on the proxies' core 7%, ...`. With workers, the
    proxy's figure is the sum over its processes, each given after it."""
    holders = [name for name in cpu_s if name.startswith("holder-")]
    each = ", ".join(f"{name[6:]} {value:.2f}s" for name, value in cpu_s.items() if name.startswith("proxy."))
    each = f": {each}" if each else ""
    load = cpu_s["mock"] + cpu_s["bench"] + sum(cpu_s[name] for name in holders)
    return (f"proxy {cpu_s['proxy']:.2f}s ({cpu_s['proxy'] / seconds:.0%}{each}); mock {cpu_s['mock']:.2f}s + load "
            "processes " + " + ".join(f"{cpu_s[name]:.2f}s" for name in holders) + f" + benchmark "
            f"{cpu_s['bench']:.2f}s ({load / seconds:.0%}); "
            + foreign_load(cpu_s, seconds, ["proxy"], ["mock", "bench", *holders]))


# --- the children ---------------------------------------------------------------------------------


class Rig:
    """The children of a benchmark that loads the proxy from holders: the mock backend, the proxy (which may
    be replaced by a fresh one) and the holders. run_rig stops all of them, whatever happens."""

    def __init__(self, pins: Pins, mock: Service, config: str, log: Log) -> None:
        self.pins = pins
        self.mock = mock
        self.config = config  # the proxy's config file
        self.log = log
        self.proxies: list[Service] = []
        self.holders: list[Holder] = []
        self.port = 0  # the current proxy's

    @property
    def proxy(self) -> Service:
        return self.proxies[-1]

    def start_proxy(self, name: str = "proxy") -> int:
        """Stop the current proxy, if any, and start a fresh one; return its port.

        The proxy is pinned (bench.procs.Service.spawn) as soon as it is launched: with `server.workers` it is
        the supervisor, which starts its workers only after it has read its config, and they inherit its mask.
        """
        if self.proxies:
            self.proxy.stop()
        self.proxies.append(proxy_service(name, self.config, self.pins))  # listed before it starts: see run_rig
        self.port = self.proxy.start()
        self.log(f"{name} pid {self.proxy.pid} on :{self.port}; mock backend pid {self.mock.pid} on :{self.mock.port}")
        return self.port

    def proxy_processes(self) -> dict[str, int]:
        """The current proxy's processes by name (see proxy_processes)."""
        return proxy_processes(self.proxy.pid)

    def start_holder(self, name: str, mode: str, count: int, *options: str) -> Holder:
        holder = Holder(name, mode, self.port, count, *options)
        self.holders.append(holder)
        holder.start()
        return holder

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of the proxy, the mock, each running holder and this process (`bench`), and the
        busy and stolen seconds of the two pinned cores; cpu_delta of two samples covers a window.

        `proxy` is the sum over the proxy's processes; with workers, `proxy.<name>` is each of them (a worker
        restarted inside the window counts from its start; the one it replaced drops out).
        """
        processes = self.proxy_processes()
        each = {name: process_cpu_seconds([pid]) for name, pid in processes.items()}
        out = {"proxy": sum(each.values())}
        if len(each) > 1:
            out.update((f"proxy.{name}", seconds) for name, seconds in each.items())
        out["mock"] = self.mock.cpu_seconds()
        out.update((h.service.name, h.service.cpu_seconds()) for h in self.holders if h.service.alive())
        out["bench"] = self_cpu_seconds()
        out.update(pinned_core_seconds(self.pins))
        return out

    def stop(self) -> str:
        # holders first, so that no proxy sees its clients vanish mid-stream; proxies before the mock
        return stop_children([*(holder.service for holder in self.holders), *reversed(self.proxies), self.mock])


def run_rig(name: str, args: argparse.Namespace, pins: Pins, log: Log,
            make_config: Callable[[int], dict[str, Any]],
            body: Callable[[Rig], Awaitable[None]]) -> tuple[dict[str, Any], str | None, str]:
    """Start the mock, write the proxy config `make_config(mock port)` returns, run `body(rig)` on uvloop (it
    starts the proxy and the holders), then stop every child, also on an error or Ctrl-C.

    Returns the config, why the run was aborted (None if it was not) and the children's last output.
    `body` keeps what it measured where its caller can read it: an aborted run still reports what it got.
    """
    rig, config, failure = Rig(pins, mock_service(args, pins), "", log), {}, None
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        try:
            config = make_config(rig.mock.start())
            rig.config = write_configs(tmp, name, {"proxy": config})["proxy"]
            uvloop.run(body(rig))
        except (RuntimeError, OSError) as exc:
            failure = str(exc)
        finally:
            output = rig.stop()
    return config, failure, output
