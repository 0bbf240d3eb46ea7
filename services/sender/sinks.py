"""Sink types. Each `SinkSender.deliver_batch` returns only once the destination acknowledged the
whole batch; it raises TransientError (retry) or PermanentSinkError (dead-letter) otherwise."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError

from shared.app import durable_producer
from shared.config import SinkConfig
from shared.errors import PermanentSinkError, SinkThrottled, TransientError
from shared.event import Event


def sink_record(sink: str, event: Event) -> dict[str, Any]:
    """What a destination receives: the event plus a key it can dedupe on."""
    record = event.to_wire()
    record["idempotency_key"] = idempotency_key(sink, event)
    return record


def idempotency_key(sink: str, event: Event) -> str:
    return f"{sink}:{event.tenant}:{event.event_id}"


class SinkSender(Protocol):
    config: SinkConfig

    async def start(self) -> None: ...

    async def deliver_batch(self, events: list[Event]) -> None: ...

    async def close(self) -> None: ...


class WebhookSink:
    """POST {"sink", "events": [...]} as JSON. 2xx is an ack; 408, 429 and 5xx are retried
    (honouring Retry-After); any other 4xx is permanent."""

    def __init__(self, config: SinkConfig) -> None:
        self.config = config
        self.url = config.options["url"]
        self.headers = dict(config.options.get("headers") or {})
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.timeout_s))

    async def deliver_batch(self, events: list[Event]) -> None:
        assert self.session is not None
        records = [sink_record(self.config.name, e) for e in events]
        batch_key = hashlib.sha256("\n".join(r["idempotency_key"] for r in records).encode()).hexdigest()
        body = json.dumps({"sink": self.config.name, "events": records}, separators=(",", ":"))
        headers = {"Content-Type": "application/json", "Idempotency-Key": batch_key, **self.headers}
        try:
            async with self.session.post(self.url, data=body, headers=headers) as resp:
                status = resp.status
                retry_after = _retry_after(resp.headers.get("Retry-After"))
                text = (await resp.text())[:200] if status >= 300 else ""
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransientError(f"webhook {self.config.name}: {type(exc).__name__}: {exc}") from exc
        if 200 <= status < 300:
            return
        if status == 429:
            raise SinkThrottled(f"webhook {self.config.name}: HTTP 429 {text}", retry_after)
        if status == 408 or status >= 500:
            raise TransientError(f"webhook {self.config.name}: HTTP {status} {text}", retry_after)
        raise PermanentSinkError(f"webhook {self.config.name}: HTTP {status} {text}")

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # HTTP-date form: fall back to our own backoff


class KafkaSink:
    """A topic on this cluster or another one, written with acks=all and the idempotent producer."""

    def __init__(self, config: SinkConfig, default_bootstrap: str) -> None:
        self.config = config
        self.topic = config.options["topic"]
        self.bootstrap = config.options.get("bootstrap") or default_bootstrap
        self.producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        self.producer = durable_producer(self.bootstrap, request_timeout_ms=int(self.config.timeout_s * 1000))
        await self.producer.start()

    async def deliver_batch(self, events: list[Event]) -> None:
        assert self.producer is not None
        try:
            futures = []
            for event in events:
                record = sink_record(self.config.name, event)
                futures.append(
                    await self.producer.send(
                        self.topic,
                        json.dumps(record, separators=(",", ":")).encode(),
                        key=event.partition_key,
                        headers=[("idempotency-key", record["idempotency_key"].encode())],
                    )
                )
            await asyncio.gather(*futures)
        except KafkaError as exc:
            raise TransientError(f"kafka sink {self.config.name}: {exc!r}") from exc

    async def close(self) -> None:
        if self.producer is not None:
            await self.producer.stop()


class RedisStreamSink:
    """XADD each event to a Redis Stream, one pipelined round trip per batch."""

    def __init__(self, config: SinkConfig, default_url: str) -> None:
        self.config = config
        self.stream = config.options["stream"]
        self.maxlen = config.options.get("maxlen")
        self.client = aioredis.from_url(
            config.options.get("url") or default_url, socket_timeout=config.timeout_s, socket_connect_timeout=2.0
        )

    async def start(self) -> None:
        pass

    async def deliver_batch(self, events: list[Event]) -> None:
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for event in events:
                    record = sink_record(self.config.name, event)
                    pipe.xadd(
                        self.stream,
                        {
                            "event_id": event.event_id,
                            "tenant": event.tenant,
                            "type": event.type,
                            "idempotency_key": record["idempotency_key"],
                            "data": json.dumps(record, separators=(",", ":")),
                        },
                        maxlen=self.maxlen,
                        approximate=True,
                    )
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise TransientError(f"redis stream {self.config.name}: {exc!r}") from exc

    async def close(self) -> None:
        await self.client.aclose()


class FileSink:
    """Rotating JSONL: appends to `events.jsonl`, fsyncs before acking, rotates past `rotate_bytes`."""

    def __init__(self, config: SinkConfig) -> None:
        self.config = config
        self.dir = Path(config.options["path"])
        self.rotate_bytes = int(config.options["rotate_bytes"])
        self.current = self.dir / "events.jsonl"
        # The sender delivers partitions concurrently; one file is one stream, so appends (and the
        # rotation after them) take turns. Two at once could rotate a file under the other's feet and
        # fail a batch that was already written, which the retry would write twice.
        self.lock = asyncio.Lock()

    async def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)

    async def deliver_batch(self, events: list[Event]) -> None:
        lines = "".join(json.dumps(sink_record(self.config.name, e), separators=(",", ":")) + "\n" for e in events)
        try:
            async with self.lock:
                await asyncio.to_thread(self._append, lines.encode())
        except OSError as exc:
            raise TransientError(f"file sink {self.config.name}: {exc}") from exc

    def _append(self, data: bytes) -> None:
        with open(self.current, "ab") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
            size = fh.tell()
        if size >= self.rotate_bytes:
            # Sequence first, so rotated files sort in the order they were written.
            seq = len(list(self.dir.glob("events-*.jsonl"))) + 1
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            os.replace(self.current, self.dir / f"events-{seq:08d}-{stamp}.jsonl")

    async def close(self) -> None:
        pass


def make_sink(config: SinkConfig, bootstrap: str, redis_url: str) -> SinkSender:
    if config.type == "webhook":
        return WebhookSink(config)
    if config.type == "kafka":
        return KafkaSink(config, bootstrap)
    if config.type == "redis_stream":
        return RedisStreamSink(config, redis_url)
    if config.type == "file":
        return FileSink(config)
    raise ValueError(f"unknown sink type {config.type}")
