"""The README's first command, as a new user runs it: copied from the README into a fresh virtualenv, then the
`curl` and the openai snippet the demo prints, copied from its output and run as printed.

It installs into a fresh virtualenv from the same package index pip uses here, so it takes a little while
(about half a minute).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import threading
import venv
from pathlib import Path

from tests.support import REPO, wait_for

INSTALL_TIMEOUT = 300


def readme_first_command() -> str:
    """The first shell block of the README: the command that installs and runs the demo."""
    text = (REPO / "README.md").read_text()
    return re.search(r"```bash\n(.+?)\n```", text, re.S).group(1).strip()


def test_the_readmes_first_command_works_in_a_fresh_venv(tmp_path: Path):
    command = readme_first_command()
    assert command == "pip install -e . && llmproxy demo"
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(env_dir)}
    env.pop("PYTHONPATH", None)
    # As typed, plus a free port instead of 8000 (which something else on a test machine may hold).
    demo = subprocess.Popen(["bash", "-c", command + " --listen 127.0.0.1:0"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output: list[str] = []
    threading.Thread(target=lambda: output.extend(line.rstrip("\n") for line in demo.stdout), daemon=True).start()
    try:
        port = _wait_listening(demo, output)
        banner = "\n".join(output)
        curl = re.search(r"^  (curl .+?)\n\n", banner, re.S | re.M).group(1)
        result = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=30, env=env)
        assert result.returncode == 0 and "data: [DONE]" in result.stdout, result.stdout[-500:]
        assert f"127.0.0.1:{port}" in curl

        pip = re.search(r"^  (pip install openai)", banner, re.M).group(1)
        snippet = re.search(r'^  (python -c ".+?")\n', banner, re.S | re.M).group(1)
        subprocess.run(["bash", "-c", pip], check=True, env=env, capture_output=True, timeout=INSTALL_TIMEOUT)
        result = subprocess.run(["bash", "-c", snippet], capture_output=True, text=True, timeout=60, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        assert " tok0 tok1" in result.stdout  # the demo backend's tokens, streamed through the proxy
    finally:
        os.killpg(demo.pid, 15)
        demo.wait(20)


def _wait_listening(demo: subprocess.Popen, output: list[str]) -> int:
    """The demo's port, once its banner is out (the install comes first: bounded by INSTALL_TIMEOUT)."""

    def banner_out() -> bool:
        if demo.poll() is not None:
            raise AssertionError(f"the demo ended (rc={demo.returncode}):\n" + "\n".join(output[-40:]))
        return any("Stop: Ctrl-C" in line for line in output)

    wait_for(banner_out, timeout=INSTALL_TIMEOUT, interval=0.2)
    ports = [re.search(r"listening on http://127\.0\.0\.1:(\d+)", line) for line in output]
    return int(next(match for match in ports if match).group(1))


def test_the_command_is_the_first_thing_the_readme_says_to_run():
    assert readme_first_command().startswith("pip install -e .")
    assert shlex.split(readme_first_command())[-2:] == ["llmproxy", "demo"]

