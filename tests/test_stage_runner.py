"""StageRunner in-process against the real broker: ownership across rebalances, produce errors.

Each runner is a real aiokafka member of a real consumer group; the faults are injected by the
handler (a sink that answers 503 for a while) or by the topic (a `max.message.bytes` too small).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from yarl import URL

from shared.codec import encode_event
from shared.errors import TransientError
from shared.event import Event
from shared.local.kafka import LocalKafka
from shared.metrics import StageMetrics
from shared.retry import Backoff
from shared.stage import Handler, Record, StageRunner, StepResult

pytestmark = pytest.mark.asyncio


async def create_topic(bootstrap: str, name: str, partitions: int, **configs: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1, topic_configs=configs)])
    finally:
        await admin.close()


async def produce_events(bootstrap: str, topic: str, count: int, devices: int = 16) -> list[str]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    ids = []
    try:
        futures = []
        for n in range(count):
            event = Event(f"e{n}", "play", 1.0, "acme", device_id=f"d{n % devices}", ingest_ts=time.time() * 1000)
            ids.append(event.event_id)
            futures.append(await producer.send(topic, encode_event(event), key=event.partition_key))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return ids


def make_runner(bootstrap: str, group: str, name: str, source: str, handler: Handler, **options: Any) -> StageRunner:
    host, port = bootstrap.split(":")
    app = SimpleNamespace(
        conf=SimpleNamespace(id=group, broker=[URL(f"kafka://{host}:{port}")], canonical_url=f"http://{name}")
    )
    return StageRunner(app, "test", handler, StageMetrics(), f"{source}.dlq", source, **options)


async def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


class FlakySink:
    """A destination that records every event it accepted, and answers 503 while `down`."""

    def __init__(self) -> None:
        self.down = False
        self.received: collections.Counter[str] = collections.Counter()

    async def handle(self, records: list[Record]) -> StepResult:
        await asyncio.sleep(0.01)  # a round trip
        if self.down:
            raise TransientError("sink answered 503")
        self.received.update(r.event.event_id for r in records)
        return StepResult()


@pytest.fixture
async def runners() -> AsyncIterator[list[StageRunner]]:
    started: list[StageRunner] = []
    yield started
    await asyncio.gather(*(r.stop() for r in started), return_exceptions=True)


async def start(runners: list[StageRunner], runner: StageRunner) -> StageRunner:
    runners.append(runner)
    await runner.start()
    return runner


async def test_scale_out_during_sink_outage_delivers_once_and_rebalances_fast(
    kafka: LocalKafka, namespace: str, runners: list[StageRunner]
) -> None:
    """Issue 14's observation: two members retry through a sink outage, a third joins mid-outage.

    The members holding batches must give them up when their partitions are revoked (not deliver them
    after the group moved on), and must not stall the rebalance for its whole timeout.
    """
    source = f"{namespace}.sink"
    await create_topic(kafka.bootstrap, source, 6)
    sink = FlakySink()
    rebalance_timeout_ms = 8_000
    options = dict(batch_max=20, backoff=Backoff(0.05, 1.0), rebalance_timeout_ms=rebalance_timeout_ms)
    group = f"{namespace}-sender"
    first = await start(runners, make_runner(kafka.bootstrap, group, "a", source, sink.handle, **options))
    second = await start(runners, make_runner(kafka.bootstrap, group, "b", source, sink.handle, **options))
    await wait_for(lambda: first.joined and second.joined and not first.assigned & second.assigned, 30, "two members")
    sink.down = True
    ids = await produce_events(kafka.bootstrap, source, 300)
    await asyncio.sleep(2.0)  # both hold a batch in their retry loop
    joining = time.monotonic()
    third = await start(runners, make_runner(kafka.bootstrap, group, "c", source, sink.handle, **options))
    await wait_for(lambda: third.joined, 30, "the third member's assignment")
    rebalance_s = time.monotonic() - joining
    await asyncio.sleep(max(0.0, rebalance_timeout_ms / 1000 + 4 - rebalance_s))  # past any eviction
    sink.down = False
    await wait_for(lambda: set(sink.received) >= set(ids), 60, "every event at the sink")
    await asyncio.sleep(3.0)  # a stale member's late copy would land here
    twice = {e: n for e, n in sink.received.items() if n > 1}
    assert not twice, f"{len(twice)} events delivered more than once: {sorted(twice)[:10]}"
    assert rebalance_s < rebalance_timeout_ms / 1000 / 2, f"the rebalance took {rebalance_s:.1f}s"


async def read_all(bootstrap: str, topic: str, expect: int, timeout: float) -> list[Any]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False, group_id=None
    )
    await consumer.start()
    out: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        while len(out) < expect and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            out.extend(m for records in batch.values() for m in records)
    finally:
        await consumer.stop()
    return out
