"""`llmproxy mock-backend`: run the mock backend as a process until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from llmproxy.mockbackend.options import DIALECTS, MockOptions
from llmproxy.mockbackend.server import start_mock_backend


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmproxy mock-backend",
        description="Deterministic fake vLLM/TGI/Ollama/llama.cpp/SGLang/Anthropic server for tests and benchmarks.",
    )
    parser.add_argument("--dialect", choices=DIALECTS, default="vllm")
    parser.add_argument("--listen", type=_listen, default=("127.0.0.1", 0), metavar="HOST:PORT",
                        help="address to listen on (default 127.0.0.1:0, any free port)")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per completion (default 16)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="pause between stream events")
    parser.add_argument("--first-byte-delay-ms", type=float, default=0.0, help="pause before the response")
    parser.add_argument("--model", default=None, metavar="NAME[,NAME...]",
                        help="served model names, comma-separated; the first is the default for requests "
                             "naming none (default: the dialect's)")
    parser.add_argument("--strict-models", action="store_true",
                        help="answer a request naming an unserved model with the server's 404 (TGI ignores names)")
    parser.add_argument("--metrics", action="store_true",
                        help="llama.cpp: serve GET /metrics, as llama-server --metrics does (else 501)")
    parser.add_argument("--api-key", action="append", default=[], metavar="KEY", dest="api_keys",
                        help="anthropic: an accepted x-api-key (repeatable; default: any non-empty key)")
    parser.add_argument("--without-route", action="append", default=[], metavar="PATH", dest="without_routes",
                        help="a route this server lacks, as an older release does (repeatable), e.g. /v1/messages")
    parser.add_argument("--prefix-cache-tokens", type=int, default=0, metavar="N",
                        help="vllm, sglang, llamacpp: model a prefix cache of N tokens (16-token blocks, LRU); "
                             "0 = off (default)")
    parser.add_argument("--prefill-us-per-token", type=float, default=50.0, metavar="US",
                        help="with --prefix-cache-tokens: first-byte delay per uncached prompt token (default 50)")
    parser.add_argument("--base-ttft-ms", type=float, default=2.0, metavar="MS",
                        help="with --prefix-cache-tokens: first-byte delay of every generation (default 2)")
    return parser


async def _serve(options: MockOptions, host: str, port: int) -> int:
    backend = await start_mock_backend(options, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # exactly one line, flushed: parent processes read it to learn the port
    print(f"mock-backend ({options.dialect}) listening on {backend.url}", flush=True)
    await stop.wait()
    await backend.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the mock backend; return the exit status (0 after SIGTERM/SIGINT, 2 on bad arguments)."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    host, port = args.listen
    try:
        options = MockOptions(dialect=args.dialect, tokens=args.tokens, delay_ms=args.delay_ms,
                              first_byte_delay_ms=args.first_byte_delay_ms, model=args.model,
                              strict_models=args.strict_models, metrics=args.metrics, api_keys=tuple(args.api_keys),
                              without_routes=tuple(args.without_routes), prefix_cache_tokens=args.prefix_cache_tokens,
                              prefill_us_per_token=args.prefill_us_per_token, base_ttft_ms=args.base_ttft_ms)
    except ValueError as exc:
        print(f"llmproxy mock-backend: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:  # uvloop is a dependency; plain asyncio keeps the mock usable without it
        return asyncio.run(_serve(options, host, port))
    return uvloop.run(_serve(options, host, port))
