"""`llmproxy keygen` (llmproxy/keygen.py), without sockets."""

from __future__ import annotations

import hashlib

import yaml

from llmproxy.config import parse_config
from llmproxy.keygen import main as keygen_main


def test_keygen_prints_a_key_whose_digest_it_prints(capsys):
    assert keygen_main(["--user-id", "team-a"]) == 0
    out = capsys.readouterr().out
    key = out.split("key:", 1)[1].split()[0]
    assert key.startswith("sk-llmp-") and len(key) > 40
    assert hashlib.sha256(key.encode()).hexdigest() in out
    parse_config({"backends": [{"url": "http://b"}], "auth": {"enabled": True, "keys": [{"key": key}]}})  # valid


def test_the_printed_snippet_is_a_complete_auth_section_that_turns_auth_on(capsys):
    assert keygen_main(["--user-id", "team-a"]) == 0
    out = capsys.readouterr().out
    snippet = yaml.safe_load(out[out.index("auth:"):])
    config = parse_config({"backends": [{"url": "http://b"}], **snippet})  # pasted as it is
    assert config.auth.enabled and [k.user_id for k in config.auth.keys] == ["team-a"]
    assert config.auth.keys[0].key_sha256 in out
