"""One processing step, run the same way by every consuming service.

The commit sequence, per fetched batch:
  1. decode each message once; undecodable ones become dead letters
  2. handle the decoded batch (the service's own logic) -> outputs, dead letters, and each record's
     outcome (out, dup, unrouted, delivered, ...)
  3. send outputs, dead letters and the batch's tally (counts per tenant, event-time bucket and
     outcome, for the auditor's loss ledger) to the producer
  4. once the broker acknowledged every one of them, ack the input events: only now may Faust's
     committer move the offset past them

Steps 1-3 of the next batch overlap step 4 of this one (up to `max_in_flight` batches); an acker
takes batches in order, so acks still follow offsets and never pass what is durable.

A tally names its source partition and first offset, so the auditor counts a replayed offset once.

Faust would ack an event whose agent raised (and `take()` acks a batch even on cancellation), so
agents use `noack_take` and never let an exception escape: transient errors are retried with
backoff, a batch that fails for an unexpected reason is split so only the bad events dead-letter.
A worker killed at any point has acked nothing it has not durably passed on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sentry_sdk
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from faust.streams import _current_event

from shared.codec import decode_event, pack
from shared.errors import InvalidEvent, PermanentSinkError, TransientError
from shared.event import Event, now_ms
from shared.metrics import StageMetrics
from shared.retry import Backoff

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Record:
    """A decoded event and the Kafka message it came from (for DLQ context and claims)."""

    event: Event
    message: Any  # faust EventT
    # What the stage did with it, for the loss ledger: out (passed on), dup, unrouted, delivered,
    # skipped (already delivered), canary_dropped. Dead letters are counted by the runner.
    outcome: str = "out"

    @property
    def source(self) -> str:
        msg = self.message.message
        return f"{msg.topic}:{msg.partition}:{msg.offset}"

    def make_current(self) -> None:
        """Faust tables write their changelog to the current event's partition; in a batch, set it."""
        import weakref

        _current_event.set(weakref.ref(self.message))


@dataclass(slots=True)
class Output:
    topic: str
    key: bytes | None
    value: bytes


@dataclass(slots=True)
class DeadLetter:
    message: Any  # faust EventT
    error: Exception
    attempts: int = 1
    first_failed_ms: float = field(default_factory=now_ms)


@dataclass
class StepResult:
    outputs: list[Output] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)


Handler = Callable[[list[Record]], Awaitable[StepResult]]


@dataclass
class InFlight:
    """A handled batch whose outputs were sent; its input events are acked once they are durable."""

    events: list[Any]
    result: StepResult
    outputs: int
    sent_at: float
    futures: list[asyncio.Future[Any]] = field(default_factory=list)
    send_error: Exception | None = None


class StageRunner:
    """Runs one stage's handler over a Faust stream with the commit sequence above."""

    def __init__(
        self,
        app: Any,
        stage: str,
        handler: Handler,
        metrics: StageMetrics,
        dlq: str,
        source: str,
        batch_max: int = 500,
        max_message_bytes: int = 1_048_576,
        # How long a batch waits to fill: each cycle through Faust's stream costs a few ms whatever its
        # size, so 2 ms batches capped a stage near 1,000 events/s; 10 ms lets batches grow with load.
        within_s: float = 0.01,
        backoff: Backoff | None = None,
        max_in_flight: int = 8,
    ) -> None:
        self.app = app
        self.stage = stage
        self.handler = handler
        self.metrics = metrics
        self.batch_max = batch_max
        self.max_message_bytes = max_message_bytes
        self.within_s = within_s
        self.max_in_flight = max_in_flight
        self.backoff = backoff or Backoff()
        self.dlq = dlq
        self.source = source
        self.bootstrap = ",".join(f"{u.host}:{u.port}" for u in app.conf.broker)
        self.cursors = PartitionCursors(app, source, self.bootstrap)
        self.tallies: str | None = None  # the auditor's topic, set by `attach`
        self.bucket_s = 10
        self.broker_outage: Any = None
        self.watchdog: PartitionWatchdog | None = None

    def attach(self, name: str, ctx: Any) -> Any:
        """Register this stage's agent on its source topic (one agent, concurrency 1), and its DLQ views."""
        from shared.alerts import Alerter, OutageClock
        from shared.dlq import DeadLetterQueues
        from shared.web import add_dlq_views

        queues = DeadLetterQueues(self.bootstrap, ctx.topics, list(ctx.config.sinks))
        add_dlq_views(self.app, self.stage, queues, ctx.settings)
        audit = ctx.config.audit
        self.tallies = ctx.topics.tallies
        self.bucket_s = audit.bucket_s
        alerter = Alerter(self.stage)
        self.broker_outage = OutageClock(alerter, "broker_unreachable", "the Kafka broker", audit.outage_alert_after_s)
        self.watchdog = PartitionWatchdog(
            self.app, self.stage, self.cursors, self.metrics, alerter, audit.stuck_after_s
        )
        self.app.timer(min(5.0, audit.stuck_after_s / 2))(self.watchdog.check)
        watchdog = self.watchdog

        @self.app.page("/partitions")
        async def partitions(view: Any, request: Any) -> Any:
            """Consumer lag and progress per partition this worker owns, and the watchdog's rejoins."""
            from shared.web import denied

            refused = denied(view, request, ctx.settings)
            return refused or view.json(
                {"stage": self.stage, "partitions": watchdog.partitions, "rejoins": watchdog.rejoins}
            )

        return self.app.agent(self.app.topic(self.source), name=name, concurrency=1)(self.run)

    async def run(self, stream: Any) -> None:
        """Batches overlap: while the broker acknowledges batch N, batch N+1 is read and handled.

        An acker task takes batches in the order they were sent, waits for every output's broker
        ack (re-sending on failure), and only then acks the batch's input events. Acks therefore stay
        in offset order and never run ahead of what is durable; at most `max_in_flight` batches wait.
        """
        in_flight: asyncio.Queue[InFlight] = asyncio.Queue(maxsize=self.max_in_flight)
        acker = asyncio.create_task(self._ack_in_order(stream, in_flight), name=f"{self.stage}-acker")
        phase = self.metrics.batch_phase
        waited = time.perf_counter()
        try:
            async for fetched in stream.noack_take(self.batch_max, within=self.within_s):
                phase.labels(self.stage, "wait").observe(time.perf_counter() - waited)
                events = await self.cursors.admit(fetched)
                if events:
                    self.metrics.batch_size.labels(self.stage).observe(len(events))
                    flight = await self.process_batch(events)
                    if acker.done():  # it never ends by itself; surface why it did
                        acker.result()
                    await in_flight.put(flight)
                waited = time.perf_counter()
        finally:
            acker.cancel()  # whatever it had not acked is read again: nothing was committed past it

    async def _ack_in_order(self, stream: Any, in_flight: asyncio.Queue[InFlight]) -> None:
        while True:
            flight = await in_flight.get()
            await self._settle(flight)
            for event in flight.events:  # the commit point: everything above is durable
                await stream.ack(event)
                self.cursors.done[event.message.tp] = event.message.offset + 1
            self.metrics.batch_phase.labels(self.stage, "produce").observe(time.perf_counter() - flight.sent_at)

    async def process_batch(self, events: Sequence[Any]) -> InFlight:
        """Decode, handle, and send the outputs; the returned batch is acked once they are durable."""
        records: list[Record] = []
        dead: list[DeadLetter] = []
        for message in events:
            try:
                size = len(message.value or b"")
                if size > self.max_message_bytes:
                    raise InvalidEvent("event_too_large", f"{size} > {self.max_message_bytes} bytes")
                records.append(Record(decode_event(message.value), message))
            except InvalidEvent as exc:
                dead.append(DeadLetter(message, exc))
        self.metrics.events_in.labels(self.stage).inc(len(events))
        handling = time.perf_counter()
        result = await self._handle(records) if records else StepResult()
        producing = time.perf_counter()
        self.metrics.batch_phase.labels(self.stage, "handle").observe(producing - handling)
        result.dead.extend(dead)
        outputs = len(result.outputs)
        if self.tallies is not None:
            result.outputs.extend(self._tally(events, records, result))
        flight = InFlight(list(events), result, outputs, producing)
        try:
            flight.futures = await self._send(result)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the acker re-sends it
            flight.send_error = exc
        return flight

    async def _settle(self, flight: InFlight) -> None:
        """Wait until the broker acknowledged every output of the batch, re-sending it on failure."""
        attempt = 0
        error = flight.send_error
        futures = flight.futures
        while True:
            if error is None:
                try:
                    await asyncio.gather(*futures)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # broker unavailable past the producer's own retries
                    error = exc
            attempt += 1
            if self.broker_outage is not None:
                self.broker_outage.failed(error)
            delay = self.backoff.delay(attempt)
            self.metrics.retries.labels(self.stage).inc()
            log.warning("%s: produce failed (attempt %d), retrying in %.2fs: %r", self.stage, attempt, delay, error)
            await asyncio.sleep(delay)
            try:
                futures, error = await self._send(flight.result), None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = exc
        if self.broker_outage is not None:
            self.broker_outage.ok()
        self.metrics.events_out.labels(self.stage).inc(flight.outputs)
        for letter in flight.result.dead:
            reason = letter.error.reason if isinstance(letter.error, InvalidEvent) else type(letter.error).__name__
            self.metrics.dead_lettered.labels(self.stage, reason).inc()

    def _tally(self, events: Sequence[Any], records: list[Record], result: StepResult) -> list[Output]:
        """Per source partition: runs of [tenant, bucket, outcome, count] in offset order."""
        by_message = {id(r.message): r for r in records}
        dead = {id(letter.message) for letter in result.dead}
        parts: dict[tuple[str, int], dict[str, Any]] = {}
        for message in events:
            msg = message.message
            record = by_message.get(id(message))
            if record is not None:
                tenant = record.event.tenant
                at_ms = record.event.ingest_ts or (msg.timestamp or 0) * 1000
            else:  # undecodable: no tenant to charge it to
                tenant, at_ms = "?", (msg.timestamp or 0) * 1000
            outcome = "dlq" if id(message) in dead else (record.outcome if record is not None else "dlq")
            bucket = int(at_ms // 1000 // self.bucket_s * self.bucket_s)
            part = parts.setdefault(
                (msg.topic, msg.partition),
                {"stage": self.stage, "topic": msg.topic, "partition": msg.partition, "first": msg.offset, "runs": []},
            )
            runs = part["runs"]
            if runs and runs[-1][:3] == [tenant, bucket, outcome]:
                runs[-1][3] += 1
            else:
                runs.append([tenant, bucket, outcome, 1])
        at = now_ms()
        assert self.tallies is not None
        return [Output(self.tallies, self.stage.encode(), pack({**part, "at": at})) for part in parts.values()]

    async def _handle(self, records: list[Record]) -> StepResult:
        """Retry transient errors; on an unexpected error, handle one by one to isolate the culprit."""
        try:
            return await self._with_retries(lambda: self.handler(records))
        except _Unexpected:
            pass
        result = StepResult()
        for record in records:
            try:
                one = await self._with_retries(lambda r=record: self.handler([r]))
            except _Unexpected as wrapped:
                sentry_sdk.capture_exception(wrapped.__cause__)
                result.dead.append(DeadLetter(record.message, wrapped.__cause__ or wrapped))
                continue
            result.outputs.extend(one.outputs)
            result.dead.extend(one.dead)
        return result

    async def _with_retries(self, call: Callable[[], Awaitable[StepResult]]) -> StepResult:
        attempt = 0
        while True:
            attempt += 1
            try:
                return await call()
            except TransientError as exc:
                delay = self.backoff.delay(attempt, exc.retry_after)
                self.metrics.retries.labels(self.stage).inc()
                log.warning("%s: transient error (attempt %d), retrying in %.2fs: %s", self.stage, attempt, delay, exc)
                await asyncio.sleep(delay)
            except (InvalidEvent, PermanentSinkError):
                raise _Unexpected() from None  # handlers dead-letter these themselves; a stray one is a bug
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("%s: unexpected error in handler", self.stage)
                raise _Unexpected() from exc

    async def _send(self, result: StepResult) -> list[asyncio.Future[Any]]:
        """Hand outputs and dead letters to the producer; the futures resolve on the broker's ack."""
        futures = [
            await self.app.producer.send(out.topic, out.key, out.value, None, None, None) for out in result.outputs
        ]
        for letter in result.dead:
            futures.append(
                await self.app.producer.send(
                    self.dlq,
                    letter.message.message.key,
                    dead_letter_value(self.stage, letter),
                    None,
                    None,
                    list(letter.message.message.headers or []) or None,
                )
            )
        return futures


class PartitionCursors:
    """The next offset this worker must process, per partition it owns.

    Only the event at the cursor is processed. Faust can drop fetched events during a rebalance and
    read on past them; an event beyond the cursor means that happened, so the partition is sought
    back to the cursor and the events re-read. Events below it were processed already. Acks stay
    contiguous from the group's committed offset, so Faust's committer cannot skip anything.
    """

    def __init__(self, app: Any, source: str, bootstrap: str) -> None:
        self.app = app
        self.source = source
        self.bootstrap = bootstrap
        self.next: dict[Any, int | None] = {}
        self.last_timestamp: dict[Any, float] = {}  # Kafka timestamp (s) of the last event processed
        self.done: dict[Any, int] = {}  # next offset after the last acked event: what the next commit holds
        self.sought: dict[Any, tuple[int, float]] = {}
        app.on_partitions_assigned.connect(self._on_assigned)
        app.on_partitions_revoked.connect(self._on_revoked)

    async def _on_assigned(self, sender: Any, assigned: Any, **kwargs: Any) -> None:
        # Revocation (and its final commit) happens before assignment, so these offsets are final.
        self.next = {}
        self.sought.clear()
        mine = [tp for tp in assigned if tp.topic == self.source]
        try:
            await self._start_at_committed(mine)
        except Exception:  # never fail Faust's rebalance; `admit` retries for partitions left without a cursor
            log.exception("could not read committed offsets for %s; will retry on the next event", mine)

    async def _start_at_committed(self, tps: list[Any]) -> None:
        committed = await self._committed(tps) if tps else {}
        for tp in tps:
            offset = committed.get(tp)
            self.next[tp] = offset
            if offset is not None:
                self.done[tp] = offset
            if offset is not None:
                await self._seek(tp, offset)  # forget any fetch position from before
            log.info("%s: assigned, processing from offset %s", tp, offset)

    async def _committed(self, tps: list[Any]) -> dict[Any, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            found = await admin.list_consumer_group_offsets(
                self.app.conf.id, partitions=[TopicPartition(tp.topic, tp.partition) for tp in tps]
            )
        finally:
            await admin.close()
        return {(tp.topic, tp.partition): meta.offset for tp, meta in found.items() if meta.offset >= 0}

    async def _on_revoked(self, sender: Any, revoked: Any, **kwargs: Any) -> None:
        for tp in revoked:
            self.next.pop(tp, None)
            self.done.pop(tp, None)

    async def _seek(self, tp: Any, offset: int) -> None:
        # Faust's `seek` calls aiokafka from this thread while aiokafka runs in Faust's consumer thread,
        # which can leave the fetcher asleep; `seek_wait` seeks on that thread and waits for the position.
        await self.app.consumer.seek_wait({tp: offset})

    async def _log_start(self, tp: Any) -> int | None:
        try:
            return (await self.app.consumer.earliest_offsets(tp)).get(tp)
        except Exception:
            log.warning("%s: could not read the log start offset", tp, exc_info=True)
            return None

    async def admit(self, fetched: Sequence[Any]) -> list[Any]:
        admitted = []
        for event in fetched:
            tp, offset = event.message.tp, event.message.offset
            if tp not in self.next:
                if tp not in self.app.consumer.assignment():
                    log.debug("%s@%d: fetched before a revocation, dropped", tp, offset)
                    continue
                # Assigned, but the assignment callback did not set a cursor (it failed, or raced).
                await self._start_at_committed([tp])
                if tp not in self.next:
                    continue
            expected = self.next[tp]
            if expected is None or offset == expected:
                admitted.append(event)
                self.next[tp] = offset + 1
                self.last_timestamp[tp] = event.message.timestamp or 0.0
            elif offset > expected:
                log_start = await self._log_start(tp)
                if log_start is not None and log_start > expected:
                    # Deleted before this stage read them (retention, or an operator's delete-records):
                    # nothing to re-read. The auditor's ledger counts them lost at this stage.
                    log.error(
                        "%s: offsets %d..%d were deleted before this stage read them; moving on to %d",
                        tp,
                        expected,
                        log_start - 1,
                        log_start,
                    )
                    self.next[tp] = expected = log_start
                    if offset == expected:
                        admitted.append(event)
                        self.next[tp] = offset + 1
                        self.last_timestamp[tp] = event.message.timestamp or 0.0
                        continue
                # Seek once, and again if events past the cursor still arrive a second later (a seek
                # issued around a rebalance can be overridden by the fetcher).
                last = self.sought.get(tp)
                now = time.monotonic()
                if last is None or last[0] != expected or now - last[1] > 1.0:
                    log.warning("%s: offsets %d..%d were skipped by the consumer; re-reading", tp, expected, offset - 1)
                    self.sought[tp] = (expected, now)
                    await self._seek(tp, expected)
            else:
                log.debug("%s@%d: below the cursor %d, already processed", tp, offset, expected)
        return admitted


class PartitionWatchdog:
    """Consumer lag per partition, and a stuck-partition alarm.

    Lag in offsets is the high watermark minus the committed offset (or, before the first commit, the
    offset after the last acked event); lag in seconds is the age of the last event read while lag
    remains (0 when caught up). A partition with lag whose
    committed offset has not moved for `stuck_after_s` pages once and makes the worker rejoin its
    group, which re-runs assignment and restarts the partition's fetch from the committed offset.
    """

    def __init__(
        self, app: Any, stage: str, cursors: PartitionCursors, metrics: StageMetrics, alerter: Any, stuck_after_s: float
    ) -> None:
        from prometheus_client import Gauge

        self.app = app
        self.stage = stage
        self.cursors = cursors
        self.alerter = alerter
        self.stuck_after_s = stuck_after_s
        self.progress: dict[Any, tuple[int | None, float]] = {}  # tp -> (committed, since when)
        self.rejoins = 0
        self.lag_messages = Gauge(
            "hifi_consumer_lag_messages",
            "High watermark minus the committed offset",
            ["stage", "partition"],
            registry=metrics.registry,
        )
        self.lag_seconds = Gauge(
            "hifi_consumer_lag_seconds",
            "Age of the oldest unprocessed event (approximated by the last processed one) while there is lag",
            ["stage", "partition"],
            registry=metrics.registry,
        )
        self.partitions: dict[str, dict[str, Any]] = {}

    async def check(self) -> None:
        try:
            self._check()
        except Exception:  # a watchdog must not take the worker down
            log.exception("%s: partition watchdog failed", self.stage)

    def _check(self) -> None:
        consumer = self.app.consumer
        committed_offsets = getattr(consumer, "_committed_offset", {})
        now = time.monotonic()
        seen = {}
        stuck: list[str] = []
        for tp, cursor in list(self.cursors.next.items()):
            try:
                highwater = consumer.highwater(tp)
            except Exception:
                continue
            committed = committed_offsets.get(tp)
            if committed is None:
                committed = self.cursors.done.get(tp)
            if highwater is None or committed is None:
                continue
            lag = max(0, highwater - committed)
            last_ts = self.cursors.last_timestamp.get(tp)
            lag_s = max(0.0, time.time() - last_ts) if lag and last_ts else 0.0
            self.lag_messages.labels(self.stage, str(tp.partition)).set(lag)
            self.lag_seconds.labels(self.stage, str(tp.partition)).set(lag_s)
            previous = self.progress.get(tp)
            if previous is None or previous[0] != committed or lag == 0:
                self.progress[tp] = (committed, now)
                stalled_s = 0.0
            else:
                stalled_s = now - previous[1]
            seen[f"{tp.topic}:{tp.partition}"] = {
                "committed": committed,
                "next": cursor,
                "highwater": highwater,
                "lag_messages": lag,
                "lag_seconds": round(lag_s, 3),
                "stalled_s": round(stalled_s, 1),
            }
            if stalled_s > self.stuck_after_s:
                stuck.append(f"{tp.topic}:{tp.partition} ({lag} waiting, committed {committed}, {stalled_s:.0f}s)")
        self.partitions = seen
        # One page per stage and episode, however many of its partitions are stuck.
        if stuck:
            fired = self.alerter.fire(
                "stuck_partition",
                f"{self.stage}: partitions with lag whose committed offset has not moved for over "
                f"{self.stuck_after_s:.0f}s: {', '.join(stuck)}; rejoining the group",
                partitions=stuck,
            )
            if fired:
                self._rejoin()
        else:
            self.alerter.resolve("stuck_partition")

    def _rejoin(self) -> None:
        """Ask the group coordinator for a rebalance (aiokafka's own rejoin, on the consumer's thread)."""
        try:
            thread = self.app.consumer._thread
            coordinator = thread._ensure_consumer()._coordinator
            thread.thread_loop.call_soon_threadsafe(coordinator.request_rejoin)
            self.rejoins += 1
        except Exception:
            log.exception("%s: could not request a rejoin", self.stage)


class _Unexpected(Exception):
    """Internal: the handler failed in a way retrying the batch won't fix."""


def dead_letter_value(stage: str, letter: DeadLetter) -> bytes:
    """A dead letter keeps the original bytes and headers, the error and the timestamps."""
    msg = letter.message.message
    error = letter.error
    return pack(
        {
            "stage": stage,
            "error_class": type(error).__name__,
            "error": str(error)[:2000],
            "reason": error.reason if isinstance(error, InvalidEvent) else type(error).__name__,
            "attempts": letter.attempts,
            "topic": msg.topic,
            "partition": msg.partition,
            "offset": msg.offset,
            "original_key": msg.key,
            "original_value": msg.value,
            "original_headers": [[k, v] for k, v in (msg.headers or [])],
            "original_timestamp_ms": (msg.timestamp or 0) * 1000,
            "first_failed_ms": letter.first_failed_ms,
            "dead_lettered_ms": time.time() * 1000,
        }
    )
