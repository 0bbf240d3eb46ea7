"""The collector's answer under faults: each request answered from its own records' acks, never left waiting,
and bad input refused per event."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web as aiohttp_web
from aiokafka import AIOKafkaConsumer, TopicPartition

import services.collector.app as collector_app
from services.collector.app import Collector
from shared.app import durable_producer
from shared.codec import decode_event
from shared.config import HifiConfig, hash_api_key
from shared.event import partition_key_of
from shared.publish import BatchPublisher
from shared.service import ServiceContext
from shared.topics import Topics, ensure_topics

CONFIG = f"""
tenants:
  acme: {{api_keys: ["{hash_api_key("k")}"], sinks: [hook]}}
sinks:
  hook: {{type: webhook, url: "http://127.0.0.1:1/x"}}
"""
PARTITIONS = 2


class FaultyProducer:
    """A real aiokafka producer; `hold(topic, partition)` makes that partition's batches never ack
    (handed over, their future never resolves) or never be handed over (send_batch blocks)."""

    def __init__(self, producer: Any) -> None:
        self.producer = producer
        self.unacked: set[tuple[str, int]] = set()
        self.blocked: set[tuple[str, int]] = set()

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> Any:
        if (topic, partition) in self.blocked:
            await asyncio.Event().wait()  # a leaderless partition whose previous batch never drains
        future = await self.producer.send_batch(batch, topic, partition=partition)
        if (topic, partition) in self.unacked:
            return asyncio.get_running_loop().create_future()  # written, but the ack never comes
        return future

    def __getattr__(self, name: str) -> Any:
        return getattr(self.producer, name)


# Long enough for a real produce on a loaded 2-core machine (1 s failed there), short for the tests that wait it out.
PRODUCE_TIMEOUT_S = 4.0


@pytest.fixture
async def collector(kafka, namespace, settings_for, tmp_path: Path, monkeypatch) -> Any:
    monkeypatch.setattr(collector_app, "PRODUCE_TIMEOUT_S", PRODUCE_TIMEOUT_S)  # some tests wait for it: short
    config_path = tmp_path / "hifi.yaml"
    config_path.write_text(CONFIG)
    topics = Topics(namespace)
    await ensure_topics(kafka.bootstrap, [topics.raw, topics.tallies], PARTITIONS, 1)
    producer = FaultyProducer(durable_producer(kafka.bootstrap))
    await producer.start()
    ctx = ServiceContext("collector", settings_for(config_path), HifiConfig.load(config_path))
    collector = Collector(ctx)
    collector.publisher = BatchPublisher(producer)  # type: ignore[arg-type]
    collector.test_producer = producer  # type: ignore[attr-defined]
    collector.test_topics = topics  # type: ignore[attr-defined]
    yield collector
    await producer.stop()
    await collector.settled(timeout=3)  # the acks a test withheld never come


def device_on(collector: Collector, partition: int) -> str:
    """A device id whose events go to `partition` of the raw topic."""
    assert collector.publisher is not None
    for i in range(1000):
        if collector.publisher._partition(partition_key_of("acme", f"d{i}", None, ""), PARTITIONS) == partition:
            return f"d{i}"
    raise AssertionError(partition)


def event(event_id: str, device_id: str) -> dict[str, Any]:
    return {"event_id": event_id, "type": "play", "ts": 1.0, "device_id": device_id}


async def raw_events(kafka: Any, topic: str) -> list[str]:
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
        got: list[str] = []
        for _ in range(3):
            for records in (await consumer.getmany(timeout_ms=500)).values():
                got += [decode_event(r.value).event_id for r in records]
        return got
    finally:
        await consumer.stop()


async def test_an_unacked_tally_does_not_fail_requests_whose_events_were_acked(collector: Any) -> None:
    """The tallies partition never acks: the events are durable, so the request is 200, promptly."""
    collector.test_producer.unacked.update((collector.test_topics.tallies, p) for p in range(PARTITIONS))
    first = await collector.ingest("acme", [event("a1", device_on(collector, 0))], None, None)
    async with asyncio.timeout(PRODUCE_TIMEOUT_S - 1):  # answered before the timeout could answer them
        answers = await asyncio.gather(
            *(collector.ingest("acme", [event(f"b{i}", device_on(collector, i % 2))], None, None) for i in range(4))
        )
    assert first[0] == 200, first
    assert all(status == 200 for status, _ in answers), answers


async def test_a_request_is_answered_by_its_own_batches_when_another_partition_blocks(
    collector: Any, kafka: Any
) -> None:
    """Partition 0 acks, partition 1 never takes a batch: the event handed over to partition 0 is accepted
    (it will be written), the one on partition 1 is refused and was never handed over."""
    topic = collector.test_topics.raw
    collector.test_producer.blocked.add((topic, 1))
    status, body = await collector.ingest(
        "acme", [event("on-p0", device_on(collector, 0)), event("on-p1", device_on(collector, 1))], None, None
    )
    assert status == 503, body
    assert body["accepted"] == ["on-p0"], body
    assert [r["event_id"] for r in body["rejected"]] == ["on-p1"], body
    assert await raw_events(kafka, topic) == ["on-p0"]


async def test_an_unexpected_error_in_publish_answers_the_request(collector: Any) -> None:
    """A bug in the flusher must not leave the request waiting forever, nor stop later requests."""
    real = collector.publisher

    class Buggy(BatchPublisher):
        async def publish(self, *args: Any, **kwargs: Any) -> Any:
            raise AssertionError("bug")

    collector.publisher = Buggy(real.producer)
    async with asyncio.timeout(1):
        status, body = await collector.ingest("acme", [event("x1", "d1")], None, None)
    assert status >= 500 and body["rejected"][0]["event_id"] == "x1", body
    collector.publisher = real
    async with asyncio.timeout(2 * PRODUCE_TIMEOUT_S):
        status, body = await collector.ingest("acme", [event("x2", "d1")], None, None)
    assert status == 200, body


async def test_a_lone_surrogate_refuses_its_event_not_the_request(collector: Any, kafka: Any) -> None:
    """JSON may carry "\\ud800", which no UTF-8 encoder takes: that event is refused, the others go on."""
    items = json.loads(
        '[{"event_id": "bad", "type": "play", "ts": 1, "payload": {"t": "\\ud800"}},'
        ' {"event_id": "b\\udc00d", "type": "play", "ts": 1},'
        ' {"event_id": "good", "type": "play", "ts": 1},'
        ' {"event_id": "x\\udc01", "type": "play", "ts": 1, "\\ud801": 1}]'
    )
    status, body = await collector.ingest("acme", items, None, None)
    assert status == 200, body
    assert body["accepted"] == ["good"], body
    assert [(r["index"], r["reason"]) for r in body["rejected"]] == [
        (0, "invalid_string"),
        (1, "invalid_string"),
        (3, "unknown_field"),
    ]
    json.dumps(body, ensure_ascii=False).encode()  # the answer itself can be sent
    assert await raw_events(kafka, collector.test_topics.raw) == ["good"]


async def test_a_non_utf8_user_agent_does_not_fail_the_request(collector: Any, kafka: Any) -> None:
    """aiohttp decodes header bytes with surrogateescape ("Ger\\udce4t"): that User-Agent went into every event's
    context and failed the encoding, a 500 for the whole request on every retry."""
    app = aiohttp_web.Application()

    async def post(request: aiohttp_web.Request) -> aiohttp_web.Response:
        status, answer, headers = await collector.respond(request, 1 << 20)
        return aiohttp_web.json_response(answer, status=status, headers=headers)

    app.router.add_post("/v1/events", post)
    runner = aiohttp_web.AppRunner(app)
    await runner.setup()
    site = aiohttp_web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        body = json.dumps([event("ua1", "d1")]).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/events HTTP/1.1\r\nHost: x\r\nX-Api-Key: k\r\nUser-Agent: Ger\xe4t/1.0\r\n"
            b"Content-Type: application/json\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    finally:
        await runner.cleanup()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0], answer
    assert json.loads(payload)["accepted"] == ["ua1"], payload
    records = await raw_events(kafka, collector.test_topics.raw)
    assert records == ["ua1"], records


async def test_an_event_that_cannot_be_encoded_is_refused_alone(collector: Any, kafka: Any) -> None:
    """A value validate() never saw (the User-Agent put into the context) that no encoder takes refuses only
    the events it went into: the one carrying its own user_agent is written."""
    own = {**event("own", "d1"), "context": {"user_agent": "app/1"}}
    status, body = await collector.ingest("acme", [event("borrowed", "d1"), own], "Ger\udce4t", None)
    assert status == 200, body
    assert body["accepted"] == ["own"], body
    assert [(r["index"], r["reason"]) for r in body["rejected"]] == [(0, "unencodable")]
    assert await raw_events(kafka, collector.test_topics.raw) == ["own"]
