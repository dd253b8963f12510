"""A process under `valgrind --tool=callgrind`, driven by callgrind_control, and the dumps it writes, read.

Callgrind counts the instructions a process executes (Ir), not the time it takes, so a count repeats to within a
fraction of a percent whatever else the machine does. The process starts with collection off
(`--collect-atstart=no`): start-up and warm-up are not counted. `measure()` zeroes the counters, runs a
workload and dumps them: one dump file per workload, read back as the total and the self cost of every
function (by object file), from the callgrind format (https://valgrind.org/docs/manual/cl-format.html).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

CONTROL_TIMEOUT_S = 60.0
# The positions of a cost line: a number, a relative "+n"/"-n", or "*" (same as before); then the costs.
_COST_LINE = re.compile(r"^[+\-*0-9]")
_NAMED = re.compile(r"^\((\d+)\)(?: (.*))?$")
_RECURSION = re.compile(r"'\d+$")


def find_valgrind() -> str | None:
    """The valgrind binary, or None; callgrind_control must be beside it (both come in Debian's valgrind)."""
    valgrind = shutil.which("valgrind")
    return valgrind if valgrind and shutil.which("callgrind_control") else None


def callgrind_argv(out_dir: Path, command: list[str]) -> list[str]:
    """`command` under callgrind, counting nothing until instrumentation is switched on, dumps into `out_dir`.

    A shell script (a pyenv shim) would exec the real binary, out of valgrind's sight: commands should name the
    binary itself (see real_python()).
    """
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--dump-instr=no", "--dump-line=no",
            f"--callgrind-out-file={out_dir}/callgrind.out.%p", *command]


def real_python() -> str:
    """This interpreter's own binary (sys.executable may be a symlink; a shim would be exec'd past valgrind)."""
    return os.path.realpath(sys.executable)


def control(pid: int, *options: str) -> None:
    """callgrind_control OPTIONS PID; RuntimeError when it fails (the process is not under callgrind, or gone)."""
    result = subprocess.run(["callgrind_control", *options, str(pid)], capture_output=True, text=True,
                            timeout=CONTROL_TIMEOUT_S)
    if result.returncode != 0 or "OK" not in result.stdout:
        raise RuntimeError(f"callgrind_control {' '.join(options)} {pid} failed: {result.stdout}{result.stderr}")


@dataclass
class Profile:
    """One dump: the instructions counted, and each function's own share (not of the functions it called)."""

    total: int
    self_cost: dict[tuple[str, str], int] = field(default_factory=dict)  # (object file, function) -> Ir
    seconds: float = 0.0  # the wall time of the window it counts (set by Collector.measure)

    def by_object(self) -> dict[str, int]:
        """Self cost summed per object file (libpython, uvloop's module, libc...), by the file's base name."""
        out: dict[str, int] = {}
        for (obj, _), cost in self.self_cost.items():
            name = os.path.basename(obj)
            out[name] = out.get(name, 0) + cost
        return out

    def top(self, n: int) -> list[tuple[str, str, int]]:
        """The `n` functions with the highest self cost: (function, object file base name, Ir)."""
        ranked = sorted(self.self_cost.items(), key=lambda item: -item[1])[:n]
        return [(fn, os.path.basename(obj), cost) for (obj, fn), cost in ranked]


def parse_dump(path: Path) -> Profile:
    """Read a callgrind dump written with one event (Ir) and positions `line`."""
    names: dict[str, dict[str, str]] = {"ob": {}, "fn": {}, "cob": {}, "cfn": {}}
    self_cost: dict[tuple[str, str], int] = {}
    obj = fn = "???"
    total = 0
    skip_next_cost = False  # the cost line after `calls=` is the call's inclusive cost, not the caller's own
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if _COST_LINE.match(line):
                if skip_next_cost:
                    skip_next_cost = False
                    continue
                parts = line.split()
                if len(parts) >= 2:
                    key = (obj, fn)
                    self_cost[key] = self_cost.get(key, 0) + int(parts[1])
                continue
            key, _, value = line.rstrip("\n").partition("=")
            if key == "ob":
                obj = _resolve(names["ob"], value)
            elif key == "fn":
                # `f'2` is f entered recursively (callgrind's --separate-recs): one function all the same
                fn = _RECURSION.sub("", _resolve(names["fn"], value))
            elif key in ("cob", "cfn"):
                _resolve(names["ob" if key == "cob" else "fn"], value)  # defines the name for later references
            elif key == "calls":
                skip_next_cost = True
            elif key in ("totals", "summary") and value.strip():
                total = max(total, int(value.split()[0]))
    return Profile(total or sum(self_cost.values()), self_cost)


def _resolve(table: dict[str, str], value: str) -> str:
    """Name compression: `(id) name` defines an id, `(id)` refers to it."""
    match = _NAMED.match(value.strip())
    if not match:
        return value.strip()
    ident, name = match.groups()
    if name is not None:
        table[ident] = name
    return table.get(ident, f"({ident})")


class Collector:
    """The dumps of one process under callgrind: zero, run, dump, read."""

    def __init__(self, pid: int, out_dir: Path) -> None:
        self.pid = pid
        self.out_dir = out_dir
        self._dumps = 0

    def start(self) -> None:
        control(self.pid, "--instr=on")

    def measure(self, workload: Callable[[], None]) -> Profile:
        """Instructions the process executed while `workload` ran (counted from a zero, dumped right after)."""
        began = time.monotonic()
        control(self.pid, "--zero")
        workload()
        control(self.pid, "--dump")
        seconds = time.monotonic() - began
        self._dumps += 1
        profile = parse_dump(self._wait_for_dump(self._dumps))
        profile.seconds = seconds
        return profile

    def _wait_for_dump(self, number: int) -> Path:
        path = self.out_dir / f"callgrind.out.{self.pid}.{number}"
        deadline = time.monotonic() + CONTROL_TIMEOUT_S
        # callgrind writes the file in the target process, after callgrind_control has returned
        while not (path.exists() and b"\ntotals:" in path.read_bytes()):  # the last line callgrind writes
            if time.monotonic() > deadline:
                raise RuntimeError(f"callgrind dump {path} not written within {CONTROL_TIMEOUT_S:g}s")
            time.sleep(0.05)
        return path
