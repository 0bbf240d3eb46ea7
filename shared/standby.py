"""Standby replicas of a RocksDB key window (Kafka Streams' `num.standby.replicas`): warm copies of the stores
of the source partitions this worker does NOT own, so that taking one over replays only the changelog's tail.

A background task tails those changelog partitions (its own consumer, no group, manual assignment) into the
same per-partition stores and checkpoint files the owned partitions use (`RocksKeyWindow`): an assignment's
restore then starts at the standby's checkpoint. One writer per store at any time:
- before a partition's owned store opens, `release` stops applying to it, syncs its WAL, closes it and
  writes its checkpoint (only what it applied);
- after a revocation the owned store is closed and checkpointed first (`RocksKeyWindow.revoke`), and only
  then is the partition standby again.
Every store open or close of the standby happens under one lock, so `release` never races an open in a thread;
the lock is held for one open at a time, so a release waits for at most one (a WAL replay after a kill -9).
The standby opens nothing and applies nothing while `hold_back_while()` (the worker has not joined, but for its
warm-up before the join, or restores owned partitions) or the window restores owned partitions: those are what the
worker waits for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord
from rocksdict import Rdict

from shared.retry import Backoff


class StandbyStores(Protocol):
    """What a standby reads and calls of its window (`RocksKeyWindow`): its layout, which partitions it owns,
    and its own store primitives, so a standby store is opened, applied and checkpointed as an owned one."""

    name: str
    bootstrap: str
    changelog_topic: str
    partitions: int
    dbs: dict[int, Rdict]
    owning: set[int]
    restores_running: int

    def _open(self, partition: int) -> Rdict: ...

    def _read_checkpoint(self, partition: int) -> int: ...

    def _write_checkpoint(self, partition: int, offset: int) -> None: ...

    def _apply_record(
        self, db: Rdict, partition: int, offset: int, value: bytes | None, only_absent: bool = False
    ) -> int: ...


log = logging.getLogger(__name__)

STANDBY_BACKOFF = Backoff(
    0.5, 30.0
)  # a broker outage: retried for ever, at most every 30 s (a later restore is slower)
FETCH_TIMEOUT_MS = 500  # how soon a partition given back by a revocation starts to be tailed
PAUSE_POLL_S = 0.05  # how often a paused standby looks whether it may go on (a restore ended)

T = TypeVar("T")


async def _in_thread_even_if_cancelled(call: Callable[[], T]) -> T:
    """`call()` in a thread; cancelled, still wait for the thread (it runs on regardless) before raising."""
    task = asyncio.ensure_future(asyncio.to_thread(call))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


class StandbyReplica:
    """Tails the changelog partitions a window does not own into its standby stores (see the module docstring)."""

    def __init__(
        self,
        window: StandbyStores,
        backoff: Backoff = STANDBY_BACKOFF,
        hold_back_while: Callable[[], bool] | None = None,
    ) -> None:
        self.window = window
        self.backoff = backoff
        self.hold_back_while = hold_back_while  # True: the worker needs the loop and the disk for its owned partitions
        self.dbs: dict[int, Rdict] = {}
        self.applied: dict[int, int] = {}  # partition -> next changelog offset its standby store reflects
        self.highwater: dict[int, int] = {}  # partition -> the changelog's end as the last fetch told it
        self.applied_entries = 0  # entries applied since start (tests, and how busy it is)
        self.failures = 0  # consecutive failed attempts of the tailing loop
        self.errors: dict[int, str] = {}  # partition -> why its standby store failed to open (retried later)
        self._open_failures: dict[int, int] = {}  # partition -> consecutive failed opens
        self._retry_at: dict[int, float] = {}  # partition -> monotonic time of its next open attempt
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"{self.window.name}-standby")

    async def stop(self) -> None:
        """Stop applying, then checkpoint and close every standby store (the owned ones are the runner's)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])
        async with self._lock:
            for p in list(self.dbs):
                await self._close(p)

    def wanted(self) -> set[int]:
        """The partitions this worker neither owns nor is about to open as owner."""
        window = self.window
        return set(range(window.partitions)) - window.owning - set(window.dbs)

    def lag(self) -> dict[int, int | None]:
        """Changelog records each standby partition is behind (None: no fetch answered yet, or its store failed
        to open: see `errors`)."""
        lag: dict[int, int | None] = {}
        for p in sorted(set(self.dbs) | (set(self.errors) & self.wanted())):
            end = self.highwater.get(p) if p in self.dbs else None
            lag[p] = None if end is None else max(0, end - self.applied.get(p, 0))
        return lag

    def held_back(self) -> bool:
        """The worker restores owned partitions (or waits for its first assignment): they have the loop and the disk."""
        return self.window.restores_running > 0 or (self.hold_back_while is not None and self.hold_back_while())

    async def _wait_while_held_back(self) -> None:
        # Polled: the condition is others' state (the restorer's set, a counter), with no event to await.
        while self.held_back():  # noqa: ASYNC110
            await asyncio.sleep(PAUSE_POLL_S)

    def changed(self) -> None:
        """The owned partitions changed (a revocation gave some back): tail the new set."""
        self._changed.set()

    async def release(self, partitions: list[int]) -> None:
        """Close these partitions' standby stores, checkpointed, before their owner opens them. The caller has
        already added them to `window.owning`, so a standby open finishing meanwhile is closed here."""
        async with self._lock:
            for p in partitions:
                await self._close(p)
        self._changed.set()

    def checkpoint(self) -> None:
        """Save each standby store's applied offset after syncing its WAL, as `RocksKeyWindow.checkpoint`."""
        for p, db in list(self.dbs.items()):
            offset = self.applied.get(p, 0)  # read before the sync: everything it covers is in the WAL
            db.flush_wal(True)
            self.window._write_checkpoint(p, offset)

    async def _close(self, partition: int) -> None:
        """Close (checkpointed) under the caller's lock, in a thread: the close flushes the memtable (hundreds
        of ms for a large one), and the owner's open waits on the lock until it is done."""
        db = self.dbs.pop(partition, None)
        if db is None:
            return
        offset = self.applied.pop(partition, 0)
        self.highwater.pop(partition, None)
        await _in_thread_even_if_cancelled(db.close)  # the checkpoint below never runs ahead of the store
        self.window._write_checkpoint(partition, offset)

    def close_now(self, partition: int) -> None:
        """`_close` on the loop, for a caller that cannot wait (a write for a partition not held)."""
        db = self.dbs.pop(partition, None)
        if db is None:
            return
        offset = self.applied.pop(partition, 0)
        self.highwater.pop(partition, None)
        db.close()
        self.window._write_checkpoint(partition, offset)

    # -- tailing -----------------------------------------------------------------------------------

    async def _run(self) -> None:
        """Tail for ever: any failure is logged and retried with backoff (never the worker's end)."""
        while True:
            try:
                await self._tail()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures += 1
                delay = self.backoff.delay(self.failures)
                level = logging.WARNING if self.failures < 10 else logging.ERROR
                log.log(
                    level,
                    "%s: standby tailing failed (attempt %d), retrying in %.1fs: %r",
                    self.window.name,
                    self.failures,
                    delay,
                    exc,
                )
                await asyncio.sleep(delay)

    async def _sync_stores(self) -> None:
        """Close (checkpointed) the stores no longer wanted, open those newly wanted: one open per hold of the
        lock, `wanted()` checked again before each (an owner's release waits for one open at most). A store
        that fails to open is skipped and retried later with backoff; the others are tailed meanwhile."""
        for p in sorted(set(self.dbs) - self.wanted()):
            async with self._lock:
                await self._close(p)
        for p in list(self.errors):
            if p not in self.wanted():  # owned now: its owner's open reports its own errors
                self._forget_failure(p)
        while True:
            await self._wait_while_held_back()
            now = time.monotonic()
            todo = sorted(p for p in self.wanted() - set(self.dbs) if self._retry_at.get(p, 0.0) <= now)
            if not todo:
                return
            p = todo[0]
            async with self._lock:
                if p not in self.wanted() or p in self.dbs:
                    continue  # claimed by an owner meanwhile
                try:
                    # In a thread: a WAL replay after a kill -9 may take a while. Stopped meanwhile, the thread runs
                    # on: wait for it and close the store, or its lock would refuse the owner's open later on.
                    opening = asyncio.ensure_future(asyncio.to_thread(self.window._open, p))
                    try:
                        db = await asyncio.shield(opening)
                    except asyncio.CancelledError:
                        await asyncio.wait([opening])
                        if not opening.cancelled() and opening.exception() is None:
                            opening.result().close()
                        raise
                except Exception as exc:
                    self._open_failed(p, exc)
                    continue
                if p in self.errors:
                    log.info("%s: standby store of partition %d opened after %r", self.window.name, p, self.errors[p])
                self._forget_failure(p)
                self.dbs[p] = db
                self.applied[p] = self.window._read_checkpoint(p)
                if p not in self.wanted():  # the owner claimed it while it opened: give it back at once
                    await self._close(p)

    def _open_failed(self, partition: int, exc: Exception) -> None:
        """Log a partition's first failed open (later ones quietly), and retry it later with backoff."""
        attempt = self._open_failures[partition] = self._open_failures.get(partition, 0) + 1
        delay = self.backoff.delay(attempt)
        self._retry_at[partition] = time.monotonic() + delay
        self.errors[partition] = repr(exc)
        log.log(
            logging.WARNING if attempt == 1 else logging.DEBUG,
            "%s: standby store of partition %d failed to open (attempt %d), skipped, retried in %.1fs: %r",
            self.window.name,
            partition,
            attempt,
            delay,
            exc,
        )

    def _forget_failure(self, partition: int) -> None:
        self.errors.pop(partition, None)
        self._open_failures.pop(partition, None)
        self._retry_at.pop(partition, None)

    async def _tail(self) -> None:
        window = self.window
        consumer = AIOKafkaConsumer(
            bootstrap_servers=window.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",  # a checkpoint before the log start (retention): what is left is all there is
        )
        try:
            await consumer.start()  # inside: a start that fails (broker down) still closes what it opened
            tailed: dict[int, Rdict] = {}
            while True:
                self._changed.clear()
                await self._sync_stores()
                if tailed != self.dbs:
                    tailed = dict(self.dbs)
                    tps = [TopicPartition(window.changelog_topic, p) for p in sorted(tailed)]
                    consumer.assign(tps)  # a new assignment forgets positions: every one is sought again
                    starts = await consumer.beginning_offsets(tps)
                    for tp in tps:
                        # Below the log start there is nothing left to apply (retention), as a restore counts it.
                        self.applied[tp.partition] = max(self.applied[tp.partition], starts[tp])
                        consumer.seek(tp, self.applied[tp.partition])
                if not tailed:
                    retry_in = min(self._retry_at.values(), default=None)
                    timeout = None if retry_in is None else max(0.0, retry_in - time.monotonic())
                    try:
                        await asyncio.wait_for(self._changed.wait(), timeout)
                    except TimeoutError:
                        pass  # a failed store's next attempt is due
                    continue
                await self._wait_while_held_back()
                fetched = await consumer.getmany(timeout_ms=FETCH_TIMEOUT_MS)
                self.failures = 0
                for tp, records in fetched.items():
                    await self._apply(tp.partition, records)
                for p in list(self.dbs):
                    tp = TopicPartition(window.changelog_topic, p)
                    end = consumer.highwater(tp)
                    if end is not None:
                        self.highwater[p] = end
                    if tailed.get(p) is self.dbs.get(p) and tp in consumer.assignment():  # the store fetched for
                        # Reset past records retention deleted while this store was behind: nothing to apply there.
                        self.applied[p] = max(self.applied[p], await consumer.position(tp))
        finally:
            await consumer.stop()

    async def _apply(self, partition: int, records: list[ConsumerRecord]) -> None:  # type: ignore[type-arg]
        """Apply fetched records as a restore does, yielding after each and waiting while held back (`held_back`);
        stop at once if the store was released."""
        db = self.dbs.get(partition)
        for record in records:
            if self.held_back():
                await self._wait_while_held_back()
            if db is None or self.dbs.get(partition) is not db:
                return  # released (its owner opens it) or closed: not one more write
            if record.offset < self.applied[partition]:
                continue  # fetched before a seek back to the checkpoint
            self.applied_entries += self.window._apply_record(db, partition, record.offset, record.value)
            self.applied[partition] = record.offset + 1
            await asyncio.sleep(0)  # one record is up to a batch of entries: let heartbeats run
