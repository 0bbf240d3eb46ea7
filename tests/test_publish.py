"""The batch publisher against a real broker: same partitions as Kafka's default partitioner, order
kept within a partition (also across batches that overflow), and offsets reported right."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import ProducerClosed
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.structs import RecordMetadata

from devtools.kafka import LocalKafka
from shared.app import durable_producer
from shared.publish import BatchPublisher, Output, retire
from shared.topics import ensure_topics


async def read_all(bootstrap: str, topic: str, expect: int, timeout: float = 30.0) -> list[Any]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    records: list[Any] = []
    try:
        async with asyncio.timeout(timeout):
            while len(records) < expect:
                for batch in (await consumer.getmany(timeout_ms=500)).values():
                    records.extend(batch)
    finally:
        await consumer.stop()
    return records


async def test_batch_publisher_matches_the_default_partitioner_keeps_order_and_reports_offsets(
    kafka: LocalKafka, namespace: str
) -> None:
    topic = f"{namespace}.publish"
    await ensure_topics(kafka.bootstrap, [topic], 4, 1)
    producer = durable_producer(kafka.bootstrap)
    await producer.start()
    try:
        publisher = BatchPublisher(producer)
        keys = [f"tenant:dev-{i % 37}".encode() for i in range(3000)]
        # ~2 MB per call: every partition overflows the 256 KiB batch, so one call writes several batches.
        calls = [
            [Output(topic, k, f"{n}:{i}:".encode() + b"x" * 2000) for i, k in enumerate(keys[n::3])] for n in range(3)
        ]
        published = [await publisher.publish(outputs) for outputs in calls]
        assert any(len(p.futures) > 4 for p in published), "no call overflowed a batch: the test proves less"
        acked = [await asyncio.gather(*p.futures) for p in published]
        records = await read_all(kafka.bootstrap, topic, len(keys))
    finally:
        await producer.stop()

    assert len(records) == len(keys)
    partitioner = DefaultPartitioner()
    for record in records:
        assert record.partition == partitioner(record.key, [0, 1, 2, 3], [0, 1, 2, 3])
    where = {(r.partition, r.offset): r.value for r in records}
    for outputs, result, metas in zip(calls, published, acked, strict=True):
        for index, out in enumerate(outputs):
            assert where[result.offset_of(index, metas)] == out.value
    by_partition: dict[int, list[tuple[int, int]]] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        call, seq, _ = record.value.split(b":", 2)
        by_partition.setdefault(record.partition, []).append((int(call), int(seq)))
    for order in by_partition.values():
        assert order == sorted(order), "records of one partition came out of order"


async def test_a_batch_queued_while_its_producer_closes_fails_instead_of_waiting_forever(
    kafka: LocalKafka, namespace: str
) -> None:
    """aiokafka's `stop` flushes the batches queued when it began; a `send_batch` that was waiting for the
    partition's previous batch to drain is queued after that, behind a sender already gone, and its future
    never resolves. A stage renews its producer while other batches are being published (after a record the
    broker refuses for good), so their acker waited forever: the partition stalled (a CI run, 2026-11-30).
    `retire` must fail such a batch, so its acker re-sends it with the new producer."""
    topic = f"{namespace}.retire"
    await ensure_topics(kafka.bootstrap, [topic], 1, 1)
    producer = durable_producer(kafka.bootstrap)
    await producer.start()
    publisher = BatchPublisher(producer)
    await asyncio.gather(*(await publisher.publish([Output(topic, b"k", b"warm")])).futures)  # metadata known
    # Many batches for one partition: each `send_batch` waits until the one before it drained, so some are
    # still waiting when the producer is retired.
    publishing = [asyncio.create_task(publisher.publish([Output(topic, b"k", b"x" * 200_000)])) for _ in range(30)]
    await asyncio.sleep(0)
    await retire(producer)
    outcomes: list[object] = []
    async with asyncio.timeout(20):  # before the fix a future never resolved, and this timed out
        for task in publishing:
            try:
                futures = (await task).futures
            except ProducerClosed as refused:  # refused at once: its caller re-sends with the new producer
                outcomes.append(refused)
                continue
            outcomes.extend(await asyncio.gather(*futures, return_exceptions=True))
    assert any(isinstance(o, ProducerClosed) for o in outcomes), "nothing was left behind: the race was not provoked"
    assert all(isinstance(o, ProducerClosed | RecordMetadata) for o in outcomes), outcomes
