"""The whole benchmark suite: every section in turn, then one report, a targets table, plots and the README.

    python -m bench [--only ttft,memory] [--skip connections] [--out DIR] [--no-readme]
                    [--section-args 'ttft=--concurrency 1,64'] [--readme-from DIR]

Each section runs as `python -m bench.<section> --json DIR/<section>.json [its args]`, with its Markdown report
(stdout) saved as DIR/<section>.md and its progress and problems (stderr) as DIR/<section>.log. A section that
fails or overruns its time cap is reported with the tail of its log, and the suite goes on; the exit status is 1
if any did. DIR defaults to bench/results/<UTC time>. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench import report
from bench.harness import Log, logger, machine
from bench.procs import REPO_ROOT, choose_cpus


@dataclass(frozen=True)
class Section:
    module: str
    budget_s: float  # what its default run should take on a 2-core machine


SECTIONS = {"ttft": Section("bench.ttft", 240), "memory": Section("bench.memory", 90),
            "connections": Section("bench.connections", 120), "features": Section("bench.features", 90),
            "fleet": Section("bench.fleet", 120)}
CAP_FACTOR = 2.0  # a section is stopped after this many times its budget: generous, but a hang must not stall all
STOP_GRACE_S = 40.0  # after SIGTERM a section stops its children (up to 10 s each) before it exits
PINNING = "proxy pinned to CPU {proxy}; load generator and mock backend on CPU {mock}"
RESULTS = REPO_ROOT / "bench" / "results"

log = logger("bench")


# --- command line ---------------------------------------------------------------------------------


def section_list(value: str) -> list[str]:
    """argparse type: comma-separated section names."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown section(s) {', '.join(unknown) or value!r}; "
                                         f"expected some of {', '.join(SECTIONS)}")
    return names


def section_args(value: str) -> tuple[str, list[str]]:
    """argparse type: SECTION=ARGS, ARGS split as a shell would."""
    name, sep, rest = value.partition("=")
    if not sep or name.strip() not in SECTIONS:
        raise argparse.ArgumentTypeError(f"expected SECTION=ARGS with SECTION one of {', '.join(SECTIONS)}, "
                                         f"got {value!r}")
    return name.strip(), shlex.split(rest)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", type=section_list, metavar="S1,S2", help=f"run only these ({', '.join(SECTIONS)})")
    parser.add_argument("--skip", type=section_list, default=[], metavar="S1,S2", help="do not run these")
    parser.add_argument("--out", type=Path, metavar="DIR", help="results directory (default bench/results/<UTC time>)")
    parser.add_argument("--section-args", type=section_args, action="append", default=[], metavar="SECTION=ARGS",
                        help="extra arguments for one section, e.g. 'ttft=--concurrency 1,64 --requests 40'; "
                             "repeat for more sections (default: each section's own defaults)")
    parser.add_argument("--no-readme", action="store_true",
                        help="do not regenerate the performance section of README.md (only a complete run with "
                             "the defaults regenerates it; --readme-from DIR does it from any results directory)")
    parser.add_argument("--readme", type=Path, default=REPO_ROOT / "README.md", metavar="PATH",
                        help="the README whose <!-- bench:begin --> ... <!-- bench:end --> block is regenerated "
                             "(default: the repo's README.md)")
    parser.add_argument("--readme-from", type=Path, metavar="DIR",
                        help="run nothing: regenerate report.md, the plots and the README from a results directory")
    return parser.parse_args(argv)


# --- one section ----------------------------------------------------------------------------------


def stop_section(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the section's `finally` stops its children), then SIGKILL to its whole process group."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(STOP_GRACE_S)
    # the section leads its own process group (start_new_session): this reaches any child it left behind
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_section(name: str, out: Path, extra: list[str]) -> dict[str, Any]:
    """Run one section to completion or to its cap; what happened, for summary.json."""
    section = SECTIONS[name]
    argv = ["-m", section.module, "--json", str(out / f"{name}.json"), *extra]
    cap = section.budget_s * CAP_FACTOR
    info: dict[str, Any] = {"module": section.module, "command": shlex.join(["python", *argv]), "timeout_s": cap}
    log(f"{name}: {info['command']} (stopped after {cap:.0f}s)")
    started = time.monotonic()
    with open(out / f"{name}.md", "wb") as stdout, open(out / f"{name}.log", "wb") as stderr:
        # a session of its own: Ctrl-C reaches only this process, which then stops the section in order
        proc = subprocess.Popen([sys.executable, *argv], cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=stdout,
                                stderr=stderr, start_new_session=True)
        try:
            info["returncode"] = proc.wait(cap)
        except subprocess.TimeoutExpired:
            stop_section(proc)
            info.update(returncode=proc.returncode, status="timeout", reason=f"still running after {cap:.0f}s")
        except BaseException:
            stop_section(proc)  # Ctrl-C or SIGTERM: never leave a section (and its children) running
            raise
    info["seconds"] = time.monotonic() - started
    info.setdefault("status", "ok" if info["returncode"] == 0 else "failed")
    if info["status"] == "failed":
        info["reason"] = f"exit status {info['returncode']}"
    elif info["status"] == "ok" and not has_headline(out / f"{name}.json"):
        info.update(status="failed", reason="exit status 0, but no `headline` in its JSON")
    log(f"{name}: {info['status']} after {info['seconds']:.0f}s")
    return info


def has_headline(path: Path) -> bool:
    try:
        return isinstance(orjson.loads(path.read_bytes()).get("headline"), dict)
    except (OSError, orjson.JSONDecodeError, AttributeError):
        return False


# --- the suite ------------------------------------------------------------------------------------


def describe_machine() -> dict[str, Any]:
    return {**machine(choose_cpus(), PINNING), "kernel": platform.release()}


def default_out() -> Path:
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%MZ")
    out, n = RESULTS / stamp, 1
    while out.exists():  # two runs in one minute
        n += 1
        out = RESULTS / f"{stamp}-{n}"
    return out


def chosen(args: argparse.Namespace) -> dict[str, bool]:
    """Every section, in suite order, with whether this run runs it."""
    return {name: name in (args.only or SECTIONS) and name not in args.skip for name in SECTIONS}


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    (out / report.SUMMARY).write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))


def run_suite(args: argparse.Namespace, out: Path, command: str, say: Log) -> tuple[dict[str, Any], bool]:
    """Run the chosen sections in order; the summary, and whether the run was interrupted."""
    extra = dict(args.section_args)
    started = datetime.now(UTC)
    summary: dict[str, Any] = {"command": command, "machine": describe_machine(),
                               "started": started.isoformat(timespec="seconds"), "sections": {}}
    sections = summary["sections"]
    interrupted = False
    try:
        for name, run in chosen(args).items():
            sections[name] = {"status": "skipped"}
            if run:
                sections[name] = {"status": "running"}
                write_summary(out, summary)  # a progress marker, should the machine go down
                sections[name] = run_section(name, out, extra.get(name, []))
    except KeyboardInterrupt:
        interrupted = True
        say("interrupted: the running section was stopped; writing what was measured")
    finally:
        for info in sections.values():
            if info["status"] == "running":
                info.update(status="interrupted", reason="the suite was interrupted")
        for name in SECTIONS:
            sections.setdefault(name, {"status": "not run", "reason": "the suite was interrupted"})
        ended = datetime.now(UTC)
        summary.update(ended=ended.isoformat(timespec="seconds"), seconds=(ended - started).total_seconds())
        write_summary(out, summary)
    return summary, interrupted


def interrupt(*_: object) -> None:
    """SIGTERM handler: SIGTERM would otherwise end the suite at once, leaving the running section behind."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    readme = None if args.no_readme else args.readme
    if args.readme_from:
        report.write_outputs(args.readme_from, readme, log)
        return 0
    signal.signal(signal.SIGTERM, interrupt)
    out = args.out or default_out()
    out.mkdir(parents=True, exist_ok=True)
    command = ("python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)).rstrip()
    log(f"results in {out}")
    summary, interrupted = run_suite(args, out, command, log)
    partial = bool(args.only or args.skip or args.section_args)
    if readme is not None and (interrupted or partial):
        # The README quotes `python -m bench`: only a whole run with the defaults may stand for it.
        log("README.md left as it was: not a complete default run (regenerate with --readme-from DIR)")
        readme = None
    targets = report.write_outputs(out, readme, log)
    failed = [name for name, info in summary["sections"].items() if info["status"] not in ("ok", "skipped")]
    missed = [row["what"] for row in targets if row["status"] == "missed"]
    log(f"done in {summary['seconds']:.0f}s: " + (f"failed: {', '.join(failed)}" if failed else "every section ran")
        + (f"; targets missed: {', '.join(missed)}" if missed else ""))
    if interrupted:
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
