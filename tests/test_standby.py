"""Standby replicas of the RocksDB key windows (issue 15): a takeover replays the changelog's tail, not the
whole window, and a duplicate of an event the old owner saw is still dropped. Real broker, real RocksDB."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord
from rocksdict import WriteBatch

from shared.codec import encode_event, pack
from shared.config.settings import Settings
from shared.errors import ConfigError, StateDirInUse
from shared.event import Event
from shared.keywindow import RocksKeyWindow
from shared.restore import StateRestorer
from shared.standby import STANDBY_BACKOFF, StandbyReplica
from shared.step import Record, StepResult
from shared.topics import ensure_topics
from tests.helpers import wait_for
from tests.test_keywindow_restore import Worker, _anchor


def restored_entries(caplog: pytest.LogCaptureFixture, window: str) -> int:
    """Changelog entries the restores of this window applied, from its "restored partitions" log lines."""
    total = 0
    for record in caplog.records:
        if record.name == "shared.keywindow" and isinstance(record.args, tuple) and len(record.args) >= 4:
            name, kind, _partitions, entries = record.args[:4]
            if name == window and kind == "restored":
                total += int(entries)  # type: ignore[call-overload]
    return total


async def send_events(producer: AIOKafkaProducer, source: str, first: int, count: int) -> None:
    """Events e<first> .. e<first + count - 1> of tenant t, keyed by one of 97 devices, acknowledged."""
    futures = []
    for i in range(first, first + count):
        event = Event(event_id=f"e{i}", type="play", ts=time.time() * 1000, tenant="t", device_id=f"d{i % 97}")
        futures.append(await producer.send(source, encode_event(event), key=event.partition_key))
    await asyncio.gather(*futures)


def standby_caught_up(worker: Worker) -> bool:
    lag = worker.runner.ready().get("standby", {}).get(worker.window.changelog_topic, {})
    return bool(lag) and all(behind == 0 for behind in lag.values())


@pytest.mark.slow  # over 10 s: `make quick` leaves it to `make test`
@pytest.mark.parametrize("standby", [0, 1], ids=["standby-off", "standby-on"])
async def test_a_takeover_restores_only_the_tail_and_still_drops_duplicates(
    kafka, namespace, tmp_path, caplog, monkeypatch, standby
):
    """A owns every partition and sees N events; B joins, then A stops and B takes A's partitions over.
    Without a standby B's restore applies every entry A wrote to those partitions (issue 15); with one it
    applies only the tail since its standby caught up. Either way, copies of all N events sent after the
    takeover are dropped: the window B took over is complete."""
    import shared.restore

    signals: list[int] = []  # a failed restore stops its worker: recorded instead of a SIGTERM to pytest
    monkeypatch.setattr(shared.restore.os, "kill", lambda pid, sig: signals.append(sig))
    caplog.set_level(logging.INFO, logger="shared.keywindow")
    source = f"{namespace}.source"
    await ensure_topics(kafka.bootstrap, [source, f"{namespace}.window.changelog", f"{namespace}.dlq"], 4, 1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    sent: list[str] = []
    partition_of: dict[str, int] = {}

    async def produce(count: int, again: bool = False) -> None:
        start = 0 if again else len(sent)
        futures = []
        for i in range(start, start + count):
            event = Event(event_id=f"e{i}", type="play", ts=time.time() * 1000, tenant="t", device_id=f"d{i % 97}")
            futures.append(await producer.send(source, encode_event(event), key=event.partition_key))
            if not again:
                sent.append(event.dedupe_key)
        for i, meta in enumerate(await asyncio.gather(*futures)):
            partition_of[f"t:e{start + i}"] = meta.partition

    a = Worker("a", kafka, namespace, tmp_path, restore_delay_s=0.0)
    b = Worker("b", kafka, namespace, tmp_path, restore_delay_s=0.0)
    b.window.name = "w-b"
    workers = [a, b]
    for w in workers:
        w.runner.standby_replicas = standby

    def handled() -> Counter[str]:
        return Counter(k for w in workers for k in w.handled)

    try:
        await a.runner.start()
        await produce(2000)
        await wait_for(lambda: len(handled()) >= 2000, 60, "A handles the first events")
        await b.runner.start()
        await wait_for(lambda: b.runner.ready()["joined"] and a.runner.ready()["joined"], 60, "both ready")
        await produce(200)
        await wait_for(lambda: len(handled()) >= len(sent), 60, "both handle the next events")
        if standby:
            await wait_for(lambda: standby_caught_up(b), 30, "B's standby caught up")
        a_partitions = a.runner.ready()["partitions"]
        assert a_partitions, "A owns partitions after B joined"
        before = restored_entries(caplog, "w-b")
        await a.runner.stop()
        await wait_for(
            lambda: b.runner.ready()["joined"] and b.runner.ready()["partitions"] == [0, 1, 2, 3], 60, "B takes over"
        )
        took_over = restored_entries(caplog, "w-b") - before
        entries_of_a = sum(1 for k in sent if partition_of[k] in a_partitions)
        print(f"standby={standby}: takeover of {a_partitions} applied {took_over} entries (A wrote {entries_of_a})")
        if standby:
            assert took_over <= 10, f"with a standby the takeover replayed {took_over} entries"
        else:
            assert took_over >= entries_of_a * 0.9, f"the takeover restored only {took_over} of {entries_of_a}"
        handled_before = len(b.handled)
        await produce(len(sent), again=True)  # a copy of every event, A's included, after the takeover
        await produce(50)
        await wait_for(lambda: len(handled()) >= len(sent), 60, "the new events handled")
        await asyncio.sleep(2.0)  # a copy that passed would show up right behind
        twice = {k: n for k, n in handled().items() if n > 1}
        assert not twice, f"{len(twice)} copies passed the window after the takeover: {sorted(twice)[:10]}"
        assert len(b.handled) - handled_before == 50
        assert not signals, "a restore failed and stopped a worker"
        # A's replacement (same data dir) joins: it restores from the checkpoints A left, owned and standby.
        replacement = Worker("a", kafka, namespace, tmp_path, restore_delay_s=0.0)
        replacement.window.name = "w-a2"
        replacement.runner.standby_replicas = standby
        workers.append(replacement)
        await replacement.runner.start()
        await wait_for(lambda: replacement.runner.ready()["joined"] and b.runner.ready()["joined"], 60, "A back")
        came_back = restored_entries(caplog, "w-a2")
        print(f"standby={standby}: the replacement's restore applied {came_back} entries")
        if standby:
            assert came_back <= 100, f"the replacement replayed {came_back} entries, more than B wrote since A left"
    finally:
        for w in workers:
            await w.runner.stop()
        await producer.stop()


class PausingStandby(StandbyReplica):
    """Pauses after applying `pause_after` records (mid-apply), until `go` is set."""

    pause_after = 3

    def __init__(self, window: RocksKeyWindow) -> None:
        super().__init__(window)
        self.paused = asyncio.Event()
        self.go = asyncio.Event()
        self.writes_after_release = 0

    async def _apply(self, partition: int, records: list[ConsumerRecord]) -> None:  # type: ignore[type-arg]
        db = self.dbs.get(partition)
        for i, record in enumerate(records):
            if self.dbs.get(partition) is not db or db is None:
                return
            if i == self.pause_after:
                self.paused.set()
                await self.go.wait()
                if self.dbs.get(partition) is not db:
                    return
            if record.offset < self.applied[partition]:
                continue
            self.applied_entries += self.window._apply_record(db, partition, record.offset, record.value)
            self.applied[partition] = record.offset + 1
            await asyncio.sleep(0)


async def test_an_assignment_mid_apply_stops_the_standby_before_the_owned_store_opens(kafka, namespace, tmp_path):
    """The owner takes the partition while the standby is between two records of a fetch: the standby's
    checkpoint names exactly what it applied, its store is closed before the owned one opens, it writes
    nothing more, and the restore applies only the rest."""
    changelog = f"{namespace}.window.changelog"
    await ensure_topics(kafka.bootstrap, [changelog], 1, 1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        now = time.time() * 1000
        for i in range(10):
            await producer.send_and_wait(changelog, pack([[f"k{i}", now, f"src:0:{i}"]]), partition=0)
        window = RocksKeyWindow("w", tmp_path / "w", changelog, kafka.bootstrap, 600.0, 1, "g")
        window.standby = standby = PausingStandby(window)
        window.start_standby()
        await asyncio.wait_for(standby.paused.wait(), 30)
        assert standby.applied[0] == 3
        release = asyncio.create_task(window.release([0]))
        await release
        assert window._read_checkpoint(0) == 3, "the standby's checkpoint is not what it applied"
        assert 0 not in standby.dbs
        assert window.open([0]) == [0] and window.applied[0] == 3
        standby.go.set()  # the standby resumes mid-fetch: it must not write on
        await asyncio.sleep(0.5)
        assert standby.applied_entries == 3, "the standby applied after it was released"
        await window.restore([0])
        assert window.restored_entries == 7, f"the restore applied {window.restored_entries}, not the tail of 7"
        assert await window.seen([f"k{i}" for i in range(10)], [_anchor(0)] * 10) == [True] * 10
        # Given away again: the owned store closes first, then the standby tails it from the owner's checkpoint.
        assert await window.claim(["mine"], ["c"], [_anchor(0)]) == [True]
        for out in window.changelog():
            meta = await producer.send_and_wait(out.topic, out.value, partition=out.partition)
            window.durable(meta.partition, meta.offset + 1)
        window.revoke([0])
        await wait_for(lambda: standby.lag().get(0) == 0 and standby.applied.get(0) == 11, 30, "standby again")
        await window.stop_standby()
        assert window._read_checkpoint(0) == 11
    finally:
        await producer.stop()


async def test_a_kill_leaves_standby_checkpoints_that_never_run_ahead_of_the_store(kafka, namespace, tmp_path):
    """kill -9 of a worker whose standby applied past its last checkpoint: the stores close without a
    checkpoint; the next process finds every entry the checkpoint covers in the store, and restores the rest."""
    changelog = f"{namespace}.window.changelog"
    await ensure_topics(kafka.bootstrap, [changelog], 2, 1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        now = time.time() * 1000
        for i in range(20):
            await producer.send_and_wait(changelog, pack([[f"k{i}", now, f"src:{i % 2}:{i}"]]), partition=i % 2)
        window = RocksKeyWindow("w", tmp_path / "w", changelog, kafka.bootstrap, 600.0, 2, "g")
        window.start_standby()
        standby = window.standby
        assert standby is not None
        await wait_for(lambda: standby.applied == {0: 10, 1: 10}, 30, "the standby applied everything")
        window.checkpoint()
        for i in range(20, 30):
            await producer.send_and_wait(changelog, pack([[f"k{i}", now, f"src:{i % 2}:{i}"]]), partition=i % 2)
        await wait_for(lambda: standby.applied == {0: 15, 1: 15}, 30, "the standby applied the tail")
        # kill -9: the task ends, the stores close, no checkpoint is written.
        task = standby._task
        assert task is not None
        task.cancel()
        await asyncio.wait([task])
        for db in standby.dbs.values():
            db.close()
        assert [window._read_checkpoint(p) for p in (0, 1)] == [10, 10]
        reopened = RocksKeyWindow("w", tmp_path / "w", changelog, kafka.bootstrap, 600.0, 2, "g")
        assert reopened.open([0, 1]) == [0, 1] and reopened.applied == {0: 10, 1: 10}
        covered = [f"k{i}" for i in range(20)]
        assert await reopened.seen(covered, [_anchor(i % 2) for i in range(20)]) == [True] * 20
        await reopened.restore([0, 1])
        assert reopened.restored_entries == 10, "the restore replays only what the checkpoint did not cover"
        assert await reopened.seen([f"k{i}" for i in range(30)], [_anchor(i % 2) for i in range(30)]) == [True] * 30
        reopened.revoke([0, 1])
    finally:
        await producer.stop()


async def test_a_standby_that_meets_an_unreachable_broker_keeps_trying_and_never_raises(tmp_path):
    """No broker at all: the standby task retries with backoff, the worker goes on, stop ends it cleanly."""
    window = RocksKeyWindow("w", tmp_path / "w", "unused.changelog", "127.0.0.1:1", 600.0, 1, "g")
    window.standby = StandbyReplica(window)
    window.standby.backoff = type(window.standby.backoff)(0.01, 0.05)
    window.start_standby()
    await wait_for(lambda: window.standby is not None and window.standby.failures >= 2, 30, "two failed attempts")
    assert window.standby._task is not None and not window.standby._task.done()
    await window.stop_standby()
    await window.release([0])
    assert window.open([0]) == [0]  # the stopped standby holds nothing: the owner opens the store
    window.revoke([0])


def test_the_setting_turns_standby_replicas_off_and_refuses_other_counts() -> None:
    assert Settings().standby_replicas == 1
    assert Settings.from_env({"HIFI_STANDBY_REPLICAS": "0"}).standby_replicas == 0
    with pytest.raises(ConfigError, match=r"HIFI_STANDBY_REPLICAS: .*got '2'"):
        Settings.from_env({"HIFI_STANDBY_REPLICAS": "2"})


@pytest.mark.slow  # over 10 s: `make quick` leaves it to `make test`
async def test_workers_joining_and_leaving_under_load_with_standbys_handle_every_event_once(
    kafka, namespace, tmp_path, monkeypatch
):
    """Partitions move between three workers again and again while events flow and every worker's standby
    tails what it does not own: each event is handled exactly once, and no restore fails (a standby store
    still open when its owner opens it would stop the worker, recorded here instead of a SIGTERM)."""
    import shared.restore

    signals: list[int] = []
    monkeypatch.setattr(shared.restore.os, "kill", lambda pid, sig: signals.append(sig))
    source = f"{namespace}.source"
    await ensure_topics(kafka.bootstrap, [source, f"{namespace}.window.changelog", f"{namespace}.dlq"], 4, 1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    sent: list[str] = []
    stop_producing = asyncio.Event()

    async def produce() -> None:
        while not stop_producing.is_set():
            futures = []
            for _ in range(20):
                i = len(sent)
                event = Event(event_id=f"e{i}", type="play", ts=time.time() * 1000, tenant="t", device_id=f"d{i % 31}")
                futures.append(await producer.send(source, encode_event(event), key=event.partition_key))
                sent.append(event.dedupe_key)
            await asyncio.gather(*futures)
            await asyncio.sleep(0.05)

    workers = {name: Worker(name, kafka, namespace, tmp_path, restore_delay_s=0.0) for name in "abc"}
    for name, w in workers.items():
        w.window.name = f"w-{name}"
    everyone = list(workers.values())

    def handled() -> Counter[str]:
        return Counter(k for w in everyone for k in w.handled)

    producing = asyncio.create_task(produce())
    try:
        await workers["a"].runner.start()
        await wait_for(lambda: len(handled()) >= 100, 60, "A handles events")
        await workers["b"].runner.start()
        await wait_for(lambda: workers["b"].runner.ready()["partitions"], 60, "B owns partitions")
        await workers["c"].runner.start()
        await wait_for(lambda: workers["c"].runner.ready()["partitions"], 60, "C owns partitions")
        await asyncio.sleep(1.0)
        await workers["a"].runner.stop()  # B and C take A's partitions from their standbys
        await wait_for(
            lambda: sorted(p for n in "bc" for p in workers[n].runner.ready()["partitions"]) == [0, 1, 2, 3],
            60,
            "B and C own every partition",
        )
        again = Worker("a", kafka, namespace, tmp_path, restore_delay_s=0.0)  # A's replacement, same volume
        again.window.name = "w-a2"
        everyone.append(again)
        await again.runner.start()
        await wait_for(lambda: again.runner.ready()["partitions"], 60, "A's replacement owns partitions")
        await workers["b"].runner.stop()
        await wait_for(
            lambda: sorted(p for w in (again, workers["c"]) for p in w.runner.ready()["partitions"]) == [0, 1, 2, 3],
            60,
            "A' and C own every partition",
        )
        stop_producing.set()
        await producing
        await wait_for(lambda: len(handled()) >= len(set(sent)), 60, "every event handled")
        await asyncio.sleep(2.0)  # a stale owner's copy would show up right behind
        twice = {k: n for k, n in handled().items() if n > 1}
        assert not twice, f"{len(twice)} events handled more than once: {sorted(twice)[:10]}"
        assert not signals, "a restore failed and stopped a worker"
        print(f"{len(sent)} events, each handled once")
    finally:
        stop_producing.set()
        await asyncio.gather(producing, return_exceptions=True)
        for w in everyone:
            await w.runner.stop()
        await producer.stop()


class SlowOpenWindow(RocksKeyWindow):
    """Owned opens take 0.5 s in the restorer's thread; records when each starts and ends."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.opens_started = 0
        self.opens_ended = 0

    def open(self, partitions: list[int]) -> list[int]:
        self.opens_started += 1
        try:
            time.sleep(0.5)
            return super().open(partitions)
        finally:
            self.opens_ended += 1


async def test_a_restore_cancelled_while_its_stores_open_waits_for_the_open(kafka, namespace, tmp_path):
    """A revocation cancels the restore while its thread opens the stores: the cancel returns only once the
    open ended, so the revocation closes what it opened and the standby never races it for the same store
    (before: the thread opened an owned store for a partition already given away, behind the revocation)."""
    changelog = f"{namespace}.window.changelog"
    await ensure_topics(kafka.bootstrap, [changelog], 2, 1)
    window = SlowOpenWindow("w", tmp_path / "w", changelog, kafka.bootstrap, 600.0, 2, "g")
    window.start_standby()
    standby = window.standby
    assert standby is not None
    await wait_for(lambda: sorted(standby.dbs) == [0, 1], 30, "the standby holds both partitions")
    runner = SimpleNamespace(consumer=None, committed={}, assigned=set(), readable_since={})
    restorer = StateRestorer(runner, "s", f"{namespace}.source", [window])
    tps = [TopicPartition(f"{namespace}.source", p) for p in (0, 1)]
    restorer.begin(tps)
    await wait_for(lambda: window.opens_started == 1, 10, "the owned open started")
    await restorer.cancel()
    assert window.opens_ended == 1, "the cancel returned while the stores were still opening"
    window.revoke([0, 1])  # what the revocation does next
    assert window.dbs == {}
    await wait_for(lambda: sorted(standby.dbs) == [0, 1], 30, "the standby tails both again")
    await window.release([0, 1])
    assert window.open([0, 1]) == [0, 1]  # no store left open (locked) by the cancelled restore
    window.revoke([0, 1])
    await window.stop_standby()


class SlowStoreOpenWindow(RocksKeyWindow):
    """Every store open takes 0.5 s (a WAL replay after a kill -9)."""

    opening = False
    opened = 0  # opens finished

    def _open(self, partition: int) -> Any:
        self.opening = True
        time.sleep(0.5)
        store = super()._open(partition)
        self.opened += 1
        return store


async def test_a_standby_stopped_while_it_opens_a_store_leaves_no_store_locked(kafka, namespace, tmp_path):
    """Stopped while its thread opens a store, the standby waits for the open and closes the store: the owner's
    open of the same store later in this process succeeds (RocksDB would refuse it while a handle holds the lock)."""
    changelog = f"{namespace}.window.changelog"
    await ensure_topics(kafka.bootstrap, [changelog], 1, 1)
    window = SlowStoreOpenWindow("w", tmp_path / "w", changelog, kafka.bootstrap, 600.0, 1, "g")
    window.start_standby()
    await wait_for(lambda: window.opening, 30, "the standby opens a store")
    await window.stop_standby()
    await window.release([0])
    assert window.open([0]) == [0]
    window.revoke([0])


async def test_a_release_waits_for_at_most_one_standby_open(kafka, namespace, tmp_path):
    """The standby opens the stores it wants one by one (0.5 s each, a WAL replay): an assignment's release
    waits for the open in flight only, not for every one the standby still means to open (before: it held
    its lock across all of them, and the owned stores waited for P opens after a restart)."""
    changelog = f"{namespace}.window.changelog"
    await ensure_topics(kafka.bootstrap, [changelog], 4, 1)
    window = SlowStoreOpenWindow("w", tmp_path / "w", changelog, kafka.bootstrap, 600.0, 4, "g")
    window.start_standby()
    try:
        await wait_for(lambda: window.opening, 30, "the standby opens its first store")
        before = window.opened
        await window.release([3])
        # Counted, not timed: the release waited for the open in flight, not for the standby's other stores.
        assert window.opened - before <= 1, f"the release waited for {window.opened - before} opens"
        assert window.open([3]) == [3]
        window.revoke([3])
    finally:
        await window.stop_standby()


async def _fill_changelog(bootstrap: str, changelog: str, partitions: int, records: int, entries: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_request_size=10_000_000)
    await producer.start()
    try:
        now = time.time() * 1000
        futures = []
        for p in range(partitions):
            for r in range(records):
                value = pack([[f"k{p}-{r}-{i}", now, f"src:{p}:{r * entries + i}"] for i in range(entries)])
                futures.append(await producer.send(changelog, value, partition=p))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def test_the_standby_applies_nothing_while_an_owned_partition_restores(kafka, namespace, tmp_path):
    """A fresh worker's owned (paused) partition restores while its standby tails the others: the standby waits,
    so the owned restore has the loop to itself (before: both yielded after each record, +50-60 % restore time)."""
    changelog = f"{namespace}.window.changelog"
    await ensure_topics(kafka.bootstrap, [changelog], 3, 1)
    await _fill_changelog(kafka.bootstrap, changelog, 3, 1000, 100)
    window = RocksKeyWindow("w", tmp_path / "w", changelog, kafka.bootstrap, 600.0, 3, "g")
    await window.release([0])
    assert window.open([0]) == [0]  # assigned: p0 waits for its restore, the standby tails p1 and p2
    window.start_standby()
    standby = window.standby
    assert standby is not None
    try:
        await wait_for(lambda: standby.applied_entries > 0, 30, "the standby is busy tailing")
        before = standby.applied_entries
        await window.restore([0])
        during = standby.applied_entries - before
        assert window.restored_entries > 0
        assert during == 0, f"the standby applied {during} entries while the owned partition restored"
        await wait_for(lambda: standby.lag() == {1: 0, 2: 0}, 60, "the standby resumes and catches up after it")
        window.revoke([0])
    finally:
        await window.stop_standby()


async def test_releasing_a_large_standby_store_does_not_block_the_loop(kafka, namespace, tmp_path):
    """Closing a standby store flushes its memtable (hundreds of ms for a large one): done in a thread, the
    event loop (heartbeats, fetches) goes on meanwhile."""
    changelog = f"{namespace}.window.changelog"
    await ensure_topics(kafka.bootstrap, [changelog], 1, 1)
    window = RocksKeyWindow("w", tmp_path / "w", changelog, kafka.bootstrap, 600.0, 1, "g")
    window.start_standby()
    standby = window.standby
    assert standby is not None
    try:
        await wait_for(lambda: 0 in standby.dbs, 30, "the standby holds the store")
        db = standby.dbs[0]
        now = time.time() * 1000

        def fill() -> None:  # as if applied from the changelog: a full memtable
            for start in range(0, 300_000, 1000):
                batch = WriteBatch(raw_mode=True)
                for j in range(start, start + 1000):
                    batch.put(f"key-{j}-{'x' * 40}".encode(), pack([now, f"src:0:{j}"]))
                db.write(batch)

        await asyncio.to_thread(fill)
        ticks: list[float] = []  # when the loop ran the probe again: a close on the loop allows none meanwhile
        done = False

        async def probe() -> None:
            while not done:
                await asyncio.sleep(0.01)
                ticks.append(time.monotonic())

        probing = asyncio.create_task(probe())
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await window.release([0])
        ended = time.monotonic()
        done = True
        await probing
        # Counted, not timed (a shared machine stalls any loop now and then): closed on the loop, the flush of
        # 300k entries was one blocking call and the probe ran at most once around it.
        during = [t for t in ticks if started < t < ended]
        assert len(during) >= 3, f"the loop ran {len(during)} times in the {1000 * (ended - started):.0f} ms close"
        assert window.open([0]) == [0]
        window.revoke([0])
    finally:
        await window.stop_standby()


async def test_a_store_that_fails_to_open_stops_only_its_own_partition(kafka, namespace, tmp_path):
    """p1's store is locked by another handle: the standby tails p0 and p2 anyway, shows p1's error in /ready's
    terms (lag None, an error), and opens p1 once the lock is gone (before: no partition was tailed at all)."""
    changelog = f"{namespace}.window.changelog"
    await ensure_topics(kafka.bootstrap, [changelog], 3, 1)
    await _fill_changelog(kafka.bootstrap, changelog, 3, 5, 2)
    window = RocksKeyWindow("w", tmp_path / "w", changelog, kafka.bootstrap, 600.0, 3, "g")
    locker = window._open(1)  # another handle holds p1's RocksDB LOCK
    window.standby = StandbyReplica(window, backoff=type(STANDBY_BACKOFF)(0.05, 0.2))
    window.start_standby()
    standby = window.standby
    try:
        await wait_for(lambda: standby.applied.get(0) == 5 and standby.applied.get(2) == 5, 20, "p0 and p2 tailed")
        assert window.standby_lag()[1] is None and 1 in window.standby_errors(), window.describe()
        locker.close()
        await wait_for(lambda: standby.applied.get(1) == 5, 20, "p1 tailed once its store opens")
        assert 1 not in standby.errors
    finally:
        await window.stop_standby()


async def test_a_second_worker_on_the_same_data_directory_fails_fast(kafka, namespace, tmp_path, monkeypatch):
    """Two worker processes on one data directory (one shared volume, scaled): the second refuses to start with
    an error naming the directory and the rule, instead of opening the first one's stores (before: it started, and
    the first one's owned open failed on the RocksDB lock its standby held, which stopped that worker)."""
    await ensure_topics(
        kafka.bootstrap, [f"{namespace}.source", f"{namespace}.window.changelog", f"{namespace}.dlq"], 4, 1
    )
    import shared.restore

    signals: list[int] = []  # a failed restore stops its worker: recorded instead of a SIGTERM to pytest
    monkeypatch.setattr(shared.restore.os, "kill", lambda pid, sig: signals.append(sig))
    first = Worker("a", kafka, namespace, tmp_path, restore_delay_s=0.0)
    twin = Worker("a", kafka, namespace, tmp_path, restore_delay_s=0.0)  # the same directory, tmp_path / "a"
    await first.runner.start()
    try:
        await wait_for(lambda: first.runner.ready()["joined"], 60, "the first worker joined and restored")
        with pytest.raises(StateDirInUse) as refused:
            await asyncio.wait_for(twin.runner.start(), 30)
        assert str(tmp_path / "a") in str(refused.value) and "its own data directory" in str(refused.value)
    finally:
        await first.runner.stop()
    replacement = Worker("a", kafka, namespace, tmp_path, restore_delay_s=0.0)
    await replacement.runner.start()  # the first one stopped: its directory is free again
    try:
        await wait_for(lambda: replacement.runner.ready()["joined"], 60, "the replacement joined and restored")
    finally:
        await replacement.runner.stop()
    assert not signals, "a restore failed and stopped a worker"


def test_every_store_opens_with_bounded_write_buffers(tmp_path) -> None:
    """A worker keeps all P stores open (owned and standby): each store's memtables are bounded (RocksDB's default,
    64 MB and up to 2 per store, made 12 stores x 500k entries 676 MB RSS). Read back from the OPTIONS file
    RocksDB writes at each open, as the store runs with them."""
    window = RocksKeyWindow("w", tmp_path / "w", "unused.changelog", "127.0.0.1:1", 600.0, 2, "g")
    for partition in (0, 1):
        db = window._open(partition)
        db.close()
        (written,) = (tmp_path / "w" / f"p{partition}").glob("OPTIONS-*")
        options = dict(
            line.strip().split("=", 1) for line in written.read_text().splitlines() if "=" in line and "[" not in line
        )
        assert int(options["write_buffer_size"]) <= 16 << 20, options["write_buffer_size"]
        assert int(options["max_write_buffer_number"]) == 2


def static_member(worker: Worker, standby: int = 1) -> Worker:
    """The worker joins under its name as a static member, `HIFI_LEAVE_GROUP_ON_STOP=auto`, with standbys."""
    worker.runner.group_instance_id = worker.name
    worker.runner.leave_group_on_stop = None
    worker.runner.standby_replicas = standby
    return worker


async def test_a_twin_refused_its_directory_removes_nothing_of_the_live_worker(kafka, namespace, tmp_path, monkeypatch):
    """A second process on a worker's data directory under its instance id fails at `_hold_directories`, and mode
    then stops it: its stop must not remove the static member it never was (before: auto + standby sent
    RemoveStaticMembers for the id, and the coordinator removed the LIVE worker holding it)."""
    import shared.restore
    from shared.membership import members_with_instance_id

    monkeypatch.setattr(shared.restore.os, "kill", lambda pid, sig: None)
    await ensure_topics(
        kafka.bootstrap, [f"{namespace}.source", f"{namespace}.window.changelog", f"{namespace}.dlq"], 4, 1
    )
    live = static_member(Worker("a", kafka, namespace, tmp_path, restore_delay_s=0.0))
    twin = static_member(Worker("a", kafka, namespace, tmp_path, restore_delay_s=0.0))
    await live.runner.start()
    try:
        await wait_for(lambda: live.runner.ready()["joined"], 60, "the live worker joined")
        group = live.runner.group
        holders = await members_with_instance_id(kafka.bootstrap, group, "a")
        assert len(holders) == 1
        revocations = live.runner.revocations
        with pytest.raises(StateDirInUse):
            await asyncio.wait_for(twin.runner.start(), 30)
        await asyncio.wait_for(twin.runner.stop(), 30)  # as mode does after a failed start
        assert await members_with_instance_id(kafka.bootstrap, group, "a") == holders, "the live member was removed"
        assert live.runner.revocations == revocations and live.runner.ready()["joined"]
    finally:
        await live.runner.stop()


class SenderWorker(Worker):
    """Sender-shaped: per event, skip it if the ledger has it, else deliver it (an effect) and mark it; the
    second delivery of worker "a" hangs (a sink request that never answers)."""

    def __init__(self, *args: Any, effects: list[tuple[str, str]]) -> None:
        super().__init__(*args)
        self.effects = effects
        self.requests = 0
        self.hung = asyncio.Event()

    async def handle(self, records: list[Record]) -> StepResult:
        for record in records:
            key = record.event.dedupe_key
            if (await self.window.seen([key], [record]))[0]:
                continue
            self.requests += 1
            if self.name == "a" and self.requests == 2 and len(records) == 2:
                self.hung.set()
                await asyncio.Event().wait()  # cancelled at the stop
            self.effects.append((self.name, key))
            await self.window.mark([key], [record])
        return StepResult()


@pytest.mark.slow  # over 10 s: `make quick` leaves it to `make test`
async def test_a_stop_whose_drain_timed_out_delivers_the_acked_request_once(kafka, namespace, tmp_path, monkeypatch):
    """A sender batch: request 1 acked and marked (the mark not yet in the changelog), request 2 hangs; the stop's
    drain times out. The worker must keep its partitions (its drain did not finish) and publish the unsent marks
    before its stores close: the peer taking over skips request 1's event (before: the member left, its marks were
    dropped, the peer's standby had none and delivered the event again)."""
    import shared.restore
    from shared.membership import members_with_instance_id

    monkeypatch.setattr(shared.restore.os, "kill", lambda pid, sig: None)
    source = f"{namespace}.source"
    await ensure_topics(kafka.bootstrap, [source, f"{namespace}.window.changelog", f"{namespace}.dlq"], 4, 1)
    effects: list[tuple[str, str]] = []
    a = static_member(SenderWorker("a", kafka, namespace, tmp_path, 0.0, effects=effects))
    b = static_member(SenderWorker("b", kafka, namespace, tmp_path, 0.0, effects=effects))
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", enable_idempotence=True, linger_ms=100)
    await producer.start()
    try:
        await a.runner.start()
        await b.runner.start()
        await wait_for(
            lambda: len(a.runner.ready()["partitions"]) == 2 == len(b.runner.ready()["partitions"]), 60, "2 + 2"
        )
        await wait_for(lambda: a.runner.ready()["joined"] and b.runner.ready()["joined"], 60, "both restored")
        partition = a.runner.ready()["partitions"][0]
        keys, sends = [], []
        for i in range(2):  # one producer batch (linger): one fetch, one handler call
            event = Event(event_id=f"e{i}", type="play", ts=time.time() * 1000, tenant="t", device_id="d")
            keys.append(event.dedupe_key)
            sends.append(await producer.send(source, encode_event(event), partition=partition))
        await asyncio.gather(*sends)
        await asyncio.wait_for(a.hung.wait(), 30)
        await a.runner.stop()
        assert await members_with_instance_id(kafka.bootstrap, a.runner.group, "a"), "left with its drain unfinished"
        await wait_for(lambda: any(key == keys[1] for _, key in effects), 60, "the peer delivers the hung request")
        assert [effect for effect in effects if effect[1] == keys[0]] == [("a", keys[0])], effects
    finally:
        await a.runner.stop()
        await b.runner.stop()
        await producer.stop()


async def test_a_lone_worker_keeps_its_membership_and_one_of_a_pair_leaves(kafka, namespace, tmp_path, monkeypatch):
    """Auto leave with standbys: a worker alone in its group keeps its partitions for its restart (leaving, its
    restart would rejoin an empty group and wait group.initial.rebalance.delay.ms); one of two leaves."""
    import shared.restore
    from shared.membership import members_with_instance_id

    monkeypatch.setattr(shared.restore.os, "kill", lambda pid, sig: None)
    await ensure_topics(
        kafka.bootstrap, [f"{namespace}.source", f"{namespace}.window.changelog", f"{namespace}.dlq"], 4, 1
    )
    lone = static_member(Worker("a", kafka, namespace, tmp_path, restore_delay_s=0.0))
    await lone.runner.start()
    try:
        await wait_for(lambda: lone.runner.ready()["joined"], 60, "the lone worker joined")
        holders = await members_with_instance_id(kafka.bootstrap, lone.runner.group, "a")
    finally:
        await lone.runner.stop()
    assert await members_with_instance_id(kafka.bootstrap, lone.runner.group, "a") == holders, "a lone worker left"
    a = static_member(Worker("a", kafka, namespace, tmp_path, restore_delay_s=0.0))
    b = static_member(Worker("b", kafka, namespace, tmp_path, restore_delay_s=0.0))
    await a.runner.start()
    await b.runner.start()
    try:
        await wait_for(lambda: a.runner.ready()["partitions"] and b.runner.ready()["partitions"], 60, "a pair")
        await a.runner.stop()
        assert not await members_with_instance_id(kafka.bootstrap, a.runner.group, "a"), "one of a pair kept its id"
    finally:
        await a.runner.stop()
        await b.runner.stop()


def test_a_busy_store_flushes_as_often_with_quiet_stores_open(tmp_path) -> None:
    """No write-buffer limit shared by the stores: with one, the quiet stores' memtables filled it and every write
    of the busy store flushed that store (98 SST files for 100k entries, instead of 1 or 2), on the event loop."""
    quiet = [RocksKeyWindow("w", tmp_path / "w", "c", "127.0.0.1:1", 600.0, 12, "g")._open(p) for p in range(11)]
    busy = RocksKeyWindow("w", tmp_path / "w", "c", "127.0.0.1:1", 600.0, 12, "g")._open(11)
    value = pack([1.0, "claim-xyz"])
    try:
        for i, store in enumerate(quiet):  # ~6 MB each: under one memtable, nothing flushed
            for start in range(0, 60_000, 500):
                batch = WriteBatch(raw_mode=True)
                for k in range(start, start + 500):
                    batch.put(f"tenant:quiet{i}:{k:012d}-xxxxxxxxxxxxxxxx".encode(), value)
                store.write(batch)
        for j in range(2_000):
            batch = WriteBatch(raw_mode=True)
            for k in range(50):
                batch.put(f"tenant:busy:{j:08d}:{k:04d}-xxxxxxxxxxxxxxxx".encode(), value)
            busy.write(batch)
        flushed = len(list((tmp_path / "w" / "p11").glob("*.sst")))
        assert flushed <= 4, f"the busy store flushed into {flushed} SST files"
    finally:
        for store in [*quiet, busy]:
            store.close()


@pytest.mark.slow  # over 10 s: `make quick` leaves it to `make test`
async def test_a_worker_back_from_a_planned_stop_catches_up_before_it_joins(
    kafka, namespace, tmp_path, caplog, monkeypatch
):
    """One of a pair stops (it leaves; the peer takes its partitions and writes their changelog), then starts again
    on its data directory. Its standbys bring those partitions up to the changelog's end before it joins, so the
    restore after the handback applies almost nothing (before: every entry the peer wrote meanwhile, while the
    partitions handed back stalled). A worker whose membership is still in the group (a lone worker keeps it)
    joins at once: its partitions wait for it."""
    import shared.restore

    monkeypatch.setattr(shared.restore.os, "kill", lambda pid, sig: None)
    caplog.set_level(logging.INFO, logger="shared.keywindow")
    caplog.set_level(logging.INFO, logger="shared.stage")
    source = f"{namespace}.source"
    await ensure_topics(kafka.bootstrap, [source, f"{namespace}.window.changelog", f"{namespace}.dlq"], 4, 1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    sent = 0

    async def produce(count: int) -> None:
        nonlocal sent
        await send_events(producer, source, sent, count)
        sent += count

    a = static_member(Worker("a", kafka, namespace, tmp_path, restore_delay_s=0.0))
    b = static_member(Worker("b", kafka, namespace, tmp_path, restore_delay_s=0.0))
    workers = [a, b]

    def handled() -> int:
        return len({k for w in workers for k in w.handled})

    try:
        await a.runner.start()
        await b.runner.start()
        await wait_for(lambda: a.runner.ready()["joined"] and b.runner.ready()["joined"], 60, "a pair")
        await produce(200)
        await wait_for(lambda: handled() >= sent, 60, "the pair handles the first events")
        await a.runner.stop()  # one of a pair: it leaves
        await wait_for(lambda: b.runner.ready()["partitions"] == [0, 1, 2, 3] and b.runner.ready()["joined"], 60, "b")
        await produce(1000)  # b writes the changelog of a's partitions too
        await wait_for(lambda: handled() >= sent, 60, "b handles the events of a's partitions")
        back = static_member(Worker("a", kafka, namespace, tmp_path, restore_delay_s=0.0))
        back.window.name = "w-a2"
        workers.append(back)
        await back.runner.start()
        await wait_for(
            lambda: len(back.runner.ready()["partitions"]) == 2 and back.runner.ready()["joined"], 60, "a is back"
        )
        applied = restored_entries(caplog, "w-a2")
        print(f"the handback's restore applied {applied} entries (b wrote about 500 to those partitions meanwhile)")
        assert applied <= 20, f"the returning worker replayed {applied} entries after it joined"
        assert any("warmed up" in r.getMessage() for r in caplog.records if r.name == "shared.stage")
    finally:
        for w in workers:
            await w.runner.stop()
        await producer.stop()
    caplog.clear()
    lone = static_member(Worker("c", kafka, namespace, tmp_path, restore_delay_s=0.0))
    lone.runner.group = f"{lone.runner.group}-lone"  # a group of its own: it stays alone in it
    try:
        await lone.runner.start()
        await wait_for(lambda: lone.runner.ready()["joined"], 60, "the lone worker joined")
    finally:
        await lone.runner.stop()  # alone: keeps its membership
    again = static_member(Worker("c", kafka, namespace, tmp_path, restore_delay_s=0.0))
    again.runner.group = lone.runner.group
    try:
        await again.runner.start()
        await wait_for(lambda: again.runner.ready()["joined"], 60, "the lone worker is back")
        assert not any("warmed up" in r.getMessage() for r in caplog.records), "a member still in its group waited"
    finally:
        await again.runner.stop()


async def test_a_worker_stopped_while_it_warms_up_never_joins(kafka, namespace, tmp_path, monkeypatch):
    """SIGTERM during the warm-up: mode runs `on_stop` while `on_start` still waits for the standbys, and never
    `on_started` after. The warm-up must end there and `on_start` must not go on to join the group: a member
    joined by then would hold its partitions, unread, until its session timed out."""
    import shared.restore
    from shared.membership import group_members

    monkeypatch.setattr(shared.restore.os, "kill", lambda pid, sig: None)
    await ensure_topics(
        kafka.bootstrap, [f"{namespace}.source", f"{namespace}.window.changelog", f"{namespace}.dlq"], 4, 1
    )
    peer = static_member(Worker("b", kafka, namespace, tmp_path, restore_delay_s=0.0))
    warming = static_member(Worker("a", kafka, namespace, tmp_path, restore_delay_s=0.0))
    warming.runner.warm_up_max_s = 3.0
    monkeypatch.setattr(warming.window, "standby_warm", lambda max_lag: False)  # never caught up
    await peer.runner.start()
    try:
        await wait_for(lambda: peer.runner.ready()["joined"], 60, "the peer joined")
        starting = asyncio.create_task(warming.runner.start())
        await wait_for(lambda: warming.runner.warming, 30, "a warms up before it joins")
        await warming.runner.stop()
        await asyncio.wait_for(asyncio.gather(starting, return_exceptions=True), 10)
        await asyncio.sleep(4.0)  # past the warm-up's bound: a start that went on would have joined by now
        members = await group_members(kafka.bootstrap, peer.runner.group)
        assert [instance for _, instance in members] == ["b"], members
        assert warming.runner.consumer is None
    finally:
        await warming.runner.stop()
        await peer.runner.stop()


@pytest.mark.slow  # over 10 s: `make quick` leaves it to `make test`
async def test_a_rebalance_keeps_the_open_stores_of_partitions_that_come_straight_back(kafka, namespace, tmp_path):
    """aiokafka revokes every partition at each rebalance. A worker's stores stay open through it, and those of
    the partitions assigned back in the next generation are not closed and reopened (before: every store closed
    at the revocation, a memtable flush each, then reopened and restored, all while the group waited). A worker
    whose generation does not follow (it may have been evicted, and another owner wrote meanwhile) reopens and
    restores them. Either way every copy of an event seen before is still dropped."""
    import shared.restore

    signals: list[int] = []
    original_kill = shared.restore.os.kill
    shared.restore.os.kill = lambda pid, sig: signals.append(sig)  # type: ignore[assignment]
    source = f"{namespace}.source"
    await ensure_topics(kafka.bootstrap, [source, f"{namespace}.window.changelog", f"{namespace}.dlq"], 4, 1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", enable_idempotence=True)
    await producer.start()

    async def produce(first: int, count: int) -> None:
        await send_events(producer, source, first, count)

    a = Worker("a", kafka, namespace, tmp_path, restore_delay_s=0.0)
    b = Worker("b", kafka, namespace, tmp_path, restore_delay_s=0.0)
    opened: list[int] = []  # partitions a opened as owner (new stores: a restore each)
    open_as_owner = a.window.open

    def counting_open(partitions: list[int]) -> list[int]:
        new = open_as_owner(partitions)
        opened.extend(new)
        return new

    a.window.open = counting_open  # type: ignore[method-assign]

    def handled() -> Counter[str]:
        return Counter(k for w in (a, b) for k in w.handled)

    try:
        await a.runner.start()
        await wait_for(lambda: a.runner.ready()["joined"], 60, "a alone")
        await produce(0, 200)
        await wait_for(lambda: len(handled()) >= 200, 60, "a handles the first events")
        assert sorted(opened) == [0, 1, 2, 3]
        opened.clear()
        await b.runner.start()
        await wait_for(
            lambda: (
                a.runner.ready()["joined"] and b.runner.ready()["joined"] and len(b.runner.ready()["partitions"]) == 2
            ),
            60,
            "a pair",
        )
        kept = a.runner.ready()["partitions"]
        assert opened == [], f"a reopened the stores of {opened}, assigned back right after the revocation"
        assert sorted(a.window.dbs) == kept, "a closed the stores it gave away"
        await produce(0, 200)  # copies: dropped by whichever worker owns the partition now
        await produce(200, 50)
        await wait_for(lambda: len(handled()) >= 250, 60, "the new events handled")
        # Pretend a missed a generation (evicted and back): its stores must be reopened and restored.
        a.runner._owned_generation -= 5
        await b.runner.stop()
        await wait_for(lambda: a.runner.ready()["joined"] and a.runner.ready()["partitions"] == [0, 1, 2, 3], 60, "a")
        assert sorted(opened) == [0, 1, 2, 3], f"after a generation gap a reopened only {opened}"
        await produce(0, 250)
        await produce(250, 50)
        await wait_for(lambda: len(handled()) >= 300, 60, "the last events handled")
        await asyncio.sleep(2.0)  # a copy that passed would show up right behind
        twice = {k: n for k, n in handled().items() if n > 1}
        assert not twice, f"{len(twice)} copies passed: {sorted(twice)[:10]}"
        assert not signals, "a restore failed and stopped a worker"
    finally:
        shared.restore.os.kill = original_kill  # type: ignore[assignment]
        await a.runner.stop()
        await b.runner.stop()
        await producer.stop()


async def test_a_standby_behind_the_log_start_counts_what_retention_removed_as_applied(kafka, namespace, tmp_path):
    """A standby store whose checkpoint is older than its changelog partition's log start (a new volume, or a
    partition with no write for longer than the retention) finds nothing to apply below the start. It must count
    itself caught up there, as a restore does (`max(applied, log start)`); before, its lag stayed at the deleted
    records for good, so every warm-up before a join ran out its whole bound."""
    from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

    changelog = f"{namespace}.window.changelog"
    await ensure_topics(kafka.bootstrap, [changelog], 2, 1)
    await _fill_changelog(kafka.bootstrap, changelog, 2, 20, 1)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        await admin.delete_records({TopicPartition(changelog, 1): RecordsToDelete(20)}, timeout_ms=10_000)
    finally:
        await admin.close()
    window = RocksKeyWindow("w", tmp_path / "w", changelog, kafka.bootstrap, 600.0, 2, "g")
    window.start_standby()
    standby = window.standby
    assert standby is not None
    try:
        await wait_for(lambda: standby.lag().get(0) == 0, 30, "partition 0 caught up")
        await wait_for(lambda: standby.lag().get(1) is not None, 30, "partition 1 fetched")
        await asyncio.sleep(1.0)  # a few more fetches
        assert standby.lag() == {0: 0, 1: 0}, standby.lag()
        assert window.standby_warm(0)
    finally:
        await window.stop_standby()


async def test_a_worker_stopped_while_it_looks_its_group_up_starts_no_standby(kafka, namespace, tmp_path, monkeypatch):
    """SIGTERM while the start asks the coordinator whether this worker is still a member: `on_stop` has run (and
    found no standby to stop) by the time the answer comes; the start must not begin one then (before: its task
    tailed on, with a consumer, after the worker had stopped)."""
    import shared.restore
    import shared.stage

    monkeypatch.setattr(shared.restore.os, "kill", lambda pid, sig: None)
    await ensure_topics(
        kafka.bootstrap, [f"{namespace}.source", f"{namespace}.window.changelog", f"{namespace}.dlq"], 4, 1
    )
    peer = static_member(Worker("b", kafka, namespace, tmp_path, restore_delay_s=0.0))
    slow = static_member(Worker("a", kafka, namespace, tmp_path, restore_delay_s=0.0))
    look_up = shared.stage.group_members

    async def slow_lookup(bootstrap: str, group: str) -> list[tuple[str, str]]:
        await asyncio.sleep(1.5)
        return await look_up(bootstrap, group)

    monkeypatch.setattr(shared.stage, "group_members", slow_lookup)
    await peer.runner.start()
    try:
        await wait_for(lambda: peer.runner.ready()["joined"], 60, "the peer joined")
        starting = asyncio.create_task(slow.runner.start())
        await asyncio.sleep(0.5)
        await slow.runner.stop()
        await asyncio.wait_for(asyncio.gather(starting, return_exceptions=True), 10)
        await asyncio.sleep(1.0)
        standby = slow.window.standby
        assert standby is None or standby._task is None or standby._task.done(), "a standby tails after the stop"
        assert slow.runner.consumer is None
    finally:
        await slow.runner.stop()
        await peer.runner.stop()
        if slow.window.standby is not None:
            await slow.window.stop_standby()


@pytest.mark.slow  # over 10 s: `make quick` leaves it to `make test`
async def test_a_store_whose_restore_a_rebalance_cut_short_is_restored_when_it_comes_back(
    kafka, namespace, tmp_path, monkeypatch
):
    """Two rebalances back to back (review of the kept stores): a's restore of its first assignment is cancelled
    by the rebalance b's join starts, and a gets two partitions straight back. Their stores were open but not
    restored: they must be restored, not kept as they are (before: kept, read at once, 193 of 400 copies of
    events claimed before passed the window)."""
    import shared.restore

    signals: list[int] = []
    monkeypatch.setattr(shared.restore.os, "kill", lambda pid, sig: signals.append(sig))
    source = f"{namespace}.source"
    await ensure_topics(kafka.bootstrap, [source, f"{namespace}.window.changelog", f"{namespace}.dlq"], 4, 1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", enable_idempotence=True)
    await producer.start()

    async def produce(first: int, count: int) -> None:
        await send_events(producer, source, first, count)

    c = Worker("c", kafka, namespace, tmp_path, restore_delay_s=0.0)
    a = Worker("a", kafka, namespace, tmp_path, restore_delay_s=8.0)  # its first restore waits 8 s first
    b = Worker("b", kafka, namespace, tmp_path, restore_delay_s=0.0)
    workers = [c, a, b]

    def handled() -> Counter[str]:
        return Counter(k for w in workers for k in w.handled)

    try:
        await c.runner.start()
        await produce(0, 400)
        await wait_for(lambda: len(handled()) >= 400, 60, "c handles the first events")
        await c.runner.stop()  # every claim in the changelog; c leaves the group
        await a.runner.start()
        await wait_for(lambda: a.assignments >= 1, 30, "a assigned (its restore waits)")
        await b.runner.start()
        await wait_for(
            lambda: (
                a.runner.ready()["joined"] and b.runner.ready()["joined"] and len(b.runner.ready()["partitions"]) == 2
            ),
            60,
            "a pair",
        )
        await produce(0, 400)  # copies: every one must be dropped
        await produce(400, 40)
        await wait_for(lambda: len(handled()) >= 440, 60, "the new events handled")
        await asyncio.sleep(2.0)  # a copy that passed would show up right behind
        twice = {k: n for k, n in handled().items() if n > 1}
        assert not twice, f"{len(twice)} copies passed: {sorted(twice)[:10]}"
        assert not signals
    finally:
        for w in workers:
            await w.runner.stop()
        await producer.stop()
