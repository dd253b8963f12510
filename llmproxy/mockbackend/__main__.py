"""`python -m llmproxy.mockbackend ...`, the same as `llmproxy mock-backend ...`."""

from __future__ import annotations

import sys

from llmproxy.mockbackend.cli import main

sys.exit(main(sys.argv[1:]))
