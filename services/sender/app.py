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
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sentry_sdk
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord
from mode import Service
from prometheus_client import Counter, Gauge

from shared import pipeline
from shared.alerts import Alerter, OutageClock
from shared.archive import REPLAY_FORCE, replay_mode
from shared.audit import receipts
from shared.errors import (
    EventKeepsFailing,
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
from shared.retry import Backoff
from shared.service import ServiceContext
from shared.stage import DeadLetter, Output, Record, StageRunner, StepResult
from shared.tables import TableBrowser, add_table_views
from shared.web import add_common_views

from .breaker import CircuitBreaker, CircuitOpen, Throttle
from .sinks import SinkSender, Source, idempotency_key, make_sink

log = logging.getLogger(__name__)

HOPS = tuple(s.name for s in pipeline.HOPS)  # the stamps an event gathers between collector and sender


class SinkDelivery:
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
            self.suspect.pop(self._key(record), None)
            self.isolated.pop(self._key(record), None)
            self.last_failed_at.pop(self._key(record), None)
        result.outputs.extend(self._receipts(records, acked, attempts))

    async def _isolate(
        self,
        todo: list[Record],
        attempts: int,
        result: StepResult,
        refused: PermanentSinkError | None = None,
        depth: int = 0,
    ) -> None:
        """One isolation round: bisect breadth-first until the events at fault stand alone; deliver the rest.

        A refused (4xx) event dead-letters alone, once the batch is in (`_settle_refused`). A 5xx/timeout one
        dead-letters only on evidence that it is the payload: it failed alone twice with another request of the
        round (or a probe) succeeding in between, or `max_attempts_per_event` times alone while the sink took
        other requests: in this round, or between the event's previous failed request and this one
        (`isolated`, `last_failed_at`). When every part of the first split failed, a probe carrying no event
        asks the sink: up, the round goes on (the failures are the payloads'); down, it is an outage (the
        round raises, keeping what was delivered, and the events' evidence is reset). A round also raises
        after `round_max_consecutive` requests failed in a row. The round paces its requests after a failure
        (honouring Retry-After), asks the breaker before its first, and is bounded in requests and time.
        `refused`: the whole of `todo` was just refused, so start with its
        halves. `depth` 1: start with its quarters (the outage test is then: all four failed)."""
        rnd = _Round(started=time.monotonic(), max_requests=4 * len(todo) + 8)
        refused_alone: list[tuple[Record, PermanentSinkError]] = []
        leaves: dict[int, _Leaf] = {}  # events that failed alone transiently, by id
        level: list[list[Record]] = [todo]
        for _ in range(2 * depth):
            level = [half for part in level for half in (_halves(part) if len(part) > 1 else [part]) if half]
        outage_after = 3 if len(level) == 1 else len(level)  # failures with no success: the sink is down
        if refused is not None:
            rnd.sink_answered()
            level = _halves(todo) if len(todo) > 1 else []
            if len(todo) == 1:
                refused_alone.append((todo[0], refused))
        while level:
            next_level: list[list[Record]] = []
            for whole_part in level:
                part = [r for r in whole_part if r.outcome != Outcome.DELIVERED]
                if not part:
                    continue
                if rnd.requests >= rnd.max_requests or time.monotonic() - rnd.started > self.round_max_s:
                    raise TransientError(f"sink {self.name}: isolation round bounded after {rnd.requests} requests")
                await rnd.pause()
                rnd.requests += 1
                failed_before = self.last_failed_at.get(self._key(part[0])) if len(part) == 1 else None
                try:
                    # The breaker is asked once per round: a culprit's failures inside it must not trip it
                    # before its siblings get through; the round's own consecutive-failure bound stops it.
                    await self._deliver_part(part, attempts, result, ask_breaker=rnd.requests == 1)
                    rnd.sink_answered(success=True)
                    continue
                except (CircuitOpen, SinkThrottled, SinkMisconfigured):
                    raise  # about the sink, not this part
                except PartialDelivery:
                    rnd.sink_answered(success=True)
                    part = [r for r in part if r.outcome != Outcome.DELIVERED]
                except PermanentSinkError as exc:
                    rnd.sink_answered()
                    if len(part) == 1:
                        refused_alone.append((part[0], exc))
                        continue
                except TransientError as exc:
                    rnd.failed(exc)
                    probed_up = False
                    if not rnd.successes and rnd.failures >= outage_after:
                        # No request of the round succeeded: down, or only culprits in hand (no sibling can
                        # succeed). A probe with no event tells which.
                        if not await self._sink_is_up():
                            self._outage(todo)
                            raise  # the sink is down, not one event: retry later, nothing dead-letters
                        probed_up = True
                    elif rnd.consecutive >= self.round_max_consecutive:
                        raise  # the sink went down or flaps: retry later, nothing dead-letters
                    if len(part) == 1:
                        key = self._key(part[0])
                        leaf = leaves.setdefault(id(part[0]), _Leaf(part[0], rnd.successes))
                        leaf.failures += 1
                        # Alone, while the sink took other requests: in this round, or between this event's
                        # previous failed request and this one (a group left with only culprits).
                        failed_at = self.last_failed_at.get(key)
                        if rnd.successes or (
                            failed_before is not None and failed_at is not None and failed_at > failed_before
                        ):
                            self.isolated[key] = self.isolated.get(key, 0) + 1
                        proven = leaf.failures >= 2 and rnd.successes > leaf.successes_at_first
                        if probed_up:  # after this failure's evidence: the probe succeeded after it
                            rnd.sink_answered(success=True)
                        if proven or self.isolated.get(key, 0) >= self.max_attempts_per_event:
                            self._dead_letter(part[0], EventKeepsFailing(exc, leaf.failures), attempts)
                        else:
                            next_level.append(part)  # alone again, after its siblings
                        continue
                    if probed_up:
                        rnd.sink_answered(success=True)
                next_level.extend(_halves(part))
            level = next_level
        # Dead-lettered or held once the whole batch is in: other partitions' acceptances are the evidence.
        self.refused.extend((record, error, attempts) for record, error in refused_alone)

    async def _sink_is_up(self) -> bool:
        """Probe the sink with no event: an answer counts as a sink success (evidence for the culprits)."""
        probe = getattr(self.sink, "probe", None)
        if probe is None:  # a sink that cannot be probed: a round of failures is taken for an outage
            return False
        try:
            await probe()
        except TransientError as exc:
            log.info("sender %s: probe failed, the sink is down: %s", self.name, exc)
            return False
        self.sink_successes += 1
        self._sink_answered()
        return True

    def _outage(self, todo: list[Record]) -> None:
        """The round found the sink down: alone failures counted in it were the sink's, not the events'."""
        for record in todo:
            if record.outcome != Outcome.DELIVERED:
                self.isolated.pop(self._key(record), None)

    def _settle_refused(self, held_anyway: bool = False) -> SinkMisconfigured | None:
        """Dead-letter the events this batch's rounds found refused alone, unless the sink accepted no request
        of this batch and its recent answers (with earlier batches') hold `refuse_all_min` refusals, from two
        devices or more, and no acceptance: then the sink changed (schema, endpoint), the events did not; page,
        open the circuit and hold them (the returned error is raised). `held_anyway`: another partition failed
        and the batch is retried whole: the guard holds the refused events without paging on a maybe."""
        refused, self.refused = self.refused, []
        if not refused:
            return None
        counted = {answer[0] for answer in self.answers if answer is not None}
        for record, _, _ in refused:  # a held event refused again on a retry is no new answer
            if self._key(record) not in counted:
                self.answers.append((self._key(record), record.event.partition_key))
        recent = list(self.answers)
        if (
            not self.batch_accepted
            and None not in recent
            and len(recent) >= self.refuse_all_min
            and len({answer[1] for answer in recent if answer is not None}) >= 2
        ):
            held = SinkMisconfigured(
                f"sink {self.name}: its last {len(recent)} answers refused every event: {refused[0][1]}"
            )
            if held_anyway:
                return None  # retried with the failed partition; this guard decides again then
            self.refusing_all = True
            if self.breaker.open_now():
                self.circuit_gauge.labels(self.name).set(1)
            self.alerter.fire("sink_misconfigured", f"sink {self.name} refuses every event", key=self.name)
            return held
        if self.refusing_all:  # the refusals are the events' fault again: the sink answers, the episode ends
            self.refusing_all = False
            self._sink_answered()
        for record, error, attempts in refused:
            self._dead_letter(record, error, attempts)
        return None

    def hold_dead_letters(self, messages: list[ConsumerRecord]) -> None:  # type: ignore[type-arg]
        """The runner dead-letters these itself (undecodable, or failing unexpectedly alone): unsettled until
        its durable point passes them, like the handler's own dead letters."""
        for message in messages:
            self.unsettled.setdefault((message.topic, message.partition), {})[message.offset] = id(message)
            self.runner_letters.add(id(message))

    def _forget_refetched(self, records: list[Record], in_batch: set[int]) -> None:
        """Unsettled dead letters at or past a partition's first offset in this batch, of messages not in it,
        were given up (a revocation, the runner's one-at-a-time retry): this batch reads them again."""
        first: dict[tuple[str, int], int] = {}
        for record in records:
            tp = (record.message.topic, record.message.partition)
            first[tp] = min(first.get(tp, record.message.offset), record.message.offset)
        for tp, offset in first.items():
            letters = self.unsettled.get(tp)
            if letters:
                for stale in [
                    o
                    for o, message in letters.items()
                    if o >= offset and message not in in_batch and message not in self.runner_letters
                ]:
                    del letters[stale]
        if sum(len(letters) for letters in self.unsettled.values()) > 100_000:  # bound: partitions given away
            self.unsettled = {tp: letters for tp, letters in self.unsettled.items() if tp in first}
            self.runner_letters &= {m for letters in self.unsettled.values() for m in letters.values()}

    def _unsettled_from(self, topic: str, partition: int) -> int | None:
        """The lowest offset of the partition's dead letters not yet durable (held, or still being produced)."""
        letters = self.unsettled.get((topic, partition))
        if not letters:
            return None
        durable = self.durable_offset(TopicPartition(topic, partition))
        if durable is not None:
            for written in [o for o in letters if o < durable]:
                self.runner_letters.discard(letters.pop(written))
        return min(letters) if letters else None

    def _dead_letter(self, record: Record, error: Exception, attempts: int) -> None:
        """Held until the batch's handling returns: a retry of the batch skips it and still reports it.
        Unsettled until the runner's durable point passes it: no transaction commits its offset past it."""
        log.warning("sender %s: dead-lettering %s: %s", self.name, record.event.event_id, error)
        self.suspect.pop(self._key(record), None)
        self.isolated.pop(self._key(record), None)
        self.last_failed_at.pop(self._key(record), None)
        record.outcome = Outcome.DLQ
        self.dead_letters[id(record.message)] = DeadLetter(record.message, error, attempts)
        message = record.message
        self.unsettled.setdefault((message.topic, message.partition), {})[message.offset] = id(message)

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

    async def _ledger_seen(self, records: list[Record], keys: list[str]) -> list[bool]:
        try:
            seen = await self.ledger.seen(keys, records)
        except TransientError as exc:
            self.ledger_outage.failed(exc)
            if not self.pass_through:
                raise
            return [False] * len(records)
        self.ledger_outage.ok()
        return seen

    async def _mark_delivered(self, records: list[Record]) -> None:
        """The sink has acked: failing the batch now would deliver twice, so only this step is retried.

        Never raises: an event the sink acknowledged is delivered, whatever happens to the ledger.
        """
        forced = [r for r in records if self.replay_of.get(id(r.message)) == REPLAY_FORCE]
        keys = [self._key(r) for r in records] + [self._forced_key(r) for r in forced]
        backoff = Backoff()
        attempt = 0
        while True:
            attempt += 1
            try:
                await self.ledger.mark(keys, [*records, *forced])
                self.ledger_outage.ok()
                return
            except TransientError as exc:
                self.ledger_outage.failed(exc)
                if self.pass_through:
                    return
                delay = backoff.delay(attempt)
                log.warning("sender %s: ledger write failed (attempt %d): %s", self.name, attempt, exc)
                await asyncio.sleep(delay)
            except Exception as exc:  # a bug: report it, keep the delivery
                log.exception("sender %s: ledger write failed; a replay of these events could re-deliver", self.name)
                sentry_sdk.capture_exception(exc)
                return

    def _record_lag(self, records: list[Record], acked: float) -> None:
        # Per batch, not per event: label lookups and HDR records showed in the sender's profile.
        per_tenant: dict[str, int] = {}
        end_to_end = self.metrics.end_to_end_lag.labels(self.name)
        lags: list[int] = []
        stage_lags: dict[str, list[int]] = {stage: [] for stage in self.stage_lag}
        for record in records:
            event = record.event
            per_tenant[event.tenant] = per_tenant.get(event.tenant, 0) + 1
            if event.ingest_ts:
                lag = acked - event.ingest_ts
                lags.append(int(lag))
                end_to_end.observe(lag / 1000)
            stamps = event.stages
            previous = stamps.get(pipeline.COLLECTOR.name)
            for stage in HOPS:
                at = stamps.get(stage)
                if previous is not None and at is not None:
                    stage_lags[stage].append(int(at - previous))
                previous = at if at is not None else previous
            if previous is not None:
                stage_lags[pipeline.SENDER.name].append(int(acked - previous))
        self.lag.record_many(lags)
        for stage, values in stage_lags.items():
            self.stage_lag[stage].record_many(values)
        for tenant, count in per_tenant.items():
            self.metrics.delivered.labels(self.name, tenant).inc(count)

    def state_rows(self) -> list[dict[str, Any]]:
        """The sink's live state, for the table browser."""
        return [
            {
                "sink": self.name,
                "circuit": self.breaker.state,
                "consecutive_failures": self.breaker.failures,
                "circuit_opened": self.breaker.opened_count,
                "throttle_interval_s": round(self.throttle.interval_s, 3),
                "batches_in_retry": len(self.attempts),
                "events_suspect": len(self.suspect),
            }
        ]

    def stats(self) -> dict[str, Any]:
        m = self.metrics
        return {
            "sink": self.name,
            "type": self.sink.config.type,
            "delivered": m.total(m.delivered),
            "skipped_already_delivered": self.skipped,
            "dead_lettered": m.total(m.dead_lettered),
            "retries": m.total(m.retries),
            "circuit": self.breaker.state,
            "circuit_opened": self.breaker.opened_count,
            "throttle_interval_s": round(self.throttle.interval_s, 3),
            "lag": self.lag.percentiles(),
            "stage_lag_p95_ms": {s: w.percentiles().get("p95_ms") for s, w in self.stage_lag.items()},
        }


@dataclass
class _Round:
    """One isolation round's requests: any success shows the sink is up."""

    started: float
    max_requests: int
    requests: int = 0
    successes: int = 0
    failures: int = 0
    consecutive: int = 0  # transient failures since the sink last answered
    retry_after: float | None = None
    backoff: Backoff = field(default_factory=lambda: Backoff(base_s=0.05, ceiling_s=2.0))

    def sink_answered(self, success: bool = False) -> None:
        self.consecutive = 0
        self.retry_after = None
        self.successes += success

    def failed(self, exc: TransientError) -> None:
        self.failures += 1
        self.consecutive += 1
        self.retry_after = exc.retry_after

    async def pause(self) -> None:
        """After a failure, wait (with jitter, at least Retry-After up to the ceiling) before the next request."""
        if self.consecutive:
            await asyncio.sleep(self.backoff.delay(self.consecutive, self.retry_after))


@dataclass
class _Leaf:
    """An event that failed alone in a round: dead-lettered only on evidence that it is the payload."""

    record: Record
    successes_at_first: int
    failures: int = 0


def _halves(part: list[Record]) -> list[list[Record]]:
    middle = len(part) // 2
    return [part[:middle], part[middle:]]


class SinkLifecycle(Service):
    """Opens the sink's connections with the worker and closes them after the agents stopped."""

    def __init__(self, sink: SinkSender) -> None:
        super().__init__()
        self.sink = sink

    async def on_start(self) -> None:
        await self.sink.start()

    async def on_stop(self) -> None:
        await self.sink.close()


def build(ctx: ServiceContext) -> Any:
    return build_sender(ctx)[0]


def build_sender(ctx: ServiceContext) -> tuple[Any, SinkDelivery, StageRunner]:
    """The sender's app, with its delivery and runner wired together (tests drive the two directly)."""
    assert ctx.sink is not None
    sink_config = ctx.config.sinks[ctx.sink]
    app = ctx.create_app()
    sink = make_sink(
        sink_config, ctx.settings.broker, ctx.settings.redis_url, str(app.conf.id), ctx.config.dedupe.window_s
    )
    dedupe = ctx.config.dedupe
    ledger = ctx.key_window("delivered-ledger")
    stage = ctx.spec.label(ctx.sink)
    delivery = SinkDelivery(
        sink,
        ledger,
        ctx.metrics,
        Alerter(stage),
        pass_through=dedupe.on_redis_down == "pass-through",
        receipts_topic=ctx.topics.receipts,
        alert_after_s=ctx.config.audit.outage_alert_after_s,
    )
    runner = StageRunner(
        app,
        stage,
        delivery.handle,
        ctx.metrics,
        ctx.topics.dlq(stage),
        source=ctx.source_topic,
        batch_max=sink_config.batch_max,
        batch_linger_s=sink_config.linger_s,
        states=[ledger],
        # A request in flight at a revocation ends (acked: marked and published; failed: given up) before
        # the handover, instead of being cancelled after the sink may have taken it.
        revoke_grace_s=sink_config.timeout_s + 1.0,
        # A transactional Kafka sink commits the input offsets in its transactions; a plain commit could
        # land after a pending one and move the group back below what the sink delivered.
        commits_offsets=not getattr(sink, "transactional", False),
        hold_dead_letters=delivery.hold_dead_letters,
    )

    # A transactional sink commits no source offset past a dead letter the runner has not written yet.
    delivery.durable_offset = runner.done.get
    runner.attach(ctx)

    # A dependency of the runner: open before its first batch, closed only after its last one.
    runner.add_dependency(SinkLifecycle(sink))
    browser = TableBrowser(app, ctx.settings, {"delivered-ledger": ledger}, {"sink-state": delivery.state_rows})
    add_table_views(app, browser)
    add_common_views(app, stage, ctx.metrics, delivery.stats, ctx.settings, ready=runner.ready)
    return app, delivery, runner
