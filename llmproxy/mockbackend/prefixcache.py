"""The engines' prefix cache, modelled for the mock: how much of a prompt a request finds already computed.

vLLM (automatic prefix caching), SGLang (its radix cache) and llama.cpp (its prompt cache) skip the prefill of the
prompt tokens whose KV they still hold from an earlier request, so a prompt whose beginning was recently seen gets
its first token sooner. The mock keeps the cache as vLLM does (vllm/v1/core/block_pool.py, kv_cache_manager.py):

- a prompt is cut into blocks of BLOCK_TOKENS tokens; only whole blocks are cached and found;
- a block is known by a hash chained over every block before it, so two prompts share a block only when
  everything up to its end is the same, and one dict lookup per block finds the longest cached prefix;
- a hit stops one token short of the prompt, rounded down to a block: the last token is always computed,
  for its logits (max_cache_hit_length = num_tokens - 1);
- the blocks of a request in flight are held (not evictable); when it ends they become free, the tail first,
  so that the least recently used free block is evicted first and a prefix outlives its continuations;
- capacity is counted in blocks; cached blocks nobody holds count as free in the KV-cache use, as in both
  vLLM's kv_cache_usage_perc (cached free blocks are in the free queue) and SGLang's token_usage (evictable
  tokens are not used ones).

No randomness: the same requests in the same order give the same hits. Cost: one blake2b per 16 tokens and a
dict lookup per block; looking up a 100k-character prompt (about 29,000 tokens) took 2.6 ms when this was written,
caching it and releasing it 1.7 ms more, its tokenization apart.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

BLOCK_TOKENS = 16  # vLLM's default block size
_JOIN = "\x1f"  # between the tokens of a block before hashing: no token of the mock's tokenizer is only this


def block_hashes(tokens: Sequence[str]) -> list[bytes]:
    """The chained hashes of the whole blocks of `tokens` (a partial last block has none)."""
    keys: list[bytes] = []
    parent = b""
    for start in range(0, len(tokens) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        text = _JOIN.join(tokens[start:start + BLOCK_TOKENS]).encode("utf-8", "surrogatepass")
        parent = hashlib.blake2b(parent + text, digest_size=16).digest()
        keys.append(parent)
    return keys


@dataclass(slots=True)
class Lookup:
    """What a prompt found in the cache; admitting it (PrefixCache.admit) caches its blocks."""

    keys: list[bytes]  # the chained hashes of the prompt's whole blocks
    prompt: int  # the prompt's tokens
    hit: int  # tokens found cached: whole blocks, at most prompt - 1


@dataclass(slots=True)
class Hold:
    """The blocks one request in flight holds; released when its response ends."""

    keys: list[bytes]
    private: int  # blocks held outside the cache: the prompt's partial last block and the completion


class PrefixCache:
    """Cached blocks, the requests holding them, and the free ones in least-recently-used order."""

    def __init__(self, capacity_tokens: int) -> None:
        self.capacity_blocks = capacity_tokens // BLOCK_TOKENS
        self._refs: dict[bytes, int] = {}  # every cached block -> how many requests in flight hold it
        self._free: OrderedDict[bytes, None] = OrderedDict()  # cached blocks nobody holds, evicted first first
        self._held = 0  # cached blocks with a holder
        self._private = 0  # blocks requests in flight hold outside the cache
        self.last_hit_rate = 0.0  # of the last admitted prompt (SGLang's cache_hit_rate: its last prefill batch)

    def lookup(self, tokens: Sequence[str]) -> Lookup:
        """The longest cached prefix of `tokens`, in whole blocks, stopping before the last token."""
        keys = block_hashes(tokens)
        usable = max(len(tokens) - 1, 0) // BLOCK_TOKENS
        found = 0
        refs = self._refs
        while found < usable and keys[found] in refs:
            found += 1
        return Lookup(keys, len(tokens), found * BLOCK_TOKENS)

    def admit(self, lookup: Lookup, completion_tokens: int) -> Hold:
        """Cache the prompt's blocks and hold them (and room for its tail and completion) until `release`."""
        refs, free = self._refs, self._free
        for key in lookup.keys:
            count = refs.get(key, 0)
            if count == 0:
                free.pop(key, None)
                self._held += 1
            refs[key] = count + 1
        private = -(-(lookup.prompt - len(lookup.keys) * BLOCK_TOKENS + completion_tokens) // BLOCK_TOKENS)
        self._private += private
        self.last_hit_rate = lookup.hit / lookup.prompt if lookup.prompt else 0.0
        self._evict()
        return Hold(lookup.keys, private)

    def release(self, hold: Hold) -> None:
        """The request ended: its blocks become free, the last first (so the last are evicted first)."""
        self._private -= hold.private
        refs, free = self._refs, self._free
        for key in reversed(hold.keys):
            count = refs.get(key)
            if count is None:
                continue
            if count == 1:
                free[key] = None
                self._held -= 1
            refs[key] = count - 1
        self._evict()

    def _evict(self) -> None:
        refs, free = self._refs, self._free
        while len(refs) > self.capacity_blocks and free:
            key, _ = free.popitem(last=False)
            del refs[key]

    def flush(self) -> int:
        """Forget every block no request holds (held ones stay until released); return how many were dropped."""
        dropped = len(self._free)
        for key in self._free:
            del self._refs[key]
        self._free.clear()
        return dropped

    @property
    def cached_tokens(self) -> int:
        return len(self._refs) * BLOCK_TOKENS

    def usage(self) -> float:
        """KV-cache use, 0..1: the blocks requests in flight hold (cached ones shared among them count once)."""
        if not self.capacity_blocks:
            return 0.0
        return min(1.0, (self._held + self._private) / self.capacity_blocks)

    def state(self) -> dict[str, Any]:
        """What /_mock/stats shows of the cache."""
        return {"capacity_tokens": self.capacity_blocks * BLOCK_TOKENS, "block_tokens": BLOCK_TOKENS,
                "cached_tokens": self.cached_tokens, "held_tokens": self._held * BLOCK_TOKENS,
                "kv_usage": self.usage(), "last_hit_rate": self.last_hit_rate}
