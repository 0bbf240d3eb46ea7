"""Chaos ground truth: the load generator keeps the event ids the collector accepted, and each sink's
truth reads back what the sink holds (a webhook receiver's acks, a Kafka topic read_committed, a Redis
Stream, a Postgres table), with when each copy arrived."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError

from devtools.traffic import EventFactory
from devtools.webhook import WebhookReceiver

API_KEY = "chaos-key"


@dataclass
class LoadGenerator:
    """Open loop: batches at fixed intended times. A batch the collector refuses (5xx, connection
    error) is sent again, like an SDK would, until accepted: resends are duplicates to drop."""

    url: str
    rate: float
    batch: int = 20
    factory: EventFactory = field(default_factory=lambda: EventFactory(producer_id=uuid.uuid4().hex[:6]))
    accepted: set[str] = field(default_factory=set)
    resends: int = 0
    extra_events: list[dict[str, Any]] = field(default_factory=list)  # injected into the next batch
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    async def run(self) -> None:
        interval = self.batch / self.rate
        next_at = time.monotonic()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
            while not self._stop.is_set():
                events = [self.factory.make() for _ in range(self.batch)]
                if self.extra_events:
                    events.extend(self.extra_events)
                    self.extra_events = []
                task = asyncio.create_task(self._post_until_accepted(session, events))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=120)

    async def _post_until_accepted(self, session: aiohttp.ClientSession, events: list[dict[str, Any]]) -> None:
        for attempt in range(200):
            try:
                async with session.post(self.url, json=events, headers={"X-Api-Key": API_KEY}) as resp:
                    body = await resp.json(content_type=None)
                    if resp.status < 500 and isinstance(body, dict):
                        self.accepted.update(body.get("accepted", []))
                        retry = [
                            e
                            for e in events
                            if e.get("event_id")
                            in {
                                r.get("event_id")
                                for r in body.get("rejected", [])
                                if r.get("reason") == "broker_unavailable"
                            }
                        ]
                        if not retry:
                            return
                        events = retry
            except (aiohttp.ClientError, TimeoutError, ValueError):
                pass
            self.resends += 1
            await asyncio.sleep(min(2.0, 0.1 * (attempt + 1)))

    def stop(self) -> None:
        self._stop.set()


@dataclass
class WebhookTruth:
    """What a webhook receiver acknowledged, as it arrived."""

    receiver: WebhookReceiver

    @property
    def received(self) -> list[dict[str, Any]]:
        return self.receiver.received

    @property
    def arrival_ms(self) -> list[float]:
        return self.receiver.arrival_ms

    async def refresh(self) -> None:
        pass

    async def close(self) -> None:
        pass


@dataclass
class KafkaTopicTruth:
    """A Kafka sink's topic read back with read_committed: arrival is the record's timestamp."""

    bootstrap: str
    topic: str
    received: list[dict[str, Any]] = field(default_factory=list)
    arrival_ms: list[float] = field(default_factory=list)
    _consumer: AIOKafkaConsumer | None = None

    async def refresh(self) -> None:
        if self._consumer is None:
            self._consumer = AIOKafkaConsumer(
                self.topic,
                bootstrap_servers=self.bootstrap,
                group_id=None,
                auto_offset_reset="earliest",
                enable_auto_commit=False,
                isolation_level="read_committed",
            )
            await self._consumer.start()
        try:
            while batch := await self._consumer.getmany(timeout_ms=500, max_records=5000):
                for records in batch.values():
                    for r in records:
                        self.received.append(json.loads(r.value))
                        self.arrival_ms.append(float(r.timestamp))
        except KafkaError:
            pass  # a broker down: read the rest on the next refresh

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()


@dataclass
class RedisStreamTruth:
    """A Redis Stream sink's stream read back with XRANGE: arrival is the entry id's milliseconds."""

    url: str
    stream: str
    received: list[dict[str, Any]] = field(default_factory=list)
    arrival_ms: list[float] = field(default_factory=list)
    _last_id: str = "-"

    async def refresh(self) -> None:
        client = aioredis.from_url(self.url, socket_timeout=5.0, socket_connect_timeout=2.0)
        try:
            while True:
                start = self._last_id if self._last_id == "-" else f"({self._last_id}"
                entries = await client.xrange(self.stream, min=start, count=5000)
                if not entries:
                    return
                for entry_id, fields in entries:
                    self._last_id = entry_id.decode()
                    self.received.append(json.loads(fields[b"data"]))
                    self.arrival_ms.append(float(self._last_id.split("-")[0]))
        except (RedisError, OSError):
            pass  # Redis down: read the rest on the next refresh
        finally:
            await client.aclose()

    async def close(self) -> None:
        pass


@dataclass
class PostgresTableTruth:
    """A Postgres sink's table read back whole: one row per idempotency key, so a copy the sink wrote twice
    would have to carry another key; arrival is the row's `delivered_at`."""

    dsn: str
    table: str
    received: list[dict[str, Any]] = field(default_factory=list)
    arrival_ms: list[float] = field(default_factory=list)

    async def refresh(self) -> None:
        import asyncpg

        try:
            conn = await asyncpg.connect(self.dsn, timeout=5.0)
        except (OSError, TimeoutError, asyncpg.PostgresError):
            return  # Postgres down: read it all on the next refresh
        try:
            if await conn.fetchval("SELECT to_regclass($1)", self.table) is None:
                return
            rows = await conn.fetch(
                f"SELECT event_id, extract(epoch FROM received_at) * 1000 AS ingest_ts,"
                f" extract(epoch FROM delivered_at) * 1000 AS delivered_ms FROM {self.table} WHERE NOT canary"
                " ORDER BY delivered_at"
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return
        finally:
            await conn.close()
        self.received = [{"event_id": r["event_id"], "ingest_ts": float(r["ingest_ts"] or 0)} for r in rows]
        self.arrival_ms = [float(r["delivered_ms"]) for r in rows]

    async def close(self) -> None:
        pass


SinkTruth = WebhookTruth | KafkaTopicTruth | RedisStreamTruth | PostgresTableTruth
