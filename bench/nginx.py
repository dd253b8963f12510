"""nginx as a reference reverse proxy in front of the mock backend, for bench.ttft's third path.

The config is the ordinary one for streaming LLM responses: no response buffering, HTTP/1.1 with
keep-alive to the upstream, one worker (our proxy is one process too), no access log. nginx runs in the
foreground under the same Service machinery as the other children, so it is stopped the same way; its
worker is found after start-up and killed by pid if it outlives the master.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import time
from pathlib import Path

from bench.harness import HOST, process_cpu_seconds
from bench.procs import Service

SEARCH_PATH = ("/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin")  # often missing from a user's PATH
START_TIMEOUT_S = 10.0
# C clients hold C connections to nginx and C from it to the mock: room for C = 2,000 and more (at 4,096,
# 2,000 slow streams had nginx close 44 connections at the warm-up's peak)
WORKER_CONNECTIONS = 8192
UPSTREAM_KEEPALIVE = 1024  # idle upstream connections kept: all of them at C = 512, so none is reopened

CONFIG = """\
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;

events {{
    worker_connections {connections};
}}

http {{
    access_log off;
    # the compiled-in temp paths are system directories; nothing is buffered to disk here anyway
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 300s;

    upstream mock {{
        server {host}:{upstream_port};
        keepalive {keepalive};
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}

    server {{
        listen {host}:{port} backlog=4096;
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


def find_nginx() -> str | None:
    """The nginx binary on PATH or in the usual sbin directories, or None."""
    return shutil.which("nginx") or shutil.which("nginx", path=os.pathsep.join(SEARCH_PATH))


def free_port() -> int:
    """A loopback port free right now (nginx cannot report the one it bound to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def children(pid: int) -> list[int]:
    """Pids of the direct children of `pid` (nginx's workers of its master)."""
    with contextlib.suppress(OSError):
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    found = []  # kernels without CONFIG_PROC_CHILDREN: scan every process's parent
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{entry}/stat").read_bytes()
            if int(stat[stat.rindex(b")") + 2:].split()[1]) == pid:  # ppid, after the command name
                found.append(int(entry))
    return found


class Nginx(Service):
    """An nginx master + one worker proxying `HOST:<port>` to the mock, its files in `directory`."""

    def __init__(self, binary: str, directory: str, upstream_port: int, cpu: int | None) -> None:
        super().__init__("nginx", [], cpu)
        self.directory = Path(directory) / "nginx"
        self.upstream_port = upstream_port
        config = self.directory / "nginx.conf"
        self.argv = [binary, "-p", str(self.directory), "-c", str(config), "-e", str(self.directory / "error.log"),
                     "-g", "daemon off;"]
        self.workers: list[int] = []

    def start(self, timeout: float = START_TIMEOUT_S) -> int:
        """Write the config, start nginx, wait until it accepts connections and its worker runs; return the port."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()  # set before spawn: there is no banner to scan for
        (self.directory / "nginx.conf").write_text(CONFIG.format(
            dir=self.directory, host=HOST, port=self.port, upstream_port=self.upstream_port,
            connections=WORKER_CONNECTIONS, nofile=4 * WORKER_CONNECTIONS, keepalive=UPSTREAM_KEEPALIVE))
        self.spawn(cwd=self.directory)
        deadline = time.monotonic() + timeout
        while not (self.workers and _accepts(self.port)):
            if not self.alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nginx did not start within {timeout:g}s; command: {' '.join(self.argv)}\n"
                                   f"output:\n{self.output()}\nerror log:\n{self.error_log()}")
            time.sleep(0.05)
            self.workers = children(self.pid)
        if self.cpu is not None:  # the worker inherited the master's mask; say so explicitly all the same
            for worker in self.workers:
                os.sched_setaffinity(worker, {self.cpu})
        return self.port

    def cpu_seconds(self) -> float:
        """CPU seconds so far of the master and its worker together."""
        return process_cpu_seconds([self.pid, *self.workers])

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop the master (which stops its worker); kill a worker that outlived it, by its pid."""
        status = super().stop(timeout)
        for worker in self.workers:
            if _is_nginx(worker):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker, signal.SIGKILL)
                self.lines.append(f"[bench] nginx worker {worker} outlived its master; killed")
        return status

    def error_log(self, last: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.directory / "error.log").read_text().splitlines()[-last:])
        return ""


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
        return True
    return False


def _is_nginx(pid: int) -> bool:
    """Whether `pid` is still an nginx process (a recycled pid must not be killed)."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/comm").read_text().strip() == "nginx"
    return False
