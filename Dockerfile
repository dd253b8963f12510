# llmproxy: zero-buffer streaming proxy for LLM inference servers.
#   docker build -t llmproxy .
#   docker run -p 8000:8000 -v "$PWD/config.yaml:/home/llmproxy/config.yaml" \
#     -v llmproxy-spool:/home/llmproxy/usage-spool llmproxy
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

RUN useradd --create-home --uid 10001 llmproxy
WORKDIR /home/llmproxy

COPY pyproject.toml README.md /src/
COPY llmproxy /src/llmproxy
RUN pip install "/src[redis,jwt,otel]" && rm -rf /src  # redis-py, PyJWT, OpenTelemetry: rate_limit.store: redis, auth.jwt and tracing work in the image

# The usage outbox (usage.spool_dir, ./usage-spool by default): on a volume, records not yet delivered
# survive the container.
RUN mkdir /home/llmproxy/usage-spool && chown llmproxy /home/llmproxy/usage-spool
VOLUME /home/llmproxy/usage-spool

USER llmproxy
EXPOSE 8000

# /ready: healthy only while a backend is available (and not shutting down); /health would say alive.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=2).status == 200 else 1)"

ENTRYPOINT ["llmproxy"]
CMD ["serve", "--config", "/home/llmproxy/config.yaml"]
