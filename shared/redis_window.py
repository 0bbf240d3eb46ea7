"""`RedisKeyWindow`: a key window shared by every worker, one pipelined round trip per batch (never per
event). The claim semantics are described in shared/keywindow.py."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.errors import TransientError

log = logging.getLogger(__name__)


# KEYS[1] key, ARGV: claim, inherited claim, ttl ms. 1: pass (free, ours, or taken over), 0: a copy.
INHERIT_CLAIM = """
local old = redis.call('GET', KEYS[1])
if old == ARGV[1] then return 1 end
if (not old) or old == ARGV[2] then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3]) return 1 end
return 0
"""


class RedisKeyWindow:
    def __init__(self, url: str, prefix: str, window_s: float) -> None:
        self.client = aioredis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0)
        self.prefix = prefix
        self.window_s = window_s
        self._inherit = self.client.register_script(INHERIT_CLAIM)
        self._holders: dict[str, str] = {}  # key -> the claim the last `claim` found holding it (a copy's)

    def _k(self, key: str) -> str:
        return f"{self.prefix}{key}"

    async def claim(
        self,
        keys: Sequence[str],
        claims: Sequence[str],
        anchors: Sequence[Any],
        inherited: Sequence[str | None] | None = None,
    ) -> list[bool]:
        ttl = int(self.window_s * 1000)
        inherits = inherited or [None] * len(keys)
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for key, claim, heir_of in zip(keys, claims, inherits, strict=True):
                    if heir_of is None:
                        pipe.set(self._k(key), claim, nx=True, get=True, px=ttl)  # old value, or None if we set it
                    else:  # a replay (rare): check and take over the claim in one atomic script
                        await self._inherit(keys=[self._k(key)], args=[claim, heir_of, ttl], client=pipe)
                previous = await pipe.execute()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise TransientError(f"redis unavailable: {exc}") from exc
        except RedisError as exc:
            raise TransientError(f"redis error: {exc}") from exc
        self._holders = {
            key: old.decode(errors="replace")
            for key, old, heir_of in zip(keys, previous, inherits, strict=True)
            if heir_of is None and old is not None
        }
        return [
            old == 1 if heir_of is not None else old is None or old.decode() == claim
            for old, claim, heir_of in zip(previous, claims, inherits, strict=True)
        ]

    async def seen(self, keys: Sequence[str], anchors: Sequence[Any]) -> list[bool]:
        try:
            values = await self.client.mget([self._k(k) for k in keys]) if keys else []
        except (RedisError, OSError) as exc:
            raise TransientError(f"redis unavailable: {exc}") from exc
        return [v is not None for v in values]

    async def holders(self, keys: Sequence[str], anchors: Sequence[Any]) -> list[str | None]:
        """What the last `claim` saw (SET GET returned it: no round trip), else what Redis holds now."""
        if all(k in self._holders for k in keys):
            return [self._holders[k] for k in keys]
        try:
            values = await self.client.mget([self._k(k) for k in keys]) if keys else []
        except (RedisError, OSError) as exc:
            raise TransientError(f"redis unavailable: {exc}") from exc
        return [v.decode(errors="replace") if v is not None else None for v in values]

    async def mark(self, keys: Sequence[str], anchors: Sequence[Any]) -> None:
        ttl = int(self.window_s * 1000)
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.set(self._k(key), b"1", px=ttl)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise TransientError(f"redis unavailable: {exc}") from exc

    def describe(self) -> dict[str, Any]:
        return {"backend": "redis", "prefix": self.prefix, "window_s": self.window_s}

    async def lookup(self, key: str) -> dict[str, Any] | None:
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.get(self._k(key))
                pipe.pttl(self._k(key))
                value, ttl = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise TransientError(f"redis unavailable: {exc}") from exc
        if value is None:
            return None
        return {"key": key, "claim": value.decode(errors="replace"), "expires_in_ms": ttl}

    async def browse(self, cursor: str, limit: int) -> tuple[list[dict[str, Any]], str | None]:
        """SCAN pages: the cursor is Redis's own, so paging is stable while keys come and go."""
        try:
            position, keys = await self.client.scan(int(cursor or 0), match=f"{self.prefix}*", count=limit)
        except (RedisError, OSError) as exc:
            raise TransientError(f"redis unavailable: {exc}") from exc
        entries = [{"key": k.decode()[len(self.prefix) :]} for k in keys[:limit]]
        return entries, (str(position) if position else None)

    async def size(self) -> int | None:
        count = 0
        try:
            async for _ in self.client.scan_iter(match=f"{self.prefix}*", count=1000):
                count += 1
        except (RedisError, OSError) as exc:
            raise TransientError(f"redis unavailable: {exc}") from exc
        return count

    async def close(self) -> None:
        await self.client.aclose()
