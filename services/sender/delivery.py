"""sender: one process and one consumer group per sink. Delivers batches to the destination and
acks its input only after the destination acknowledged; a delivered ledger (sink + event id, kept
for the dedupe window) stops a replay from delivering twice.

Per fetched batch: ledger check, then per source partition, concurrently: circuit breaker -> throttle
-> deliver -> ledger mark. A refused request (4xx), or one whose 5xx/timeout outlasts
`max_attempts_per_event`, is bisected so only the events at fault dead-letter.
A crash can still duplicate between the sink's ack and the ledger mark being durable (with the RocksDB
ledger: its changelog write). A transactional Kafka sink (offsets in the transaction, the runner commits
none) and a Redis Stream sink (per-key marker) skip what they already took; docs/RELIABILITY.md lists
what remains.
Messages `hifi replay` produced (header `hifi-replay`, shared/replay.py) go the same way, with `force` past
the ledger's earlier marks (a forced message's own delivery is marked under its offset, so a retry skips it);
they are tallied `replayed` / `replay_skipped` / `replay_dlq` and send no receipts, so the live ledger ignores them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from aiokafka import TopicPartition
from prometheus_client import Counter, Gauge

from shared import pipeline
from shared.alerts import Alerter, OutageClock
from shared.archive import REPLAY_FORCE, replay_mode
from shared.audit import receipts
from shared.errors import (
    HandledInPart,
    PartialDelivery,
    PermanentSinkError,
    SinkMisconfigured,
    SinkThrottled,
    TransientError,
)
from shared.event import now_ms
from shared.keywindow import KeyWindow
from shared.metrics import LagWindow, StageMetrics
from shared.outcome import Outcome
from shared.stage import DeadLetter, Output, Record, StepResult

from .breaker import CircuitBreaker, CircuitOpen, Throttle
from .delivery_stats import HOPS, DeliveryStats
from .isolation import IsolationRounds
from .ledger_marks import DeliveredLedgerMarks
from .sinks import SinkSender, Source, idempotency_key
from .unsettled import UnsettledDeadLetters

log = logging.getLogger(__name__)


class SinkDelivery(IsolationRounds, UnsettledDeadLetters, DeliveredLedgerMarks, DeliveryStats):
    """The sender's step: ledger check, then per source partition breaker -> throttle -> deliver -> ledger
    mark. Isolation rounds, unsettled dead letters, ledger access and stats are mixins, one module each."""

    def __init__(
        self,
        sink: SinkSender,
        ledger: KeyWindow,
        metrics: StageMetrics,
        alerter: Alerter,
        pass_through: bool,
        receipts_topic: str | None = None,
        alert_after_s: float = 30.0,
    ) -> None:
        self.sink = sink
        self.receipts_topic = receipts_topic
        self.attempts: dict[str, int] = {}  # delivery attempts of the batch in hand, by its first source
        # 5xx/timeout failures per event key still undelivered: past the bound its request is bisected
        self.suspect: dict[str, int] = {}
        self.max_attempts_per_event = sink.config.max_attempts_per_event
        self.carried: list[Output] = []  # receipts of partitions delivered while another one failed
        self.groups: dict[tuple[str, int], list[Record]] = {}  # the records in hand, by source partition
        # Dead letters of the batch in hand, by id of their message: kept across its retries, returned once
        self.dead_letters: dict[int, DeadLetter] = {}
        # Dead letters not durable yet, per source partition: offset -> id of their message. Held across a
        # batch's retries, or returned to the runner and not yet acknowledged by the broker: a transactional
        # sink must not commit its source offset past one (a kill would lose the event).
        self.unsettled: dict[tuple[str, int], dict[int, int]] = {}
        # The runner's durable point per source partition (`StageRunner.done`, set by `build`): every dead
        # letter below it is written. None (no runner): a returned dead letter stays unsettled.
        self.durable_offset: Callable[[TopicPartition], int | None] = lambda tp: None
        # Ids of the messages the runner dead-lettered itself (`hold_dead_letters`): not in the handler's
        # batch, yet not given up either, so a refetch check must not forget them.
        self.runner_letters: set[int] = set()
        # Failures in a row that end a round (the sink went down): room for two culprits' alone retries.
        self.round_max_consecutive = self.max_attempts_per_event + 2
        # Per event key: failed alone while the sink took other requests (evidence across rounds)
        self.isolated: dict[str, int] = {}
        self.sink_successes = 0  # requests (and probes) the sink accepted, ever: "the sink was seen up since"
        # Per event key still failing: `sink_successes` when its last failed request was SENT. A success
        # between two of its failures means the sink was up for others: an alone failure then counts.
        self.last_failed_at: dict[str, int] = {}
        self.round_max_s = max(30.0, 10 * sink.config.timeout_s)  # an isolation round's time bound
        # The sink's last answers across batches (None: a request accepted; else (event key, partition key) of
        # an event refused alone, once per event, not per retry): at least `refuse_all_min` refusals from 2
        # devices or more and no acceptance among them means the sink changed, not the events (one device's
        # burst of bad events is its own). Per accepted request, so a sink that starts refusing everything
        # pages after at most 7 dead letters.
        self.refuse_all_min = 4
        self.answers: deque[tuple[str, bytes] | None] = deque(maxlen=2 * self.refuse_all_min)
        # Set while the refusal guard holds a batch (the sink refuses every event): only an accepted request
        # clears it, so a refusal or a probe answered meanwhile does not close the breaker or resolve the page.
        self.refusing_all = False
        self.refused: list[tuple[Record, PermanentSinkError, int]] = []  # refused alone in this batch's rounds
        self.batch_accepted = 0  # requests of this batch the sink accepted: its refusals are the events' fault
        self.name = sink.config.name
        self.ledger = ledger
        self.metrics = metrics
        self.alerter = alerter
        self.pass_through = pass_through  # on_redis_down: deliver without the ledger while it is down
        self.ledger_outage = OutageClock(
            alerter, "ledger_unreachable", f"delivered ledger of sink {self.name}", alert_after_s
        )
        self.breaker = CircuitBreaker()
        self.throttle = Throttle()
        self.lag = LagWindow()
        self.stage_lag = {stage: LagWindow() for stage in (*HOPS, pipeline.SENDER.name)}
        self.skipped = 0
        self.drop_canaries = bool(sink.config.options.get("drop_canaries", False))
        # `hifi replay` traffic (header REPLAY_HEADER): counted apart, no receipts, no lag samples
        self.replayed = Counter(
            "hifi_replayed_events",
            "Events re-delivered by `hifi replay`, by outcome",
            ["sink", "outcome"],
            registry=metrics.registry,
        )
        self.replay_of: dict[int, str] = {}  # id(message) -> replay mode, for the batch in hand
        self.circuit_gauge = Gauge(
            "hifi_sink_circuit_open", "1 while the sink's circuit breaker is open", ["sink"], registry=metrics.registry
        )

    def _key(self, record: Record) -> str:
        return f"{self.name}:{record.event.dedupe_key}"

    def _forced_key(self, record: Record) -> str:
        """The mark of one `--force` replay message's delivery: its own offset, so the next forced replay
        (new messages) delivers again, while a retry of this one sees it was done."""
        message = record.message
        return f"{self.name}:forced:{message.topic}:{message.partition}:{message.offset}"

    def _seen_key(self, record: Record) -> str:
        return self._forced_key(record) if self.replay_of.get(id(record.message)) == REPLAY_FORCE else self._key(record)

    async def handle(self, records: list[Record]) -> StepResult:
        in_batch = {id(r.message) for r in records}
        # Retry counts of earlier batches (given up, or re-keyed after a partial delivery) are stale.
        sources = {r.source for r in records}
        self.attempts = {k: v for k, v in self.attempts.items() if k in sources}
        # Dead letters of an earlier batch (given up at a revocation) belong to its next owner, not here.
        self.dead_letters = {k: v for k, v in self.dead_letters.items() if k in in_batch}
        self._forget_refetched(records, in_batch)
        self.replay_of = {id(r.message): mode for r in records if (mode := replay_mode(r.message.headers))}
        batch = records
        held = [self.dead_letters[id(r.message)] for r in records if id(r.message) in self.dead_letters]
        records = [r for r in records if id(r.message) not in self.dead_letters]
        # --force overrules the ledger's marks from before this replay message, not the one its own delivery
        # left: a retry of a batch delivered in part (`_forced_key`) must not send it again
        seen = await self._ledger_seen(records, [self._seen_key(r) for r in records])
        todo: list[Record] = []
        keys_in_batch: set[str] = set()
        dropped: list[Record] = []
        for record, already in zip(records, seen, strict=True):
            key = self._key(record)
            if already or key in keys_in_batch:
                record.outcome = Outcome.SKIPPED  # delivered before (a replay): the ledger stops a second copy
                self.skipped += 1
                continue
            if self.drop_canaries and record.event.canary:
                record.outcome = Outcome.CANARY_DROPPED
                dropped.append(record)
                continue
            keys_in_batch.add(key)
            todo.append(record)
        result = StepResult()
        self.refused, self.batch_accepted = [], 0
        if todo:
            try:
                await self._deliver_by_partition(todo, result)
            finally:
                self.groups.clear()
        result.dead.extend(held)
        result.dead.extend(self.dead_letters.pop(id(r.message)) for r in todo if id(r.message) in self.dead_letters)
        if dropped:
            result.outputs.extend(self._receipts(dropped, now_ms(), 0))
        result.outputs.extend(self.carried)
        self.carried = []
        if self.replay_of:
            self._count_replayed(batch)  # with the dead letters held from earlier attempts
        return result

    def _count_replayed(self, records: list[Record]) -> None:
        """Replayed events get their own outcomes in the tallies: the auditor keeps them out of the live ledger."""
        for record in records:
            if id(record.message) not in self.replay_of:
                continue
            if record.outcome == Outcome.DELIVERED:
                record.outcome = Outcome.REPLAYED
            elif record.outcome == Outcome.SKIPPED:
                record.outcome = Outcome.REPLAY_SKIPPED
            elif record.outcome == Outcome.DLQ:
                # not `dlq`: a live dead letter settles a live event; this one would cancel a real live loss
                record.outcome = Outcome.REPLAY_DLQ
            else:
                continue
            self.replayed.labels(self.name, record.outcome).inc()

    async def _deliver_by_partition(self, todo: list[Record], result: StepResult) -> None:
        """One request per source partition, concurrently: a device's events share a partition, so its
        order holds, and a sink's round trip no longer caps the sender at one batch at a time.

        If some partitions fail transiently, the others stay delivered (marked in the ledger) and
        `HandledInPart` carries their receipts to the runner, which publishes them even if the batch
        is given up at a revocation; it retries the batch, and the ledger skips what was delivered.
        """
        groups: dict[int, list[Record]] = {}
        for record in todo:
            groups.setdefault(record.partition, []).append(record)
        outcomes = await asyncio.gather(*(self._deliver_group(g) for g in groups.values()), return_exceptions=True)
        failure: BaseException | None = None
        delivered: list[Output] = []
        for outcome in outcomes:
            if isinstance(outcome, StepResult):
                result.dead.extend(outcome.dead)
                delivered.extend(outcome.outputs)
            elif failure is None:
                failure = outcome
        misconfigured = self._settle_refused(held_anyway=failure is not None)
        if misconfigured is not None:
            failure = misconfigured
        if failure is None:
            result.outputs.extend(delivered)
        elif isinstance(failure, TransientError):
            delivered.extend(self.carried)  # parts of the failed partitions that the sink acked
            self.carried = []
            raise HandledInPart(str(failure), delivered, failure.retry_after) from failure
        else:
            self.carried.extend(delivered)  # the runner re-handles one event at a time, whose result gets them
            raise failure

    async def _deliver_group(self, todo: list[Record]) -> StepResult:
        """Deliver one source partition's records. A refused request (4xx), or one whose 5xx/timeout
        outlasted `max_attempts_per_event`, is bisected so only the events at fault dead-letter."""
        batch_id = todo[0].source
        attempts = self.attempts[batch_id] = self.attempts.get(batch_id, 0) + 1
        self.groups[(todo[0].message.topic, todo[0].message.partition)] = todo
        result = StepResult()
        try:
            suspected = max(self.suspect.get(self._key(r), 0) for r in todo)
            if suspected >= self.max_attempts_per_event:
                # After `max_attempts_per_event` rounds that found an outage, rounds start with quarters:
                # two culprits in opposite halves look like an outage from the top.
                depth = min(1, suspected // self.max_attempts_per_event - 1)
                await self._isolate(todo, attempts, result, depth=depth)
            else:
                try:
                    await self._deliver_part(todo, attempts, result)
                except PermanentSinkError as refused:
                    await self._isolate(todo, attempts, result, refused)
                except PartialDelivery as partial:
                    if partial.refused is None:
                        raise
                    rest = [r for r in todo if r.outcome != Outcome.DELIVERED]
                    await self._isolate(rest, attempts, result, partial.refused)
        except TransientError as exc:
            if not isinstance(exc, CircuitOpen | SinkThrottled | SinkMisconfigured):  # could be the payload
                if len(self.suspect) > 100_000:  # bound: entries of batches given away in a rebalance
                    self.suspect.clear()
                    self.isolated.clear()
                    self.last_failed_at.clear()
                for record in todo:
                    if record.outcome != Outcome.DELIVERED:
                        key = self._key(record)
                        self.suspect[key] = self.suspect.get(key, 0) + 1
            self.carried.extend(result.outputs)  # parts delivered before the failure stay delivered
            raise
        self.attempts.pop(batch_id, None)
        return result

    async def _deliver_part(
        self, part: list[Record], attempts: int, result: StepResult, ask_breaker: bool = True
    ) -> None:
        try:
            await self._deliver(part, ask_breaker)
        except PartialDelivery as exc:  # the sink acked some records: mark those, retry the others
            await self._delivered([part[i] for i in exc.delivered], attempts, result)
            raise
        await self._delivered(part, attempts, result)

    async def _delivered(self, records: list[Record], attempts: int, result: StepResult) -> None:
        acked = now_ms()
        self.answers.append(None)
        self.batch_accepted += 1
        # Shielded: a revocation that cancels the batch must not cancel the mark of what the sink acked.
        await asyncio.shield(self._mark_delivered(records))
        self._record_lag([r for r in records if id(r.message) not in self.replay_of], acked)
        for record in records:
            record.outcome = Outcome.DELIVERED
            self._forget_evidence(record)
        result.outputs.extend(self._receipts(records, acked, attempts))

    def _dead_letter(self, record: Record, error: Exception, attempts: int) -> None:
        """Held until the batch's handling returns: a retry of the batch skips it and still reports it.
        Unsettled until the runner's durable point passes it: no transaction commits its offset past it."""
        log.warning("sender %s: dead-lettering %s: %s", self.name, record.event.event_id, error)
        self._forget_evidence(record)
        record.outcome = Outcome.DLQ
        self.dead_letters[id(record.message)] = DeadLetter(record.message, error, attempts)
        message = record.message
        self.unsettled.setdefault((message.topic, message.partition), {})[message.offset] = id(message)

    def _forget_evidence(self, record: Record) -> None:
        """The event is settled (delivered or dead-lettered): its failure counts no longer mean anything."""
        key = self._key(record)
        self.suspect.pop(key, None)
        self.isolated.pop(key, None)
        self.last_failed_at.pop(key, None)

    def _receipts(self, records: list[Record], acked: float, attempts: int) -> list[Output]:
        if self.receipts_topic is None:
            return []
        records = [r for r in records if id(r.message) not in self.replay_of]  # no SLI sample for a replay
        if not records:
            return []
        rows = [[r.event.event_id, r.event.tenant, r.event.ingest_ts, attempts, r.event.canary] for r in records]
        # For `hifi trace`; a canary dropped here (attempts 0) was not sent: its tally says so.
        trace = [[idempotency_key(self.name, r.event), r.event.stages, r.source] for r in records] if attempts else None
        topic, key = self.receipts_topic, self.name.encode()
        return [Output(topic, key, value) for value in receipts(self.name, acked, rows, trace)]  # each under 1 MB

    async def _deliver(self, todo: list[Record], ask_breaker: bool = True) -> None:
        if ask_breaker:
            self.breaker.before_call()
        await self.throttle.wait_turn()
        sent_at = self.sink_successes  # a success counted after this is evidence against these events
        first = todo[0].message
        source = Source(first.topic, first.partition, [r.message.offset for r in todo], self._commit_offset(todo))
        try:
            await self.sink.deliver_batch([r.event for r in todo], source)
        except CircuitOpen:
            raise
        except SinkMisconfigured as exc:  # every request will fail: stop sending, page, keep the events
            if self.breaker.open_now():
                self.circuit_gauge.labels(self.name).set(1)
            self.alerter.fire("sink_misconfigured", f"sink {self.name} refuses every request: {exc}", key=self.name)
            raise
        except TransientError as exc:
            if isinstance(exc, SinkThrottled):
                self.throttle.on_throttled(exc.retry_after)
                raise
            for record in todo:  # could be the payload: when it was sent
                if record.outcome != Outcome.DELIVERED:
                    self.last_failed_at[self._key(record)] = sent_at
            if self.breaker.on_failure():
                self.circuit_gauge.labels(self.name).set(1)
                self.alerter.fire("circuit_opened", f"sink {self.name} failing: {exc}", key=self.name)
            raise
        except PermanentSinkError:
            self._sink_answered()  # the sink is up; it refused these events
            raise
        self.sink_successes += 1
        self.refusing_all = False
        self._sink_answered()

    def _commit_offset(self, part: list[Record]) -> int | None:
        """Where a successor may start once `part` is delivered: the first record of its partition's batch
        that is neither delivered nor in `part`, and no further than the partition's first dead letter that
        is not durable yet (held across this batch's retries, or of an earlier batch the runner is still
        producing: the runner writes dead letters after the batch, and pipelines batches)."""
        first = part[0].message
        group = self.groups.get((first.topic, first.partition), part)
        in_part = {id(r) for r in part}
        undone = [r.message.offset for r in group if r.outcome != Outcome.DELIVERED and id(r) not in in_part]
        unsettled = self._unsettled_from(first.topic, first.partition)
        if unsettled is not None:
            undone.append(unsettled)
        return min(undone) if undone else None

    def _sink_answered(self) -> None:
        if self.refusing_all:  # it answers, but refuses everything: still paged, circuit still open
            return
        self.breaker.on_success()
        self.throttle.on_success()
        self.circuit_gauge.labels(self.name).set(0)
        self.alerter.resolve("circuit_opened", key=self.name)
        self.alerter.resolve("sink_misconfigured", key=self.name)
