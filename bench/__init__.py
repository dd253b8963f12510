"""Benchmarks for llmproxy. Run them from the repo root, e.g. `python -m bench.ttft` (see bench/README.md)."""
