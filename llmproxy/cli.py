"""Command line: `llmproxy serve | demo | check-config | mock-backend | usage | keygen`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from llmproxy import __version__
from llmproxy.config import ConfigError, config_warnings, dump_config, load_config, parse_listen
from llmproxy.config.model import Config

log = logging.getLogger("llmproxy")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "mock-backend":
        from llmproxy.mockbackend import main as mock_main

        return mock_main(argv[1:])
    if argv and argv[0] == "usage":
        return _cmd_usage(argv[1:])
    if argv and argv[0] == "keygen":
        from llmproxy.keygen import main as keygen_main

        return keygen_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    return args.func(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmproxy", description="Zero-buffer streaming proxy for LLM servers.")
    parser.add_argument("--version", action="version", version=f"llmproxy {__version__}")
    sub = parser.add_subparsers(dest="command")

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", required=True, help="path to config.yaml")
    serve.add_argument("--listen", help="HOST:PORT, overrides server.listen (port 0 picks a free port)")
    # Internal: how the supervisor of `server.workers: N` (N > 1) starts each worker (see workers.py).
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--worker-port", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    serve.set_defaults(func=_cmd_serve)

    demo = sub.add_parser("demo", help="run the proxy with a built-in demo backend")
    demo.add_argument("--listen", default="127.0.0.1:8000", help="HOST:PORT (default 127.0.0.1:8000)")
    demo.set_defaults(func=_cmd_demo)

    check = sub.add_parser("check-config", help="validate a config file and print it resolved")
    check.add_argument("path")
    check.set_defaults(func=_cmd_check_config)

    sub.add_parser("mock-backend", help="run a deterministic vLLM/TGI/Ollama mock (see --help)")
    sub.add_parser("usage", help="usage dead letters: usage dead-letters list|replay --config PATH")
    sub.add_parser("keygen", help="make a new API key and print its digest for auth.keys")
    return parser


def _setup_logging(level: str = "info") -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _raise_fd_limit() -> None:
    """Raise the soft open-files limit to the hard one: every connection is a file descriptor, and the
    common soft default (1024) would cap server.max_connections far below its 10000 default."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _load(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as error:
        print(f"llmproxy: invalid config {path}: {error}", file=sys.stderr)
        return None


def _cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.path)
    if config is None:
        return 1
    sys.stdout.write(dump_config(config))
    for warning in config_warnings(config):
        print(f"llmproxy: warning: {warning}", file=sys.stderr)
    print(f"# {args.path}: OK", file=sys.stderr)
    return 0


def _cmd_usage(argv: list[str]) -> int:
    """`llmproxy usage dead-letters list|replay ... --config PATH`, beside a running proxy or not."""
    from llmproxy.delivery.cli import dead_letters_main

    parser = argparse.ArgumentParser(prog="llmproxy usage")
    parser.add_argument("what", choices=["dead-letters"])
    parser.add_argument("--config", required=True, help="the proxy's config.yaml (for usage.spool_dir)")
    args, rest = parser.parse_known_args(argv)
    config = _load(args.config)
    if config is None:
        return 1
    return dead_letters_main(rest, config.usage.spool_dir)


def _cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    if args.listen:
        try:
            config.server.host, config.server.port = parse_listen(args.listen, "--listen")
        except ConfigError as error:
            print(f"llmproxy: {error}", file=sys.stderr)
            return 1
    _setup_logging(config.logging.level)
    if args.worker_index is None:  # the supervisor, or a single process, says it once
        for warning in config_warnings(config):
            log.warning("%s", warning)
    _raise_fd_limit()  # before any worker starts: they inherit it
    workers = config.server.workers
    if args.worker_index is not None:
        from llmproxy.workers import serve_worker

        # Until the server's own handler is installed, a SIGHUP forwarded to all workers must not kill
        # this one (the default action): it has just read the config anyway.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        _install_uvloop()
        port = config.server.port if args.worker_port is None else args.worker_port
        return asyncio.run(serve_worker(config, args.config, args.worker_index, port, args.ready_fd, workers))
    if workers > 1:
        from llmproxy.workers import Supervisor

        return Supervisor(config, args.config, workers, args.listen).run()
    _install_uvloop()
    return asyncio.run(_serve(config, config_path=args.config))


async def _serve(config: Config, banner: str = "", config_path: str | None = None) -> int:
    from llmproxy.delivery import SpoolError
    from llmproxy.delivery.spooldirs import LeftoverDelivery
    from llmproxy.server import ProxyServer

    server = ProxyServer(config, config_path)
    try:
        await server.start(config.server.host, config.server.port)
    except SpoolError as error:  # the usage spool is another instance's (it says which), or unusable
        print(f"llmproxy: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"llmproxy: cannot listen on {config.server.host}:{config.server.port}: {error.strerror}",
              file=sys.stderr)
        return 1
    host = config.server.host
    shown = f"[{host}]" if ":" in host else host
    print(f"llmproxy {__version__} listening on http://{shown}:{server.port}", flush=True)
    if banner:
        print(banner.replace("{port}", str(server.port)), flush=True)
    leftovers = LeftoverDelivery(config.usage, server.metrics, workers=1)  # spools of an earlier worker count
    leftovers.start()
    await server.run_until_signalled()
    await leftovers.close()
    log.info("stopped")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from llmproxy.demo import run_demo

    try:
        host, port = parse_listen(args.listen, "--listen")
    except ConfigError as error:
        print(f"llmproxy: {error}", file=sys.stderr)
        return 1
    _setup_logging("info")
    _install_uvloop()
    return asyncio.run(run_demo(host, port, _serve))
