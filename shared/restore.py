"""Restoring the state a stage keeps with its partitions (a RocksDB key window) when it is assigned them.

aiokafka sends no heartbeats while its assignment callback runs, so the runner only pauses the newly owned
partitions there; a background task opens and restores their stores while the worker heartbeats, and
resumes each partition at its committed offset once every store of it is restored (a state with a standby
replica first releases the partition's warm standby store, so the restore replays only the changelog's tail).
The stores are checkpointed every `checkpoint_interval_s`, so a kill -9 replays only the changelog's tail.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import sentry_sdk
from aiokafka import AIOKafkaConsumer, TopicPartition

from shared.publish import transient
from shared.retry import Backoff
from shared.step import PartitionedState, StandbyState

log = logging.getLogger(__name__)

# A restore that meets a broker outage retries this many times (about a minute) before stopping the worker.
RESTORE_ATTEMPTS = 10
BROKER_BACKOFF = Backoff(0.5, 10.0)


async def _finished_even_if_cancelled(call: Awaitable[list[int]]) -> list[int]:
    """Await `call`; cancelled, still wait for it (a thread opening stores runs on regardless) before raising:
    the revocation that cancelled it then closes what it opened, and no standby opens a store it holds."""
    task = asyncio.ensure_future(call)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


class RestoringView(Protocol):
    """What a restore reads and moves in the StageRunner."""

    consumer: AIOKafkaConsumer | None
    committed: dict[TopicPartition, int]  # where each partition resumes
    assigned: set[TopicPartition]  # a restored partition joins these: read from
    readable_since: dict[TopicPartition, float]


class StateRestorer:
    """Opens, restores, checkpoints and resumes the partitioned states of one stage's source partitions."""

    def __init__(self, runner: RestoringView, stage: str, source: str, states: list[PartitionedState]) -> None:
        self.runner = runner
        self.stage = stage
        self.source = source
        self.states = states
        self.restoring: set[TopicPartition] = set()  # owned, paused until their state is restored
        self._task: asyncio.Task[None] | None = None
        self._cancelled = False  # since the last `begin`: a revocation (or shutdown) began, `extend` refuses

    def begin(self, sources: list[TopicPartition]) -> None:
        """Restore the states of these (paused) source partitions in the background."""
        self._cancelled = False
        self.restoring = set(sources) if self.states else set()
        if self.restoring:
            partitions = [tp.partition for tp in sources]
            self._task = asyncio.create_task(self._restore(partitions), name=f"{self.stage}-restore")

    def extend(self, sources: list[TopicPartition]) -> None:
        """Restore these (paused) source partitions too, after the restore in progress: partitions whose start
        the coordinator told late (shared/rebalance.py). Refused once a revocation began (`cancel`): the
        partitions are no longer this worker's, and their stores are being closed."""
        if not self.states or not sources or self._cancelled:
            return
        self.restoring |= set(sources)
        previous = self._task
        partitions = [tp.partition for tp in sources]
        self._task = asyncio.create_task(self._restore_after(previous, partitions), name=f"{self.stage}-restore")

    async def _restore_after(self, previous: asyncio.Task[None] | None, partitions: list[int]) -> None:
        if previous is not None:
            await previous  # a cancel of this task reaches the one it waits for
        await self._restore(partitions)

    async def cancel(self) -> None:
        """A revocation (or shutdown) during a restore: stop it; the stores' checkpoints cover what it applied."""
        task, self._task = self._task, None
        self._cancelled = True
        self.restoring = set()
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])  # its cancellation is not ours: a cancelled caller still raises

    async def _restore(self, partitions: list[int]) -> None:
        """Open and restore every state of these partitions (heartbeats go on); resume each when done.

        A transient broker error is retried (`RESTORE_ATTEMPTS`, backoff with jitter) from where each
        state got to; any other failure, or one that outlasts the retries, stops the worker.
        """
        pending = {p: 0 for p in partitions}
        try:
            for state in self.states:
                if isinstance(state, StandbyState):  # on the loop, before the open: one writer per store
                    await state.release(partitions)
                for p in await _finished_even_if_cancelled(asyncio.to_thread(state.open, partitions)):
                    pending[p] += 1
        except Exception as exc:
            self._failed(partitions, exc)
            return
        for p in partitions:
            if not pending[p]:
                self._resume(TopicPartition(self.source, p))
        log.info("%s: restoring partitions %s", self.stage, sorted(p for p in pending if pending[p]))
        try:
            for state in self.states:
                left = sorted(p for p, n in pending.items() if n)  # this state's share: opened by it, not restored
                reported: set[int] = set()

                def restored(partition: int, reported: set[int] = reported) -> None:
                    reported.add(partition)
                    pending[partition] -= 1
                    if pending[partition] == 0:
                        self._resume(TopicPartition(self.source, partition))

                await self._retry_transient(
                    f"restore of {state.changelog_topic}",
                    lambda s=state, todo=left, seen=reported: s.restore([p for p in todo if p not in seen], restored),
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(partitions, exc)

    async def _retry_transient(self, what: str, call: Callable[[], Awaitable[None]]) -> None:
        """`call()` until it succeeds, retrying transient broker errors with backoff and jitter up to
        `RESTORE_ATTEMPTS` times; any other error, or the last transient one, is raised."""
        attempt = 0
        while True:
            try:
                await call()
                return
            except Exception as exc:
                attempt += 1
                if not transient(exc) or attempt >= RESTORE_ATTEMPTS:
                    raise
                delay = BROKER_BACKOFF.delay(attempt)
                log.warning("%s: %s failed (attempt %d), retrying in %.1fs: %r", self.stage, what, attempt, delay, exc)
                await asyncio.sleep(delay)

    def _resume(self, tp: TopicPartition) -> None:
        """Read a restored partition from its committed offset, dropping anything fetched before."""
        runner = self.runner
        consumer = runner.consumer
        assert consumer is not None
        if tp not in self.restoring:  # revoked meanwhile
            return
        committed = runner.committed.get(tp)
        if committed is not None:
            consumer.seek(tp, committed)
        self.restoring.discard(tp)
        runner.assigned.add(tp)
        runner.readable_since[tp] = time.monotonic()
        consumer.resume(tp)
        log.info("%s: partition %d restored, reading it", self.stage, tp.partition)

    def _failed(self, partitions: list[int], exc: Exception) -> None:
        # Reading on without the state would pass duplicates: fail loudly and let a restart retry.
        log.critical(
            "%s: could not restore partitions %s; shutting the worker down", self.stage, partitions, exc_info=exc
        )
        sentry_sdk.capture_exception(exc)
        os.kill(os.getpid(), signal.SIGTERM)

    async def checkpoint_every(self, interval_s: Callable[[], float]) -> None:
        """Catch each store up with other owners' changelog records, then checkpoint it, every `interval_s()`."""
        while True:
            await asyncio.sleep(interval_s())
            for state in self.states:
                try:
                    await state.catch_up()
                except Exception as exc:
                    if not transient(exc):
                        raise
                    # The gap stays noted (`catch_up` keeps it) and the checkpoint stays before it: retried
                    # at the next interval, so a broker outage costs a slower restore, not the worker.
                    log.warning("%s: catch-up of %s failed: %r", self.stage, state.changelog_topic, exc)
                state.checkpoint()
