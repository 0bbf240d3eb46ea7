"""The contract every sink type keeps, against its real destination (an HTTP server, a Kafka topic, a Redis
stream, a directory). A new sink type joins the suite by adding a harness to HARNESSES.

- ack: `deliver_batch` returns only when every event is at the destination, each with its idempotency key;
- a batch delivered again carries the same keys (so the destination, or the sink itself, can drop the copy);
- `probe` returns while the destination is up; `close` may be called twice;
- transient: a destination that is down raises TransientError (retry, page), never PermanentSinkError (which
  would dead-letter good events), and once it is back the same batch lands;
- permanent: an event the destination refuses for good raises PermanentSinkError, or PartialDelivery naming
  the events it did take, so the sender isolates only that event.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from devtools.postgres import LocalPostgres
from devtools.redis import LocalRedis
from devtools.webhook import WebhookReceiver
from services.sender.sinks import SinkSender, idempotency_key, make_sink
from shared.config import SinkConfig
from shared.errors import PartialDelivery, PermanentSinkError, TransientError
from shared.event import Event
from shared.topics import ensure_topics
from tests.helpers import read_file_sink, read_kafka_topic, read_redis_stream

REFUSED_ID = "refused-1"


def events(n: int, prefix: str = "e") -> list[Event]:
    return [Event(f"{prefix}{i}", "play", 1.0, "acme", {"i": i}, device_id=f"d{i % 3}") for i in range(n)]


@dataclass
class Harness:
    sink: SinkSender
    read: Callable[[int], Awaitable[list[dict[str, Any]]]]  # the records at the destination (expecting n)
    outage: Callable[[], AbstractAsyncContextManager[None]] | None  # the destination down inside the block
    refused: Event | None  # an event this destination refuses for good
    dedupes_redelivery: bool  # the sink itself drops a batch it already delivered


async def webhook(tmp_path: Path, port: int, kafka: Any, redis_url: str, namespace: str) -> AsyncIterator[Harness]:
    hook = WebhookReceiver(port=port, reject_event=lambda event_id: event_id == REFUSED_ID)
    await hook.start()
    sink = make_sink(SinkConfig("hook", "webhook", {"url": f"http://127.0.0.1:{port}/in"}, timeout_s=2), "", "")

    async def read(n: int) -> list[dict[str, Any]]:
        return list(hook.received)

    @asynccontextmanager
    async def outage() -> AsyncIterator[None]:
        await hook.stop()
        try:
            yield
        finally:
            await hook.start()

    yield Harness(sink, read, outage, Event(REFUSED_ID, "play", 1.0, "acme", {}), dedupes_redelivery=False)
    await hook.stop()


async def kafka_topic(tmp_path: Path, port: int, kafka: Any, redis_url: str, namespace: str) -> AsyncIterator[Harness]:
    topic = f"{namespace}.contract"
    await ensure_topics(kafka.bootstrap, [topic], 2, 1)
    sink = make_sink(SinkConfig("lake", "kafka", {"topic": topic}, timeout_s=5), kafka.bootstrap, "")

    async def read(n: int) -> list[dict[str, Any]]:
        return await read_kafka_topic(kafka.bootstrap, topic, n, timeout=15)

    # Over the producer's max request size (1 MiB): no broker takes it, so no retry can help.
    too_large = Event(REFUSED_ID, "play", 1.0, "acme", {"blob": "x" * 2_000_000})
    # No outage here: the suite's broker is shared by every test. test_sink_exactly_once kills a
    # dedicated cluster's brokers under this sink.
    yield Harness(sink, read, None, too_large, dedupes_redelivery=False)


async def redis_stream(tmp_path: Path, port: int, kafka: Any, redis_url: str, namespace: str) -> AsyncIterator[Harness]:
    # A Redis of its own, so the outage stops only this test's server.
    server = LocalRedis(url=f"redis://127.0.0.1:{port}/0", data_dir=tmp_path / "redis")
    server.ensure()
    stream = f"{namespace}:contract"
    sink = make_sink(SinkConfig("s", "redis_stream", {"stream": stream}, timeout_s=1), "", server.url)
    client = aioredis.from_url(server.url)

    async def read(n: int) -> list[dict[str, Any]]:
        return await read_redis_stream(client, stream)

    @asynccontextmanager
    async def outage() -> AsyncIterator[None]:
        server.stop()
        try:
            yield
        finally:
            server.ensure()

    yield Harness(sink, read, outage, None, dedupes_redelivery=True)
    await client.aclose()
    server.stop()


async def file_dir(tmp_path: Path, port: int, kafka: Any, redis_url: str, namespace: str) -> AsyncIterator[Harness]:
    directory = tmp_path / "files"
    sink = make_sink(SinkConfig("f", "file", {"path": str(directory), "rotate_bytes": 1 << 20}), "", "")

    async def read(n: int) -> list[dict[str, Any]]:
        return read_file_sink(directory)

    @asynccontextmanager
    async def outage() -> AsyncIterator[None]:
        # The volume is gone: the directory's path now names something that is not a directory.
        shutil.move(directory, tmp_path / "files.away")
        directory.write_text("not a directory")
        try:
            yield
        finally:
            directory.unlink()
            shutil.move(tmp_path / "files.away", directory)

    yield Harness(sink, read, outage, None, dedupes_redelivery=False)


async def postgres_table(
    tmp_path: Path, port: int, kafka: Any, redis_url: str, namespace: str
) -> AsyncIterator[Harness]:
    # A server of its own (data under .cache: the postgres user cannot enter tmp_path), so the outage stops
    # only this test's; kept between tests (initdb once), a table per test.
    server = LocalPostgres(port=port)
    server.ensure()
    dsn_env = f"HIFI_CONTRACT_PG_DSN_{port}"
    os.environ[dsn_env] = server.dsn
    table = f"contract_{uuid.uuid4().hex[:10]}"
    sink = make_sink(SinkConfig("pg", "postgres", {"dsn_env": dsn_env, "table": table}, timeout_s=2), "", "")

    async def read(n: int) -> list[dict[str, Any]]:
        conn = await asyncpg.connect(server.dsn)
        try:
            got = [dict(r) for r in await conn.fetch(f"SELECT * FROM {table}")]
        finally:
            await conn.close()
        return [{**r, "payload": json.loads(r["payload"])} for r in got]

    @asynccontextmanager
    async def outage() -> AsyncIterator[None]:
        server.stop()
        try:
            yield
        finally:
            server.ensure()

    # jsonb holds no NUL character: SQLSTATE 22P05, refused for good.
    nul = Event(REFUSED_ID, "play", 1.0, "acme", {"note": "a\x00b"})
    yield Harness(sink, read, outage, nul, dedupes_redelivery=True)
    os.environ.pop(dsn_env, None)
    server.stop()


HARNESSES = {
    "webhook": webhook,
    "kafka": kafka_topic,
    "redis_stream": redis_stream,
    "file": file_dir,
    "postgres": postgres_table,
}
# The destinations a test can take down alone, and those that refuse a single event for good.
WITH_OUTAGE = ["file", "postgres", "redis_stream", "webhook"]
REFUSING = ["kafka", "postgres", "webhook"]


@pytest.fixture(params=sorted(HARNESSES))
async def harness(request, tmp_path, port_base, kafka, redis_server, namespace) -> AsyncIterator[Harness]:
    made = HARNESSES[request.param](tmp_path, port_base + 7, kafka, redis_server.url, namespace)
    h = await anext(made)
    await h.sink.start()
    try:
        yield h
    finally:
        await h.sink.close()
        await anext(made, None)


async def test_an_acked_batch_is_at_the_destination_with_its_keys(harness: Harness):
    batch = events(5)
    await harness.sink.deliver_batch(batch)
    got = {r["event_id"]: r for r in await harness.read(5)}
    assert sorted(got) == sorted(e.event_id for e in batch)
    for event in batch:
        assert got[event.event_id]["idempotency_key"] == idempotency_key(harness.sink.config.name, event)
        assert got[event.event_id]["payload"] == event.payload and got[event.event_id]["tenant"] == "acme"


async def test_a_batch_delivered_again_carries_the_same_keys(harness: Harness):
    batch = events(4)
    await harness.sink.deliver_batch(batch)
    await harness.sink.deliver_batch(batch)
    got = await harness.read(4 if harness.dedupes_redelivery else 8)
    copies = Counter(r["idempotency_key"] for r in got)
    assert set(copies) == {idempotency_key(harness.sink.config.name, e) for e in batch}
    assert set(copies.values()) == ({1} if harness.dedupes_redelivery else {2})


async def test_probe_answers_and_close_twice_is_harmless(harness: Harness):
    await harness.sink.probe()
    await harness.sink.close()
    await harness.sink.close()


@pytest.mark.parametrize("harness", WITH_OUTAGE, indirect=True)
async def test_a_destination_down_is_transient_and_the_batch_lands_once_it_is_back(harness: Harness):
    assert harness.outage is not None
    batch = events(3)
    async with harness.outage():
        with pytest.raises(TransientError) as raised:
            await harness.sink.deliver_batch(batch)
        assert not isinstance(raised.value, PermanentSinkError)
        with pytest.raises(TransientError):
            await harness.sink.probe()
    await harness.sink.probe()
    await harness.sink.deliver_batch(batch)
    got = await harness.read(3)
    assert Counter(r["event_id"] for r in got) == {e.event_id: 1 for e in batch}


@pytest.mark.parametrize("harness", REFUSING, indirect=True)
async def test_an_event_refused_for_good_is_permanent_and_names_the_rest(harness: Harness):
    assert harness.refused is not None
    good = events(3)
    with pytest.raises((PermanentSinkError, PartialDelivery)) as raised:
        await harness.sink.deliver_batch([*good, harness.refused])
    if isinstance(raised.value, PartialDelivery):
        assert raised.value.delivered == [0, 1, 2] and raised.value.refused is not None
    got = await harness.read(3)
    assert REFUSED_ID not in {r["event_id"] for r in got}
