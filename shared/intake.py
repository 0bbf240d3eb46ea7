"""Steps 1-3 of a stage's commit sequence (see shared/stage.py): fetch a batch, keep it only while the
assignment it was fetched under holds and its partitions are restored, decode it, handle it, and send
what it produced; the acker in stage.py marks it done once the broker has it.

`BatchIntake` is a part of StageRunner, not a separate object (like `Rebalancing`): it reads the runner's
consumer, batch lock, in-flight queue and ownership, and tests call `process_batch` on the runner.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord

from shared.audit import batch_tallies
from shared.codec import decode_event
from shared.dlq import DeadLetter
from shared.errors import InvalidEvent
from shared.flight import FlightSender, InFlight
from shared.handling import RetryingStep, Revoked
from shared.linger import linger
from shared.membership import InstanceIdTaken, fenced
from shared.metrics import StageMetrics
from shared.publish import Output
from shared.step import Ownership, PartitionedState, Record, StepResult

log = logging.getLogger(__name__)


class BatchIntake:
    """StageRunner's consume loop and batch processing (see the module's docstring)."""

    # The runner's state the loop reads and moves (StageRunner sets them).
    stage: str
    group: str
    group_instance_id: str | None
    metrics: StageMetrics
    batch_max: int
    batch_linger_s: float
    max_message_bytes: int
    consumer: AIOKafkaConsumer | None
    flights: FlightSender
    step: RetryingStep
    states: list[PartitionedState]
    tallies: str | None
    bucket_s: int
    last_timestamp: dict[TopicPartition, float]
    assigned: set[TopicPartition]
    _stopping: bool
    _owner: Ownership
    _in_flight: asyncio.Queue[InFlight] | None
    _batch_lock: asyncio.Lock | None
    _handling: asyncio.Task[StepResult] | None
    hold_dead_letters: Callable[[list[ConsumerRecord]], None] | None  # type: ignore[type-arg]

    async def _consume(self) -> None:
        assert self.consumer is not None and self._in_flight is not None and self._batch_lock is not None
        phase = self.metrics.batch_phase.labels(self.stage, "wait")
        waited = time.perf_counter()
        while not self._stopping:
            # Fetch outside the lock: during a rebalance aiokafka's getmany waits for the new assignment,
            # and the rebalance first runs `_on_revoked`, which takes the lock.
            try:
                fetched = await self.consumer.getmany(timeout_ms=100, max_records=self.batch_max)
            except KafkaError as exc:  # e.g. a fatal fetch error; the fetcher itself rides out outages
                if self.group_instance_id is not None and fenced(exc):  # error 82 from a JoinGroup or SyncGroup
                    self._fence(InstanceIdTaken(self.group, self.group_instance_id, repr(exc)))
                    break
                log.warning("%s: fetch failed: %r", self.stage, exc)
                await asyncio.sleep(1.0)
                continue
            owner = self._owner  # read with no await since getmany returned
            messages = [m for batch in fetched.values() for m in batch]
            if not messages:
                continue
            if self.batch_linger_s > 0:
                fetched, messages, owner = await linger(
                    self.consumer,
                    fetched,
                    owner,
                    lambda: self._owner,
                    self.batch_max,
                    self.batch_linger_s,
                    lambda: self._stopping,
                    self.stage,
                )
                if not messages:
                    continue
            async with self._batch_lock:
                if not owner.owned:
                    # Revoked after this fetch returned: the new assignment restarts every partition at
                    # its committed offset, so whoever owns them now reads these events again.
                    log.info("%s: dropped %d events fetched before a rebalance", self.stage, len(messages))
                    continue
                unready = [tp for tp in fetched if tp not in self.assigned]
                if unready:
                    # Fetched from the new assignment before `_on_assigned` restored its state: put the
                    # positions back to the first event fetched, and read them again once it has.
                    for tp in unready:
                        self.consumer.seek(tp, fetched[tp][0].offset)
                    messages = [m for tp in fetched if tp not in unready for m in fetched[tp]]
                    if not messages:
                        await asyncio.sleep(0.05)
                        continue
                phase.observe(time.perf_counter() - waited)
                self.metrics.batch_size.labels(self.stage).observe(len(messages))
                flight = await self.process_batch(messages, owner)
                await self._in_flight.put(flight)
            waited = time.perf_counter()

    async def process_batch(
        self,
        messages: Sequence[ConsumerRecord],  # type: ignore[type-arg]
        owner: Ownership | None = None,
    ) -> InFlight:
        """Decode, handle, and send the outputs; the returned batch is done once they are durable.

        Handled only while `owner` (the assignment it was fetched under) holds: revoked, the batch is
        abandoned and only what already reached a destination is published.
        """
        owner = owner or self._owner
        records: list[Record] = []
        dead: list[DeadLetter] = []
        next_offsets: dict[TopicPartition, int] = {}
        stamps = self.last_timestamp
        for message in messages:
            tp = TopicPartition(message.topic, message.partition)
            next_offsets[tp] = message.offset + 1
            stamps[tp] = message.timestamp or 0
            try:
                size = len(message.value or b"")
                if size > self.max_message_bytes:
                    raise InvalidEvent("event_too_large", f"{size} > {self.max_message_bytes} bytes")
                records.append(Record(decode_event(message.value), message))
            except InvalidEvent as exc:
                dead.append(DeadLetter(message, exc))
        if dead and self.hold_dead_letters is not None:
            self.hold_dead_letters([letter.message for letter in dead])
        self.metrics.events_in.labels(self.stage).inc(len(messages))
        handling = time.perf_counter()
        carried: list[Output] = []  # outputs of what already reached a destination (a sink's acked part)
        # Only the handler is cancellable at a revocation: what it sends afterwards (a sender's receipts and
        # ledger changelog) records work already done elsewhere, and must land.
        task = asyncio.create_task(self.step(records, owner, carried), name=f"{self.stage}-handle")
        self._handling = task
        try:
            result = await task
        except Revoked:
            return await self._abandon(next_offsets, carried, owner)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not task.cancelled() or (current is not None and current.cancelling()):
                raise  # the loop itself is stopping
            log.warning("%s: a batch's handler was cancelled by a revocation", self.stage)
            return await self._abandon(next_offsets, carried, owner)
        finally:
            self._handling = None
        producing = time.perf_counter()
        self.metrics.batch_phase.labels(self.stage, "handle").observe(producing - handling)
        result.dead.extend(dead)
        outputs = len(result.outputs)
        for state in self.states:
            result.outputs.extend(state.changelog())
        if self.tallies is not None:
            tallies = batch_tallies(self.stage, self.tallies, self.bucket_s, messages, records, result.dead)
            result.outputs.extend(tallies)
        flight = InFlight(next_offsets, result, outputs, producing, owner=owner, inputs=records)
        return await self.flights.send(flight)

    async def _abandon(
        self, next_offsets: dict[TopicPartition, int], carried: list[Output], owner: Ownership
    ) -> InFlight:
        """A batch revoked mid-way: publish what already reached a destination and its state's changelog
        (a sender's ledger marks, so the next owner skips it), no tally, and never mark its offsets."""
        log.info(
            "%s: gave up a batch of partitions %s at a revocation",
            self.stage,
            sorted(tp.partition for tp in next_offsets),
        )
        result = StepResult(outputs=list(carried))
        for state in self.states:
            result.outputs.extend(state.changelog())
        flight = InFlight(next_offsets, result, 0, time.perf_counter(), owner=owner, abandoned=True)
        return await self.flights.send(flight)
