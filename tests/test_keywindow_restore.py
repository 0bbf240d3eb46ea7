"""RocksDB key windows across rebalances: restore outside the rebalance callback, checkpoints that
cover only what the store applied (issue 14, items 2 and 3). Real broker, real RocksDB."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError

from devtools.kafka import LocalKafka
from shared.codec import encode_event, pack
from shared.event import Event
from shared.keywindow import RocksKeyWindow
from shared.metrics import StageMetrics
from shared.publish import Output
from shared.stage import Record, StageRunner, StepResult
from shared.topics import ensure_topics
from tests.helpers import wait_for


def _anchor(partition: int) -> Any:
    return SimpleNamespace(partition=partition)


async def _publish(producer: AIOKafkaProducer, outputs: list[Output]) -> list[tuple[int, int]]:
    """Send changelog outputs one by one; (partition, offset) of each as the broker acked it."""
    acked = []
    for out in outputs:
        meta = await producer.send_and_wait(out.topic, out.value, key=out.key, partition=out.partition)
        acked.append((meta.partition, meta.offset))
    return acked


async def test_checkpoint_never_skips_a_changelog_record_another_owner_wrote(kafka, namespace, tmp_path):
    """Two owners around a capped revoke: the other owner's entry lands between two of this store's
    own writes. The checkpoint written on revoke must not jump over it, or the next restore never
    reads it and a duplicate passes the window."""
    changelog = f"{namespace}.window.changelog"
    await ensure_topics(kafka.bootstrap, [changelog], 1, 1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        window = RocksKeyWindow("w", tmp_path / "w", changelog, kafka.bootstrap, 600.0, 1, "g")
        await window.assign([0])
        assert await window.claim(["mine-1"], ["c1"], [_anchor(0)]) == [True]
        for partition, offset in await _publish(producer, window.changelog()):
            window.durable(partition, offset + 1)
        # The other owner (still working on a batch it held past the revoke) appends its own entry.
        await producer.send_and_wait(changelog, pack([["theirs", time.time() * 1000, "c2"]]), partition=0)
        assert await window.claim(["mine-2"], ["c3"], [_anchor(0)]) == [True]
        for partition, offset in await _publish(producer, window.changelog()):
            window.durable(partition, offset + 1)
        window.revoke([0])

        await window.assign([0])
        seen = await window.seen(["mine-1", "theirs", "mine-2"], [_anchor(0)] * 3)
        assert seen == [True, True, True], f"after revoke + restore, seen = {seen}"
        window.revoke([0])
    finally:
        await producer.stop()


async def test_a_gap_of_another_owners_records_is_caught_up_while_the_store_is_open(kafka, namespace, tmp_path):
    """The live window, not only the next restore, learns the other owner's entry: `catch_up` reads
    the gap, then the checkpoint covers it and the store's own later records."""
    changelog = f"{namespace}.window.changelog"
    await ensure_topics(kafka.bootstrap, [changelog], 1, 1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        window = RocksKeyWindow("w", tmp_path / "w", changelog, kafka.bootstrap, 600.0, 1, "g")
        await window.assign([0])
        await window.claim(["mine-1"], ["c1"], [_anchor(0)])
        for partition, offset in await _publish(producer, window.changelog()):
            window.durable(partition, offset + 1)
        await producer.send_and_wait(
            changelog, pack([["theirs", time.time() * 1000, "c2"], ["mine-2", 1.0, "x"]]), partition=0
        )
        await window.claim(["mine-2"], ["c3"], [_anchor(0)])
        for partition, offset in await _publish(producer, window.changelog()):
            window.durable(partition, offset + 1)
        assert window.applied[0] == 1, "the checkpoint may not jump the other owner's record"
        await window.catch_up()
        assert window.applied[0] == 3
        assert await window.seen(["theirs"], [_anchor(0)]) == [True]
        assert await window.claim(["mine-2"], ["c3"], [_anchor(0)]) == [True], "its own later claim kept"
        window.checkpoint()
        assert (tmp_path / "w" / "p0.changelog-offset").read_text() == "3"
        window.revoke([0])
    finally:
        await producer.stop()


async def test_periodic_checkpoint_covers_only_applied_records_and_is_atomic(kafka, namespace, tmp_path):
    """A checkpoint taken while the store is open (what a kill -9 leaves) names the next changelog
    offset the store holds, written by rename: no temp file left behind, never past what is applied."""
    changelog = f"{namespace}.window.changelog"
    await ensure_topics(kafka.bootstrap, [changelog], 1, 1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        window = RocksKeyWindow("w", tmp_path / "w", changelog, kafka.bootstrap, 600.0, 1, "g")
        await window.assign([0])
        await window.claim(["a"], ["c"], [_anchor(0)])
        for partition, offset in await _publish(producer, window.changelog()):
            window.durable(partition, offset + 1)
        await window.claim(["b"], ["c"], [_anchor(0)])
        window.changelog()  # sent but never acknowledged (the worker dies here)
        window.checkpoint()
        assert (tmp_path / "w" / "p0.changelog-offset").read_text() == "1"
        assert not list((tmp_path / "w").glob("*.tmp"))
        # kill -9: no revoke, no further checkpoint; the next process opens the same directory and
        # replays from offset 1, the tail after what the checkpoint covers.
        window.dbs.pop(0).close()
        reopened = RocksKeyWindow("w", tmp_path / "w", changelog, kafka.bootstrap, 600.0, 1, "g")
        assert reopened.open([0]) == [0] and reopened.applied[0] == 1
        await reopened.restore([0])
        assert await reopened.seen(["a", "b"], [_anchor(0)] * 2) == [True, True]
        reopened.revoke([0])
    finally:
        await producer.stop()


@pytest.mark.slow  # over 10 s: `make quick` leaves it to `make test`
async def test_restore_speed(kafka, namespace, tmp_path):
    """Restore throughput from a changelog of 200 records x 1,000 entries (what a deduplicator writes
    in 200 batches): printed, and bounded loosely so a pathological slowdown fails."""
    changelog = f"{namespace}.window.changelog"
    await ensure_topics(kafka.bootstrap, [changelog], 1, 1)
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap, acks="all", enable_idempotence=True, max_batch_size=1 << 20
    )
    await producer.start()
    try:
        now = time.time() * 1000
        futures = []
        for batch in range(200):
            entries = [[f"t:{batch}-{i}", now, f"src:0:{batch * 1000 + i}"] for i in range(1000)]
            futures.append(await producer.send(changelog, pack(entries), partition=0))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    window = RocksKeyWindow("w", tmp_path / "w", changelog, kafka.bootstrap, 600.0, 1, "g")
    started = time.monotonic()
    await window.assign([0])
    took = time.monotonic() - started
    print(f"restored 200,000 entries in {took:.2f}s: {200_000 / took:,.0f} entries/s")
    assert await window.seen(["t:0-0", "t:199-999"], [_anchor(0)] * 2) == [True, True]
    window.revoke([0])
    assert took < 60


# -- two workers, one group: a restore that outlasts the session timeout -----------------------------


class SlowRestoreWindow(RocksKeyWindow):
    """Injected slow restore: the first restore of this store takes `delay_s` longer."""

    delay_s = 0.0
    slow_restore_took = 0.0

    async def _restore(self, partitions: list[int], *args: Any) -> None:
        if not self.delay_s:
            return await super()._restore(partitions, *args)
        delay, self.delay_s = self.delay_s, 0.0
        started = time.monotonic()
        await asyncio.sleep(delay)
        await super()._restore(partitions, *args)
        self.slow_restore_took = time.monotonic() - started


class Worker:
    """A StageRunner on a stub app: handles events by claiming their ids in its RocksDB window."""

    def __init__(self, name: str, kafka: Any, namespace: str, tmp_path: Path, restore_delay_s: float) -> None:
        self.name = name
        self.handled: list[str] = []
        self.assignments = 0
        group = f"{namespace}-stage"
        self.window = SlowRestoreWindow(
            "w", tmp_path / name, f"{namespace}.window.changelog", kafka.bootstrap, 600.0, 4, group
        )
        self.window.delay_s = restore_delay_s
        host, port = kafka.bootstrap.split(":")
        app = SimpleNamespace(
            conf=SimpleNamespace(
                id=group, broker=[SimpleNamespace(host=host, port=int(port))], canonical_url=f"http://{name}"
            )
        )
        self.runner = StageRunner(
            app,
            f"stage-{name}",
            self.handle,
            StageMetrics(),
            f"{namespace}.dlq",
            source=f"{namespace}.source",
            states=[self.window],
            session_timeout_ms=6_000,
            checkpoint_interval_s=1.0,
        )
        original = self.runner._on_assigned

        async def counted(assigned: Any) -> None:
            self.assignments += 1
            await original(assigned)

        self.runner._on_assigned = counted  # type: ignore[method-assign]

    def checkpointed(self) -> bool:
        """Every held store's checkpoint file names what it has applied (written while held)."""
        files = {p: self.window._checkpoint_file(p) for p in self.window.dbs}
        return all(f.exists() and int(f.read_text()) == self.window.applied[p] for p, f in files.items())

    async def handle(self, records: list[Record]) -> StepResult:
        keys = [r.event.dedupe_key for r in records]
        fresh = await self.window.claim(keys, [r.source for r in records], records)
        self.handled.extend(k for k, new in zip(keys, fresh, strict=True) if new)
        return StepResult()


@pytest.mark.slow  # over 10 s: `make quick` leaves it to `make test`
async def test_a_restore_longer_than_the_session_does_not_evict_the_member(kafka, namespace, tmp_path):
    """Worker B joins and its restore takes 9 s, longer than the 6 s session. Today the restore runs in
    the assignment callback, where aiokafka sends no heartbeats: B is evicted mid-restore, A takes B's
    partitions while B still restores, then B reads them too. After the fix: no eviction, B reports
    ready only once restored, and every event is handled exactly once."""
    source = f"{namespace}.source"
    await ensure_topics(kafka.bootstrap, [source, f"{namespace}.window.changelog", f"{namespace}.dlq"], 4, 1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    sent: list[str] = []

    async def produce(count: int) -> None:
        for i in range(count):
            event = Event(event_id=f"e{len(sent)}", type="play", ts=time.time() * 1000, tenant="t", device_id=f"d{i}")
            await producer.send_and_wait(source, encode_event(event), key=event.partition_key)
            sent.append(event.dedupe_key)

    a = Worker("a", kafka, namespace, tmp_path, restore_delay_s=0.0)
    b = Worker("b", kafka, namespace, tmp_path, restore_delay_s=9.0)
    workers = [a, b]

    def handled() -> Counter[str]:
        return Counter(k for w in workers for k in w.handled)

    try:
        await a.runner.start()
        await produce(100)
        await wait_for(lambda: len(handled()) >= 100, 30, "A handles the first events")
        await b.runner.start()
        await wait_for(lambda: b.assignments >= 1, 30, "B is assigned partitions")
        assert not b.runner.ready()["joined"], "B says ready before its restore finished"
        # Keep events flowing through B's restore and past the session timeout.
        for _ in range(12):
            await produce(20)
            await asyncio.sleep(1.0)
        await wait_for(lambda: b.runner.ready()["joined"], 30, "B ready after its restore")
        await produce(100)
        await wait_for(lambda: len(handled()) >= len(sent), 60, "every event handled")
        await asyncio.sleep(3.0)  # a stale owner's copy would show up right behind
        twice = {k: n for k, n in handled().items() if n > 1}
        assert not twice, f"{len(twice)} events handled more than once: {sorted(twice)[:10]}"
        assert b.assignments == 1, f"B was assigned {b.assignments} times (evicted mid-restore)"
        assert a.assignments == 2, f"A was assigned {a.assignments} times (a rebalance storm)"
        assert b.runner.ready()["partitions"], "B owns partitions"
        assert b.window.slow_restore_took > 6.0, "the restore outlasted the session timeout"
        await wait_for(lambda: a.checkpointed() and b.checkpointed(), 10, "periodic checkpoints")
        assert sum(b.window.applied.values()) > 0
    finally:
        for w in workers:
            await w.runner.stop()
        await producer.stop()


@pytest.mark.slow  # over 10 s: `make quick` leaves it to `make test`
async def test_a_revocation_during_a_restore_cancels_it_and_nothing_is_handled_twice(kafka, namespace, tmp_path):
    """B is still restoring (a 20 s injected delay) when C joins: the rebalance revokes B's partitions
    mid-restore. The restore is cancelled at once (the group does not wait for it), B restores again
    on its new assignment, and every event is still handled exactly once."""
    source = f"{namespace}.source"
    await ensure_topics(kafka.bootstrap, [source, f"{namespace}.window.changelog", f"{namespace}.dlq"], 4, 1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    sent: list[str] = []

    async def produce(count: int) -> None:
        for i in range(count):
            event = Event(event_id=f"e{len(sent)}", type="play", ts=time.time() * 1000, tenant="t", device_id=f"d{i}")
            await producer.send_and_wait(source, encode_event(event), key=event.partition_key)
            sent.append(event.dedupe_key)

    a = Worker("a", kafka, namespace, tmp_path, restore_delay_s=0.0)
    b = Worker("b", kafka, namespace, tmp_path, restore_delay_s=20.0)
    c = Worker("c", kafka, namespace, tmp_path, restore_delay_s=0.0)
    workers = [a, b, c]

    def handled() -> Counter[str]:
        return Counter(k for w in workers for k in w.handled)

    try:
        await a.runner.start()
        await produce(50)
        await wait_for(lambda: len(handled()) >= 50, 30, "A handles the first events")
        await b.runner.start()
        await wait_for(lambda: b.runner.ready()["restoring"], 30, "B restoring")
        await produce(50)
        started = time.monotonic()
        await c.runner.start()
        await wait_for(lambda: b.assignments >= 2, 30, "B re-assigned after C joined")
        await wait_for(lambda: all(w.runner.ready()["joined"] for w in workers), 30, "every worker ready")
        assert time.monotonic() - started < 15, "the rebalance waited for B's restore"
        assert b.window.slow_restore_took == 0.0, "B's first (slow) restore was cancelled, not finished"
        await produce(100)
        await wait_for(lambda: len(handled()) >= len(sent), 60, "every event handled")
        await asyncio.sleep(2.0)  # a stale owner's copy would show up right behind
        twice = {k: n for k, n in handled().items() if n > 1}
        assert not twice, f"{len(twice)} events handled more than once: {sorted(twice)[:10]}"
        assert sorted(p for w in workers for p in w.runner.ready()["partitions"]) == [0, 1, 2, 3]
    finally:
        for w in workers:
            await w.runner.stop()
        await producer.stop()


@contextlib.asynccontextmanager
async def restoring_worker(
    kafka: LocalKafka, namespace: str, tmp_path: Path, monkeypatch: Any, window_class: type[RocksKeyWindow]
) -> AsyncIterator[tuple[Worker, list[int]]]:
    """A started worker whose window restores as `window_class` does, 20 events in its source; the signals
    it sends itself are recorded instead of delivered to pytest."""
    import shared.stage

    signals: list[int] = []
    monkeypatch.setattr(shared.stage.os, "kill", lambda pid, sig: signals.append(sig))
    source = f"{namespace}.source"
    await ensure_topics(kafka.bootstrap, [source, f"{namespace}.window.changelog", f"{namespace}.dlq"], 4, 1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    worker = Worker("a", kafka, namespace, tmp_path, restore_delay_s=0.0)
    worker.window.__class__ = window_class
    try:
        for i in range(20):
            event = Event(event_id=f"e{i}", type="play", ts=time.time() * 1000, tenant="t", device_id=f"d{i}")
            await producer.send_and_wait(source, encode_event(event), key=event.partition_key)
        await worker.runner.start()
        yield worker, signals
    finally:
        await worker.runner.stop()
        await producer.stop()


class BrokenRestoreWindow(RocksKeyWindow):
    async def _restore(self, partitions: list[int], *args: Any) -> None:
        raise OSError("injected: the changelog cannot be read")


async def test_a_failed_restore_stops_the_worker_instead_of_reading_without_its_window(
    kafka, namespace, tmp_path, monkeypatch
):
    """Reading on without the window would pass duplicates: the worker asks itself to stop (SIGTERM,
    recorded here instead of delivered to pytest) and never resumes the partitions."""
    async with restoring_worker(kafka, namespace, tmp_path, monkeypatch, BrokenRestoreWindow) as (worker, signals):
        await wait_for(lambda: signals, 30, "the worker stops itself")
        await asyncio.sleep(2.0)  # would it read anyway?
        assert worker.handled == []
        assert not worker.runner.ready()["joined"]


async def test_a_catch_up_racing_a_re_assignment_leaves_the_new_store_alone(kafka, namespace, tmp_path):
    """Review finding 8: the partition is revoked and opened again while `catch_up` starts; the stale
    catch-up must not write into the new store nor push its `applied` past its own restore."""
    changelog = f"{namespace}.window.changelog"
    await ensure_topics(kafka.bootstrap, [changelog], 1, 1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        window = RocksKeyWindow("w", tmp_path / "w", changelog, kafka.bootstrap, 600.0, 1, "g")
        await window.assign([0])
        await producer.send_and_wait(changelog, pack([["theirs", time.time() * 1000, "c2"]]), partition=0)
        await window.claim(["mine"], ["c1"], [_anchor(0)])
        for partition, offset in await _publish(producer, window.changelog()):
            window.durable(partition, offset + 1)
        assert window.behind == {0: 2}
        catching_up = asyncio.create_task(window.catch_up())
        await asyncio.sleep(0)  # it is starting its consumer
        window.revoke([0])  # applied 0: the checkpoint stays before the other owner's record
        assert window.open([0]) == [0]  # the new owner of the partition, not restored yet
        await catching_up
        assert window.applied[0] == 0, "the stale catch-up moved the new store's checkpoint"
        assert await window.seen(["theirs"], [_anchor(0)]) == [False], "the stale catch-up wrote the new store"
        window.revoke([0])
    finally:
        await producer.stop()


class FlakyRestoreWindow(RocksKeyWindow):
    """The real restore, failing the first `failures` times as a broker outage does."""

    failures = 2

    async def _restore(self, partitions: list[int], *args: Any) -> None:
        if self.failures:
            self.failures -= 1
            raise KafkaConnectionError("injected: the broker is unreachable")
        await super()._restore(partitions, *args)


async def test_a_restore_that_meets_a_broker_outage_is_retried_not_the_end_of_the_worker(
    kafka, namespace, tmp_path, monkeypatch
):
    """Review finding 7: a transient broker error during the restore SIGTERMed the worker; it is retried
    with backoff, and the partitions are read once restored."""
    async with restoring_worker(kafka, namespace, tmp_path, monkeypatch, FlakyRestoreWindow) as (worker, signals):
        await wait_for(lambda: len(worker.handled) >= 20 or signals, 60, "every event handled")
        assert not signals, "the worker stopped itself at a transient error"


class FlakyCatchUpWindow(RocksKeyWindow):
    """`catch_up` fails as during a broker outage (its consumer cannot start), the first `failures` times."""

    failures = 2

    async def catch_up(self) -> None:
        if self.failures:
            self.failures -= 1
            raise KafkaConnectionError("injected: the broker is unreachable")
        await super().catch_up()


async def test_a_catch_up_that_meets_a_broker_outage_does_not_stop_the_worker(kafka, namespace, tmp_path, monkeypatch):
    """Review finding 7: the checkpointer's catch_up raising a transient broker error SIGTERMed the worker
    (via the loop guard); it is retried at the next checkpoint and the worker reads on."""
    import shared.stage

    signals: list[int] = []
    monkeypatch.setattr(shared.stage.os, "kill", lambda pid, sig: signals.append(sig))
    source = f"{namespace}.source"
    await ensure_topics(kafka.bootstrap, [source, f"{namespace}.window.changelog", f"{namespace}.dlq"], 4, 1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    worker = Worker("a", kafka, namespace, tmp_path, restore_delay_s=0.0)
    worker.window.__class__ = FlakyCatchUpWindow
    try:
        await worker.runner.start()
        await wait_for(lambda: worker.window.failures == 0 or signals, 30, "two failed catch-ups")
        for i in range(20):
            event = Event(event_id=f"e{i}", type="play", ts=time.time() * 1000, tenant="t", device_id=f"d{i}")
            await producer.send_and_wait(source, encode_event(event), key=event.partition_key)
        await wait_for(lambda: len(worker.handled) >= 20 or signals, 60, "every event handled")
        assert not signals, "the worker stopped itself at a transient error"
        await wait_for(worker.checkpointed, 10, "a checkpoint after the failed catch-ups")
    finally:
        await worker.runner.stop()
        await producer.stop()


async def test_a_store_reopened_after_a_rebalance_keeps_its_keys_through_a_compaction(tmp_path):
    """The soak's dedupe leak: every rebalance closes a partition's store and opens it again; rocksdict loaded
    the last OPTIONS file, whose TTL compaction filter the TTL open then wrapped once more, so from the second open
    on a compaction read the tail of each value as a timestamp and dropped every key (the deduplicator's p3
    compacted 7,324 records into 0 and passed a client re-send 3.5 min after its first copy)."""
    window = RocksKeyWindow("w", tmp_path / "w", "unused.changelog", "127.0.0.1:1", 600.0, 1, "g")
    keys = [f"acme:e{i}" for i in range(50)]
    anchors = [_anchor(0)] * len(keys)
    for opening in range(3):  # a worker's first assignment, then two rebalances that give partition 0 back
        window.open([0])
        if opening == 0:
            assert await window.claim(keys, [f"t:0:{i}" for i in range(50)], anchors) == [True] * 50
        window.dbs[0].compact_range(None, None)  # what RocksDB does in the background as the store grows
        # a re-sent copy (another message) must still find each key's claim
        assert await window.claim(keys, [f"t:0:{100 + i}" for i in range(50)], anchors) == [False] * 50, opening
        window.revoke([0])
