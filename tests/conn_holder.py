"""Hold many idle TCP connections to a server, from a process of its own (tests/e2e/test_exhaustion.py).

    python tests/conn_holder.py --port PORT --count N [--host 127.0.0.1] [--max-seconds 600]

Opens N connections one after the other and sends nothing on them. Its soft RLIMIT_NOFILE is raised to the
hard limit first, so N can be in the thousands whatever the parent's soft limit. It then reports on stdout,
one JSON object a line:
- {"event": "opened", "open": n, "failed": m, "errors": {...}, "seconds": s} once every connect was tried;
- {"event": "status", "open": n, "closed_by_peer": c, "received": b} for each "status" line read on stdin,
  and by itself whenever a connection is closed by the server (at most every 100 ms);
- {"event": "closed", ...} when it closes everything itself: on a "close" line, on EOF of stdin, or after
  --max-seconds (so a test that dies cannot leave it running).
A connection counts as closed by the peer when a read returns EOF or fails (reset).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import socket
import sys
import time


def _emit(event: str, **fields: object) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--connect-timeout", type=float, default=5.0)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    args = parser.parse_args()
    deadline = time.monotonic() + args.max_seconds

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    selector = selectors.DefaultSelector()
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ, None)
    open_socks: set[socket.socket] = set()
    errors: dict[str, int] = {}
    failed = 0
    started = time.monotonic()
    for _ in range(args.count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(args.connect_timeout)
        try:
            sock.connect((args.host, args.port))
        except OSError as error:
            sock.close()
            failed += 1
            name = type(error).__name__
            errors[name] = errors.get(name, 0) + 1
            continue
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, sock)
        open_socks.add(sock)
    _emit("opened", open=len(open_socks), failed=failed, errors=errors,
          seconds=round(time.monotonic() - started, 3))

    closed_by_peer = 0
    received = 0
    last_report = 0.0
    dirty = False
    stdin_buffer = b""
    reason = "max-seconds"
    while time.monotonic() < deadline:
        for key, _ in selector.select(0.1):
            sock = key.data
            if sock is None:  # a command on stdin
                data = os.read(sys.stdin.fileno(), 4096)
                if not data:
                    reason = "eof"
                    deadline = 0.0
                    break
                stdin_buffer += data
                while b"\n" in stdin_buffer:
                    line, stdin_buffer = stdin_buffer.split(b"\n", 1)
                    command = line.strip()
                    if command == b"status":
                        _emit("status", open=len(open_socks), closed_by_peer=closed_by_peer, received=received)
                    elif command == b"close":
                        reason = "close"
                        deadline = 0.0
                continue
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                received += len(data)
                continue
            selector.unregister(sock)
            sock.close()
            open_socks.discard(sock)
            closed_by_peer += 1
            dirty = True
        now = time.monotonic()
        if dirty and now - last_report >= 0.1:
            dirty = False
            last_report = now
            _emit("status", open=len(open_socks), closed_by_peer=closed_by_peer, received=received)

    for sock in open_socks:
        sock.close()
    _emit("closed", reason=reason, open=0, closed_by_peer=closed_by_peer, closed_by_us=len(open_socks),
          received=received)
    return 0


if __name__ == "__main__":
    sys.exit(main())
