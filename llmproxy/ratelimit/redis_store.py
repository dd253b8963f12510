"""The shared rate-limit store: counters in Redis, so a fleet of proxies enforces one set of limits.

Every operation is one Lua script, so checking all scopes and consuming is atomic across instances, and
costs one round trip. The scripts read the clock with Redis `TIME`: instances whose clocks disagree still
agree on every bucket. They mirror, line for line, the Python arithmetic in `store.py` that `MemoryStore`
uses; the scripts live here as strings rather than .lua files so that a plain `pip install` (no package
data declared) still ships them.

Keys, under the prefix: `rq:<scope>` the GCRA TAT, `tk:<scope>` the token bucket {l: level, t: time},
`cc:<scope>` a sorted set of concurrency leases scored by expiry, `bg:<scope>:<period start, Unix seconds>`
the budget {t: tokens, u: usd}. Each key expires when its state would read as "idle" anyway, so idle scopes
vanish. Leases expire `lease_ttl` after they were last renewed: a crashed instance cannot hold slots
forever, so a live one renews the leases it holds in the background, in one script call per round.

Redis down or slow is `StoreUnavailable` within `timeout`, never a hang; the client reconnects by itself
on the next call, and scripts flushed by a Redis restart are loaded again (redis-py retries on NOSCRIPT).

The same scripts run on one server, on a Sentinel-managed master and on a Redis Cluster (redis_client.py).
On a Cluster the prefix is a hash tag, `{llmproxy}:`, so every key is in one slot: the keys a script is
given, and the budget keys it builds from a `bg:<scope>` prefix (the period is known only on Redis' clock).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from llmproxy.config.redis_url import parse_redis_url
from llmproxy.ratelimit.store import (
    CONCURRENCY_RETRY_AFTER,
    EPSILON,
    MIN_RETRY_AFTER,
    Decision,
    Limits,
    StoreUnavailable,
)

log = logging.getLogger("llmproxy")
# A release runs after the response, with nobody waiting on it, and removing a lease twice is harmless: it is
# tried again for this long, so that a busy moment does not leave the slot held until the lease expires. (A
# charge is not: one whose reply was lost may have been applied, and a second would count the tokens twice.)
RELEASE_RETRY_FOR = 5.0
PREPARE_TIMEOUT = 5.0  # seconds to connect at start (see RedisStore.prepare)
RELEASE_RETRY_PAUSE = 0.1

# Helpers shared by the scripts; `period_bounds` is `store.period_bounds` in days-since-epoch arithmetic
# (H. Hinnant's civil calendar algorithms), as Lua in Redis has no date library.
_LUA_COMMON = f"""
local EPS, MIN_RETRY, CONC_RETRY = {EPSILON!r}, {MIN_RETRY_AFTER!r}, {CONCURRENCY_RETRY_AFTER!r}
local function num(v) if v == '' then return nil end return tonumber(v) end
local function fmt(x) return string.format('%.17g', x) end
local function ms(seconds) return math.max(1, math.ceil(seconds * 1000) + 1) end
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local doy = math.floor((153 * ((m + 9) % 12) + 2) / 5) + d - 1
  return era * 146097 + yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy - 719468
end
local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end
local function period_bounds(period, now)
  local day = math.floor(now / 86400)
  local first, last = day, day + 1
  if period == 'week' then
    first = day - (day + 3) % 7  -- day 0, 1970-01-01, was a Thursday
    last = first + 7
  elseif period == 'month' then
    local y, m = civil_from_days(day)
    first = days_from_civil(y, m, 1)
    if m == 12 then last = days_from_civil(y + 1, 1, 1) else last = days_from_civil(y, m + 1, 1) end
  end
  return first * 86400, last * 86400
end
local function bucket_level(key, capacity, now)
  local b = redis.call('HMGET', key, 'l', 't')
  if not b[1] then return capacity end
  return math.min(capacity, tonumber(b[1]) + math.max(0, now - tonumber(b[2])) * capacity / 60)
end
local function store_bucket(key, level, capacity, now)
  redis.call('HSET', key, 'l', fmt(level), 't', fmt(now))
  redis.call('PEXPIRE', key, ms((capacity - level) * 60 / capacity))
end
local function expire_leases_at_last(key)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if last[2] then redis.call('PEXPIREAT', key, math.ceil(tonumber(last[2]) * 1000) + 1) end
end
"""

# KEYS: 4 per scope (rq, tk, cc, bg prefix). ARGV: reserve, lease_ttl, then 8 per scope: requests per
# minute, capacity, max concurrent, tokens per minute, budget tokens, budget usd, period, lease id.
_ADMIT = _LUA_COMMON + """
local now, reserve, lease_ttl = clock(), tonumber(ARGV[1]), tonumber(ARGV[2])
local n = #KEYS / 4
local v, denied, denied_at, retry = {}, nil, 0, 0
for i = 1, n do
  local k, a = (i - 1) * 4, 2 + (i - 1) * 8
  local rpm, cap, maxc, tpm = num(ARGV[a + 1]), num(ARGV[a + 2]), num(ARGV[a + 3]), num(ARGV[a + 4])
  local btok, busd = num(ARGV[a + 5]), num(ARGV[a + 6])
  local s, reason, wait = {}, nil, 0
  if btok or busd then
    local first, last = period_bounds(ARGV[a + 7], now)
    local spent = redis.call('HMGET', KEYS[k + 4] .. ':' .. first, 't', 'u')
    local st, su = tonumber(spent[1]) or 0, tonumber(spent[2]) or 0
    if (btok and st >= btok) or (busd and su >= busd) then reason, wait = 'budget', last - now end
  end
  if tpm then
    s.level = bucket_level(KEYS[k + 2], tpm, now)
    local target = nil
    if reserve > tpm then
      if s.level < tpm - EPS then target = tpm end
    elseif reserve > 0 then
      if s.level < reserve - EPS then target = reserve end
    elseif s.level <= 0 then
      target = 0
    end
    if target and not reason then reason, wait = 'tokens', math.max(MIN_RETRY, (target - s.level) * 60 / tpm) end
  end
  if maxc then
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 3], '-inf', fmt(now))  -- expired leases never count
    if redis.call('ZCARD', KEYS[k + 3]) >= maxc and not reason then reason, wait = 'concurrency', CONC_RETRY end
  end
  if rpm then
    s.interval = 60 / rpm
    s.tolerance = (cap - 1) * s.interval
    s.tat = math.max(tonumber(redis.call('GET', KEYS[k + 1])) or now, now)
    if s.tat - now > s.tolerance + EPS and not reason then reason, wait = 'requests', s.tat - s.tolerance - now end
  end
  v[i] = s
  if reason and not denied then denied, denied_at, retry = reason, i, wait end
end
if not denied then
  for i = 1, n do
    local k, a, s = (i - 1) * 4, 2 + (i - 1) * 8, v[i]
    if s.tat then
      s.tat = s.tat + s.interval
      redis.call('SET', KEYS[k + 1], fmt(s.tat), 'PX', ms(s.tat - now))
    end
    if s.level and reserve > 0 then
      s.level = s.level - reserve
      store_bucket(KEYS[k + 2], s.level, tonumber(ARGV[a + 4]), now)
    end
    if ARGV[a + 3] ~= '' then
      redis.call('ZADD', KEYS[k + 3], fmt(now + lease_ttl), ARGV[a + 8])
      expire_leases_at_last(KEYS[k + 3])
    end
  end
end
local out = {denied and 0 or 1, denied or '', denied_at, fmt(retry), '', '', '', '', '', ''}
for i = 1, n do
  local s, a = v[i], 2 + (i - 1) * 8
  if s.tat and out[5] == '' then
    local cap, room = tonumber(ARGV[a + 2]), s.tolerance - (s.tat - now)
    local remaining = 0
    if room >= -EPS then remaining = math.min(cap, math.floor((room + EPS) / s.interval) + 1) end
    out[5], out[6], out[7] = cap, remaining, fmt(s.tat - now)
  end
  if s.level and out[8] == '' then
    local tpm = tonumber(ARGV[a + 4])
    out[8], out[9], out[10] = tpm, math.max(0, math.floor(s.level)), fmt(math.max(0, (tpm - s.level) * 60 / tpm))
  end
end
return out
"""

# KEYS: 2 per scope (tk, bg prefix). ARGV: token bucket delta, budget tokens, budget usd, then 2 per scope:
# tokens per minute, budget period ('' when the scope has no budget).
_CHARGE = _LUA_COMMON + """
local now, delta, tokens, usd = clock(), tonumber(ARGV[1]), ARGV[2], ARGV[3]
for i = 1, #KEYS / 2 do
  local k, a = (i - 1) * 2, 3 + (i - 1) * 2
  local tpm, period = num(ARGV[a + 1]), ARGV[a + 2]
  if tpm then  -- a refund never overfills the bucket
    store_bucket(KEYS[k + 1], math.min(tpm, bucket_level(KEYS[k + 1], tpm, now) - delta), tpm, now)
  end
  if period ~= '' then
    local first, last = period_bounds(period, now)
    local key = KEYS[k + 2] .. ':' .. first
    redis.call('HINCRBY', key, 't', tokens)
    redis.call('HINCRBYFLOAT', key, 'u', usd)
    redis.call('EXPIREAT', key, last + 86400)
  end
end
return 0
"""

# KEYS: one lease set per lease; ARGV: lease_ttl, then the lease ids. Returns the 1-based indexes of the
# leases that had already expired: they are not brought back, the slot may be someone else's by now.
_RENEW = _LUA_COMMON + """
local now, ttl, lost = clock(), tonumber(ARGV[1]), {}
for i = 1, #KEYS do
  local score = redis.call('ZSCORE', KEYS[i], ARGV[i + 1])
  if score and tonumber(score) > now then
    redis.call('ZADD', KEYS[i], 'XX', fmt(now + ttl), ARGV[i + 1])
    expire_leases_at_last(KEYS[i])
  else
    lost[#lost + 1] = i
  end
end
return lost
"""


def _import_redis() -> Any:
    try:
        import redis.asyncio as redis_asyncio
    except ImportError as error:
        raise ImportError("the Redis rate-limit store needs redis-py: pip install 'llmproxy[redis]'") from error
    return redis_asyncio


def _opt(value: float | None) -> str:
    return "" if value is None else repr(value)


def _float(value: str) -> float | None:
    return None if value == "" else float(value)


def _int(value: Any) -> int | None:
    return None if value == "" else int(value)


def _decision(reply: list[Any], checks: Sequence[tuple[str, Limits]], leases: list[tuple[str, str]]) -> Decision:
    """The admit script's reply: allowed, reason, 1-based index of the denying scope, retry after, headers."""
    allowed, denied_at = reply[0] == 1, int(reply[2])
    return Decision(
        allowed, reply[1] or None, checks[denied_at - 1][0] if denied_at else None, float(reply[3]),
        leases if allowed else [],
        _int(reply[4]), _int(reply[5]), _float(reply[6]), _int(reply[7]), _int(reply[8]), _float(reply[9]))


class RedisStore:
    def __init__(self, url: str, prefix: str = "llmproxy:", lease_ttl: float = 60.0, timeout: float = 0.5,
                 cluster: bool = False) -> None:
        """`url` as rate_limit.redis_url (config/redis_url.py); `cluster`: it names Redis Cluster nodes."""
        _import_redis()
        from redis.exceptions import AskError, ClusterCrossSlotError, MovedError, RedisClusterException, RedisError

        from llmproxy.ratelimit.redis_client import connect, hash_tagged

        target = parse_redis_url(url, cluster)
        self._cluster = cluster
        self._redis = connect(target, timeout)
        # RedisClusterException (every cluster node unreachable, say) is no RedisError: without it, a Cluster
        # wholly down would raise through an admission instead of being a store error that on_store_error decides.
        self._errors: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError,
                                                         asyncio.TimeoutError)
        self._cluster_errors = (ClusterCrossSlotError, MovedError, AskError)
        self._prefix = hash_tagged(prefix) if target.kind == "cluster" else prefix
        self._lease_ttl = lease_ttl
        self._timeout = timeout
        self._admit = self._redis.register_script(_ADMIT)
        self._charge = self._redis.register_script(_CHARGE)
        self._renew = self._redis.register_script(_RENEW)
        self._held: dict[str, str] = {}  # lease id -> scope, renewed until released
        self._renewer: asyncio.Task | None = None
        self._abandoned: set[asyncio.Future] = set()  # timed-out calls still winding down

    async def admit(self, checks: Sequence[tuple[str, Limits]], reserve_tokens: int = 0) -> Decision:
        if not checks:
            return Decision(allowed=True)
        # Lease ids are drawn here: Lua's random numbers in Redis are seeded the same on every call.
        leases = [(scope, secrets.token_urlsafe(12)) for scope, limits in checks if limits.max_concurrent is not None]
        lease_of = dict(leases)
        keys: list[str] = []
        args: list[str] = [str(int(reserve_tokens)), repr(self._lease_ttl)]
        for scope, limits in checks:
            keys += [self._key("rq", scope), self._key("tk", scope), self._key("cc", scope), self._key("bg", scope)]
            capacity = limits.request_capacity if limits.requests_per_minute is not None else None
            args += [_opt(limits.requests_per_minute), _opt(capacity), _opt(limits.max_concurrent),
                     _opt(limits.tokens_per_minute), _opt(limits.budget_tokens), _opt(limits.budget_usd),
                     limits.budget_period or "", lease_of.get(scope, "")]
        reply = await self._call(self._admit(keys=keys, args=args))
        decision = _decision(reply, checks, leases)
        if decision.leases:
            self._hold(decision.leases)
        return decision

    async def prepare(self) -> None:
        """Connect (on a Cluster, also learn which node serves which slot) before the first admission needs it,
        so that the first request does not pay for it within `timeout`. A failure is logged and left to the
        calls, which connect again by themselves."""
        init = getattr(self._redis, "initialize", None) if self._cluster else None
        try:
            await asyncio.wait_for(init() if init is not None else self._redis.ping(), PREPARE_TIMEOUT)
        except self._errors as error:  # asyncio.TimeoutError among them
            log.warning("rate-limit store: redis not reachable yet (%s); admissions will try again", error)

    async def release(self, leases: Sequence[tuple[str, str]]) -> None:
        if not leases:
            return
        for _, lease in leases:  # whatever happens below, stop renewing: an unreleased lease then expires
            self._held.pop(lease, None)

        def remove() -> Awaitable[Any]:  # a pipeline is emptied by its execute: one per try
            pipe = self._redis.pipeline(transaction=False)
            for scope, lease in leases:
                pipe.zrem(self._key("cc", scope), lease)
            return pipe.execute()

        await self._retried(remove, RELEASE_RETRY_FOR)

    async def charge(self, checks: Sequence[tuple[str, Limits]], tokens: int, usd: float,
                     reserved: int = 0) -> None:
        keys: list[str] = []
        args: list[str] = [str(int(tokens - reserved)), str(int(tokens)), repr(float(usd))]
        for scope, limits in checks:
            if limits.tokens_per_minute is None and not limits.has_budget:
                continue
            keys += [self._key("tk", scope), self._key("bg", scope)]
            args += [_opt(limits.tokens_per_minute), (limits.budget_period or "") if limits.has_budget else ""]
        if keys:
            await self._call(self._charge(keys=keys, args=args))

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        self._held.clear()
        close = getattr(self._redis, "aclose", None) or self._redis.close  # aclose from redis-py 5.0.1
        await close()

    # Lease renewal ----------------------------------------------------------------------------------

    def _hold(self, leases: list[tuple[str, str]]) -> None:
        for scope, lease in leases:
            self._held[lease] = scope
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_while_held())

    async def _renew_while_held(self) -> None:
        """Renews every lease_ttl/3, so two renewals in a row may fail before a lease expires."""
        while self._held:
            await asyncio.sleep(self._lease_ttl / 3)
            try:
                await self._renew_held()
            except StoreUnavailable as error:
                log.warning("rate-limit leases not renewed: %s", error)
            except Exception:  # a bug here must not stop renewal for good: the leases would expire
                log.exception("rate-limit lease renewal failed")

    async def _renew_held(self) -> None:
        held = list(self._held.items())
        if not held:
            return
        keys = [self._key("cc", scope) for _, scope in held]
        lost = await self._call(self._renew(keys=keys, args=[repr(self._lease_ttl)] + [lease for lease, _ in held]))
        for index in lost:  # expired while Redis was out of reach (or restarted): nothing left to renew
            self._held.pop(held[int(index) - 1][0], None)

    # Plumbing ---------------------------------------------------------------------------------------

    def _key(self, kind: str, scope: str) -> str:
        return f"{self._prefix}{kind}:{scope}"

    async def _retried(self, make_call: Callable[[], Awaitable[Any]], seconds: float) -> Any:
        """`_call(make_call())`, tried again after StoreUnavailable for up to `seconds`: idempotent calls only."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            try:
                return await self._call(make_call())
            except StoreUnavailable:
                if loop.time() + RELEASE_RETRY_PAUSE >= deadline:
                    raise
                await asyncio.sleep(RELEASE_RETRY_PAUSE)

    async def _call(self, call: Awaitable[Any]) -> Any:
        """Awaits one Redis call within the timeout. Raises StoreUnavailable on any Redis or network error.

        A call that times out is cancelled but not waited for: redis-py may take up to another socket
        timeout to wind down (Python 3.10), and the caller was promised an answer within `timeout`.
        """
        task = asyncio.ensure_future(call)
        try:
            done, _ = await asyncio.wait((task,), timeout=self._timeout)
        except asyncio.CancelledError:
            self._abandon(task)
            raise
        if not done:
            self._abandon(task)
            raise StoreUnavailable(f"redis did not answer within {self._timeout:g}s")
        try:
            return task.result()
        except self._errors as error:
            # A plain client on a Cluster node: the keys of a script span slots, or live on another node.
            hint = " (redis_url names a Redis Cluster node: set rate_limit.cluster: true)" \
                if isinstance(error, self._cluster_errors) else ""
            raise StoreUnavailable(f"redis: {error}{hint}") from error

    def _abandon(self, task: asyncio.Future) -> None:
        task.cancel()
        self._abandoned.add(task)  # a strong reference until it has wound down
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Future) -> None:
        self._abandoned.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved, so that asyncio does not log it: the caller was told already
