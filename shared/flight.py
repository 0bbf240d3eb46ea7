"""A handled batch on its way to the broker: sent at once, durable once every record is acknowledged.

`FlightSender.send` hands a batch's records (outputs, then dead letters) to the producer as one record
batch per topic partition; `settle` waits for the broker's acks, re-sending only what failed. A record
the broker can never take (over `max.message.bytes`, refused as corrupt) is dead-lettered instead,
truncated with its sha256 if the DLQ topic refuses it too, and the idempotent producer is renewed
(aiokafka does not rewind its sequence numbers after such a failure). A batch whose partitions were
revoked while it re-sends is given up, except its store's changelog (a sink's ledger marks), which is
re-sent until durable, up to `REVOKED_RESEND_ATTEMPTS`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import OutOfOrderSequenceNumber, UnknownError
from aiokafka.structs import ConsumerRecord

from shared.app import durable_producer
from shared.codec import unpack
from shared.dlq import UnsendableDeadLetter, letter_of_output, letter_output, truncated_letter
from shared.errors import InvalidEvent
from shared.metrics import StageMetrics
from shared.outcome import Outcome
from shared.publish import (
    TOO_LARGE,
    BatchPublisher,
    Output,
    Published,
    Retirements,
    sender_died,
    start_replacement,
    unsendable,
)
from shared.retry import Backoff
from shared.step import Ownership, PartitionedState, Record, StepResult

log = logging.getLogger(__name__)

# Re-sends of a revoked batch's store changelog (ledger marks of what a sink took) before the acker moves on;
# with the 5 s backoff ceiling about half a minute, so a topic that refuses for good cannot wedge the worker.
REVOKED_RESEND_ATTEMPTS = 12


@dataclass
class InFlight:
    """A handled batch whose outputs were sent; its offsets are done once they are durable."""

    next_offsets: dict[TopicPartition, int]
    result: StepResult
    outputs: int
    sent_at: float
    published: Published | None = None
    send_error: Exception | None = None
    records: list[Output] = field(default_factory=list)  # what was sent: the outputs, then the dead letters
    sent_with: BatchPublisher | None = None
    owner: Ownership | None = None
    # Given up at a revocation: only work already done elsewhere (a sink's acked part: receipts, ledger
    # changelog) is published, its offsets are never marked done, and the next owner handles it again.
    abandoned: bool = False
    inputs: list[Record] = field(default_factory=list)  # the decoded batch: a refused output's letter names its input


class SendingView(Protocol):
    """What sending reads of the StageRunner (set at construction or by `attach`)."""

    stage: str
    dlq: str
    bootstrap: str
    client_id: str
    backoff: Backoff
    metrics: StageMetrics
    tallies: str | None  # the auditor's topic: its records are of no input
    broker_outage: Any  # an OutageClock, or None


class FlightSender:
    """Owns the stage's idempotent producer: sends batches and settles them in the acker's order."""

    def __init__(self, runner: SendingView, states: Sequence[PartitionedState]) -> None:
        self.runner = runner
        self.stage = runner.stage
        self.state_of_changelog = {s.changelog_topic: s for s in states}
        self.producer: AIOKafkaProducer | None = None
        self.publisher: BatchPublisher | None = None
        self.retirements = Retirements(self.stage)  # producers replaced by `_renew_producer`, closing
        self._renewing = asyncio.Lock()

    async def start(self) -> None:
        """Start the stage's idempotent producer (acks=all)."""
        self.producer = durable_producer(self.runner.bootstrap, self.runner.client_id)
        await self.producer.start()
        self.publisher = BatchPublisher(self.producer)

    async def send(self, flight: InFlight) -> InFlight:
        """Hand the batch's outputs and dead letters to the producer; a failure is kept for `settle` to re-send."""
        flight.records = self._records_of(flight.result)
        flight.sent_with = self.publisher
        assert flight.sent_with is not None
        # Filled as record batches are handed over: a publish failing part way (a leader not found in
        # time) still wrote the batches before the failure, and `settle` re-sends only the rest.
        flight.published = Published([], [])
        try:
            await flight.sent_with.publish(flight.records, into=flight.published)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the acker re-sends what never went
            flight.send_error = exc
        return flight

    async def settle(self, flight: InFlight) -> bool:
        """Wait until the broker acknowledged every record of the batch, re-sending the failed ones.

        A record no retry can send (over a size limit, refused as invalid) is dead-lettered instead, so
        its partition flows on. False if given up: a batch whose partitions were revoked meanwhile is the
        next owner's to redo, unless it was abandoned, i.e. carries only work a destination already has.
        """
        records = flight.records
        pending = list(range(len(records)))  # indexes in `records` not acknowledged yet
        placed: dict[int, tuple[int, int]] = {}  # index -> (partition, offset) once acknowledged
        attempt = 0
        unknown = 0  # attempts that failed with UnknownError (see UNKNOWN_ERROR_ATTEMPTS)
        stripped = False  # revoked: only the store's changelog is still re-sent, the rest is the next owner's
        error = flight.send_error
        published = flight.published
        sent_with = flight.sent_with
        owner = flight.owner
        while True:
            if error is None or (published is not None and published.placed):
                assert published is not None
                # Every batch handed over is awaited, also when the publish failed part way: those records
                # are in the log, and only the ones whose batch never went (or failed) are re-sent.
                acks = await asyncio.gather(*published.futures, return_exceptions=True)
                failed = []
                for position, index in enumerate(pending):
                    batch = published.placed[position][0]
                    if batch >= len(acks) or isinstance(acks[batch], BaseException):
                        failed.append(index)
                    else:
                        placed[index] = published.offset_of(position, acks)
                if not failed:
                    break
                pending = failed  # only these are re-sent: the others are in the log already
                errors = [a for a in acks if isinstance(a, BaseException)]
                if error is not None:
                    errors.append(error)
                unknown += any(isinstance(e, UnknownError) for e in errors)
                error = next((e for e in errors if not unsendable(e, unknown)), None)
                if error is None:
                    await self._renew_producer(sent_with, errors[0])
                    await self._dead_letter_unsendable(flight, pending, placed, errors[0])
                    break
            else:
                unknown += isinstance(error, UnknownError)
                if unsendable(error, unknown):
                    await self._renew_producer(sent_with, error)
                    await self._dead_letter_unsendable(flight, pending, placed, error)
                    break
            if isinstance(error, OutOfOrderSequenceNumber) or sender_died(sent_with.producer):
                await self._renew_producer(sent_with, error)
            attempt += 1
            if self.runner.broker_outage is not None:
                self.runner.broker_outage.failed(error)
            delay = self.runner.backoff.delay(attempt)
            self.runner.metrics.retries.labels(self.stage).inc()
            log.warning("%s: produce failed (attempt %d), retrying in %.2fs: %r", self.stage, attempt, delay, error)
            if flight.abandoned or owner is None or stripped:
                if owner is not None and not owner.owned and attempt > REVOKED_RESEND_ATTEMPTS:
                    log.error("%s: gave up re-sending a revoked batch's changelog: %r", self.stage, error)
                    return False
                await asyncio.sleep(delay)  # work done elsewhere (ledger marks, receipts) lands even after a revoke
            elif not await owner.sleep(delay):
                if not self._carries_state(flight):
                    log.warning("%s: gave up re-sending a batch whose partitions were revoked", self.stage)
                    return False
                # Revoked: the next owner redoes the batch, but it must find the ledger marks of what a sink
                # took (its restore or catch-up reads them), so only the store's changelog is still sent.
                stripped = True
                pending = [i for i in pending if records[i].topic in self.state_of_changelog]
                if not pending:
                    return False
            sent_with = self.publisher
            assert sent_with is not None
            published, error = Published([], []), None
            try:
                await sent_with.publish([records[i] for i in pending], into=published)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = exc
        if self.runner.broker_outage is not None:
            self.runner.broker_outage.ok()
        if self.state_of_changelog:
            for index, out in enumerate(flight.result.outputs):
                state = self.state_of_changelog.get(out.topic)
                if state is not None and index in placed:
                    partition, offset = placed[index]
                    state.durable(partition, offset + 1)
        if stripped:
            return False
        self.runner.metrics.events_out.labels(self.stage).inc(flight.outputs)
        for letter in flight.result.dead:
            reason = letter.error.reason if isinstance(letter.error, InvalidEvent) else type(letter.error).__name__
            self.runner.metrics.dead_lettered.labels(self.stage, reason).inc()
        return True

    def _carries_state(self, flight: InFlight) -> bool:
        """The batch writes a store's changelog (a sender's ledger marks of what the sink acked): given up,
        the next owner would restore without them and deliver again."""
        return any(out.topic in self.state_of_changelog for out in flight.records)

    async def _dead_letter_unsendable(
        self, flight: InFlight, indexes: list[int], placed: dict[int, tuple[int, int]], error: BaseException
    ) -> None:
        """Send the failed records one at a time; each that still cannot be sent is dead-lettered, and a
        dead letter too large for the DLQ topic is stored truncated with its digest, never dropped."""
        log.warning(
            "%s: %d records refused by the broker (%r); sending them one by one", self.stage, len(indexes), error
        )
        for index in indexes:
            out = flight.records[index]
            sent = await self._produce_alone(out)
            if not isinstance(sent, BaseException):
                placed[index] = sent
                continue
            dlq = self.runner.dlq
            letter = out
            if out.topic != dlq:
                letter = letter_of_output(self.stage, dlq, out, sent, self._input_of(out, flight.inputs))
                reason = "record_too_large" if isinstance(sent, TOO_LARGE) else "record_refused"
                log.error("%s: dead-lettered a %d-byte record for %s: %r", self.stage, len(out.value), out.topic, sent)
                self.runner.metrics.dead_lettered.labels(self.stage, reason).inc()
            for keep in (None, 1024, 0):  # the whole letter, then its original cut to a digest and a prefix
                attempt = letter if keep is None else truncated_letter(letter, keep)
                sent = await self._produce_alone(attempt)
                if not isinstance(sent, BaseException):
                    break
            else:
                raise UnsendableDeadLetter(f"{self.stage}: {dlq} refused even a truncated dead letter: {sent!r}")

    async def _produce_alone(self, out: Output) -> tuple[int, int] | BaseException:
        """(partition, offset) once acknowledged, retrying transient failures; the error if it can never be sent."""
        attempt = 0
        unknown = 0
        while True:
            publisher = self.publisher
            assert publisher is not None
            try:
                published = await publisher.publish([out])
                acked = await asyncio.gather(*published.futures)
                return published.offset_of(0, acked)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                unknown += isinstance(exc, UnknownError)
                if unsendable(exc, unknown):
                    await self._renew_producer(publisher, exc)
                    return exc
                if isinstance(exc, OutOfOrderSequenceNumber) or sender_died(publisher.producer):
                    await self._renew_producer(publisher, exc)
                attempt += 1
                delay = self.runner.backoff.delay(attempt)
                log.warning("%s: produce failed (attempt %d), retrying in %.2fs: %r", self.stage, attempt, delay, exc)
                await asyncio.sleep(delay)

    async def _renew_producer(self, failed: BatchPublisher | None, error: BaseException) -> None:
        """A fresh idempotent producer after a batch failed for good (aiokafka does not rewind its sequence
        numbers then, so every later batch of that partition would fail with OutOfOrderSequenceNumber) or after
        its sender died. One that does not start within `PRODUCER_START_S` is stopped and the old one kept: the
        caller's next retry, after its backoff, asks again (a start's error here had shut the worker down)."""
        async with self._renewing:  # concurrent flights failing together renew once
            if failed is None or failed is not self.publisher:
                return  # already renewed since that batch was sent
            log.warning("%s: replacing the producer after %r", self.stage, error)
            producer = durable_producer(self.runner.bootstrap, self.runner.client_id)
            if (refused := await start_replacement(producer)) is not None:
                log.warning("%s: the replacement producer did not start (%r); keeping the old one", self.stage, refused)
                return
            old, self.producer, self.publisher = self.producer, producer, BatchPublisher(producer)
        if old is not None:  # its queued batches are flushed or failed (`retire`); failed ones are re-sent
            self.retirements.add(old)

    def _input_of(self, out: Output, inputs: Sequence[Record]) -> ConsumerRecord | None:  # type: ignore[type-arg]
        """The input message whose event the output carries, for its dead letter (rare path: decodes the output
        once); None for an output of no input (a receipt, a tally, a changelog entry)."""
        if not inputs or out.topic in self.state_of_changelog or out.topic == self.runner.tallies:
            return None
        try:
            fields = unpack(out.value)
        except Exception:  # not an event
            return None
        if not isinstance(fields, dict) or not fields.get("event_id"):
            return None
        # Tenant and id, as the deduplicator keys events: two tenants may use the same client-chosen id.
        key = (fields.get("tenant"), fields["event_id"])
        matches = [r for r in inputs if (r.event.tenant, r.event.event_id) == key]
        passed = [r for r in matches if r.outcome == Outcome.OUT]  # not a copy the stage dropped
        return (passed or matches)[0].message if matches else None

    def _records_of(self, result: StepResult) -> list[Output]:
        """What a batch sends: its outputs, then its dead letters."""
        letters = [letter_output(self.stage, self.runner.dlq, letter) for letter in result.dead]
        return [*result.outputs, *letters] if letters else list(result.outputs)
