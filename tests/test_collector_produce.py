"""The collector hands a request's records to the broker together, and answers only once each is acked."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from services.collector.app import Collector
from shared.app import durable_producer
from shared.codec import decode_event
from shared.config import HifiConfig, hash_api_key
from shared.publish import BatchPublisher
from shared.service import ServiceContext
from shared.topics import Topics, ensure_topics

CONFIG = f"""
tenants:
  acme: {{api_keys: ["{hash_api_key("k")}"], sinks: [hook]}}
sinks:
  hook: {{type: webhook, url: "http://127.0.0.1:1/x"}}
"""


class CountingProducer:
    """A real aiokafka producer that counts how the records were handed to it."""

    def __init__(self, producer: Any) -> None:
        self.producer = producer
        self.sends = 0
        self.batches = 0

    async def send(self, *args: Any, **kwargs: Any) -> Any:
        self.sends += 1
        return await self.producer.send(*args, **kwargs)

    async def send_batch(self, *args: Any, **kwargs: Any) -> Any:
        self.batches += 1
        return await self.producer.send_batch(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.producer, name)


class FaustStyle:
    """Faust's `producer.send(topic, key, value, partition, timestamp, headers)` over the same producer."""

    def __init__(self, producer: CountingProducer) -> None:
        self.producer = producer

    async def send(self, topic: str, key: Any, value: Any, partition: Any, timestamp: Any, headers: Any) -> Any:
        return await self.producer.send(topic, value, key=key, partition=partition)


async def test_a_request_is_produced_as_one_batch_per_partition_and_acked_before_the_answer(
    kafka, namespace, settings_for, tmp_path: Path
) -> None:
    config_path = tmp_path / "hifi.yaml"
    config_path.write_text(CONFIG)
    settings = settings_for(config_path)
    topics = Topics(namespace)
    await ensure_topics(kafka.bootstrap, [topics.raw, topics.tallies], 4, 1)
    producer = CountingProducer(durable_producer(kafka.bootstrap))
    await producer.start()
    ctx = ServiceContext("collector", settings, HifiConfig.load(config_path))
    ctx.app = SimpleNamespace(producer=FaustStyle(producer))  # what the collector used before it batched
    collector = Collector(ctx)
    collector.publisher = BatchPublisher(producer)  # type: ignore[assignment]
    items = [{"event_id": f"e{i}", "type": "play", "ts": 1.0, "device_id": f"d{i % 200}"} for i in range(200)]
    try:
        status, body = await collector.ingest("acme", items, "ua/1", "203.0.113.9")
    finally:
        await producer.stop()
    assert status == 200 and len(body["accepted"]) == 200, body
    # 4 partitions: at most 4 record batches for the events and 1 for the tally, never a send per record.
    assert producer.sends == 0 and producer.batches <= 5, (producer.sends, producer.batches)
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        tps = [TopicPartition(topics.raw, p) for p in range(4)]
        consumer.assign(tps)
        got: dict[str, Any] = {}
        while len(got) < 200:
            for records in (await consumer.getmany(timeout_ms=2000)).values():
                for record in records:
                    event = decode_event(record.value)
                    got[event.event_id] = (event, record.partition, record.offset, record.key)
    finally:
        await consumer.stop()
    assert sorted(got) == sorted(body["accepted"])
    for event, _partition, _offset, key in got.values():
        assert key == event.partition_key and event.context == {"user_agent": "ua/1", "ip": "203.0.113.9"}
    # A device's events share a partition, in the order they were sent.
    by_device: dict[str, list[tuple[int, int]]] = {}
    for event_id in body["accepted"]:
        event, partition, offset, _ = got[event_id]
        by_device.setdefault(event.device_id, []).append((partition, offset))
    for places in by_device.values():
        assert len({p for p, _ in places}) == 1 and places == sorted(places)


async def test_concurrent_requests_share_record_batches(kafka, namespace, settings_for, tmp_path: Path) -> None:
    """40 requests at once: their records share batches (one in flight per partition, the rest queue and
    go together), not 4 batches per request each waiting a round trip behind the last."""
    import asyncio

    config_path = tmp_path / "hifi.yaml"
    config_path.write_text(CONFIG)
    topics = Topics(namespace)
    await ensure_topics(kafka.bootstrap, [topics.raw, topics.tallies], 4, 1)
    producer = CountingProducer(durable_producer(kafka.bootstrap))
    await producer.start()
    ctx = ServiceContext("collector", settings_for(config_path), HifiConfig.load(config_path))
    ctx.app = SimpleNamespace(producer=FaustStyle(producer))
    collector = Collector(ctx)
    collector.publisher = BatchPublisher(producer)  # type: ignore[assignment]

    def request(r: int) -> list[dict[str, Any]]:
        return [
            {"event_id": f"r{r}-{i}", "type": "play", "ts": 1.0, "device_id": f"d{(r * 20 + i) % 200}"}
            for i in range(20)
        ]

    try:
        answers = await asyncio.gather(*(collector.ingest("acme", request(r), None, None) for r in range(40)))
    finally:
        await producer.stop()
    assert all(status == 200 and len(body["accepted"]) == 20 for status, body in answers), answers
    # Per request: 4 event batches and a tally batch would be 200.
    assert producer.sends == 0 and producer.batches <= 60, (producer.sends, producer.batches)
