"""Keys remembered for a window: the deduplicator's `DedupeWindow` and the senders' `DeliveredLedger`.

Two backends behind one interface:
- `RedisKeyWindow`: shared by every worker, one pipelined round trip per batch (never per event).
- `TableKeyWindow`: a Faust table on RocksDB, partition-local, backed up to a changelog topic.

A claim remembers *which message* first claimed a key. When a worker dies after claiming but before
its output was durable, the replayed message presents the same claim and passes again instead of
being dropped as its own duplicate: nothing is lost, and the ledger downstream stops a re-delivery.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.codec import pack, unpack
from shared.errors import TransientError

__all__ = ["KeyWindow", "RedisKeyWindow", "TableKeyWindow"]


class KeyWindow(Protocol):
    window_s: float

    async def claim(self, keys: Sequence[str], claims: Sequence[str], anchors: Sequence[Any]) -> list[bool]:
        """For each key: True if it is new (or expired, or claimed by this same message before)."""
        ...

    async def seen(self, keys: Sequence[str], anchors: Sequence[Any]) -> list[bool]:
        """For each key: True if it was marked within the window."""
        ...

    async def mark(self, keys: Sequence[str], anchors: Sequence[Any]) -> None:
        """Remember keys for the window."""
        ...

    def describe(self) -> dict[str, Any]: ...

    async def lookup(self, key: str) -> dict[str, Any] | None:
        """The entry of one key (for the table browser), or None."""
        ...

    async def browse(self, cursor: str, limit: int) -> tuple[list[dict[str, Any]], str | None]:
        """One page of entries from `cursor` ("" for the first); returns the page and the next cursor."""
        ...

    async def size(self) -> int | None: ...


class RedisKeyWindow:
    def __init__(self, url: str, prefix: str, window_s: float) -> None:
        self.client = aioredis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0)
        self.prefix = prefix
        self.window_s = window_s

    def _k(self, key: str) -> str:
        return f"{self.prefix}{key}"

    async def claim(self, keys: Sequence[str], claims: Sequence[str], anchors: Sequence[Any]) -> list[bool]:
        ttl = int(self.window_s * 1000)
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for key, claim in zip(keys, claims, strict=True):
                    pipe.set(self._k(key), claim, nx=True, get=True, px=ttl)  # old value, or None if we set it
                previous = await pipe.execute()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise TransientError(f"redis unavailable: {exc}") from exc
        except RedisError as exc:
            raise TransientError(f"redis error: {exc}") from exc
        return [old is None or old.decode() == claim for old, claim in zip(previous, claims, strict=True)]

    async def seen(self, keys: Sequence[str], anchors: Sequence[Any]) -> list[bool]:
        try:
            values = await self.client.mget([self._k(k) for k in keys]) if keys else []
        except (RedisError, OSError) as exc:
            raise TransientError(f"redis unavailable: {exc}") from exc
        return [v is not None for v in values]

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


class TableKeyWindow:
    """Values are msgpack [first_seen_ms, claim]; an expired entry counts as absent and is replaced.

    Faust writes a table's changelog to the partition of the current event, so each access first
    makes its record current (`anchor.make_current()`): key and source message share a partition.
    """

    def __init__(self, table: Any, window_s: float) -> None:
        self.table = table
        self.window_s = window_s

    def _live(self, raw: bytes | None, now: float) -> list[Any] | None:
        if raw is None:
            return None
        entry = unpack(raw)
        return entry if now - entry[0] < self.window_s * 1000 else None

    async def claim(self, keys: Sequence[str], claims: Sequence[str], anchors: Sequence[Any]) -> list[bool]:
        now = time.time() * 1000
        fresh = []
        for key, claim, anchor in zip(keys, claims, anchors, strict=True):
            anchor.make_current()
            entry = self._live(self.table.get(key), now)
            if entry is None:
                self.table[key] = pack([now, claim])
                fresh.append(True)
            else:
                fresh.append(entry[1] == claim)
        return fresh

    async def seen(self, keys: Sequence[str], anchors: Sequence[Any]) -> list[bool]:
        now = time.time() * 1000
        out = []
        for key, anchor in zip(keys, anchors, strict=True):
            anchor.make_current()
            out.append(self._live(self.table.get(key), now) is not None)
        return out

    async def mark(self, keys: Sequence[str], anchors: Sequence[Any]) -> None:
        now = time.time() * 1000
        for key, anchor in zip(keys, anchors, strict=True):
            anchor.make_current()
            self.table[key] = pack([now, ""])

    def describe(self) -> dict[str, Any]:
        return {"backend": "rocksdb", "table": self.table.name, "window_s": self.window_s}

    def _entry(self, key: str, raw: bytes) -> dict[str, Any]:
        first_seen, claim = [*unpack(raw), None, None][:2]
        live = time.time() * 1000 - first_seen < self.window_s * 1000
        return {"key": key, "first_seen_ms": first_seen, "claim": claim, "live": live}

    async def lookup(self, key: str) -> dict[str, Any] | None:
        raw = self.table.get(key)
        return None if raw is None else self._entry(key, raw)

    async def browse(self, cursor: str, limit: int) -> tuple[list[dict[str, Any]], str | None]:
        """Entries of the partitions this worker holds, in store order; the cursor is an entry count."""
        start = int(cursor or 0)
        entries = []
        for i, (key, raw) in enumerate(self.table.items()):
            if i < start:
                continue
            if len(entries) == limit:
                return entries, str(i)
            entries.append(self._entry(key, raw))
        return entries, None

    async def size(self) -> int | None:
        """RocksDB's estimate of the keys this worker holds (exact counting would read every key)."""
        dbs = getattr(self.table.data, "_dbs", None)
        if not dbs:
            return sum(1 for _ in self.table.keys())
        total = 0
        for db in dbs.values():
            try:
                total += int(db.property_int_value("rocksdb.estimate-num-keys") or 0)
            except Exception:
                return sum(1 for _ in self.table.keys())
        return total
