"""`llmproxy demo`: the proxy and an embedded OpenAI-compatible demo backend in one process."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from llmproxy.config.model import BackendConfig, Config, LoggingConfig, ServerConfig
from llmproxy.mockbackend import MockOptions, start_mock_backend

DEMO_MODEL = "demo-model"

BANNER = """
Demo backend: a built-in OpenAI-compatible server (vLLM dialect) streaming {tokens} tokens, {delay:g} ms apart.
Try it:

  curl -N http://127.0.0.1:{{port}}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "stream": true, "messages": [{{"role": "user", "content": "Hello"}}]}}'

  pip install openai   # for the Python snippet below
  python -c "from openai import OpenAI
c = OpenAI(base_url='http://127.0.0.1:{{port}}/v1', api_key='unused')
for ev in c.chat.completions.create(model='{model}', stream=True, messages=[{{'role': 'user', 'content': 'Hi'}}]):
    print(ev.choices[0].delta.content or '', end='', flush=True)
print()"

Metrics: http://127.0.0.1:{{port}}/metrics   Health: http://127.0.0.1:{{port}}/health   Stop: Ctrl-C
"""


async def run_demo(host: str, port: int, serve: Callable[[Config, str], Awaitable[int]]) -> int:
    """Start the demo backend on a free loopback port, then serve the proxy in front of it."""
    options = MockOptions(dialect="vllm", tokens=24, delay_ms=30.0, model=DEMO_MODEL)
    backend = await start_mock_backend(options, "127.0.0.1", 0)
    config = Config(
        server=ServerConfig(host=host, port=port),
        backends=[BackendConfig(url=f"http://127.0.0.1:{backend.port}", name="demo-backend",
                                host="127.0.0.1", port=backend.port)],
        logging=LoggingConfig(access_log="stderr"),
    )
    banner = BANNER.format(tokens=options.tokens, delay=options.delay_ms, model=DEMO_MODEL)
    try:
        return await serve(config, banner)
    finally:
        await backend.close()
