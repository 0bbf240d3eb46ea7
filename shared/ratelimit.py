"""A per-tenant token bucket in Redis, shared by every collector replica.

One Lua script per request: refill by elapsed time on Redis's own clock (replicas' clocks may
differ), take `cost` tokens (one per event) or answer how long until there are enough.
"""

from __future__ import annotations

import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.config import RateLimit

log = logging.getLogger(__name__)

TOKEN_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) / 1000 * rate)
local allowed = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
if allowed == 1 then return {1, 0} end
return {0, math.ceil((cost - tokens) / rate * 1000)}
"""


class TenantRateLimiter:
    def __init__(self, redis_url: str, namespace: str) -> None:
        self.client = aioredis.from_url(redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self.script = self.client.register_script(TOKEN_BUCKET)
        self.prefix = f"hifi:{namespace}:ratelimit:"

    async def take(self, tenant: str, limit: RateLimit, cost: int) -> float | None:
        """Return None if allowed, else the seconds to wait. Fails open if Redis is unreachable:
        an outage of the limiter must not become an outage of ingestion."""
        try:
            allowed, wait_ms = await self.script(
                keys=[self.prefix + tenant], args=[limit.events_per_s, limit.burst, cost]
            )
        except (RedisError, OSError) as exc:
            log.warning("rate limiter unavailable, admitting tenant %s: %s", tenant, exc)
            return None
        return None if allowed else max(0.001, wait_ms / 1000)
