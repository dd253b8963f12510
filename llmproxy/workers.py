"""`server.workers: N`: N worker processes sharing one listening port, each with its own event loop.

The `serve` process becomes a supervisor that serves nothing itself. It reserves the port (a bound,
never listening SO_REUSEPORT socket: with port 0 this is how the port is chosen, and it stays ours
while workers come and go), then starts each worker as `python -m llmproxy serve --worker-index i
--worker-port P` (a fresh interpreter, never a fork of a running loop). Every worker listens on the port with
SO_REUSEPORT, so the kernel spreads new connections across them. The supervisor

- prints the usual `listening on` line once every worker has said, over a pipe, that it accepts;
- forwards SIGTERM/SIGINT to every worker, waits for their drains (shutdown_timeout each) and exits 0;
- forwards SIGHUP (each worker reloads the config itself);
- restarts a worker that dies: at once if it had been up a while, else after 1 s, doubling to 30 s.

Per worker: its own usage spool (`spool_dir/worker-<i>`, reused by its restarts) and, with metrics on,
prometheus-client's multiprocess mode in a directory the supervisor creates and removes (metrics.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from prometheus_client.multiprocess import mark_process_dead

from llmproxy import __version__
from llmproxy.config.model import Config
from llmproxy.delivery.spooldirs import LeftoverDelivery, worker_spool_dir
from llmproxy.metrics import MULTIPROC_ENV

log = logging.getLogger("llmproxy")

STABLE_AFTER = 30.0  # a worker up this long had been doing fine: if it dies, restart it at once
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 30.0  # then 1 s, 2 s, 4 s... for each further quick death in a row
KILL_GRACE = 10.0  # on stop, beyond shutdown_timeout (for the usage flush), before a worker is SIGKILLed
TICK = 1.0  # the longest the supervisor sleeps without looking at its workers


@dataclass(slots=True)
class _Worker:
    index: int
    popen: subprocess.Popen | None = None
    ready_fd: int = -1  # read end of the pipe the worker writes to once it accepts; -1 when not waiting
    ready: bool = False
    started_at: float = 0.0
    restart_at: float | None = None
    quick_deaths: int = 0  # in a row, each within STABLE_AFTER of its start


class Supervisor:
    """Starts, watches and stops the workers. `run()` returns the exit status."""

    def __init__(self, config: Config, config_path: str, workers: int, listen: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.listen = listen  # --listen as given, passed on
        self.host, self.port = config.server.host, config.server.port
        self.workers = [_Worker(i) for i in range(workers)]
        self.selector = selectors.DefaultSelector()
        self.status = 0
        self.stopping = False
        self.announced = False
        self.metrics_dir: str | None = None
        self._signals: list[int] = []
        self._kill_at = float("inf")
        self._env: dict[str, str] = {}

    def run(self) -> int:
        try:
            reserved = reserve_port(self.host, self.port)
        except OSError as error:
            print(f"llmproxy: cannot listen on {self.host}:{self.port}: {error.strerror or error}", file=sys.stderr)
            return 1
        self.port = reserved.getsockname()[1]
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        self.selector.register(wake_r, selectors.EVENT_READ)
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)}
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        try:
            self._env = self._environment()
            for worker in self.workers:
                self._spawn(worker)
            while not self.stopping or any(w.popen is not None for w in self.workers):
                self._step(wake_r)
            log.info("all workers stopped")
            return self.status
        finally:
            signal.set_wakeup_fd(-1)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for worker in self.workers:  # only after an error in the supervisor itself
                if worker.popen is not None:
                    worker.popen.kill()
                self._close_ready_fd(worker)
            self.selector.close()
            for fd in (wake_r, wake_w):
                os.close(fd)
            reserved.close()
            if self.metrics_dir is not None:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _environment(self) -> dict[str, str]:
        env = {name: value for name, value in os.environ.items() if name != MULTIPROC_ENV}
        if self.config.metrics.enabled:
            # Fresh and ours: files of an earlier run would count its requests again.
            self.metrics_dir = tempfile.mkdtemp(prefix="llmproxy-metrics-")
            env[MULTIPROC_ENV] = self.metrics_dir
        return env

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)  # handled in the loop; the wakeup fd ends its select()

    # The loop ---------------------------------------------------------------------------------------

    def _step(self, wake_r: int) -> None:
        for key, _ in self.selector.select(self._timeout()):
            if key.fd == wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 512)
            else:
                self._on_ready_pipe(key.data)
        signals, self._signals = self._signals, []
        for signum in signals:
            self._handle_signal(signum)
        for worker in self.workers:
            if worker.popen is not None and worker.popen.poll() is not None:
                self._exited(worker)
        now = time.monotonic()
        for worker in self.workers:
            if worker.restart_at is not None and now >= worker.restart_at:
                self._spawn(worker)
        if not self.announced and not self.stopping and all(w.ready for w in self.workers):
            self.announced = True
            shown = f"[{self.host}]" if ":" in self.host else self.host
            print(f"llmproxy {__version__} listening on http://{shown}:{self.port} ({len(self.workers)} workers)",
                  flush=True)
        if now >= self._kill_at:
            self._kill_at = float("inf")
            for worker in self.workers:
                if worker.popen is not None:
                    log.warning("worker %d (pid %d) still running after the drain timeout: killing it",
                                worker.index, worker.popen.pid)
                    worker.popen.kill()

    def _timeout(self) -> float:
        now = time.monotonic()
        due = [w.restart_at for w in self.workers if w.restart_at is not None] + [self._kill_at, now + TICK]
        return max(0.0, min(due) - now)

    def _handle_signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            if not self.stopping:
                log.info("%s: stopping %d workers", signal.Signals(signum).name, len(self.workers))
            self._stop(signum)
        elif signum == signal.SIGHUP and not self.stopping:
            log.info("SIGHUP: each worker reloads %s", self.config_path)
            self._send(signal.SIGHUP)
        # SIGCHLD only wakes the loop: exits are found by polling every worker.

    def _stop(self, signum: int) -> None:
        if not self.stopping:
            self.stopping = True
            self._kill_at = time.monotonic() + self.config.server.shutdown_timeout + KILL_GRACE
        for worker in self.workers:
            worker.restart_at = None
        self._send(signum)

    def _send(self, signum: int) -> None:
        for worker in self.workers:
            if worker.popen is not None:
                with contextlib.suppress(ProcessLookupError):
                    worker.popen.send_signal(signum)

    # One worker -------------------------------------------------------------------------------------

    def _spawn(self, worker: _Worker) -> None:
        worker.restart_at = None
        worker.ready = False
        read_fd, write_fd = os.pipe()
        # The port apart from --listen: the workers' config stays the file's, so a SIGHUP reload compares alike.
        args = [sys.executable, "-m", "llmproxy", "serve", "--config", self.config_path,
                *(["--listen", self.listen] if self.listen else []), "--worker-index", str(worker.index),
                "--worker-port", str(self.port), "--ready-fd", str(write_fd)]
        try:
            worker.popen = subprocess.Popen(args, pass_fds=(write_fd,), env=self._env, stdin=subprocess.DEVNULL)
        except OSError as error:
            os.close(read_fd)
            log.error("worker %d: cannot start a process: %s", worker.index, error)
            self._failed(worker, "could not be started")
            return
        finally:
            os.close(write_fd)
        worker.started_at = time.monotonic()
        worker.ready_fd = read_fd
        self.selector.register(read_fd, selectors.EVENT_READ, worker)
        log.info("worker %d started (pid %d)", worker.index, worker.popen.pid)

    def _on_ready_pipe(self, worker: _Worker) -> None:
        data = b""
        with contextlib.suppress(OSError):
            data = os.read(worker.ready_fd, 64)
        self._close_ready_fd(worker)
        if data and worker.popen is not None:  # EOF without data: it died first, as the poll will show
            worker.ready = True
            log.info("worker %d (pid %d) accepting connections", worker.index, worker.popen.pid)

    def _close_ready_fd(self, worker: _Worker) -> None:
        if worker.ready_fd >= 0:
            self.selector.unregister(worker.ready_fd)
            os.close(worker.ready_fd)
            worker.ready_fd = -1

    def _exited(self, worker: _Worker) -> None:
        assert worker.popen is not None
        pid, status = worker.popen.pid, worker.popen.returncode
        worker.popen = None
        worker.ready = False
        self._close_ready_fd(worker)
        if self.metrics_dir is not None:
            mark_process_dead(pid, self.metrics_dir)  # its live gauges go; its counters stay in the sums
        how = f"was killed by {signal.Signals(-status).name}" if status < 0 else f"exited with status {status}"
        if self.stopping:
            log.info("worker %d (pid %d) %s", worker.index, pid, how)
            return
        if time.monotonic() - worker.started_at >= STABLE_AFTER:
            worker.quick_deaths = 0
        self._failed(worker, f"(pid {pid}) {how}")

    def _failed(self, worker: _Worker, how: str) -> None:
        if not self.announced:
            # Before every worker ever accepted: a config or port problem that restarting will not fix.
            log.error("worker %d %s while starting: stopping", worker.index, how)
            self.status = 1
            self._stop(signal.SIGTERM)
            return
        delay = 0.0 if worker.quick_deaths == 0 else min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (worker.quick_deaths - 1))
        worker.quick_deaths += 1
        worker.restart_at = time.monotonic() + delay
        log.warning("worker %d %s: restarting it in %g s", worker.index, how, delay)


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (never listen on) a SO_REUSEPORT socket on host:port: it holds the port, port 0 included,
    for workers to listen on beside it; not listening, it is given no connections. Raises OSError."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise OSError(0, "server.workers > 1 needs SO_REUSEPORT, which this platform lacks")
    family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:  # as asyncio's listeners: IPv6 only, no dual stack
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


# The worker side --------------------------------------------------------------------------------------

async def serve_worker(config: Config, config_path: str, index: int, port: int, ready_fd: int | None,
                       workers: int) -> int:
    """Serve as worker `index` of `workers` on the supervisor's `port` until SIGTERM/SIGINT. Returns the exit status."""
    from llmproxy.delivery import SpoolError
    from llmproxy.server import ProxyServer

    supervisor = os.getppid()
    # Its own spool: a spool is locked by the one process that appends to it.
    server = ProxyServer(config, config_path, spool_dir=worker_spool_dir(config.usage.spool_dir, index))
    try:
        await server.start(config.server.host, port, reuse_port=True)
    except SpoolError as error:  # its usage spool is another instance's (it says which), or unusable
        print(f"llmproxy: worker {index}: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"llmproxy: worker {index}: cannot listen on {config.server.host}:{port}: "
              f"{error.strerror or error}", file=sys.stderr)
        return 1
    leftovers = LeftoverDelivery(config.usage, server.metrics, workers) if index == 0 else None
    if leftovers is not None:
        leftovers.start()
    # Deliberately not the "listening on" line: that one is the supervisor's, once all workers accept.
    log.info("worker %d (pid %d) serving on port %d", index, os.getpid(), server.port)
    if ready_fd is not None:
        with contextlib.suppress(OSError):  # the supervisor is gone: _stop_if_orphaned will see to it
            os.write(ready_fd, b"1")
        os.close(ready_fd)
    _stop_if_orphaned(server.loop, supervisor)
    await server.run_until_signalled()
    if leftovers is not None:
        await leftovers.close()
    log.info("worker %d stopped", index)
    return 0


def _stop_if_orphaned(loop: asyncio.AbstractEventLoop, supervisor: int) -> None:
    """Drain and exit if the supervisor is gone (SIGKILL, crash) rather than serve on unsupervised."""
    if os.getppid() != supervisor:
        log.warning("the supervisor (pid %d) is gone: stopping", supervisor)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    loop.call_later(TICK, _stop_if_orphaned, loop, supervisor)
