"""`llmproxy keygen`: a new API key, and the digest to put in the config instead of the key itself."""

from __future__ import annotations

import argparse
import secrets

from llmproxy.auth import KEY_ID_LENGTH
from llmproxy.config.access import key_digest

KEY_BYTES = 32  # 256 bits of randomness: 43 URL-safe characters


def new_key(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(KEY_BYTES)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llmproxy keygen", description=__doc__)
    parser.add_argument("--prefix", default="sk-llmp-", help="text before the random part (default sk-llmp-)")
    parser.add_argument("--user-id", help="user_id to put in the printed config snippet")
    args = parser.parse_args(argv)
    key = new_key(args.prefix)
    digest = key_digest(key)
    print(f"key:        {key}")
    print(f"key_sha256: {digest}")
    print(f"key_id:     {digest[:KEY_ID_LENGTH]}   (how logs, metrics and usage records name it)")
    print("\n# Give the key to its user (sent as `Authorization: Bearer <key>` or `X-API-Key: <key>`);")
    print("# the config needs only its digest. With more keys, add them under the same `keys:`.")
    print("auth:\n  enabled: true\n  keys:")
    print(f'    - key_sha256: "{digest}"')
    if args.user_id:
        print(f"      user_id: {args.user_id}")
    return 0
