"""Child processes for benchmarks: start, learn the port from the banner, pin, measure CPU, stop."""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
_BANNER = re.compile(r"listening on http://(\[[^\]]+\]|[^:/\s]+):(\d+)")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class Service:
    """A `python -m llmproxy ...` child whose merged stdout/stderr is drained by a thread.

    Draining matters: a child blocked on a full pipe stops serving, which would look like a hang of
    the thing under test. The last lines are kept so a failure can be reported with its logs.
    """

    def __init__(self, name: str, args: list[str], cpu: int | None = None) -> None:
        self.name = name
        self.argv = [sys.executable, "-m", "llmproxy", *args]
        self.cpu = cpu
        self.port = 0
        self.lines: deque[str] = deque(maxlen=200)
        self._port_found = threading.Event()
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def start(self, timeout: float = 15.0, cwd: str | Path = REPO_ROOT) -> int:
        """Start the child in `cwd` (whose llmproxy it runs), pin it, and return the port from its banner."""
        self.spawn(cwd)
        if not self._port_found.wait(timeout) or not self.port:
            self.stop()
            raise RuntimeError(f"{self.name} did not print its `listening on` banner within {timeout:g}s; "
                               f"command: {' '.join(self.argv)}\noutput:\n{self.output()}")
        return self.port

    def spawn(self, cwd: str | Path = REPO_ROOT) -> None:
        """Launch the child, pinned, with its output drained by a thread; start() waits for the banner after.

        A child that prints no banner (redis-server) sets `port` itself first, which keeps the scan off.
        """
        self._proc = subprocess.Popen(self.argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, bufsize=1)
        if self.cpu is not None:
            # set at once, before the banner: nothing is measured while the child runs unpinned
            os.sched_setaffinity(self._proc.pid, {self.cpu})
        self._thread = threading.Thread(target=self._drain, name=f"drain-{self.name}", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if not self.port:
                match = _BANNER.search(line)
                if match:
                    self.port = int(match.group(2))
                    self._port_found.set()
        self._port_found.set()  # EOF: the child exited; wake start() instead of letting it time out

    def output(self, last: int = 40) -> str:
        return "\n".join(list(self.lines)[-last:])

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def cpu_seconds(self) -> float:
        """User + system CPU time of the whole process (all threads), from /proc/<pid>/stat."""
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # exited and reaped: the run is already failing, do not mask why
            return float("nan")
        # the command name may contain spaces or ')': fields are counted after the last ')'
        fields = stat[stat.rindex(b")") + 2:].split()
        utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
        return (utime + stime) / _CLK_TCK

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait, SIGKILL if it does not exit in time. Returns the exit status."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.lines.append(f"[bench] {self.name} ignored SIGTERM for {timeout:g}s; killed")
                proc.kill()
                proc.wait()
        if self._thread is not None:
            self._thread.join(2.0)
        return proc.returncode


def choose_cpus() -> tuple[int, int] | None:
    """(proxy CPU, load generator + backend CPU), or None when fewer than two CPUs are usable."""
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        return None
    return usable[0], usable[1]


def pin_self(cpu: int) -> None:
    """Pin this process (before any thread or child exists, so they all inherit the mask)."""
    os.sched_setaffinity(0, {cpu})


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def self_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def core_seconds() -> dict[int, tuple[float, float]]:
    """Per CPU: (busy seconds, stolen seconds) since boot, from /proc/stat. Busy excludes idle, iowait, steal."""
    out = {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("cpu") and line[3].isdigit():
                    name, *ticks = line.split()
                    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(t) for t in ticks[:8])
                    out[int(name[3:])] = ((user + nice + system + irq + softirq) / _CLK_TCK, steal / _CLK_TCK)
    except (OSError, ValueError):
        pass
    return out


def pinned_core_seconds(pins: tuple[int, int] | None) -> dict[str, float]:
    """Busy and stolen seconds so far of the proxy core and the mock core; {} when nothing is pinned.

    Set against the CPU of our own processes, they show how much of each core went to someone else
    (see bench.harness.foreign_load): a noisy neighbour explains numbers that our processes do not.
    """
    if pins is None:
        return {}
    cores = core_seconds()
    out = {}
    for name, cpu in zip(("proxy_core", "mock_core"), pins, strict=True):
        out[f"{name}_busy"], out[f"{name}_steal"] = cores.get(cpu, (math.nan, math.nan))
    return out
