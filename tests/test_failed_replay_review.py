"""Review findings on `hifi failed replay` progress, each against the real broker: progress never moves
backwards, a second concurrent replay of a tenant is refused, a failure in the last chunk or half way
through a chunk's tallies tallies every acknowledged event once and commits up to the first unacknowledged
one, a progress commit during an outage gives up, and reading progress costs a bounded number of round
trips however many types a tenant has."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from devtools.kafka import LocalKafka
from shared import quarantine
from shared.app import durable_producer
from shared.audit import as_tally
from shared.codec import unpack
from shared.quarantine import FailedEvents, ReplayProgress, ReplayProgressUnavailable
from shared.topics import Topics, ensure_topics
from tests.helpers import wait_for
from tests.test_failed_replay_progress import on_raw, quarantined
from tests.test_failed_review import read_all


async def accepted(bootstrap: str, topics: Topics) -> int:
    """Events the replay tallied `accepted`."""
    return sum(as_tally(unpack(value)).count for value in await read_all(bootstrap, topics.tallies))


class AckFails:
    """A real producer whose send to `topic` hands back a failed ack on the `nth` record (nothing sent)."""

    def __init__(self, producer: Any, topic: str, nth: int) -> None:
        self.producer, self.topic, self.nth, self.sent = producer, topic, nth, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.producer, name)

    async def send(self, topic: str, *args: Any, **kwargs: Any) -> Any:
        if topic == self.topic:
            self.sent += 1
            if self.sent == self.nth:
                ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                ack.set_exception(ConnectionError("injected: the broker never acknowledged it"))
                return ack
        return await self.producer.send(topic, *args, **kwargs)


class TallyFails:
    """A real producer whose `nth` tally write raises."""

    def __init__(self, producer: Any, tallies: str, nth: int) -> None:
        self.producer, self.tallies, self.nth, self.written = producer, tallies, nth, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.producer, name)

    async def send_and_wait(self, topic: str, *args: Any, **kwargs: Any) -> Any:
        if topic == self.tallies:
            self.written += 1
            if self.written == self.nth:
                raise ConnectionError("injected: the tally write failed")
        return await self.producer.send_and_wait(topic, *args, **kwargs)


async def test_from_start_never_moves_progress_backwards(kafka: Any, namespace: str) -> None:
    topics = Topics(namespace)
    await quarantined(kafka.bootstrap, topics, namespace, ["play"] * 30)
    failed = FailedEvents(kafka.bootstrap, topics, ["acme"])
    assert await failed.replay("acme", rate=0) == 30
    assert await failed.replay("acme", rate=0, limit=4, from_start=True) == 4
    assert await failed.replay("acme", "play", rate=0, limit=3, from_start=True) == 3
    assert await failed.replay("acme", rate=0) == 0  # the fault: 11, committed back to 2 + 2
    assert all(r["replayed"] for r in await failed.read("acme", limit=None))


async def test_a_second_concurrent_replay_of_a_tenant_is_refused(kafka: Any, namespace: str) -> None:
    topics = Topics(namespace)
    ids = await quarantined(kafka.bootstrap, topics, namespace, ["play"] * 30)
    failed = FailedEvents(kafka.bootstrap, topics, ["acme"])
    results = await asyncio.gather(
        failed.replay("acme", rate=200), failed.replay("acme", "play", rate=200), return_exceptions=True
    )
    # the fault: [30, 30], every event twice on hifi.raw; starting at the same instant, both may refuse; on a
    # loaded machine the second may start only after the first has ended, and then finds nothing left (0)
    assert all(isinstance(r, quarantine.ReplayAlreadyRunning) or r in (0, 30) for r in results), results
    assert sum(r for r in results if isinstance(r, int)) <= 30, results
    if 30 not in results:
        assert await failed.replay("acme", rate=0) == 30
    assert await on_raw(kafka.bootstrap, topics) == Counter(ids)


async def test_a_replay_started_while_another_runs_is_refused(kafka: Any, namespace: str) -> None:
    topics = Topics(namespace)
    ids = await quarantined(kafka.bootstrap, topics, namespace, ["play"] * 30)
    failed = FailedEvents(kafka.bootstrap, topics, ["acme"])
    first = asyncio.create_task(failed.replay("acme", rate=3))  # 10 s: longer than a join (heartbeats 3 s)

    async def first_is_sending() -> bool:
        return bool(await read_all(kafka.bootstrap, topics.raw))

    await wait_for(first_is_sending, 30, "the first replay's first event on hifi.raw")
    with pytest.raises(quarantine.ReplayAlreadyRunning, match="acme"):
        await failed.replay("acme", rate=0)  # the fault: it replays the 30 too
    assert await first == 30
    assert await on_raw(kafka.bootstrap, topics) == Counter(ids)
    assert await failed.replay("acme", rate=0) == 0  # the lock is free again once a replay ends


async def test_an_ack_failure_in_the_last_chunk_tallies_and_commits_what_was_acknowledged(
    kafka: Any, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = Topics(namespace)
    ids = await quarantined(kafka.bootstrap, topics, namespace, ["play"] * 30)  # record n: partition n % 2
    monkeypatch.setattr(quarantine, "durable_producer", lambda b: AckFails(durable_producer(b), topics.raw, nth=25))
    failed = FailedEvents(kafka.bootstrap, topics, ["acme"])
    with pytest.raises(ConnectionError):
        await failed.replay("acme", rate=0)  # one chunk of 100: the last, partial one
    (unacked,) = set(ids) - set(await on_raw(kafka.bootstrap, topics))
    assert await accepted(kafka.bootstrap, topics) == 29  # the fault: 0 tallied
    monkeypatch.setattr(quarantine, "durable_producer", durable_producer)
    # its partition is committed up to it, the other to its end: it and its partition's later ones again
    n = ids.index(unacked)
    again = ids[n::2]
    assert await failed.replay("acme", rate=0) == len(again)  # the fault: 30, nothing was committed
    assert await on_raw(kafka.bootstrap, topics) == Counter(ids) + Counter(again[1:])
    assert await accepted(kafka.bootstrap, topics) == 29 + len(again)


async def test_a_tally_failing_half_way_through_a_chunk_tallies_each_event_once(
    kafka: Any, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = Topics(namespace)
    await quarantined(kafka.bootstrap, topics, namespace, ["play"] * 30)
    flip = itertools.count()
    monkeypatch.setattr(quarantine, "bucket_of", lambda ts, s: 1000 + 10 * (next(flip) % 2))  # 2 buckets a chunk
    monkeypatch.setattr(quarantine, "REPLAY_CHUNK", 10)
    monkeypatch.setattr(quarantine, "durable_producer", lambda b: TallyFails(durable_producer(b), topics.tallies, 2))
    failed = FailedEvents(kafka.bootstrap, topics, ["acme"])
    with pytest.raises(ConnectionError):
        await failed.replay("acme", rate=0)
    assert sum((await on_raw(kafka.bootstrap, topics)).values()) == 10
    assert await accepted(kafka.bootstrap, topics) == 10  # the fault: 15, the first bucket's 5 twice
    monkeypatch.setattr(quarantine, "durable_producer", durable_producer)
    assert await failed.replay("acme", rate=0) == 20


async def test_a_progress_commit_during_a_broker_outage_gives_up(
    tmp_path: Path, namespace: str, port_base: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = LocalKafka(nodes=1, port=port_base + 15, data_root=tmp_path / "kafka")  # stopped below: not shared
    await asyncio.to_thread(broker.start)
    try:
        topics = Topics(namespace)
        await ensure_topics(broker.bootstrap, [topics.failed("acme")], 1, 1)
        monkeypatch.setattr(quarantine, "PROGRESS_TIMEOUT_S", 3.0, raising=False)
        async with ReplayProgress(broker.bootstrap, topics, "acme", topics.failed("acme")) as progress:
            await progress.commit(None, {0: 1})
            await asyncio.to_thread(broker.stop)
            started = time.monotonic()
            with pytest.raises(ReplayProgressUnavailable, match="hifi-failed-replay-acme"):
                await asyncio.wait_for(progress.commit(None, {0: 2}), 30)  # the fault: still retrying at 30 s
            assert time.monotonic() - started < 15
    finally:
        await asyncio.to_thread(broker.stop)


async def test_reading_progress_of_many_types_costs_a_few_round_trips(
    kafka: Any, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = Topics(namespace)
    types = [f"type-{n}" for n in range(500)]
    ids = await quarantined(kafka.bootstrap, topics, namespace, types)
    failed = FailedEvents(kafka.bootstrap, topics, ["acme"])
    assert await failed.replay("acme", "type-7", rate=0) == 1
    calls: Counter[str] = Counter()
    for name in ("list_consumer_groups", "list_consumer_group_offsets", "describe_consumer_groups"):
        real = getattr(AIOKafkaAdminClient, name)

        async def counted(self: Any, *args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls[_name] += 1
            return await _real(self, *args, **kwargs)

        monkeypatch.setattr(AIOKafkaAdminClient, name, counted)
    records = await failed.read("acme", limit=500)
    assert [r["event_id"] for r in records if r["replayed"]] == [ids[7]]
    assert sum(calls.values()) <= 3, calls  # the fault: 501 offset fetches, one per type and the tenant's


async def test_the_web_view_shows_records_when_progress_cannot_be_read(
    kafka: Any, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = Topics(namespace)
    await quarantined(kafka.bootstrap, topics, namespace, ["play"] * 4)
    failed = FailedEvents(kafka.bootstrap, topics, ["acme"])

    async def unavailable(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise ReplayProgressUnavailable("injected: no coordinator")

    monkeypatch.setattr(ReplayProgress, "committed", unavailable)
    view = await failed.view("acme", None, 50)
    assert [r["replayed"] for r in view["failed"]] == [None] * 4
    assert "injected: no coordinator" in view["replayed_unknown"]
    assert view["counts"] == {"play": 4}


async def test_list_says_when_a_tenant_has_no_replay_progress(kafka: Any, namespace: str) -> None:
    topics = Topics(namespace)
    await quarantined(kafka.bootstrap, topics, namespace, ["play", "pause"] * 3)
    failed = FailedEvents(kafka.bootstrap, topics, ["acme"])
    nothing = await failed.progress("acme")
    assert "no replay progress recorded" in quarantine.describe_progress(nothing)  # the fault: "none", as if 0
    assert "offsets.retention.minutes" in quarantine.describe_progress(nothing)
    assert await failed.replay("acme", "play", rate=0) == 3
    only_type = quarantine.describe_progress(await failed.progress("acme"))
    assert "no replay progress" not in only_type and "none" in only_type
    assert await failed.replay("acme", rate=0) == 3
    assert (
        quarantine.describe_progress(await failed.progress("acme"))
        == "replayed (every type) up to offset: partition 0: 3, partition 1: 3"
    )
