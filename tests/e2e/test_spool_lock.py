"""Two proxies on one usage spool: the second one says which process holds it, in one line, and exits 1.

Real processes (`python -m llmproxy serve`) on 127.0.0.1 port 0; every wait is bounded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support import REPO, START_TIMEOUT, Proc, wait_for, write_config

HINT = "give each instance its own usage.spool_dir"


def _config(tmp_path: Path, mock_url: str, **server: object) -> tuple[Path, Path]:
    spool = tmp_path / "spool"
    # Nothing listens on port 9 (discard): records stay pending, which changes nothing here.
    usage = {"enabled": True, "spool_dir": str(spool),
             "reporters": [{"name": "billing", "type": "webhook", "webhook": {"url": "http://127.0.0.1:9/usage"}}]}
    config = write_config(tmp_path, [{"url": mock_url}], server={"listen": "127.0.0.1:0", **server}, usage=usage)
    return config, spool


def _second(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmproxy", "serve", "--config", str(config)], cwd=REPO,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=START_TIMEOUT + 15)


def _workers_of(supervisor: int) -> dict[int, int]:
    """{worker index: pid} of the supervisor's running workers (Linux /proc)."""
    found = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                args = cmdline.read().decode().split("\0")
        except (OSError, ValueError, IndexError):
            continue  # not a process, or gone meanwhile
        if parent == supervisor and "--worker-index" in args:
            found[int(args[args.index("--worker-index") + 1])] = int(entry)
    return found


def test_a_second_proxy_on_the_same_spool_names_the_first_and_exits_1(mock_vllm, tmp_path, procs):
    config, spool = _config(tmp_path, mock_vllm.url)
    first = Proc(["serve", "--config", str(config)]).wait_listening()
    procs.append(first)

    second = _second(config)

    assert second.stderr == f"llmproxy: usage spool {spool} is in use by another llmproxy (pid {first.pid}); {HINT}\n"
    assert second.stdout == ""
    assert second.returncode == 1
    assert first.popen.poll() is None  # the first one serves on, its spool untouched
    assert (spool / "usage.lock").read_text() == f"{first.pid}\n"
    assert first.stop() == 0
    assert "Traceback" not in first.text()


def test_with_workers_each_worker_names_the_holder_of_its_spool(mock_vllm, tmp_path, procs):
    config, spool = _config(tmp_path, mock_vllm.url, workers=2)
    first = Proc(["serve", "--config", str(config)]).wait_listening()
    procs.append(first)
    workers = wait_for(lambda: len(found := _workers_of(first.pid)) == 2 and found, 5)

    second = _second(config)

    assert "Traceback" not in second.stderr + second.stdout, second.stderr
    refusals = [line for line in second.stderr.splitlines() if "is in use by" in line]
    assert refusals, second.stderr
    for line in refusals:  # the workers that got as far as their spool before the supervisor stopped
        index = int(line.split("worker ", 1)[1].split(":", 1)[0])
        assert line == (f"llmproxy: worker {index}: usage spool {spool / f'worker-{index}'} is in use by another "
                        f"llmproxy (pid {workers[index]}); {HINT}")
    assert second.returncode == 1
    assert first.popen.poll() is None
    for index, pid in workers.items():
        assert (spool / f"worker-{index}" / "usage.lock").read_text() == f"{pid}\n"
