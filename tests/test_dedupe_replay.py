"""Replaying the deduplicator's dead letters delivers them, once.

The deduplicator claims an event id for the message that first presented it. When that message is
dead-lettered after its claim (here: a handler failure after the claim; in production a bug, or an
output the broker refuses), the claim stays with the original offset, and its replay is a different
message. The replay must still pass, and a second replay of the same letter, or a copy of an event
that was delivered, must still be dropped.

Runs the real stage runner's batch path (decode, handle, split on failure, dead-letter, settle) and
the real `hifi dlq replay` code against the test broker, on both dedupe backends.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from services.deduplicator.app import DedupeWindow
from shared.alerts import Alerter
from shared.app import durable_producer
from shared.codec import decode_event, encode_event
from shared.dlq import DeadLetterQueues
from shared.event import Event, now_ms
from shared.keywindow import KeyWindow, RocksKeyWindow
from shared.metrics import StageMetrics
from shared.publish import BatchPublisher
from shared.redis_window import RedisKeyWindow
from shared.stage import StageRunner, StepResult
from shared.topics import Topics

PARTITIONS = 4


class FailsAfterClaim:
    """Wraps the real handler: raises after the window claimed the poisoned event's id."""

    def __init__(self, handler: Any, poisoned: set[str]) -> None:
        self.handler = handler
        self.poisoned = poisoned

    async def __call__(self, records: list[Any]) -> StepResult:
        result = await self.handler(records)
        if any(r.event.event_id in self.poisoned and r.outcome == "out" for r in records):
            raise RuntimeError("injected failure after the claim")
        return result


def event(namespace: str, n: int) -> Event:
    now = now_ms()
    return Event(
        event_id=f"{namespace}-{n}",
        type="play",
        ts=now,
        tenant="acme",
        device_id=f"dev-{n % 3}",
        ingest_ts=now,
    )


async def read(bootstrap: str, topic: str, start: dict[int, int] | None = None, expect: int = 1) -> list[Any]:
    """Records of every partition of `topic` from `start` (default: the beginning), at least `expect`."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, (start or {}).get(tp.partition, 0))
        records: list[ConsumerRecord] = []  # type: ignore[type-arg]
        for _ in range(40):
            batch = await consumer.getmany(timeout_ms=250)
            for part in batch.values():
                records.extend(part)
            if len(records) >= expect and not batch:
                break
        return records
    finally:
        await consumer.stop()


async def ends(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        return {tp.partition: offset for tp, offset in (await consumer.end_offsets(tps)).items()}
    finally:
        await consumer.stop()


def make_window(backend: str, namespace: str, bootstrap: str, redis_url: str, tmp_path: Path) -> KeyWindow:
    if backend == "redis":
        return RedisKeyWindow(redis_url, f"hifi:{namespace}:dedupe-window:", 600.0)
    return RocksKeyWindow(
        "dedupe-window",
        tmp_path / "dedupe-window",
        f"{namespace}.dedupe-window.changelog",
        bootstrap,
        600.0,
        PARTITIONS,
        f"{namespace}-dedupe",
    )


@pytest.mark.parametrize("backend", ["rocksdb", "redis"])
async def test_a_dead_lettered_event_is_delivered_by_its_replay_and_only_once(
    backend, kafka, redis_server, namespace, tmp_path
):
    bootstrap = kafka.bootstrap
    topics = Topics(namespace)
    for topic in (topics.enriched, topics.unique, topics.dlq("deduplicator")):
        await kafka_create(bootstrap, topic)
    window = make_window(backend, namespace, bootstrap, redis_server.url, tmp_path)
    if isinstance(window, RocksKeyWindow):
        await kafka_create(bootstrap, window.changelog_topic)
        await window.assign(list(range(PARTITIONS)))
    metrics = StageMetrics()
    dedupe = DedupeWindow(window, metrics, topics.unique, Alerter("deduplicator"))
    events = [event(namespace, n) for n in range(6)]
    poisoned = events[2].event_id
    broken = FailsAfterClaim(dedupe.handle, {poisoned})
    runner = in_process_runner(bootstrap, topics, broken, window)
    producer = durable_producer(bootstrap)
    await producer.start()
    runner.publisher = BatchPublisher(producer)
    try:
        for e in events:
            await producer.send_and_wait(topics.enriched, encode_event(e), key=e.partition_key)

        # The deduplicator handles the batch: the poisoned event claims its id, then fails, and is
        # dead-lettered alone (the runner splits the batch); the other five pass.
        await run_batch(runner, await read(bootstrap, topics.enriched, expect=6))
        unique = await read(bootstrap, topics.unique, expect=5)
        assert sorted(decode_event(r.value).event_id for r in unique) == sorted(
            e.event_id for e in events if e.event_id != poisoned
        )
        letters = await read(bootstrap, topics.dlq("deduplicator"), expect=1)
        assert len(letters) == 1

        # The cause is fixed; the operator replays the dead letters with `hifi dlq replay deduplicator`.
        runner.handler = dedupe.handle
        before = await ends(bootstrap, topics.enriched)
        assert await DeadLetterQueues(bootstrap, topics, []).replay("deduplicator", rate=0) == 1
        replayed = await read(bootstrap, topics.enriched, start=before, expect=1)
        assert [decode_event(r.value).event_id for r in replayed] == [poisoned]
        unique_end = await ends(bootstrap, topics.unique)
        await run_batch(runner, replayed)
        passed = await read(bootstrap, topics.unique, start=unique_end, expect=1)
        assert [decode_event(r.value).event_id for r in passed] == [poisoned], "the replay was dropped as a copy"

        # A replay interrupted before its commit sends the letter again, and a client retries a
        # delivered event: both are copies of delivered events and are dropped.
        again = replayed[0]
        await producer.send_and_wait(topics.enriched, again.value, key=again.key, headers=list(again.headers))
        await producer.send_and_wait(topics.enriched, encode_event(events[0]), key=events[0].partition_key)
        copies = await read(bootstrap, topics.enriched, start=await_after(before, replayed), expect=2)
        assert len(copies) == 2
        unique_end = await ends(bootstrap, topics.unique)
        await run_batch(runner, copies)
        assert await read(bootstrap, topics.unique, start=unique_end, expect=0) == []
        assert sum(s.value for s in metrics.duplicates.collect()[0].samples if s.name.endswith("_total")) == 2

        # The replayed message itself read again (a crash before its commit) passes again.
        unique_end = await ends(bootstrap, topics.unique)
        await run_batch(runner, replayed)
        again_passed = await read(bootstrap, topics.unique, start=unique_end, expect=1)
        assert [decode_event(r.value).event_id for r in again_passed] == [poisoned]
    finally:
        await producer.stop()
        if isinstance(window, RocksKeyWindow):
            window.revoke(list(range(PARTITIONS)))
        else:
            await window.close()


def await_after(before: dict[int, int], records: list[Any]) -> dict[int, int]:
    """Offsets just after `records`, per partition (the rest from `before`)."""
    out = dict(before)
    for r in records:
        out[r.partition] = max(out.get(r.partition, 0), r.offset + 1)
    return out


async def kafka_create(bootstrap: str, topic: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    finally:
        await admin.close()


def in_process_runner(bootstrap: str, topics: Topics, handler: Any, window: KeyWindow) -> StageRunner:
    """The deduplicator's runner without its Faust app: only the batch path (process, settle) is used."""
    host, port = bootstrap.split(":")
    app = SimpleNamespace(
        conf=SimpleNamespace(
            id=f"{topics.namespace}-hifi-deduplicator",
            broker=[SimpleNamespace(host=host, port=int(port))],
            canonical_url="http://127.0.0.1:1",
        )
    )
    return StageRunner(
        app,
        "deduplicator",
        handler,
        StageMetrics(),
        topics.dlq("deduplicator"),
        source=topics.enriched,
        states=[window],
    )


async def run_batch(runner: StageRunner, messages: list[Any]) -> None:
    """One batch through the stage's commit sequence up to durability (no group, nothing committed)."""
    flight = await runner.process_batch(messages)
    await asyncio.wait_for(runner.flights.settle(flight), 30.0)


@pytest.mark.parametrize("backend", ["rocksdb", "redis"])
async def test_the_replay_of_an_output_the_broker_refused_passes_the_deduplicator(
    backend, kafka, redis_server, namespace, tmp_path
):
    """The deduplicator's output is over its topic's max.message.bytes: the runner dead-letters it after
    the claim. The letter must name the input (enriched:partition:offset), or the replay's
    `hifi-replay-of` matches no claim and the replayed copy is dropped as the event's own duplicate."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    bootstrap = kafka.bootstrap
    topics = Topics(namespace)
    for topic in (topics.enriched, topics.dlq("deduplicator")):
        await kafka_create(bootstrap, topic)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topics.unique, PARTITIONS, 1, topic_configs={"max.message.bytes": "4000"})])
    finally:
        await admin.close()
    window = make_window(backend, namespace, bootstrap, redis_server.url, tmp_path)
    if isinstance(window, RocksKeyWindow):
        await kafka_create(bootstrap, window.changelog_topic)
        await window.assign(list(range(PARTITIONS)))
    dedupe = DedupeWindow(window, StageMetrics(), topics.unique, Alerter("deduplicator"))
    big = event(namespace, 0)
    big.payload = {"blob": "x" * 6000}
    runner = in_process_runner(bootstrap, topics, dedupe.handle, window)
    producer = durable_producer(bootstrap)
    await producer.start()
    runner.publisher = BatchPublisher(producer)
    runner.producer = producer
    try:
        await producer.send_and_wait(topics.enriched, encode_event(big), key=big.partition_key)
        await run_batch(runner, await read(bootstrap, topics.enriched, expect=1))
        assert len(await read(bootstrap, topics.dlq("deduplicator"), expect=1)) == 1
        before = await ends(bootstrap, topics.enriched)
        assert await DeadLetterQueues(bootstrap, topics, []).replay("deduplicator", rate=0) == 1
        replayed = await read(bootstrap, topics.enriched, start=before, expect=1)
        assert [decode_event(r.value).event_id for r in replayed] == [big.event_id]
        flight = await runner.process_batch(replayed)  # what the deduplicator passes on (still too large)
        passed = [decode_event(o.value).event_id for o in flight.result.outputs if o.topic == topics.unique]
        assert passed == [big.event_id], "the replay was dropped as a copy of its own event"
        await asyncio.wait_for(runner.flights.settle(flight), 30.0)
    finally:
        if runner.producer is not producer and runner.producer is not None:
            await runner.producer.stop()  # renewed after the refusal
        await producer.stop()
        if isinstance(window, RocksKeyWindow):
            window.revoke(list(range(PARTITIONS)))
        else:
            await window.close()
