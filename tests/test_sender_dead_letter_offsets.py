"""Issue 14, final review: a transactional Kafka sink's transaction commits the sender group's offset, so it
must never commit past a dead letter that is not durable yet (held across the batch's retries, or handed to
the runner and not yet acknowledged): a kill then loses the event, in neither the sink nor the DLQ."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from services.sender.app import build_sender
from services.sender.delivery import SinkDelivery
from services.sender.kafka_sink import KafkaSink
from services.sender.sinks import Source
from services.sender.webhook import WebhookSink
from shared.app import durable_producer
from shared.codec import encode_event
from shared.config import HifiConfig, Settings, SinkConfig, hash_api_key
from shared.event import Event
from shared.publish import BatchPublisher
from shared.service import ServiceContext
from shared.stage import Record, StageRunner
from tests.test_sink_exactly_once import (
    RuledSink,
    committed_offset,
    delivery_for,
    events,
    handle_like_runner,
    make_source_topic,
    make_topic,
    read_committed,
    record_of,
)


def padded(n: int, big: set[int]) -> list[Event]:
    """Events; those in `big` are over the sink topic's max.message.bytes (20,000)."""
    return [
        Event(f"e{i}", "play", 1.0, "acme", {"i": i, "pad": "x" * (30_000 if i in big else 10)}, device_id=f"d{i}")
        for i in range(n)
    ]


async def continue_from_the_group(
    bootstrap: str, redis_url: str, namespace: str, group: str, src: str, records: list[Record]
) -> list[int]:
    """A fresh sender after a kill: it starts at the group's committed offset; its dead letters are written."""
    sink = KafkaSink(SinkConfig("m", "kafka", {"topic": f"{namespace}.mirror"}, timeout_s=5), bootstrap, group)
    await sink.start()
    delivery = delivery_for(sink, redis_url, namespace)
    start = await committed_offset(bootstrap, group, TopicPartition(src, 0))
    try:
        rest = [record_of(r.event, src, 0, r.message.offset) for r in records if r.message.offset >= start]
        result = await handle_like_runner(delivery, rest, tries=10) if rest else None
    finally:
        await sink.close()
    return [letter.message.offset for letter in result.dead] if result is not None else []


async def sink_with_e3_too_large(
    kafka: Any, redis_server: Any, namespace: str, out: str, src: str, group: str
) -> tuple[list[Any], KafkaSink, Any]:
    """Ten records of source partition 0, e3 over the sink topic's max.message.bytes; a started transactional
    Kafka sink and its SinkDelivery."""
    await make_source_topic(kafka.bootstrap, src)
    await make_topic(kafka.bootstrap, out, {"max.message.bytes": "20000"})
    records = [record_of(e, src, 0, i) for i, e in enumerate(padded(10, big={3}))]
    sink = KafkaSink(SinkConfig("m", "kafka", {"topic": out}, timeout_s=5), kafka.bootstrap, group)
    await sink.start()
    return records, sink, delivery_for(sink, redis_server.url, namespace)


async def test_kafka_sink_next_batch_never_commits_past_a_dead_letter_the_runner_has_not_written(
    kafka, namespace, redis_server
):
    """Batch 1 dead-letters e3 (too large for the sink topic); the runner pipelines, so batch 2 is delivered
    before batch 1's dead letter is acknowledged. Killed then: e3 must still reach the DLQ or the sink."""
    out, src, group = f"{namespace}.mirror", f"{namespace}.src", f"{namespace}-sender"
    records, sink, delivery = await sink_with_e3_too_large(kafka, redis_server, namespace, out, src, group)
    try:
        first = await handle_like_runner(delivery, records[:5], tries=10)
        assert [letter.message.offset for letter in first.dead] == [3]
        await handle_like_runner(delivery, records[5:], tries=10)
        # killed here: batch 1's dead letter was never acknowledged by the broker
    finally:
        await sink.close()
    assert await committed_offset(kafka.bootstrap, group, TopicPartition(src, 0)) <= 3
    dead = await continue_from_the_group(kafka.bootstrap, redis_server.url, namespace, group, src, records)
    got = Counter(r["event_id"] for r in await read_committed(kafka.bootstrap, out, 9))
    assert dead == [3], dead
    assert got == Counter({f"e{i}": 1 for i in range(10) if i != 3}), got


async def test_kafka_sink_commits_past_a_dead_letter_once_the_runner_wrote_it(kafka, namespace, redis_server):
    """The cap lifts once the runner's durable point (`StageRunner.done`) passes the dead letter's batch."""
    out, src, group = f"{namespace}.mirror", f"{namespace}.src", f"{namespace}-sender"
    records, sink, delivery = await sink_with_e3_too_large(kafka, redis_server, namespace, out, src, group)
    durable: dict[TopicPartition, int] = {}
    delivery.durable_offset = durable.get
    try:
        await handle_like_runner(delivery, records[:5], tries=10)
        durable[TopicPartition(src, 0)] = 5  # the runner's acker: batch 1, with e3's dead letter, is durable
        await handle_like_runner(delivery, records[5:], tries=10)
    finally:
        await sink.close()
    assert await committed_offset(kafka.bootstrap, group, TopicPartition(src, 0)) == 10


class PoisonAndFlaky(RuledSink):
    """e0 crashes the sink (503) whenever it is in a request; e7 fails with 503 until e0 was sent alone twice,
    then once with 429 (a throttle that ends the isolation round while e0's dead letter is held)."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.poison_alone = 0
        self.throttled = False

    async def _handle(self, request: web.Request) -> web.Response:
        ids = [e["event_id"] for e in (await request.json())["events"]]
        if ids == ["e0"]:
            self.poison_alone += 1
        if "e7" in ids and not self.throttled:
            if self.poison_alone >= 2:
                self.throttled = True
                return web.json_response({"error": "slow down"}, status=429, headers={"Retry-After": "0"})
            return web.json_response({"error": "flaky"}, status=503)
        self.poisoned = {"e0"}
        return await super()._handle(request)


class CommitOffsets(WebhookSink):
    """A real webhook sink that records where each accepted request says a successor may start."""

    def __init__(self, config: SinkConfig) -> None:
        super().__init__(config)
        self.accepted: list[int] = []

    async def deliver_batch(self, events: list[Event], source: Source | None = None) -> None:
        await super().deliver_batch(events, source)
        assert source is not None
        self.accepted.append(max(source.offsets) + 1 if source.commit_offset is None else source.commit_offset)


async def test_retry_never_commits_past_a_held_dead_letter(port_base, redis_server, namespace):
    """e0 is dead-lettered mid-round and held; a 429 ends the round with e7 undelivered; the batch's retry
    delivers e7. No accepted request may say a successor starts past e0: its letter is not written yet."""
    ruled = PoisonAndFlaky(port_base + 33)
    await ruled.start()
    config = SinkConfig(
        "hook", "webhook", {"url": f"http://127.0.0.1:{ruled.port}/hook"}, timeout_s=2, max_attempts_per_event=2
    )
    sink = CommitOffsets(config)
    await sink.start()
    delivery = delivery_for(sink, redis_server.url, namespace)
    try:
        result = await handle_like_runner(delivery, [record_of(e, "src", 0, i) for i, e in enumerate(events(8))])
    finally:
        await sink.close()
        await ruled.stop()
    assert ruled.throttled, "the 429 never came: the scenario did not hold a dead letter across a retry"
    assert [letter.message.offset for letter in result.dead] == [0]
    assert Counter(ruled.received) == Counter({f"e{i}": 1 for i in range(1, 8)})
    assert max(sink.accepted) <= 0, sink.accepted


# -- review of issue 14, finding 3: dead letters the runner makes itself --------------------------------


@contextlib.asynccontextmanager
async def built_sender(
    bootstrap: str, redis_url: str, namespace: str, data_dir: Path
) -> AsyncIterator[tuple[SinkDelivery, StageRunner, str, str]]:
    """The sender as `build` wires it (a transactional Kafka sink), driven through the runner's batch path
    with no group and no acker: a batch's dead letters are produced, never acknowledged unless settled."""
    config = HifiConfig.parse(
        {
            "tenants": {"acme": {"api_keys": [hash_api_key("k")]}},
            "dedupe": {"backend": "redis"},
            "sinks": {"m": {"type": "kafka", "topic": f"{namespace}.mirror", "timeout_s": 5}},
        }
    )
    settings = Settings(broker=bootstrap, redis_url=redis_url, namespace=namespace, data_dir=str(data_dir))
    ctx = ServiceContext("sender", settings, config, sink="m")
    _, delivery, runner = build_sender(ctx)
    src, group = ctx.topics.sink("m"), str(ctx.app.conf.id)
    await make_source_topic(bootstrap, src)
    await make_topic(bootstrap, f"{namespace}.mirror", {"max.message.bytes": "20000"})
    await make_topic(bootstrap, ctx.topics.dlq("sender.m"))
    producer = durable_producer(bootstrap)
    await producer.start()
    runner.producer, runner.publisher = producer, BatchPublisher(producer)
    await delivery.sink.start()
    try:
        yield delivery, runner, src, group
    finally:
        await delivery.sink.close()
        await producer.stop()
        await delivery.ledger.close()


def messages_of(src: str, undecodable: set[int]) -> list[ConsumerRecord]:  # type: ignore[type-arg]
    def value(i: int) -> bytes:
        return b"\xc1 not msgpack" if i in undecodable else encode_event(events(10)[i])

    return [ConsumerRecord(src, 0, i, 0, 0, None, value(i), None, 0, 0, []) for i in range(10)]


def fail_unexpectedly_on(sink: Any, event_id: str) -> None:
    """A bug in the sink for one event (not a sink error): the runner isolates it one at a time."""
    deliver = sink.deliver_batch

    async def deliver_batch(batch: list[Event], source: Source | None = None) -> None:
        if any(e.event_id == event_id for e in batch):
            raise RuntimeError(f"injected: a bug on {event_id}")
        await deliver(batch, source)

    sink.deliver_batch = deliver_batch


@pytest.mark.parametrize("fault", ["undecodable", "unexpected"])
async def test_kafka_sink_never_commits_past_a_dead_letter_the_runner_made_itself(
    kafka, namespace, redis_server, tmp_path, fault
):
    """Offset 3 is dead-lettered by the runner (undecodable bytes, or a handler bug isolated one at a time),
    not by the handler; its letter is produced but never acknowledged (the acker is stopped, then a kill).
    No transaction may commit the source offset past 3, or the event is in neither the sink nor the DLQ."""
    async with built_sender(kafka.bootstrap, redis_server.url, namespace, tmp_path) as (delivery, runner, src, group):
        if fault == "unexpected":
            fail_unexpectedly_on(delivery.sink, "e3")
        messages = messages_of(src, undecodable={3} if fault == "undecodable" else set())
        first = await runner.process_batch(messages[:5])
        assert [letter.message.offset for letter in first.result.dead] == [3]
        await runner.process_batch(messages[5:])
    assert await committed_offset(kafka.bootstrap, group, TopicPartition(src, 0)) <= 3


async def test_kafka_sink_commits_past_a_dead_letter_once_the_built_runner_made_it_durable(
    kafka, namespace, redis_server, tmp_path
):
    """`build` hands the runner's durable point to the delivery: once the acker settled the batch holding the
    letter, the next transaction commits past it. Without that wiring the group stays at the letter forever."""
    async with built_sender(kafka.bootstrap, redis_server.url, namespace, tmp_path) as (_, runner, src, group):
        messages = messages_of(src, undecodable=set())
        messages[3] = ConsumerRecord(src, 0, 3, 0, 0, None, encode_event(padded(4, big={3})[3]), None, 0, 0, [])
        first = await runner.process_batch(messages[:5])  # e3 is over the sink topic's limit: the handler's letter
        assert [letter.message.offset for letter in first.result.dead] == [3]
        assert await asyncio.wait_for(runner.flights.settle(first), 30.0)
        runner.done.update(first.next_offsets)  # what the acker does once the batch is durable
        await runner.process_batch(messages[5:])
    assert await committed_offset(kafka.bootstrap, group, TopicPartition(src, 0)) == 10
