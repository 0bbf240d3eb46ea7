"""`hifi failed replay` keeps its progress in Kafka: a second run re-submits nothing, an interrupted run
resumes after what the broker acknowledged, a `--type` replay and a later full replay each send a record
once, `--limit` keeps the rest for later, and `--from-start` re-submits everything on purpose."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from shared import quarantine
from shared.app import durable_producer
from shared.codec import pack, unpack
from shared.event import Event, now_ms
from shared.quarantine import FailedEvents
from shared.schemas import client_view
from shared.topics import Topics, ensure_topics
from tests.test_failed_review import FailsOnSend, read_all


async def quarantined(bootstrap: str, topics: Topics, namespace: str, types: list[str]) -> list[str]:
    """Failed records of tenant acme on a 2-partition topic, one per entry of `types`; their event ids."""
    await ensure_topics(bootstrap, [topics.failed("acme")], 2, 1)
    await ensure_topics(bootstrap, [topics.raw, topics.tallies], 1, 1)
    producer = durable_producer(bootstrap)
    await producer.start()
    ids = []
    try:
        for n, event_type in enumerate(types):
            event = Event(f"{namespace}-{n}", event_type, 1.0, "acme", device_id=f"d-{n % 5}", ingest_ts=now_ms())
            record = {"tenant": "acme", "type": event_type, "event_id": event.event_id, "event": client_view(event)}
            await producer.send_and_wait(topics.failed("acme"), pack({**record, "claim": f"c:0:{n}"}), partition=n % 2)
            ids.append(event.event_id)
    finally:
        await producer.stop()
    return ids


async def on_raw(bootstrap: str, topics: Topics) -> Counter[str]:
    """Replayed events on hifi.raw per event id."""
    return Counter(unpack(value)["event_id"] for value in await read_all(bootstrap, topics.raw))


async def test_a_second_replay_resubmits_nothing(kafka: Any, namespace: str) -> None:
    topics = Topics(namespace)
    ids = await quarantined(kafka.bootstrap, topics, namespace, ["play"] * 30)
    failed = FailedEvents(kafka.bootstrap, topics, ["acme"])
    assert await failed.replay("acme", rate=0) == 30
    assert await failed.replay("acme", rate=0) == 0  # the fault: 30 again, every event re-submitted
    assert await on_raw(kafka.bootstrap, topics) == Counter(ids)
    assert all(r["replayed"] for r in await failed.read("acme", limit=None))


async def test_an_interrupted_replay_resumes_after_what_was_acknowledged(
    kafka: Any, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = Topics(namespace)
    ids = await quarantined(kafka.bootstrap, topics, namespace, ["play"] * 30)
    monkeypatch.setattr(quarantine, "REPLAY_CHUNK", 10)
    monkeypatch.setattr(
        quarantine, "durable_producer", lambda bootstrap: FailsOnSend(durable_producer(bootstrap), topics.raw, nth=25)
    )
    failed = FailedEvents(kafka.bootstrap, topics, ["acme"])
    with pytest.raises(ConnectionError):
        await failed.replay("acme", rate=0)
    assert sum((await on_raw(kafka.bootstrap, topics)).values()) == 24
    monkeypatch.setattr(quarantine, "durable_producer", durable_producer)
    assert await failed.replay("acme", rate=0) == 6  # the fault: 30, the 24 acknowledged ones again
    assert await on_raw(kafka.bootstrap, topics) == Counter(ids)


async def test_a_type_replay_then_a_full_replay_send_each_record_once(kafka: Any, namespace: str) -> None:
    topics = Topics(namespace)
    types = ["play", "pause", "play"] * 10
    ids = await quarantined(kafka.bootstrap, topics, namespace, types)
    failed = FailedEvents(kafka.bootstrap, topics, ["acme"])
    assert await failed.replay("acme", "play", rate=0) == 20
    shown = await failed.read("acme", limit=None)
    assert {r["type"] for r in shown if r["replayed"]} == {"play"} and sum(r["replayed"] for r in shown) == 20
    assert await failed.replay("acme", rate=0) == 10  # the fault: 30, the plays again
    assert await failed.replay("acme", "play", rate=0) == 0
    assert await failed.replay("acme", "pause", rate=0) == 0  # the tenant-wide progress covers every type
    assert await on_raw(kafka.bootstrap, topics) == Counter(ids)


async def test_a_limited_replay_keeps_the_rest_and_from_start_resubmits_everything(kafka: Any, namespace: str) -> None:
    topics = Topics(namespace)
    ids = await quarantined(kafka.bootstrap, topics, namespace, ["play"] * 30)
    failed = FailedEvents(kafka.bootstrap, topics, ["acme"])
    assert await failed.replay("acme", rate=0, limit=7) == 7
    assert await failed.replay("acme", rate=0) == 23
    assert await on_raw(kafka.bootstrap, topics) == Counter(ids)
    assert await failed.replay("acme", rate=0, from_start=True) == 30
    assert await on_raw(kafka.bootstrap, topics) == Counter({event_id: 2 for event_id in ids})
    assert await failed.replay("acme", rate=0) == 0
