"""`llmproxy keygen` (llmproxy/keygen.py), without sockets."""

from __future__ import annotations

import hashlib

from llmproxy.config import parse_config
from llmproxy.keygen import main as keygen_main


def test_keygen_prints_a_key_whose_digest_it_prints(capsys):
    assert keygen_main(["--user-id", "team-a"]) == 0
    out = capsys.readouterr().out
    key = out.split("key:", 1)[1].split()[0]
    assert key.startswith("sk-llmp-") and len(key) > 40
    assert hashlib.sha256(key.encode()).hexdigest() in out
    parse_config({"backends": [{"url": "http://b"}], "auth": {"enabled": True, "keys": [{"key": key}]}})  # valid
